/* fwtest.c - what the firmware leaves in memory (multiboot v1, runs on QEMU and vmk).
 *
 * Reads, as an OS does, the BIOS data area, the multiboot memory map, the
 * Intel MP tables (MP Spec 1.4 ch. 4) and the ACPI tables (ACPI 6.5 ch. 5:
 * RSDP, RSDT, XSDT, FADT, DSDT, MADT, HPET), checks every checksum and prints
 * the facts SeaBIOS on QEMU and vmk's firmware share.  Things only one of them
 * has are checked without printing: the XSDT (QEMU's RSDP is revision 0),
 * the X_ fields of a revision >= 3 FADT, the PCI entries and overrides QEMU
 * adds.  Then it reads the PM timer and powers the machine off through
 * PM1a_CNT with the SLP_TYP of \_S5: both emulators exit with status 0.
 * A FAIL line and isa-debug-exit 0x11 (status 35) if anything is wrong.
 */
#include <stdint.h>
#include <stdarg.h>
#include "io.h"
#include "kprintf.h"
#include "serial.h"
#include "multiboot.h"

#define EXIT_FAIL 0x11
#define SPIN_LIMIT 20000000u

static int failures;

static void fact(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void fact(int ok, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    kvprintf(console_putc, fmt, ap);
    va_end(ap);
    if (!ok) {
        kputs("  <-- FAIL");
        failures++;
    }
    kputs("\n");
}

/* A silent check: prints only when it fails. */
static void check(int ok, const char *what)
{
    if (!ok)
        fact(0, "check: %s", what);
}

/* Physical memory (identity-mapped by boot.S).  The asm hides the constant
 * from GCC, which otherwise treats addresses in the first page as null. */
static inline const volatile uint8_t *phys(uint64_t addr)
{
    __asm__("" : "+r"(addr));
    return (const volatile uint8_t *)addr;
}
static uint8_t rd8(uint64_t a) { return *phys(a); }
static uint16_t rd16(uint64_t a) { return (uint16_t)(rd8(a) | rd8(a + 1) << 8); }
static uint32_t rd32(uint64_t a) { return rd16(a) | (uint32_t)rd16(a + 2) << 16; }
static uint64_t rd64(uint64_t a) { return rd32(a) | (uint64_t)rd32(a + 4) << 32; }

static uint8_t sum(uint64_t a, uint32_t n)
{
    uint8_t s = 0;
    for (uint32_t i = 0; i < n; i++)
        s += rd8(a + i);
    return s;
}

static int sig_is(uint64_t a, const char *s, unsigned n)
{
    for (unsigned i = 0; i < n; i++)
        if (rd8(a + i) != (uint8_t)s[i])
            return 0;
    return 1;
}

/* ---------------------------------------------------------------- BDA, memory map */

static void bios_data_area(const struct multiboot_info *mbi)
{
    kprintf("\n[bda]\n");
    fact(rd16(0x400) == 0x3F8, "COM1 base 0x%03x", rd16(0x400));
    fact(rd16(0x40E) == 0x9FC0, "EBDA segment 0x%04x", rd16(0x40E));
    fact(rd16(0x413) == 639, "base memory %u KiB", rd16(0x413));
    fact(mbi->mem_lower == rd16(0x413), "multiboot mem_lower %u KiB, mem_upper %u KiB", mbi->mem_lower, mbi->mem_upper);
    if (!(mbi->flags & MBI_FLAG_MMAP)) {
        fact(0, "no multiboot memory map");
        return;
    }
    uint64_t top_ram = 0;
    for (uint32_t off = 0; off + 24 <= mbi->mmap_length;) {
        uint64_t e = mbi->mmap_addr + off;
        uint64_t base = rd64(e + 4), len = rd64(e + 12);
        uint32_t type = rd32(e + 20);
        kprintf("mmap %010lx-%010lx %s\n", base, base + len, type == 1 ? "RAM" : type == 2 ? "reserved" : "other");
        if (type == 1 && base == 0x100000)
            top_ram = base + len;
        off += rd32(e) + 4;
    }
    fact(top_ram == 0x100000 + (uint64_t)mbi->mem_upper * 1024, "mem_upper ends at the first RAM range above 1 MiB");
}

/* ---------------------------------------------------------------- MP tables */

static uint64_t mp_search(uint64_t a, uint64_t len)
{
    for (uint64_t p = a; p + 16 <= a + len; p += 16)
        if (sig_is(p, "_MP_", 4) && sum(p, 16) == 0)
            return p;
    return 0;
}

static void mp_tables(void)
{
    kprintf("\n[mp]\n");
    uint64_t ebda = (uint64_t)rd16(0x40E) << 4;
    uint64_t fp = mp_search(ebda, 1024);
    const char *where = "EBDA";
    if (!fp) {
        fp = mp_search(((uint64_t)rd16(0x413) << 10) - 1024, 1024);
        where = "base memory";
    }
    if (!fp) {
        fp = mp_search(0xF0000, 0x10000);
        where = "BIOS ROM";
    }
    fact(fp != 0, "floating pointer in %s, checksum ok", fp ? where : "none");
    if (!fp)
        return;
    fact(rd8(fp + 8) == 1 && rd8(fp + 9) == 4, "length %u paragraph, spec revision 1.%u", rd8(fp + 8), rd8(fp + 9));
    fact(rd8(fp + 11) == 0 && !(rd8(fp + 12) & 0x80), "configuration table present, no IMCR");
    uint64_t ct = rd32(fp + 4);
    uint16_t len = rd16(ct + 4);
    fact(sig_is(ct, "PCMP", 4) && sum(ct, len) == 0, "configuration table PCMP, checksum ok");
    fact(rd8(ct + 6) == 4, "configuration table revision %u", rd8(ct + 6));
    fact(rd32(ct + 36) == 0xFEE00000, "local APIC at 0x%08x", rd32(ct + 36));
    uint16_t count = rd16(ct + 34);
    unsigned cpus = 0, bsp = 0xFF, ioapics = 0, isa_bus = 0xFF, extint_lint = 0xFF, nmi_lint = 0xFF;
    uint32_t ioapic_addr = 0;
    uint8_t ioapic_ver = 0, ioapic_id = 0xFF;
    int pin_of[16];
    for (int i = 0; i < 16; i++)
        pin_of[i] = -1;
    uint64_t e = ct + 44, end = ct + len;
    for (uint16_t i = 0; i < count && e < end; i++) {
        switch (rd8(e)) {
        case 0:
            if (rd8(e + 3) & 1)
                cpus++;
            if (rd8(e + 3) & 2)
                bsp = rd8(e + 1);
            e += 20;
            continue;
        case 1:
            if (sig_is(e + 2, "ISA   ", 6))
                isa_bus = rd8(e + 1);
            break;
        case 2:
            ioapics++;
            ioapic_id = rd8(e + 1);
            ioapic_ver = rd8(e + 2);
            ioapic_addr = rd32(e + 4);
            break;
        case 3:
            if (rd8(e + 4) == isa_bus && rd8(e + 1) == 0 && rd8(e + 5) < 16)
                pin_of[rd8(e + 5)] = rd8(e + 7);
            break;
        case 4:
            if (rd8(e + 1) == 3)
                extint_lint = rd8(e + 7);
            if (rd8(e + 1) == 1)
                nmi_lint = rd8(e + 7);
            break;
        default:
            fact(0, "unknown entry type %u", rd8(e));
            return;
        }
        e += 8;
    }
    fact(cpus == 1 && bsp == 0, "processors %u, BSP local APIC id %u", cpus, bsp);
    fact(isa_bus != 0xFF, "ISA bus present");
    fact(ioapics == 1 && ioapic_addr == 0xFEC00000, "IO-APIC id %u version 0x%02x at 0x%08x", ioapic_id,
         ioapic_ver, ioapic_addr);
    static const uint8_t isa[] = {0, 1, 3, 4, 6, 7, 8, 12, 13, 14, 15};
    for (unsigned i = 0; i < sizeof isa; i++) {
        int irq = isa[i], want = irq == 0 ? 2 : irq;
        fact(pin_of[irq] == want, "ISA IRQ%d -> IO-APIC pin %d", irq, pin_of[irq]);
    }
    fact(extint_lint == 0 && nmi_lint == 1, "ExtINT on LINT%u, NMI on LINT%u", extint_lint, nmi_lint);
}

/* ---------------------------------------------------------------- ACPI */

static uint64_t rsdt, xsdt;
static int rsdp_rev;

static int table_ok(uint64_t t, const char *sig)
{
    return t && sig_is(t, sig, 4) && rd32(t + 4) >= 36 && sum(t, rd32(t + 4)) == 0;
}

/* The table with signature `sig` through the RSDT; the XSDT (if any) must list the same address. */
static uint64_t find_table(const char *sig)
{
    uint64_t found = 0;
    uint32_t n = (rd32(rsdt + 4) - 36) / 4;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t t = rd32(rsdt + 36 + 4 * i);
        if (sig_is(t, sig, 4))
            found = t;
    }
    if (xsdt) {
        uint64_t xfound = 0;
        uint32_t xn = (rd32(xsdt + 4) - 36) / 8;
        for (uint32_t i = 0; i < xn; i++) {
            uint64_t t = rd64(xsdt + 36 + 8 * i);
            if (sig_is(t, sig, 4))
                xfound = t;
        }
        check(xfound == found, "XSDT and RSDT point at the same table");
    }
    return found;
}

