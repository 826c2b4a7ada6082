/* idetest.c - vmk IDE/ATA PIO test kernel (multiboot v1, runs on QEMU and vmk).
 *
 * Drives the two legacy IDE channels of a PC (ATA/ATAPI-6, PIO protocol) and
 * prints, over COM1 (polled), only facts that any correct PC with the same
 * disk images shows: register values after a software reset, IDENTIFY words
 * that follow from the image size, sector contents, status bits after each
 * phase, interrupt counts.  No model or serial strings (each emulator names
 * its disk its own way), no timings.  Every wait is bounded.
 *
 * The test (tests/system/test_idetest.py) boots it with two raw images:
 *   index=1 (primary slave, as xv6's fs.img)  disk A, 2 MiB: sector n holds
 *           "A" n(4 bytes LE) then bytes (n * 7 + i) & 0xFF
 *   index=2 (secondary master)                disk B, 1 MiB: "B" n, (n * 13 + i)
 * so the primary master and the secondary slave are absent.
 *
 *   a  software reset of each channel; the taskfile of every device position
 *   b  IDENTIFY DEVICE (polled; nIEN=1): capacity, geometry, feature bits;
 *      IDENTIFY to the absent devices
 *   c  READ SECTORS: LBA28 with 16-bit and 32-bit data reads, CHS, READ EXT
 *   d  WRITE SECTORS (polled) and read back; FLUSH CACHE; SET FEATURES;
 *      INITIALIZE DEVICE PARAMETERS
 *   e  READ and WRITE driven by IRQ 14 (IO-APIC pin 14, edge), one interrupt
 *      per sector
 *   exit through isa-debug-exit: 0x10 if every fact holds (QEMU status 33), else 0x11.
 */
#include <stdint.h>
#include <stdarg.h>
#include "io.h"
#include "kprintf.h"
#include "idt.h"
#include "serial.h"
#include "pic.h"
#include "lapic.h"
#include "ioapic.h"

#define EXIT_PASS 0x10
#define EXIT_FAIL 0x11

#define V_IDE0      0x2E        /* IO-APIC pin 14 */
#define V_IDE1      0x2F        /* IO-APIC pin 15 */
#define V_SPURIOUS  0xFF

/* Task file offsets from the command block base (ATA-6 7.1). */
#define R_DATA   0
#define R_ERROR  1      /* read */
#define R_FEAT   1      /* write */
#define R_COUNT  2
#define R_LBA0   3      /* sector number */
#define R_LBA1   4      /* cylinder low */
#define R_LBA2   5      /* cylinder high */
#define R_DEV    6
#define R_STATUS 7      /* read */
#define R_CMD    7      /* write */

#define ST_ERR  0x01
#define ST_DRQ  0x08
#define ST_DSC  0x10
#define ST_DF   0x20
#define ST_DRDY 0x40
#define ST_BSY  0x80

#define CTL_NIEN 0x02
#define CTL_SRST 0x04

#define DEV_LBA  0x40
#define DEV_OBS  0xA0   /* bits 7 and 5: obsolete, set to one by hosts */

#define SPIN_LIMIT 2000000u

struct channel { uint16_t base, ctl; unsigned irq_vector; };
static const struct channel chan[2] = { {0x1F0, 0x3F6, V_IDE0}, {0x170, 0x376, V_IDE1} };

static int failures, phase_failures;
static volatile uint32_t irqs[2];
static volatile uint8_t irq_status[2];

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

static void phase_begin(char id, const char *title)
{
    phase_failures = 0;
    kprintf("\n[%c] %s\n", id, title);
}

static void phase_end(char id)
{
    if (phase_failures) {
        failures++;
        kprintf("FAIL %c (%d)\n", id, phase_failures);
    } else {
        kprintf("PASS %c\n", id);
    }
}

/* ------------------------------------------------------------ the channel */

static uint8_t rd(int c, unsigned r) { return inb(chan[c].base + r); }
static void wr(int c, unsigned r, uint8_t v) { outb(chan[c].base + r, v); }
static uint8_t altstatus(int c) { return inb(chan[c].ctl); }

