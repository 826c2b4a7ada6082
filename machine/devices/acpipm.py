"""ACPI fixed-feature hardware: the PM1a event/control blocks and the PM timer.

The registers of the Intel 82371AB (PIIX4) power-management function as QEMU
places them (PIIX4 datasheet §11.7.3, "Power Management I/O Space Registers";
ACPI 6.5 §4.8.3, "Fixed Hardware Programming Model").  SeaBIOS sets the PM I/O
base to 0x600, so the FADT (``vmk.boot.acpi``) describes:

====== ========== ==== =================================================
offset register   size bits
====== ========== ==== =================================================
0x00   PM1_STS    16   TMR_STS 0, GBL_STS 5, PWRBTN_STS 8, WAK_STS 15 (write 1 to clear)
0x02   PM1_EN     16   TMR_EN 0, GBL_EN 5, PWRBTN_EN 8
0x04   PM1_CNT    16   SCI_EN 0, BM_RLD 1, GBL_RLS 2 (w), SLP_TYP 10-12, SLP_EN 13 (w)
0x08   PM_TMR     32   24-bit count of the 3.579545 MHz clock; bits 31:24 read 0
====== ========== ==== =================================================

The PM timer is a pure function of virtual time, counted like the PIT
(``tick(ns) = ns * 3579545 // 10**9``, QEMU's ``muldiv64``), and wraps at 2^24
(the FADT leaves TMR_VAL_EXT clear).  TMR_STS is set whenever bit 23 of the
counter changes (ACPI §4.8.3.3): the device remembers the half-period
(``tick >> 23``) at which software last cleared it, so the status is exact
at every read without a timer.  A timer is armed for the next bit-23 change
only while TMR_EN could raise the SCI.

The SCI is ISA IRQ 9, level, active high (the MADT's interrupt source override
says so): ``_update_irq`` drives it from ``PM1_STS & PM1_EN`` while SCI_EN is set.

Writing SLP_EN with SLP_TYP 0 enters S5 (soft off; the DSDT's ``\\_S5`` package
is ``{0, 0, 0, 0}``, QEMU's PIIX4 value) and calls ``on_poweroff``: the machine
ends the run with exit status 0, as QEMU does on an ACPI power-off.

Not modelled: SMM.  The FADT has SMI_CMD = 0 (no SMM), so the platform is
always in ACPI mode: SCI_EN reads 1 and software cannot change it (ACPI
§4.8.3.2.1: the bit belongs to the hardware; OSPM preserves it).  Other sleep
states (S1-S4) are logged and ignored; BM_STS, the global lock (GBL_STS is only
set by :meth:`AcpiPm.set_status`), the RTC alarm and the GPE blocks do not exist.
"""
from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import Callable

from ..clock import Clock
from ..irq import IrqLine
from . import Log, nolog

__all__ = ["AcpiPm", "PM1Sts", "PM1Cnt", "Reg", "PM_TIMER_HZ", "PM_IO_SIZE", "SLP_TYP_S5", "pm_ticks", "tick_ns"]

PM_TIMER_HZ = 3_579_545         # ACPI §4.8.3.3: 3.579545 MHz
PM_TIMER_BITS = 24
PM_TIMER_MASK = (1 << PM_TIMER_BITS) - 1
TMR_STS_SHIFT = PM_TIMER_BITS - 1           # TMR_STS: bit 23 of the counter changed
PM_IO_SIZE = 0x40               # PIIX4 PMBA: 64 bytes of I/O space
SLP_TYP_S5 = 0                  # the \_S5 package of our DSDT (QEMU's PIIX4: 0 = soft off)
NS_PER_SEC = 1_000_000_000


class Reg(IntEnum):
    """Register offsets in the PM I/O window (PIIX4 §11.7.3)."""
    PM1_STS = 0x00
    PM1_EN = 0x02
    PM1_CNT = 0x04
    PM_TMR = 0x08


class PM1Sts(IntFlag):
    """PM1_STS and PM1_EN bits (ACPI §4.8.3.1.1, tables 4.16/4.17)."""
    TMR = 1 << 0
    BM = 1 << 4
    GBL = 1 << 5
    PWRBTN = 1 << 8
    SLPBTN = 1 << 9
    RTC = 1 << 10
    WAK = 1 << 15


class PM1Cnt(IntFlag):
    """PM1_CNT bits (ACPI §4.8.3.2.1, table 4.18)."""
    SCI_EN = 1 << 0
    BM_RLD = 1 << 1
    GBL_RLS = 1 << 2
    SLP_TYP = 7 << 10
    SLP_EN = 1 << 13


SLP_TYP_SHIFT = 10
STS_BITS = PM1Sts.TMR | PM1Sts.BM | PM1Sts.GBL | PM1Sts.PWRBTN | PM1Sts.SLPBTN | PM1Sts.RTC | PM1Sts.WAK
EN_BITS = PM1Sts.TMR | PM1Sts.GBL | PM1Sts.PWRBTN | PM1Sts.SLPBTN | PM1Sts.RTC
SCI_SOURCES = PM1Sts.TMR | PM1Sts.GBL | PM1Sts.PWRBTN | PM1Sts.SLPBTN | PM1Sts.RTC
CNT_STORED = PM1Cnt.BM_RLD | PM1Cnt.SLP_TYP          # SCI_EN is hardwired, GBL_RLS and SLP_EN write-only
# (offset, width in bytes) of each register, for byte and dword accesses that cover several
_LAYOUT = ((Reg.PM1_STS, 2), (Reg.PM1_EN, 2), (Reg.PM1_CNT, 2), (Reg.PM_TMR, 4))


