"""IA-PC High Precision Event Timer (MMIO 0xFED00000, 1 KiB), as QEMU's ``hpet`` on ``-M pc``.

How it works
------------
IA-PC HPET Specification 1.0a.  One 64-bit main counter at 100 MHz (period
10,000,000 fs, as QEMU) and three comparators.  The model never counts: while
ENABLE_CNF is set the counter is a function of virtual time,

    counter(now) = (c0 + (now - t0) // 10) mod 2**64

where ``(c0, t0)`` is re-anchored whenever the counter is enabled or written;
disabled, it holds ``c0``.  So the counter reaches value ``c0 + k`` at virtual
``t0 + 10 k`` ns, and each timer owns a Timer armed for the counter value at
which its comparator next matches (``_due``, unbounded so it never wraps).

Timers (§2.3.9): a match happens when the counter equals the comparator (its
low 32 bits in 32-bit mode, Tn_32MODE_CNF); with no later write the next
match of a one-shot timer is a whole counter period (2**32 or 2**64 ticks)
later.  A periodic timer (Tn_TYPE_CNF, every timer here is periodic capable)
adds the period, the last value written to its comparator, to the comparator
at each match; a comparator write changes the comparator itself only in
one-shot mode or with Tn_VAL_SET_CNF set (which the write clears), as §2.3.9.2.2
says and QEMU does.  32-bit mode truncates the comparator and the period.

Interrupts (§2.3.9.1 and §2.3.10): a match raises the timer's interrupt when
Tn_INT_ENB_CNF and ENABLE_CNF are set.  Edge-triggered (Tn_INT_TYPE_CNF = 0):
a pulse.  Level-triggered: the timer's bit in the general interrupt status
register is set and its line stays high until software writes 1 to that bit.
In legacy replacement mode (LEG_RT_CNF) timer 0 drives the ``legacy[0]``
line (the machine's IRQ0: PIC 0 and IO-APIC pin 2) and timer 1 ``legacy[1]``
(IRQ 8), and ``on_legacy(True)`` tells the machine to disconnect the PIT and
RTC from them (§2.3.2: "the 8254 and RTC interrupts are not routed").
Otherwise a timer drives the IO-APIC pin Tn_INT_ROUTE_CNF, one of the pins
of Tn_INT_ROUTE_CAP (QEMU on ``-M pc``: pin 2 only, mask 0x00000004); a
route outside the mask is not taken, so it reads back the old one (§2.3.8).
``_update_irq`` derives every level-triggered line; edges are pulses.

Registers may be read and written as bytes, words, dwords or qwords: the
spec asks for 32 or 64-bit accesses, a narrower one works on its bytes.

Not modelled
------------
* FSB (MSI) delivery: Tn_FSB_INT_DEL_CAP is 0, as QEMU's default.
* QEMU fires a comparator that is already behind the counter after one tick
  (and a 32-bit one-shot timer again at the 32-bit wrap); this model follows
  the spec's equality: the next match is after the counter wraps.
"""
from __future__ import annotations

from typing import Callable

from vmk.machine.clock import Clock
from vmk.machine.devices import Log, nolog
from vmk.machine.irq import IrqLine

__all__ = ["HPET", "HPET_BASE", "HPET_SIZE", "Reg", "Gen", "Tn", "CAP_LOW", "PERIOD_FS", "NS_PER_TICK",
           "NUM_TIMERS", "ROUTE_CAP_PC"]

HPET_BASE = 0xFED0_0000
HPET_SIZE = 0x400
PERIOD_FS = 10_000_000              # COUNTER_CLK_PERIOD: 10 ns (100 MHz), as QEMU
NS_PER_TICK = PERIOD_FS // 1_000_000
NUM_TIMERS = 3
VENDOR_ID = 0x8086
REV_ID = 0x01
ROUTE_CAP_PC = 1 << 2               # QEMU -M pc: IO-APIC pin 2 only
MASK64 = (1 << 64) - 1
MASK32 = (1 << 32) - 1


class Reg:
    """Register offsets (§2.3.1, Table 2)."""
    CAP = 0x000                     # general capabilities and ID
    CONFIG = 0x010                  # general configuration
    ISR = 0x020                     # general interrupt status
    COUNTER = 0x0F0                 # main counter value
    TIMER0 = 0x100                  # timer n at TIMER0 + n * TIMER_STRIDE
    TIMER_STRIDE = 0x20
    TN_CONFIG = 0x00                # within a timer's block
    TN_COMPARATOR = 0x08
    TN_FSB = 0x10


# GCAP_ID fields (§2.3.4): REV_ID 7:0, NUM_TIM_CAP 12:8, COUNT_SIZE_CAP 13, LEG_RT_CAP 15, VENDOR_ID 31:16.
COUNT_SIZE_CAP = 1 << 13
LEG_RT_CAP = 1 << 15
CAP_LOW = VENDOR_ID << 16 | LEG_RT_CAP | COUNT_SIZE_CAP | (NUM_TIMERS - 1) << 8 | REV_ID   # 0x8086A201


