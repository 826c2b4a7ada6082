/* vmk_crt0.c - the start of every C program that 'vmk build' compiles.
 *
 * The kernel enters a container at _start with RSP = VMK_STACK_TOP (16-byte
 * aligned) and zeroed .bss (the image's memsz > filesz part).  _start calls
 * int main(void) and ends the container with main's value as its exit code.
 *
 * gcc may emit calls to memcpy, memmove, memset and memcmp even with
 * -ffreestanding, so they are here (weak: a program may bring its own).  They
 * use rep movsb/stosb so that -O2 cannot turn their loops back into calls to
 * themselves.
 */
#include <stddef.h>
#include "vmk.h"

#define VMK_STR_(x) #x
#define VMK_STR(x) VMK_STR_(x)

int main(void);

__asm__(
    ".section .text.start, \"ax\", @progbits\n"
    ".globl _start\n"
    ".type _start, @function\n"
    "_start:\n"
    "    xor %ebp, %ebp\n"
    "    and $-16, %rsp\n"
    "    call main\n"
    "    movslq %eax, %rdi\n"
    "    mov $" VMK_STR(SYS_EXIT) ", %eax\n"
    "    syscall\n"
    "    ud2\n"
    ".size _start, . - _start\n"
    ".previous\n");

__attribute__((weak)) void *memcpy(void *dst, const void *src, size_t n)
{
    void *d = dst;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
    return dst;
}

__attribute__((weak)) void *memmove(void *dst, const void *src, size_t n)
{
    if ((const char *)dst <= (const char *)src || (const char *)dst >= (const char *)src + n)
        return memcpy(dst, src, n);
    void *d = (char *)dst + n - 1;
    const void *s = (const char *)src + n - 1;
    __asm__ volatile("std; rep movsb; cld" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
    return dst;
}

__attribute__((weak)) void *memset(void *dst, int c, size_t n)
{
    void *d = dst;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return dst;
}

__attribute__((weak)) int memcmp(const void *a, const void *b, size_t n)
{
    const unsigned char *x = a, *y = b;
    for (size_t i = 0; i < n; i++)
        if (x[i] != y[i])
            return x[i] - y[i];
    return 0;
}
