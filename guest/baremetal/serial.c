/* serial.c - 16550A UART driver. */
#include "serial.h"
#include "io.h"
#include "kprintf.h"

uint16_t serial_base = COM1_BASE;
volatile struct serial_stats serial_stats;

#define RING_SIZE 256   /* power of two */
struct ring {
    volatile uint32_t head, tail;       /* head: next write, tail: next read */
    uint8_t buf[RING_SIZE];
};
static struct ring rx_ring, tx_ring;
static volatile uint8_t ier_shadow;
static unsigned fifo_size = 1;          /* 16 once the FIFO is confirmed */
static unsigned tx_room;                /* bytes we may write before polling THRE again */

static int ring_put(struct ring *r, uint8_t c)
{
    if (r->head - r->tail >= RING_SIZE)
        return 0;
    r->buf[r->head % RING_SIZE] = c;
    barrier();
    r->head++;
    return 1;
}

static int ring_get(struct ring *r)
{
    if (r->head == r->tail)
        return -1;
    int c = r->buf[r->tail % RING_SIZE];
    barrier();
    r->tail++;
    return c;
}

/* Wait (bounded) for a LSR bit. Between polls a pause loop (~1 us), so that
 * an emulator which paces the UART in virtual time is not asked for a port
 * read on every iteration (a byte at 115200 baud takes 87 us, a full FIFO
 * 1.4 ms). Gives up after 8000 polls (~8 ms); after a timeout, later waits
 * poll only once until the bit is seen again, so a dead UART cannot stall
 * every character. */
static int uart_stuck;

static int wait_lsr(uint8_t bit)
{
    for (uint32_t i = 0; i < 8000; i++) {
        if (uart_in(UART_LSR) & bit) {
            uart_stuck = 0;
            return 1;
        }
        if (uart_stuck)
            break;
        for (int j = 0; j < 1024; j++)
            spin();
    }
    uart_stuck = 1;
    return 0;
}

void serial_putc_polled(char c)
{
    if (tx_room == 0) {
        wait_lsr(LSR_THRE);             /* THR (FIFO mode: the whole TX FIFO) empty */
        tx_room = fifo_size;
    }
    uart_out(UART_THR, (uint8_t)c);
    tx_room--;
}

int serial_getc_polled(void)
{
    if (uart_in(UART_LSR) & LSR_DR)
        return uart_in(UART_RBR);
    return -1;
}

void serial_wait_idle(void)
{
    wait_lsr(LSR_TEMT);
    tx_room = fifo_size;
}

void serial_init(uint16_t base, uint32_t baud)
{
    uint16_t div = (uint16_t)(115200 / baud);
    serial_base = base;
    uart_out(UART_IER, 0);
    uart_out(UART_LCR, LCR_DLAB);
    uart_out(UART_DLL, div & 0xFF);
    uart_out(UART_DLM, div >> 8);
    uart_out(UART_LCR, LCR_8N1);
    uart_out(UART_FCR, FCR_ENABLE | FCR_CLEAR_RX | FCR_CLEAR_TX | FCR_TRIGGER_1);
    uart_out(UART_MCR, MCR_DTR | MCR_RTS | MCR_OUT2);
    fifo_size = (uart_in(UART_IIR) & 0xC0) == 0xC0 ? 16 : 1;   /* 16550A: FIFO enabled bits */
    tx_room = 0;
    ier_shadow = 0;
    console_putc = serial_putc_polled;
}

/* ---- interrupt-driven part ---- */

static void set_ier(uint8_t v)
{
    ier_shadow = v;
    uart_out(UART_IER, v);
}

void serial_enable_irq(void)
{
    uint64_t f = irq_save();
    tx_room = 0;
    set_ier(IER_RDI | (tx_ring.head != tx_ring.tail ? IER_THRI : 0));
    irq_restore(f);
}

void serial_disable_irq(void)
{
    set_ier(0);
    tx_room = 0;
}

/* THR empty: refill the transmit FIFO (16 bytes) from the TX ring. */
static void tx_fill(void)
{
    for (int n = 0; n < 16; n++) {
        int c = ring_get(&tx_ring);
        if (c < 0) {
            set_ier(ier_shadow & ~IER_THRI);    /* nothing left: stop THRE interrupts */
            return;
        }
        uart_out(UART_THR, (uint8_t)c);
        serial_stats.tx_bytes++;
    }
}

void serial_irq(void)
{
    serial_stats.irqs++;
    for (int guard = 0; guard < 64; guard++) {
        uint8_t iir = uart_in(UART_IIR);
        if (iir & IIR_NO_INT)
            break;
        serial_stats.last_iir = iir;
        serial_stats.iir_seen |= 1u << (IIR_ID(iir) >> 1);
        switch (IIR_ID(iir)) {
        case IIR_RDI:
        case IIR_CTI:
            serial_stats.rx_irqs++;
            for (int n = 0; n < 64 && (uart_in(UART_LSR) & LSR_DR); n++) {
                uint8_t c = uart_in(UART_RBR);
                if (ring_put(&rx_ring, c))
                    serial_stats.rx_bytes++;
                else
                    serial_stats.rx_dropped++;
            }
            break;
        case IIR_THRI:              /* reading IIR cleared it */
            serial_stats.tx_irqs++;
            tx_fill();
            break;
        case IIR_RLSI:
            serial_stats.other_irqs++;
            (void)uart_in(UART_LSR);
            break;
        default:                    /* IIR_MSI */
            serial_stats.other_irqs++;
            (void)uart_in(UART_MSR);
            break;
        }
    }
}

int serial_getc(void)
{
    return ring_get(&rx_ring);
}

int serial_putc(char c)
{
    uint64_t f = irq_save();
    int ok = ring_put(&tx_ring, (uint8_t)c);
    if (ok && !(ier_shadow & IER_THRI))
        set_ier(ier_shadow | IER_THRI);     /* THR empty now -> interrupt at once */
    irq_restore(f);
    return ok;
}

unsigned serial_tx_pending(void)
{
    return tx_ring.head - tx_ring.tail;
}

unsigned serial_rx_pending(void)
{
    return rx_ring.head - rx_ring.tail;
}

void serial_flush(void)
{
    for (uint32_t i = 0; serial_tx_pending() && i < 1000000; i++) {
        if (read_rflags() & (1u << 9))
            sti_hlt();
        else
            pause();
    }
    serial_wait_idle();
}

static void irq_console_putc(char c)
{
    /* Ring full: wait for the THRE interrupt to drain it (needs IF=1). */
    for (uint32_t i = 0; !serial_putc(c) && i < 1000000; i++) {
        if (read_rflags() & (1u << 9))
            sti_hlt();
        else
            pause();
    }
}

void serial_use_irq_console(void)
{
    console_putc = irq_console_putc;
}