/* ATA-6 9.7: 400 ns after a device selection or command before status is valid. */
static void ata_delay(int c)
{
    for (int i = 0; i < 4; i++)
        (void)altstatus(c);
}

/* Polls the alternate status (which does not acknowledge an interrupt) until
 * BSY clears; returns the status, or 0xFF on timeout. */
static uint8_t wait_not_busy(int c)
{
    for (uint32_t i = 0; i < SPIN_LIMIT; i++) {
        uint8_t s = altstatus(c);
        if (!(s & ST_BSY))
            return s;
        pause();
    }
    return 0xFF;
}

static void select_dev(int c, int dev, uint8_t head_bits)
{
    wr(c, R_DEV, DEV_OBS | (dev << 4) | head_bits);
    ata_delay(c);
}

static void taskfile28(int c, int dev, uint32_t lba, uint8_t count)
{
    select_dev(c, dev, DEV_LBA | ((lba >> 24) & 0x0F));
    wr(c, R_COUNT, count);
    wr(c, R_LBA0, lba);
    wr(c, R_LBA1, lba >> 8);
    wr(c, R_LBA2, lba >> 16);
}

static void read_words(int c, uint16_t *buf, unsigned n)
{
    __asm__ volatile("rep insw" : "+D"(buf), "+c"(n) : "d"(chan[c].base) : "memory");
}

static void read_dwords(int c, uint32_t *buf, unsigned n)
{
    __asm__ volatile("rep insl" : "+D"(buf), "+c"(n) : "d"(chan[c].base) : "memory");
}

static void write_words(int c, const uint16_t *buf, unsigned n)
{
    __asm__ volatile("rep outsw" : "+S"(buf), "+c"(n) : "d"(chan[c].base) : "memory");
}

/* --------------------------------------------------------------- the disks */

static uint8_t expected_byte(char disk, uint32_t sector, unsigned i)
{
    if (i == 0)
        return (uint8_t)disk;
    if (i >= 1 && i < 5)
        return (uint8_t)(sector >> (8 * (i - 1)));
    return (uint8_t)(sector * (disk == 'A' ? 7 : 13) + i);
}

static int sector_is(const uint8_t *buf, char disk, uint32_t sector)
{
    for (unsigned i = 0; i < 512; i++)
        if (buf[i] != expected_byte(disk, sector, i))
            return 0;
    return 1;
}

static uint32_t sum32(const uint8_t *buf, unsigned n)
{
    uint32_t s = 0;
    for (unsigned i = 0; i < n; i++)
        s = s * 31 + buf[i];
    return s;
}

static uint16_t ident[256];
static uint8_t sec[8][512];

/* ---------------------------------------------------------------- phases */

static void print_taskfile(int c, int dev, const char *what)
{
    select_dev(c, dev, 0);
    uint8_t st = altstatus(c);
    fact(1, "ch%d dev%d %s: status %02x alt %02x error %02x count %02x lba %02x %02x %02x dev %02x", c, dev,
         what, rd(c, R_STATUS), st, rd(c, R_ERROR), rd(c, R_COUNT), rd(c, R_LBA0), rd(c, R_LBA1),
         rd(c, R_LBA2), rd(c, R_DEV));
}

static void phase_a(void)
{
    phase_begin('a', "software reset (SRST) and the taskfile of each device position");
    for (int c = 0; c < 2; c++) {
        select_dev(c, 0, 0);
        outb(chan[c].ctl, CTL_NIEN | CTL_SRST);
        for (int i = 0; i < 100; i++)
            (void)altstatus(c);
        outb(chan[c].ctl, CTL_NIEN);
        uint8_t st = wait_not_busy(c);
        fact(st != 0xFF, "ch%d: BSY clear after reset", c);
        for (int dev = 0; dev < 2; dev++)
            print_taskfile(c, dev, "after reset");
    }
    /* Registers 1-5 are written to both devices of a channel (ATA-6 7.1). */
    select_dev(0, 1, 0);
    wr(0, R_COUNT, 0x5A);
    wr(0, R_LBA0, 0x12);
    wr(0, R_LBA1, 0x34);
    wr(0, R_LBA2, 0x56);
    print_taskfile(0, 1, "written 5a 12 34 56");
    print_taskfile(0, 0, "the other device");
    /* A head number and LBA bit in the device register read back. */
    select_dev(0, 1, DEV_LBA | 0x0B);
    fact(1, "ch0 dev1: device register reads %02x after writing %02x", rd(0, R_DEV),
         DEV_OBS | 0x10 | DEV_LBA | 0x0B);
    /* The data port outside a transfer. */
    select_dev(0, 1, 0);
    fact(1, "ch0 dev1: status %02x (no DRQ)", rd(0, R_STATUS));
    phase_end('a');
}

