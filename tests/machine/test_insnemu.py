"""The instructions Unicorn gets wrong (machine/insnemu.py): RDMSR/WRMSR of IA32_APIC_BASE
and IA32_TSC, IRET to ring 3 with FS/GS, RDRAND.  Each test runs in block mode and in count
mode and says how it failed before the fix (Unicorn 2.1.4 alone)."""
from __future__ import annotations

import pytest
from unicorn import x86_const as X
from vmk.testing.baremetal import events

from test_cpu import LIMIT, REC, machine, rec, to_ring3, wrmsr  # noqa: I001 - the shared guest helpers

MODES = pytest.mark.parametrize("block_mode", [True, False], ids=["block", "count"])


def _run(src: str, block_mode: bool):
    h = machine(src)
    h.machine.cpu.block_mode = block_mode
    r = h.run_to_end(LIMIT)
    return h, r


def rdmsr_to(msr: int, slot: int) -> str:
    return f"mov ecx, {msr:#x}\nrdmsr\nmov [rbx + {8 * slot}], eax\nmov [rbx + {8 * slot + 4}], edx"


@MODES
def test_apic_base_reads_the_boot_cpu_value_and_keeps_writes(block_mode: bool) -> None:
    # Before: every read was 0 and writes vanished.
    src = f"""
        mov rbx, {REC:#x}
        {rdmsr_to(0x1B, 0)}
        {wrmsr(0x1B, 0xFEE0_0000)}
        {rdmsr_to(0x1B, 1)}
        {wrmsr(0x1B, 0xFEE0_0800 | 0x400 | 0xFF)}
        {rdmsr_to(0x1B, 2)}
        {rdmsr_to(0x1234_5678, 3)}
        hlt
    """
    h, _ = _run(src, block_mode)
    assert rec(h, 0) == 0xFEE0_0900                 # base | EN | BSP, as QEMU 7.2
    assert rec(h, 1) == 0xFEE0_0100                 # EN cleared and kept; BSP is read-only
    assert rec(h, 2) == 0xFEE0_0900                 # EXTD and bits 0-7 are reserved: dropped
    assert rec(h, 3) == 0                           # other MSRs: Unicorn's behaviour (reads 0)
    log = [line for line in h.machine.log_lines if line.startswith("cpu:")]
    assert len(log) == 2 and "EN cleared" in log[0] and "reserved" in log[1]


@MODES
def test_tsc_msr_is_the_virtual_time_tsc(block_mode: bool) -> None:
    # Before: IA32_TSC read 0.  Now it is what RDTSC returns at that instruction
    # (1 ns per instruction here): an RDTSC right after reads one more.
    src = f"""
        mov rbx, {REC:#x}
        nop
        nop
        {rdmsr_to(0x10, 0)}
        rdtsc
        mov [rbx + 8], eax
        mov [rbx + 12], edx
        hlt
    """
    h, _ = _run(src, block_mode)
    assert rec(h, 1) - rec(h, 0) == 3               # the RDTSC is 3 instructions later (2 stores)
    assert rec(h, 0) == 5 * h.machine.ns_per_insn   # mov rbx, nop, nop, mov ecx, rdmsr


@MODES
def test_rdmsr_at_cpl3_still_raises_gp(block_mode: bool) -> None:
    src = f"""
        {to_ring3('user')}
    user:
        mov ecx, 0x1b
        rdmsr
        hlt
    """
    h, _ = _run(src, block_mode)
    ev = events(h)
    assert ev and ev[0].vector == 13 and ev[0].cs & 3 == 3


def test_an_emulated_rdmsr_retires_as_one_instruction_in_both_modes() -> None:
    # A loop long enough for block mode; the same count, time and registers in both modes.
    src = f"""
        mov rbx, {REC:#x}
        mov r8, 20000
        xor r9, r9
    again:
        mov ecx, 0x10
        rdmsr
        add r9, rax
        mov ecx, 0x1b
        rdmsr
        add r9, rax
        dec r8
        jnz again
        mov [rbx], r9
        hlt
    """
    results = []
    for block_mode in (True, False):
        h = machine(src)
        h.machine.cpu.block_mode = block_mode
        h.run_to_end(10_000_000)
        results.append((h.instructions, h.now, rec(h, 0), h.regs.rip))
    assert results[0] == results[1]
    assert results[0][0] == 3 + 20000 * 8 + 2      # each RDMSR once (hlt included)


