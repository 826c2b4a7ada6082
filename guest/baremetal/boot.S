/* boot.S - multiboot (v1) entry: 32-bit protected mode -> 64-bit long mode.
 *
 * Entered as a multiboot loader (QEMU -kernel, GRUB, vmk) leaves the CPU:
 * 32-bit protected mode, paging off, flat CS/DS/ES/SS, IF=0,
 * EAX = 0x2BADB002, EBX = physical address of the multiboot info.
 * No stack, GDT or IDT may be assumed.
 *
 * We zero .bss, identity-map the first 4 GiB with 2 MiB pages (3-4 GiB, where
 * the LAPIC/IO-APIC MMIO lives, uncached), enable PAE + EFER.LME + PG, load a
 * 64-bit GDT and far-jump to 64-bit code, which calls
 *     void kmain(uint32_t magic, uint32_t mbi);
 */

#define MB_MAGIC  0x1BADB002
#define MB_FLAGS  0x00000003          /* bit 0: page-align modules, bit 1: memory info */

#define PTE_P     0x001
#define PTE_RW    0x002
#define PTE_PWT   0x008
#define PTE_PCD   0x010
#define PTE_PS    0x080

#define CR0_PE    0x00000001
#define CR0_PG    0x80000000
#define CR4_PAE   0x00000020
#define MSR_EFER  0xC0000080
#define EFER_LME  0x00000100

#define KERNEL_CS 0x08
#define KERNEL_DS 0x10

/* ---- multiboot header: must be 4-aligned, in the first 8 KiB of the file ---- */
        .section .multiboot, "a"
        .align 4
multiboot_header:
        .long MB_MAGIC
        .long MB_FLAGS
        .long -(MB_MAGIC + MB_FLAGS)

/* ---- 32-bit entry ---- */
        .section .text.boot, "ax"
        .code32
        .globl _start
_start:
        cli
        cld
        mov     %eax, %ebp                  /* multiboot magic */
        mov     %ebx, %esi                  /* multiboot info */

        /* zero .bss (page tables and stack live there) */
        mov     $__bss_start, %edi
        mov     $__bss_end, %ecx
        sub     %edi, %ecx
        shr     $2, %ecx
        xor     %eax, %eax
        rep stosl

        mov     %ebp, boot_magic
        mov     %esi, boot_mbi
        mov     $boot_stack_top, %esp

        /* long mode available? (CPUID 0x80000001 EDX bit 29) */
        mov     $0x80000000, %eax
        cpuid
        cmp     $0x80000001, %eax
        jb      no_long_mode
        mov     $0x80000001, %eax
        cpuid
        bt      $29, %edx
        jnc     no_long_mode

        /* PML4[0] -> PDPT; PDPT[0..3] -> PD0..PD3 */
        mov     $pdpt, %eax
        or      $(PTE_P | PTE_RW), %eax
        mov     %eax, pml4
        mov     $pd, %eax
        or      $(PTE_P | PTE_RW), %eax
        xor     %ecx, %ecx
1:      mov     %eax, pdpt(,%ecx,8)
        add     $4096, %eax
        inc     %ecx
        cmp     $4, %ecx
        jb      1b

        /* 2048 PD entries, 2 MiB each: identity map 0..4 GiB.
           Entries 1536..2047 (3..4 GiB: PCI/MMIO hole, IO-APIC, LAPIC) uncached. */
        xor     %ecx, %ecx
2:      mov     %ecx, %eax
        shl     $21, %eax
        or      $(PTE_P | PTE_RW | PTE_PS), %eax
        cmp     $1536, %ecx
        jb      3f
        or      $(PTE_PCD | PTE_PWT), %eax
3:      mov     %eax, pd(,%ecx,8)           /* high dword stays 0 (bss) */
        inc     %ecx
        cmp     $2048, %ecx
        jb      2b

        /* CR4.PAE, CR3, EFER.LME, CR0.PG -> long mode (compatibility) */
        mov     %cr4, %eax
        or      $CR4_PAE, %eax
        mov     %eax, %cr4
        mov     $pml4, %eax
        mov     %eax, %cr3
        mov     $MSR_EFER, %ecx
        rdmsr
        or      $EFER_LME, %eax
        wrmsr
        mov     %cr0, %eax
        or      $(CR0_PG | CR0_PE), %eax
        mov     %eax, %cr0

        lgdt    gdt64_ptr
        ljmp    $KERNEL_CS, $long_mode_entry

no_long_mode:
        mov     $no_lm_msg, %esi
4:      lodsb
        test    %al, %al
        jz      5f
        mov     $0xE9, %dx                  /* debug console */
        outb    %al, %dx
        mov     $0x3F8, %dx                 /* COM1, unconfigured but usually works */
        outb    %al, %dx
        jmp     4b
5:      mov     $0x7E, %al                  /* isa-debug-exit: status 0xFD */
        outb    %al, $0xF4
6:      hlt
        jmp     6b

/* ---- 64-bit entry ---- */
        .code64
long_mode_entry:
        mov     $KERNEL_DS, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     %ax, %fs
        mov     %ax, %gs
        mov     $boot_stack_top, %rsp
        xor     %ebp, %ebp
        mov     boot_magic(%rip), %edi
        mov     boot_mbi(%rip), %esi
        call    kmain
7:      cli
        hlt
        jmp     7b

/* ---- data ---- */
        .section .rodata
no_lm_msg:
        .asciz  "vmk guest: CPU has no long mode\n"

        .section .data
        .align 16
gdt64:
        .quad   0x0000000000000000          /* 0x00 null */
        .quad   0x00AF9A000000FFFF          /* 0x08 64-bit code, DPL 0 */
        .quad   0x00CF92000000FFFF          /* 0x10 data, DPL 0 */
gdt64_end:
        .align 16
        .globl gdt64_ptr
gdt64_ptr:
        .word   gdt64_end - gdt64 - 1
        .quad   gdt64                       /* lgdt in 32-bit mode reads 4 bytes */

        .globl boot_magic, boot_mbi
        .align 4
boot_magic:     .long 0
boot_mbi:       .long 0

        .section .bss
        .align 4096
        .globl pml4, pdpt, pd
pml4:   .skip 4096
pdpt:   .skip 4096
pd:     .skip 4 * 4096
        .align 16
boot_stack:
        .skip 32768
        .globl boot_stack_top
boot_stack_top:
