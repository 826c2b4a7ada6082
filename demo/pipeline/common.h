/* Small helpers shared by the pipeline demo's three programs. */
#include "vmk.h"

static inline long slen(const char *s) { long n = 0; while (s[n]) n++; return n; }

static inline long fmt_num(char *out, long v)
{
    char tmp[24]; int i = 0; long n = 0;
    if (v < 0) { out[n++] = '-'; v = -v; }
    do { tmp[i++] = '0' + v % 10; v /= 10; } while (v);
    while (i) out[n++] = tmp[--i];
    return n;
}
