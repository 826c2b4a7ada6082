"""Block mode (CPU.block_mode, the default): block-level instruction counting
must give the same instruction counts, virtual times, interrupt counts and
registers as count mode (Unicorn's per-instruction counter) on the same guest,
wherever the run is cut."""
from __future__ import annotations

import pytest

from vmk.testing import Harness
from vmk.testing.baremetal import install_runtime
from vmk.machine.cpu import Reg
from vmk.tools.bench import LOOP, _timer_guest

def _run(block: bool, source: str, n: int, period: int = 1_000_000):
    h = Harness.from_asm(_timer_guest(period, source), mem=128 << 20)
    h.machine.cpu.block_mode = block
    install_runtime(h)
    r = h.run(max_instructions=n)
    cpu = h.machine.cpu
    return r.why, h.instructions, h.now, dict(h.irq_counts), cpu.rip, cpu._abcd.read()


@pytest.mark.parametrize("period", [1_000_000, 30_011])
def test_compute_loop_with_timer_same_both_ways(period):
    # 5-instruction blocks; the timer deadline falls inside a block: the last
    # stretch before it runs in count mode, so the interrupt lands on the same
    # instruction (same RIP and registers at the end, same interrupt count).
    off = _run(False, LOOP, 3_000_017, period)
    on = _run(True, LOOP, 3_000_017, period)
    assert on == off
    assert off[3].get(0x40, 0) >= 3


def test_block_mode_actually_counts_blocks():
    h = Harness.from_asm(_timer_guest(1_000_000, LOOP), mem=128 << 20)
    cpu = h.machine.cpu
    cpu.block_mode = True
    install_runtime(h)
    h.run(max_instructions=2_000_000)
    # Only a handful of distinct blocks (setup, loop, handler) were decoded.
    assert 0 < cpu._bc_misses.value < 64
    executed, why = cpu.run(10_000)
    assert executed == 10_000 and cpu._bc_counter.value > 9_000


@pytest.mark.parametrize("period", [7_777, 100_003, 2_003])
def test_same_state_wherever_the_run_is_cut(period):
    # The LAPIC timer's handler (install_runtime) reads the TSC and EOIs
    # through MMIO in the middle of its blocks: exact time and an exact stop
    # there are what block mode must get right.  Cut at arbitrary points.
    def state(block, n):
        h = Harness.from_asm(_timer_guest(period, LOOP), mem=128 << 20)
        h.machine.cpu.block_mode = block
        install_runtime(h)
        h.run(max_instructions=n)
        cpu = h.machine.cpu
        return h.instructions, h.now, dict(h.irq_counts), cpu.rip, cpu._abcd.read(), cpu.reg(Reg.RSP)
    for n in (1, 4_095, 4_097, 123_457, 1_000_003):
        assert state(True, n) == state(False, n), n
