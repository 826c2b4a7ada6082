"""A machine nobody holds is freed: its CPUs, Unicorn instances, C-side block
counters and RAM go with it.  A test suite makes hundreds of machines; before
this, every one stayed in memory (~5 MB each) because the C hooks owned bound
methods of the CPU, roots the garbage collector cannot see through."""
from __future__ import annotations

import gc
import weakref

from vmk.machine.pc import Machine, MachineConfig
from vmk.testing import Harness

PROGRAM = """
    mov ecx, 100
again:
    dec ecx
    jnz again
    hlt
"""


def _dropped_refs(make) -> list[weakref.ref]:
    refs = []
    for _ in range(3):
        m = make()
        refs += [weakref.ref(m), *(weakref.ref(c) for c in m.cpus)]
        del m
    gc.collect()
    return refs


def test_a_harness_machine_is_freed_once_dropped() -> None:
    def make() -> Machine:
        h = Harness.from_asm(PROGRAM)           # block mode on, the insn-emulation filter made
        h.run_for(10_000)
        assert h.machine.cpu.block_mode
        return h.machine
    assert [r() for r in _dropped_refs(make)] == [None] * 6


def test_an_smp_machine_is_freed_once_dropped() -> None:
    def make() -> Machine:
        m = Machine(MachineConfig(mem=16 << 20, cpus=2))
        m.run(until=1_000)
        return m
    assert [r() for r in _dropped_refs(make)] == [None] * 9


def test_the_c_callbacks_still_reach_a_live_cpu() -> None:
    """The C side holds the CPU's block decoder weakly; while the CPU lives, new blocks are decoded."""
    h = Harness.from_asm(PROGRAM)
    before = h.machine.cpu._bc_misses.value
    h.run_for(10_000)
    assert h.machine.cpu._bc_misses.value > before
    assert h.instructions == 2 + 2 * 100           # mov, 100 x (dec, jnz), hlt: counted from decoded blocks
