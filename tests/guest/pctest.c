/* pctest.c - vmk PC interrupt test kernel (multiboot v1, runs on QEMU and vmk).
 *
 * Exercises the PC interrupt hardware and prints facts over COM1 (polled).
 * The output depends on nothing but correct device behaviour: no timings,
 * no counts that depend on how fast time runs, only values read back from
 * devices, vectors observed and architecturally ordered events. Every wait
 * is a bounded spin, so a broken device produces a FAIL line, not a hang.
 * Run it with nothing typed on the serial line.
 *
 *   a  8259 PIC + 8254 PIT (mode 2) through LAPIC LINT0 (ExtINT, virtual wire)
 *   b  PIC masked; IO-APIC pin 2 (PIT, mode 3) and pin 4 (COM1 THRE)
 *   c  LAPIC timer: one-shot, TPR blocking, periodic, HLT wakeups
 *   d  COM1 16550: registers; loopback polled (MSR, IIR, overrun); loopback with
 *      THRE/RX interrupts through IO-APIC pin 4 (QEMU drives the IRQ in
 *      loopback; a real PC gates it off with OUT2); a line sent by THRE interrupts
 *   e  exceptions #BP #UD #DE #PF #GP caught and resumed
 *   exit through isa-debug-exit: 0x10 if all passed (QEMU status 33), else 0x11 (35).
 */
#include <stdint.h>
#include <stdarg.h>
#include "io.h"
#include "kprintf.h"
#include "idt.h"
#include "serial.h"
#include "pic.h"
#include "pit.h"
#include "lapic.h"
#include "ioapic.h"
#include "multiboot.h"

#define EXIT_PASS 0x10
#define EXIT_FAIL 0x11

/* Vectors */
#define V_PIC_BASE   0x20       /* IRQ0 -> 0x20 ... IRQ15 -> 0x2F */
#define V_PIT_PIC    0x20
#define V_PIC_SPUR1  0x27
#define V_PIC_SPUR2  0x2F
#define V_PIT_IOAPIC 0x32       /* IO-APIC pin 2 */
#define V_COM1       0x34       /* IO-APIC pin 4 */
#define V_LT_ONESHOT 0x40
#define V_LT_TPR     0x51       /* class 5: blocked by TPR 0x50 */
#define V_LT_PERIOD  0x60
#define V_SPURIOUS   0xFF       /* LAPIC spurious vector */

#define PIT_DIV_A    298        /* ~4 kHz, mode 2 */
#define PIT_DIV_B    149        /* ~8 kHz, mode 3 */
#define TICKS        10

/* Upper bound for every wait. A correct PC needs a small fraction of it. */
#define SPIN_LIMIT   20000000u

static volatile uint32_t count[256];    /* interrupts seen per vector */
static int failures, phase_failures;

/* ---------------------------------------------------------------- output */

