"""The C delivery fast path (``CPU.deliver_fast``) against the general Python path.

Each case builds one machine state, delivers a hardware interrupt twice from
the same snapshot, once through the fast path and once with it switched off,
and compares everything delivery may touch: RIP/RSP/RFLAGS, CS/SS, the bytes
of the stack around the frame and the page-table entries (Accessed/Dirty).
Cases the fast path must take are checked to have been taken; cases it must
decline (IST, a not-present gate, a stack that faults, legacy paths) are
checked to have been declined, with the general path's result standing.
"""
from __future__ import annotations

import struct

import pytest
from vmk.boot.loader import PML4_ADDR
from vmk.machine.cpu import Reg
from vmk.testing import Harness
from vmk.testing import baremetal as bm
from vmk.testing.baremetal import install_runtime

GATE_INT, GATE_TRAP = 0xE, 0xF
PD_1G = PML4_ADDR + 0x3000          # page directory of 1..2 GiB (2 MiB pages, identity)
VIRT = 0x4000_0000
PAGE_2M = 0x20_0000
PDE_P_W_PS = 0x83
VECTOR = 0x41
LOW_2M = 0x40_0000                  # RAM that the 1 GiB window is pointed at


def _machine() -> Harness:
    h = Harness.from_asm("nop\nnop\nhlt")
    install_runtime(h)
    h.run(max_instructions=1)                   # the runtime's setup is done; RIP is in the test code
    return h


def _gate(h: Harness, vector: int, *, gate_type: int = GATE_INT, ist: int = 0, present: bool = True) -> int:
    handler = bm.STUBS + 16 * vector
    attr = (0x80 if present else 0) | gate_type
    h.machine.write_physical(bm.IDT_BASE + 16 * vector, struct.pack(
        "<HHBBHII", handler & 0xFFFF, bm.SEL.KCODE, ist, attr, (handler >> 16) & 0xFFFF, handler >> 32, 0))
    return handler


def _state(h: Harness, lo: int, hi: int) -> tuple:
    cpu = h.machine.cpu
    regs = tuple(cpu.reg(r) for r in (Reg.RIP, Reg.RSP, Reg.RFLAGS, Reg.CS, Reg.SS))
    tables = h.machine.read_physical(PML4_ADDR, 0x6000)
    return regs, h.machine.read_physical(lo, hi - lo), tables


def _deliver_both(h: Harness, rsp: int, rflags: int = 0x202, phys: int | None = None
                  ) -> tuple[tuple, tuple, bool, str, str]:
    """(fast state, general state, fast path taken, fast outcome, general outcome).
    ``phys``: where the stack top is in RAM when ``rsp`` is not identity-mapped."""
    m = h.machine
    cpu = m.cpu
    cpu.set_reg(Reg.RSP, rsp)
    cpu.set_reg(Reg.RFLAGS, rflags)
    top = rsp if phys is None else phys
    lo, hi = (top & ~0xFFF) - 0x2000, (top & ~0xFFF) + 0x2000
    snap = m.snapshot()
    taken = []
    real = cpu.deliver_fast

    def spy(vector, ec):
        ok = real(vector, ec)
        taken.append(ok)
        return ok

    def outcome() -> str:
        """Which vectors were delivered (a fault on the way is delivered instead), or the triple fault."""
        before = dict(m.idt.delivered)
        try:
            m.idt.deliver(VECTOR, external=True)
        except Exception as e:                  # TripleFault
            return f"{type(e).__name__}: {e}"
        return " ".join(f"{v:#x}" for v, n in sorted(m.idt.delivered.items()) if n != before.get(v, 0))

    cpu.deliver_fast = spy
    fast_out = outcome()
    fast = _state(h, lo, hi)
    m.restore(snap)
    cpu.deliver_fast = lambda vector, ec: False
    slow_out = outcome()
    slow = _state(h, lo, hi)
    cpu.deliver_fast = real
    return fast, slow, bool(taken and taken[0]), fast_out, slow_out


@pytest.mark.parametrize("rsp", [
    0x7_0000,               # aligned, mid page
    0x7_0008,               # aligned down to 16 first
    0x7_0018,               # the 40-byte frame straddles a 4 KiB boundary
    0x7_0020,
])
@pytest.mark.parametrize("gate_type", [GATE_INT, GATE_TRAP])
def test_fast_path_matches_the_general_path(rsp: int, gate_type: int) -> None:
    h = _machine()
    _gate(h, VECTOR, gate_type=gate_type)
    fast, slow, taken, fo, so = _deliver_both(h, rsp)
    assert taken, "the fast path declined a plain ring-0 interrupt"
    assert fo == so == f"{VECTOR:#x}"
    assert fast == slow
    rip, new_rsp, rflags = fast[0][:3]
    assert rip == bm.STUBS + 16 * VECTOR
    assert new_rsp == (rsp & ~0xF) - 40
    assert bool(rflags & 0x200) == (gate_type == GATE_TRAP)


def test_frame_across_a_2mib_page_sets_accessed_and_dirty_on_both() -> None:
    h = _machine()
    _gate(h, VECTOR)
    # 1 GiB..: two 2 MiB pages (RAM at 4 and 6 MiB), A/D clear; the frame straddles their boundary.
    h.machine.write_physical(PD_1G, struct.pack("<2Q", LOW_2M | PDE_P_W_PS, (LOW_2M + PAGE_2M) | PDE_P_W_PS))
    h.machine.cpu.flush_tlb()
    fast, slow, taken, fo, so = _deliver_both(h, VIRT + PAGE_2M + 0x10, phys=LOW_2M + PAGE_2M + 0x10)
    assert taken and fo == so == f"{VECTOR:#x}" and fast == slow
    pdes = struct.unpack("<2Q", fast[2][0x3000:0x3010])
    assert all(e & 0x60 == 0x60 for e in pdes), [hex(e) for e in pdes]


@pytest.mark.parametrize("case", ["ist", "not-present", "stack-faults"])
def test_fast_path_declines_what_it_does_not_do(case: str) -> None:
    h = _machine()
    rsp = 0x7_0000
    if case == "ist":
        _gate(h, VECTOR, ist=1)
    elif case == "not-present":
        _gate(h, VECTOR, present=False)
    else:
        _gate(h, VECTOR)
        # the page below the stack top is not mapped: the first pushes fit, the rest fault
        h.machine.write_physical(PD_1G, struct.pack("<2Q", 0, (LOW_2M + PAGE_2M) | PDE_P_W_PS))
        h.machine.cpu.flush_tlb()
        rsp = VIRT + PAGE_2M + 0x10
    fast, slow, taken, fo, so = _deliver_both(h, rsp, phys=LOW_2M + PAGE_2M + 0x10 if rsp >= VIRT else None)
    assert not taken
    assert fast == slow and fo == so
    if case == "ist":
        assert fo == f"{VECTOR:#x}" and fast[0][1] != (rsp & ~0xF) - 40     # on the IST stack
    elif case == "not-present":
        assert fo == "0xb"                      # #NP delivered instead
    else:
        # #PF on the push, its own push faults too (#DF), and so does #DF's: all on one stack
        assert fo.startswith("TripleFault") and "#PF" in fo
