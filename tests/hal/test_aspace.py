"""Container address spaces on the real CPU: ring 3, own page tables, isolation."""
from __future__ import annotations

import struct

import pytest

from vmk.hal.aspace import (KERNEL_RESERVED, PAGE, USER_CODE_BASE, USER_STACK_TOP, AddressSpace, FrameAllocator,
                            OutOfMemory, UserFault)
from vmk.hal.context import ContextSwitcher, GuestContext, enter_user_mode
from vmk.machine.cpu import Reg
from vmk.machine.pc import Machine, MachineConfig
from vmk.testing import assemble


class VmSink:
    """A stand-in for the HAL's interrupt sink: records CPU events, stops the machine."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.events: list[tuple[int, int | None, int]] = []

    def deliver(self, vector, *, error_code=None, software=False, external=True, return_rip=None, cr2=None):
        self.events.append((vector, error_code, cr2 if cr2 is not None else 0))
        self.machine.stop(f"vector {vector}")


@pytest.fixture
def vm():
    m = Machine(MachineConfig(mem=16 << 20))
    sink = VmSink(m)
    m.sink = sink
    enter_user_mode(m)
    m.ports.write(0x21, 1, 0xFF)              # the HAL masks the 8259s (the PIT runs from reset)
    m.ports.write(0xA1, 1, 0xFF)
    frames = FrameAllocator(m.ram, KERNEL_RESERVED, m.ram.size)
    frames.on_code_write = m.cpu.uc.ctl_flush_tb
    return m, sink, frames, ContextSwitcher(m.cpu)


def load_program(aspace: AddressSpace, src: str) -> GuestContext:
    code = assemble(src, USER_CODE_BASE)
    aspace.map(USER_CODE_BASE, (len(code) + PAGE - 1) & ~(PAGE - 1) or PAGE, writable=False, executable=True)
    aspace.write(USER_CODE_BASE, code, force=True)
    aspace.map(USER_STACK_TOP - 4 * PAGE, 4 * PAGE)
    aspace.map(0x600000, PAGE)
    return GuestContext.start(USER_CODE_BASE, USER_STACK_TOP)


def test_two_containers_same_addresses_different_memory(vm) -> None:
    m, sink, frames, sw = vm
    a, b = AddressSpace(frames, 1 << 20), AddressSpace(frames, 1 << 20)
    prog = "mov rbx, 0x600000\n mov [rbx], rdi\n mov rax, [rbx]\n ud2"
    ca, cb = load_program(a, prog), load_program(b, prog)
    ca["rdi"], cb["rdi"] = 0x1111, 0x2222
    sw.load(ca, a.cr3)
    m.run(until=m.now + 1000)
    sw.save(ca)
    sw.load(cb, b.cr3)
    m.run(until=m.now + 1000)
    sw.save(cb)
    assert [e[0] for e in sink.events] == [6, 6]            # both ran to their ud2
    assert ca["rax"] == 0x1111 and cb["rax"] == 0x2222
    assert a.read(0x600000, 8) == struct.pack("<Q", 0x1111)
    assert b.read(0x600000, 8) == struct.pack("<Q", 0x2222)
    assert m.cpu.cpl() == 3


def test_container_cannot_touch_unmapped_or_readonly_memory(vm) -> None:
    m, sink, frames, sw = vm
    a = AddressSpace(frames, 1 << 20)
    # another container's frame is not mapped here: any access is a page fault
    b = AddressSpace(frames, 1 << 20)
    b.map(0x600000, PAGE)
    foreign_phys = b.pages[0x600000][0]
    ctx = load_program(a, f"mov rbx, {foreign_phys:#x}\n mov rax, [rbx]\n ud2")
    sw.load(ctx, a.cr3)
    m.run(until=m.now + 1000)
    assert sink.events[-1][0] == 14 and sink.events[-1][1] == 4 | 0     # user read, not present
    assert sink.events[-1][2] == foreign_phys
    # its own code page is read-only
    ctx = load_program(a, f"mov rbx, {USER_CODE_BASE:#x}\n mov byte ptr [rbx], 1\n ud2")
    sw.load(ctx, a.cr3)
    m.run(until=m.now + 1000)
    assert sink.events[-1][0] == 14 and sink.events[-1][1] == 4 | 2 | 1  # user write, protection


def test_page_tables_are_not_reachable_from_the_container(vm) -> None:
    m, sink, frames, sw = vm
    a = AddressSpace(frames, 1 << 20)
    ctx = load_program(a, f"mov rbx, {a.cr3:#x}\n mov qword ptr [rbx], 0\n ud2")
    sw.load(ctx, a.cr3)
    m.run(until=m.now + 1000)
    assert sink.events[-1][0] == 14
    assert struct.unpack_from("<Q", m.ram.buf, a.cr3)[0] != 0              # PML4 intact


def test_privileged_instructions_fault_in_ring3(vm) -> None:
    m, sink, frames, sw = vm
    a = AddressSpace(frames, 1 << 20)
    for src in ("cli", "mov rax, cr3", "hlt"):
        ctx = load_program(a, src + "\n ud2")
        sw.load(ctx, a.cr3)
        m.run(until=m.now + 1000)
        assert sink.events[-1][:2] == (13, 0), src


def test_kernel_side_pointer_checks(vm) -> None:
    _, _, frames, _ = vm
    a = AddressSpace(frames, 1 << 20)
    a.map(0x600000, 2 * PAGE)
    a.map(0x700000, PAGE, writable=False)
    a.check(0x600000, 2 * PAGE, write=True)
    a.write(0x600ffc, b"abcdefgh")                       # crosses a page boundary
    assert a.read(0x600ffc, 8) == b"abcdefgh"
    for va, n, w in ((0x5ff000, 8, False), (0x601ffc, 8, False), (0x700000, 1, True), (-8, 8, False),
                     (0x7FFF_FFFF_FFFF, 16, False)):
        with pytest.raises(UserFault):
            a.check(va, n, write=w)


def test_memory_limit_and_destroy_return_frames(vm) -> None:
    _, _, frames, _ = vm
    before = frames.available
    a = AddressSpace(frames, 8 * PAGE)
    with pytest.raises(OutOfMemory):
        a.map(0x600000, 16 * PAGE)
    assert a.used <= 8 * PAGE
    a.destroy()
    assert frames.available == before


def test_context_switch_round_trip(vm) -> None:
    m, _, frames, sw = vm
    ctx = GuestContext.start(0x400000, 0x7fff0000, arg=42)
    ctx["r15"] = 0xDEADBEEF
    ctx["fs_base"] = 0x12340000
    sw.load(ctx, AddressSpace(frames, 1 << 20).cr3)
    assert m.cpu.reg(Reg.R15) == 0xDEADBEEF and m.cpu.reg(Reg.RDI) == 42
    out = GuestContext()
    sw.save(out)
    assert out.regs == ctx.regs
