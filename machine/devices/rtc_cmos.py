"""Motorola MC146818A real-time clock and CMOS RAM (ports 0x70-0x71, IRQ 8).

How it works
------------
Port 0x70 selects one of 128 bytes (bit 7 is the PC's NMI mask, kept in
``nmi_masked``: nothing in this PC raises an NMI through it); port 0x71 reads
or writes the selected byte.  Bytes 0x00-0x0D are the clock (MC146818A
datasheet, "Address Map", Table 2), 0x0E-0x7F battery-backed RAM.

The model never counts.  The time is a number of seconds since 1970-01-01
(UTC, no leap seconds) at an anchor, plus the update cycles since then.  The
divider chain is a pure function of virtual time: its position is
``now - div_origin`` ns, an update cycle (the 1 Hz tap) ends at every whole
second of position and the periodic interrupt taps (Table 3, rate select
RS3-RS0) fall on multiples of their period in 32.768 kHz clocks.  The time
registers are derived from the seconds when read, formatted by register B
(DM: binary or BCD; 24/12: 24-hour or 12-hour with bit 7 = PM) as QEMU does,
so the day of the week and the century byte (0x32, as the PC BIOS keeps it)
always follow the date.

SET (register B bit 7) stops updates: the time registers become plain bytes
the guest writes; clearing SET reads the date back from them and updates go
on at the same divider phase.  A time register written while the clock runs
sets the time at once (QEMU).  DV2-DV0 (register A bits 6-4) = 11x holds the
divider in reset: time and periodic taps stop; setting 010 again starts it
with the first update 500 ms later (datasheet, "Divider Control").  As QEMU,
DV = 000, 001 and 010 all run the clock at the 32.768 kHz rates.

UIP (register A bit 7) is 1 during the 244 us (t_BUC) before each update; the
update itself is taken as instantaneous at the end of that window: the new
second is readable, UF is set and UIP is 0 from then on.

Flags (register C): PF at every tap of the selected periodic rate while the
divider runs, UF at every update, AF at an update whose new time equals the
alarm (bytes 1, 3, 5; a byte with bits 7-6 = 11 is "don't care").  Flags are
set whatever the enable bits (datasheet, "Register C"); IRQF = (PF & PIE) |
(AF & AIE) | (UF & UIE) drives IRQ 8 (the chip's IRQ# pin, open drain,
inverted on the ISA bus) until register C is read, which clears every flag.
Flags are computed lazily from ``flags_at`` to ``now``; one Timer is armed
for the next enabled event only while the line is low.

Register D: VRT (bit 7) is always 1 (the battery is good).

Not modelled
------------
* Daylight saving (DSE) and the square wave output (SQWE, the SQW pin): the
  bits are stored and DSE is logged.
* The 4.194304 MHz and 1.048576 MHz time bases (DV 000, 001) run at the
  32.768 kHz rates, as QEMU.
* Out-of-range dates written with SET are normalized when SET is cleared
  (February 30 becomes March 1 or 2); the chip would keep counting from them.
* Byte 0x0F (shutdown status) and the other BIOS bytes are plain RAM.
"""
from __future__ import annotations

import re
from enum import IntEnum, IntFlag

from vmk.machine.clock import NS_PER_SEC, Clock
from vmk.machine.devices import Log, nolog
from vmk.machine.irq import IrqLine

__all__ = ["RTC", "Index", "RegA", "RegB", "RegC", "RegD", "DEFAULT_BASE", "DEFAULT_BASE_TEXT",
           "UIP_NS", "parse_rtc_base", "epoch_of", "civil_of", "bios_cmos_bytes"]

# The default date: 2000-01-01T00:00:00 UTC, so runs are deterministic (``vmk boot --rtc-base``).
DEFAULT_BASE_TEXT = "2000-01-01T00:00:00"
DEFAULT_BASE = 946_684_800
UIP_NS = 244_000                    # t_BUC: UIP rises this long before an update (datasheet, Figure 14)
DIVIDER_HZ = 32_768
FIRST_UPDATE_NS = 500_000_000       # from divider reset to the first update (datasheet, "Divider Control")
CMOS_SIZE = 128
SECONDS_PER_DAY = 86_400


