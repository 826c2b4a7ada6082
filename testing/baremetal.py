"""A ready-made 64-bit bare-metal runtime for assembly tests.

``install_runtime(harness)`` writes, below 1 MiB, what a small kernel would
set up before its first interrupt: a GDT with ring-0 and ring-3 segments and a
64-bit TSS, an IDT whose 256 gates lead to stubs that record every event in a
log, and page tables that let ring 3 run anywhere in the first 4 GiB.  Tests
then write a few lines of assembly and read the log with :func:`events`.

Layout:  GDT 0x1000, TSS 0x2000, IDT 0x3000, stubs 0x4000 (16 bytes each),
common handler 0x5000, control block 0x6000, event log 0x20000.
Selectors: kernel code 0x08, kernel data 0x10, user data 0x1B, user code 0x23,
TSS 0x28.  Stacks: kernel 0x80000, TSS.RSP0 0x90000, TSS.IST1 0x98000,
user 0x70000.

What the common handler does:
* logs (vector, error code, RIP, CS, RFLAGS, RSP, SS, CR2, frame address,
  TSC = virtual ns at entry);
* vectors >= 32: EOI as the control block says (LAPIC, PIC, both) and return;
* traps #DB/#BP/#OF: return to the next instruction;
* faults: resume at ``ctl.resume`` if it is set (and clear it), else stop the
  CPU with ``cli; hlt``.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from vmk.machine.cpu import ERROR_CODE_VECTORS, HF, Reg, Seg

from .harness import Harness, assemble

__all__ = ["install_runtime", "events", "Event", "CTL", "LOG", "SEL", "EOI_LAPIC", "EOI_PIC",
           "USER_STACK", "RSP0", "IST1", "KSTACK"]

GDT_BASE = 0x1000
TSS_BASE = 0x2000
IDT_BASE = 0x3000
STUBS = 0x4000
COMMON = 0x5000
CTL = 0x6000          # +0 count, +8 resume RIP, +16 EOI policy
LOG = 0x20000
ENTRY = 80            # bytes per log entry
RSP0 = 0x90000
IST1 = 0x98000
KSTACK = 0x80000
USER_STACK = 0x70000
EOI_LAPIC = 1
EOI_PIC = 2
EOI_PIC_SLAVE = 4


class SEL:
    KCODE = 0x08
    KDATA = 0x10
    UDATA = 0x1B
    UCODE = 0x23
    TSS = 0x28


@dataclass(slots=True, frozen=True)
class Event:
    vector: int
    error_code: int
    rip: int
    cs: int
    rflags: int
    rsp: int
    ss: int
    cr2: int
    frame: int           # where the CPU put the frame (the handler's RSP after the pushes)
    tsc: int             # rdtsc in the handler: virtual ns (the TSC runs at 1 GHz = 1 tick per ns)


_COMMON_ASM = f"""
    push rax
    push rbx
    push rcx
    push rdx
    mov rbx, {CTL}
    mov rax, [rbx]
    mov rcx, rax
    imul rcx, rcx, {ENTRY}
    add rcx, {LOG}
    mov rdx, [rsp+32]
    mov [rcx], rdx
    mov rdx, [rsp+40]
    mov [rcx+8], rdx
    mov rdx, [rsp+48]
    mov [rcx+16], rdx
    mov rdx, [rsp+56]
    mov [rcx+24], rdx
    mov rdx, [rsp+64]
    mov [rcx+32], rdx
    mov rdx, [rsp+72]
    mov [rcx+40], rdx
    mov rdx, [rsp+80]
    mov [rcx+48], rdx
    mov rdx, cr2
    mov [rcx+56], rdx
    lea rdx, [rsp+48]
    mov [rcx+64], rdx
    push rax
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov [rcx+72], rax
    pop rax
    inc rax
    mov [rbx], rax
    mov rdx, [rsp+32]
    cmp rdx, 32
    jb exc
    mov rax, [rbx+16]
    test rax, {EOI_LAPIC}
    jz no_lapic
    mov rcx, 0xfee000b0
    mov dword ptr [rcx], 0
no_lapic:
    test rax, {EOI_PIC_SLAVE}
    jz no_slave
    mov al, 0x20
    out 0xa0, al
    mov al, 0x20
    out 0x20, al
    jmp out
no_slave:
    test rax, {EOI_PIC}
    jz out
    mov al, 0x20
    out 0x20, al
    jmp out
