"""The CPU layer (machine/cpu.py): every Unicorn quirk it works around, on the whole machine.

Each test runs a few lines of guest assembly (``Harness.from_asm`` + the bare-metal
runtime of ``vmk.testing.baremetal``) and checks exact results.  Each workaround's
test says, in a ``Without the workaround`` comment, how it would fail if the
workaround were removed; where cheap, a *canary* next to it shows that the raw
Unicorn quirk is still there (if a canary starts failing after a Unicorn upgrade,
the workaround may have become unnecessary -- or wrong).

Counting rule used for expected times: the guest starts at t = 0 and the k-th
instruction ends at t = k * icount; a port write, an ``rdtsc`` or a register read
happens at the end of its instruction.

Bugs this suite found stay pinned by their tests (none is left as an xfail).
"""
from __future__ import annotations

import re
import struct

import pytest
from vmk.boot.loader import PML4_ADDR
from vmk.machine.cpu import GPR_NAMES, Ctx, Reg, Seg, Stop
from vmk.machine.pc import Why
from vmk.testing import Harness, assemble
from vmk.testing import baremetal as bm
from vmk.testing.baremetal import events, install_runtime

ORG = 0x100000                     # where Harness.from_asm puts the code
LIMIT = 100_000                    # virtual ns for run_to_end: a broken guest fails fast
LAPIC_LVT_LINT0 = 0x350
LAPIC_SVR, LAPIC_EOI = 0xF0, 0xB0
LAPIC_LVT_TIMER, LAPIC_INITIAL, LAPIC_DIVIDE = 0x320, 0x380, 0x3E0
LVT_MASKED = 1 << 16
SVR_ENABLED = 0x1FF
DIVIDE_BY_1 = 0b1011               # SDM Figure 11-10
LAPIC_MMIO = 0xFEE0_0000

KHANDLER = 0x120000                # extra ring-0 code written by the tests
REC = 0x7000                       # where guest code records values (user-writable)
PT_4K = 0x40000                    # a 4 KiB page table the tests build
PD_1G = PML4_ADDR + 0x3000         # page directory of 1 GiB..2 GiB (enter_long_mode's PDPT[1])
VIRT = 0x4000_0000                 # first address that PD maps

MSR_EFER, MSR_STAR, MSR_LSTAR, MSR_FMASK = 0xC000_0080, 0xC000_0081, 0xC000_0082, 0xC000_0084
RF_CF, RF_PF, RF_ZF, RF_IF, RF_DF = 0x1, 0x4, 0x40, 0x200, 0x400
RFLAGS_FIXED = 0x2
IOPL3 = 3 << 12

_LABEL = re.compile(r"^[A-Za-z_.][\w.]*:\s*")


# -- helpers -------------------------------------------------------------------------------------------------

def count_insns(src: str) -> int:
    """Instruction statements in straight-line assembly (labels and blank lines excluded)."""
    n = 0
    for stmt in re.split(r"[;\n]", src):
        if _LABEL.sub("", stmt.strip()).strip():
            n += 1
    return n


def machine(src: str, *, runtime: bool = True, **kw) -> Harness:
    """A harness running ``src`` with the bare-metal runtime installed.

    LAPIC LINT0 is masked: at reset the PIT's OUT is high and the PIC (vector base 0,
    nothing masked) would hand vector 0 to the CPU as soon as a test sets IF."""
    h = Harness.from_asm(src, **kw)
    if runtime:
        install_runtime(h)
    h.machine.lapic.write(LAPIC_LVT_LINT0, 4, LVT_MASKED)
    return h


def put_code(h: Harness, addr: int, src: str) -> None:
    h.machine.write_physical(addr, assemble(src, addr))


def set_gate(h: Harness, vector: int, handler: int, *, gate_type: int = 0xE, dpl: int = 0) -> None:
    attr = 0x80 | (dpl << 5) | gate_type
    gate = struct.pack("<HHBBHII", handler & 0xFFFF, bm.SEL.KCODE, 0, attr, (handler >> 16) & 0xFFFF,
                       handler >> 32, 0)
    h.machine.write_physical(bm.IDT_BASE + 16 * vector, gate)


def rec(h: Harness, index: int) -> int:
    return struct.unpack("<Q", h.machine.read_physical(REC + 8 * index, 8))[0]


def resume_at(label: str) -> str:
    """Runtime fault handler: continue at ``label`` (register base: keystone bug)."""
    return f"mov rbx, {bm.CTL + 8:#x}\nlea rax, [rip+{label}]\nmov [rbx], rax"


def to_ring3(label: str, rflags: int = RFLAGS_FIXED) -> str:
    return (f"push {bm.SEL.UDATA:#x}\npush {bm.USER_STACK:#x}\npush {rflags:#x}\npush {bm.SEL.UCODE:#x}\n"
            f"lea rax, [rip+{label}]\npush rax\niretq")


def wrmsr(msr: int, value: int) -> str:
    return f"mov ecx, {msr:#x}\nmov eax, {value & 0xFFFF_FFFF:#x}\nmov edx, {value >> 32:#x}\nwrmsr"