@MODES
def test_rdrand_is_absent_and_raises_ud_as_on_qemu64(block_mode: bool) -> None:
    # Before: CPUID.1:ECX[30] was 1 and RDRAND returned host randomness (runs differed).
    src = f"""
        mov rbx, {REC:#x}
        mov eax, 1
        xor ecx, ecx
        cpuid
        mov [rbx], ecx
        rdrand eax
        hlt
    """
    h, _ = _run(src, block_mode)
    assert not rec(h, 0) & (1 << 30)
    ev = events(h)
    assert ev and ev[0].vector == 6


@MODES
@pytest.mark.parametrize("sel", [0x10, 0x00, 0x1B])
def test_iretq_to_ring3_keeps_the_fs_and_gs_bases(block_mode: bool, sel: int) -> None:
    # Before: with a ring-0 data selector (0x10) in FS/GS, IRETQ to CPL 3 nulled the
    # selectors *and zeroed the bases*; ring 3 read address 0.  QEMU 7.2 keeps the bases.
    src = f"""
        mov rbx, {REC:#x}
        mov eax, {sel}
        mov fs, ax
        mov gs, ax
        {wrmsr(0xC000_0100, REC + 0x100)}
        {wrmsr(0xC000_0101, REC + 0x108)}
        mov rax, 0x1122334455667788
        mov [rbx + 0x100], rax
        mov rax, 0x99AABBCCDDEEFF00
        mov [rbx + 0x108], rax
        {to_ring3('user')}
    user:
        xor ecx, ecx
        mov rax, fs:[rcx]
        mov rbx, {REC:#x}
        mov [rbx], rax
        mov rax, gs:[rcx]
        mov [rbx + 8], rax
        mov ax, fs
        mov [rbx + 16], ax
        mov ax, gs
        mov [rbx + 24], ax
        hlt
    """
    h, _ = _run(src, block_mode)
    assert rec(h, 0) == 0x1122_3344_5566_7788
    assert rec(h, 1) == 0x99AA_BBCC_DDEE_FF00
    expect_sel = 0 if sel == 0x10 else sel          # IRET nulls a DPL-0 data selector (SDM)
    assert rec(h, 2) & 0xFFFF == expect_sel and rec(h, 3) & 0xFFFF == expect_sel
    cpu = h.machine.cpu
    assert cpu.uc.reg_read(X.UC_X86_REG_FS_BASE) == REC + 0x100


def test_iretq_within_ring0_leaves_fs_alone() -> None:
    src = f"""
        mov rbx, {REC:#x}
        mov eax, 0x10
        mov fs, ax
        {wrmsr(0xC000_0100, REC + 0x100)}
        mov rax, rsp
        push 0x10
        push rax
        pushfq
        push 0x08
        lea rax, [rip + back]
        push rax
        iretq
    back:
        mov ax, fs
        mov [rbx], ax
        hlt
    """
    h, _ = _run(src, True)
    assert rec(h, 0) & 0xFFFF == 0x10
    assert h.machine.cpu.uc.reg_read(X.UC_X86_REG_FS_BASE) == REC + 0x100


def test_an_ap_reads_apic_base_without_the_bsp_bit() -> None:
    """SDM §10.4.4: only the BSP has IA32_APIC_BASE bit 8 set (QEMU: 0xFEE00800 on an AP)."""
    from vmk.machine.pc import Machine, MachineConfig
    m = Machine(MachineConfig(mem=16 << 20, cpus=2))
    assert [c.insn_emu.rdmsr(0x1B, lambda: 0) for c in m.cpus] == [0xFEE00900, 0xFEE00800]