exc:
    cmp rdx, 1
    je out
    cmp rdx, 3
    je out
    cmp rdx, 4
    je out
    mov rax, [rbx+8]
    test rax, rax
    jz dead
    mov qword ptr [rbx+8], 0
    mov [rsp+48], rax
    jmp out
dead:
    cli
    hlt
    jmp dead
out:
    pop rdx
    pop rcx
    pop rbx
    pop rax
    add rsp, 16
    iretq
"""


def install_runtime(h: Harness, user_pages: bool = True, eoi: int = EOI_LAPIC) -> None:
    """Write GDT/TSS/IDT/handlers into the harness's machine and load them."""
    m = h.machine
    cpu = m.cpu
    tss = bytearray(104)
    struct.pack_into("<Q", tss, 4, RSP0)
    struct.pack_into("<Q", tss, 36, IST1)
    struct.pack_into("<H", tss, 102, 104)          # I/O map base beyond the limit: no bitmap
    m.write_physical(TSS_BASE, bytes(tss))
    tss_lo = (103 & 0xFFFF) | ((TSS_BASE & 0xFFFF) << 16)
    tss_hi = ((TSS_BASE >> 16) & 0xFF) | (0x89 << 8) | (TSS_BASE & 0xFF00_0000)
    gdt = [0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF, 0x00CFF2000000FFFF, 0x00AFFA000000FFFF,
           tss_lo | (tss_hi << 32), TSS_BASE >> 32]
    m.write_physical(GDT_BASE, struct.pack(f"<{len(gdt)}Q", *gdt))
    for v in range(256):
        addr = STUBS + 16 * v
        src = (f"push {v}; jmp {COMMON}" if v in ERROR_CODE_VECTORS else f"push 0; push {v}; jmp {COMMON}")
        code = assemble(src, addr)
        assert len(code) <= 16, (v, len(code))
        m.write_physical(addr, code)
        gate = struct.pack("<HHBBHII", addr & 0xFFFF, SEL.KCODE, 0, 0xEE if v in (3, 4) or v >= 0x80 else 0x8E,
                           (addr >> 16) & 0xFFFF, addr >> 32, 0)
        m.write_physical(IDT_BASE + 16 * v, gate)
    m.write_physical(COMMON, assemble(_COMMON_ASM, COMMON))
    m.write_physical(CTL, struct.pack("<QQQ", 0, 0, eoi))
    if user_pages:
        # Set U/S on the identity map written by enter_long_mode (PML4, PDPT, PDs).
        from vmk.boot.loader import PML4_ADDR
        for table, count in ((PML4_ADDR, 1), (PML4_ADDR + 0x1000, 4), (PML4_ADDR + 0x2000, 2048)):
            raw = bytearray(m.read_physical(table, 8 * count))
            for i in range(count):
                e = struct.unpack_from("<Q", raw, 8 * i)[0]
                struct.pack_into("<Q", raw, 8 * i, e | 0x4)
            m.write_physical(table, bytes(raw))
        cpu.flush_tlb()
    uc = cpu.uc
    uc.reg_write(Reg.GDTR, (0, GDT_BASE, 8 * len(gdt) - 1, 0))
    uc.reg_write(Reg.IDTR, (0, IDT_BASE, 256 * 16 - 1, 0))
    uc.reg_write(Reg.TR, (SEL.TSS, TSS_BASE, 103, 0x8900))
    cpu.set_hidden_state(cpl=0, segs={
        Seg.CS: (SEL.KCODE, 0, 0xFFFF_FFFF, 0x00AF9B00),
        Seg.SS: (SEL.KDATA, 0, 0xFFFF_FFFF, 0x00CF9300),
        Seg.DS: (SEL.KDATA, 0, 0xFFFF_FFFF, 0x00CF9300),
        Seg.ES: (SEL.KDATA, 0, 0xFFFF_FFFF, 0x00CF9300),
    }, hflags_set=HF.CS64 | HF.LMA)
    uc.reg_write(Reg.RSP, KSTACK)


def events(h: Harness) -> list[Event]:
    """Everything the runtime's handler has logged, in order."""
    m = h.machine
    n = struct.unpack("<Q", m.read_physical(CTL, 8))[0]
    raw = m.read_physical(LOG, n * ENTRY)
    return [Event(*struct.unpack_from("<10Q", raw, i * ENTRY)) for i in range(n)]
