/* Timer-driven stage: every 20 ms of virtual time, send the next number on handle 0. */
#include "common.h"

int main(void)
{
    for (long i = 1; i <= 5; i++) {
        vmk_sleep(20 * 1000 * 1000);
        vmk_send(0, &i, sizeof i);
    }
    long end = -1;
    vmk_send(0, &end, sizeof end);
    return 0;
}
