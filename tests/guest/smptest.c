/* smptest.c - the SMP test kernel (issue 12): INIT-SIPI-SIPI, APs in long mode, IPIs.
 *
 * The BSP reads its LAPIC ID, finds the processors in the ACPI MADT, and
 * starts each AP in turn with the MP initialization protocol (Intel SDM
 * vol. 3, §9.4.4.1 "Typical BSP initialization sequence": INIT, 10 ms,
 * STARTUP, 200 us, STARTUP, 200 us).  The STARTUP vector points at a 16-bit
 * trampoline copied to TRAMP_ADDR (below 1 MiB, 4 KiB aligned): real mode ->
 * protected mode -> long mode on the BSP's page tables -> ap_main() on the
 * stack the BSP left in the trampoline.  Each AP, holding a ticket lock
 * (so the serial lines come out in a fixed order on any PC), prints its
 * LAPIC ID and its CPUID initial APIC ID, adds 1 to a shared counter with
 * `lock xadd`, and sends a fixed IPI back to the BSP.  The BSP waits for every
 * IPI, prints the count and exits through isa-debug-exit.
 *
 * Only facts that hold on any correct PC are printed, so vmk --smp 4 and
 * qemu-system-x86_64 -smp 4 give the same bytes (tests/system/test_smptest.py).
 */
#include <stdint.h>
#include "idt.h"
#include "io.h"
#include "kprintf.h"
#include "lapic.h"
#include "pic.h"
#include "serial.h"

#define EXIT_PASS 0x10
#define EXIT_FAIL 0x11

#define TRAMP_ADDR   0x7000u            /* STARTUP vector 0x07 */
#define MAX_CPUS     16
#define AP_STACK     8192
#define V_PIC_BASE   0x20
#define V_TIMER      0x30
#define V_IPI        0x40
#define V_SPURIOUS   0xFF

#define ICR_INIT     (5u << 8)
#define ICR_STARTUP  (6u << 8)
#define ICR_ASSERT   (1u << 14)
#define ICR_PENDING  (1u << 12)

/* ---- the AP trampoline: copied to TRAMP_ADDR, entered at CS:IP = 0700:0000 ---- */
#define T(sym) "(0x7000 + " #sym " - ap_tramp)"
__asm__(
    "        .section .data\n"
    "        .globl ap_tramp, ap_tramp_end, ap_tramp_cr3, ap_tramp_stack\n"
    "        .code16\n"
    "ap_tramp:\n"
    "        cli\n"
    "        cld\n"
    "        xor %ax, %ax\n"
    "        mov %ax, %ds\n"
    "        lgdtl " T(ap_tramp_gdtr) "\n"
    "        mov %cr0, %eax\n"
    "        or $1, %eax\n"
    "        mov %eax, %cr0\n"
    "        ljmpl $0x18, $" T(ap_tramp32) "\n"
    "        .code32\n"
    "ap_tramp32:\n"
    "        mov $0x10, %ax\n"
    "        mov %ax, %ds\n"
    "        mov %ax, %es\n"
    "        mov %ax, %ss\n"
    "        mov %cr4, %eax\n"
    "        or $0x20, %eax\n"                  /* CR4.PAE */
    "        mov %eax, %cr4\n"
    "        mov " T(ap_tramp_cr3) ", %eax\n"
    "        mov %eax, %cr3\n"
    "        mov $0xC0000080, %ecx\n"           /* EFER.LME */
    "        rdmsr\n"
    "        or $0x100, %eax\n"
    "        wrmsr\n"
    "        mov %cr0, %eax\n"
    "        or $0x80000001, %eax\n"            /* CR0.PG | PE */
    "        mov %eax, %cr0\n"
    "        ljmp $0x08, $" T(ap_tramp64) "\n"
    "        .code64\n"
    "ap_tramp64:\n"
    "        mov $0x10, %ax\n"
    "        mov %ax, %ds\n"
    "        mov %ax, %es\n"
    "        mov %ax, %ss\n"
    "        mov %ax, %fs\n"
    "        mov %ax, %gs\n"
    "        mov " T(ap_tramp_stack) ", %rsp\n"
    "        xor %ebp, %ebp\n"
    "        movabs $ap_main, %rax\n"
    "        call *%rax\n"
    "1:      cli\n"
    "        hlt\n"
    "        jmp 1b\n"
    "        .balign 8\n"
    "ap_tramp_gdt:\n"
    "        .quad 0\n"
    "        .quad 0x00209A0000000000\n"        /* 0x08: 64-bit code */
    "        .quad 0x00CF92000000FFFF\n"        /* 0x10: flat data */
    "        .quad 0x00CF9A000000FFFF\n"        /* 0x18: 32-bit code */
    "ap_tramp_gdtr:\n"
    "        .word 31\n"
    "        .long " T(ap_tramp_gdt) "\n"
    "        .balign 8\n"
    "ap_tramp_cr3:\n"
    "        .quad 0\n"
    "ap_tramp_stack:\n"
    "        .quad 0\n"
    "ap_tramp_end:\n"
    "        .text\n");

