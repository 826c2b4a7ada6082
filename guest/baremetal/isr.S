/* isr.S - 256 interrupt entry stubs and the common save/restore path.
 *
 * Stub n is at isr_stubs + 16*n. Each pushes a dummy error code (unless the
 * CPU pushes one for that vector) and the vector number, then jumps to
 * isr_common, which saves all general registers and calls
 *     void isr_dispatch(struct isr_frame *f);
 * The frame layout is struct isr_frame in idt.h.
 */
        .text
        .code64
        .align 16
        .globl isr_stubs
isr_stubs:
        .set vec, 0
        .rept 256
        .align 16
        /* vectors with a CPU-pushed error code: #DF #TS #NP #SS #GP #PF #AC #CP #VC #SX */
        .if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
        .else
        pushq   $0
        .endif
        pushq   $vec
        jmp     isr_common
        .set vec, vec + 1
        .endr
        .align 16
        .globl isr_stubs_end
isr_stubs_end:                      /* idt_init() checks isr_stubs_end - isr_stubs == 4096 */

isr_common:
        pushq   %r15
        pushq   %r14
        pushq   %r13
        pushq   %r12
        pushq   %r11
        pushq   %r10
        pushq   %r9
        pushq   %r8
        pushq   %rbp
        pushq   %rdi
        pushq   %rsi
        pushq   %rdx
        pushq   %rcx
        pushq   %rbx
        pushq   %rax
        mov     %rsp, %rdi          /* RSP is 16-byte aligned here (CPU aligns on entry) */
        cld
        call    isr_dispatch
        popq    %rax
        popq    %rbx
        popq    %rcx
        popq    %rdx
        popq    %rsi
        popq    %rdi
        popq    %rbp
        popq    %r8
        popq    %r9
        popq    %r10
        popq    %r11
        popq    %r12
        popq    %r13
        popq    %r14
        popq    %r15
        add     $16, %rsp           /* vector, error code */
        iretq