static int identify(int c, int dev)
{
    select_dev(c, dev, 0);
    wr(c, R_CMD, 0xEC);
    ata_delay(c);
    uint8_t st = wait_not_busy(c);
    uint8_t err = rd(c, R_ERROR);
    if (!(st & ST_DRQ)) {
        fact(1, "ch%d dev%d IDENTIFY: status %02x error %02x (no data)", c, dev, rd(c, R_STATUS), err);
        return 0;
    }
    read_words(c, ident, 256);
    uint8_t after = rd(c, R_STATUS);
    fact(st == (ST_DRDY | ST_DSC | ST_DRQ) && after == (ST_DRDY | ST_DSC),
         "ch%d dev%d IDENTIFY: status %02x, after 256 words %02x", c, dev, st, after);
    return 1;
}

static void phase_b(void)
{
    phase_begin('b', "IDENTIFY DEVICE (polled, nIEN=1)");
    static const int devs[2][2] = { {1, 0}, {0, 1} };   /* present first */
    static const uint32_t sectors[2] = { 4096, 2048 };
    for (int c = 0; c < 2; c++) {
        int dev = devs[c][0];
        if (!identify(c, dev)) {
            fact(0, "ch%d dev%d: a disk is attached there", c, dev);
            continue;
        }
        uint32_t lba28 = ident[60] | (uint32_t)ident[61] << 16;
        uint64_t lba48 = ident[100] | (uint64_t)ident[101] << 16 | (uint64_t)ident[102] << 32 |
                         (uint64_t)ident[103] << 48;
        fact(!(ident[0] & 0x8000), "  word 0 bit 15 (ATA device) %d", ident[0] >> 15);
        fact(lba28 == sectors[c], "  words 60-61 (LBA28 sectors) %u", lba28);
        fact(lba48 == sectors[c], "  words 100-103 (LBA48 sectors) %lu", (unsigned long)lba48);
        fact(1, "  words 1/3/6 (CHS) %u/%u/%u", ident[1], ident[3], ident[6]);
        fact(1, "  words 54-58 (current CHS, capacity) %u/%u/%u %u", ident[54], ident[55], ident[56],
             ident[57] | (uint32_t)ident[58] << 16);
        fact(ident[49] & (1 << 9), "  word 49 bit 9 (LBA) %d", (ident[49] >> 9) & 1);
        fact(ident[83] & (1 << 10), "  word 83 bit 10 (48-bit) %d, bit 12 (FLUSH CACHE) %d, bit 13 (EXT) %d",
             (ident[83] >> 10) & 1, (ident[83] >> 12) & 1, (ident[83] >> 13) & 1);
        int model = 0;
        for (int w = 27; w < 47; w++)
            if (ident[w] != 0x2020 && ident[w] != 0)
                model = 1;
        fact(model, "  words 27-46: a model string");
        identify(c, devs[c][1]);
        print_taskfile(c, devs[c][1], "after IDENTIFY");
    }
    phase_end('b');
}

static uint8_t read_pio(int c, int dev, uint32_t lba, unsigned count, int dwords, uint8_t *st_mid)
{
    taskfile28(c, dev, lba, count);
    wr(c, R_CMD, 0x20);
    ata_delay(c);
    for (unsigned k = 0; k < count; k++) {
        uint8_t st = wait_not_busy(c);
        if (k == 0 && st_mid)
            *st_mid = st;
        if (!(st & ST_DRQ))
            return st;
        if (dwords)
            read_dwords(c, (uint32_t *)sec[k], 128);
        else
            read_words(c, (uint16_t *)sec[k], 256);
        ata_delay(c);
    }
    return wait_not_busy(c);
}