def lapic_timer_at(h: Harness, vector: int, t: int) -> None:
    """Program the LAPIC timer from Python at t = 0 (outside any slice): one shot, divide 1,
    so ``vector`` becomes pending at exactly t ns."""
    lapic = h.machine.lapic
    assert h.now == 0
    lapic.write(LAPIC_SVR, 4, SVR_ENABLED)
    lapic.write(LAPIC_DIVIDE, 4, DIVIDE_BY_1)
    lapic.write(LAPIC_LVT_TIMER, 4, vector)
    lapic.write(LAPIC_INITIAL, 4, t)


def gprs(h: Harness) -> dict[str, int]:
    return {n: getattr(h.regs, n) for n in (*GPR_NAMES, "rip", "rflags")}


def map_4k(h: Harness, virt: int, phys: int, flags: int = 0x3) -> None:
    """Map one 4 KiB page of the 1 GiB..1 GiB+2 MiB window through PT_4K."""
    m = h.machine
    m.write_physical(PD_1G, struct.pack("<Q", PT_4K | 0x7))
    m.write_physical(PT_4K + 8 * ((virt - VIRT) >> 12), struct.pack("<Q", phys | flags))


# -- the saved-context layout the workarounds patch --------------------------------------------------------------

_ENC_ORDER = (Reg.RAX, Reg.RCX, Reg.RDX, Reg.RBX, Reg.RSP, Reg.RBP, Reg.RSI, Reg.RDI,
              Reg.R8, Reg.R9, Reg.R10, Reg.R11, Reg.R12, Reg.R13, Reg.R14, Reg.R15)


def test_context_offsets_match_unicorn() -> None:
    """Ctx offsets (and the instruction counter offset) are measured for unicorn 2.1.4:
    re-checked here against registers Unicorn reports through its own API."""
    h = machine("nop\nnop\nnop\nnop\nnop\nhlt", runtime=False)
    cpu = h.machine.cpu
    for i, r in enumerate(_ENC_ORDER):
        cpu.set_reg(r, 0x1111_0000_0000_0000 + i)
    cpu.set_reg(Reg.CR2, 0xDEAD_B000)
    b = bytes(cpu.ctx_read())

    def q(off: int) -> int:
        return struct.unpack_from("<Q", b, off)[0]

    for i, _ in enumerate(_ENC_ORDER):
        assert q(Ctx.REGS + 8 * i) == 0x1111_0000_0000_0000 + i
    assert q(Ctx.RIP) == ORG
    assert q(Ctx.CR0) == cpu.reg(Reg.CR0) and q(Ctx.CR3) == cpu.reg(Reg.CR3) == PML4_ADDR
    assert q(Ctx.CR4) == cpu.reg(Reg.CR4) and q(Ctx.CR2) == 0xDEAD_B000
    assert cpu.seg_cache(Seg.CS)[0] == cpu.reg(Reg.CS) == 0x18
    assert cpu.seg_cache(Seg.SS)[0] == cpu.reg(Reg.SS) == 0x10
    _, gdt_base, gdt_limit, _ = cpu.reg(Reg.GDTR)
    assert cpu.table_regs()["gdt"][1:3] == (gdt_base, gdt_limit)
    assert cpu.cpl() == 0 and cpu.long_mode()
    # the instruction counter: a 3-instruction slice reads back 3
    assert cpu.run(3) == (3, Stop.COUNT)
    assert cpu.rip == ORG + 3


# -- exact instruction counting ---------------------------------------------------------------------------------

# 3 + 300 * 6 + 1 instructions, then an endless `jmp`: the total is fixed by max_instructions.
COUNT_SRC = """
    mov r8, 300
    xor eax, eax
    mov rbx, 0x7000
again:
    imul rax, rax, 13
    add rax, r8
    mov [rbx + r8*8], rax
    xor rax, [rbx + r8*8 - 8]
    dec r8
    jnz again
    mov r15, rax
spin:
    jmp spin
"""
COUNT_TOTAL = 3 + 300 * 6 + 1 + 50          # 50 turns of the final `jmp`


def _reference_run(icount: int = 1) -> Harness:
    h = machine(COUNT_SRC, icount=icount)
    r = h.run(max_instructions=COUNT_TOTAL)
    assert r.why == Why.STOPPED
    return h


@pytest.mark.parametrize("sizes", [(1,), (7,), (993,), (1, 7, 993), (2, 3, 5, 7, 11, 13), (1000, 1)])
def test_any_slicing_gives_the_same_state_and_count(sizes: tuple[int, ...]) -> None:
    # Without the clamp in CPU.run (after a budget runs out Unicorn's counter reads
    # budget + 1: it counts the instruction it stops before), every slice would add one
    # instruction that never ran: 1-instruction slices would count everything twice.
    ref = _reference_run()
    assert ref.instructions == COUNT_TOTAL and ref.now == COUNT_TOTAL
    h = machine(COUNT_SRC)
    i = 0
    while h.instructions < COUNT_TOTAL:
        r = h.run(max_instructions=min(sizes[i % len(sizes)], COUNT_TOTAL - h.instructions))
        assert r.why == Why.STOPPED
        i += 1
    assert gprs(h) == gprs(ref)
    assert h.machine.read_physical(REC, 8 * 301) == ref.machine.read_physical(REC, 8 * 301)
    assert h.instructions == COUNT_TOTAL and h.now == COUNT_TOTAL


