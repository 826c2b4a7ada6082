/* idt.c - IDT setup and the C interrupt dispatcher. */
#include "idt.h"
#include "io.h"
#include "kprintf.h"

struct idt_gate {
    uint16_t offset_lo;
    uint16_t selector;
    uint8_t ist;
    uint8_t type_attr;          /* P | DPL | type (0xE = 64-bit interrupt gate) */
    uint16_t offset_mid;
    uint32_t offset_hi;
    uint32_t reserved;
} __attribute__((packed));

struct idt_ptr {
    uint16_t limit;
    uint64_t base;
} __attribute__((packed));

#define KERNEL_CS 0x08
#define GATE_INTERRUPT 0x8E     /* present, DPL 0, interrupt gate (clears IF) */

extern char isr_stubs[], isr_stubs_end[];  /* isr.S: 256 stubs, 16 bytes each */

static struct idt_gate idt[256] __attribute__((aligned(16)));
static isr_handler_t handlers[256];

volatile uint32_t idt_unhandled_count;
volatile uint32_t idt_unhandled_last;

static const char *const exc_names[32] = {
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM",
    "#DF", "CSO", "#TS", "#NP", "#SS", "#GP", "#PF", "#15",
    "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "#22", "#23",
    "#24", "#25", "#26", "#27", "#HV", "#VC", "#SX", "#31",
};

void idt_init(void)
{
    if (isr_stubs_end - isr_stubs != 256 * 16) {
        debugcon_puts("FATAL: isr stubs are not 16 bytes each\n");
        debug_exit(0x7F);
    }
    for (unsigned v = 0; v < 256; v++) {
        uint64_t addr = (uint64_t)(uintptr_t)(isr_stubs + 16 * v);
        idt[v].offset_lo = addr & 0xFFFF;
        idt[v].selector = KERNEL_CS;
        idt[v].ist = 0;
        idt[v].type_attr = GATE_INTERRUPT;
        idt[v].offset_mid = (addr >> 16) & 0xFFFF;
        idt[v].offset_hi = addr >> 32;
        idt[v].reserved = 0;
    }
    struct idt_ptr p = { sizeof(idt) - 1, (uint64_t)(uintptr_t)idt };
    __asm__ volatile("lidt %0" :: "m"(p));
}

void idt_set_handler(unsigned vector, isr_handler_t h)
{
    handlers[vector & 0xFF] = h;
}

void isr_dispatch(struct isr_frame *f)
{
    isr_handler_t h = handlers[f->vector & 0xFF];
    if (h) {
        h(f);
        return;
    }
    if (f->vector < 32) {
        /* An exception nobody expected: report and leave through isa-debug-exit. */
        kprintf("\nFATAL: unhandled exception %s (vector %lu) error 0x%lx rip 0x%lx cr2 0x%lx\n",
                exc_names[f->vector], f->vector, f->error, f->rip, read_cr2());
        debugcon_puts("FATAL: unhandled exception\n");
        debug_exit(0x7F);               /* QEMU status 255 */
    }
    idt_unhandled_count++;
    idt_unhandled_last = (uint32_t)f->vector;
}
