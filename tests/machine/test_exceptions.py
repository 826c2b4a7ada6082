"""Exceptions and interrupts through the guest IDT (machine/x86.py, machine/pc.py), exactly.

Small assembly guests run with the bare-metal runtime (``vmk.testing.baremetal``),
whose handler logs every delivery: vector, error code, the pushed RIP/CS/RFLAGS/
RSP/SS, CR2, where the frame is (the address of the pushed RIP) and the TSC at
entry.  Expected values come from the SDM (vol. 3, chapter 6): faults push the
faulting RIP, traps and INT n the next one; 64-bit mode always pushes SS:RSP and
aligns the new RSP to 16; a privilege change switches to TSS.RSP0, a gate with an
IST index to TSS.ISTn; the double-fault table decides what a fault during delivery
becomes.

Interrupt timing: the guest starts at t = 0 and the k-th instruction ends at t = k;
an interrupt pending at a boundary where it may be taken is delivered there in
zero time, and the runtime's ``rdtsc`` runs ``RUNTIME_TSC`` instructions later.

The tests under "bugs fixed" at the end pin bugs this suite found (no xfail is left).
"""
from __future__ import annotations

import re
import struct

import pytest
from vmk.boot.loader import PML4_ADDR
from vmk.machine.pc import Why
from vmk.testing import Harness, assemble
from vmk.testing import baremetal as bm
from vmk.testing.baremetal import events, install_runtime

ORG = 0x100000
LIMIT = 100_000                    # virtual ns for run_to_end: a broken guest fails fast
LAPIC_MMIO = 0xFEE0_0000
LAPIC_LVT_LINT0, LAPIC_SVR, LAPIC_ICR_LO = 0x350, 0xF0, 0x300
LAPIC_LVT_TIMER, LAPIC_INITIAL, LAPIC_DIVIDE = 0x320, 0x380, 0x3E0
LVT_MASKED = 1 << 16
SVR_ENABLED = 0x1FF
DIVIDE_BY_1 = 0b1011
ICR_SELF = 1 << 18                 # destination shorthand "self", fixed delivery (SDM §11.6.1)

GATE_INT, GATE_TRAP = 0xE, 0xF
RF_IF = 0x200
RFLAGS_FIXED = 0x2

KHANDLER = 0x120000                # extra ring-0 code written by the tests
REC = 0x7000                       # where guest code records values
PD_1G = PML4_ADDR + 0x3000         # page directory of 1 GiB..2 GiB (enter_long_mode's PDPT[1])
VIRT = 0x4000_0000
PAGE_2M = 0x20_0000
PDE_P, PDE_W, PDE_U, PDE_PS = 0x1, 0x2, 0x4, 0x80

_LABEL = re.compile(r"^[A-Za-z_.][\w.]*:\s*")


# -- helpers ---------------------------------------------------------------------------------------------------

def count_insns(src: str) -> int:
    """Instruction statements in straight-line assembly (labels and blank lines excluded)."""
    return sum(1 for stmt in re.split(r"[;\n]", src) if _LABEL.sub("", stmt.strip()).strip())


def _runtime_tsc() -> int:
    """Instructions from delivery to the runtime's rdtsc, inclusive (vector without error code)."""
    common = bm._COMMON_ASM
    return count_insns("push 0; push 32; jmp 0x5000") + count_insns(common[:common.index("rdtsc")]) + 1


RUNTIME_TSC = _runtime_tsc()


def machine(src: str, **kw) -> Harness:
    """``src`` at 0x100000 with the bare-metal runtime; LAPIC LINT0 masked (at reset
    the PIT's OUT is high and the PIC would present vector 0 as soon as IF=1)."""
    h = Harness.from_asm(src, **kw)
    install_runtime(h)
    h.machine.lapic.write(LAPIC_LVT_LINT0, 4, LVT_MASKED)
    return h


def after(h: Harness, insn: str) -> int:
    """Address of the instruction following the unique ``insn``."""
    return h.addr_of(insn) + len(assemble(insn, 0))


