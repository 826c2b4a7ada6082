/* pit.h - 8254 PIT channel 0 (ports 0x40-0x43, input clock 1.193182 MHz, OUT0 -> IRQ0). */
#ifndef BM_PIT_H
#define BM_PIT_H

#include <stdint.h>

#define PIT_HZ    1193182u
#define PIT_CH0   0x40
#define PIT_CMD   0x43

/* Periodic channel 0: mode 2 (rate generator) or 3 (square wave), lo/hi byte
 * access, binary. divisor 0 means 65536. */
void pit_start(unsigned mode, uint16_t divisor);
static inline uint16_t pit_divisor_for_hz(uint32_t hz) { return (uint16_t)((PIT_HZ + hz / 2) / hz); }
/* Mode 0 with the longest count: OUT0 goes low, then one last rising edge ~55 ms later. */
void pit_stop(void);
uint16_t pit_read_count(void);          /* counter latch command, then lo, hi */
uint8_t pit_read_status(void);          /* read-back command: status byte of channel 0 */

#endif
