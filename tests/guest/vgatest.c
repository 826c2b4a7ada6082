/* vgatest.c - vmk VGA text-mode test kernel (multiboot v1, runs on QEMU and vmk).
 *
 * Prints over COM1 (polled) only VGA register facts that hold on any PC left
 * in text mode 3 by its BIOS (IBM VGA Technical Reference: CRT controller,
 * attribute controller, miscellaneous output register, input status 1), and
 * writes a known screen into the text buffer at 0xB8000 the way xv6's console
 * does (characters, then the cursor through CRTC 0x0E/0x0F, scrolling by
 * moving the buffer up one row).  tests/system/test_vgatest.py checks the
 * serial output against QEMU and the screen against `vmk boot --vga`.
 */
#include <stdint.h>
#include "io.h"
#include "kprintf.h"
#include "serial.h"

#define EXIT_PASS 0x10
#define EXIT_FAIL 0x11

#define MISC_W   0x3C2
#define MISC_R   0x3CC
#define AR_ADDR  0x3C0
#define AR_READ  0x3C1

static int failures;
static uint16_t crtc = 0x3D4, isr1 = 0x3DA;

static void fact(int ok, const char *what, unsigned got)
{
    kprintf("%s: %02x%s\n", what, got, ok ? "" : "  <-- FAIL");
    if (!ok)
        failures++;
}

static uint8_t crtc_read(uint8_t idx) { outb(crtc, idx); return inb(crtc + 1); }
static void crtc_write(uint8_t idx, uint8_t v) { outb(crtc, idx); outb(crtc + 1, v); }

/* ------------------------------------------------------- the text console */

static volatile uint16_t *const screen = (volatile uint16_t *)0xB8000;
static unsigned pos;

static void set_cursor(unsigned p)
{
    crtc_write(0x0E, p >> 8);
    crtc_write(0x0F, p & 0xFF);
}

static void cga_putc(char c)
{
    if (c == '\n') {
        pos += 80 - pos % 80;
    } else {
        screen[pos++] = (uint16_t)(0x0700 | (uint8_t)c);
    }
    if (pos >= 25 * 80) {
        for (unsigned i = 0; i < 24 * 80; i++)
            screen[i] = screen[i + 80];
        for (unsigned i = 24 * 80; i < 25 * 80; i++)
            screen[i] = 0x0720;
        pos -= 80;
    }
    set_cursor(pos);
}

static void cga_puts(const char *s)
{
    while (*s)
        cga_putc(*s++);
}

void kmain(uint32_t magic, uint32_t mbi_addr)
{
    (void)magic;
    (void)mbi_addr;
    serial_init(COM1_BASE, 115200);
    console_crlf = 0;
    kprintf("vmk vgatest\n");

    uint8_t misc = inb(MISC_R);
    fact(misc & 1, "misc output (I/O address select = colour)", misc & 1);

    static const uint8_t regs[] = { 0x0A, 0x0B, 0x0C, 0x0D, 0x0E, 0x0F, 0x13, 0x14 };
    static const uint8_t vals[] = { 0x0D, 0x0E, 0x00, 0x50, 0x01, 0x23, 0x28, 0x1F };
    for (unsigned i = 0; i < sizeof regs; i++) {
        crtc_write(regs[i], vals[i]);
        char what[40];
        ksnprintf(what, sizeof what, "crtc %02x written %02x reads", regs[i], vals[i]);
        fact(crtc_read(regs[i]) == vals[i], what, crtc_read(regs[i]));
    }
    outb(crtc, 0x0E);
    fact(inb(crtc) == 0x0E, "crtc index register reads", inb(crtc));
    crtc_write(0x0C, 0);
    crtc_write(0x0D, 0);

    /* Mono addresses are off while misc bit 0 selects 0x3Dx. */
    outb(0x3B4, 0x0F);
    fact(inb(0x3B5) == 0xFF, "0x3b5 with colour addressing", inb(0x3B5));
    outb(MISC_W, misc & ~1);
    fact((inb(MISC_R) & 1) == 0, "misc output after writing bit 0 = 0", inb(MISC_R) & 1);
    crtc = 0x3B4;
    isr1 = 0x3BA;
    crtc_write(0x0F, 0x45);
    fact(crtc_read(0x0F) == 0x45, "0x3b5 crtc 0f with mono addressing", crtc_read(0x0F));
    outb(0x3D4, 0x0F);
    fact(inb(0x3D5) == 0xFF, "0x3d5 with mono addressing", inb(0x3D5));
    outb(MISC_W, misc);
    crtc = 0x3D4;
    isr1 = 0x3DA;
    fact(crtc_read(0x0F) == 0x45, "0x3d5 crtc 0f with colour addressing again", crtc_read(0x0F));

    /* Attribute controller: reading input status 1 puts the flip-flop in the index state. */
    (void)inb(isr1);
    outb(AR_ADDR, 0x12);                /* colour plane enable, PAS = 0 (screen off) */
    outb(AR_ADDR, 0x0F);
    (void)inb(isr1);
    outb(AR_ADDR, 0x20 | 0x12);         /* PAS = 1 again */
    fact(inb(AR_READ) == 0x0F, "attribute 12 written 0f reads", inb(AR_READ));
    (void)inb(isr1);
    fact(inb(AR_ADDR) == 0x32, "attribute index register reads", inb(AR_ADDR));
    outb(AR_ADDR, 0x20 | 0x12);         /* index; the flip-flop goes to the data state */
    outb(AR_ADDR, 0x0E);                /* data */
    (void)inb(isr1);
    outb(AR_ADDR, 0x20 | 0x12);
    fact(inb(AR_READ) == 0x0E, "attribute 12 after a data write of 0e reads", inb(AR_READ));
    (void)inb(isr1);
    outb(AR_ADDR, 0x20 | 0x12);
    outb(AR_ADDR, 0x0F);
    (void)inb(isr1);
    outb(AR_ADDR, 0x20);

    /* Input status 1 bit 3 (vertical retrace) comes and goes. */
    int seen_on = 0, seen_off = 0;
    for (uint32_t i = 0; i < 20000000 && !(seen_on && seen_off); i++) {
        if (inb(isr1) & 8)
            seen_on = 1;
        else
            seen_off = 1;
    }
    fact(seen_on && seen_off, "input status 1 bit 3 seen set and clear", seen_on + seen_off);

    /* The screen: clear it, 30 lines (5 scroll off), a last line without a newline. */
    for (unsigned i = 0; i < 80 * 25; i++)
        screen[i] = 0x0720;
    pos = 0;
    set_cursor(0);
    for (int i = 0; i < 30; i++) {
        char line[80];
        ksnprintf(line, sizeof line, "line %02d of the vga test%s\n", i, i == 7 ? " (with a longer tail)" : "");
        cga_puts(line);
    }
    cga_puts("$ ");
    kprintf("cursor at %u\n", (unsigned)((crtc_read(0x0E) << 8) | crtc_read(0x0F)));

    kprintf(failures ? "vgatest: FAIL\n" : "vgatest: PASS\n");
    serial_wait_idle();
    debug_exit(failures ? EXIT_FAIL : EXIT_PASS);
}
