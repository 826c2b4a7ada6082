/* lapic.h - local APIC (xAPIC MMIO at 0xFEE00000). */
#ifndef BM_LAPIC_H
#define BM_LAPIC_H

#include <stdint.h>

#define LAPIC_BASE        0xFEE00000u

#define LAPIC_ID          0x020
#define LAPIC_VERSION     0x030
#define LAPIC_TPR         0x080
#define LAPIC_PPR         0x0A0
#define LAPIC_EOI         0x0B0
#define LAPIC_LDR         0x0D0
#define LAPIC_DFR         0x0E0
#define LAPIC_SVR         0x0F0
#define LAPIC_ISR         0x100     /* 8 registers, 0x10 apart */
#define LAPIC_TMR         0x180
#define LAPIC_IRR         0x200
#define LAPIC_ESR         0x280
#define LAPIC_ICR_LO      0x300
#define LAPIC_ICR_HI      0x310
#define LAPIC_LVT_TIMER   0x320
#define LAPIC_LVT_THERMAL 0x330
#define LAPIC_LVT_PERF    0x340
#define LAPIC_LVT_LINT0   0x350
#define LAPIC_LVT_LINT1   0x360
#define LAPIC_LVT_ERROR   0x370
#define LAPIC_TIMER_ICR   0x380     /* initial count */
#define LAPIC_TIMER_CCR   0x390     /* current count */
#define LAPIC_TIMER_DCR   0x3E0     /* divide configuration */

#define LVT_MASKED        (1u << 16)
#define LVT_LEVEL         (1u << 15)
#define LVT_DM_FIXED      (0u << 8)
#define LVT_DM_NMI        (4u << 8)
#define LVT_DM_EXTINT     (7u << 8)
#define LVT_TIMER_ONESHOT (0u << 17)
#define LVT_TIMER_PERIODIC (1u << 17)
#define SVR_ENABLE        (1u << 8)

static inline uint32_t lapic_read(unsigned reg) { return *(volatile uint32_t *)(uintptr_t)(LAPIC_BASE + reg); }
static inline void lapic_write(unsigned reg, uint32_t v) { *(volatile uint32_t *)(uintptr_t)(LAPIC_BASE + reg) = v; }

/* Software-enable (SVR) with the given spurious vector, TPR 0, every LVT masked. */
void lapic_init(uint8_t spurious_vector);
/* Virtual wire mode: LINT0 = ExtINT (8259 INTR), LINT1 = NMI. */
void lapic_virtual_wire(int enable);
static inline void lapic_eoi(void) { lapic_write(LAPIC_EOI, 0); }
static inline uint32_t lapic_id(void) { return lapic_read(LAPIC_ID) >> 24; }

/* Timer. divide: 1, 2, 4, ... 128. */
uint32_t lapic_divide_code(unsigned divide);     /* value for the DCR */
void lapic_timer_oneshot(uint8_t vector, unsigned divide, uint32_t count);
void lapic_timer_periodic(uint8_t vector, unsigned divide, uint32_t count);
void lapic_timer_stop(void);                     /* initial count 0, LVT masked */

/* Bit `vector` of the 256-bit ISR / IRR / TMR arrays. */
int lapic_isr_bit(uint8_t vector);
int lapic_irr_bit(uint8_t vector);

#endif
