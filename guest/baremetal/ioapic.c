/* ioapic.c - IO-APIC redirection table. */
#include "ioapic.h"

static volatile uint32_t *const ioregsel = (volatile uint32_t *)(uintptr_t)IOAPIC_BASE;
static volatile uint32_t *const iowin = (volatile uint32_t *)(uintptr_t)(IOAPIC_BASE + 0x10);

uint32_t ioapic_read(uint8_t reg)
{
    *ioregsel = reg;
    return *iowin;
}

void ioapic_write(uint8_t reg, uint32_t v)
{
    *ioregsel = reg;
    *iowin = v;
}

unsigned ioapic_pins(void)
{
    return ((ioapic_read(IOAPIC_REG_VER) >> 16) & 0xFF) + 1;
}

void ioapic_init(void)
{
    unsigned n = ioapic_pins();
    for (unsigned pin = 0; pin < n && pin < 240; pin++)
        ioapic_route(pin, 0, IOAPIC_MASKED, 0);
}

void ioapic_route(unsigned pin, uint8_t vector, uint32_t flags, uint8_t apic_id)
{
    /* Mask while changing, destination first, then vector/flags (unmasks). */
    ioapic_write(IOAPIC_REDIR(pin), IOAPIC_MASKED);
    ioapic_write(IOAPIC_REDIR(pin) + 1, (uint32_t)apic_id << 24);
    ioapic_write(IOAPIC_REDIR(pin), IOAPIC_DM_FIXED | flags | vector);
}

void ioapic_mask(unsigned pin, int masked)
{
    uint32_t lo = ioapic_read(IOAPIC_REDIR(pin));
    lo = masked ? (lo | IOAPIC_MASKED) : (lo & ~IOAPIC_MASKED);
    ioapic_write(IOAPIC_REDIR(pin), lo);
}

uint32_t ioapic_redir_lo(unsigned pin) { return ioapic_read(IOAPIC_REDIR(pin)); }
uint32_t ioapic_redir_hi(unsigned pin) { return ioapic_read(IOAPIC_REDIR(pin) + 1); }