def set_gate(h: Harness, vector: int, handler: int | None = None, *, gate_type: int = GATE_INT,
             dpl: int = 0, ist: int = 0, present: bool = True) -> None:
    """Rewrite IDT gate ``vector`` (default handler: the runtime's stub)."""
    if handler is None:
        handler = bm.STUBS + 16 * vector
    attr = (0x80 if present else 0) | (dpl << 5) | gate_type
    gate = struct.pack("<HHBBHII", handler & 0xFFFF, bm.SEL.KCODE, ist, attr, (handler >> 16) & 0xFFFF,
                       handler >> 32, 0)
    h.machine.write_physical(bm.IDT_BASE + 16 * vector, gate)


def put_code(h: Harness, addr: int, src: str) -> None:
    h.machine.write_physical(addr, assemble(src, addr))


def resume_at(label: str) -> str:
    return f"mov rbx, {bm.CTL + 8:#x}\nlea rax, [rip+{label}]\nmov [rbx], rax"


def to_ring3(label: str, rflags: int = RFLAGS_FIXED, rsp: int = bm.USER_STACK) -> str:
    return (f"push {bm.SEL.UDATA:#x}\npush {rsp:#x}\npush {rflags:#x}\npush {bm.SEL.UCODE:#x}\n"
            f"lea rax, [rip+{label}]\npush rax\niretq")


def lapic(reg: int, value: int) -> str:
    return f"mov rsi, {LAPIC_MMIO + reg:#x}\nmov dword ptr [rsi], {value:#x}"


def u64(h: Harness, addr: int) -> int:
    return struct.unpack("<Q", h.machine.read_physical(addr, 8))[0]


def rec(h: Harness, index: int) -> int:
    return u64(h, REC + 8 * index)


def frame_words(h: Harness, frame: int) -> tuple[int, int, int, int, int]:
    """RIP, CS, RFLAGS, RSP, SS as pushed at ``frame`` (the address of the pushed RIP)."""
    return struct.unpack("<5Q", h.machine.read_physical(frame, 40))


def one_event(h: Harness) -> bm.Event:
    ev = events(h)
    assert len(ev) == 1, ev
    return ev[0]


# -- frames and error codes from ring 0 -----------------------------------------------------------------------

def test_de_from_ring0_frame_on_the_current_stack() -> None:
    h = machine("xor edx, edx\nxor ecx, ecx\ndiv ecx\nnop")
    assert h.run_to_end(LIMIT).why == Why.DEAD           # runtime: unresumed fault -> cli; hlt
    e = one_event(h)
    flags = RFLAGS_FIXED | 0x44                     # after `xor ecx, ecx`: ZF, PF
    assert (e.vector, e.rip, e.cs, e.rflags, e.rsp, e.ss) == \
        (0, h.addr_of("div ecx"), bm.SEL.KCODE, flags, bm.KSTACK, bm.SEL.KDATA)
    assert e.frame == bm.KSTACK - 40                # no stack switch, no error code
    assert frame_words(h, e.frame) == (e.rip, bm.SEL.KCODE, flags, bm.KSTACK, bm.SEL.KDATA)


def test_ud_is_a_fault_on_the_instruction() -> None:
    h = machine("nop\nud2\nnop")
    h.run_to_end(LIMIT)
    e = one_event(h)
    assert (e.vector, e.rip, e.frame) == (6, h.addr_of("ud2"), bm.KSTACK - 40)


@pytest.mark.parametrize("selector, code", [(0x58, 0x58), (0x5B, 0x58), (0x5C, 0x5C)])
def test_gp_selector_error_code(selector: int, code: int) -> None:
    """A selector beyond the GDT (or the empty LDT): #GP(selector with RPL cleared)."""
    h = machine(f"mov ax, {selector:#x}\nmov ds, ax\nnop")
    h.run_to_end(LIMIT)
    e = one_event(h)
    assert (e.vector, e.error_code, e.rip) == (13, code, h.addr_of("mov ds, ax"))
    assert e.frame == bm.KSTACK - 40
    assert u64(h, bm.KSTACK - 48) == code             # the CPU pushed it below RIP


def test_gp_non_canonical_address_error_code_zero() -> None:
    h = machine("mov rcx, 0x8000000000000000\nmov rax, [rcx]\nnop")
    h.run_to_end(LIMIT)
    e = one_event(h)
    assert (e.vector, e.error_code, e.rip) == (13, 0, h.addr_of("mov rax, [rcx]"))


