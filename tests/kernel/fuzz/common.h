/* common.h - what the fuzz image's programs agree on (tests/kernel/test_fuzz_guest.py).
 *
 * The supervisor hands each fuzzer container it spawns three handles:
 *   0  its control channel (24-byte messages): first a config message from the
 *      supervisor, then progress reports from the fuzzer;
 *   1  "pool", a channel every fuzzer holds (cross-container rendezvous, EPIPE);
 *   2  console.rx (nobody types: receivers park on it).
 */
#ifndef FUZZ_COMMON_H
#define FUZZ_COMMON_H

#include "vmk.h"

#define CFG_MAGIC  0x4346475a5a5546UL     /* "FUZZCFG" */
#define PROG_MAGIC 0x474f52505a5a5546UL   /* "FUZZPROG" */

struct fuzz_msg {
    uint64_t magic;
    uint64_t a;          /* config: seed;   progress: syscalls done so far */
    uint64_t b;          /* config: budget; progress: worker fibers started */
};
#define FUZZ_MSG 24
_Static_assert(sizeof(struct fuzz_msg) == FUZZ_MSG, "fuzz_msg");

/* Decimal, no libc: writes v into buf (at least 21 bytes); returns the length. */
static inline int fmt_u(char *buf, unsigned long v)
{
    char tmp[24];
    int n = 0, len = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        buf[len++] = tmp[--n];
    return len;
}

static inline int put_s(char *buf, const char *s)
{
    int n = 0;
    while (s[n]) {
        buf[n] = s[n];
        n++;
    }
    return n;
}

#endif
