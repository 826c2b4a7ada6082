/* A container the shell can spawn: greets on the console it was handed and exits 7. */
#include "vmk.h"
int main(void)
{
    static const char msg[] = "hello from a spawned container\r\n";
    vmk_send(1, msg, sizeof msg - 1);
    return 7;
}