static void acpi_root(void)
{
    kprintf("\n[acpi]\n");
    uint64_t rsdp = 0;
    for (uint64_t p = 0xE0000; p < 0x100000; p += 16)
        if (sig_is(p, "RSD PTR ", 8) && sum(p, 20) == 0) {
            rsdp = p;
            break;
        }
    fact(rsdp != 0, "RSDP in 0xe0000-0xfffff, checksum ok");
    if (!rsdp)
        return;
    rsdp_rev = rd8(rsdp + 15);
    rsdt = rd32(rsdp + 16);
    if (rsdp_rev >= 2) {
        check(rd32(rsdp + 20) == 36 && sum(rsdp, 36) == 0, "RSDP revision 2: length 36, extended checksum");
        xsdt = rd64(rsdp + 24);
        check(table_ok(xsdt, "XSDT"), "XSDT signature and checksum");
    } else {
        check(rsdp_rev == 0, "RSDP revision 0 or >= 2");
    }
    fact(table_ok(rsdt, "RSDT"), "RSDT checksum ok");
    static const char *const sigs[] = {"FACP", "APIC", "HPET"};
    for (unsigned i = 0; i < 3; i++)
        fact(table_ok(find_table(sigs[i]), sigs[i]), "%s present, checksum ok", sigs[i]);
}