static void phase_c(void)
{
    phase_begin('c', "READ SECTORS (polled)");
    uint8_t mid = 0;
    uint8_t st = read_pio(0, 1, 0, 4, 0, &mid);
    int ok = 1;
    for (unsigned k = 0; k < 4; k++)
        ok &= sector_is(sec[k], 'A', k);
    fact(ok && mid == 0x58 && st == 0x50, "disk A LBA 0-3, 16-bit: data %s, status %02x during, %02x after",
         ok ? "as written" : "WRONG", mid, st);
    fact(1, "  taskfile after: count %02x lba %02x %02x %02x dev %02x", rd(0, R_COUNT), rd(0, R_LBA0),
         rd(0, R_LBA1), rd(0, R_LBA2), rd(0, R_DEV));

    st = read_pio(0, 1, 0x123, 2, 1, &mid);
    ok = sector_is(sec[0], 'A', 0x123) && sector_is(sec[1], 'A', 0x124);
    fact(ok && st == 0x50, "disk A LBA 0x123-0x124, 32-bit: data %s, status %02x, sum %08x", ok ? "as written" :
         "WRONG", st, sum32(sec[0], 1024));

    /* count 0 means 256 sectors */
    taskfile28(0, 1, 3000, 0);
    wr(0, R_CMD, 0x20);
    ata_delay(0);
    unsigned got = 0;
    ok = 1;
    while (got < 300 && (wait_not_busy(0) & ST_DRQ)) {
        read_words(0, (uint16_t *)sec[0], 256);
        ok &= sector_is(sec[0], 'A', 3000 + got);
        got++;
        ata_delay(0);
    }
    fact(got == 256 && ok, "disk A count 0: %u sectors, data %s", got, ok ? "as written" : "WRONG");

    /* CHS: cylinder 1, head 2, sector 3 with the geometry IDENTIFY reported */
    identify(0, 1);
    unsigned heads = ident[55], spt = ident[56];
    select_dev(0, 1, 2);
    wr(0, R_COUNT, 1);
    wr(0, R_LBA0, 3);
    wr(0, R_LBA1, 1);
    wr(0, R_LBA2, 0);
    wr(0, R_CMD, 0x20);
    ata_delay(0);
    st = wait_not_busy(0);
    uint32_t lba = (1 * heads + 2) * spt + 3 - 1;
    if (st & ST_DRQ)
        read_words(0, (uint16_t *)sec[0], 256);
    ok = (st & ST_DRQ) && sector_is(sec[0], 'A', lba);
    fact(ok, "disk A CHS 1/2/3 = LBA %u: data %s, status %02x then %02x", lba, ok ? "as written" : "WRONG", st,
         rd(0, R_STATUS));

    /* READ SECTORS EXT: LBA 47:24 written first (the "previous content" of each register) */
    select_dev(0, 1, DEV_LBA);
    wr(0, R_COUNT, 0);
    wr(0, R_COUNT, 2);
    wr(0, R_LBA0, 0);
    wr(0, R_LBA0, 0xF0);
    wr(0, R_LBA1, 0);
    wr(0, R_LBA1, 0x0F);
    wr(0, R_LBA2, 0);
    wr(0, R_LBA2, 0);
    wr(0, R_CMD, 0x24);
    ata_delay(0);
    ok = 1;
    for (int k = 0; k < 2; k++) {
        st = wait_not_busy(0);
        if (!(st & ST_DRQ)) {
            ok = 0;
            break;
        }
        read_words(0, (uint16_t *)sec[k], 256);
        ok &= sector_is(sec[k], 'A', 0xFF0 + k);
        ata_delay(0);
    }
    fact(ok, "disk A READ EXT LBA 0xff0-0xff1: data %s, status %02x", ok ? "as written" : "WRONG", rd(0, R_STATUS));

    st = read_pio(1, 0, 2047, 1, 0, 0);
    ok = sector_is(sec[0], 'B', 2047);
    fact(ok && st == 0x50, "disk B LBA 2047 (the last): data %s, status %02x", ok ? "as written" : "WRONG", st);
    phase_end('c');
}

