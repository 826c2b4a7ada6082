/* benchloop.S - the compute benchmark kernel of `vmk bench` (tools/bench.py, row compute-qemu).
 *
 * An ALU loop of five instructions (tools/bench.py's LOOP with `inc rbx; jmp`
 * turned into `dec rbx; jnz`, so that it ends) runs ITERS times while the
 * LAPIC timer interrupts it at 1 kHz (periodic, divide by 1, initial count
 * 1,000,000: the LAPIC timer counts at 1 GHz on vmk and on QEMU), then the
 * kernel exits through isa-debug-exit with status 33.  ITERS is the number
 * after the last 0x3d of the multiboot command line (`--append iters=N`,
 * QEMU `-append iters=N`), 10,000,000 without one.
 *
 * Serial output (COM1, polled), the same on every PC:
 *     benchloop: N iterations
 *     benchloop: done, timer ok
 * ("timer silent" instead of "timer ok" when no interrupt came).  The number
 * of timer interrupts is written in decimal to the 0xE9 debug console.
 */
        .intel_syntax noprefix
        .code64
        .text

#define LAPIC       0xfee00000
#define TIMER_VEC   0x40
#define SPURIOUS    0xff

        .globl kmain
kmain:
        mov     rdi, rsi                        /* the multiboot info */
        mov     esi, 10000000
        call    cmdline_number
        mov     [rip + iters], rax

        call    uart_init
        lea     rdi, [rip + msg_start]
        call    uart_puts
        mov     rdi, [rip + iters]
        call    uart_putu
        lea     rdi, [rip + msg_iters]
        call    uart_puts

        mov     edi, TIMER_VEC
        lea     rsi, [rip + timer_isr]
        call    set_gate
        mov     edi, SPURIOUS
        lea     rsi, [rip + spurious_isr]
        call    set_gate
        call    idt_load

        mov     al, 0xff                        /* 8259s masked: the LAPIC timer only */
        out     0x21, al
        out     0xa1, al
        mov     rbx, LAPIC
        mov     dword ptr [rbx + 0xf0], 0x100 | SPURIOUS        /* SVR: enabled */
        mov     dword ptr [rbx + 0x3e0], 0xb                    /* divide by 1 */
        mov     dword ptr [rbx + 0x320], 0x20000 | TIMER_VEC    /* periodic */
        mov     dword ptr [rbx + 0x380], 1000000                /* 1 ms at 1 GHz */

        xor     eax, eax
        xor     ecx, ecx
        xor     edx, edx
        mov     rbx, [rip + iters]
        sti
        .globl bench_loop
bench_loop:
        add     rax, rbx
        imul    rcx, rax
        xor     rdx, rcx
        dec     rbx
        jnz     bench_loop
        .globl bench_loop_end
bench_loop_end:
        cli
        mov     rbx, LAPIC
        mov     dword ptr [rbx + 0x320], 0x10000 | TIMER_VEC    /* masked */

        mov     rdi, [rip + ticks]              /* the tick count, for humans: debug console */
        call    debugcon_putu
        lea     rdi, [rip + msg_ok]
        cmp     qword ptr [rip + ticks], 0
        jne     1f
        lea     rdi, [rip + msg_silent]
1:      call    uart_puts
        mov     edi, 0x10
        call    debug_exit

timer_isr:
        push    rax
        inc     qword ptr [rip + ticks]
        mov     rax, LAPIC
        mov     dword ptr [rax + 0xb0], 0       /* EOI */
        pop     rax
        iretq

spurious_isr:
        iretq

/* rdi: value -> decimal digits and a newline on port 0xE9 */
debugcon_putu:
        sub     rsp, 32
        lea     rsi, [rsp + 31]
        mov     byte ptr [rsi], 10
        mov     rax, rdi
        mov     ecx, 10
1:      xor     edx, edx
        div     rcx
        add     dl, 0x30
        dec     rsi
        mov     [rsi], dl
        test    rax, rax
        jnz     1b
2:      mov     al, [rsi]
        out     0xe9, al
        inc     rsi
        cmp     al, 10
        jne     2b
        add     rsp, 32
        ret

        .section .rodata
msg_start:  .asciz "benchloop: "
msg_iters:  .asciz " iterations\n"
msg_ok:     .asciz "benchloop: done, timer ok\n"
msg_silent: .asciz "benchloop: done, timer silent\n"

        .section .data
        .align 8
iters:  .quad 0
ticks:  .quad 0