def test_cpu_run_returns_exactly_the_budget() -> None:
    h = machine(COUNT_SRC)
    cpu = h.machine.cpu
    total = 0
    for n in (1, 7, 993, 4, 1):
        executed, why = cpu.run(n)
        assert (executed, why) == (n, Stop.COUNT)
        total += executed
    ref = machine(COUNT_SRC)
    assert ref.machine.cpu.run(total) == (total, Stop.COUNT)
    assert gprs(h) == gprs(ref)


def test_icount_scales_virtual_time() -> None:
    h = _reference_run(icount=3)
    assert h.instructions == COUNT_TOTAL and h.now == 3 * COUNT_TOTAL


HLT_SRC = """
    mov r8, 10
again:
    dec r8
    jnz again
    mov r9, 1
    hlt
    mov r10, 1
    hlt
"""
HLT_AT = 1 + 2 * 10 + 2                      # the first hlt is instruction 23


def test_hlt_ends_a_slice_with_the_right_count() -> None:
    # Without the workaround (the count read from Unicorn's emu_counter), a slice cut
    # short by HLT could only be accounted as its whole budget (1000 here).
    h = machine(HLT_SRC)
    cpu = h.machine.cpu
    assert cpu.run(1000) == (HLT_AT, Stop.HALT)
    assert cpu.halted and cpu.rip == h.addr_of("mov r10, 1")
    assert h.regs.r10 == 0


def test_hlt_with_if_clear_is_dead_at_the_right_time() -> None:
    h = machine(HLT_SRC)
    r = h.run_for(10_000)
    assert r.why == Why.DEAD
    assert h.instructions == HLT_AT and h.now == HLT_AT
    assert h.regs.r10 == 0


