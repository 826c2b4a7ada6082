/* serial.h - 16550A UART driver (COM1 by default): polled and interrupt-driven I/O. */
#ifndef BM_SERIAL_H
#define BM_SERIAL_H

#include <stdint.h>

#define COM1_BASE 0x3F8
#define COM1_IRQ  4
#define COM2_BASE 0x2F8
#define COM2_IRQ  3

/* Register offsets */
#define UART_RBR 0      /* read, DLAB=0 */
#define UART_THR 0      /* write, DLAB=0 */
#define UART_DLL 0      /* DLAB=1 */
#define UART_IER 1      /* DLAB=0 */
#define UART_DLM 1      /* DLAB=1 */
#define UART_IIR 2      /* read */
#define UART_FCR 2      /* write */
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5
#define UART_MSR 6
#define UART_SCR 7

#define IER_RDI   0x01  /* received data available */
#define IER_THRI  0x02  /* transmitter holding register empty */
#define IER_RLSI  0x04  /* receiver line status */
#define IER_MSI   0x08  /* modem status */

#define IIR_NO_INT 0x01
#define IIR_ID(x)  ((x) & 0x0E)
#define IIR_MSI    0x00
#define IIR_THRI   0x02
#define IIR_RDI    0x04
#define IIR_RLSI   0x06
#define IIR_CTI    0x0C /* character timeout (FIFO mode) */

#define LCR_8N1   0x03
#define LCR_DLAB  0x80

#define MCR_DTR   0x01
#define MCR_RTS   0x02
#define MCR_OUT1  0x04
#define MCR_OUT2  0x08  /* gates the IRQ line on a PC */
#define MCR_LOOP  0x10

#define LSR_DR    0x01
#define LSR_OE    0x02
#define LSR_THRE  0x20
#define LSR_TEMT  0x40

#define FCR_ENABLE    0x01
#define FCR_CLEAR_RX  0x02
#define FCR_CLEAR_TX  0x04
#define FCR_TRIGGER_1 0x00

/* Base port of the UART this driver drives (COM1 unless serial_init says otherwise). */
extern uint16_t serial_base;

static inline uint8_t uart_in(unsigned reg)
{
    uint8_t v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"((uint16_t)(serial_base + reg)));
    return v;
}

static inline void uart_out(unsigned reg, uint8_t v)
{
    __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"((uint16_t)(serial_base + reg)));
}

/* 8N1 at `baud`, FIFOs on (RX trigger 1 byte), DTR|RTS|OUT2, interrupts off.
 * Makes it the kprintf console (polled output). */
void serial_init(uint16_t base, uint32_t baud);

/* Polled I/O */
void serial_putc_polled(char c);        /* waits (bounded) for LSR.THRE */
int serial_getc_polled(void);           /* -1 if no byte */
void serial_wait_idle(void);            /* bounded wait for LSR.TEMT */

/* Interrupt-driven I/O. serial_irq() is the interrupt handler body: it loops
 * over IIR until no interrupt is pending, moving bytes between the UART and
 * two 256-byte rings. The caller acknowledges the interrupt controller. */
void serial_enable_irq(void);           /* IER = RDI (+ THRI while TX data is queued) */
void serial_disable_irq(void);          /* IER = 0 */
void serial_irq(void);
int serial_getc(void);                  /* from the RX ring, -1 if empty */
int serial_putc(char c);                /* to the TX ring, 0 if full */
unsigned serial_tx_pending(void);
unsigned serial_rx_pending(void);       /* bytes waiting in the RX ring */
void serial_flush(void);                /* bounded wait: TX ring empty and LSR.TEMT */
void serial_use_irq_console(void);      /* kprintf -> TX ring (waits with sti;hlt when full) */

struct serial_stats {
    uint32_t irqs;          /* serial_irq() calls */
    uint32_t rx_irqs;       /* IIR = RDI or CTI */
    uint32_t tx_irqs;       /* IIR = THRI */
    uint32_t other_irqs;    /* IIR = RLSI or MSI */
    uint32_t rx_bytes, tx_bytes, rx_dropped;
    uint32_t iir_seen;      /* bit (IIR_ID >> 1) set for each kind seen */
    uint8_t last_iir;
};
extern volatile struct serial_stats serial_stats;

#endif