static int s5_typ = -1;

static void fadt_dsdt(void)
{
    kprintf("\n[fadt]\n");
    uint64_t f = find_table("FACP");
    if (!table_ok(f, "FACP"))
        return;
    uint32_t len = rd32(f + 4);
    uint64_t dsdt = rd32(f + 40);
    fact(rd16(f + 46) == 9, "SCI_INT %u", rd16(f + 46));
    fact(rd32(f + 56) == 0x600 && rd8(f + 88) == 4, "PM1a_EVT_BLK 0x%x, length %u", rd32(f + 56), rd8(f + 88));
    fact(rd32(f + 64) == 0x604 && rd8(f + 89) == 2, "PM1a_CNT_BLK 0x%x, length %u", rd32(f + 64), rd8(f + 89));
    fact(rd32(f + 76) == 0x608 && rd8(f + 91) == 4, "PM_TMR_BLK 0x%x, length %u", rd32(f + 76), rd8(f + 91));
    fact(!(rd32(f + 112) & (1u << 8)), "PM timer is 24-bit (TMR_VAL_EXT clear)");
    if (rd8(f + 8) >= 3 && len >= 244) {
        uint64_t xd = rd64(f + 140);
        check(xd == 0 || xd == dsdt, "X_DSDT agrees with DSDT");
        if (xd)
            dsdt = xd;
        check(rd8(f + 148) == 1 && rd64(f + 152) == rd32(f + 56), "X_PM1a_EVT_BLK in I/O space at PM1a_EVT_BLK");
        check(rd8(f + 172) == 1 && rd64(f + 176) == rd32(f + 64), "X_PM1a_CNT_BLK in I/O space at PM1a_CNT_BLK");
        check(rd8(f + 208) == 1 && rd64(f + 212) == rd32(f + 76), "X_PM_TMR_BLK in I/O space at PM_TMR_BLK");
        check(rd8(f + 173) == 16 && rd8(f + 209) == 32, "X_ block bit widths");
    }
    fact(table_ok(dsdt, "DSDT"), "DSDT checksum ok");
    uint32_t dlen = rd32(dsdt + 4);
    for (uint32_t i = 36; i + 8 < dlen; i++) {
        uint64_t p = dsdt + i;
        if (!sig_is(p, "_S5_", 4) || !(rd8(p - 1) == 0x08 || (rd8(p - 1) == 0x5C && rd8(p - 2) == 0x08)))
            continue;
        if (rd8(p + 4) != 0x12 || (rd8(p + 5) & 0xC0))
            break;
        uint8_t el = rd8(p + 7);
        s5_typ = el == 0x00 ? 0 : el == 0x01 ? 1 : el == 0x0A ? rd8(p + 8) : -1;
        break;
    }
    fact(s5_typ >= 0, "\\_S5 package, SLP_TYPa %d", s5_typ);
}