extern char ap_tramp[], ap_tramp_end[], ap_tramp_cr3[], ap_tramp_stack[];

static uint8_t ap_stacks[MAX_CPUS][AP_STACK] __attribute__((aligned(16)));
static volatile uint32_t counter;          /* lock xadd by every AP */
static volatile uint32_t ticket_next, ticket_serving;
static volatile uint32_t ipis;             /* fixed IPIs the BSP took */
static volatile uint32_t timer_fired;
static uint32_t bsp_id;

static uint32_t xadd(volatile uint32_t *p, uint32_t v)
{
    __asm__ volatile("lock xaddl %0, %1" : "+r"(v), "+m"(*p) :: "memory");
    return v;
}

static void cpuid(uint32_t leaf, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

static void send_ipi(uint32_t dest, uint32_t lo)
{
    lapic_write(LAPIC_ICR_HI, dest << 24);
    lapic_write(LAPIC_ICR_LO, lo);
    while (lapic_read(LAPIC_ICR_LO) & ICR_PENDING)
        pause();
}

/* ---- the APs ---- */
void ap_main(void)
{
    uint32_t a, b, c, d;
    uint32_t id = lapic_id();
    cpuid(1, &a, &b, &c, &d);
    uint32_t t = xadd(&ticket_next, 1);
    while (ticket_serving != t)
        pause();
    kprintf("AP: LAPIC ID %u, CPUID initial APIC ID %u, in long mode\n", id, b >> 24);
    uint32_t before = xadd(&counter, 1);
    kprintf("AP %u: counter %u -> %u\n", id, before, before + 1);
    ticket_serving = t + 1;
    lapic_write(LAPIC_SVR, SVR_ENABLE | V_SPURIOUS);
    send_ipi(bsp_id, V_IPI);                  /* fixed, physical destination, edge */
    for (;;)
        __asm__ volatile("cli; hlt");
}

/* ---- the BSP ---- */
static void h_timer(struct isr_frame *f) { (void)f; timer_fired = 1; lapic_eoi(); }
static void h_ipi(struct isr_frame *f) { (void)f; ipis++; lapic_eoi(); }
static void h_spurious(struct isr_frame *f) { (void)f; }

/* Wait with the LAPIC timer (1 GHz bus on QEMU and vmk; divide by 16). */
static void delay_us(uint32_t us)
{
    timer_fired = 0;
    lapic_timer_oneshot(V_TIMER, 16, us * 1000u / 16u);
    cli();
    while (!timer_fired) {
        sti_hlt();
        cli();
    }
    sti();
}

static int sum_ok(const uint8_t *p, uint32_t n)
{
    uint8_t s = 0;
    for (uint32_t i = 0; i < n; i++)
        s += p[i];
    return s == 0;
}

static int sig_is(const uint8_t *p, const char *sig, int n)
{
    for (int i = 0; i < n; i++)
        if (p[i] != (uint8_t)sig[i])
            return 0;
    return 1;
}

static uint32_t rd32(const uint8_t *p) { return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24; }

/* The enabled processors' APIC IDs from the MADT (ACPI 6.x §5.2.12.2). */
static int madt_apic_ids(uint8_t *ids, int max)
{
    const uint8_t *rsdp = 0;
    for (uintptr_t p = 0xE0000; p < 0x100000; p += 16)
        if (sig_is((const uint8_t *)p, "RSD PTR ", 8) && sum_ok((const uint8_t *)p, 20)) {
            rsdp = (const uint8_t *)p;
            break;
        }
    if (!rsdp)
        return -1;
    const uint8_t *rsdt = (const uint8_t *)(uintptr_t)rd32(rsdp + 16);
    uint32_t n = (rd32(rsdt + 4) - 36) / 4;
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *t = (const uint8_t *)(uintptr_t)rd32(rsdt + 36 + 4 * i);
        if (!sig_is(t, "APIC", 4))
            continue;
        int found = 0;
        for (uint32_t off = 44; off + 2 <= rd32(t + 4); off += t[off + 1]) {
            if (t[off + 1] < 2)
                break;
            if (t[off] == 0 && (rd32(t + off + 4) & 1) && found < max)
                ids[found++] = t[off + 3];
        }
        return found;
    }
    return -1;
}

