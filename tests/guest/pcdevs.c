/* pcdevs.c - vmk PC chipset test kernel (multiboot v1, runs on QEMU and vmk): RTC/CMOS, PCI
 * configuration mechanism #1, i8042, HPET.
 *
 * Prints only facts that hold on any correct PC (register values from the datasheets and
 * specs, what changes after a measured wait, counts inside wide bounds), so the serial output
 * is the same on vmk and on `qemu-system-x86_64 -accel tcg -kernel pcdevs.elf
 * -rtc base=2000-01-01T00:00:00 -m 128`. Waits sleep on interrupts (PIT at 100 Hz through
 * IO-APIC pin 2, RTC through pin 8), so virtual time skips on vmk; every wait is bounded.
 *
 *   r  MC146818A RTC: registers A-D, BCD and binary formats, SET, update-ended, 12-hour mode,
 *      periodic and alarm interrupts, the CMOS bytes the BIOS leaves
 *   p  PCI: CONFIG_ADDRESS, i440FX 00:00.0 and PIIX3 00:01.0 headers, absent devices, the
 *      command register, byte and word access
 *   k  i8042: self-tests, command byte, output port, keyboard echo and reset
 *   h  HPET: capabilities, counter rate against the PIT, one-shot / periodic / level
 *      interrupts in legacy replacement mode
 *   exit through isa-debug-exit: 0x10 if all passed (QEMU status 33), else 0x11 (35).
 */
#include <stdint.h>
#include <stdarg.h>
#include "io.h"
#include "kprintf.h"
#include "idt.h"
#include "serial.h"
#include "pic.h"
#include "pit.h"
#include "lapic.h"
#include "ioapic.h"
#include "multiboot.h"

#define EXIT_PASS 0x10
#define EXIT_FAIL 0x11

#define V_PIT      0x32         /* IO-APIC pin 2: PIT, or HPET timer 0 in legacy mode */
#define V_RTC      0x38         /* IO-APIC pin 8: RTC, or HPET timer 1 in legacy mode */
#define V_SPURIOUS 0xFF
#define PIT_HZ_TICK 100
#define SPIN_LIMIT 2000000u
#define HLT_LIMIT  100000u

static int failures, phase_failures;

