/* pic.h - 8259A PIC pair (master 0x20/0x21, slave 0xA0/0xA1, cascade on IRQ2). */
#ifndef BM_PIC_H
#define BM_PIC_H

#include <stdint.h>

#define PIC1_CMD  0x20
#define PIC1_DATA 0x21
#define PIC2_CMD  0xA0
#define PIC2_DATA 0xA1

/* ICW1-4: edge triggered, cascade, 8086 mode, normal EOI; vectors base1+0..7
 * and base2+0..7. Leaves every IRQ masked. */
void pic_init(uint8_t base1, uint8_t base2);
void pic_set_mask(uint16_t mask);       /* bit n = IRQ n masked (bits 8-15: slave) */
uint16_t pic_get_mask(void);            /* reads the IMRs back */
void pic_mask_irq(unsigned irq);
void pic_unmask_irq(unsigned irq);      /* unmasking a slave IRQ also unmasks IRQ2 */
void pic_eoi(unsigned irq);             /* non-specific EOI (slave, then master) */
uint16_t pic_read_irr(void);            /* OCW3 read IRR, both chips */
uint16_t pic_read_isr(void);            /* OCW3 read ISR, both chips */

#endif
