/* lapic.c - local APIC. */
#include "lapic.h"

void lapic_init(uint8_t spurious_vector)
{
    lapic_write(LAPIC_SVR, SVR_ENABLE | spurious_vector);
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_LVT_TIMER, LVT_MASKED);
    lapic_write(LAPIC_LVT_LINT0, LVT_MASKED);
    lapic_write(LAPIC_LVT_LINT1, LVT_MASKED);
    lapic_write(LAPIC_LVT_ERROR, LVT_MASKED);
    lapic_write(LAPIC_TIMER_ICR, 0);
}

void lapic_virtual_wire(int enable)
{
    if (enable) {
        lapic_write(LAPIC_LVT_LINT0, LVT_DM_EXTINT);
        lapic_write(LAPIC_LVT_LINT1, LVT_DM_NMI);
    } else {
        lapic_write(LAPIC_LVT_LINT0, LVT_MASKED | LVT_DM_EXTINT);
        lapic_write(LAPIC_LVT_LINT1, LVT_MASKED | LVT_DM_NMI);
    }
}

uint32_t lapic_divide_code(unsigned divide)
{
    switch (divide) {
    case 1: return 0xB;
    case 2: return 0x0;
    case 4: return 0x1;
    case 8: return 0x2;
    case 16: return 0x3;
    case 32: return 0x8;
    case 64: return 0x9;
    default: return 0xA;        /* 128 */
    }
}

static void timer_start(uint32_t lvt, unsigned divide, uint32_t count)
{
    lapic_write(LAPIC_TIMER_DCR, lapic_divide_code(divide));
    lapic_write(LAPIC_LVT_TIMER, lvt);
    lapic_write(LAPIC_TIMER_ICR, count);     /* starts counting */
}

void lapic_timer_oneshot(uint8_t vector, unsigned divide, uint32_t count)
{
    timer_start(LVT_TIMER_ONESHOT | vector, divide, count);
}

void lapic_timer_periodic(uint8_t vector, unsigned divide, uint32_t count)
{
    timer_start(LVT_TIMER_PERIODIC | vector, divide, count);
}

void lapic_timer_stop(void)
{
    lapic_write(LAPIC_TIMER_ICR, 0);
    lapic_write(LAPIC_LVT_TIMER, LVT_MASKED);
}

static int bit_of(unsigned base, uint8_t vector)
{
    return (lapic_read(base + (vector / 32) * 0x10) >> (vector % 32)) & 1;
}

int lapic_isr_bit(uint8_t vector) { return bit_of(LAPIC_ISR, vector); }
int lapic_irr_bit(uint8_t vector) { return bit_of(LAPIC_IRR, vector); }
