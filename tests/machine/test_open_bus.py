"""Loads and stores to physical addresses with no RAM or device behind them.

Measured on QEMU 7.2 (-m 128, a 32-bit multiboot kernel): a store to 128 MiB
is dropped and the load after it reads 0; the run goes on.  xv6 relies on it
(it frees pages up to its PHYSTOP, 224 MiB, whatever the RAM size).  vmk does
the same by default and reports it once per 2 MiB chunk; with
``unassigned_ok=False`` the access stops the machine with a report instead.
"""
from __future__ import annotations

from vmk.machine.pc import Why
from vmk.testing import Harness

MEM = 16 << 20
SRC = f"""
mov rbx, {MEM + 0x1000:#x}
mov dword ptr [rbx], 0x5a5a5a5a
mov eax, dword ptr [rbx]
mov rcx, {MEM + (8 << 20):#x}
mov qword ptr [rcx], rbx
mov rdx, qword ptr [rcx]
mov rsi, 0x77
mov byte ptr [{MEM - 1:#x}], 0x11
hlt
"""


def _regs(h: Harness) -> tuple[int, ...]:
    from vmk.machine.cpu import Reg
    return tuple(h.machine.cpu.reg(r) for r in (Reg.RAX, Reg.RDX, Reg.RSI))


def test_store_beyond_ram_is_dropped_and_the_load_reads_zero() -> None:
    h = Harness.from_asm(SRC, mem=MEM)
    r = h.run_for(10_000)
    assert r.why != Why.ERROR, r
    assert h.machine.cpu.halted
    assert _regs(h) == (0, 0, 0x77)
    assert h.machine.read_physical(MEM - 1, 1) == b"\x11"          # RAM itself untouched by the windows
    notes = [line for line in h.machine.log_lines if line.startswith("memory:")]
    assert len(notes) == 2, notes                                   # one report per 2 MiB chunk touched
    assert f"{MEM + 0x1000:#x}" in notes[0] and "reads 0" in notes[0]


def test_in_both_run_modes() -> None:
    results = []
    for block in (True, False):
        h = Harness.from_asm(SRC, mem=MEM)
        h.machine.cpu.block_mode = block
        h.run_for(10_000)
        results.append((_regs(h), h.instructions, h.now))
    assert results[0] == results[1]


def test_strict_mode_stops_with_a_report() -> None:
    h = Harness.from_asm(SRC, mem=MEM, unassigned_ok=False)
    r = h.run_for(10_000)
    assert r.why == Why.ERROR
    assert f"unmapped physical memory write at {MEM + 0x1000:#x}" in r.message
