/* witness.c - prints a known sequence on its console handle (handle 0:
 * console.tx) while the fuzzers run: "witness NNNN ok\n", one message a
 * line (the console driver writes a message whole), WITNESS_GAP ns apart,
 * then "witness done\n".  test_fuzz_guest.py checks it is all there, in order. */
#include "common.h"

#ifndef WITNESS_LINES
#define WITNESS_LINES 100
#endif
#ifndef WITNESS_GAP
#define WITNESS_GAP 100000L
#endif

int main(void)
{
    char line[32];
    for (long i = 0; i < WITNESS_LINES; i++) {
        int n = put_s(line, "witness ");
        char num[24];
        int k = fmt_u(num, (unsigned long)i);
        for (int z = k; z < 4; z++)
            line[n++] = '0';
        for (int j = 0; j < k; j++)
            line[n++] = num[j];
        n += put_s(line + n, " ok\n");
        if (vmk_send(0, line, n) != 0)
            return 1;
        vmk_sleep(WITNESS_GAP);
    }
    if (vmk_send(0, "witness done\n", 13) != 0)
        return 1;
    return 0;
}
