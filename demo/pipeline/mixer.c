/* Interrupt-driven stage: one CML sync over two channels, the serial console
 * (bytes typed, delivered by the UART's interrupt) and the ticker's numbers;
 * whichever is ready first is turned into a line for the printer.
 * handles: 0 = console.rx, 1 = numbers, 2 = lines. */
#include "common.h"

int main(void)
{
    char key; long num;
    char line[64];
    for (;;) {
        struct vmk_event ev[2] = {
            { .kind = EV_RECV, .handle = 0, .arg0 = (uint64_t)&key, .arg1 = 1 },
            { .kind = EV_RECV, .handle = 1, .arg0 = (uint64_t)&num, .arg1 = sizeof num },
        };
        long which = vmk_sync(ev, 2);
        long n = 0;
        if (which == 0) {
            const char *p = "key "; while (*p) line[n++] = *p++;
            line[n++] = key;
        } else if (which == 1) {
            if (num < 0) break;
            const char *p = "tick "; while (*p) line[n++] = *p++;
            n += fmt_num(line + n, num);
        } else {
            return 1;
        }
        line[n++] = '\r'; line[n++] = '\n';
        vmk_send(2, line, n);
    }
    vmk_send(2, "done\r\n", 6);
    return 0;
}