static void fill(uint8_t *buf, uint32_t seed)
{
    for (unsigned i = 0; i < 512; i++)
        buf[i] = (uint8_t)(seed + i * 3);
}

static void phase_d(void)
{
    phase_begin('d', "WRITE SECTORS (polled), FLUSH CACHE, SET FEATURES, INITIALIZE DEVICE PARAMETERS");
    static uint8_t out[2][512];
    fill(out[0], 0x11);
    fill(out[1], 0x22);
    taskfile28(0, 1, 8, 2);
    wr(0, R_CMD, 0x30);
    ata_delay(0);
    uint8_t s0 = wait_not_busy(0);
    write_words(0, (const uint16_t *)out[0], 256);
    ata_delay(0);
    uint8_t s1 = wait_not_busy(0);
    write_words(0, (const uint16_t *)out[1], 256);
    ata_delay(0);
    uint8_t s2 = wait_not_busy(0);
    fact(s0 == 0x58 && s1 == 0x58 && s2 == 0x50, "disk A write LBA 8-9: status %02x, %02x, %02x", s0, s1, s2);
    uint8_t st = read_pio(0, 1, 8, 2, 0, 0);
    int ok = 1;
    for (int i = 0; i < 512; i++)
        ok &= sec[0][i] == out[0][i] && sec[1][i] == out[1][i];
    fact(ok && st == 0x50, "disk A read back LBA 8-9: %s", ok ? "same" : "DIFFERENT");

    select_dev(0, 1, 0);
    wr(0, R_CMD, 0xE7);
    ata_delay(0);
    st = wait_not_busy(0);
    fact(st == 0x50, "FLUSH CACHE: status %02x", st);

    select_dev(0, 1, 0);
    wr(0, R_FEAT, 0x03);            /* set transfer mode */
    wr(0, R_COUNT, 0x08 | 4);       /* PIO flow control mode 4 */
    wr(0, R_CMD, 0xEF);
    ata_delay(0);
    st = wait_not_busy(0);
    fact(st == 0x50, "SET FEATURES 03 (PIO mode 4): status %02x error %02x", st, rd(0, R_ERROR));

    select_dev(0, 1, 16 - 1);
    wr(0, R_COUNT, 63);
    wr(0, R_CMD, 0x91);
    ata_delay(0);
    st = wait_not_busy(0);
    fact(st == 0x50, "INITIALIZE DEVICE PARAMETERS 16 heads 63 sectors: status %02x error %02x", st,
         rd(0, R_ERROR));

    select_dev(0, 1, 0);
    wr(0, R_CMD, 0x00);             /* NOP: aborted on a disk */
    ata_delay(0);
    st = wait_not_busy(0);
    fact(1, "NOP: status %02x error %02x", st, rd(0, R_ERROR));

    /* Beyond the end of disk B */
    taskfile28(1, 0, 2048, 1);
    wr(1, R_CMD, 0x20);
    ata_delay(1);
    st = wait_not_busy(1);
    fact(st & ST_ERR, "disk B read LBA 2048 (past the end): status has ERR, DRQ %d", (st >> 3) & 1);
    phase_end('d');
}

static void h_ide(struct isr_frame *f)
{
    int c = f->vector == V_IDE1;
    irq_status[c] = rd(c, R_STATUS);    /* acknowledges the device interrupt */
    irqs[c]++;
    lapic_eoi();
}

static int wait_irq(int c, uint32_t target)
{
    for (uint32_t i = 0; i < SPIN_LIMIT; i++) {
        if (irqs[c] >= target)
            return 1;
        sti_hlt();
        cli();
    }
    return 0;
}

