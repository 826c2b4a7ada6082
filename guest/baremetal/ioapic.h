/* ioapic.h - IO-APIC (MMIO 0xFEC00000: IOREGSEL at +0x00, IOWIN at +0x10). */
#ifndef BM_IOAPIC_H
#define BM_IOAPIC_H

#include <stdint.h>

#define IOAPIC_BASE    0xFEC00000u
#define IOAPIC_REG_ID  0x00
#define IOAPIC_REG_VER 0x01
#define IOAPIC_REG_ARB 0x02
#define IOAPIC_REDIR(pin) (0x10 + 2 * (pin))     /* low dword; +1 = high dword */

#define IOAPIC_MASKED      (1u << 16)
#define IOAPIC_LEVEL       (1u << 15)
#define IOAPIC_REMOTE_IRR  (1u << 14)            /* read-only */
#define IOAPIC_ACTIVE_LOW  (1u << 13)
#define IOAPIC_DELIVS      (1u << 12)            /* read-only */
#define IOAPIC_LOGICAL     (1u << 11)
#define IOAPIC_DM_FIXED    (0u << 8)

/* On a PC, ISA IRQ0 (PIT) is wired to pin 2; the others are identity mapped. */
#define IOAPIC_PIN_PIT  2
#define IOAPIC_PIN_COM1 4

uint32_t ioapic_read(uint8_t reg);
void ioapic_write(uint8_t reg, uint32_t v);
unsigned ioapic_pins(void);                      /* max redirection entry + 1 */
void ioapic_init(void);                          /* masks every pin */
/* Fixed delivery, physical destination `apic_id`; flags: IOAPIC_LEVEL, IOAPIC_ACTIVE_LOW,
 * IOAPIC_MASKED. Edge/active-high (ISA style) when flags == 0. */
void ioapic_route(unsigned pin, uint8_t vector, uint32_t flags, uint8_t apic_id);
void ioapic_mask(unsigned pin, int masked);
uint32_t ioapic_redir_lo(unsigned pin);
uint32_t ioapic_redir_hi(unsigned pin);

#endif