static void fact(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void fact(int ok, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    kvprintf(console_putc, fmt, ap);
    va_end(ap);
    if (!ok) {
        kputs("  <-- FAIL");
        phase_failures++;
    }
    kputs("\n");
}

static void phase_begin(char id, const char *title) { phase_failures = 0; kprintf("\n[%c] %s\n", id, title); }
static void phase_end(void) { if (phase_failures) failures++; }

/* ------------------------------------------------------------------ interrupts */

static volatile uint32_t pit_ticks, rtc_irqs, rtc_flags, hpet0_irqs, hpet1_irqs;
static volatile int legacy;             /* HPET legacy replacement on: pins 2 and 8 are the HPET's */
static volatile uint64_t hpet_at_irq;
static volatile uint32_t hpet_isr_at_irq;

#define HPET_BASE 0xFED00000u
static inline uint32_t hpet_rd(unsigned off) { return mmio_read32(HPET_BASE + off); }
static inline void hpet_wr(unsigned off, uint32_t v) { mmio_write32(HPET_BASE + off, v); }
static uint64_t hpet_counter(void)
{
    uint32_t hi, lo;
    do {
        hi = hpet_rd(0xF4);
        lo = hpet_rd(0xF0);
    } while (hi != hpet_rd(0xF4));
    return (uint64_t)hi << 32 | lo;
}

static uint8_t cmos_read(uint8_t i) { outb(0x70, i); return inb(0x71); }
static void cmos_write(uint8_t i, uint8_t v) { outb(0x70, i); outb(0x71, v); }

static void h_pin2(struct isr_frame *f)
{
    (void)f;
    if (legacy) {
        hpet0_irqs++;
        hpet_at_irq = hpet_counter();
    } else {
        pit_ticks++;
    }
    lapic_eoi();
}

static void h_pin8(struct isr_frame *f)
{
    (void)f;
    if (legacy) {
        hpet1_irqs++;
        hpet_isr_at_irq = hpet_rd(0x20);
        hpet_wr(0x20, 2);               /* level-triggered: clear timer 1's status, drops the line */
    } else {
        rtc_irqs++;
        rtc_flags |= cmos_read(0x0C);   /* reading C clears the flags and drops IRQ 8 */
    }
    lapic_eoi();
}

static void h_spurious(struct isr_frame *f) { (void)f; }

/* Sleep until cond() or HLT_LIMIT interrupts: virtual time skips on vmk. */
static int wait_for(int (*cond)(void))
{
    for (uint32_t i = 0; i < HLT_LIMIT; i++) {
        cli();
        if (cond()) {
            sti();
            return 1;
        }
        sti_hlt();
    }
    return cond();
}

static uint32_t tick_target;
static int ticks_reached(void) { return pit_ticks >= tick_target; }
static void sleep_ticks(uint32_t n) { tick_target = pit_ticks + n; wait_for(ticks_reached); }

static int rtc_uf(void) { return (rtc_flags & 0x10) != 0; }
static int rtc_af(void) { return (rtc_flags & 0x20) != 0; }

/* Wait for the next update-ended interrupt (UIE) and return; UIE off again. */
static int wait_update(void)
{
    uint8_t b = cmos_read(0x0B);
    cmos_read(0x0C);                    /* UF is set by every update, enabled or not: start afresh */
    rtc_flags = 0;
    cmos_write(0x0B, b | 0x10);
    int ok = wait_for(rtc_uf);
    cmos_write(0x0B, b);
    cmos_read(0x0C);
    return ok;
}

static int bcd_ok(uint8_t v, uint8_t max) { return (v & 0xF) <= 9 && (v >> 4) <= 9 && v <= max; }

/* ------------------------------------------------------------------ [r] RTC */

static void phase_rtc(uint32_t mem_kib)
{
    phase_begin('r', "MC146818A RTC and CMOS");
    fact(cmos_read(0x0D) == 0x80, "rtc: register D = 0x%02x (VRT)", cmos_read(0x0D));
    cmos_write(0x0A, 0x26);
    fact((cmos_read(0x0A) & 0x7F) == 0x26, "rtc: register A = 0x26 (32.768 kHz, 1024 Hz) reads back");
    cmos_write(0x0B, 0x02);
    fact(cmos_read(0x0B) == 0x02, "rtc: register B = 0x02 (BCD, 24 h, no interrupts) reads back");
    cmos_read(0x0C);
    fact(cmos_read(0x0C) == 0x00, "rtc: register C reads 0 after a read");
    outb(0x70, 0x80 | 0x0D);
    fact(inb(0x71) == 0x80, "rtc: index bit 7 (NMI mask) is not part of the index");

    fact(wait_update(), "rtc: update-ended interrupt (UIE) on IO-APIC pin 8");
    uint8_t s = cmos_read(0), m = cmos_read(2), h = cmos_read(4), d = cmos_read(7), mo = cmos_read(8),
            y = cmos_read(9), c = cmos_read(0x32);
    fact(bcd_ok(s, 0x59) && bcd_ok(m, 0x59) && bcd_ok(h, 0x23) && bcd_ok(d, 0x31) && d && bcd_ok(mo, 0x12) && mo
         && bcd_ok(y, 0x99) && bcd_ok(c, 0x99), "rtc: time registers are valid BCD");
    fact(!(cmos_read(0x0A) & 0x80), "rtc: UIP is 0 just after an update");
    sleep_ticks(150);                                   /* 1.5 s after an update: exactly one more */
    uint8_t s2 = cmos_read(0);
    int diff = ((s2 >> 4) * 10 + (s2 & 15)) - ((s >> 4) * 10 + (s & 15));
    fact(diff == 1 || diff == -59, "rtc: seconds advance by one in 1.5 s after an update");

    /* SET, binary mode, 1999-12-31 23:59:59, then let it update into 2000. */
    cmos_write(0x0B, 0x86);
    cmos_write(0, 59); cmos_write(2, 59); cmos_write(4, 23);
    cmos_write(7, 31); cmos_write(8, 12); cmos_write(9, 99); cmos_write(0x32, 19);
    fact(cmos_read(0) == 59 && cmos_read(4) == 23, "rtc: SET holds the written binary time");
    cmos_write(0x0B, 0x06);
    wait_update();
    wait_update();
    fact(1, "rtc: binary after two updates: %u-%02u-%02u %02u:%02u:%02u day %u century %u",
         cmos_read(9), cmos_read(8), cmos_read(7), cmos_read(4), cmos_read(2), cmos_read(0),
         cmos_read(6), cmos_read(0x32));

    /* 12-hour BCD: 11:59:59 PM rolls over to 12 AM. */
    cmos_write(0x0B, 0x80);
    cmos_write(0, 0x59); cmos_write(2, 0x59); cmos_write(4, 0x91);
    cmos_write(7, 0x28); cmos_write(8, 0x02); cmos_write(9, 0x00); cmos_write(0x32, 0x20);
    cmos_write(0x0B, 0x00);
    wait_update();
    fact(cmos_read(4) == 0x12 && cmos_read(2) == 0x00, "rtc: 12 h: 11:59:59 PM -> hour 0x%02x minute 0x%02x",
         cmos_read(4), cmos_read(2));
    fact(cmos_read(7) == 0x29 && cmos_read(8) == 0x02, "rtc: 2000-02-28 -> day 0x%02x month 0x%02x (leap year)",
         cmos_read(7), cmos_read(8));

    /* Periodic interrupt: 64 Hz (RS = 0xA) for 1 s of PIT ticks. */
    cmos_write(0x0B, 0x02);
    cmos_write(0x0A, 0x2A);
    cmos_read(0x0C);
    rtc_irqs = 0;
    cmos_write(0x0B, 0x42);
    sleep_ticks(100);
    cmos_write(0x0B, 0x02);
    uint32_t n = rtc_irqs;
    fact(n >= 60 && n <= 68, "rtc: periodic 64 Hz: 60..68 interrupts in 1 s");
    cmos_write(0x0A, 0x26);

    /* Alarm: seconds + 2, minutes and hours "don't care". */
    wait_update();
    uint8_t now_s = cmos_read(0);
    uint8_t al = (uint8_t)(((now_s >> 4) * 10 + (now_s & 15) + 2) % 60);
    al = (uint8_t)((al / 10) << 4 | al % 10);
    cmos_write(1, al); cmos_write(3, 0xC0); cmos_write(5, 0xC0);
    rtc_flags = 0;
    cmos_read(0x0C);
    cmos_write(0x0B, 0x22);
    int ok = wait_for(rtc_af);
    cmos_write(0x0B, 0x02);
    fact(ok && cmos_read(0) == al, "rtc: alarm interrupt (AF) when the seconds reach the alarm");

    uint32_t base = cmos_read(0x15) | cmos_read(0x16) << 8;
    uint32_t ext = cmos_read(0x17) | cmos_read(0x18) << 8;
    uint32_t ext2 = cmos_read(0x30) | cmos_read(0x31) << 8;
    uint32_t hi = cmos_read(0x34) | cmos_read(0x35) << 8;
    uint32_t want_ext = mem_kib - 1024 > 0xFFFF ? 0xFFFF : mem_kib - 1024;
    fact(base == 640, "cmos: base memory %u KiB", base);
    fact(ext == want_ext && ext2 == want_ext, "cmos: extended memory %u KiB (0x17 and 0x30)", ext);
    /* The BIOS may keep the top of RAM for its tables: multiboot's size is at most the CMOS's. */
    fact(hi * 64 + 16384 >= mem_kib && hi * 64 + 16384 - mem_kib < 1024,
         "cmos: memory above 16 MiB %u x 64 KiB", hi);
    fact((cmos_read(0x14) & 0x02) != 0, "cmos: equipment byte says FPU");
    phase_end();
}

/* ------------------------------------------------------------------ [p] PCI */

static uint32_t cfg_addr(int bus, int dev, int fn, int reg)
{
    return 0x80000000u | (uint32_t)bus << 16 | (uint32_t)dev << 11 | (uint32_t)fn << 8 | (reg & 0xFC);
}
static uint32_t cfg_read(int bus, int dev, int fn, int reg) { outl(0xCF8, cfg_addr(bus, dev, fn, reg)); return inl(0xCFC); }

static void phase_pci(void)
{
    phase_begin('p', "PCI configuration mechanism #1");
    outl(0xCF8, 0x80000000u);
    fact(inl(0xCF8) == 0x80000000u, "pci: CONFIG_ADDRESS reads back");
    uint32_t id0 = cfg_read(0, 0, 0, 0), cl0 = cfg_read(0, 0, 0, 8), h0 = cfg_read(0, 0, 0, 0xC);
    fact(id0 == 0x12378086, "pci: 00:00.0 id %08x", id0);
    fact(cl0 >> 8 == 0x060000, "pci: 00:00.0 class %06x (host bridge)", cl0 >> 8);
    fact(((h0 >> 16) & 0xFF) == 0x00, "pci: 00:00.0 header type %02x", (h0 >> 16) & 0xFF);
    uint32_t id1 = cfg_read(0, 1, 0, 0), cl1 = cfg_read(0, 1, 0, 8), h1 = cfg_read(0, 1, 0, 0xC);
    fact(id1 == 0x70008086, "pci: 00:01.0 id %08x", id1);
    fact(cl1 >> 8 == 0x060100, "pci: 00:01.0 class %06x (ISA bridge)", cl1 >> 8);
    fact(((h1 >> 16) & 0xFF) == 0x80, "pci: 00:01.0 header type %02x (multifunction)", (h1 >> 16) & 0xFF);
    fact(cfg_read(0, 0x1F, 0, 0) == 0xFFFFFFFFu, "pci: 00:1f.0 absent: ffffffff");
    fact(cfg_read(1, 0, 0, 0) == 0xFFFFFFFFu, "pci: 01:00.0 absent: ffffffff");
    outl(0xCF8, cfg_addr(0, 0, 0, 0));
    outl(0xCFC, 0);
    fact(cfg_read(0, 0, 0, 0) == 0x12378086, "pci: the vendor/device ID is read-only");
    outl(0xCF8, cfg_addr(0, 1, 0, 0));
    fact(inw(0xCFE) == 0x7000 && inb(0xCFD) == 0x80, "pci: word and byte reads of CONFIG_DATA");
    outl(0xCF8, cfg_addr(0, 1, 0, 4));
    uint16_t cmd = inw(0xCFC);
    outw(0xCFC, 0);
    uint16_t zero = inw(0xCFC);
    outw(0xCFC, cmd | 0x7);
    uint16_t back = inw(0xCFC);
    outw(0xCFC, cmd);
    fact(zero == 0 && (back & 7) == 7, "pci: command register I/O, memory and master bits are writable");
    outl(0xCF8, cfg_addr(0, 0, 0, 0) & 0x7FFFFFFF);
    fact(inl(0xCFC) == 0xFFFFFFFFu, "pci: CONFIG_DATA with the enable bit clear reads ffffffff");
    phase_end();
}

/* ------------------------------------------------------------------ [k] i8042 */

static int kbc_read(uint8_t *v)
{
    for (uint32_t i = 0; i < SPIN_LIMIT; i++)
        if (inb(0x64) & 1) {
            *v = inb(0x60);
            return 1;
        }
    return 0;
}
static void kbc_flush(void) { for (int i = 0; i < 32 && (inb(0x64) & 1); i++) inb(0x60); }
static int kbc_cmd(uint8_t c)
{
    uint8_t v;
    outb(0x64, c);
    return kbc_read(&v) ? v : -1;
}

static void phase_kbc(void)
{
    phase_begin('k', "i8042 keyboard controller");
    kbc_flush();
    outb(0x64, 0xAD);
    fact((inb(0x64) & 0x08) != 0, "kbc: status bit 3 says the last write was a command");
    fact((kbc_cmd(0x20) & 0x10) != 0, "kbc: 0xAD disables the keyboard (command byte bit 4)");
    outb(0x64, 0xAE);
    fact((kbc_cmd(0x20) & 0x10) == 0, "kbc: 0xAE enables it");
    fact(kbc_cmd(0xAA) == 0x55, "kbc: self-test 0xAA -> 0x55");
    fact(kbc_cmd(0xAB) == 0x00, "kbc: keyboard interface test 0xAB -> 0x00");
    int op = kbc_cmd(0xD0);
    fact(op >= 0 && (op & 3) == 3, "kbc: output port: reset line high, A20 on");
    int old = kbc_cmd(0x20);
    outb(0x64, 0x60);
    outb(0x60, 0x20);                   /* mouse disabled, no interrupts, no translation */
    fact(kbc_cmd(0x20) == 0x20, "kbc: command byte written with 0x60 reads back with 0x20");
    outb(0x60, 0xEE);
    uint8_t v = 0;
    fact(kbc_read(&v) && v == 0xEE, "kbc: keyboard echo 0xEE");
    outb(0x60, 0xFF);
    uint8_t a = 0, b = 0;
    int got = kbc_read(&a) && kbc_read(&b);
    fact(got && a == 0xFA && b == 0xAA, "kbc: keyboard reset -> 0xFA 0xAA");
    kbc_flush();
    outb(0x64, 0x60);
    outb(0x60, (uint8_t)old);
    phase_end();
}

/* ------------------------------------------------------------------ [h] HPET */

static int hpet0_seen(void) { return hpet0_irqs > 0; }
static int hpet0_ten(void) { return hpet0_irqs >= 10; }
static int hpet1_seen(void) { return hpet1_irqs > 0; }

static void phase_hpet(void)
{
    phase_begin('h', "HPET");
    uint32_t cap = hpet_rd(0), period = hpet_rd(4);
    fact(cap == 0x8086A201, "hpet: capabilities %08x (vendor 8086, 3 timers, 64-bit, legacy capable)", cap);
    fact(period == 10000000, "hpet: counter period %u fs (100 MHz)", period);
    uint32_t t0 = hpet_rd(0x100), route = hpet_rd(0x104);
    fact((t0 & 0x30) == 0x30, "hpet: timer 0 periodic capable and 64-bit");
    fact((route & 4) != 0, "hpet: timer 0 can be routed to IO-APIC pin 2");
    hpet_wr(0x10, 0);
    hpet_wr(0xF0, 0);
    hpet_wr(0xF4, 0);
    uint64_t a = hpet_counter(), b = hpet_counter();
    fact(a == 0 && b == 0, "hpet: the counter holds while disabled");

    hpet_wr(0x10, 1);
    sleep_ticks(1);
    uint64_t c0 = hpet_counter();
    sleep_ticks(30);
    uint64_t c1 = hpet_counter();
    uint64_t d = c1 - c0;
    /* Wide bounds: on QEMU TCG the tick interrupts come with the host's latency. */
    fact(d >= 28500000 && d <= 31500000, "hpet: counter advances 100 MHz +-5%% against the PIT");

    /* Legacy replacement: timer 0 -> IRQ0 (pin 2), timer 1 -> IRQ8 (pin 8); the PIT and RTC are cut
     * off. Switch just after a PIT tick, so that no PIT interrupt is pending on pin 2. */
    sleep_ticks(1);
    cli();
    legacy = 1;
    hpet_wr(0x10, 3);
    uint64_t target = hpet_counter() + 1000000;        /* 10 ms */
    /* The comparator first: QEMU fires a comparator behind the counter (by a signed compare; the
     * reset value is all ones) at once, the spec only when the counter wraps to it. */
    hpet_wr(0x108, (uint32_t)target);
    hpet_wr(0x10C, (uint32_t)(target >> 32));
    hpet_wr(0x100, 0x4);                                /* edge, enabled, one-shot */
    int ok = wait_for(hpet0_seen);
    fact(ok && hpet_at_irq >= target, "hpet: one-shot timer 0 interrupt on IRQ0 after the comparator");
    fact(hpet_rd(0x108) == (uint32_t)target, "hpet: one-shot comparator unchanged after the match");

    hpet0_irqs = 0;
    uint64_t start = hpet_counter() + 100000;
    hpet_wr(0x100, 0x4 | 0x8 | 0x40);                   /* periodic, VAL_SET */
    hpet_wr(0x108, (uint32_t)start);
    hpet_wr(0x10C, (uint32_t)(start >> 32));
    hpet_wr(0x108, 100000);                             /* period 1 ms */
    ok = wait_for(hpet0_ten);
    hpet_wr(0x100, 0);
    uint64_t cmp = hpet_rd(0x108) | (uint64_t)hpet_rd(0x10C) << 32;
    fact(ok && (cmp - start) % 100000 == 0 && cmp - start >= 1000000,
         "hpet: periodic timer 0: 10 interrupts, the comparator advanced by whole periods");

    uint64_t t1 = hpet_counter() + 500000;
    ioapic_route(8, V_RTC, IOAPIC_LEVEL, 0);
    hpet_wr(0x128, (uint32_t)t1);
    hpet_wr(0x12C, (uint32_t)(t1 >> 32));
    hpet_wr(0x120, 0x4 | 0x2);                          /* level, enabled, one-shot */
    ok = wait_for(hpet1_seen);
    hpet_wr(0x120, 0);
    fact(ok && (hpet_isr_at_irq & 2), "hpet: level-triggered timer 1 on IRQ8 sets status bit 1");
    fact((hpet_rd(0x20) & 2) == 0, "hpet: writing 1 clears the status bit");
    ioapic_route(8, V_RTC, 0, 0);

    cli();
    hpet_wr(0x10, 0);
    legacy = 0;
    sti();
    uint32_t before = pit_ticks;
    sleep_ticks(2);
    fact(pit_ticks > before, "hpet: legacy mode off: the PIT interrupts again");
    phase_end();
}

/* ------------------------------------------------------------------ main */

void kmain(uint32_t magic, uint32_t mbi_addr)
{
    serial_init(COM1_BASE, 115200);
    console_crlf = 0;
    idt_init();
    kprintf("vmk pcdevs\n");
    const struct multiboot_info *mbi = (const struct multiboot_info *)(uintptr_t)mbi_addr;
    uint32_t mem_kib = (magic == MULTIBOOT_BOOTLOADER_MAGIC && (mbi->flags & MBI_FLAG_MEM))
                       ? mbi->mem_upper + 1024 : 0;

    idt_set_handler(V_PIT, h_pin2);
    idt_set_handler(V_RTC, h_pin8);
    idt_set_handler(V_SPURIOUS, h_spurious);
    pic_init(0x20, 0x28);
    pic_set_mask(0xFFFF);
    lapic_init(V_SPURIOUS);
    ioapic_init();
    ioapic_route(IOAPIC_PIN_PIT, V_PIT, 0, 0);
    ioapic_route(8, V_RTC, 0, 0);
    pit_start(2, pit_divisor_for_hz(PIT_HZ_TICK));
    sti();

    phase_rtc(mem_kib);
    phase_pci();
    phase_kbc();
    phase_hpet();

    kprintf("\n");
    if (failures) {
        kprintf("pcdevs: FAIL (%d)\n", failures);
        serial_wait_idle();
        debug_exit(EXIT_FAIL);
    }
    kprintf("pcdevs: PASS\n");
    serial_wait_idle();
    debug_exit(EXIT_PASS);
}
