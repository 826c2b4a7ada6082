"""HPET register semantics against the IA-PC HPET specification 1.0a, on a bare virtual clock."""
from __future__ import annotations

import random

from vmk.machine.clock import Clock
from vmk.machine.devices.hpet import HPET
from vmk.machine.irq import IrqLine


class Rig:
    def __init__(self) -> None:
        self.clock = Clock()
        self.legacy = (IrqLine("l0"), IrqLine("l1"))
        self.gsi2 = IrqLine("gsi2")
        self.legacy_calls: list[bool] = []
        self.hpet = HPET(self.clock, self.legacy, {2: self.gsi2}, on_legacy=self.legacy_calls.append)
        self.edges: list[tuple[str, int]] = []
        for line in (*self.legacy, self.gsi2):
            line.connect(lambda level, name=line.name: level and self.edges.append((name, self.clock.now)))

    def rd(self, off: int, size: int = 4) -> int:
        return self.hpet.read(off, size)

    def wr(self, off: int, v: int, size: int = 4) -> None:
        self.hpet.write(off, size, v)

    def at(self, t: int) -> None:
        while (d := self.clock.next_deadline()) is not None and d <= t:
            self.clock.advance_to(d)
            self.clock.run_due()
        self.clock.advance_to(t)


def test_capabilities_and_reset_values() -> None:
    r = Rig()
    assert r.rd(0x000, 8) == 10_000_000 << 32 | 0x8086A201
    assert (r.rd(0x010), r.rd(0x020), r.rd(0x0F0, 8)) == (0, 0, 0)
    for n in range(3):
        assert r.rd(0x100 + 0x20 * n, 8) == 0x4 << 32 | 0x30        # route cap: pin 2; periodic, 64-bit
        assert r.rd(0x108 + 0x20 * n, 8) == (1 << 64) - 1


def test_counter_is_floor_of_elapsed_ns_over_10_while_enabled() -> None:
    r = Rig()
    r.at(1_000)
    assert r.rd(0xF0) == 0                                      # halted
    r.wr(0x10, 1)
    r.at(1_009)
    assert r.rd(0xF0) == 0
    r.at(1_010)
    assert r.rd(0xF0) == 1
    r.at(1_000 + 123_456_789)
    assert r.rd(0xF0, 8) == 12_345_678
    r.wr(0x10, 0)
    r.at(10**9)
    assert r.rd(0xF0, 8) == 12_345_678                          # held
    r.wr(0xF0, 0xFFFF_FFF0)
    r.wr(0xF4, 0)
    r.wr(0x10, 1)
    r.at(10**9 + 200)
    assert r.rd(0xF0) == 4 and r.rd(0xF4) == 1                  # 0xFFFFFFF0 + 20 carries into the high dword


def test_one_shot_edge_via_route_fires_once_at_the_comparator() -> None:
    r = Rig()
    r.wr(0x108, 1000)
    r.wr(0x10C, 0)
    r.wr(0x100, 0x4 | 2 << 9)                                   # enabled, edge, IO-APIC pin 2
    assert r.rd(0x100) >> 9 & 0x1F == 2
    r.wr(0x10, 1)
    r.at(100_000)
    assert r.edges == [("gsi2", 10_000)]
    assert r.rd(0x108) == 1000 and r.rd(0x20) == 0              # edge mode: no status bit


def test_periodic_with_val_set_adds_the_period() -> None:
    r = Rig()
    r.wr(0x100, 0x4 | 0x8 | 0x40 | 2 << 9)
    r.wr(0x108, 500, 8)                                         # VAL_SET: the comparator
    r.wr(0x108, 300, 8)                                         # then the period only
    assert r.rd(0x100) & 0x40 == 0 and r.rd(0x108) == 500
    r.wr(0x10, 1)
    r.at(12_000)
    assert [t for _, t in r.edges] == [5_000, 8_000, 11_000]
    assert r.rd(0x108) == 1400


def test_32_bit_mode_wraps_and_level_status() -> None:
    r = Rig()
    r.wr(0xF0, 0xFFFF_FFFE)
    r.wr(0xF4, 0)
    r.wr(0x108, 0x1_0000_0001, 8)
    r.wr(0x100, 0x4 | 0x2 | 0x100 | 2 << 9)                    # level, 32-bit
    assert r.rd(0x10C) == 0                                     # the comparator is truncated
    r.wr(0x10, 1)
    r.at(29)
    assert not r.gsi2.level
    r.at(30)                                                    # 0xFFFFFFFE + 3 = 0x1_00000001: low 32 bits match
    assert r.gsi2.level and r.rd(0x20) == 1
    r.wr(0x20, 1)                                               # write 1 to clear
    assert not r.gsi2.level and r.rd(0x20) == 0


def test_legacy_replacement_routes_timers_0_and_1() -> None:
    r = Rig()
    r.wr(0x108, 10)                                             # a dword write keeps the high half
    assert r.rd(0x108, 8) == 0xFFFF_FFFF_0000_000A
    r.wr(0x108, 10, 8)
    r.wr(0x128, 20, 8)
    r.wr(0x100, 0x4)
    r.wr(0x120, 0x4)
    r.wr(0x10, 3)
    assert r.legacy_calls == [True]
    r.at(1000)
    assert r.edges == [("l0", 100), ("l1", 200)]
    r.wr(0x10, 1)
    assert r.legacy_calls == [True, False]


def test_unsupported_route_is_not_taken() -> None:
    r = Rig()
    r.wr(0x100, 5 << 9)
    assert r.rd(0x100) >> 9 & 0x1F == 0


def test_any_register_values_never_raise() -> None:
    rng = random.Random(7)
    r = Rig()
    for _ in range(5000):
        off = rng.randrange(0x400) & ~3
        size = rng.choice((1, 2, 4, 8))
        r.wr(off, rng.randrange(1 << (8 * size)), size)
        r.rd(off, size)
        r.at(r.clock.now + rng.randrange(2000))
    r.hpet.restore(r.hpet.snapshot())
