/* gdbtarget.c - the guest the debugger tests drive (tests/tools/test_gdb_real.py,
 * tests/tools/test_debugshell.py).
 *
 * A LAPIC timer interrupts it every 20 us of guest time while it works, so the
 * tests also check that breakpoints, single steps and watchpoints leave
 * interrupt delivery and virtual time alone: the last line (timer ticks and the
 * TSC, which is virtual time on vmk) must be the same with and without a
 * debugger attached.
 *
 *   gdbtarget: start
 *   key=A                 <- the byte `message_key`: a debugger that sets it
 *                            before the print changes this line
 *   ticks=N tsc=T
 *   done
 *
 * Then isa-debug-exit(0): exit status 1.  The debuggers break at checkpoint(),
 * watch `watched_counter` (written once after checkpoint) and set message_key.
 */
#include <stdint.h>
#include "io.h"
#include "kprintf.h"
#include "idt.h"
#include "serial.h"
#include "pic.h"
#include "lapic.h"

#define V_TIMER    0x40
#define V_SPURIOUS 0xFF
#define TIMER_COUNT 1250        /* x divide 16 = 20000 ns at vmk's 1 ns LAPIC tick */

volatile char message_key = 'A';
volatile uint32_t watched_counter;
static volatile uint32_t timer_ticks;

static void h_timer(struct isr_frame *f) { (void)f; timer_ticks++; lapic_eoi(); }
static void h_ignore(struct isr_frame *f) { (void)f; }

/* Some work for the timer to interrupt. */
static __attribute__((noinline)) uint64_t work(unsigned rounds)
{
    uint64_t x = 1;
    for (unsigned i = 0; i < rounds; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        barrier();
    }
    return x;
}

/* The debuggers break here. */
__attribute__((noinline)) void checkpoint(void)
{
    __asm__ volatile("nop; nop; nop" ::: "memory");
}

void kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    serial_init(COM1_BASE, 115200);
    idt_init();
    for (unsigned v = 0x20; v < 0x30; v++)
        idt_set_handler(v, h_ignore);
    idt_set_handler(V_SPURIOUS, h_ignore);
    pic_init(0x20, 0x28);
    lapic_init(V_SPURIOUS);
    idt_set_handler(V_TIMER, h_timer);
    lapic_timer_periodic(V_TIMER, 16, TIMER_COUNT);
    sti();

    kprintf("gdbtarget: start\n");
    uint64_t x = work(20000);
    for (int i = 0; i < 3; i++)
        watched_counter++;
    checkpoint();
    x ^= work(20000);
    kprintf("key=%c\n", message_key);
    watched_counter = 42;
    x ^= work(20000);
    cli();
    lapic_timer_stop();
    kprintf("ticks=%u tsc=%lu x=%lx\n", timer_ticks, (unsigned long)rdtsc(), (unsigned long)x);
    kprintf("done\n");
    serial_wait_idle();
    debug_exit(0);
}
