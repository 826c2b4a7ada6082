"""A slice starts with no exception in delivery, whatever Unicorn left behind.

Unicorn 2.1.4 keeps QEMU's env->old_exception (the exception being delivered,
for the double-fault rules) but never resets it, since the machine delivers
exceptions, not Unicorn.  A value left between slices turned the guest's next
#PF into #DF (old_exception 14) or into a triple fault that ended emu_start
silently (old_exception 8: the CPU then ran the same block slice after slice)."""
from __future__ import annotations

import ctypes
import struct

import pytest
from unicorn import x86_const as X

from vmk.machine.cpu import Ctx
from vmk.testing import Harness

CODE = """
    nop
    nop
fault:
    mov rax, 0x400000
    mov rbx, qword ptr [rax]
    hlt
"""

TABLES = 0x80000              # PML4, PDPT, PD: only the first 2 MiB mapped (identity, one 2 MiB page)


@pytest.mark.parametrize("block_mode", [True, False], ids=["block", "count"])
@pytest.mark.parametrize("stale", [14, 8, 13], ids=["after-pf", "after-df", "after-gp"])
def test_the_next_page_fault_is_a_page_fault(stale: int, block_mode: bool) -> None:
    h = Harness.from_asm(CODE, org=0x1000)
    m = h.machine
    cpu = m.cpu
    cpu.block_mode = block_mode
    m.write_physical(TABLES, struct.pack("<Q", (TABLES + 0x1000) | 3) + bytes(4088))
    m.write_physical(TABLES + 0x1000, struct.pack("<Q", (TABLES + 0x2000) | 3) + bytes(4088))
    m.write_physical(TABLES + 0x2000, struct.pack("<Q", 0x83) + bytes(4088))
    cpu.uc.reg_write(X.UC_X86_REG_CR3, TABLES)           # 0x400000 is not mapped
    cpu.invalidate_ctx()
    for _ in range(2):
        ctypes.c_int32.from_address(cpu._vcpu_env + Ctx.OLD_EXCEPTION - Ctx.REGS).value = stale                 # as a fault raised outside any run leaves it
        cpu.rip = h.addr_of("mov rax, 0x400000") - 2       # the two nops
        cpu.event = None
        executed, _ = cpu.run(100)
        assert cpu.event is not None, f"no event: {executed} instructions, error {cpu.error}"
        assert cpu.event.vector == 14 and cpu.event.cr2 == 0x400000
        assert cpu.event.rip == h.addr_of("mov rbx, qword ptr [rax]")
        assert executed == 4                             # nop, nop, mov rax and the faulting one (as count mode counts)
