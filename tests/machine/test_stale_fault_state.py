"""The CPU state Unicorn leaves behind outside a run does not reach the guest.

Unicorn 2.1.4 keeps QEMU's env->old_exception (the exception being delivered,
for the double-fault rules) but never resets it, since the machine delivers
exceptions, not Unicorn.  A value left between slices turned the guest's next
#PF into #DF (old_exception 14) or into a triple fault that ended emu_start
silently (old_exception 8: the CPU then ran the same block slice after slice).

One way it was left behind (issue 12): uc_hook_del invalidates the blocks the
hook saw through the current page tables; a block on a page that is not mapped
any more made that walk raise #PF into the idle CPU: CR2 clobbered and
old_exception = 14 (Linux --smp 2 looped in clear_user after `Run /init`).
Removing a hook (emu_start's own count hook, the debugger's) keeps the CPU
state."""
from __future__ import annotations

import struct

import pytest
from unicorn import x86_const as X

from vmk.machine.pc import Why
from vmk.testing import Harness

CODE = """
    mov rax, 0x200000
    call rax
    cli
    hlt
    nop
    nop
    nop
    nop
fault:
    mov rax, 0x400000
    mov rbx, qword ptr [rax]
    hlt
"""

NEW_TABLES = 0x80000          # PML4, PDPT, PD: only the first 2 MiB mapped (identity, a 2 MiB page)
MARK_CR2 = 0x5A5A_5000


def _map_first_2m_only(m) -> None:
    m.write_physical(NEW_TABLES, struct.pack("<Q", (NEW_TABLES + 0x1000) | 3) + bytes(4088))
    m.write_physical(NEW_TABLES + 0x1000, struct.pack("<Q", (NEW_TABLES + 0x2000) | 3) + bytes(4088))
    m.write_physical(NEW_TABLES + 0x2000, struct.pack("<Q", 0x83) + bytes(4088))


def test_count_hook_deletion_keeps_cr2_and_the_next_page_faults() -> None:
    # uc_hook_del through emu_start's own count hook: a count-mode slice runs the block at
    # 0x200000, CR3 changes, and the next block-mode slice (count=0) has its count hook deleted.
    h = Harness.from_asm(CODE, org=0x1000)
    m = h.machine
    cpu = m.cpu
    m.write_physical(0x200000, b"\xc3")
    cpu.block_mode = False
    r = m.run(until=1_000_000)
    assert r.why == Why.DEAD and cpu._count_hook.value != 0       # the offset names emu_start's count hook
    _map_first_2m_only(m)
    cpu.uc.reg_write(X.UC_X86_REG_CR3, NEW_TABLES)
    cpu.uc.reg_write(X.UC_X86_REG_CR2, MARK_CR2)
    cpu.invalidate_ctx()
    cpu.halted = False
    cpu.block_mode = True
    fault = h.addr_of("mov rax, 0x400000")
    cpu.rip = fault - 4
    cpu.run(cpu.BLOCK_MIN)                                        # nop x4, then the fault: a block-mode slice
    assert cpu._count_hook.value == 0
    ev = cpu.event
    assert ev is not None and ev.vector == 14 and ev.cr2 == 0x400000   # before: #DF
    for _ in range(2):
        cpu.rip = fault
        cpu.event = None
        cpu.uc.reg_write(X.UC_X86_REG_CR2, MARK_CR2)
        cpu.run(cpu.BLOCK_MIN)
        assert cpu.event is not None and cpu.event.vector == 14 and cpu.event.cr2 == 0x400000


@pytest.mark.parametrize("block_mode", [True, False], ids=["block", "count"])
@pytest.mark.parametrize("stale", [14, 8, 13], ids=["after-pf", "after-df", "after-gp"])
def test_a_stale_old_exception_does_not_change_the_next_page_fault(stale: int, block_mode: bool) -> None:
    h = Harness.from_asm(CODE, org=0x1000)
    cpu = h.machine.cpu
    cpu.block_mode = block_mode
    _map_first_2m_only(h.machine)
    cpu.uc.reg_write(X.UC_X86_REG_CR3, NEW_TABLES)       # 0x400000 is not mapped
    cpu.invalidate_ctx()
    fault = h.addr_of("mov rax, 0x400000")
    for _ in range(2):
        cpu._old_exception.value = stale                 # as a fault raised outside any run leaves it
        cpu.rip = fault - 2                              # two of the nops before it
        cpu.event = None
        executed, _ = cpu.run(100)
        assert cpu.event is not None, f"no event: {executed} instructions, error {cpu.error}"
        assert cpu.event.vector == 14 and cpu.event.cr2 == 0x400000     # before: #DF (14), nothing (8)
        assert cpu.event.rip == h.addr_of("mov rbx, qword ptr [rax]")
        assert executed == 4                             # nop, nop, mov rax and the faulting one (as count mode counts)
