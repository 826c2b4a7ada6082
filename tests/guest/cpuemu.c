/* cpuemu.c - the CPU instructions Unicorn gets wrong (issue 12), on vmk and QEMU.
 *
 * Prints only facts that hold on a correct PC (QEMU 7.2 TCG, -cpu qemu64, is the
 * reference), so the serial output is the same on vmk and QEMU:
 *
 *   a  IA32_APIC_BASE (MSR 0x1B): 0xFEE00900 on the boot CPU (base | EN | BSP),
 *      a write of the same value reads back (SDM vol. 3 §11.4.4)
 *   b  RDRAND / RDSEED: what CPUID.1:ECX[30] and CPUID.(7,0):EBX[18] say, and
 *      that an absent one raises #UD while a present one sets CF
 *   c  IRETQ to ring 3 with FS/GS bases set through IA32_FS_BASE/IA32_GS_BASE
 *      (0xC0000100/0xC0000101): with null FS/GS selectors ring 3 reads through the
 *      bases; with a ring-0 data selector in FS/GS, IRET to CPL 3 nulls the
 *      selector (SDM vol. 2A, IRET, RETURN-TO-OUTER-PRIVILEGE-LEVEL)
 *
 * IA32_TSC (MSR 0x10) is not here: QEMU 7.2 TCG reads it as 0, vmk follows the SDM
 * (the TSC); tests/machine/test_insnemu.py checks it on vmk.
 *
 * Ring 3 runs on this kernel's own page tables (U=1) and GDT, enters through
 * IRETQ and comes back through SYSCALL (STAR/LSTAR), no TSS needed.
 * Exit through isa-debug-exit: 0x10 if every fact held, else 0x11.
 */
#include <stdint.h>
#include <stdarg.h>
#include "io.h"
#include "kprintf.h"
#include "idt.h"
#include "serial.h"

#define EXIT_PASS 0x10
#define EXIT_FAIL 0x11

#define MSR_APIC_BASE   0x1B
#define MSR_EFER        0xC0000080
#define MSR_STAR        0xC0000081
#define MSR_LSTAR       0xC0000082
#define MSR_FMASK       0xC0000084
#define MSR_FS_BASE     0xC0000100
#define MSR_GS_BASE     0xC0000101
#define EFER_SCE        1u

/* This kernel's GDT: the SYSCALL/SYSRET layout (STAR). */
#define SEL_KCODE 0x08
#define SEL_KDATA 0x10
#define SEL_UDATA 0x1B
#define SEL_UCODE 0x23

static int failures;