def test_ring0_frame_is_16_byte_aligned_and_pushes_the_old_rsp() -> None:
    h = machine("mov rsp, 0x7fff8\nmov ax, 0x58\nmov ds, ax\nnop")
    h.run_to_end(LIMIT)
    e = one_event(h)
    assert e.frame == 0x7FFF0 - 40                    # RSP aligned down to 16 first
    assert (e.rsp, e.ss, e.error_code) == (0x7FFF8, bm.SEL.KDATA, 0x58)
    assert u64(h, 0x7FFF0 - 48) == 0x58


def test_bp_pushes_the_next_rip_and_returns() -> None:
    h = machine("nop\nint3\nmov r8, 1\nhlt")
    assert h.run_to_end(LIMIT).why == Why.DEAD
    e = one_event(h)
    assert (e.vector, e.rip, e.frame) == (3, after(h, "int3"), bm.KSTACK - 40)
    assert h.regs.r8 == 1                             # the handler returned past int3


# -- page faults ---------------------------------------------------------------------------------------------

# 1 GiB + 0: not present | +2 MiB: supervisor read-only | +4 MiB: supervisor RW | +6 MiB: user read-only
PF_PAGES = (0,
            0x40_0000 | PDE_P | PDE_PS,
            0x60_0000 | PDE_P | PDE_W | PDE_PS,
            0x80_0000 | PDE_P | PDE_U | PDE_PS)


def _pf_machine(src: str) -> Harness:
    h = machine(src)
    h.machine.write_physical(PD_1G, struct.pack("<4Q", *PF_PAGES))
    h.machine.cpu.flush_tlb()
    return h


@pytest.mark.parametrize("page, store, code", [
    (0, False, 0),          # read, not present
    (0, True, 2),           # write, not present
    (1, True, 3),           # write to a read-only page (CR0.WP=1)
])
def test_pf_from_ring0(page: int, store: bool, code: int) -> None:
    addr = VIRT + page * PAGE_2M + 0x1238
    access = "mov [rcx], rax" if store else "mov rax, [rcx]"
    h = _pf_machine(f"mov rcx, {addr:#x}\n{access}\nnop")
    h.run_to_end(LIMIT)
    e = one_event(h)
    assert (e.vector, e.error_code, e.cr2, e.rip) == (14, code, addr, h.addr_of(access))
    assert (e.cs, e.ss, e.rsp, e.frame) == (bm.SEL.KCODE, bm.SEL.KDATA, bm.KSTACK, bm.KSTACK - 40)
    assert u64(h, bm.KSTACK - 48) == code


@pytest.mark.parametrize("page, store, code", [
    (0, False, 4),          # user read, not present
    (0, True, 6),           # user write, not present
    (2, False, 5),          # user read of a supervisor page
    (3, True, 7),           # user write to a user read-only page
    (2, True, 7),           # user write to a supervisor page
])
def test_pf_from_ring3_switches_to_rsp0(page: int, store: bool, code: int) -> None:
    addr = VIRT + page * PAGE_2M + 0x2468
    access = "mov [rcx], rax" if store else "mov rax, [rcx]"
    h = _pf_machine(f"{to_ring3('user', rsp=0x6FFF8)}\nuser:\nmov rcx, {addr:#x}\n{access}\nnop")
    h.run_to_end(LIMIT)
    e = one_event(h)
    assert (e.vector, e.error_code, e.cr2, e.rip) == (14, code, addr, h.addr_of(access))
    assert (e.cs, e.ss, e.rsp) == (bm.SEL.UCODE, bm.SEL.UDATA, 0x6FFF8)
    assert e.frame == bm.RSP0 - 40                     # RSP0 - 48 with the error code
    assert u64(h, bm.RSP0 - 48) == code
    assert u64(h, bm.RSP0 - 8) == bm.SEL.UDATA         # SS is the first word pushed


def test_user_read_of_a_user_page_works() -> None:
    h = _pf_machine(f"{to_ring3('user')}\nuser:\nmov rcx, {VIRT + 3 * PAGE_2M:#x}\nmov r8, [rcx]\nhlt")
    h.machine.write_physical(0x80_0000, struct.pack("<Q", 0xFEED))
    h.run_to_end(LIMIT)
    e = one_event(h)                                   # only the user `hlt`: #GP(0)
    assert (e.vector, e.error_code, e.rip) == (13, 0, h.addr_of("hlt"))
    assert h.regs.r8 == 0xFEED


