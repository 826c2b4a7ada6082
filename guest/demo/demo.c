/* demo.c - vmk bare-metal demo (multiboot v1): timer ticks and a serial echo.
 *
 * Prints a banner on COM1, calibrates the local APIC timer against the PIT,
 * runs it periodic at 100 Hz and prints "tick N" every second of guest time.
 * Echoes what arrives on COM1 (RX interrupt through IO-APIC pin 4; output is
 * interrupt driven too). Typing 'q' prints "bye" and exits through
 * isa-debug-exit with value 0 (QEMU exit status 1).
 */
#include <stdint.h>
#include "io.h"
#include "kprintf.h"
#include "idt.h"
#include "serial.h"
#include "pic.h"
#include "pit.h"
#include "lapic.h"
#include "ioapic.h"
#include "multiboot.h"

#define V_PIT      0x32         /* IO-APIC pin 2 */
#define V_COM1     0x34         /* IO-APIC pin 4 */
#define V_TIMER    0x40         /* LAPIC timer */
#define V_SPURIOUS 0xFF
#define HZ         100
#define CAL_TICKS  10           /* calibrate over 10 PIT periods (100 ms) */

static volatile uint32_t pit_ticks, timer_ticks;

static void h_pit(struct isr_frame *f) { (void)f; pit_ticks++; lapic_eoi(); }
static void h_timer(struct isr_frame *f) { (void)f; timer_ticks++; lapic_eoi(); }
static void h_com1(struct isr_frame *f) { (void)f; serial_irq(); lapic_eoi(); }
static void h_ignore(struct isr_frame *f) { (void)f; }

static void wait_pit(uint32_t target)
{
    while (pit_ticks < target) {
        cli();
        if (pit_ticks < target)
            sti_hlt();
        sti();
    }
}

/* LAPIC timer counts (divide 16) per 1/HZ s, measured against the PIT. */
static uint32_t calibrate_lapic_timer(uint8_t apic_id)
{
    idt_set_handler(V_PIT, h_pit);
    ioapic_route(IOAPIC_PIN_PIT, V_PIT, 0, apic_id);
    pit_start(2, pit_divisor_for_hz(HZ));
    sti();
    wait_pit(1);                                    /* start on a tick edge */
    lapic_write(LAPIC_TIMER_DCR, lapic_divide_code(16));
    lapic_write(LAPIC_LVT_TIMER, LVT_MASKED);
    lapic_write(LAPIC_TIMER_ICR, 0xFFFFFFFF);
    uint32_t start = pit_ticks;
    wait_pit(start + CAL_TICKS);
    uint32_t elapsed = 0xFFFFFFFF - lapic_read(LAPIC_TIMER_CCR);
    cli();
    lapic_timer_stop();
    ioapic_mask(IOAPIC_PIN_PIT, 1);
    pit_stop();
    return elapsed / CAL_TICKS;
}

void kmain(uint32_t magic, uint32_t mbi_addr)
{
    serial_init(COM1_BASE, 115200);
    idt_init();
    debugcon_puts("vmk demo\n");

    kprintf("\n== vmk bare-metal demo ==\n");
    if (magic == MULTIBOOT_BOOTLOADER_MAGIC) {
        const struct multiboot_info *mbi = (const void *)(uintptr_t)mbi_addr;
        kprintf("multiboot: info at 0x%x, flags 0x%x", mbi_addr, mbi->flags);
        if (mbi->flags & MBI_FLAG_LOADER)
            kprintf(", loader \"%s\"", (const char *)(uintptr_t)mbi->boot_loader_name);
        kprintf("\n");
        if (mbi->flags & MBI_FLAG_MEM)
            kprintf("memory: %u KiB low, %u KiB high\n", mbi->mem_lower, mbi->mem_upper);
        if (mbi->flags & MBI_FLAG_CMDLINE)
            kprintf("cmdline: \"%s\"\n", (const char *)(uintptr_t)mbi->cmdline);
        if (mbi->flags & MBI_FLAG_MMAP) {
            const uint8_t *p = (const uint8_t *)(uintptr_t)mbi->mmap_addr;
            const uint8_t *end = p + mbi->mmap_length;
            while (p < end) {
                const struct multiboot_mmap_entry *e = (const void *)p;
                kprintf("  mmap 0x%09lx-0x%09lx type %u\n", e->addr, e->addr + e->len - 1, e->type);
                p += e->size + 4;
            }
        }
    } else {
        kprintf("not started by a multiboot loader (magic 0x%08x)\n", magic);
    }

    for (unsigned v = 0x20; v < 0x30; v++)          /* PIC vectors, should stay quiet */
        idt_set_handler(v, h_ignore);
    idt_set_handler(V_SPURIOUS, h_ignore);
    pic_init(0x20, 0x28);                           /* remapped and fully masked */
    lapic_init(V_SPURIOUS);
    ioapic_init();
    uint8_t apic_id = (uint8_t)lapic_id();

    uint32_t per_tick = calibrate_lapic_timer(apic_id);
    if (per_tick == 0)
        per_tick = 1;
    kprintf("lapic timer: %u counts per %u ms at divide 16, running at %u Hz\n",
            per_tick, 1000 / HZ, HZ);

    idt_set_handler(V_TIMER, h_timer);
    idt_set_handler(V_COM1, h_com1);
    ioapic_route(IOAPIC_PIN_COM1, V_COM1, 0, apic_id);
    serial_use_irq_console();
    serial_enable_irq();
    lapic_timer_periodic(V_TIMER, 16, per_tick);
    sti();
    kprintf("type something; 'q' quits\n");

    uint32_t seconds = 0;
    for (;;) {
        int c;
        while ((c = serial_getc()) >= 0) {
            if (c == 'q') {
                kprintf("\nbye\n");
                serial_flush();
                debugcon_puts("bye\n");
                debug_exit(0);                      /* QEMU status 1 */
            }
            if (c == '\r' || c == '\n')
                kprintf("\n");
            else if (c == 0x7F || c == '\b')
                kprintf("\b \b");
            else
                console_putc((char)c);
        }
        if (timer_ticks / HZ > seconds) {
            seconds = timer_ticks / HZ;
            kprintf("tick %u\n", seconds);
        }
        cli();
        if (timer_ticks / HZ == seconds && serial_rx_pending() == 0)
            sti_hlt();
        sti();
    }
}