def pm_ticks(ns: int) -> int:
    """PM timer clock edges since power-on at virtual time ``ns`` (not wrapped)."""
    return ns * PM_TIMER_HZ // NS_PER_SEC


def tick_ns(tick: int) -> int:
    """The first nanosecond at which ``pm_ticks`` reaches ``tick``."""
    return -(-tick * NS_PER_SEC // PM_TIMER_HZ)


class AcpiPm:
    """PM1a_EVT (offsets 0-3), PM1a_CNT (4-5) and PM_TMR (8-11) in one PIIX4-style window."""

    def __init__(self, clock: Clock, sci: IrqLine, on_poweroff: Callable[[], None], log: Log = nolog) -> None:
        self.clock = clock
        self.sci = sci
        self.on_poweroff = on_poweroff
        self.log = log
        self._timer = clock.timer(self._on_timer, "acpi-pm-tmr")
        self._warned: set[str] = set()
        self.reset()

    def reset(self) -> None:
        """Power-on: status and enables clear, S0, SCI_EN set (no SMM: always in ACPI mode)."""
        self._sts = 0                                    # every status bit except TMR_STS
        self._en = 0
        self._cnt = 0
        self._tmr_cleared = pm_ticks(self.clock.now) >> TMR_STS_SHIFT
        self._update_irq()

    # -- host side -------------------------------------------------------------------------------
    def set_status(self, bits: int) -> None:
        """An event happened (PWRBTN: the power button was pressed): set its status bits."""
        self._sts |= bits & STS_BITS & ~PM1Sts.TMR
        self._update_irq()

    # -- registers -------------------------------------------------------------------------------
    def _status(self) -> int:
        sts = self._sts
        if pm_ticks(self.clock.now) >> TMR_STS_SHIFT != self._tmr_cleared:
            sts |= PM1Sts.TMR
        return sts

    def _reg(self, reg: Reg) -> int:
        if reg == Reg.PM1_STS:
            return self._status()
        if reg == Reg.PM1_EN:
            return self._en
        if reg == Reg.PM1_CNT:
            return self._cnt | PM1Cnt.SCI_EN
        return pm_ticks(self.clock.now) & PM_TIMER_MASK

    def read(self, offset: int, size: int) -> int:
        value = 0
        for reg, width in _LAYOUT:
            lo, hi = max(offset, reg), min(offset + size, reg + width)
            if lo < hi:
                part = (self._reg(reg) >> (8 * (lo - reg))) & ((1 << (8 * (hi - lo))) - 1)
                value |= part << (8 * (lo - offset))
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        hit = False
        for reg, width in _LAYOUT:
            lo, hi = max(offset, reg), min(offset + size, reg + width)
            if lo >= hi:
                continue
            hit = True
            mask = ((1 << (8 * (hi - lo))) - 1) << (8 * (lo - reg))
            bits = ((value >> (8 * (lo - offset))) << (8 * (lo - reg))) & mask
            self._write_reg(reg, bits, mask)
        if not hit:
            self._warn("write", f"write {value:#x} to unmodelled PM register at offset {offset:#x} ignored")

    def _write_reg(self, reg: Reg, bits: int, mask: int) -> None:
        if reg == Reg.PM1_STS:
            if bits & PM1Sts.TMR:
                self._tmr_cleared = pm_ticks(self.clock.now) >> TMR_STS_SHIFT
            self._sts &= ~bits
        elif reg == Reg.PM1_EN:
            self._en = (self._en & ~mask) | (bits & EN_BITS)
        elif reg == Reg.PM1_CNT:
            self._cnt = (self._cnt & ~mask) | (bits & CNT_STORED)
            if bits & PM1Cnt.SLP_EN:
                self._sleep((self._cnt & PM1Cnt.SLP_TYP) >> SLP_TYP_SHIFT)
                return
        else:
            self._warn("tmr", "write to the read-only PM timer ignored")
            return
        self._update_irq()

    def _sleep(self, slp_typ: int) -> None:
        if slp_typ == SLP_TYP_S5:
            self.log("ACPI power-off (S5)")
            self.on_poweroff()
        else:
            self._warn(f"slp{slp_typ}", f"sleep type {slp_typ} is not modelled (only S5 = 0): ignored")

    def _warn(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.log(msg)

    # -- interrupt -------------------------------------------------------------------------------
    def _on_timer(self) -> None:
        self._update_irq()

    def _update_irq(self) -> None:
        """The one place that drives the SCI: a status bit whose enable is set (ACPI §4.8.3.1)."""
        sts = self._status()
        self.sci.set(bool(sts & self._en & SCI_SOURCES))
        if self._en & PM1Sts.TMR and not sts & PM1Sts.TMR:
            self._timer.arm(tick_ns((self._tmr_cleared + 1) << TMR_STS_SHIFT))
        else:
            self._timer.cancel()

    # -- snapshots -------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        return {"sts": self._sts, "en": self._en, "cnt": self._cnt, "tmr_cleared": self._tmr_cleared}

    def restore(self, state: dict) -> None:
        self._sts = state["sts"]
        self._en = state["en"]
        self._cnt = state["cnt"]
        self._tmr_cleared = state["tmr_cleared"]
        self._update_irq()
