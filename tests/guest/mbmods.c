/* mbmods.c - the multiboot command line and modules (multiboot v1, runs on QEMU and vmk).
 *
 * Prints what a multiboot loader hands over beside memory (multiboot spec 0.6.96 §3.3):
 * the command line (QEMU builds it as "KERNEL-PATH ARGS" from -kernel and -append), and
 * for each module (QEMU: -initrd "file args,file2") its string, its size and an FNV-1a
 * checksum of its bytes.  Checked silently, printed only when wrong: the info flags say
 * CMDLINE (and MODS when there are modules), every module starts on a page boundary (our
 * header sets flag 0), at or after the kernel's end, after the previous module, and
 * inside RAM that the memory map reports available.
 * Ends with isa-debug-exit 0x10 (status 33), or 0x11 (status 35) after a FAIL line.
 */
#include <stdint.h>
#include "io.h"
#include "kprintf.h"
#include "serial.h"
#include "multiboot.h"

#define EXIT_PASS 0x10
#define EXIT_FAIL 0x11
#define PAGE 4096u

struct multiboot_mod {
    uint32_t mod_start;
    uint32_t mod_end;           /* one past the last byte */
    uint32_t string;            /* physical address of a C string */
    uint32_t reserved;
} __attribute__((packed));

extern char __image_end[];

static int failures;

static void check(int ok, const char *what, uint32_t value)
{
    if (!ok) {
        kprintf("FAIL: %s (%#x)\n", what, value);
        failures++;
    }
}

static uint32_t fnv1a(const uint8_t *p, uint32_t n)
{
    uint32_t h = 2166136261u;
    for (uint32_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 16777619u;
    return h;
}

/* Is [start, end) inside one available (type 1) range of the memory map? */
static int in_available_ram(const struct multiboot_info *mbi, uint64_t start, uint64_t end)
{
    if (!(mbi->flags & MBI_FLAG_MMAP))
        return 0;
    uint32_t off = 0;
    while (off + 24 <= mbi->mmap_length) {
        const struct multiboot_mmap_entry *e =
            (const struct multiboot_mmap_entry *)(uintptr_t)(mbi->mmap_addr + off);
        if (e->type == 1 && e->addr <= start && end <= e->addr + e->len)
            return 1;
        off += e->size + 4;
    }
    return 0;
}

void kmain(uint32_t magic, uint32_t mbi_addr)
{
    serial_init(COM1_BASE, 115200);
    console_crlf = 0;
    check(magic == MULTIBOOT_BOOTLOADER_MAGIC, "multiboot magic", magic);
    const struct multiboot_info *mbi = (const struct multiboot_info *)(uintptr_t)mbi_addr;
    check(mbi->flags & MBI_FLAG_CMDLINE, "info flags without CMDLINE", mbi->flags);
    if (mbi->flags & MBI_FLAG_CMDLINE)
        kprintf("cmdline: [%s]\n", (const char *)(uintptr_t)mbi->cmdline);
    uint32_t count = (mbi->flags & MBI_FLAG_MODS) ? mbi->mods_count : 0;
    kprintf("modules: %u\n", count);
    uint32_t floor = (uint32_t)(uintptr_t)__image_end;
    const struct multiboot_mod *mods = (const struct multiboot_mod *)(uintptr_t)mbi->mods_addr;
    for (uint32_t i = 0; i < count; i++) {
        const struct multiboot_mod *m = &mods[i];
        uint32_t size = m->mod_end - m->mod_start;
        kprintf("module %u: [%s] size %u fnv1a %08x\n", i, (const char *)(uintptr_t)m->string, size,
                fnv1a((const uint8_t *)(uintptr_t)m->mod_start, size));
        check(m->mod_end >= m->mod_start, "module ends before its start", m->mod_end);
        check(m->mod_start % PAGE == 0, "module not page-aligned", m->mod_start);
        check(m->mod_start >= floor, "module overlaps the kernel or the previous module", m->mod_start);
        check(in_available_ram(mbi, m->mod_start, m->mod_end), "module outside available RAM", m->mod_start);
        floor = m->mod_end;
    }
    kprintf(failures ? "mbmods: FAIL\n" : "mbmods: done\n");
    serial_wait_idle();
    debug_exit(failures ? EXIT_FAIL : EXIT_PASS);
}
