"""MC146818A RTC/CMOS register semantics against the datasheet, on a bare virtual clock."""
from __future__ import annotations

import random

from vmk.machine.clock import Clock
from vmk.machine.devices.rtc_cmos import (DEFAULT_BASE, RTC, UIP_NS, Index, civil_of, epoch_of,
                                          parse_rtc_base)
from vmk.machine.irq import IrqLine

S = 1_000_000_000


class Rig:
    def __init__(self, base: int = DEFAULT_BASE) -> None:
        self.clock = Clock()
        self.irq = IrqLine("irq8")
        self.rtc = RTC(self.clock, self.irq, base=base, cmos={0x15: 0x80, 0x16: 0x02})

    def rd(self, i: int) -> int:
        self.rtc.write(0, 1, i)
        return self.rtc.read(1, 1)

    def wr(self, i: int, v: int) -> None:
        self.rtc.write(0, 1, i)
        self.rtc.write(1, 1, v)

    def at(self, t: int) -> None:
        """Advance to t, firing the RTC's timer on the way (as the machine's run loop does)."""
        while (d := self.clock.next_deadline()) is not None and d <= t:
            self.clock.advance_to(d)
            self.clock.run_due()
        self.clock.advance_to(t)


def test_calendar_and_base() -> None:
    assert epoch_of(2000, 1, 1) == DEFAULT_BASE == parse_rtc_base("2000-01-01T00:00:00")
    assert civil_of(DEFAULT_BASE) == (2000, 1, 1, 0, 0, 0, 7)            # a Saturday: day 7 (Sunday = 1)
    assert civil_of(epoch_of(2024, 2, 29, 13, 5, 9)) == (2024, 2, 29, 13, 5, 9, 5)
    assert epoch_of(1999, 13, 1) == epoch_of(2000, 1, 1)                  # carried, never raises


def test_power_on_registers_and_cmos() -> None:
    r = Rig()
    assert [r.rd(i) for i in (0, 2, 4, 6, 7, 8, 9, Index.CENTURY)] == [0, 0, 0, 7, 1, 1, 0, 0x20]
    assert (r.rd(0x0A), r.rd(0x0B), r.rd(0x0C), r.rd(0x0D)) == (0x26, 0x02, 0x00, 0x80)
    assert r.rd(0x15) | r.rd(0x16) << 8 == 640
    r.rtc.write(0, 1, 0x80 | 0x15)                 # bit 7 masks the NMI; the index is 7 bits
    assert r.rtc.nmi_masked and r.rtc.read(1, 1) == 0x80
    assert r.rtc.read(0, 1) == 0xFF                # the index port is write-only


def test_binary_and_12_hour_formats() -> None:
    r = Rig(parse_rtc_base("2021-07-04T15:09:08"))
    assert [r.rd(i) for i in (0, 2, 4, 7, 8, 9)] == [0x08, 0x09, 0x15, 0x04, 0x07, 0x21]
    r.wr(0x0B, 0x06)                               # binary, 24 h
    assert [r.rd(i) for i in (0, 2, 4, 7, 8, 9)] == [8, 9, 15, 4, 7, 21]
    r.wr(0x0B, 0x04)                               # binary, 12 h: 3 PM
    assert r.rd(4) == 0x83
    r.wr(0x0B, 0x00)                               # BCD, 12 h
    assert r.rd(4) == 0x83
    r.wr(4, 0x12)                                  # 12 AM written while running: midnight
    r.wr(0x0B, 0x02)
    assert r.rd(4) == 0x00 and r.rd(2) == 0x09


def test_updates_and_uip_window() -> None:
    r = Rig()
    r.at(S - UIP_NS - 1)
    assert not r.rd(0x0A) & 0x80 and r.rd(0) == 0
    r.at(S - UIP_NS)
    assert r.rd(0x0A) & 0x80 and r.rd(0) == 0      # UIP: 244 us before the update
    r.at(S)
    assert not r.rd(0x0A) & 0x80 and r.rd(0) == 1  # the update: new second, UIP low
    assert r.rd(0x0C) == 0x50                      # UF (and PF, 1024 Hz) set with interrupts off; no IRQF
    assert r.rd(0x0C) == 0x00                      # reading C cleared it


def test_set_stops_updates_and_clears_uie() -> None:
    r = Rig()
    r.wr(0x0B, 0x12)                               # UIE
    r.wr(0x0B, 0x82)                               # SET: UIE is cleared (datasheet)
    assert r.rd(0x0B) == 0x82
    for i, v in ((0, 0x58), (2, 0x59), (4, 0x23), (7, 0x31), (8, 0x12), (9, 0x99), (0x32, 0x19)):
        r.wr(i, v)
    r.at(5 * S)
    assert r.rd(0) == 0x58                         # held while SET
    r.wr(0x0B, 0x02)
    r.at(6 * S)                                    # the divider phase is kept: the next update at 6 s
    r.at(7 * S)
    assert [r.rd(i) for i in (0, 2, 4, 6, 7, 8, 9, 0x32)] == [0x00, 0, 0, 7, 1, 1, 0, 0x20]


def test_update_interrupt_on_irq8_until_c_is_read() -> None:
    r = Rig()
    r.wr(0x0B, 0x12)
    r.at(S - 1)
    assert not r.irq.level
    r.at(S)
    assert r.irq.level
    assert r.rd(0x0C) == 0xD0 and not r.irq.level      # IRQF | PF (1024 Hz, not enabled) | UF


def test_periodic_rate_and_count() -> None:
    r = Rig()
    r.wr(0x0A, 0x23)                               # RS = 3: 8192 Hz, 122.0703125 us
    r.wr(0x0B, 0x42)
    edges = 0
    t = 0
    while t < S // 8:
        d = r.clock.next_deadline()
        r.at(d)
        t = d
        assert r.irq.level
        assert r.rd(0x0C) & 0xC0 == 0xC0
        edges += 1
    assert edges == 1024 and t == S // 8           # every 122.07 us, on the 32.768 kHz grid
    assert r.clock.next_deadline() == -(-(1025 * 4 * S) // 32768)


def test_alarm_with_dont_care_bytes() -> None:
    r = Rig()
    r.wr(1, 0x05)
    r.wr(3, 0xC0)
    r.wr(5, 0xC0)
    r.wr(0x0B, 0x22)
    assert r.clock.next_deadline() == 5 * S
    r.at(5 * S)
    assert r.irq.level and r.rd(0x0C) == 0xF0      # IRQF | PF | AF | UF
    assert r.clock.next_deadline() == 65 * S       # the next minute


def test_divider_reset_delays_the_first_update_500ms() -> None:
    r = Rig()
    r.at(S // 4)
    r.wr(0x0A, 0x70)                               # divider in reset: time stops
    r.at(10 * S)
    assert r.rd(0) == 0
    r.wr(0x0A, 0x26)
    r.at(10 * S + S // 2 - 1)
    assert r.rd(0) == 0
    r.at(10 * S + S // 2)
    assert r.rd(0) == 1


def test_any_register_values_never_raise() -> None:
    rng = random.Random(12)
    r = Rig()
    for _ in range(5000):
        r.rtc.write(rng.choice((0, 1)), 1, rng.randrange(256))
        r.rtc.read(rng.choice((0, 1)), 1)
        r.at(r.clock.now + rng.randrange(3 * S // 1000))
    r.rtc.restore(r.rtc.snapshot())