class Index(IntEnum):
    """Clock registers and the PC BIOS's CMOS bytes (MC146818A Table 2; IBM PC/AT Technical Reference)."""
    SECONDS = 0x00
    SECONDS_ALARM = 0x01
    MINUTES = 0x02
    MINUTES_ALARM = 0x03
    HOURS = 0x04
    HOURS_ALARM = 0x05
    DAY_OF_WEEK = 0x06              # 1..7, Sunday = 1
    DAY_OF_MONTH = 0x07
    MONTH = 0x08
    YEAR = 0x09                     # 0..99
    REG_A = 0x0A
    REG_B = 0x0B
    REG_C = 0x0C
    REG_D = 0x0D
    SHUTDOWN = 0x0F
    FLOPPY = 0x10
    EQUIPMENT = 0x14
    BASE_MEM_LO = 0x15              # KiB below 1 MiB (640)
    BASE_MEM_HI = 0x16
    EXT_MEM_LO = 0x17               # KiB above 1 MiB, at most 65535
    EXT_MEM_HI = 0x18
    EXT_MEM2_LO = 0x30              # the same, as the POST found it
    EXT_MEM2_HI = 0x31
    CENTURY = 0x32
    MEM_ABOVE_16M_LO = 0x34         # 64 KiB blocks above 16 MiB (SeaBIOS, QEMU)
    MEM_ABOVE_16M_HI = 0x35
    BOOT_ORDER_2 = 0x38
    BOOT_ORDER_1 = 0x3D
    MEM_ABOVE_4G_LO = 0x5B          # 64 KiB blocks above 4 GiB (3 bytes)
    CPU_COUNT = 0x5F                # number of CPUs - 1


INDEX_MASK = 0x7F
NMI_MASK_BIT = 0x80                 # port 0x70 bit 7 (PC/AT): 1 masks the NMI


class RegA(IntFlag):
    """Register A (datasheet, "Register A")."""
    RS_MASK = 0x0F                  # rate select RS3-RS0
    DV_MASK = 0x70                  # divider DV2-DV0
    UIP = 0x80                      # update in progress (read-only)


DV_SHIFT = 4
DV_LAST_RUNNING = 2                 # DV 000, 001, 010 run (QEMU); 11x holds the divider in reset
REG_A_WRITABLE = 0x7F


class RegB(IntFlag):
    """Register B (datasheet, "Register B")."""
    DSE = 0x01                      # daylight saving enable
    HOUR24 = 0x02                   # 1: 24-hour mode; 0: 12-hour with bit 7 = PM
    DM = 0x04                       # data mode: 1 binary, 0 BCD
    SQWE = 0x08
    UIE = 0x10                      # update-ended interrupt enable
    AIE = 0x20                      # alarm interrupt enable
    PIE = 0x40                      # periodic interrupt enable
    SET = 0x80                      # inhibit updates (the time registers can be set)


class RegC(IntFlag):
    """Register C (datasheet, "Register C"); read-only, cleared by reading."""
    UF = 0x10
    AF = 0x20
    PF = 0x40
    IRQF = 0x80


class RegD(IntFlag):
    VRT = 0x80                      # valid RAM and time


FLAG_BITS = RegC.UF | RegC.AF | RegC.PF      # the same positions as UIE, AIE, PIE in register B
PM_BIT = 0x80
DONT_CARE = 0xC0                    # alarm byte 11xxxxxx matches any value
TIME_REGS = (Index.SECONDS, Index.MINUTES, Index.HOURS, Index.DAY_OF_WEEK, Index.DAY_OF_MONTH,
             Index.MONTH, Index.YEAR, Index.CENTURY)
REG_A_POWER_ON = 0x26               # 32.768 kHz time base, 1024 Hz periodic rate (as the BIOS leaves it)
REG_B_POWER_ON = int(RegB.HOUR24)   # BCD, 24-hour, every interrupt disabled


# -- calendar (proleptic Gregorian, any integers: H. Hinnant's days_from_civil) -------------------------

