/* benchpoll.S - the polled-I/O benchmark kernel of `vmk bench` (tools/bench.py, row poll-qemu).
 *
 * What a small kernel written against QEMU does: it prints 300 bytes on COM1
 * (115200 baud, 8N1), polling LSR.THRE (bit 5) before each THR write, then
 * programs the PIT at 100 Hz (IRQ 0 through the 8259 pair, vector 0x20),
 * waits for 10 ticks with `sti; hlt`, prints one more line and exits through
 * isa-debug-exit with status 33.  The serial output is the same on every PC.
 */
        .intel_syntax noprefix
        .code64
        .text

#define PIT_HZ      1193182
#define TICKS       10

        .globl kmain
kmain:
        call    uart_init
        lea     rdi, [rip + text]
        call    uart_puts

        mov     edi, 0x20
        lea     rsi, [rip + pit_isr]
        call    set_gate
        mov     edi, 0x27                       /* spurious IRQ 7 */
        lea     rsi, [rip + spurious_isr]
        call    set_gate
        call    idt_load

        mov     al, 0x11                        /* 8259s: ICW1..4, vectors 0x20 and 0x28 */
        out     0x20, al
        out     0xa0, al
        mov     al, 0x20
        out     0x21, al
        mov     al, 0x28
        out     0xa1, al
        mov     al, 0x04
        out     0x21, al
        mov     al, 0x02
        out     0xa1, al
        mov     al, 0x01
        out     0x21, al
        out     0xa1, al
        mov     al, 0xfe                        /* IRQ 0 only */
        out     0x21, al
        mov     al, 0xff
        out     0xa1, al

        mov     al, 0x34                        /* PIT channel 0, lo/hi byte, mode 2 */
        out     0x43, al
        mov     ax, (PIT_HZ + 50) / 100         /* 100 Hz */
        out     0x40, al
        mov     al, ah
        out     0x40, al

1:      sti
        hlt
        cmp     qword ptr [rip + ticks], TICKS
        jb      1b
        cli
        mov     al, 0xff
        out     0x21, al

        lea     rdi, [rip + msg_done]
        call    uart_puts
        mov     edi, 0x10
        call    debug_exit

pit_isr:
        push    rax
        inc     qword ptr [rip + ticks]
        mov     al, 0x20                        /* EOI */
        out     0x20, al
        pop     rax
        iretq

spurious_isr:
        iretq

        .section .rodata
text:
        .ascii "benchpoll: 300 bytes polled out on COM1, line 1 of 5 ......\n"
        .ascii "benchpoll: 300 bytes polled out on COM1, line 2 of 5 ......\n"
        .ascii "benchpoll: 300 bytes polled out on COM1, line 3 of 5 ......\n"
        .ascii "benchpoll: 300 bytes polled out on COM1, line 4 of 5 ......\n"
        .ascii "benchpoll: 300 bytes polled out on COM1, line 5 of 5 ......\n"
text_end:
        .byte 0
        .if text_end - text - 300
        .error "the text must be 300 bytes"
        .endif
msg_done:   .asciz "benchpoll: 10 timer ticks\n"

        .section .data
        .align 8
ticks:  .quad 0