static void fact(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void fact(int ok, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    kvprintf(console_putc, fmt, ap);
    va_end(ap);
    if (!ok) {
        kputs("  <-- FAIL");
        phase_failures++;
    }
    kputs("\n");
}

static void phase_begin(char id, const char *title)
{
    phase_failures = 0;
    kprintf("\n[%c] %s\n", id, title);
}

static void phase_end(char id)
{
    if (phase_failures) {
        failures++;
        kprintf("FAIL %c (%d)\n", id, phase_failures);
    } else {
        kprintf("PASS %c\n", id);
    }
}

/* Timing diagnostics (not deterministic) go to the 0xE9 debug console, and
 * only when built with -DPCTEST_VERBOSE (make PCTEST_VERBOSE=1). */
#ifdef PCTEST_VERBOSE
static void dbg(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    kvprintf(debugcon_putc, fmt, ap);
    va_end(ap);
}
#else
#define dbg(...) ((void)0)
#endif

/* ----------------------------------------------------------------- waits */

/* Spin with interrupts enabled until *ctr >= target. Returns the number of
 * spins it took (>= 1), or 0 on timeout. Leaves IF as it found it. */
static uint32_t wait_count(volatile uint32_t *ctr, uint32_t target)
{
    uint64_t f = read_rflags();
    sti();
    uint32_t i;
    for (i = 1; i < SPIN_LIMIT; i++) {
        if (*ctr >= target)
            break;
        pause();
    }
    if (!(f & (1u << 9)))
        cli();
    dbg("wait for %u: %u spins\n", target, i);
    return i < SPIN_LIMIT ? i : 0;
}

/* Busy delay between device polls, so that an emulator is not asked for a
 * port or MMIO access on every loop iteration. */
static void delay(unsigned n)
{
    for (unsigned i = 0; i < n; i++)
        pause();
}

#define POLL_LIMIT (SPIN_LIMIT / 64)    /* polls, with delay(64) between them */

/* Spin `n` times with interrupts enabled (lets anything pending arrive). */
static void settle(uint32_t n)
{
    sti();
    for (uint32_t i = 0; i < n; i++)
        pause();
    cli();
}

/* A settle window of about `ticks` periods of something that took `spins`
 * spins for TICKS periods; at least a few thousand spins. */
static uint32_t window(uint32_t spins, uint32_t ticks)
{
    uint64_t n = (uint64_t)spins * ticks / TICKS;
    if (n < 5000)
        n = 5000;
    if (n > SPIN_LIMIT / 4)
        n = SPIN_LIMIT / 4;
    return (uint32_t)n;
}

/* -------------------------------------------------------------- handlers */

static volatile uint16_t pic_isr_in, pic_isr_after;
static volatile uint8_t pic_first_done;

static void h_pic_irq0(struct isr_frame *f)
{
    if (!pic_first_done) {
        pic_isr_in = pic_read_isr();
        pic_eoi(0);
        pic_isr_after = pic_read_isr();
        pic_first_done = 1;
    } else {
        pic_eoi(0);
    }
    count[f->vector]++;
}

static void h_pic_spurious(struct isr_frame *f)
{
    /* Spurious IRQ7/IRQ15: no EOI to the chip that raised it (the master
     * still needs one for a slave spurious). Architecturally allowed: not counted. */
    if (f->vector == V_PIC_SPUR2)
        outb(PIC1_CMD, 0x20);
}

static void h_lapic_spurious(struct isr_frame *f)
{
    (void)f;                    /* no EOI for the spurious vector */
}

static volatile int lapic_isr_in = -1, lapic_isr_after = -1;

static void h_lapic_eoi(struct isr_frame *f)
{
    if (f->vector == V_PIT_IOAPIC && lapic_isr_in < 0) {
        lapic_isr_in = lapic_isr_bit(V_PIT_IOAPIC);
        lapic_eoi();
        lapic_isr_after = lapic_isr_bit(V_PIT_IOAPIC);
    } else {
        lapic_eoi();
    }
    count[f->vector]++;
}

static volatile uint8_t thre_iir;

static void h_com1_thre(struct isr_frame *f)
{
    thre_iir = uart_in(UART_IIR);       /* reading IIR clears the THRE interrupt */
    uart_out(UART_IER, 0);
    count[f->vector]++;
    lapic_eoi();
}

static void h_com1_driver(struct isr_frame *f)
{
    serial_irq();
    count[f->vector]++;
    lapic_eoi();
}

static volatile uint64_t exc_fixup, exc_rip, exc_err, exc_cr2, exc_vec, exc_count;

static void h_exception(struct isr_frame *f)
{
    exc_vec = f->vector;
    exc_err = f->error;
    exc_rip = f->rip;
    exc_cr2 = f->vector == VEC_PF ? read_cr2() : 0;
    exc_count++;
    f->rip = exc_fixup;         /* resume after the faulting instruction */
}

/* ------------------------------------------------------------ the phases */

static void phase_a(void)
{
    phase_begin('a', "8259 PIC + 8254 PIT mode 2, LAPIC LINT0 ExtINT (virtual wire)");

    lapic_virtual_wire(1);
    fact((lapic_read(LAPIC_LVT_LINT0) & 0x1FFFF) == 0x700,
         "lapic: lint0 0x%05x (ExtINT), lint1 0x%05x (NMI)",
         lapic_read(LAPIC_LVT_LINT0) & 0x1FFFF, lapic_read(LAPIC_LVT_LINT1) & 0x1FFFF);

    pic_init(V_PIC_BASE, V_PIC_BASE + 8);
    uint16_t m = pic_get_mask();
    fact(m == 0xFFFF, "pic: imr after init master 0x%02x slave 0x%02x", m & 0xFF, m >> 8);
    pic_set_mask(0xFFFE);
    m = pic_get_mask();
    fact(m == 0xFFFE, "pic: imr master 0x%02x slave 0x%02x (IRQ0 only)", m & 0xFF, m >> 8);

    pit_start(2, PIT_DIV_A);
    uint8_t st = pit_read_status() & 0x3F;      /* bits 7-6 (OUT, null count) depend on time */
    fact(st == 0x34, "pit: status 0x%02x (lo/hi, mode 2, binary)", st);
    uint16_t c1 = pit_read_count(), c2 = pit_read_count();
    fact(c1 >= 1 && c1 <= PIT_DIV_A && c2 >= 1 && c2 <= PIT_DIV_A,
         "pit: counter within 1..%u", PIT_DIV_A);

    uint32_t spins = wait_count(&count[V_PIT_PIC], TICKS);
    fact(spins != 0, "pit: %u ticks on vector 0x%02x through the PIC", TICKS, V_PIT_PIC);
    fact(pic_first_done && pic_isr_in == 0x0001 && pic_isr_after == 0,
         "pic: isr 0x%04x in handler, 0x%04x after eoi", pic_isr_in, pic_isr_after);

    pic_set_mask(0xFFFF);
    settle(1000);                               /* anything already in flight */
    uint32_t before = count[V_PIT_PIC];
    uint32_t i;
    for (i = 0; i < POLL_LIMIT && !(pic_read_irr() & 1); i++)  /* next edge latches IRR */
        delay(64);
    settle(window(spins, 3 * TICKS));           /* about 3 PIT periods */
    fact(i < POLL_LIMIT, "pic: irr bit 0 set while IRQ0 masked");
    fact(count[V_PIT_PIC] == before, "pic: no IRQ0 while masked");

    lapic_virtual_wire(0);
    phase_end('a');
}

static void phase_b(void)
{
    phase_begin('b', "IO-APIC: pin 2 (PIT, ISA IRQ0 override), pin 4 (COM1); PIC masked");

    uint32_t ver = ioapic_read(IOAPIC_REG_VER);
    fact(((ver >> 16) & 0xFF) == 0x17, "ioapic: version register 0x%08x (%u pins)", ver,
         ((ver >> 16) & 0xFF) + 1);

    uint8_t id = (uint8_t)lapic_id();
    ioapic_route(IOAPIC_PIN_PIT, V_PIT_IOAPIC, 0, id);
    ioapic_route(IOAPIC_PIN_COM1, V_COM1, IOAPIC_MASKED, id);
    uint32_t lo = ioapic_redir_lo(IOAPIC_PIN_PIT) & ~(IOAPIC_DELIVS | IOAPIC_REMOTE_IRR);
    uint32_t hi = ioapic_redir_hi(IOAPIC_PIN_PIT);
    fact(lo == V_PIT_IOAPIC && hi == (uint32_t)id << 24,
         "ioapic: redir[2] 0x%08x_%08x (edge, high, fixed, vector 0x%02x)", hi, lo, V_PIT_IOAPIC);

    uint32_t pic_before = count[V_PIT_PIC];
    pit_start(3, PIT_DIV_B);
    uint8_t st = pit_read_status() & 0x3F;
    fact(st == 0x36, "pit: status 0x%02x (lo/hi, mode 3, binary)", st);

    uint32_t spins = wait_count(&count[V_PIT_IOAPIC], TICKS);
    fact(spins != 0, "pit: %u ticks on vector 0x%02x through IO-APIC pin 2", TICKS, V_PIT_IOAPIC);
    fact(lapic_isr_in == 1 && lapic_isr_after == 0,
         "lapic: isr bit 0x%02x = %d in handler, %d after eoi", V_PIT_IOAPIC, lapic_isr_in,
         lapic_isr_after);
    fact(count[V_PIT_PIC] == pic_before, "pic: no interrupt while masked");

    ioapic_mask(IOAPIC_PIN_PIT, 1);
    settle(1000);
    uint32_t before = count[V_PIT_IOAPIC];
    settle(window(spins, 3 * TICKS));
    fact(count[V_PIT_IOAPIC] == before, "ioapic: no pin 2 interrupt while masked");
    pit_stop();

    /* COM1 THRE interrupt: enabling IER.THRI with the transmitter empty
     * raises it at once; reading IIR clears it. */
    serial_wait_idle();
    idt_set_handler(V_COM1, h_com1_thre);
    ioapic_mask(IOAPIC_PIN_COM1, 0);
    cli();
    uart_out(UART_IER, IER_THRI);
    spins = wait_count(&count[V_COM1], 1);
    settle(window(spins, TICKS) + 10000);
    uart_out(UART_IER, 0);                      /* (the handler did this already) */
    fact(spins != 0 && count[V_COM1] == 1 && thre_iir == 0xC2,
         "com1: THRE interrupt on vector 0x%02x through pin 4, iir 0x%02x, %u interrupt",
         V_COM1, thre_iir, count[V_COM1]);
    phase_end('b');
}

static void phase_c(void)
{
    phase_begin('c', "local APIC timer: one-shot, TPR, periodic, HLT");

    uint32_t ver = lapic_read(LAPIC_VERSION);
    fact((ver & 0xFF) == 0x14, "lapic: id %u, version 0x%02x", lapic_id(), ver & 0xFF);
    uint32_t svr = lapic_read(LAPIC_SVR);
    fact((svr & 0x1FF) == 0x1FF, "lapic: svr 0x%03x (enabled, spurious vector 0x%02x)",
         svr & 0x1FF, svr & 0xFF);
    uint64_t t1 = rdtsc(), t2 = rdtsc();
    fact(t2 > t1, "cpu: tsc increases");

    /* one-shot, divide by 16 */
    lapic_timer_oneshot(V_LT_ONESHOT, 16, 10000);
    uint32_t c1 = lapic_read(LAPIC_TIMER_CCR), c2 = lapic_read(LAPIC_TIMER_CCR);
    fact(lapic_read(LAPIC_TIMER_DCR) == 0x3 && lapic_read(LAPIC_TIMER_ICR) == 10000 &&
             (lapic_read(LAPIC_LVT_TIMER) & 0x7FFFF) == V_LT_ONESHOT,
         "lapic: one-shot lvt 0x%05x dcr 0x%x (divide 16) icr %u",
         lapic_read(LAPIC_LVT_TIMER) & 0x7FFFF, lapic_read(LAPIC_TIMER_DCR),
         lapic_read(LAPIC_TIMER_ICR));
    fact(c1 <= 10000 && c2 <= c1, "lapic: current count counts down");
    uint32_t spins = wait_count(&count[V_LT_ONESHOT], 1);
    settle(2 * spins + 10000);
    fact(spins != 0 && count[V_LT_ONESHOT] == 1, "lapic: one-shot fired once on vector 0x%02x",
         V_LT_ONESHOT);
    fact(lapic_read(LAPIC_TIMER_CCR) == 0, "lapic: current count 0 after expiry");

    /* TPR: class 5 blocks vector 0x51 until lowered */
    lapic_write(LAPIC_TPR, 0x50);
    lapic_timer_oneshot(V_LT_TPR, 1, 1000);
    sti();
    uint32_t i;
    for (i = 0; i < POLL_LIMIT && !lapic_irr_bit(V_LT_TPR); i++)
        delay(64);
    settle(10000);
    fact(i < POLL_LIMIT && count[V_LT_TPR] == 0 && lapic_irr_bit(V_LT_TPR),
         "lapic: tpr 0x50 holds vector 0x%02x in irr", V_LT_TPR);
    fact((lapic_read(LAPIC_PPR) & 0xF0) == 0x50, "lapic: ppr 0x%02x", lapic_read(LAPIC_PPR));
    lapic_write(LAPIC_TPR, 0);
    spins = wait_count(&count[V_LT_TPR], 1);
    settle(10000);
    fact(spins != 0 && count[V_LT_TPR] == 1 && !lapic_irr_bit(V_LT_TPR),
         "lapic: delivered once after tpr 0");

    /* periodic, divide by 4 */
    lapic_timer_periodic(V_LT_PERIOD, 4, 25000);
    fact(lapic_read(LAPIC_TIMER_DCR) == 0x1 &&
             (lapic_read(LAPIC_LVT_TIMER) & 0x7FFFF) == (LVT_TIMER_PERIODIC | V_LT_PERIOD),
         "lapic: periodic lvt 0x%05x dcr 0x%x (divide 4) icr %u",
         lapic_read(LAPIC_LVT_TIMER) & 0x7FFFF, lapic_read(LAPIC_TIMER_DCR),
         lapic_read(LAPIC_TIMER_ICR));
    spins = wait_count(&count[V_LT_PERIOD], TICKS);
    fact(spins != 0, "lapic: %u periodic ticks on vector 0x%02x", TICKS, V_LT_PERIOD);
    uint32_t ccr = lapic_read(LAPIC_TIMER_CCR);
    fact(ccr <= 25000, "lapic: periodic current count within 0..25000");

    /* HLT: only the periodic timer can wake us (verified running above). */
    if (spins) {
        cli();
        uint32_t w0 = count[V_LT_PERIOD];
        for (int k = 0; k < 3; k++) {
            sti_hlt();
            cli();
        }
        fact(count[V_LT_PERIOD] >= w0 + 3, "cpu: hlt woke 3 times on vector 0x%02x", V_LT_PERIOD);
    } else {
        fact(0, "cpu: hlt not tried");
    }

    lapic_timer_stop();
    settle(1000);
    uint32_t before = count[V_LT_PERIOD];
    settle(window(spins, 3 * TICKS));
    fact(count[V_LT_PERIOD] == before && lapic_read(LAPIC_TIMER_CCR) == 0,
         "lapic: stopped (icr 0): no ticks, current count 0");
    phase_end('c');
}

/* Poll (bounded) until LSR has `bit`; returns the last LSR value read. */
static uint8_t poll_lsr(uint8_t bit)
{
    uint8_t lsr = 0;
    for (uint32_t k = 0; k < POLL_LIMIT; k++) {
        lsr = uart_in(UART_LSR);
        if (lsr & bit)
            break;
        delay(64);
    }
    return lsr;
}

static const char loop_msg[] = "The quick brown fox jumps over the lazy dog 0123456789";
static const char fifo_msg[] = "0123456789abcdefX";     /* 17 bytes: one more than the RX FIFO */
static const char irq_line[] = "uart: this line was sent by THRE interrupts through IO-APIC pin 4\n";

static void phase_d(void)
{
    phase_begin('d', "COM1 16550: registers, loopback (polled, then RX/THRE interrupts), IO-APIC pin 4");

    uart_out(UART_SCR, 0x5A);
    uint8_t s1 = uart_in(UART_SCR);
    uart_out(UART_SCR, 0xA5);
    uint8_t s2 = uart_in(UART_SCR);
    fact(s1 == 0x5A && s2 == 0xA5, "uart: scratch 0x%02x 0x%02x", s1, s2);

    uint8_t lcr = uart_in(UART_LCR);
    uart_out(UART_LCR, lcr | LCR_DLAB);
    uint16_t div = uart_in(UART_DLL) | (uint16_t)uart_in(UART_DLM) << 8;
    uart_out(UART_LCR, lcr);
    fact(lcr == 0x03 && div == 1, "uart: lcr 0x%02x divisor %u (115200 8N1)", lcr, div);
    uint8_t iir = uart_in(UART_IIR), ier = uart_in(UART_IER), mcr = uart_in(UART_MCR);
    fact(iir == 0xC1 && ier == 0 && mcr == 0x0B, "uart: iir 0x%02x ier 0x%02x mcr 0x%02x",
         iir, ier, mcr);

    /* Loopback. Nothing may be printed until it is switched off again. Pin 4
     * stays masked: whether the IRQ line is driven in loopback differs (a PC
     * gates it with the OUT2 pin, which loopback forces inactive; QEMU drives
     * it anyway), so only the UART's own view (IIR, LSR) is checked here. */
    serial_wait_idle();
    ioapic_mask(IOAPIC_PIN_COM1, 1);
    uart_out(UART_MCR, MCR_LOOP | MCR_OUT2 | MCR_OUT1 | MCR_RTS | MCR_DTR);
    uint8_t msr_all = uart_in(UART_MSR);
    uart_out(UART_MCR, MCR_LOOP | MCR_OUT2);
    uint8_t msr_out2 = uart_in(UART_MSR);
    for (int k = 0; k < 64 && serial_getc_polled() >= 0; k++)
        ;
    (void)uart_in(UART_LSR);

    /* one byte, RX data interrupt enabled: IIR reports it until RBR is read */
    uart_out(UART_IER, IER_RDI);
    uart_out(UART_THR, 'X');
    uint8_t lsr1 = poll_lsr(LSR_DR);
    uint8_t iir_rx = uart_in(UART_IIR);
    int got = uart_in(UART_RBR);
    uint8_t iir_rx_after = uart_in(UART_IIR);
    uart_out(UART_IER, 0);

    /* THRE: enabling IER.THRI with the transmitter empty raises it; reading IIR clears it */
    serial_wait_idle();
    uart_out(UART_IER, IER_THRI);
    uint8_t iir_thre = uart_in(UART_IIR);
    uint8_t iir_thre_after = uart_in(UART_IIR);
    uart_out(UART_IER, 0);

    /* 17 bytes into the 16-byte RX FIFO: overrun, the first 16 are kept */
    for (unsigned k = 0; k < 16; k++)
        uart_out(UART_THR, (uint8_t)fifo_msg[k]);
    poll_lsr(LSR_THRE);
    uart_out(UART_THR, (uint8_t)fifo_msg[16]);
    uint8_t lsr_oe = poll_lsr(LSR_OE);              /* (any LSR read clears OE) */
    uint8_t lsr_oe_after = uart_in(UART_LSR);       /* reading LSR cleared OE */
    char fifo_rx[17];
    unsigned nrx = 0;
    for (; nrx < sizeof(fifo_rx) && (uart_in(UART_LSR) & LSR_DR); nrx++)
        fifo_rx[nrx] = (char)uart_in(UART_RBR);
    int fifo_same = nrx == 16;
    for (unsigned k = 0; k < nrx && fifo_same; k++)
        fifo_same = fifo_rx[k] == fifo_msg[k];

    /* Still in loopback: a message sent by THRE interrupts and received by RX
     * interrupts through IO-APIC pin 4. This relies on the IRQ line being
     * driven in loopback mode with OUT2 set, as QEMU (and vmk) do; on a real
     * PC the OUT2 pin is forced inactive in loopback and gates the IRQ off. */
    serial_wait_idle();
    for (int k = 0; k < 64 && serial_getc_polled() >= 0; k++)
        ;
    idt_set_handler(V_COM1, h_com1_driver);
    uint32_t n = sizeof(loop_msg) - 1;
    cli();
    ioapic_mask(IOAPIC_PIN_COM1, 0);
    serial_enable_irq();
    for (uint32_t k = 0; k < n; k++)
        serial_putc(loop_msg[k]);
    uint32_t spins = wait_count(&serial_stats.rx_bytes, n);
    settle(window(spins, TICKS) + 10000);
    serial_disable_irq();
    char rx[sizeof(loop_msg)];
    uint32_t m = 0;
    for (int c; m < n && (c = serial_getc()) >= 0;)
        rx[m++] = (char)c;
    int extra = serial_getc() >= 0 || serial_getc_polled() >= 0;
    int loop_same = spins != 0 && m == n;
    for (uint32_t k = 0; k < m && loop_same; k++)
        loop_same = rx[k] == loop_msg[k];
    uint32_t loop_rx_irqs = serial_stats.rx_irqs, loop_tx_irqs = serial_stats.tx_irqs;
    dbg("uart loopback: irqs %u rx_irqs %u tx_irqs %u other %u rx_bytes %u tx_bytes %u "
        "dropped %u iir_seen 0x%x received %u\n", serial_stats.irqs, serial_stats.rx_irqs,
        serial_stats.tx_irqs, serial_stats.other_irqs, serial_stats.rx_bytes,
        serial_stats.tx_bytes, serial_stats.rx_dropped, serial_stats.iir_seen, m);

    serial_wait_idle();
    uart_out(UART_MCR, MCR_DTR | MCR_RTS | MCR_OUT2);
    for (int k = 0; k < 64 && serial_getc_polled() >= 0; k++)
        ;

    fact((msr_all & 0xF0) == 0xF0 && (msr_out2 & 0xF0) == 0x80,
         "uart: loopback msr 0x%x0 (mcr 0x1f), 0x%x0 (mcr 0x18)", msr_all >> 4, msr_out2 >> 4);
    /* 0xC4 (RX data) or, once the byte has waited 4 character times, 0xCC (timeout) */
    int iir_rx_ok = iir_rx == 0xC4 || iir_rx == 0xCC;
    fact((lsr1 & LSR_DR) && got == 'X' && iir_rx_ok && iir_rx_after == 0xC1,
         "uart: loopback byte '%c', iir %s before reading it, 0x%02x after",
         got >= 0x20 && got < 0x7F ? got : '?', iir_rx_ok ? "0xc4/0xcc" : "wrong", iir_rx_after);
    fact(iir_thre == 0xC2 && iir_thre_after == 0xC1,
         "uart: thre: iir 0x%02x when enabled, 0x%02x after reading iir", iir_thre, iir_thre_after);
    fact((lsr_oe & LSR_OE) && !(lsr_oe_after & LSR_OE) && fifo_same,
         "uart: 17 bytes into the rx fifo: overrun flagged, first %u kept", nrx);

    fact(loop_same && !extra && serial_stats.rx_dropped == 0,
         "uart: %u bytes looped back through THRE/RX interrupts, data ok", n);
    fact(loop_tx_irqs > 0 && loop_rx_irqs > 0,
         "uart: loopback interrupts on vector 0x%02x (pin 4): THRE and RX data", V_COM1);

    /* Interrupt-driven output on the real line: THRE refills the TX FIFO from a ring. */
    n = sizeof(irq_line) - 1;
    uint32_t sent0 = serial_stats.tx_bytes, irqs0 = count[V_COM1], rx0 = serial_stats.rx_irqs;
    cli();
    serial_use_irq_console();
    kputs(irq_line);                        /* queued; the first THRE interrupt starts it */
    spins = wait_count(&serial_stats.tx_bytes, sent0 + n);
    settle(window(spins, TICKS) + 10000);
    serial_disable_irq();
    console_putc = serial_putc_polled;
    serial_wait_idle();
    dbg("uart: irqs %u tx_irqs %u other %u tx_bytes %u iir_seen 0x%x pending %u\n",
        serial_stats.irqs, serial_stats.tx_irqs, serial_stats.other_irqs, serial_stats.tx_bytes,
        serial_stats.iir_seen, serial_tx_pending());
    fact(spins != 0 && serial_tx_pending() == 0 && serial_stats.tx_irqs > 0 &&
             count[V_COM1] > irqs0,
         "uart: %u bytes sent by THRE interrupts on vector 0x%02x", n, V_COM1);
    fact(serial_stats.other_irqs == 0 && serial_stats.rx_irqs == rx0,
         "uart: no rx, line or modem status interrupts");
    phase_end('d');
}

#define TRIGGER(insns, clobbers...)                                                     \
    __asm__ volatile("lea 1f(%%rip), %%r11\n\t"                                          \
                     "mov %%r11, %0\n\t" insns "\n1:"                                    \
                     : "=m"(exc_fixup)                                                   \
                     :                                                                   \
                     : "r11", "memory", ##clobbers)

static void exc_check(const char *what, uint64_t vec, const char *name, uint64_t back,
                      uint64_t err, int check_cr2, uint64_t cr2)
{
    int ok = exc_count == 1 && exc_vec == vec && exc_err == err && exc_fixup - exc_rip == back &&
             (!check_cr2 || exc_cr2 == cr2);
    if (check_cr2)
        fact(ok, "exc: %s -> vector %lu (%s) error 0x%lx cr2 0x%lx, resumed", what, exc_vec, name,
             exc_err, exc_cr2);
    else
        fact(ok, "exc: %s -> vector %lu (%s) error 0x%lx, resumed", what, exc_vec, name, exc_err);
    exc_count = 0;
    exc_vec = exc_err = exc_rip = exc_cr2 = ~0ull;
}

static void phase_e(void)
{
    phase_begin('e', "exceptions caught by the IDT and resumed");
    static const uint8_t vecs[] = {VEC_DE, VEC_BP, VEC_UD, VEC_GP, VEC_PF};
    for (unsigned k = 0; k < sizeof(vecs); k++)
        idt_set_handler(vecs[k], h_exception);
    exc_count = 0;

    TRIGGER("int3");                                        /* trap: rip after int3 */
    exc_check("int3", VEC_BP, "#BP", 0, 0, 0, 0);
    TRIGGER("ud2");                                         /* fault: rip at ud2 (2 bytes) */
    exc_check("ud2", VEC_UD, "#UD", 2, 0, 0, 0);
    TRIGGER("xor %%ecx, %%ecx\n\tmov $1, %%eax\n\txor %%edx, %%edx\n\tdiv %%ecx", "rax", "rcx",
            "rdx");                                         /* div %ecx: 2 bytes */
    exc_check("div by 0", VEC_DE, "#DE", 2, 0, 0, 0);
    TRIGGER("movabs $0x100000000, %%rax\n\tmov (%%rax), %%ecx", "rax", "rcx");
    exc_check("read 0x100000000 (unmapped)", VEC_PF, "#PF", 2, 0, 1, 0x100000000ull);
    TRIGGER("movabs $0x8000000000000000, %%rax\n\tmov (%%rax), %%ecx", "rax", "rcx");
    exc_check("read non-canonical", VEC_GP, "#GP", 2, 0, 0, 0);
    fact(!(read_rflags() & (1u << 9)), "cpu: IF still clear after the handlers");

    for (unsigned k = 0; k < sizeof(vecs); k++)
        idt_set_handler(vecs[k], 0);
    phase_end('e');
}

/* ------------------------------------------------------------------ main */

void kmain(uint32_t magic, uint32_t mbi_addr)
{
    int if_at_entry = (read_rflags() >> 9) & 1;
    uint64_t tsc0 __attribute__((unused)) = rdtsc();
    serial_init(COM1_BASE, 115200);
    console_crlf = 0;
    idt_init();

    kprintf("vmk pctest\n");
    const struct multiboot_info *mbi = (const struct multiboot_info *)(uintptr_t)mbi_addr;
    fact(magic == MULTIBOOT_BOOTLOADER_MAGIC, "boot: multiboot magic 0x%08x", magic);
    fact(magic == MULTIBOOT_BOOTLOADER_MAGIC && (mbi->flags & MBI_FLAG_MEM) && mbi->mem_upper > 0,
         "boot: multiboot info has memory sizes");
    fact(!if_at_entry, "boot: 64-bit kmain entered with IF=0");
    if (phase_failures)
        failures++;

    for (unsigned v = 0; v < 16; v++)
        idt_set_handler(V_PIC_BASE + v, h_pic_spurious);    /* IRQ1-15: treated as spurious */
    idt_set_handler(V_PIT_PIC, h_pic_irq0);
    idt_set_handler(V_PIT_IOAPIC, h_lapic_eoi);
    idt_set_handler(V_LT_ONESHOT, h_lapic_eoi);
    idt_set_handler(V_LT_TPR, h_lapic_eoi);
    idt_set_handler(V_LT_PERIOD, h_lapic_eoi);
    idt_set_handler(V_SPURIOUS, h_lapic_spurious);

    lapic_init(V_SPURIOUS);
    ioapic_init();
    pic_init(V_PIC_BASE, V_PIC_BASE + 8);

    phase_a();
    phase_b();
    phase_c();
    phase_d();
    phase_e();

    dbg("tsc: %lu at kmain, %lu since, lapic version 0x%08x\n", tsc0, rdtsc() - tsc0,
        lapic_read(LAPIC_VERSION));
    kprintf("\n");
    fact(idt_unhandled_count == 0, "unexpected interrupts: %u", idt_unhandled_count);
    if (phase_failures)
        failures++;
    if (failures) {
        kprintf("pctest: FAIL (%d)\n", failures);
        debugcon_puts("pctest: FAIL\n");
        serial_wait_idle();
        debug_exit(EXIT_FAIL);
    }
    kprintf("pctest: PASS\n");
    debugcon_puts("pctest: PASS\n");
    serial_wait_idle();
    debug_exit(EXIT_PASS);
}