def _days_from_civil(y: int, m: int, d: int) -> int:
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _civil_from_days(z: int) -> tuple[int, int, int]:
    z += 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + (3 if mp < 10 else -9)
    return yoe + era * 400 + (m <= 2), m, d


def epoch_of(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    """Seconds since 1970-01-01T00:00:00 UTC; out-of-range fields carry over (month 13 is January)."""
    y, m = year + (month - 1) // 12, (month - 1) % 12 + 1
    return (_days_from_civil(y, m, 1) + day - 1) * SECONDS_PER_DAY + hour * 3600 + minute * 60 + second


def civil_of(secs: int) -> tuple[int, int, int, int, int, int, int]:
    """(year, month, day, hour, minute, second, day of week 1..7 with Sunday = 1) of ``secs``."""
    days, rest = divmod(secs, SECONDS_PER_DAY)
    y, m, d = _civil_from_days(days)
    return y, m, d, rest // 3600, rest // 60 % 60, rest % 60, (days + 4) % 7 + 1


_BASE_RE = re.compile(r"(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2}):(\d{2}))?$")


def parse_rtc_base(text: str) -> int:
    """``YYYY-MM-DD[THH:MM:SS]`` (QEMU's ``-rtc base=``), UTC, as seconds since the epoch."""
    m = _BASE_RE.match(text.strip())
    if m is None:
        raise ValueError(f"bad RTC base {text!r}: use YYYY-MM-DDTHH:MM:SS (e.g. {DEFAULT_BASE_TEXT})")
    y, mo, d, hh, mm, ss = (int(g) if g else 0 for g in m.groups())
    if not (1 <= mo <= 12 and 1 <= d <= 31 and hh < 24 and mm < 60 and ss < 60 and 1900 <= y <= 9999):
        raise ValueError(f"bad RTC base {text!r}: a field is out of range")
    return epoch_of(y, mo, d, hh, mm, ss)


def bios_cmos_bytes(mem_bytes: int) -> dict[int, int]:
    """The CMOS bytes QEMU's PC and SeaBIOS leave for a guest with ``mem_bytes`` of RAM and one CPU
    (read back from QEMU 7.2 ``-M pc``: no hard disk, floppy drive A, FPU, PS/2 mouse)."""
    ext_kib = min(max(mem_bytes - (1 << 20), 0) // 1024, 0xFFFF)
    above16 = min(max(mem_bytes - (16 << 20), 0) >> 16, 0xFFFF)
    above4g = max(mem_bytes - (4 << 30), 0) >> 16
    return {
        Index.FLOPPY: 0x50,             # drive A: 1.44 MB (type 4) in QEMU's encoding; B: none
        Index.EQUIPMENT: 0x07,          # bit 0 floppy, bit 1 FPU, bit 2 PS/2 mouse; VGA (00)
        Index.BASE_MEM_LO: 640 & 0xFF, Index.BASE_MEM_HI: 640 >> 8,
        Index.EXT_MEM_LO: ext_kib & 0xFF, Index.EXT_MEM_HI: ext_kib >> 8,
        Index.EXT_MEM2_LO: ext_kib & 0xFF, Index.EXT_MEM2_HI: ext_kib >> 8,
        Index.MEM_ABOVE_16M_LO: above16 & 0xFF, Index.MEM_ABOVE_16M_HI: above16 >> 8,
        Index.MEM_ABOVE_4G_LO: above4g & 0xFF, Index.MEM_ABOVE_4G_LO + 1: (above4g >> 8) & 0xFF,
        Index.MEM_ABOVE_4G_LO + 2: (above4g >> 16) & 0xFF,
        Index.BOOT_ORDER_2: 0x30, Index.BOOT_ORDER_1: 0x12, 0x37: 0x20,
        Index.CPU_COUNT: 0,
    }


class Port:
    INDEX = 0
    DATA = 1


class RTC:
    """The MC146818A with its 128-byte CMOS, as wired on the PC (IRQ 8)."""

    def __init__(self, clock: Clock, irq: IrqLine, base: int = DEFAULT_BASE, log: Log = nolog,
                 cmos: dict[int, int] | bytes | None = None) -> None:
        self._clock = clock
        self._irq = irq
        self.log = log
        self._base = base
        self._init_cmos = cmos
        self._timer = clock.timer(self._on_timer, "rtc")
        self.reset()

    # -- power on -----------------------------------------------------------------
    def reset(self) -> None:
        """Power-on state with the time at ``base`` and the BIOS's CMOS bytes."""
        now = self._clock.now
        self.ram = bytearray(CMOS_SIZE)
        init = self._init_cmos
        if isinstance(init, (bytes, bytearray)):
            self.ram[:len(init[:CMOS_SIZE])] = init[:CMOS_SIZE]
        elif init:
            for k, v in init.items():
                if 0 <= k < CMOS_SIZE:
                    self.ram[k] = v & 0xFF
        self.ram[Index.REG_A] = REG_A_POWER_ON
        self.ram[Index.REG_B] = REG_B_POWER_ON
        self.index = 0
        self.nmi_masked = False
        self._div_origin = now               # divider position 0: updates at now + k s
        self._secs = self._base
        self._secs_at = now
        self._flags = 0
        self._flags_at = now
        self._logged_dse = False
        self._timer.cancel()
        self._update_irq()

    # -- the divider chain and the time ------------------------------------------------
    def _div_running(self) -> bool:
        return (self.ram[Index.REG_A] & RegA.DV_MASK) >> DV_SHIFT <= DV_LAST_RUNNING

    def _updating(self) -> bool:
        return self._div_running() and not self.ram[Index.REG_B] & RegB.SET

    def _updates(self, a: int, b: int) -> int:
        """Update cycles in virtual time (a, b]."""
        o = self._div_origin
        return (b - o) // NS_PER_SEC - (a - o) // NS_PER_SEC

    def _next_update(self, t: int, k: int = 1) -> int:
        """The time of the k-th update after t."""
        o = self._div_origin
        return o + ((t - o) // NS_PER_SEC + k) * NS_PER_SEC

    def _period_clocks(self) -> int:
        """The periodic rate in 32.768 kHz clocks (Table 3), 0 for none."""
        rs = self.ram[Index.REG_A] & RegA.RS_MASK
        if rs == 0:
            return 0
        return 1 << (rs - 1) if rs >= 3 else 1 << (rs + 6)

    def _taps(self, t: int, period: int) -> int:
        return (t - self._div_origin) * DIVIDER_HZ // NS_PER_SEC // period

    def _next_tap(self, t: int, period: int) -> int:
        clocks = (self._taps(t, period) + 1) * period
        return self._div_origin + -(-clocks * NS_PER_SEC // DIVIDER_HZ)

    def seconds(self, now: int | None = None) -> int:
        """The RTC's time now, in seconds since the epoch."""
        now = self._clock.now if now is None else now
        if self._updating():
            return self._secs + self._updates(self._secs_at, now)
        return self._secs

    def _settle(self, now: int) -> None:
        """Collect the flags and re-anchor the time at ``now`` (before any change of mode)."""
        self._collect(now)
        self._secs = self.seconds(now)
        self._secs_at = now

    # -- the registers of the time, in the format of register B --------------------------
    def _fmt(self, v: int) -> int:
        if self.ram[Index.REG_B] & RegB.DM:
            return v & 0xFF
        return ((v // 10 % 10) << 4 | v % 10) & 0xFF

    def _unfmt(self, b: int) -> int:
        if self.ram[Index.REG_B] & RegB.DM:
            return b
        return (b >> 4) * 10 + (b & 0xF)     # invalid BCD digits taken at face value

    def _fmt_hour(self, h: int) -> int:
        if self.ram[Index.REG_B] & RegB.HOUR24:
            return self._fmt(h)
        return self._fmt(h % 12 or 12) | (PM_BIT if h >= 12 else 0)

    def _unfmt_hour(self, b: int) -> int:
        if self.ram[Index.REG_B] & RegB.HOUR24:
            return self._unfmt(b)
        return self._unfmt(b & ~PM_BIT & 0xFF) % 12 + (12 if b & PM_BIT else 0)

    def _time_bytes(self, secs: int) -> dict[int, int]:
        y, mo, d, h, mi, s, wd = civil_of(secs)
        return {Index.SECONDS: self._fmt(s), Index.MINUTES: self._fmt(mi), Index.HOURS: self._fmt_hour(h),
                Index.DAY_OF_WEEK: self._fmt(wd), Index.DAY_OF_MONTH: self._fmt(d), Index.MONTH: self._fmt(mo),
                Index.YEAR: self._fmt(y % 100), Index.CENTURY: self._fmt(y // 100)}

    def _secs_of_bytes(self, b) -> int:
        year = self._unfmt(b[Index.CENTURY]) * 100 + self._unfmt(b[Index.YEAR])
        return epoch_of(year, self._unfmt(b[Index.MONTH]), self._unfmt(b[Index.DAY_OF_MONTH]),
                        self._unfmt_hour(b[Index.HOURS]), self._unfmt(b[Index.MINUTES]),
                        self._unfmt(b[Index.SECONDS]))

    def _freeze(self) -> None:
        """Updates stop: the time registers become the bytes of the current time."""
        for k, v in self._time_bytes(self._secs).items():
            self.ram[k] = v

    def _thaw(self) -> None:
        self._secs = self._secs_of_bytes(self.ram)

    # -- the alarm -----------------------------------------------------------------------
    def _alarm_candidates(self) -> tuple[list[int], list[int], list[int]]:
        def pick(alarm: int, n: int, fmt) -> list[int]:
            return list(range(n)) if alarm & DONT_CARE == DONT_CARE else [v for v in range(n) if fmt(v) == alarm]
        r = self.ram
        return (pick(r[Index.HOURS_ALARM], 24, self._fmt_hour), pick(r[Index.MINUTES_ALARM], 60, self._fmt),
                pick(r[Index.SECONDS_ALARM], 60, self._fmt))

    def _next_alarm(self, after: int) -> int | None:
        """The first second > ``after`` whose time matches the alarm bytes, or None."""
        hours, mins, secs = self._alarm_candidates()
        if not (hours and mins and secs):
            return None
        day = after - after % SECONDS_PER_DAY
        for start in (day, day + SECONDS_PER_DAY):
            for h in hours:
                if start + h * 3600 + 3599 <= after:
                    continue
                for m in mins:
                    if start + h * 3600 + m * 60 + 59 <= after:
                        continue
                    for s in secs:
                        t = start + h * 3600 + m * 60 + s
                        if t > after:
                            return t
        return None

    # -- flags and the interrupt line -------------------------------------------------------
    def _collect(self, now: int) -> None:
        """Set the flags for every event in (flags_at, now]."""
        a = self._flags_at
        if now <= a:
            return
        flags = self._flags
        if self._div_running():
            period = self._period_clocks()
            if period and self._taps(now, period) != self._taps(a, period):
                flags |= RegC.PF
            if self._updating():
                n = self._updates(a, now)
                if n:
                    flags |= RegC.UF
                    s_a = self._secs + self._updates(self._secs_at, a)
                    alarm = self._next_alarm(s_a)
                    if alarm is not None and alarm <= s_a + n:
                        flags |= RegC.AF
        self._flags = flags
        self._flags_at = now

    def _update_irq(self) -> None:
        """The only place that drives IRQ 8: IRQF, and the timer for the next enabled event."""
        level = bool(self._flags & self.ram[Index.REG_B] & FLAG_BITS)
        self._irq.set(level)
        self._timer.cancel()
        if level:
            return                       # the line stays high until register C is read
        now = self._clock.now
        enables = self.ram[Index.REG_B]
        nxt: int | None = None
        if self._div_running():
            period = self._period_clocks()
            if enables & RegB.PIE and period:
                nxt = self._next_tap(now, period)
            if self._updating() and enables & RegB.UIE:
                t = self._next_update(now)
                nxt = t if nxt is None else min(nxt, t)
            if self._updating() and enables & RegB.AIE:
                cur = self.seconds(now)
                alarm = self._next_alarm(cur)
                if alarm is not None:
                    t = self._next_update(now, alarm - cur)
                    nxt = t if nxt is None else min(nxt, t)
        if nxt is not None:
            self._timer.arm(nxt)

    def _on_timer(self) -> None:
        self._collect(self._clock.now)
        self._update_irq()

    # -- registers ---------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        return int(self._read(offset))

    def _read(self, offset: int) -> int:
        if offset != Port.DATA:
            return 0xFF                  # port 0x70 is write-only on the PC (QEMU reads 0xFF)
        now = self._clock.now
        i = self.index
        if i == Index.REG_A:
            uip = self._updating() and (now - self._div_origin) % NS_PER_SEC >= NS_PER_SEC - UIP_NS
            return (self.ram[i] & ~RegA.UIP & 0xFF) | (RegA.UIP if uip else 0)
        if i == Index.REG_C:
            self._collect(now)
            value = self._flags | (RegC.IRQF if self._flags & self.ram[Index.REG_B] & FLAG_BITS else 0)
            self._flags = 0
            self._update_irq()
            return value
        if i == Index.REG_D:
            return RegD.VRT
        if i in TIME_REGS and self._updating():
            return self._time_bytes(self.seconds(now))[i]
        return self.ram[i]

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == Port.INDEX:
            self.index = value & INDEX_MASK
            self.nmi_masked = bool(value & NMI_MASK_BIT)
            return
        now = self._clock.now
        i = self.index
        if i == Index.REG_A:
            was = self._div_running()
            self._settle(now)
            self.ram[i] = value & REG_A_WRITABLE
            if was and not self._div_running() and not self.ram[Index.REG_B] & RegB.SET:
                self._freeze()
            elif not was and self._div_running():
                self._div_origin = now + FIRST_UPDATE_NS - NS_PER_SEC
                if not self.ram[Index.REG_B] & RegB.SET:
                    self._thaw()
                self._secs_at = now
                self._flags_at = now
        elif i == Index.REG_B:
            was = self._updating()
            self._settle(now)
            if value & RegB.SET:
                value &= ~RegB.UIE           # datasheet: UIE is cleared when SET goes to 1
            if value & RegB.DSE and not self._logged_dse:
                self._logged_dse = True
                self.log("daylight saving (register B DSE) is not modelled")
            if was and value & RegB.SET:
                self._freeze()
            self.ram[i] = value
            if not was and self._updating():
                self._thaw()
                self._secs_at = now
        elif i in (Index.REG_C, Index.REG_D):
            return                           # read-only
        elif i in TIME_REGS and self._updating():
            self._settle(now)
            regs = self._time_bytes(self._secs)
            regs[i] = value
            self._secs = self._secs_of_bytes(regs)
        else:
            self.ram[i] = value
            if i in (Index.SECONDS_ALARM, Index.MINUTES_ALARM, Index.HOURS_ALARM):
                self._collect(now)
        self._update_irq()

    # -- snapshots ---------------------------------------------------------------------------
    def nvram(self) -> bytes:
        """The 128 CMOS bytes with the clock registers as they read now (for a reboot)."""
        out = bytearray(self.ram)
        if self._updating():
            for k, v in self._time_bytes(self.seconds()).items():
                out[k] = v
        return bytes(out)

    def snapshot(self) -> dict:
        return {"ram": bytes(self.ram), "index": self.index, "nmi_masked": self.nmi_masked,
                "div_origin": self._div_origin, "secs": self._secs, "secs_at": self._secs_at,
                "flags": self._flags, "flags_at": self._flags_at}

    def restore(self, state: dict) -> None:
        self.ram = bytearray(state["ram"])
        self.index = state["index"]
        self.nmi_masked = state["nmi_masked"]
        self._div_origin = state["div_origin"]
        self._secs = state["secs"]
        self._secs_at = state["secs_at"]
        self._flags = state["flags"]
        self._flags_at = state["flags_at"]
        self._update_irq()
