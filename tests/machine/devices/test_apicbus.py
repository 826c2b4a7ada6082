"""The APIC bus: ICR delivery modes and shorthands, destinations, IO-APIC messages (no Unicorn)."""
from __future__ import annotations

import pytest

from vmk.machine.clock import Clock
from vmk.machine.devices.apicbus import ApicBus
from vmk.machine.devices.ioapic import IOAPIC
from vmk.machine.devices.lapic import LocalAPIC, Reg

SVR_ON = 0x1FF
FIXED, LOWEST, NMI, INIT, STARTUP = 0 << 8, 1 << 8, 4 << 8, 5 << 8, 6 << 8
LOGICAL = 1 << 11
PENDING = 1 << 12
ASSERT = 1 << 14
LEVEL = 1 << 15
SELF, ALL, OTHERS = 1 << 18, 2 << 18, 3 << 18


class Cpus:
    """Four APICs on a bus, recording what the machine would do with INIT and STARTUP."""

    def __init__(self, n: int = 4) -> None:
        self.clock = Clock()
        self.apics = [LocalAPIC(self.clock, apic_id=k, bsp=k == 0) for k in range(n)]
        self.events: list[tuple] = []
        self.received: list[int] = []
        self.bus = ApicBus(self.apics, init=lambda k: self.events.append(("init", k)),
                           startup=lambda k, v: self.events.append(("sipi", k, v)),
                           received=self.received.append)
        for a in self.apics:
            a.write(Reg.SVR, 4, SVR_ON)

    def icr(self, src: int, lo: int, dest: int = 0) -> None:
        self.apics[src].write(Reg.ICR_HI, 4, dest << 24)
        self.apics[src].write(Reg.ICR_LO, 4, lo)

    def irr(self, vector: int) -> list[int]:
        return [k for k, a in enumerate(self.apics) if a.read(Reg.IRR0 + 0x10 * (vector // 32), 4) >> (vector % 32) & 1]


def test_id_register_per_apic() -> None:
    c = Cpus()
    assert [a.read(Reg.ID, 4) >> 24 for a in c.apics] == [0, 1, 2, 3]


def test_only_the_bsp_apic_leaves_reset_in_virtual_wire_mode() -> None:
    c = Cpus()
    assert c.apics[0].read(Reg.LVT_LINT0, 4) == 0x700
    assert c.apics[1].read(Reg.LVT_LINT0, 4) == 1 << 16


def test_fixed_physical_reaches_only_the_named_apic() -> None:
    c = Cpus()
    c.icr(0, FIXED | ASSERT | 0x40, dest=2)
    assert c.irr(0x40) == [2]
    assert c.received == [2]
    assert c.apics[0].read(Reg.ICR_LO, 4) & PENDING == 0       # delivered at the write: never "send pending"
    assert c.apics[2].pending() and not c.apics[0].pending()


@pytest.mark.parametrize(("shorthand", "expected"), [(SELF, [1]), (ALL, [0, 1, 2, 3]), (OTHERS, [0, 2, 3])])
def test_shorthands(shorthand: int, expected: list[int]) -> None:
    c = Cpus()
    c.icr(1, FIXED | ASSERT | shorthand | 0x50, dest=3)    # the destination field is ignored with a shorthand
    assert c.irr(0x50) == expected
    assert c.received == [k for k in expected if k != 1]


def test_physical_broadcast_0xff() -> None:
    c = Cpus()
    c.icr(3, FIXED | 0x51, dest=0xFF)
    assert c.irr(0x51) == [0, 1, 2, 3]


def test_logical_flat_and_cluster() -> None:
    c = Cpus()
    for k, a in enumerate(c.apics):
        a.write(Reg.LDR, 4, (1 << k) << 24)                 # flat model: one bit each
    c.icr(0, FIXED | LOGICAL | 0x60, dest=0b1010)
    assert c.irr(0x60) == [1, 3]
    for k, a in enumerate(c.apics):
        a.write(Reg.DFR, 4, 0x0FFFFFFF)                     # cluster model
        a.write(Reg.LDR, 4, ((k // 2) << 4 | 1 << (k % 2)) << 24)
    c.icr(0, FIXED | LOGICAL | 0x61, dest=0x13)             # cluster 1, members 0 and 1
    assert c.irr(0x61) == [2, 3]


def test_lowest_priority_goes_to_one_apic_deterministically() -> None:
    c = Cpus()
    c.icr(0, LOWEST | 0x70, dest=0xFF)
    assert c.irr(0x70) == [0]                                # equal TPRs: the lowest APIC ID
    c.apics[0].write(Reg.TPR, 4, 0x20)
    c.apics[1].write(Reg.TPR, 4, 0x10)
    c.apics[2].write(Reg.TPR, 4, 0x10)
    c.apics[3].write(Reg.TPR, 4, 0x30)
    c.icr(0, LOWEST | 0x71, dest=0xFF)
    assert c.irr(0x71) == [1]                                # the lowest TPR, then the lowest ID


def test_illegal_vector_is_not_sent() -> None:
    c = Cpus()
    c.icr(0, FIXED | 0x05, dest=1)
    assert c.irr(0x05) == [] and c.received == []
    c.apics[0].write(Reg.ESR, 4, 0)
    assert c.apics[0].read(Reg.ESR, 4) == 1 << 5            # send illegal vector


def test_init_sipi_sipi() -> None:
    c = Cpus()
    c.apics[2].write(Reg.LVT_TIMER, 4, 0x30)
    c.icr(0, INIT | ASSERT | LEVEL, dest=2)
    assert c.events == [("init", 2)]
    c.icr(0, INIT | LEVEL, dest=2, )                         # INIT level de-assert: no effect
    c.icr(0, INIT | LEVEL | ALL)
    assert c.events == [("init", 2)]
    c.icr(0, STARTUP | ASSERT | 0x07, dest=2)
    c.icr(0, STARTUP | ASSERT | 0x07, dest=2)
    assert c.events == [("init", 2), ("sipi", 2, 7), ("sipi", 2, 7)]   # the machine ignores the second


def test_nmi_ipi() -> None:
    c = Cpus()
    c.icr(0, NMI | OTHERS)
    assert [a.nmi_pending for a in c.apics] == [False, True, True, True]


def test_ioapic_messages_follow_their_destination() -> None:
    c = Cpus()
    io = IOAPIC(lambda v, lvl: None, route=c.bus.ioapic_message)
    io.write(0, 4, 0x10 + 2 * 5)
    io.write(0x10, 4, 0x45)                                   # pin 5: vector 0x45, fixed, physical, edge
    io.write(0, 4, 0x11 + 2 * 5)
    io.write(0x10, 4, 3 << 24)                                # destination APIC ID 3
    io.set_irq(5, True)
    assert c.irr(0x45) == [3]
    for k, a in enumerate(c.apics):
        a.write(Reg.LDR, 4, (1 << k) << 24)
    io.write(0, 4, 0x10 + 2 * 6)
    io.write(0x10, 4, 0x46 | LOGICAL | LOWEST | LEVEL)        # pin 6: logical, lowest priority, level
    io.write(0, 4, 0x11 + 2 * 6)
    io.write(0x10, 4, 0b0110 << 24)
    io.set_irq(6, True)
    assert c.irr(0x46) == [1]
    assert c.apics[1].read(Reg.TMR0 + 0x10 * 2, 4) >> 6 & 1   # level: TMR set
