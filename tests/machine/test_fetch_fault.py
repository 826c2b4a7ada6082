"""Instruction-fetch faults through the guest IDT (machine/cpu.py's fetch-fault stop).

A fault raised while Unicorn translates an instruction (a jump or call to a
non-present, supervisor-only or NX page, or to a non-canonical address) comes
before the instruction's count hook; before the fix the CPU retried the fetch
inside ``emu_start`` for ever.  Each case must be delivered once, as the SDM
says: #PF with RIP = CR2 = the target (a `call` has pushed its return address),
error code P | W/R=0 | U/S | I/D (I/D only with EFER.NXE, SDM §4.7).
"""
from __future__ import annotations

import struct

import pytest
from vmk.machine.pc import Why
from vmk.testing import baremetal as bm

from test_exceptions import LIMIT, PD_1G, PDE_P, PDE_PS, PDE_U, PDE_W, VIRT, PAGE_2M, machine, one_event, to_ring3

NX = 1 << 63
PAGES = (0,                                                  # VIRT: not present
         0x40_0000 | PDE_P | PDE_W | PDE_PS,                 # supervisor, executable
         0x60_0000 | PDE_P | PDE_W | PDE_U | PDE_PS | NX,    # user rw, no execute
         0x80_0000 | PDE_P | PDE_W | PDE_U | PDE_PS,         # user rwx
         0)                                                  # not present
NXE = "mov ecx, 0xc0000080\nrdmsr\nbts eax, 11\nwrmsr"      # EFER.NXE


def _machine(src: str):
    h = machine(src)
    h.machine.write_physical(PD_1G, struct.pack(f"<{len(PAGES)}Q", *PAGES))
    h.machine.cpu.flush_tlb()
    return h


@pytest.mark.parametrize("nxe", [False, True])
@pytest.mark.parametrize("ring3", [False, True])
def test_call_to_a_non_present_page(ring3: bool, nxe: bool) -> None:
    target = VIRT + 0x1230
    body = f"mov rbx, {target:#x}\ncall rbx\nnop"
    pre = (NXE + "\n" if nxe else "") + (f"{to_ring3('user', rsp=0x6FF00)}\nuser:\n" if ring3 else "")
    h = _machine(pre + body)
    r = h.run_to_end(LIMIT)
    assert r.why == Why.DEAD                                # the runtime's cli; hlt after the fault
    e = one_event(h)
    code = (4 if ring3 else 0) | (0x10 if nxe else 0)
    assert (e.vector, e.error_code, e.cr2, e.rip) == (14, code, target, target)
    ret = h.addr_of("call rbx") + 2
    rsp = 0x6FF00 - 8 if ring3 else bm.KSTACK - 8
    assert e.rsp == rsp                                     # the call pushed its return address
    assert struct.unpack("<Q", h.machine.read_physical(rsp, 8))[0] == ret


def test_user_fetch_from_a_supervisor_page() -> None:
    target = VIRT + PAGE_2M + 0x10
    h = _machine(f"{to_ring3('user', rsp=0x6FF00)}\nuser:\nmov rbx, {target:#x}\njmp rbx")
    h.run_to_end(LIMIT)
    e = one_event(h)
    assert (e.vector, e.error_code, e.cr2, e.rip) == (14, 5, target, target)


@pytest.mark.parametrize("ring3", [False, True])
def test_fetch_from_an_nx_page(ring3: bool) -> None:
    target = VIRT + 2 * PAGE_2M + 0x40
    pre = NXE + "\n" + (f"{to_ring3('user', rsp=0x6FF00)}\nuser:\n" if ring3 else "")
    h = _machine(pre + f"mov rbx, {target:#x}\njmp rbx")
    h.machine.write_physical(0x60_0040, b"\x90\x90\xf4")   # code there, which must not run
    h.run_to_end(LIMIT)
    e = one_event(h)
    assert (e.vector, e.error_code, e.cr2, e.rip) == (14, 0x11 | (4 if ring3 else 0), target, target)


def test_fetch_of_an_executable_page_works() -> None:
    target = VIRT + 3 * PAGE_2M + 0x40
    h = _machine(NXE + f"\n{to_ring3('user', rsp=0x6FF00)}\nuser:\nmov rbx, {target:#x}\njmp rbx")
    h.machine.write_physical(0x80_0040, bytes.fromhex("49c7c0aa000000") + b"\xf4")   # mov r8, 0xaa; hlt
    h.run_to_end(LIMIT)
    e = one_event(h)                                        # the user hlt: #GP(0)
    assert (e.vector, e.error_code, e.rip) == (13, 0, target + 7)
    assert h.regs.r8 == 0xAA


def test_instruction_running_into_a_non_present_page() -> None:
    """A 7-byte instruction whose last 4 bytes are on the next, non-present page:
    #PF with CR2 = that page, RIP = the instruction."""
    start = VIRT + 3 * PAGE_2M + PAGE_2M - 3
    h = _machine(f"mov rbx, {start:#x}\njmp rbx")
    h.machine.write_physical(0x80_0000 + PAGE_2M - 3, bytes.fromhex("49c7c0aa000000"))
    h.run_to_end(LIMIT)
    e = one_event(h)
    assert (e.vector, e.error_code, e.cr2, e.rip) == (14, 0, VIRT + 4 * PAGE_2M, start)


def test_jump_to_a_non_canonical_address_is_gp() -> None:
    h = _machine("mov rbx, 0x0000900000000000\njmp rbx")
    h.run_to_end(LIMIT)
    e = one_event(h)
    assert (e.vector, e.error_code) == (13, 0)