def test_pf_handler_reads_cr2_after_a_slice_boundary() -> None:
    """Every instruction in its own slice, the handler's `mov rdx, cr2` included."""
    h = _pf_machine(f"mov rcx, {VIRT + 0x1238:#x}\nmov rax, [rcx]\nnop")
    for _ in range(200):
        if h.run(max_instructions=1).why != Why.STOPPED:
            break
    e = one_event(h)
    assert (e.vector, e.error_code, e.cr2) == (14, 0, VIRT + 0x1238)


# -- from ring 3: stack switch ---------------------------------------------------------------------------------

def test_de_from_ring3_switches_to_rsp0_without_error_code() -> None:
    h = machine(f"{to_ring3('user', rflags=RFLAGS_FIXED, rsp=0x6FF00)}\nuser:\nxor ecx, ecx\ndiv ecx")
    h.run_to_end(LIMIT)
    e = one_event(h)
    assert e.frame == bm.RSP0 - 40
    assert frame_words(h, e.frame) == (h.addr_of("div ecx"), bm.SEL.UCODE, RFLAGS_FIXED | 0x44, 0x6FF00,
                                       bm.SEL.UDATA)


def test_gp_from_ring3_frame_with_error_code() -> None:
    h = machine(f"{to_ring3('user')}\nuser:\nnop\nmov rax, cr3")
    h.run_to_end(LIMIT)
    e = one_event(h)
    assert (e.vector, e.error_code, e.rip, e.cs, e.ss, e.rsp) == \
        (13, 0, h.addr_of("mov rax, cr3"), bm.SEL.UCODE, bm.SEL.UDATA, bm.USER_STACK)
    assert e.frame == bm.RSP0 - 40 and u64(h, bm.RSP0 - 48) == 0


def test_bp_from_ring3_through_a_dpl3_gate() -> None:
    h = machine(f"{to_ring3('user')}\nuser:\nint3\nmov r8, 1\nhlt")
    h.run_to_end(LIMIT)
    bp, gp = events(h)
    assert (bp.vector, bp.rip, bp.cs, bp.frame) == (3, after(h, "int3"), bm.SEL.UCODE, bm.RSP0 - 40)
    assert (gp.vector, gp.rip) == (13, h.addr_of("hlt"))
    assert h.regs.r8 == 1


# -- IST ------------------------------------------------------------------------------------------------------

def test_ist_gate_switches_stack_in_ring0() -> None:
    h = machine("xor ecx, ecx\ndiv ecx")
    set_gate(h, 0, ist=1)
    h.run_to_end(LIMIT)
    e = one_event(h)
    assert (e.vector, e.frame, e.rsp, e.cs) == (0, bm.IST1 - 40, bm.KSTACK, bm.SEL.KCODE)


def test_ist_gate_with_error_code_from_ring3() -> None:
    h = machine(f"{to_ring3('user')}\nuser:\ncli")
    set_gate(h, 13, ist=1)
    h.run_to_end(LIMIT)
    e = one_event(h)
    assert (e.vector, e.error_code, e.rip, e.cs, e.rsp) == \
        (13, 0, h.addr_of("cli"), bm.SEL.UCODE, bm.USER_STACK)
    assert e.frame == bm.IST1 - 40 and u64(h, bm.IST1 - 48) == 0     # IST wins over RSP0


# -- software interrupts and gate DPL --------------------------------------------------------------------------

def test_int_from_ring3_through_a_dpl0_gate_is_gp() -> None:
    h = machine(f"{to_ring3('user')}\nuser:\nint 0x40\nnop")
    h.run_to_end(LIMIT)
    e = one_event(h)
    assert (e.vector, e.error_code, e.cs, e.frame) == (13, 0x40 * 8 + 2, bm.SEL.UCODE, bm.RSP0 - 40)
    # the pushed RIP: see test_fault_delivering_int_n_points_at_the_int_instruction


def test_int_0x80_from_ring3_through_a_dpl3_gate() -> None:
    h = machine(f"{to_ring3('user')}\nuser:\nint 0x80\nmov r8, 1\nhlt")
    h.run_to_end(LIMIT)
    sc, gp = events(h)
    assert (sc.vector, sc.rip, sc.cs, sc.ss, sc.rsp, sc.frame) == \
        (0x80, after(h, "int 0x80"), bm.SEL.UCODE, bm.SEL.UDATA, bm.USER_STACK, bm.RSP0 - 40)
    assert (gp.vector, gp.rip) == (13, h.addr_of("hlt"))
    assert h.regs.r8 == 1


