/* Output stage: lines from handle 0 go to the console (handle 1), stamped with the virtual time. */
#include "common.h"

int main(void)
{
    char in[64], out[96];
    for (;;) {
        long n = vmk_recv(0, in, sizeof in);
        if (n < 0) return 0;                    /* the mixer is gone (EPIPE) */
        long k = 0;
        out[k++] = '[';
        k += fmt_num(out + k, vmk_time() / 1000000);
        const char *ms = " ms] "; while (*ms) out[k++] = *ms++;
        for (long i = 0; i < n; i++) out[k++] = in[i];
        vmk_send(1, out, k);
        if (n == 6 && in[0] == 'd') return 0;
    }
}
