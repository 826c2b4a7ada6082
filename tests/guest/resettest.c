/* resettest.c - vmk machine reset test kernel (multiboot v1, runs on QEMU and vmk).
 *
 * The command line names the way to reset: "cf9" (PIIX3 reset control register 0xCF9 = 0x06),
 * "kbd" (i8042 command 0xFE), "p92" (port 0x92 bit 0), "triple" (a triple fault: #BP with an
 * empty IDT). CMOS byte 0x40 (free RAM, kept across a reset) marks the first boot, so:
 *   with -no-reboot: "boot 1 ... resetting via X", then the emulator exits with status 0;
 *   rebooting: the same, then "boot 2: after the reset via X" and isa-debug-exit 0x10 (status 33).
 */
#include <stdint.h>
#include "io.h"
#include "kprintf.h"
#include "serial.h"
#include "multiboot.h"

#define MARK_INDEX 0x40
#define MARK 0xA5

static uint8_t cmos_read(uint8_t i) { outb(0x70, i); return inb(0x71); }
static void cmos_write(uint8_t i, uint8_t v) { outb(0x70, i); outb(0x71, v); }

static int streq(const char *a, const char *b)
{
    while (*a && *a == *b) { a++; b++; }
    return *a == *b;
}

/* The last word of the command line (QEMU passes the kernel's path first). */
static const char *method_of(const char *cmdline)
{
    const char *w = cmdline;
    for (const char *p = cmdline; *p; p++)
        if (*p == ' ' && p[1])
            w = p + 1;
    return w;
}

void kmain(uint32_t magic, uint32_t mbi_addr)
{
    serial_init(COM1_BASE, 115200);
    console_crlf = 0;
    const struct multiboot_info *mbi = (const struct multiboot_info *)(uintptr_t)mbi_addr;
    const char *m = "";
    if (magic == MULTIBOOT_BOOTLOADER_MAGIC && (mbi->flags & MBI_FLAG_CMDLINE))
        m = method_of((const char *)(uintptr_t)mbi->cmdline);
    if (cmos_read(MARK_INDEX) == MARK) {
        cmos_write(MARK_INDEX, 0);
        kprintf("boot 2: after the reset via %s\n", m);
        serial_wait_idle();
        debug_exit(0x10);
    }
    cmos_write(MARK_INDEX, MARK);
    kprintf("boot 1: resetting via %s\n", m);
    serial_wait_idle();
    if (streq(m, "cf9")) {
        outb(0xCF9, 0x02);
        outb(0xCF9, 0x06);
    } else if (streq(m, "kbd")) {
        for (int i = 0; i < 100000 && (inb(0x64) & 2); i++)
            ;
        outb(0x64, 0xFE);
    } else if (streq(m, "p92")) {
        outb(0x92, inb(0x92) & ~1);
        outb(0x92, inb(0x92) | 1);
    } else if (streq(m, "triple")) {
        static const struct { uint16_t limit; uint64_t base; } __attribute__((packed)) empty = { 0, 0 };
        __asm__ volatile("lidt %0; int3" :: "m"(empty));
    }
    kprintf("still running: no reset\n");
    serial_wait_idle();
    debug_exit(0x11);
}