def test_hardware_interrupt_ignores_gate_dpl() -> None:
    """Gate DPL is only checked for INT n: a self-IPI to vector 0x40 (DPL 0) from ring 3 is taken."""
    h = machine(f"""
        {lapic(LAPIC_SVR, SVR_ENABLED)}
        {lapic(LAPIC_ICR_LO, ICR_SELF | 0x40)}
        {to_ring3("user", rflags=RFLAGS_FIXED | RF_IF)}
    user:
        inc r8
        hlt
    """)
    h.run_to_end(LIMIT)
    irq, gp = events(h)
    assert (irq.vector, irq.rip, irq.cs, irq.frame) == (0x40, h.addr_of("inc r8"), bm.SEL.UCODE, bm.RSP0 - 40)
    assert (gp.vector, gp.rip) == (13, h.addr_of("hlt"))


@pytest.mark.parametrize("gate_type, if_in_handler", [(GATE_INT, 0), (GATE_TRAP, RF_IF)])
def test_interrupt_gate_clears_if_trap_gate_keeps_it(gate_type: int, if_in_handler: int) -> None:
    h = machine("sti\nint 0x41\ncli\nhlt")
    put_code(h, KHANDLER, "pushfq\npop r12\nmov r13, [rsp+16]\niretq")
    set_gate(h, 0x41, KHANDLER, gate_type=gate_type)
    assert h.run_to_end(LIMIT).why == Why.DEAD
    assert h.regs.r12 & RF_IF == if_in_handler
    assert h.regs.r13 & RF_IF == RF_IF                 # the pushed RFLAGS still has IF


# -- faults during delivery ------------------------------------------------------------------------------------

def test_int_to_a_not_present_gate_is_np_with_the_idt_error_code() -> None:
    h = machine("int 0x41\nnop")
    set_gate(h, 0x41, present=False)
    h.run_to_end(LIMIT)
    e = one_event(h)
    assert (e.vector, e.error_code) == (11, 0x41 * 8 + 2)            # IDT bit, EXT=0


def test_hardware_interrupt_to_a_not_present_gate_sets_ext() -> None:
    h = machine(f"{lapic(LAPIC_SVR, SVR_ENABLED)}\n{lapic(LAPIC_ICR_LO, ICR_SELF | 0x42)}\nsti\nnop\nnop\nnop")
    set_gate(h, 0x42, present=False)
    h.run_to_end(LIMIT)
    e = one_event(h)
    nops = h.addrs_of("nop")
    assert (e.vector, e.error_code, e.rip) == (11, 0x42 * 8 + 2 + 1, nops[1])   # IDT + EXT; after the sti shadow


def test_benign_then_contributory_is_handled_serially() -> None:
    """#UD (benign) with gate 6 not present: the #NP is delivered, no #DF."""
    h = machine("nop\nud2")
    set_gate(h, 6, present=False)
    h.run_to_end(LIMIT)
    e = one_event(h)
    assert (e.vector, e.error_code, e.rip) == (11, 6 * 8 + 2, h.addr_of("ud2"))


def test_gp_while_delivering_gp_is_double_fault() -> None:
    """Gate 13 not present: delivering #GP raises #NP(13*8+2); contributory + contributory = #DF(0)."""
    h = machine("mov ax, 0x58\nmov ds, ax\nnop")
    set_gate(h, 13, present=False)
    assert h.run_to_end(LIMIT).why == Why.DEAD
    e = one_event(h)
    assert (e.vector, e.error_code, e.frame) == (8, 0, bm.KSTACK - 40)
    assert u64(h, bm.KSTACK - 48) == 0
    # (the saved CS:RIP of #DF are architecturally undefined, SDM 6.15: not checked)
    assert h.irq_counts == {8: 1}


def _pf_on_pf_machine() -> Harness:
    """A #PF whose frame push faults too (RSP in a non-present page); #DF has IST1."""
    h = machine(f"mov rsp, {VIRT + 0x1000:#x}\nmov rcx, {VIRT + 0x10_0000:#x}\nmov rax, [rcx]\nnop")
    h.machine.write_physical(PD_1G, struct.pack("<Q", 0))
    h.machine.cpu.flush_tlb()
    set_gate(h, 8, ist=1)
    return h