class Gen:
    """General configuration (§2.3.5)."""
    ENABLE_CNF = 0x1
    LEG_RT_CNF = 0x2


class Tn:
    """Timer n configuration and capabilities (§2.3.8)."""
    INT_TYPE_CNF = 1 << 1           # 1 = level
    INT_ENB_CNF = 1 << 2
    TYPE_CNF = 1 << 3               # 1 = periodic
    PER_INT_CAP = 1 << 4
    SIZE_CAP = 1 << 5               # 64-bit comparator
    VAL_SET_CNF = 1 << 6
    MODE32_CNF = 1 << 8
    ROUTE_SHIFT = 9
    ROUTE_MASK = 0x1F << 9
    FSB_EN_CNF = 1 << 14
    FSB_INT_DEL_CAP = 1 << 15
    CAPS = PER_INT_CAP | SIZE_CAP
    WRITABLE = INT_TYPE_CNF | INT_ENB_CNF | TYPE_CNF | VAL_SET_CNF | MODE32_CNF


class _Timer:
    __slots__ = ("config", "cmp", "period", "due", "timer")

    def __init__(self, timer) -> None:
        self.timer = timer
        self.config = 0
        self.cmp = MASK64
        self.period = 0
        self.due: int | None = None         # the (unbounded) counter value of the next match