static void madt(void)
{
    kprintf("\n[madt]\n");
    uint64_t m = find_table("APIC");
    if (!table_ok(m, "APIC"))
        return;
    uint32_t len = rd32(m + 4);
    fact(rd32(m + 36) == 0xFEE00000, "local APIC at 0x%08x", rd32(m + 36));
    fact(rd32(m + 40) & 1, "PCAT_COMPAT (8259s present)");
    unsigned cpus = 0, ioapics = 0, nmi_lint = 0xFF, nmi_uid = 0;
    uint32_t ioapic_addr = 0, gsi_base = 0xFFFFFFFF, irq0_gsi = 0xFFFFFFFF, irq9_gsi = 0xFFFFFFFF;
    uint16_t irq0_flags = 0xFFFF, irq9_flags = 0xFFFF;
    for (uint64_t e = m + 44; e + 2 <= m + len && rd8(e + 1) >= 2; e += rd8(e + 1)) {
        switch (rd8(e)) {
        case 0:
            if (rd32(e + 4) & 1)
                cpus++;
            break;
        case 1:
            ioapics++;
            ioapic_addr = rd32(e + 4);
            gsi_base = rd32(e + 8);
            break;
        case 2:
            if (rd8(e + 2) == 0 && rd8(e + 3) == 0) {
                irq0_gsi = rd32(e + 4);
                irq0_flags = rd16(e + 8);
            }
            if (rd8(e + 2) == 0 && rd8(e + 3) == 9) {
                irq9_gsi = rd32(e + 4);
                irq9_flags = rd16(e + 8);
            }
            break;
        case 4:
            nmi_uid = rd8(e + 2);
            nmi_lint = rd8(e + 5);
            break;
        }
    }
    fact(cpus == 1, "processor local APICs %u", cpus);
    fact(ioapics == 1 && ioapic_addr == 0xFEC00000 && gsi_base == 0, "IO-APIC at 0x%08x, GSI base %u",
         ioapic_addr, gsi_base);
    fact(irq0_gsi == 2 && irq0_flags == 0, "override IRQ0 -> GSI %u, flags 0x%04x", irq0_gsi, irq0_flags);
    fact(irq9_gsi == 9 && irq9_flags == 0x000D, "override IRQ9 -> GSI %u, flags 0x%04x (level, active high)",
         irq9_gsi, irq9_flags);
    fact(nmi_lint == 1 && nmi_uid == 0xFF, "local APIC NMI on LINT%u of processor 0x%02x", nmi_lint, nmi_uid);
}

static void hpet(void)
{
    kprintf("\n[hpet]\n");
    uint64_t h = find_table("HPET");
    if (!table_ok(h, "HPET"))
        return;
    uint32_t id = rd32(h + 36);
    fact(rd8(h + 40) == 0 && rd64(h + 44) == 0xFED00000, "base 0x%08lx in memory space", rd64(h + 44));
    fact(id == 0x8086A201, "event timer block id 0x%08x: vendor 0x%04x, %u timers, %s counter", id, id >> 16,
         ((id >> 8) & 0x1F) + 1, (id & (1u << 13)) ? "64-bit" : "32-bit");
}

/* ---------------------------------------------------------------- PM timer, power-off */

static void pm_timer(void)
{
    kprintf("\n[pm]\n");
    uint32_t t0 = inl(0x608), t1 = t0;
    for (uint32_t i = 0; i < SPIN_LIMIT && t1 == t0; i++)
        t1 = inl(0x608);
    uint32_t t2 = t1;
    for (uint32_t i = 0; i < SPIN_LIMIT && t2 == t1; i++)
        t2 = inl(0x608);
    int wraps = ((t1 - t0) & 0xFFFFFF) < 0x800000 && ((t2 - t1) & 0xFFFFFF) < 0x800000;
    fact(t1 != t0 && t2 != t1 && wraps && (t0 | t1 | t2) < (1u << 24), "PM timer advances, 24 bits");
}

void kmain(uint32_t magic, uint32_t mbi_addr)
{
    serial_init(COM1_BASE, 115200);
    console_crlf = 0;
    kprintf("vmk fwtest\n");
    const struct multiboot_info *mbi = (const struct multiboot_info *)(uintptr_t)mbi_addr;
    fact(magic == MULTIBOOT_BOOTLOADER_MAGIC, "multiboot magic 0x%08x", magic);

    bios_data_area(mbi);
    mp_tables();
    acpi_root();
    if (rsdt) {
        fadt_dsdt();
        madt();
        hpet();
    }
    pm_timer();

    kprintf("\n");
    if (failures || s5_typ < 0) {
        kprintf("fwtest: FAIL (%d)\n", failures);
        serial_wait_idle();
        debug_exit(EXIT_FAIL);
    }
    kprintf("fwtest: powering off through PM1a_CNT\n");
    serial_wait_idle();
    uint16_t cnt = inw(0x604);
    outw(0x604, (uint16_t)((cnt & ~(7u << 10)) | ((unsigned)s5_typ << 10) | (1u << 13)));
    for (uint32_t i = 0; i < SPIN_LIMIT; i++)
        spin();
    kprintf("fwtest: FAIL: still running after the S5 request\n");
    serial_wait_idle();
    debug_exit(EXIT_FAIL);
}
