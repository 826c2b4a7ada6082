/* idt.h - 64-bit IDT with interrupt gates and a C dispatcher. */
#ifndef BM_IDT_H
#define BM_IDT_H

#include <stdint.h>

/* What isr_common (isr.S) leaves on the stack, lowest address first. */
struct isr_frame {
    uint64_t rax, rbx, rcx, rdx, rsi, rdi, rbp;
    uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
    uint64_t vector, error;
    uint64_t rip, cs, rflags, rsp, ss;     /* pushed by the CPU */
};

typedef void (*isr_handler_t)(struct isr_frame *f);

/* Exception vectors */
#define VEC_DE 0
#define VEC_DB 1
#define VEC_NMI 2
#define VEC_BP 3
#define VEC_UD 6
#define VEC_DF 8
#define VEC_GP 13
#define VEC_PF 14

void idt_init(void);                                  /* all 256 gates -> stubs, lidt */
void idt_set_handler(unsigned vector, isr_handler_t h);

/* Interrupts that arrived on a vector >= 32 without a handler. */
extern volatile uint32_t idt_unhandled_count;
extern volatile uint32_t idt_unhandled_last;

#endif