class _Probe:
    """A port device that records what the CPU says about the running slice."""

    def __init__(self, h: Harness) -> None:
        self.m = h.machine
        self.seen: list[tuple[int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.seen.append((value, self.m.cpu.retired_in_slice(), self.m.clock.now))


def test_retired_in_slice_counts_the_current_instruction() -> None:
    # Without it (clock.now inside a slice = start of the slice), a device would see
    # every access of a slice at the time the slice began.
    src = """
        mov dx, 0x510
        mov al, 1
        out dx, al
        nop
        nop
        mov al, 2
        out dx, al
        nop
        mov al, 3
        out dx, al
        jmp $
    """
    h = machine(src, icount=3)
    probe = _Probe(h)
    h.machine.ports.map(0x510, 1, probe, "probe")
    # one slice: the k-th instruction sees k retired (itself included) and t = 3k
    h.run(max_instructions=4)
    # the second slice starts after instruction 4: out #2 is its 3rd, out #3 its 6th
    h.run(max_instructions=20)
    assert probe.seen == [(1, 3, 9), (2, 3, 21), (3, 6, 30)]


def test_exit_through_isa_debug_exit_counts_exactly() -> None:
    # A slice stopped from inside an OUT hook: the OUT retires and is counted, the
    # instruction after it neither runs nor counts (emu_stop in the hook would also
    # count it: Unicorn's count hook has run for it before the stop takes effect).
    src = COUNT_SRC.replace("spin:\n    jmp spin", "mov dx, 0xf4\n    xor eax, eax\n    out dx, al\n    mov r14, 1")
    h = machine(src)
    r = h.run_for(100_000)
    assert r.why == Why.EXIT and r.exit_status == 1
    assert h.instructions == h.now == 3 + 300 * 6 + 1 + 3
    assert h.regs.r14 == 0 and h.regs.rip == h.addr_of("mov r14, 1")


# -- exception bookkeeping (env->old_exception) -----------------------------------------------------------------

FIVE_FAULTS = f"""
    {resume_at("r1")}
    mov rcx, 0x40000000
    mov rax, [rcx]
r1:
    {resume_at("r2")}
    mov ax, 0x58
    mov ds, ax
r2:
    {resume_at("r3")}
    xor edx, edx
    xor ecx, ecx
    div ecx
r3:
    {resume_at("r4")}
    mov rcx, 0x40000000
    mov [rcx], rax
r4:
    {resume_at("r5")}
    mov rcx, 0x40200000
    mov [rcx], rax
r5:
    mov r15, 0x55
spin:
    jmp spin
"""


def _five_faults() -> Harness:
    h = machine(FIVE_FAULTS)
    # 1 GiB .. +2 MiB not present; +2 MiB .. +4 MiB present, read-only
    h.machine.write_physical(PD_1G, struct.pack("<QQ", 0, (VIRT + 0x20_0000) | 0x81))
    h.machine.cpu.flush_tlb()
    return h


def _summary(h: Harness) -> list[tuple[int, int, int, int]]:
    return [(e.vector, e.error_code, e.rip, e.cr2 if e.vector == 14 else None) for e in events(h)]


def test_five_faults_in_a_row_keep_their_vectors_and_error_codes() -> None:
    # Without the workaround (old_exception reset in the INTR hook), Unicorn turns the
    # second fault into #DF (vector 8) and the third into a silent triple fault that
    # just ends emu_start: the log would read [14, 8] and r15 would stay 0.
    h = _five_faults()
    h.run(max_instructions=500)
    got = _summary(h)
    store1, store2 = h.addrs_of("mov [rcx], rax")
    assert got == [(14, 0, h.addr_of("mov rax, [rcx]"), VIRT),         # read, not present
                   (13, 0x58, h.addr_of("mov ds, ax"), None),          # selector beyond the GDT
                   (0, 0, h.addr_of("div ecx"), None),
                   (14, 2, store1, VIRT),                               # write, not present
                   (14, 3, store2, VIRT + 0x20_0000)]                   # write, read-only
    assert h.regs.r15 == 0x55
    assert h.irq_counts == {14: 3, 13: 1, 0: 1}


def test_slice_ending_right_before_a_fault_still_gives_pf() -> None:
    # Without the workaround (old_exception reset after every slice), stopping the slice
    # just before the faulting load makes Unicorn start that instruction once, note #PF in
    # old_exception and drop it; the real #PF in the next slice then arrives as #DF.
    h = _five_faults()
    before_load = count_insns(resume_at("r1")) + 1
    r = h.run(max_instructions=before_load)
    assert r.why == Why.STOPPED and h.regs.rip == h.addr_of("mov rax, [rcx]")
    assert events(h) == []
    h.run(max_instructions=500)
    assert [(e.vector, e.error_code) for e in events(h)][:1] == [(14, 0)]
    assert events(h)[0].cr2 == VIRT and h.regs.r15 == 0x55


def test_stepping_one_instruction_per_slice_gives_the_same_faults() -> None:
    # Every fault is the first instruction of its slice: all five must still be exact.
    ref = _five_faults()
    ref.run(max_instructions=500)
    h = _five_faults()
    for _ in range(500):
        h.run(max_instructions=1)
    assert [(e.vector, e.error_code, e.rip, e.cs, e.frame) for e in events(h)] == \
        [(e.vector, e.error_code, e.rip, e.cs, e.frame) for e in events(ref)]
    assert gprs(h) == gprs(ref)
    assert h.instructions == ref.instructions == 500


def test_no_slice_leaves_a_fault_recorded_in_old_exception() -> None:
    """The invariant behind the tests above: after any slice -- stopped by its budget
    right before a faulting instruction, or by the fault itself -- env->old_exception
    is -1, so the next fault is not combined with a stale one.  (Measured on raw
    Unicorn 2.1.4 with an `until` address: stopping before `mov rax, [rcx]` left 13.)"""
    h = machine("mov rcx, 0x8000000000000000\nnop\nmov rax, [rcx]\nnop", runtime=False)
    cpu = h.machine.cpu

    def old_exception() -> int:
        return struct.unpack_from("<i", cpu.ctx_read(), Ctx.OLD_EXCEPTION)[0]

    assert cpu.run(2) == (2, Stop.COUNT) and old_exception() == -1
    _, why = cpu.run(5)
    assert why == Stop.EVENT and (cpu.event.vector, cpu.event.error_code) == (13, 0)
    assert old_exception() == -1


# -- privilege changes: SYSCALL/SYSRET, interrupts from ring 3 ---------------------------------------------------

STAR_VALUE = (0x10 << 48) | (bm.SEL.KCODE << 32)     # SYSRET: SS = 0x10+8 | 3, CS = 0x10+16 | 3
FMASK_VALUE = RF_CF | RF_IF | RF_DF

SYSCALL_SRC = f"""
    mov ecx, {MSR_EFER:#x}
    rdmsr
    or eax, 1
    wrmsr
    {wrmsr(MSR_STAR, STAR_VALUE)}
    {wrmsr(MSR_LSTAR, KHANDLER)}
    {wrmsr(MSR_FMASK, FMASK_VALUE)}
    {to_ring3("user", RF_IF | RFLAGS_FIXED)}
user:
    xor eax, eax
    stc
    std
    syscall
back:
    mov rbx, {REC:#x}
    mov [rbx+0x40], rcx
    mov [rbx+0x48], r11
    pushfq
    pop rax
    mov [rbx+0x50], rax
    mov ax, cs
    mov [rbx+0x58], ax
    mov ax, ss
    mov [rbx+0x60], ax
    hlt
"""

LSTAR_HANDLER = f"""
    mov rbx, {REC:#x}
    mov [rbx], rcx
    mov [rbx+8], r11
    pushfq
    pop rax
    mov [rbx+16], rax
    mov rax, cr3
    mov [rbx+24], rax
    mov ax, cs
    mov [rbx+32], ax
    mov ax, ss
    mov [rbx+40], ax
    mov r11, {RF_IF | RFLAGS_FIXED:#x}
    sysret
"""


def test_syscall_from_ring3_enters_lstar_at_cpl0_and_sysret_returns() -> None:
    # Without the workaround (_architectural_syscall), Unicorn's SYSCALL only calls the
    # hook and adds 2 to RIP: no jump to LSTAR, no CPL change; RCX/R11 untouched.
    h = machine(SYSCALL_SRC)
    put_code(h, KHANDLER, LSTAR_HANDLER)
    r = h.run_to_end(LIMIT)
    assert r.why == Why.DEAD
    user_flags = RFLAGS_FIXED | RF_CF | RF_PF | RF_ZF | RF_IF | RF_DF     # xor eax,eax; stc; std
    assert rec(h, 0) == h.addr_of("mov rbx, 0x7000")      # RCX = the instruction after syscall
    assert rec(h, 1) == user_flags                          # R11 = RFLAGS
    assert rec(h, 2) == user_flags & ~FMASK_VALUE           # FMASK applied (CF, IF, DF cleared)
    assert rec(h, 3) == PML4_ADDR                           # mov rax, cr3 worked: CPL 0
    assert rec(h, 4) == bm.SEL.KCODE and rec(h, 5) == bm.SEL.KDATA        # STAR[47:32], +8
    # sysret: back at RCX with RFLAGS = R11, CS = 0x23, SS = 0x1B
    assert rec(h, 8) == rec(h, 0)                           # after sysret: RCX still the return RIP
    assert rec(h, 9) == rec(h, 10) == RF_IF | RFLAGS_FIXED  # RFLAGS = R11 as the handler left it
    assert rec(h, 11) == bm.SEL.UCODE and rec(h, 12) == bm.SEL.UDATA
    # the only fault is the final user `hlt`: #GP(0) at CPL 3
    assert [(e.vector, e.error_code, e.cs) for e in events(h)] == [(13, 0, bm.SEL.UCODE)]
    assert events(h)[0].rip == h.addr_of("hlt")


INT_FROM_USER_SRC = f"""
    {to_ring3("user", RF_IF | RFLAGS_FIXED)}
user:
    inc r8
    cmp r8, 200
    jne user
    mov rax, cr3
    hlt
"""

CR3_INT_HANDLER = f"""
    mov rax, cr3
    mov rbx, {REC:#x}
    mov [rbx], rax
    mov ax, cs
    mov [rbx+8], ax
    mov [rbx+16], rsp
    mov rax, [rsp+8]
    mov [rbx+24], rax
    mov rax, [rsp+32]
    mov [rbx+32], rax
    mov rax, {LAPIC_MMIO + LAPIC_EOI:#x}
    mov dword ptr [rax], 0
    iretq
"""


def test_interrupt_from_ring3_runs_a_dpl0_handler_at_cpl0_and_iretq_returns_to_ring3() -> None:
    # Without the workaround (segment/CPL patch in the saved context, set_hidden_state),
    # reg_write(CS) only changes the selector: the handler would run at CPL 3 and its
    # `mov rax, cr3` would #GP.
    h = machine(INT_FROM_USER_SRC)
    put_code(h, KHANDLER, CR3_INT_HANDLER)
    set_gate(h, 0x41, KHANDLER)
    lapic_timer_at(h, 0x41, 100)
    r = h.run_to_end(LIMIT)
    assert r.why == Why.DEAD
    assert rec(h, 0) == PML4_ADDR and rec(h, 1) == bm.SEL.KCODE
    assert rec(h, 2) == bm.RSP0 - 40                       # stack switched to TSS.RSP0
    assert rec(h, 3) == bm.SEL.UCODE and rec(h, 4) == bm.SEL.UDATA
    assert h.regs.r8 == 200
    # back in ring 3: the user's own `mov rax, cr3` faults
    assert [(e.vector, e.error_code, e.cs, e.rip) for e in events(h)] == \
        [(13, 0, bm.SEL.UCODE, h.addr_of("mov rax, cr3"))]
    assert h.irq_counts == {0x41: 1, 13: 1}


# -- TLB after page-table edits from Python ------------------------------------------------------------------

def test_pte_edit_from_python_needs_flush_tlb() -> None:
    # Without the workaround (flush_tlb after Python edits), the guest keeps the old
    # translation: that is what the middle step below shows.
    src = """
        mov rbx, 0x40000000
    again:
        mov rax, [rbx]
        inc r8
        jmp again
    """
    h = machine(src)
    m = h.machine
    m.write_physical(0x60_0000, struct.pack("<Q", 0x1111))
    m.write_physical(0x70_0000, struct.pack("<Q", 0x2222))
    map_4k(h, VIRT, 0x60_0000)
    m.cpu.flush_tlb()
    h.run(max_instructions=4)
    assert (h.regs.rax, h.regs.r8) == (0x1111, 1)
    map_4k(h, VIRT, 0x70_0000)                  # re-point the PTE, no flush
    h.run(max_instructions=3)
    assert (h.regs.rax, h.regs.r8) == (0x1111, 2)      # stale: Unicorn's TLB still has the old frame
    m.cpu.flush_tlb()
    h.run(max_instructions=3)
    assert (h.regs.rax, h.regs.r8) == (0x2222, 3)


# -- count mode --------------------------------------------------------------------------------------------

LOOP_SRC = """
    mov r8, 1000
again:
    dec r8
    jnz again
    mov r9, 1
    hlt
"""


def test_code_run_in_a_long_slice_then_single_stepped_respects_the_count() -> None:
    # Without the workaround (never run with count=0), translation blocks made in an
    # unbounded run have no counting hook and a later count=1 runs the whole loop:
    # the canary below shows it.
    h = machine(LOOP_SRC, runtime=False)
    cpu = h.machine.cpu
    assert cpu.run(100_000) == (1 + 2 * 1000 + 2, Stop.HALT)
    h.regs.rip = ORG
    h.regs.r9 = 0
    cpu.halted = False
    loop = h.addr_of("dec r8")
    steps = [(ORG + 7, 1000), (loop + 3, 999), (loop, 999), (loop + 3, 998)]
    for rip, r8 in steps:
        assert cpu.run(1) == (1, Stop.COUNT)
        assert (cpu.rip, h.regs.r8) == (rip, r8)
    assert h.regs.r9 == 0


def test_canary_count_zero_translations_ignore_a_later_count() -> None:
    h = machine(LOOP_SRC, runtime=False)
    cpu = h.machine.cpu
    cpu.uc.emu_start(ORG, 0x8000_0000_0000_0000, 0, 0)         # count=0: no counting hook
    assert h.regs.r9 == 1
    h.regs.rip = ORG
    h.regs.r9 = 0
    executed, _ = cpu.run(1)
    assert h.regs.r9 == 1 and h.regs.r8 == 0                   # ran to the hlt ...
    assert executed == 0                                       # ... uncounted


# -- CR2 across slices ----------------------------------------------------------------------------------------

def test_cr2_survives_slice_boundaries() -> None:
    # Without the workaround (exits mode instead of an `until` address), every
    # emu_start(until=0xFFFF_FFFF_FFFF_FFFF) makes Unicorn walk the page tables for
    # until - 1, which is not mapped: CR2 = 0xFFFF_FFFF_FFFF_FFFE after every slice.
    src = "mov r8, 0x1234\nmov cr2, r8\nnop\nmov rax, cr2\nhlt"
    h = machine(src)
    h.run(max_instructions=2)
    h.run_to_end(LIMIT)
    assert h.regs.rax == 0x1234 and h.regs.cr2 == 0x1234


# -- rdtsc and cpuid ---------------------------------------------------------------------------------------

RDTSC_SRC = """
    nop
    nop
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov r8, rax
    mov ecx, 100
again:
    dec ecx
    jnz again
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov r9, rax
spin:
    jmp spin
"""
RDTSC_INSNS = 6 + 1 + 2 * 100 + 4            # up to `mov r9, rax`


@pytest.mark.parametrize("icount", [1, 3])
def test_rdtsc_returns_virtual_time(icount: int) -> None:
    # Without the workaround (the private RDTSC hook), rdtsc returns the host TSC.
    h = machine(RDTSC_SRC, icount=icount)
    h.run(max_instructions=RDTSC_INSNS + 10)
    assert h.regs.r8 == 3 * icount                          # the 3rd instruction ends at 3 * icount
    assert h.regs.r9 == (6 + 1 + 2 * 100 + 1) * icount


def test_rdtsc_is_the_same_across_slicings() -> None:
    h = machine(RDTSC_SRC)
    while h.instructions < RDTSC_INSNS:
        h.run(max_instructions=2)
    assert (h.regs.r8, h.regs.r9) == (3, 208)


def _cpuid(leaf: int, icount: int = 1) -> tuple[int, int, int, int]:
    h = machine(f"mov eax, {leaf:#x}\nxor ecx, ecx\ncpuid\nhlt", icount=icount)
    h.run_to_end(LIMIT)
    return h.regs.rax, h.regs.rbx, h.regs.rcx, h.regs.rdx


def test_cpuid_hypervisor_leaf_answers_vmk() -> None:
    eax, ebx, ecx, edx = _cpuid(0x4000_0000)
    assert struct.pack("<III", ebx, ecx, edx) == b"vmkVMKvmkVMK"
    assert eax == 0x4000_0010


@pytest.mark.parametrize("icount", [1, 3])
def test_cpuid_timing_leaf_reports_tsc_khz(icount: int) -> None:
    eax, ebx, _, _ = _cpuid(0x4000_0010, icount)
    assert eax == 1_000_000 // icount and ebx == 1_000_000


def test_cpuid_leaf1_still_reports_the_apic() -> None:
    _, _, ecx, edx = _cpuid(1)
    assert edx & (1 << 9)              # APIC
    assert edx & (1 << 4)              # TSC
    assert ecx & (1 << 31)             # hypervisor present


# -- I/O permission ----------------------------------------------------------------------------------------

COM1_SCR, COM2_SCR = 0x3FF, 0x2FF


def _io_harness(rflags: int) -> Harness:
    """Ring-3 code doing OUT, IN, OUT to COM2 and a word OUT, each resumed after a #GP."""
    return machine(f"""
    {to_ring3("user", rflags)}
user:
    {resume_at("r1")}
    mov dx, {COM1_SCR:#x}
    mov al, 0x5a
    out dx, al
r1:
    {resume_at("r2")}
    mov eax, 0x12345678
    mov dx, {COM1_SCR:#x}
    in al, dx
r2:
    mov r12, rax
    {resume_at("r3")}
    mov dx, {COM2_SCR:#x}
    mov al, 0x66
    out dx, al
r3:
    {resume_at("r4")}
    mov dx, 0x3fe
    mov ax, 0x7777
    out dx, ax
r4:
    hlt
""")


def _scratch(h: Harness, port: int) -> int:
    return h.machine.ports.read(port, 1)


def _faults(h: Harness) -> list[tuple[int, int, int, int]]:
    return [(e.vector, e.error_code, e.rip, e.cs) for e in events(h)]


def test_out_from_ring3_with_iopl0_and_no_bitmap_is_gp_and_does_not_write() -> None:
    # Without the workaround (the bus's IOPL/bitmap check), Unicorn runs IN/OUT at any CPL.
    h = _io_harness(RFLAGS_FIXED)
    assert h.run_to_end(LIMIT).why == Why.DEAD
    out_com1, out_com2 = h.addrs_of("out dx, al")
    assert _faults(h) == [
        (13, 0, out_com1, bm.SEL.UCODE),                      # OUT: #GP(0) on the OUT itself
        (13, 0, h.addr_of("in al, dx"), bm.SEL.UCODE),       # IN likewise
        (13, 0, out_com2, bm.SEL.UCODE),                      # OUT to COM2
        (13, 0, h.addr_of("out dx, ax"), bm.SEL.UCODE),      # word OUT
        (13, 0, h.addr_of("hlt"), bm.SEL.UCODE),             # the final hlt
    ]
    assert _scratch(h, COM1_SCR) == 0 and _scratch(h, COM2_SCR) == 0     # no write happened
    assert h.regs.r12 == 0x12345678                           # the faulting `in` left RAX alone


def test_out_from_ring3_with_iopl3_works() -> None:
    h = _io_harness(RFLAGS_FIXED | IOPL3)
    assert h.run_to_end(LIMIT).why == Why.DEAD
    # no I/O fault: only the final hlt (twice: the unused resume address r4 is that hlt)
    assert _faults(h) == [(13, 0, h.addr_of("hlt"), bm.SEL.UCODE)] * 2
    assert h.regs.r12 == 0x1234565A                           # `in al` read the scratch back
    assert _scratch(h, COM2_SCR) == 0x66
    assert _scratch(h, COM1_SCR) == 0x77                      # the word out wrote 0x77 to 0x3ff


def test_tss_io_bitmap_allows_exactly_one_port() -> None:
    h = _io_harness(RFLAGS_FIXED)
    m = h.machine
    # TSS with an I/O bitmap at offset 104 covering ports 0..0x3FF (128 bytes) and the
    # terminating 0xFF byte; only port 0x3FF's bit is clear.
    bitmap = bytearray(b"\xff" * 129)
    bitmap[COM1_SCR >> 3] &= ~(1 << (COM1_SCR & 7)) & 0xFF
    limit = 104 + len(bitmap) - 1
    m.write_physical(bm.TSS_BASE + 102, struct.pack("<H", 104))
    m.write_physical(bm.TSS_BASE + 104, bytes(bitmap))
    m.cpu.uc.reg_write(Reg.TR, (bm.SEL.TSS, bm.TSS_BASE, limit, 0x8900))
    assert h.run_to_end(LIMIT).why == Why.DEAD
    assert _faults(h) == [(13, 0, h.addrs_of("out dx, al")[1], bm.SEL.UCODE),    # COM2: bit set
                          (13, 0, h.addr_of("out dx, ax"), bm.SEL.UCODE),        # 0x3fe's bit set
                          (13, 0, h.addr_of("hlt"), bm.SEL.UCODE)]
    assert _scratch(h, COM1_SCR) == 0x5A and _scratch(h, COM2_SCR) == 0
    assert h.regs.r12 == 0x1234565A


# -- bugs -------------------------------------------------------------------------------------------------------

def test_hlt_as_the_last_instruction_of_the_budget_halts() -> None:
    h = machine(HLT_SRC)
    assert h.machine.cpu.run(HLT_AT) == (HLT_AT, Stop.HALT)


def test_timer_deadline_at_the_end_of_hlt_does_not_skip_the_halt() -> None:
    h = machine(HLT_SRC)
    h.machine.clock.timer(lambda: None, name="idle").arm(HLT_AT)
    r = h.run_for(10_000)
    assert r.why == Why.DEAD
    assert h.regs.r10 == 0 and h.instructions == HLT_AT


def test_syscall_with_sce_clear_is_ud() -> None:
    src = SYSCALL_SRC.replace("or eax, 1", "and eax, 0xfffffffe")
    h = machine(src)
    put_code(h, KHANDLER, LSTAR_HANDLER)
    h.run_to_end(LIMIT)
    first = events(h)[0]
    assert (first.vector, first.rip, first.cs) == (6, h.addr_of("syscall"), bm.SEL.UCODE)


# -- the C hook gateways (machine/_fasthooks.c) ------------------------------------------------------------------

class _DeviceBug(Exception):
    pass


class _Buggy:
    """A device whose first access raises."""

    def __init__(self) -> None:
        self.calls = 0

    def _hit(self, where: str) -> int:
        self.calls += 1
        if self.calls == 1:
            raise _DeviceBug(where)
        return 0

    def read(self, offset: int, size: int) -> int:
        return self._hit("read")

    def write(self, offset: int, size: int, value: int) -> None:
        self._hit("write")


@pytest.mark.parametrize("src, where", [
    ("mov dx, 0x510\nout dx, al", "write"),
    ("mov dx, 0x510\nin al, dx", "read"),
    ("mov rbx, 0xfeb00000\nmov dword ptr [rbx], 0", "write"),
    ("mov rbx, 0xfeb00000\nmov eax, [rbx]", "read"),
])
def test_an_exception_in_a_device_callback_reaches_the_caller_and_the_machine_goes_on(src: str, where: str) -> None:
    """A device model that raises inside a Unicorn hook (port or MMIO): the
    slice ends, the exception comes out of run() unchanged, and the machine
    can run on afterwards."""
    h = Harness.from_asm(f"{src}\nmov r15, 7\nhlt")
    dev = _Buggy()
    h.machine.ports.map(0x510, 1, dev, "buggy")
    h.machine.mmio.map(0xFEB0_0000, 0x1000, dev, "buggy")
    with pytest.raises(_DeviceBug, match=where):
        h.run_for(1_000)
    assert dev.calls == 1
    h.run_for(1_000)
    assert h.regs.r15 == 7


def test_an_exception_in_the_syscall_door_reaches_the_caller() -> None:
    h = Harness.from_asm("mov eax, 39\nsyscall\nmov r15, rax\nhlt")
    seen = []

    def door(nr, *args):
        seen.append(nr)
        if len(seen) == 1:
            raise _DeviceBug("door")
        return 1234

    h.machine.cpu.syscall_door = door
    with pytest.raises(_DeviceBug):
        h.run_for(1_000)
    assert seen == [39]


def test_the_syscall_door_gets_the_linux_registers_and_loads_rax() -> None:
    h = Harness.from_asm("""
        mov eax, 7
        mov edi, 1
        mov esi, 2
        mov edx, 3
        mov r10, 4
        mov r8, 5
        mov r9, -6
        syscall
        mov r15, rax
        mov eax, 8
        syscall
        hlt
    """)
    got = []

    def door(*regs):
        got.append(regs)
        return -22 if regs[0] == 7 else None        # None: RAX is left as it is

    h.machine.cpu.syscall_door = door
    h.run_for(1_000)
    assert got[0] == (7, 1, 2, 3, 4, 5, (1 << 64) - 6)
    assert h.regs.r15 == (1 << 64) - 22
    assert got[1][0] == 8 and h.regs.rax == 8


def test_a_register_swap_in_the_syscall_hook_saves_one_context_and_runs_the_other() -> None:
    """RegBatch.swap (one C call) from inside the SYSCALL hook: the registers at the
    SYSCALL go into ``old`` with RIP past it; the CPU goes on at ``new``'s RIP
    (Unicorn adds 2 after the hook, so the swap loads RIP - 2) with its registers."""
    from vmk.machine.cpu import RegBatch
    h = Harness.from_asm("mov rbx, 0x1111\nmov rcx, -1\nmov eax, 1\nsyscall\nmov r14, 0x77\nhlt\n"
                         "mov r15, rbx\nhlt\n")
    other, after_syscall = h.addr_of("mov r15, rbx"), h.addr_of("mov r14, 0x77")
    cpu = h.machine.cpu
    batch = RegBatch(cpu.uc, [int(Reg.RAX), int(Reg.RBX), int(Reg.RCX), int(Reg.RIP)])
    old = [0, 0, 0, 0]
    new = [5, 0x2222, 7, other]

    def door(*regs):
        batch.swap(old, new, 3, 2)
        cpu.invalidate_ctx()
        return None

    cpu.syscall_door = door
    h.run_for(1_000)
    assert old == [1, 0x1111, (1 << 64) - 1, after_syscall]
    assert new == [5, 0x2222, 7, other]                 # not changed
    assert h.regs.r15 == 0x2222 and h.regs.rcx == 7 and h.regs.rax == 5 and h.regs.r14 == 0
    with pytest.raises(ValueError):
        batch.swap([0, 0], new, 3, 2)                   # lists of different lengths: refused, nothing done
