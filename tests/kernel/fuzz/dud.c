/* dud.c - the one program a fuzzer may spawn (by the name "dud"): it lives a
 * little while, holding whatever handles it was given, and ends. */
#include "vmk.h"

int main(void)
{
    vmk_sleep(30000);
    return 7;
}
