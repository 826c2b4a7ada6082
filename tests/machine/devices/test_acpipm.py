"""The ACPI PM1a event/control registers and PM timer, on a virtual clock (no Unicorn).

The PM timer runs at 3.579545 MHz (ACPI §4.8.3.3): tick(ns) = floor(ns * 3579545 / 1e9),
24 bits; TMR_STS is set when bit 23 of the counter changes, i.e. every 2^23 ticks,
first at ns ceil(2^23 * 1e9 / 3579545) = 2_343_484_438, then at 4_686_968_875 (2^24) (written out below).
"""
from __future__ import annotations

import pytest

from vmk.machine.clock import Clock
from vmk.machine.devices.acpipm import AcpiPm
from vmk.machine.irq import IrqLine

PM1_STS, PM1_EN, PM1_CNT, PM_TMR = 0x0, 0x2, 0x4, 0x8
TMR_STS = TMR_EN = 1 << 0
PWRBTN = 1 << 8
SCI_EN = 1 << 0
SLP_EN = 1 << 13
FIRST_TOGGLE_NS = 2_343_484_438        # ceil(2**23 * 10**9 / 3579545)
WRAP_NS = 4_686_968_875                # ceil(2**24 * 10**9 / 3579545)


class Rig:
    def __init__(self) -> None:
        self.clock = Clock()
        self.sci = IrqLine("irq9")
        self.offs = 0
        self.logs: list[str] = []
        self.pm = AcpiPm(self.clock, self.sci, self._off, log=self.logs.append)

    def _off(self) -> None:
        self.offs += 1

    def at(self, ns: int) -> None:
        while (d := self.clock.next_deadline()) is not None and d <= ns:
            self.clock.advance_to(d)
            self.clock.run_due()
        self.clock.advance_to(ns)
        self.clock.run_due()


@pytest.fixture
def rig() -> Rig:
    return Rig()


@pytest.mark.parametrize("ns,ticks", [(0, 0), (279, 0), (280, 1), (1_000_000_000, 3_579_545),
                                      (4_686_968_874, 0xFFFFFF), (4_686_968_875, 0)])
def test_pm_timer_counts_the_virtual_clock(rig: Rig, ns: int, ticks: int) -> None:
    rig.at(ns)
    assert rig.pm.read(PM_TMR, 4) == ticks


def test_pm_timer_is_24_bits_and_wraps(rig: Rig) -> None:
    rig.at(WRAP_NS - 1)
    assert rig.pm.read(PM_TMR, 4) == 0xFFFFFF
    rig.at(WRAP_NS + 280)                  # tick 2^24 + 1
    assert rig.pm.read(PM_TMR, 4) == 1     # wrapped, bits 31:24 read 0


def test_pm_timer_byte_reads(rig: Rig) -> None:
    rig.at(1_000_000_000)                  # 3579545 = 0x369E99
    assert [rig.pm.read(PM_TMR + i, 1) for i in range(4)] == [0x99, 0x9E, 0x36, 0x00]
    assert rig.pm.read(PM_TMR, 2) == 0x9E99


def test_timer_writes_are_ignored(rig: Rig) -> None:
    rig.at(1_000_000_000)
    rig.pm.write(PM_TMR, 4, 0)
    assert rig.pm.read(PM_TMR, 4) == 3_579_545


def test_tmr_sts_sets_at_bit_23_and_clears_by_writing_one(rig: Rig) -> None:
    rig.at(FIRST_TOGGLE_NS - 1)
    assert rig.pm.read(PM1_STS, 2) & TMR_STS == 0
    rig.at(FIRST_TOGGLE_NS)
    assert rig.pm.read(PM1_STS, 2) & TMR_STS
    rig.pm.write(PM1_STS, 2, 0)            # writing 0 changes nothing
    assert rig.pm.read(PM1_STS, 2) & TMR_STS
    rig.pm.write(PM1_STS, 2, TMR_STS)
    assert rig.pm.read(PM1_STS, 2) & TMR_STS == 0


def test_tmr_en_raises_the_sci_at_the_toggle(rig: Rig) -> None:
    rig.pm.write(PM1_EN, 2, TMR_EN)
    assert rig.clock.next_deadline() == FIRST_TOGGLE_NS
    rig.at(FIRST_TOGGLE_NS - 1)
    assert not rig.sci.level
    rig.at(FIRST_TOGGLE_NS)
    assert rig.sci.level                   # level, held until the status is cleared
    rig.pm.write(PM1_STS, 2, TMR_STS)
    assert not rig.sci.level
    assert rig.clock.next_deadline() == WRAP_NS
    rig.pm.write(PM1_EN, 2, 0)
    assert rig.clock.next_deadline() is None


def test_power_button_status_and_enable(rig: Rig) -> None:
    rig.pm.set_status(PWRBTN)
    assert rig.pm.read(PM1_STS, 2) == PWRBTN and not rig.sci.level
    rig.pm.write(PM1_EN + 1, 1, PWRBTN >> 8)           # byte write to the high half of PM1_EN
    assert rig.pm.read(PM1_EN, 2) == PWRBTN and rig.sci.level
    rig.pm.write(PM1_STS, 4, PWRBTN)                   # a dword write covers PM1_STS and PM1_EN
    assert rig.pm.read(PM1_STS, 2) == 0 and rig.pm.read(PM1_EN, 2) == 0 and not rig.sci.level


def test_sci_en_is_set_and_read_only(rig: Rig) -> None:
    assert rig.pm.read(PM1_CNT, 2) == SCI_EN
    rig.pm.write(PM1_CNT, 2, 0)
    assert rig.pm.read(PM1_CNT, 2) == SCI_EN


def test_slp_typ_s5_with_slp_en_powers_off(rig: Rig) -> None:
    rig.pm.write(PM1_CNT, 2, 0 << 10)       # SLP_TYP alone: nothing
    assert rig.offs == 0
    rig.pm.write(PM1_CNT, 2, (0 << 10) | SLP_EN | SCI_EN)
    assert rig.offs == 1
    assert rig.pm.read(PM1_CNT, 2) & SLP_EN == 0       # write-only


def test_other_sleep_types_are_logged_not_entered(rig: Rig) -> None:
    rig.pm.write(PM1_CNT, 2, (5 << 10) | SLP_EN)
    assert rig.offs == 0
    assert rig.pm.read(PM1_CNT, 2) == (5 << 10) | SCI_EN
    assert any("sleep type 5" in line for line in rig.logs)


def test_any_access_is_harmless(rig: Rig) -> None:
    for off in range(0x40):
        for size in (1, 2, 4):
            rig.pm.write(off, size, (1 << (8 * size)) - 1 if off != PM1_CNT else 0)
            assert 0 <= rig.pm.read(off, size) < 1 << (8 * size)
    assert rig.pm.read(0x20, 4) == 0


def test_snapshot_restore(rig: Rig) -> None:
    rig.pm.write(PM1_EN, 2, TMR_EN | PWRBTN)
    rig.pm.set_status(PWRBTN)
    snap = rig.pm.snapshot()
    other = Rig()
    other.pm.restore(snap)
    assert other.pm.read(PM1_EN, 2) == TMR_EN | PWRBTN
    assert other.sci.level
    assert other.clock.next_deadline() is None or other.clock.next_deadline() == FIRST_TOGGLE_NS
