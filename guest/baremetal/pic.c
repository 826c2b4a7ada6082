/* pic.c - 8259A PIC pair. */
#include "pic.h"
#include "io.h"

void pic_init(uint8_t base1, uint8_t base2)
{
    outb(PIC1_CMD, 0x11);       /* ICW1: init, edge, cascade, ICW4 follows */
    outb(PIC2_CMD, 0x11);
    outb(PIC1_DATA, base1);     /* ICW2: vector base */
    outb(PIC2_DATA, base2);
    outb(PIC1_DATA, 0x04);      /* ICW3: slave on IRQ2 */
    outb(PIC2_DATA, 0x02);      /* ICW3: slave identity 2 */
    outb(PIC1_DATA, 0x01);      /* ICW4: 8086 mode, normal EOI */
    outb(PIC2_DATA, 0x01);
    pic_set_mask(0xFFFF);
}

void pic_set_mask(uint16_t mask)
{
    outb(PIC1_DATA, mask & 0xFF);
    outb(PIC2_DATA, mask >> 8);
}

uint16_t pic_get_mask(void)
{
    return inb(PIC1_DATA) | (uint16_t)inb(PIC2_DATA) << 8;
}

void pic_mask_irq(unsigned irq)
{
    pic_set_mask(pic_get_mask() | (1u << irq));
}

void pic_unmask_irq(unsigned irq)
{
    uint16_t m = pic_get_mask() & ~(1u << irq);
    if (irq >= 8)
        m &= ~(1u << 2);
    pic_set_mask(m);
}

void pic_eoi(unsigned irq)
{
    if (irq >= 8)
        outb(PIC2_CMD, 0x20);
    outb(PIC1_CMD, 0x20);
}

static uint16_t pic_read_reg(uint8_t ocw3)
{
    outb(PIC1_CMD, ocw3);
    outb(PIC2_CMD, ocw3);
    return inb(PIC1_CMD) | (uint16_t)inb(PIC2_CMD) << 8;
}

uint16_t pic_read_irr(void) { return pic_read_reg(0x0A); }
uint16_t pic_read_isr(void) { return pic_read_reg(0x0B); }