def test_pf_while_delivering_pf_is_double_fault() -> None:
    h = _pf_on_pf_machine()
    assert h.run_to_end(LIMIT).why == Why.DEAD
    e = one_event(h)
    assert (e.vector, e.error_code, e.frame, e.rsp, e.ss) == (8, 0, bm.IST1 - 40, VIRT + 0x1000, bm.SEL.KDATA)
    assert h.irq_counts == {8: 1}


def test_fault_while_delivering_df_is_a_triple_fault() -> None:
    """IDT limit 0: #DE -> #GP (IDT limit) -> #DF -> #GP again: shutdown, reported, no exception."""
    h = machine("""
        sub rsp, 16
        mov word ptr [rsp], 0
        mov rax, 0x3000
        mov [rsp+2], rax
        lidt [rsp]
        xor ecx, ecx
        div ecx
        mov r8, 1
    """)
    r = h.run_to_end(LIMIT)
    assert r.why == Why.TRIPLE_FAULT
    assert r.message and "\n" not in r.message and "triple fault" in r.message
    assert f"{h.addr_of('div ecx'):#x}" in r.message
    assert events(h) == [] and h.regs.r8 == 0             # stopped at the fault, nothing delivered
    assert h.regs.rip == h.addr_of("div ecx")


def test_hlt_with_if_clear_is_dead() -> None:
    h = machine("nop\ncli\nhlt\nmov r8, 1")
    r = h.run_to_end(LIMIT)
    assert r.why == Why.DEAD
    assert "\n" not in r.message and f"RIP {h.addr_of('hlt'):#x}" in r.message
    assert h.regs.r8 == 0 and h.now == 3


# -- interrupt timing: IF, STI / MOV SS shadows, POPF -----------------------------------------------------------

PREHOOK = f"""
    push rbx
    mov rbx, {REC:#x}
    mov [rbx], r8
    mov [rbx+8], r9
    pop rbx
"""


def _with_prehook(h: Harness, vector: int) -> int:
    """Vector ``vector`` first records R8/R9 at REC, then runs the runtime's stub.
    Returns the runtime's TSC offset from delivery for this vector."""
    src = PREHOOK + f"\njmp {bm.STUBS + 16 * vector:#x}"
    put_code(h, KHANDLER, src)
    set_gate(h, vector, KHANDLER)
    return count_insns(src) + RUNTIME_TSC


HELD_SRC = f"""
    {lapic(LAPIC_SVR, SVR_ENABLED)}
    {lapic(LAPIC_ICR_LO, ICR_SELF | 0x40)}
    mov ecx, 1000
again:
    dec ecx
    jnz again
    sti
    inc r8
    inc r9
    cli
    hlt
"""
HELD_STI = 4 + 1 + 2 * 1000 + 1          # sti is instruction 2006


def test_interrupt_is_held_while_if_is_clear_then_taken_after_the_sti_shadow() -> None:
    h = machine(HELD_SRC)
    tsc_offset = _with_prehook(h, 0x40)
    r = h.run(max_instructions=HELD_STI - 1)        # up to the sti: IF=0 all along
    assert r.why == Why.STOPPED and events(h) == []
    assert h.machine.lapic.pending()                # requested at t=4, still waiting
    assert h.run_to_end(LIMIT).why == Why.DEAD
    e = one_event(h)
    assert (e.vector, e.rip) == (0x40, h.addr_of("inc r9"))
    assert (rec(h, 0), rec(h, 1)) == (1, 0)          # inc r8 ran in the shadow, inc r9 not yet
    assert e.tsc == HELD_STI + 1 + tsc_offset        # delivered when inc r8 ended
    assert e.rflags & RF_IF
    assert (h.regs.r8, h.regs.r9) == (1, 1)


def test_held_interrupt_is_the_same_in_one_slice() -> None:
    h = machine(HELD_SRC)
    tsc_offset = _with_prehook(h, 0x40)
    h.run_to_end(LIMIT)
    e = one_event(h)
    assert (e.rip, e.tsc) == (h.addr_of("inc r9"), HELD_STI + 1 + tsc_offset)


SHADOW_SRC = """
    mov ax, ss
    sti
    nop
    nop
    nop
    SHADOWED
    inc r8
    inc r9
    cli
    hlt
"""
SHADOW_AT = 6                            # SHADOWED is instruction 6: the interrupt arrives as it ends


