/* pit.c - 8254 PIT channel 0. */
#include "pit.h"
#include "io.h"

void pit_start(unsigned mode, uint16_t divisor)
{
    outb(PIT_CMD, 0x30 | (mode & 7) << 1);  /* channel 0, lo/hi, mode, binary */
    outb(PIT_CH0, divisor & 0xFF);
    outb(PIT_CH0, divisor >> 8);
}

void pit_stop(void)
{
    pit_start(0, 0);
}

uint16_t pit_read_count(void)
{
    outb(PIT_CMD, 0x00);                    /* latch channel 0 */
    uint8_t lo = inb(PIT_CH0);
    uint8_t hi = inb(PIT_CH0);
    return lo | (uint16_t)hi << 8;
}

uint8_t pit_read_status(void)
{
    outb(PIT_CMD, 0xE2);                    /* read-back: status only (no count), channel 0 */
    return inb(PIT_CH0);
}