static __attribute__((noreturn)) void finish(int ok)
{
    kprintf("smptest: %s\n", ok ? "PASS" : "FAIL");
    serial_wait_idle();
    debug_exit(ok ? EXIT_PASS : EXIT_FAIL);
}

void kmain(uint32_t magic, uint32_t mbi_addr)
{
    (void)magic;
    (void)mbi_addr;
    serial_init(COM1_BASE, 115200);
    console_crlf = 0;
    idt_init();
    idt_set_handler(V_TIMER, h_timer);
    idt_set_handler(V_IPI, h_ipi);
    idt_set_handler(V_SPURIOUS, h_spurious);
    for (unsigned v = 0; v < 16; v++)
        idt_set_handler(V_PIC_BASE + v, h_spurious);     /* an 8259 request latched before the remap */
    pic_init(V_PIC_BASE, V_PIC_BASE + 8);                /* every IRQ masked: only the LAPIC interrupts */
    lapic_init(V_SPURIOUS);
    sti();

    uint32_t a, b, c, d;
    cpuid(1, &a, &b, &c, &d);
    bsp_id = lapic_id();
    kprintf("vmk smptest\n");
    kprintf("BSP: LAPIC ID %u, CPUID initial APIC ID %u\n", bsp_id, b >> 24);

    uint8_t ids[MAX_CPUS];
    int ncpus = madt_apic_ids(ids, MAX_CPUS);
    if (ncpus < 1) {
        kprintf("MADT: not found\n");
        finish(0);
    }
    kprintf("MADT: %d processors, APIC IDs", ncpus);
    for (int i = 0; i < ncpus; i++)
        kprintf(" %u", ids[i]);
    kprintf("\n");

    uint8_t *tramp = (uint8_t *)(uintptr_t)TRAMP_ADDR;
    uint32_t size = (uint32_t)(ap_tramp_end - ap_tramp);
    for (uint32_t i = 0; i < size; i++)
        tramp[i] = (uint8_t)ap_tramp[i];
    uint64_t cr3;
    __asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
    *(volatile uint64_t *)(tramp + (ap_tramp_cr3 - ap_tramp)) = cr3;

    int started = 0;
    for (int i = 0; i < ncpus; i++) {
        if (ids[i] == bsp_id)
            continue;
        *(volatile uint64_t *)(tramp + (ap_tramp_stack - ap_tramp)) = (uint64_t)(uintptr_t)&ap_stacks[started + 1][AP_STACK];
        send_ipi(ids[i], ICR_INIT | ICR_ASSERT);
        delay_us(10000);
        for (int s = 0; s < 2; s++) {
            send_ipi(ids[i], ICR_STARTUP | ICR_ASSERT | (TRAMP_ADDR >> 12));
            delay_us(200);
        }
        started++;
        for (int w = 0; counter < (uint32_t)started && w < 1000; w++)
            delay_us(100);
        if (counter < (uint32_t)started) {
            kprintf("AP with APIC ID %u did not start\n", ids[i]);
            finish(0);
        }
    }
    for (int w = 0; ipis < (uint32_t)started && w < 1000; w++)
        delay_us(100);
    kprintf("BSP: counter %u, %u IPIs from %d APs\n", counter, ipis, started);
    finish(counter == (uint32_t)started && ipis == (uint32_t)started);
}
