"""CPU bugs that real kernels (Linux, xv6, Loko Scheme; issue 12) found, each pinned by a small guest.

Each test runs a few lines of assembly (``Harness.from_asm`` + the bare-metal
runtime) and checks what the SDM says (or, where the SDM leaves it to the
platform, what QEMU 7.2 TCG does).  Each says how it failed before the fix.
"""
from __future__ import annotations

import struct

import pytest
from vmk.machine.cpu import Stop
from vmk.machine.pc import Why

from test_cpu import LIMIT, REC, machine  # noqa: I001 - the shared guest helpers of tests/machine


# -- 1. only a retired HLT halts ---------------------------------------------------------------------------------

class _ForeignStop:
    """A port device that ends the running slice with a bare uc_emu_stop, as a
    component other than CPU.request_stop (or Unicorn itself) may: Unicorn then
    returns early with no HLT and no stop reason of ours."""

    def __init__(self, h) -> None:
        self.cpu = h.machine.cpu

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.cpu.uc.emu_stop()


def test_an_early_return_without_hlt_does_not_halt_the_cpu() -> None:
    # Before: CPU.run took any early return with nothing of ours stopping the slice
    # as a retired HLT; with IF=0 the machine declared the CPU dead at the first
    # `out` (Linux, with IF=1, idled until the next timer tick at every such return:
    # the soft lockup in clear_user).
    src = """
        cli
        mov rcx, 5
        mov dx, 0x510
    again:
        out dx, al
        dec rcx
        jnz again
        mov r15, 0xdead
        hlt
    """
    h = machine(src)
    h.machine.ports.map(0x510, 1, _ForeignStop(h), "foreign-stop")
    r = h.run_to_end(LIMIT)
    assert r.why == Why.DEAD
    assert h.regs.r15 == 0xDEAD and h.regs.rcx == 0
    assert h.machine.cpu.early_returns == 5
    assert h.regs.rip == h.code_end          # after the real HLT


def test_hlt_is_read_from_the_vcpu_halted_flag() -> None:
    h = machine("nop\nnop\nhlt\nnop\nnop\nspin:\njmp spin")
    cpu = h.machine.cpu
    assert cpu.run(1) == (1, Stop.COUNT) and not cpu._halt_retired()
    assert cpu.run(10) == (2, Stop.HALT) and cpu._halt_retired() and cpu.halted
    cpu.halted = False
    assert cpu.run(2) == (2, Stop.COUNT) and not cpu._halt_retired()
    assert cpu.early_returns == 0


# -- 5. x87 and SSE state at reset ----------------------------------------------------------------------------------

def test_x87_and_sse_control_state_at_reset() -> None:
    # Before: fnstcw stored 0 (every x87 exception unmasked) and MXCSR was 0.
    src = f"""
        mov rbx, {REC:#x}
        fnstcw [rbx]
        fnstsw [rbx + 2]
        stmxcsr [rbx + 4]
        fnstenv [rbx + 16]
        fld1
        fldz
        fdivp st(1), st(0)
        fnstsw [rbx + 8]
        hlt
    """
    h = machine(src)
    h.run_to_end(LIMIT)
    m = h.machine.read_physical(REC, 48)
    fcw, fsw, mxcsr = struct.unpack_from("<HHI", m, 0)
    assert (fcw, fsw, mxcsr) == (0x037F, 0x0000, 0x1F80)
    env_fcw, env_fsw, env_ftw = struct.unpack_from("<HxxHxxHxx", m, 16)
    assert (env_fcw, env_fsw, env_ftw) == (0x037F, 0x0000, 0xFFFF)
    # 1/0 with #Z masked: no fault, ZE (bit 2) set, the result pushed (TOP 7)
    assert struct.unpack_from("<H", m, 8)[0] == 0x3804
    assert h.machine.idt.delivered == {}


# -- 3. RDTSCP reads the virtual TSC -------------------------------------------------------------------------------

@pytest.mark.parametrize("icount", [1, 3])
def test_rdtscp_returns_the_virtual_tsc_and_tsc_aux(icount: int) -> None:
    # Before: RDTSCP returned the host TSC (a different value on every run).
    src = """
        mov ecx, 0xc0000103
        mov eax, 0x1234567
        xor edx, edx
        wrmsr
        rdtscp
        mov r8, rax
        mov r9, rdx
        mov r10, rcx
        rdtsc
        hlt
    """
    h = machine(src, icount=icount)
    h.run_to_end(LIMIT)
    assert (h.regs.r8, h.regs.r9, h.regs.r10) == (5 * icount, 0, 0x1234567)    # the 5th instruction
    assert h.regs.rax == 9 * icount                                           # rdtsc: the same clock