@pytest.mark.parametrize("insn, shadow", [("mov ss, ax", True), ("mov bx, ax", False)])
def test_mov_ss_shadow_delays_the_interrupt_by_one_instruction(insn: str, shadow: bool) -> None:
    h = machine(SHADOW_SRC.replace("SHADOWED", insn))
    tsc_offset = _with_prehook(h, 0x40)
    lapic_m = h.machine.lapic                          # the timer, programmed at t=0 from Python
    lapic_m.write(LAPIC_SVR, 4, SVR_ENABLED)
    lapic_m.write(LAPIC_DIVIDE, 4, DIVIDE_BY_1)
    lapic_m.write(LAPIC_LVT_TIMER, 4, 0x40)
    lapic_m.write(LAPIC_INITIAL, 4, SHADOW_AT)
    assert h.run_to_end(LIMIT).why == Why.DEAD
    e = one_event(h)
    if shadow:
        assert (e.rip, rec(h, 0), rec(h, 1)) == (h.addr_of("inc r9"), 1, 0)
        assert e.tsc == SHADOW_AT + 1 + tsc_offset
    else:
        assert (e.rip, rec(h, 0), rec(h, 1)) == (h.addr_of("inc r8"), 0, 0)
        assert e.tsc == SHADOW_AT + tsc_offset


def test_popf_setting_if_delivers_right_after_it() -> None:
    h = machine(f"""
        {lapic(LAPIC_SVR, SVR_ENABLED)}
        {lapic(LAPIC_ICR_LO, ICR_SELF | 0x40)}
        nop
        push {RF_IF | RFLAGS_FIXED:#x}
        popf
        inc r8
        inc r9
        cli
        hlt
    """)
    tsc_offset = _with_prehook(h, 0x40)
    h.run_to_end(LIMIT)
    e = one_event(h)
    assert (e.vector, e.rip, rec(h, 0), rec(h, 1)) == (0x40, h.addr_of("inc r8"), 0, 0)   # no shadow
    assert e.tsc == 4 + 3 + tsc_offset


def test_iretq_setting_if_delivers_at_its_target() -> None:
    h = machine(f"""
        {lapic(LAPIC_SVR, SVR_ENABLED)}
        {lapic(LAPIC_ICR_LO, ICR_SELF | 0x40)}
        mov rax, rsp
        push {bm.SEL.KDATA:#x}
        push rax
        push {RF_IF | RFLAGS_FIXED:#x}
        push {bm.SEL.KCODE:#x}
        lea rax, [rip+target]
        push rax
        iretq
    target:
        inc r8
        cli
        hlt
    """)
    tsc_offset = _with_prehook(h, 0x40)
    h.run_to_end(LIMIT)
    e = one_event(h)
    assert (e.rip, e.rsp, rec(h, 0)) == (h.addr_of("inc r8"), bm.KSTACK, 0)
    assert e.tsc == 4 + 8 + tsc_offset


# -- bugs fixed -----------------------------------------------------------------------------------------------------

def test_cr2_after_pf_while_delivering_pf_is_the_stack_address() -> None:
    h = _pf_on_pf_machine()
    h.run_to_end(LIMIT)
    e = one_event(h)
    assert e.cr2 == VIRT + 0x1000 - 8                      # the first push (SS) faults


@pytest.mark.parametrize("insn, vector", [("int 0x41", 0x41), ("int3", 3), (".byte 0xcd, 0x03", 3),
                                          ("int 0xcc", 0xCC), ("int 0xce", 0xCE)])
@pytest.mark.parametrize("ring3, dpl, present", [(True, 0, True), (False, 0, False)])
def test_fault_delivering_int_n_points_at_the_int_instruction(ring3: bool, dpl: int, present: bool, insn: str,
                                                              vector: int) -> None:
    """INT n that faults (#GP: gate DPL < CPL; #NP: gate not present) is a fault: the
    pushed RIP is the INT's own address (SDM 6.12.1.1), for the one-byte INT3 as for
    INT imm8, whose imm8 may look like INT3 or INTO (0xCC, 0xCE)."""
    body = f"{insn}\nnop"
    h = machine(f"{to_ring3('user')}\nuser:\n{body}" if ring3 else body)
    set_gate(h, vector, dpl=dpl, present=present)
    h.run_to_end(LIMIT)
    e = one_event(h)
    assert e.vector == (13 if ring3 else 11) and e.rip == h.addr_of(insn)