static void phase_e(void)
{
    phase_begin('e', "READ and WRITE driven by IRQ 14 (IO-APIC pin 14, edge)");
    uint8_t id = (uint8_t)lapic_id();
    ioapic_route(14, V_IDE0, 0, id);
    ioapic_route(15, V_IDE1, 0, id);
    outb(chan[0].ctl, 0);            /* nIEN = 0 */
    outb(chan[1].ctl, 0);
    (void)rd(0, R_STATUS);
    (void)rd(1, R_STATUS);

    irqs[0] = 0;
    taskfile28(0, 1, 100, 3);
    wr(0, R_CMD, 0x20);
    int ok = 1;
    for (unsigned k = 0; k < 3; k++) {
        if (!wait_irq(0, k + 1)) {
            ok = 0;
            break;
        }
        read_words(0, (uint16_t *)sec[k], 256);
        ok &= sector_is(sec[k], 'A', 100 + k);
    }
    sti();
    for (int i = 0; i < 10000; i++)
        pause();
    cli();
    fact(ok && irqs[0] == 3, "read LBA 100-102: %u interrupts, data %s, status in handler %02x, after %02x",
         irqs[0], ok ? "as written" : "WRONG", irq_status[0], rd(0, R_STATUS));

    static uint8_t out[3][512];
    for (int k = 0; k < 3; k++)
        fill(out[k], 0x40 + k);
    irqs[0] = 0;
    taskfile28(0, 1, 200, 3);
    wr(0, R_CMD, 0x30);
    ata_delay(0);
    uint8_t st = wait_not_busy(0);
    int wrote = 0;
    if (st & ST_DRQ) {
        for (int k = 0; k < 3; k++) {
            write_words(0, (const uint16_t *)out[k], 256);
            if (!wait_irq(0, k + 1))
                break;
            wrote++;
        }
    }
    fact(wrote == 3 && irqs[0] == 3 && irq_status[0] == 0x50,
         "write LBA 200-202: %d sectors, %u interrupts, last status in handler %02x", wrote, irqs[0],
         irq_status[0]);

    /* nIEN=1 masks the interrupt (ATA-6 7.9.6) */
    outb(chan[0].ctl, CTL_NIEN);
    irqs[0] = 0;
    select_dev(0, 1, 0);
    wr(0, R_CMD, 0xE7);
    ata_delay(0);
    st = wait_not_busy(0);
    sti();
    for (int i = 0; i < 10000; i++)
        pause();
    cli();
    fact(irqs[0] == 0 && st == 0x50, "FLUSH CACHE with nIEN=1: %u interrupts, status %02x", irqs[0], st);
    outb(chan[0].ctl, 0);

    irqs[1] = 0;
    taskfile28(1, 0, 5, 1);
    wr(1, R_CMD, 0x20);
    ok = wait_irq(1, 1);
    if (ok) {
        read_words(1, (uint16_t *)sec[0], 256);
        ok = sector_is(sec[0], 'B', 5);
    }
    fact(ok && irqs[1] == 1, "secondary: read disk B LBA 5 on IRQ 15: %u interrupts, data %s", irqs[1],
         ok ? "as written" : "WRONG");
    outb(chan[0].ctl, CTL_NIEN);
    outb(chan[1].ctl, CTL_NIEN);
    phase_end('e');
}

void kmain(uint32_t magic, uint32_t mbi_addr)
{
    (void)magic;
    (void)mbi_addr;
    serial_init(COM1_BASE, 115200);
    console_crlf = 0;
    idt_init();
    idt_set_handler(V_IDE0, h_ide);
    idt_set_handler(V_IDE1, h_ide);
    lapic_init(V_SPURIOUS);
    ioapic_init();
    pic_init(0x20, 0x28);

    kprintf("vmk idetest\n");
    phase_a();
    phase_b();
    phase_c();
    phase_d();
    phase_e();

    kprintf("\n");
    fact(idt_unhandled_count == 0, "unexpected interrupts: %u", idt_unhandled_count);
    if (phase_failures)
        failures++;
    kprintf(failures ? "idetest: FAIL (%d)\n" : "idetest: PASS\n", failures);
    serial_wait_idle();
    debug_exit(failures ? EXIT_FAIL : EXIT_PASS);
}