class HPET:
    def __init__(self, clock: Clock, legacy: tuple[IrqLine, IrqLine], gsi: dict[int, IrqLine],
                 on_legacy: Callable[[bool], None] = lambda on: None, route_cap: int = ROUTE_CAP_PC,
                 log: Log = nolog) -> None:
        self._clock = clock
        self._legacy = legacy
        self._gsi = gsi
        self._on_legacy = on_legacy
        self.route_cap = route_cap & MASK32
        self.log = log
        self.timers = [_Timer(clock.timer(lambda n=n: self._fire(n), f"hpet{n}")) for n in range(NUM_TIMERS)]
        self.reset()

    def reset(self) -> None:
        self.config = 0
        self.isr = 0
        self._c0 = 0
        self._t0 = self._clock.now
        for t in self.timers:
            t.timer.cancel()
            t.config = 0
            t.cmp = MASK64
            t.period = 0
            t.due = None
        self._update_irq()

    # -- the main counter ------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return bool(self.config & Gen.ENABLE_CNF)

    def _ticks(self, now: int | None = None) -> int:
        """The counter, unbounded (c0 + ticks since t0)."""
        if not self.enabled:
            return self._c0
        now = self._clock.now if now is None else now
        return self._c0 + (now - self._t0) // NS_PER_TICK

    def counter(self) -> int:
        return self._ticks() & MASK64

    def _time_of(self, ticks: int) -> int:
        return self._t0 + (ticks - self._c0) * NS_PER_TICK

    # -- timers -------------------------------------------------------------------------
    @staticmethod
    def _width(t: _Timer) -> int:
        return MASK32 if t.config & Tn.MODE32_CNF else MASK64

    def _periodic(self, t: _Timer) -> bool:
        return bool(t.config & Tn.TYPE_CNF)

    def _arm(self, n: int) -> None:
        """Arm timer n for its next match after the counter's present value."""
        t = self.timers[n]
        if not self.enabled:
            t.timer.cancel()
            t.due = None
            return
        cur = self._ticks()
        mask = self._width(t)
        diff = (t.cmp - cur) & mask or mask + 1
        t.due = cur + diff
        t.timer.arm(self._time_of(t.due))

    def _fire(self, n: int) -> None:
        t = self.timers[n]
        if t.due is None:
            return
        mask = self._width(t)
        old = t.cmp
        if self._periodic(t):
            t.cmp = (t.cmp + t.period) & mask
        step = (t.cmp - old) & mask or mask + 1
        t.due += step
        t.timer.arm(self._time_of(t.due))
        if t.config & Tn.INT_ENB_CNF:
            if t.config & Tn.INT_TYPE_CNF:
                self.isr |= 1 << n
                self._update_irq()
            else:
                line = self._line(n)
                if line is not None:
                    line.pulse()

    def _line(self, n: int) -> IrqLine | None:
        if self.config & Gen.LEG_RT_CNF and n < 2:
            return self._legacy[n]
        route = (self.timers[n].config & Tn.ROUTE_MASK) >> Tn.ROUTE_SHIFT
        return self._gsi.get(route)

    def _update_irq(self) -> None:
        """The only place that sets the lines' levels: level-triggered timers with their status bit set."""
        high: set[int] = set()
        if self.enabled:
            for n, t in enumerate(self.timers):
                if self.isr >> n & 1 and t.config & Tn.INT_ENB_CNF and t.config & Tn.INT_TYPE_CNF:
                    line = self._line(n)
                    if line is not None:
                        high.add(id(line))
        for line in (*self._legacy, *self._gsi.values()):
            line.set(id(line) in high)

    # -- registers ---------------------------------------------------------------------------
    def _read64(self, reg: int) -> int:
        if reg == Reg.CAP:
            return PERIOD_FS << 32 | CAP_LOW
        if reg == Reg.CONFIG:
            return self.config
        if reg == Reg.ISR:
            return self.isr
        if reg == Reg.COUNTER:
            return self.counter()
        n, sub = divmod(reg - Reg.TIMER0, Reg.TIMER_STRIDE)
        if 0 <= n < NUM_TIMERS:
            t = self.timers[n]
            if sub == Reg.TN_CONFIG:
                return self.route_cap << 32 | t.config | Tn.CAPS
            if sub == Reg.TN_COMPARATOR:
                return t.cmp
        return 0

    def read(self, offset: int, size: int) -> int:
        if offset >= HPET_SIZE:
            return 0
        reg, shift = offset & ~7, (offset & 7) * 8
        return (self._read64(reg) >> shift) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= HPET_SIZE:
            return
        reg, shift = offset & ~7, (offset & 7) * 8
        wmask = (((1 << (8 * size)) - 1) << shift) & MASK64
        value = (value << shift) & wmask
        if reg == Reg.CONFIG:
            self._write_config((self.config & ~wmask | value) & (Gen.ENABLE_CNF | Gen.LEG_RT_CNF))
        elif reg == Reg.ISR:
            self.isr &= ~value
            self._update_irq()
        elif reg == Reg.COUNTER:
            if self.enabled:
                self.log("main counter written while the HPET is enabled (the spec says: halt it first)")
            self._c0 = (self._ticks() & MASK64) & ~wmask | value
            self._t0 = self._clock.now
            for n in range(NUM_TIMERS):
                self._arm(n)
        else:
            n, sub = divmod(reg - Reg.TIMER0, Reg.TIMER_STRIDE)
            if not 0 <= n < NUM_TIMERS:
                return
            t = self.timers[n]
            if sub == Reg.TN_CONFIG:
                self._write_timer_config(n, t.config & ~wmask | value)
            elif sub == Reg.TN_COMPARATOR:
                self._write_comparator(n, wmask, value)
            elif sub == Reg.TN_FSB:
                return                      # no FSB delivery: the register reads 0

    def _write_config(self, new: int) -> None:
        old = self.config
        if (old ^ new) & Gen.ENABLE_CNF:
            c = self._ticks()
            self._c0, self._t0 = c & MASK64, self._clock.now
        self.config = new
        if (old ^ new) & Gen.ENABLE_CNF:
            for n in range(NUM_TIMERS):
                self._arm(n)
        if (old ^ new) & Gen.LEG_RT_CNF:
            self._on_legacy(bool(new & Gen.LEG_RT_CNF))
        self._update_irq()

    def _write_timer_config(self, n: int, new: int) -> None:
        t = self.timers[n]
        old = t.config
        cfg = new & Tn.WRITABLE
        route = (new & Tn.ROUTE_MASK) >> Tn.ROUTE_SHIFT
        if self.route_cap >> route & 1:
            cfg |= route << Tn.ROUTE_SHIFT
        else:
            cfg |= old & Tn.ROUTE_MASK
            if route != (old & Tn.ROUTE_MASK) >> Tn.ROUTE_SHIFT:
                self.log(f"timer {n}: IO-APIC route {route} is not in the route capability {self.route_cap:#x}")
        if old & Tn.INT_TYPE_CNF and not cfg & Tn.INT_TYPE_CNF:
            self.isr &= ~(1 << n)
        t.config = cfg
        if cfg & Tn.MODE32_CNF and not old & Tn.MODE32_CNF:
            t.cmp &= MASK32
            t.period &= MASK32
        if (old ^ cfg) & (Tn.MODE32_CNF | Tn.TYPE_CNF):
            self._arm(n)
        self._update_irq()

    def _write_comparator(self, n: int, wmask: int, value: int) -> None:
        t = self.timers[n]
        mask = self._width(t)
        if not self._periodic(t) or t.config & Tn.VAL_SET_CNF:
            t.cmp = (t.cmp & ~wmask | value) & mask
        if self._periodic(t):
            t.period = (t.period & ~wmask | value) & mask
        t.config &= ~Tn.VAL_SET_CNF
        self._arm(n)

    # -- snapshots ----------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        return {"config": self.config, "isr": self.isr, "c0": self._c0, "t0": self._t0,
                "timers": [(t.config, t.cmp, t.period, t.due) for t in self.timers]}

    def restore(self, state: dict) -> None:
        self.config = state["config"]
        self.isr = state["isr"]
        self._c0 = state["c0"]
        self._t0 = state["t0"]
        for t, (config, cmp, period, due) in zip(self.timers, state["timers"]):
            t.config, t.cmp, t.period, t.due = config, cmp, period, due
            t.timer.cancel()
            if due is not None:
                t.timer.arm(self._time_of(due))
        self._update_irq()
