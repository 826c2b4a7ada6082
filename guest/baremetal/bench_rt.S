/* bench_rt.S - the little runtime of the benchmark kernels (benchloop.S, benchpoll.S).
 *
 * The benchmark kernels run unchanged on `qemu-system-x86_64 -kernel` and on
 * `vmk boot`: boot.S takes them to long mode and calls kmain(magic, mbi).
 * Everything here is 64-bit code, System V calling convention (clobbers the
 * caller-saved registers only):
 *
 *   uart_init()                 COM1 at 115200 baud, 8N1, FIFO on, no interrupts
 *   uart_putc(dil)              poll LSR.THRE (bit 5), then write THR
 *   uart_puts(rdi = string)     NUL-terminated
 *   uart_putu(rdi = value)      unsigned decimal
 *   set_gate(edi = vector, rsi = handler)   64-bit interrupt gate, DPL 0
 *   idt_load()                  lidt the 256-entry table set_gate fills
 *   cmdline_number(rdi = mbi, rsi = default) -> rax: the decimal number after
 *                               the last 0x3d of the multiboot command line
 *                               (QEMU puts the kernel's file name first)
 *   debug_exit(dil = value)     isa-debug-exit (port 0xf4): exit status (value << 1) | 1
 */
        .intel_syntax noprefix
        .code64
        .text

#define COM1      0x3f8
#define LSR_THRE  0x20

        .globl uart_init
uart_init:
        mov     dx, COM1 + 1            /* IER: no interrupts */
        xor     eax, eax
        out     dx, al
        mov     dx, COM1 + 3            /* LCR: DLAB */
        mov     al, 0x80
        out     dx, al
        mov     dx, COM1 + 0            /* DLL = 1: 115200 baud */
        mov     al, 1
        out     dx, al
        mov     dx, COM1 + 1            /* DLM = 0 */
        xor     eax, eax
        out     dx, al
        mov     dx, COM1 + 3            /* LCR: 8N1, DLAB off */
        mov     al, 0x03
        out     dx, al
        mov     dx, COM1 + 2            /* FCR: FIFOs on and cleared */
        mov     al, 0x07
        out     dx, al
        mov     dx, COM1 + 4            /* MCR: DTR, RTS (OUT2 off: no IRQ) */
        mov     al, 0x03
        out     dx, al
        ret

        .globl uart_putc
uart_putc:
        mov     dx, COM1 + 5
1:      in      al, dx                  /* LSR */
        test    al, LSR_THRE
        jz      1b
        mov     dx, COM1
        mov     eax, edi
        out     dx, al
        ret

        .globl uart_puts
uart_puts:
        push    rbx
        mov     rbx, rdi
1:      movzx   edi, byte ptr [rbx]
        test    edi, edi
        jz      2f
        call    uart_putc
        inc     rbx
        jmp     1b
2:      pop     rbx
        ret

        .globl uart_putu
uart_putu:
        push    rbx
        sub     rsp, 32                 /* digits, right to left */
        lea     rbx, [rsp + 31]
        mov     byte ptr [rbx], 0
        mov     rax, rdi
        mov     ecx, 10
1:      xor     edx, edx
        div     rcx
        add     dl, 0x30
        dec     rbx
        mov     [rbx], dl
        test    rax, rax
        jnz     1b
        mov     rdi, rbx
        call    uart_puts
        add     rsp, 32
        pop     rbx
        ret

        .globl set_gate
set_gate:
        mov     eax, edi
        shl     eax, 4
        lea     rcx, [rip + idt]
        add     rcx, rax
        mov     rax, rsi
        mov     word ptr [rcx], ax              /* offset 15:0 */
        mov     word ptr [rcx + 2], 0x08        /* boot.S's 64-bit code segment */
        mov     word ptr [rcx + 4], 0x8e00      /* present, DPL 0, interrupt gate */
        shr     rax, 16
        mov     word ptr [rcx + 6], ax          /* offset 31:16 */
        shr     rax, 16
        mov     dword ptr [rcx + 8], eax        /* offset 63:32 */
        mov     dword ptr [rcx + 12], 0
        ret

        .globl idt_load
idt_load:
        lidt    [rip + idt_ptr]
        ret

        .globl cmdline_number
cmdline_number:
        mov     rax, rsi
        test    byte ptr [rdi], 4               /* flags bit 2: cmdline present */
        jz      4f
        mov     edi, dword ptr [rdi + 16]
        xor     ecx, ecx                        /* after the last 0x3d so far */
1:      movzx   edx, byte ptr [rdi]
        test    edx, edx
        jz      2f
        inc     rdi
        cmp     edx, 0x3d
        jne     1b
        mov     rcx, rdi
        jmp     1b
2:      test    rcx, rcx
        jz      4f
        xor     r8d, r8d                        /* the number: digits until the first non-digit */
        mov     r9, rcx
3:      movzx   edx, byte ptr [rcx]
        sub     edx, 0x30
        cmp     edx, 9
        ja      5f
        imul    r8, r8, 10
        add     r8, rdx
        inc     rcx
        jmp     3b
5:      cmp     rcx, r9                         /* no digits: the default */
        je      4f
        mov     rax, r8
4:      ret

        .globl debug_exit
debug_exit:
        mov     eax, edi
        out     0xf4, al
1:      cli
        hlt
        jmp     1b

        .section .data
        .align 16
idt_ptr:
        .word   256 * 16 - 1
        .quad   idt

        .section .bss
        .align 4096
idt:    .skip   256 * 16