static void fact(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void fact(int ok, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    kvprintf(console_putc, fmt, ap);
    va_end(ap);
    if (!ok) {
        kputs("  <-- FAIL");
        failures++;
    }
    kputs("\n");
}

static inline uint64_t rdmsr(uint32_t msr)
{
    uint32_t lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((uint64_t)hi << 32) | lo;
}

static inline void wrmsr(uint32_t msr, uint64_t v)
{
    __asm__ volatile("wrmsr" :: "c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32)) : "memory");
}

static inline void cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4])
{
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

/* ---------------------------------------------------------------- a: IA32_APIC_BASE */

static void phase_apic_base(void)
{
    kprintf("\n[a] IA32_APIC_BASE\n");
    uint64_t v = rdmsr(MSR_APIC_BASE);
    fact(v == 0xFEE00900u, "apic_base: 0x%llx (base 0xfee00000, EN, BSP)", (unsigned long long)v);
    wrmsr(MSR_APIC_BASE, v);
    uint64_t w = rdmsr(MSR_APIC_BASE);
    fact(w == v, "apic_base: a write of the same value reads back 0x%llx", (unsigned long long)w);
    /* The xAPIC is at the base: its version register reads as an integrated APIC. */
    uint32_t ver = *(volatile uint32_t *)(uintptr_t)((v & ~0xFFFull) + 0x30);
    fact((ver & 0xFF) >= 0x10, "lapic at the base: version register 0x%x is an integrated APIC", ver & 0xFF);
}

/* ---------------------------------------------------------------- b: RDRAND / RDSEED */

static volatile int ud_seen;
static volatile uint64_t ud_rip;

static void on_ud(struct isr_frame *f)
{
    ud_seen++;
    ud_rip = f->rip;
    f->rip += 3;                /* rdrand/rdseed %eax: 0F C7 /6, /7 with a register: 3 bytes */
}

static int try_rdrand(uint32_t *v)
{
    uint8_t cf = 0;
    uint32_t r = 0;
    __asm__ volatile("rdrand %0; setc %1" : "=a"(r), "=qm"(cf) : "0"(0) : "cc");
    *v = r;
    return cf;
}

static int try_rdseed(uint32_t *v)
{
    uint8_t cf = 0;
    uint32_t r = 0;
    __asm__ volatile("rdseed %0; setc %1" : "=a"(r), "=qm"(cf) : "0"(0) : "cc");
    *v = r;
    return cf;
}

static void phase_rng(void)
{
    kprintf("\n[b] RDRAND / RDSEED\n");
    uint32_t r1[4], r7[4], v;
    cpuid(1, 0, r1);
    cpuid(7, 0, r7);
    int has_rdrand = (r1[2] >> 30) & 1, has_rdseed = (r7[1] >> 18) & 1;
    kprintf("cpuid: rdrand %s, rdseed %s\n", has_rdrand ? "present" : "absent",
            has_rdseed ? "present" : "absent");
    idt_set_handler(VEC_UD, on_ud);
    ud_seen = 0;
    int cf = try_rdrand(&v);
    if (has_rdrand)
        fact(ud_seen == 0 && cf, "rdrand: CF=1");
    else
        fact(ud_seen == 1, "rdrand: #UD");
    ud_seen = 0;
    cf = try_rdseed(&v);
    if (has_rdseed)
        fact(ud_seen == 0 && cf, "rdseed: CF=1");
    else
        fact(ud_seen == 1, "rdseed: #UD");
}

/* ---------------------------------------------------------------- c: IRETQ to ring 3 */

static uint64_t gdt[8] __attribute__((aligned(16))) = {
    0,
    0x00AF9A000000FFFFull,      /* 0x08 kernel code, 64-bit */
    0x00CF92000000FFFFull,      /* 0x10 kernel data */
    0x00CFF2000000FFFFull,      /* 0x18 user data (DPL 3) */
    0x00AFFA000000FFFFull,      /* 0x20 user code, 64-bit (DPL 3) */
};

/* Page tables with U=1: identity map of 0..4 GiB in 2 MiB pages. */
static uint64_t upml4[512] __attribute__((aligned(4096)));
static uint64_t updpt[512] __attribute__((aligned(4096)));
static uint64_t upd[4][512] __attribute__((aligned(4096)));
static uint8_t user_stack[4096] __attribute__((aligned(16)));

static volatile uint64_t fs_word = 0x1111222233334444ull, gs_word = 0x5555666677778888ull;

/* What ring 3 saw: fs:[0], gs:[0], FS and GS selectors. */
struct user_view { uint64_t fs0, gs0, fs_sel, gs_sel; };
struct user_view seen;          /* global: syscall_entry writes it */

/* enter_user(rip, rsp): IRETQ to ring 3; returns when ring 3 executes SYSCALL,
 * with the ring-3 RAX, RDX, RSI, RDI in `seen`. */
void enter_user(uint64_t rip, uint64_t rsp);
void user_code(void);
uint64_t kernel_rsp;

__asm__(
    ".text\n"
    ".globl enter_user\n"
    "enter_user:\n"
    "    push %rbx; push %rbp; push %r12; push %r13; push %r14; push %r15\n"
    "    mov %rsp, kernel_rsp(%rip)\n"
    "    pushq $0x1B\n"                   /* SS */
    "    push %rsi\n"                     /* RSP */
    "    pushq $0x2\n"                    /* RFLAGS: IF=0 */
    "    pushq $0x23\n"                   /* CS */
    "    push %rdi\n"                     /* RIP */
    "    iretq\n"
    ".globl syscall_entry\n"
    "syscall_entry:\n"
    "    mov kernel_rsp(%rip), %rsp\n"
    "    lea seen(%rip), %rcx\n"
    "    mov %rax, 0(%rcx)\n"
    "    mov %rdx, 8(%rcx)\n"
    "    mov %rsi, 16(%rcx)\n"
    "    mov %rdi, 24(%rcx)\n"
    "    mov $0x10, %eax\n"
    "    mov %eax, %ds\n"
    "    mov %eax, %es\n"
    "    pop %r15; pop %r14; pop %r13; pop %r12; pop %rbp; pop %rbx\n"
    "    ret\n"
    ".globl user_code\n"
    "user_code:\n"
    "    xor %ecx, %ecx\n"
    "    mov %fs:(%rcx), %rax\n"
    "    mov %gs:(%rcx), %rdx\n"
    "    xor %esi, %esi\n"
    "    xor %edi, %edi\n"
    "    mov %fs, %si\n"
    "    mov %gs, %di\n"
    "    syscall\n"
    "1:  jmp 1b\n");
void syscall_entry(void);

static void setup_ring3(void)
{
    struct __attribute__((packed)) { uint16_t limit; uint64_t base; } gdtr = {sizeof gdt - 1, (uint64_t)gdt};
    __asm__ volatile("lgdt %0\n"
                     "pushq $0x08\n"
                     "lea 1f(%%rip), %%rax\n"
                     "push %%rax\n"
                     "lretq\n"
                     "1: mov $0x10, %%eax\n"
                     "mov %%eax, %%ss\n"
                     "mov %%eax, %%ds\n"
                     "mov %%eax, %%es\n" :: "m"(gdtr) : "rax", "memory");
    for (int i = 0; i < 4; i++) {
        for (int j = 0; j < 512; j++) {
            uint64_t pa = ((uint64_t)i << 30) | ((uint64_t)j << 21);
            upd[i][j] = pa | 0x87 | (i == 3 ? 0x18 : 0);     /* P RW U PS; MMIO hole uncached */
        }
        updpt[i] = (uint64_t)upd[i] | 0x7;
    }
    upml4[0] = (uint64_t)updpt | 0x7;
    __asm__ volatile("mov %0, %%cr3" :: "r"((uint64_t)upml4) : "memory");
    wrmsr(MSR_EFER, rdmsr(MSR_EFER) | EFER_SCE);
    /* SYSCALL: CS 0x08, SS 0x10; SYSRET (unused) base 0x10 -> SS 0x1B, CS 0x23 */
    wrmsr(MSR_STAR, (0x10ull << 48) | (0x08ull << 32));
    wrmsr(MSR_LSTAR, (uint64_t)syscall_entry);
    wrmsr(MSR_FMASK, 0x200);
}

/* Load FS and GS with `sel`, then set their bases through the MSRs, then run ring 3. */
static void ring3_with(uint16_t sel)
{
    __asm__ volatile("mov %0, %%fs\nmov %0, %%gs" :: "r"((uint32_t)sel));
    wrmsr(MSR_FS_BASE, (uint64_t)&fs_word);
    wrmsr(MSR_GS_BASE, (uint64_t)&gs_word);
    enter_user((uint64_t)user_code, (uint64_t)(user_stack + sizeof user_stack));
    __asm__ volatile("mov %0, %%fs\nmov %0, %%gs" :: "r"(0u));
}

static void phase_iret(void)
{
    kprintf("\n[c] IRETQ to ring 3 and the FS/GS bases\n");
    setup_ring3();

    ring3_with(0);
    fact(seen.fs0 == fs_word, "null fs: ring 3 reads fs:[0] = 0x%llx (the IA32_FS_BASE word)",
         (unsigned long long)seen.fs0);
    fact(seen.gs0 == gs_word, "null gs: ring 3 reads gs:[0] = 0x%llx (the IA32_GS_BASE word)",
         (unsigned long long)seen.gs0);
    fact(seen.fs_sel == 0 && seen.gs_sel == 0, "null fs/gs: selectors 0x%llx 0x%llx",
         (unsigned long long)seen.fs_sel, (unsigned long long)seen.gs_sel);

    ring3_with(SEL_UDATA);
    fact(seen.fs0 == fs_word && seen.gs0 == gs_word, "user data fs/gs: ring 3 reads both words");
    fact(seen.fs_sel == SEL_UDATA && seen.gs_sel == SEL_UDATA, "user data fs/gs: selectors 0x%llx 0x%llx",
         (unsigned long long)seen.fs_sel, (unsigned long long)seen.gs_sel);

    ring3_with(SEL_KDATA);
    fact(seen.fs_sel == 0 && seen.gs_sel == 0, "kernel data fs/gs: iret to CPL 3 nulls the selectors");
    kprintf("kernel data fs/gs: ring 3 reads %s through fs, %s through gs\n",
            seen.fs0 == fs_word ? "the IA32_FS_BASE word" : "not the base word",
            seen.gs0 == gs_word ? "the IA32_GS_BASE word" : "not the base word");
}

/* ---------------------------------------------------------------- main */

void kmain(uint32_t magic, uint32_t mbi_addr)
{
    (void)magic;
    (void)mbi_addr;
    serial_init(COM1_BASE, 115200);
    console_crlf = 0;
    idt_init();
    kprintf("vmk cpuemu\n");
    phase_apic_base();
    phase_rng();
    phase_iret();
    kprintf("\n");
    if (failures) {
        kprintf("cpuemu: FAIL (%d)\n", failures);
        serial_wait_idle();
        debug_exit(EXIT_FAIL);
    }
    kprintf("cpuemu: PASS\n");
    serial_wait_idle();
    debug_exit(EXIT_PASS);
}
