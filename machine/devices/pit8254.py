"""Intel 8254 programmable interval timer (ports 0x40-0x43) and PC/AT port 0x61.

How it works
------------
The 8254 (Intel 82C54 datasheet) has three 16-bit down counters fed by one
1 193 182 Hz clock (CLK = 14.31818 MHz / 12 on the PC).  The model never
counts.  The PIT clock is a pure function of virtual time, shared by the three
channels as on the chip::

    tick(ns) = ns * 1193182 // 10**9            (QEMU's muldiv64: floor)

and PIT clock edge ``T`` happens at ``tick_ns(T) = ceil(T * 10**9 / 1193182)``,
the first nanosecond whose tick is ``T`` (so a deadline is never early).

Each channel remembers the tick at which its counting element (CE) was last
loaded (``start``) and the count it runs with (``n``, 1..65536, or 1..10000 in
BCD: a written 0 is the maximum).  Count, OUT and the next OUT transition are
functions of the mode, ``n`` and ``d = tick(now) - start`` (see ``_out_at``,
``_count_at``, ``_next_change``), as in QEMU's i8254.  Timing convention (as
QEMU): the write or GATE trigger itself loads the CE (``d = 0``) and every
later CLK edge counts, so with count N:

* mode 0 (interrupt on terminal count): OUT low from the control word, high
  at ``d = N`` and stays high;
* mode 1 (retriggerable one-shot): a GATE rising edge starts it; OUT low for
  ``d < N``;
* mode 2 (rate generator): OUT low for one clock at ``d = kN - 1`` (count 1),
  so its rising edges, the interrupts, come every N clocks at ``d = kN``;
* mode 3 (square wave): OUT high for ``ceil(N/2)`` clocks, low for
  ``floor(N/2)``;
* mode 4 / 5 (software / GATE-triggered strobe): OUT low for one clock at
  ``d = N``.

The datasheet's extra "load" clock pulse after a write is therefore not
counted, except by the NULL COUNT status flag, which stays set until the first
CLK edge after the count reaches the CE.

GATE (datasheet, "Gate" table): modes 0 and 4 stop counting while GATE is low
(the CE keeps ``d``); modes 2 and 3 stop and force OUT high while GATE is low,
and a rising edge reloads the CE; in modes 1 and 5 only a rising edge matters
(it loads the CE from the count register and starts the sequence).  GATE 0
and 1 are tied high; GATE 2 is bit 0 of port 0x61 (:class:`SystemControlPortB`
calls :meth:`PIT8254.set_gate`).

New counts (datasheet, mode definitions): modes 0 and 4 restart from the new
count at once; in mode 0 the first byte of a two-byte count already stops
counting and drops OUT.  Modes 1 and 5 keep the running sequence and use the
new count at the next trigger.  Modes 2 and 3 keep the running period and load
the new count at its end (mode 2) or at the end of the current half-cycle
(mode 3), or at a GATE trigger if one comes first; ``swap_start`` holds that
pending reload, and ``_Channel.settle`` applies it lazily.

Interrupt: OUT0 drives ``irq0``.  Only channel 0 owns a Timer, armed for the
tick at which OUT0 next changes (a mode 2/3 pending reload always falls on
such a tick); it is not armed when OUT0 will not change.  The timer callback
evaluates the channel at the tick it was armed for, not at ``clock.now``, so
even a test clock that jumps past several deadlines sees every edge in order.
Channels 1 and 2 have no interrupt and are computed only when read.

Invariants
----------
* ``irq0.level == OUT0`` at the tick of the last register access, gate change
  or timer firing; ``_update_irq`` is the only code that sets the line.
* ``_timer_tick`` is the armed tick of the channel-0 timer (None: disarmed),
  and it is always later than the tick it was computed at.
* A channel's ``null_clear`` and ``swap_start`` are only meaningful while
  ``null`` is set; ``swap_start`` is set only while COUNTING in mode 2/3.

Not modelled
------------
* The datasheet's load clock pulse (see the timing convention above), and the
  undefined count after a control word: the count stays readable, frozen at
  the value it had when the control word was written.
* Mode 1 and 5 before the first trigger read the frozen count; OUT goes low
  at the trigger itself, not one CLK later.
* Counts of 1 in modes 2 and 3 are illegal (datasheet); they are logged and
  give OUT stuck low (mode 2) or high (mode 3), with no timer.
* Invalid BCD digits in a written count are logged and taken at face value.
* Reads of the control word port return 0xFF (the chip leaves the bus
  floating; QEMU returns 0).
* Channel 1 is a plain counter: DRAM refresh is not emulated; port 0x61 bit 4
  is derived from virtual time.  The speaker makes no sound (bit 1 is
  stored).  HPET legacy replacement (QEMU's irq_disabled) does not exist.
* Wider accesses are split into byte accesses at consecutive offsets, as the
  ISA bus does for an 8-bit device.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from enum import IntEnum

from vmk.machine.clock import NS_PER_SEC, Clock
from vmk.machine.devices import Log, nolog
from vmk.machine.irq import IrqLine

__all__ = [
    "PIT8254",
    "PIT_HZ",
    "REFRESH_TOGGLE_NS",
    "Access",
    "Mode",
    "Port",
    "PortB",
    "ReadBack",
    "Select",
    "Status",
    "SystemControlPortB",
    "pit_ticks",
    "tick_ns",
]

PIT_HZ = 1_193_182               # CLK input on the PC: 14.31818 MHz / 12
NUM_CHANNELS = 3
BINARY_MODULUS = 0x1_0000        # a binary count of 0 means 65536
BCD_MODULUS = 10_000             # a BCD count of 0 means 10000
BYTE = 0xFF
FLOATING_BUS = 0xFF

# PC/AT port 0x61 bit 4 toggles with every DRAM refresh request, which the
# BIOS makes PIT channel 1 issue every 18 clocks: 15.085 us.
REFRESH_TOGGLE_NS = 15_085


def pit_ticks(ns: int) -> int:
    """The number of PIT clock edges in virtual time ``(0, ns]``."""
    return ns * PIT_HZ // NS_PER_SEC


def tick_ns(tick: int) -> int:
    """The first virtual ns at which :func:`pit_ticks` reaches ``tick`` (rounded up: never early)."""
    return -(-tick * NS_PER_SEC // PIT_HZ)


class Port(IntEnum):
    """Register offsets in the 0x40 window (82C54 datasheet, Table 1: A1 A0)."""
    COUNTER0 = 0
    COUNTER1 = 1
    COUNTER2 = 2
    CONTROL = 3


# Control word (82C54 datasheet, "Control Word Format"): SC1 SC0 RW1 RW0 M2 M1 M0 BCD.
CW_SELECT_SHIFT = 6
CW_ACCESS_SHIFT = 4
CW_ACCESS_MASK = 0x3
CW_MODE_SHIFT = 1
CW_MODE_MASK = 0x7
CW_BCD = 0x01


class Select(IntEnum):
    """Control word SC1 SC0: the counter the word programs, or the read-back command."""
    COUNTER0 = 0
    COUNTER1 = 1
    COUNTER2 = 2
    READ_BACK = 3


class Access(IntEnum):
    """Control word RW1 RW0 (datasheet, "Control Word Format")."""
    LATCH = 0        # counter latch command, not an access mode
    LSB = 1          # read/write least significant byte only
    MSB = 2          # read/write most significant byte only
    LOHI = 3         # LSB first, then MSB


class Mode(IntEnum):
    """Control word M2 M1 M0 (datasheet, "Mode Definitions"); 6 and 7 alias 2 and 3."""
    INTERRUPT_ON_TERMINAL_COUNT = 0
    RETRIGGERABLE_ONE_SHOT = 1
    RATE_GENERATOR = 2
    SQUARE_WAVE = 3
    SOFTWARE_STROBE = 4
    HARDWARE_STROBE = 5


MODE_ALIAS_BIT = 0x4             # M2 is "don't care" in modes 2 and 3 (written as 6, 7)


class ReadBack(IntEnum):
    """Read-back command bits (datasheet, "Read-Back Command Format"), SC = 11."""
    CNT0 = 0x02
    CNT1 = 0x04
    CNT2 = 0x08
    NO_STATUS = 0x10             # STATUS# : 0 latches the status
    NO_COUNT = 0x20              # COUNT#  : 0 latches the count
    RESERVED = 0x01              # must be 0


class Status(IntEnum):
    """Status byte (datasheet, "Status Byte"): OUT, NULL COUNT, RW1 RW0, M2 M1 M0, BCD."""
    BCD = 0x01
    NULL_COUNT = 0x40
    OUTPUT = 0x80


STATUS_ACCESS_SHIFT = 4
STATUS_MODE_SHIFT = 1


class PortB(IntEnum):
    """PC/AT System Control Port B, I/O 0x61 (IBM PC/AT Technical Reference, system board I/O)."""
    TIMER2_GATE = 0x01           # R/W: GATE of PIT channel 2
    SPEAKER_DATA = 0x02          # R/W: speaker data enable (AND with OUT2)
    PARITY_CHECK_DISABLE = 0x04  # R/W: 1 disables the RAM parity check NMI
    IOCHK_DISABLE = 0x08         # R/W: 1 disables the I/O channel check NMI
    REFRESH_TOGGLE = 0x10        # R/O: toggles with each refresh request
    TIMER2_OUT = 0x20            # R/O: OUT of PIT channel 2
    IOCHK = 0x40                 # R/O: I/O channel check occurred
    PARITY_ERROR = 0x80          # R/O: RAM parity error occurred


PORTB_WRITABLE = PortB.TIMER2_GATE | PortB.SPEAKER_DATA | PortB.PARITY_CHECK_DISABLE | PortB.IOCHK_DISABLE


class _Phase(IntEnum):
    IDLE = 0        # no count in the CE: after a control word, mode 0 mid-write, mode 1/5 untriggered
    COUNTING = 1    # d = tick - start
    GATED = 2       # GATE low in mode 0/2/3/4: d frozen at held_d


# -- the waveforms: pure functions of the mode, d = clocks since the CE load, and the count n -----------

def _normal_mode(mode_bits: int) -> Mode:
    if mode_bits & MODE_ALIAS_BIT and mode_bits & Mode.RATE_GENERATOR:
        return Mode(mode_bits & ~MODE_ALIAS_BIT)
    return Mode(mode_bits)


def _out_at(mode: Mode, d: int, n: int) -> bool:
    if mode in (Mode.INTERRUPT_ON_TERMINAL_COUNT, Mode.RETRIGGERABLE_ONE_SHOT):
        return d >= n
    if mode == Mode.RATE_GENERATOR:
        return d % n != n - 1                 # low while the count is 1
    if mode == Mode.SQUARE_WAVE:
        return d % n < (n + 1) // 2           # high half first; the longer one for odd n
    return d != n                             # strobes: low for the clock at count 0


def _count_at(mode: Mode, d: int, n: int, modulus: int) -> int:
    if mode == Mode.RATE_GENERATOR:
        return (n - d % n) % modulus
    if mode == Mode.SQUARE_WAVE:
        # Datasheet, mode 3: even n counts down by 2 in each half.  Odd n: load n,
        # count down by 1 then by 2 (high half), reload n, down by 3 then by 2 (low half).
        p = d % n
        high = (n + 1) // 2
        q = p if p < high else p - high
        if q == 0:
            value = n
        elif n % 2 == 0:
            value = n - 2 * q
        else:
            value = n + 1 - 2 * q if p < high else n - 1 - 2 * q
        return value % modulus
    return (n - d) % modulus                  # one-shots wrap and keep counting


def _next_change(mode: Mode, d: int, n: int) -> int | None:
    """The smallest d' > d at which OUT differs from OUT at d, or None if it never changes."""
    if mode in (Mode.INTERRUPT_ON_TERMINAL_COUNT, Mode.RETRIGGERABLE_ONE_SHOT):
        return n if d < n else None
    if mode in (Mode.RATE_GENERATOR, Mode.SQUARE_WAVE):
        if n == 1:
            return None                       # illegal count: OUT never changes
        base = d - d % n
        edge = n - 1 if mode == Mode.RATE_GENERATOR else (n + 1) // 2
        return base + edge if d - base < edge else base + n
    if d < n:
        return n
    if d == n:
        return n + 1
    return None


def _to_bcd(value: int) -> int:
    result = 0
    for shift in range(0, 16, 4):
        result |= (value % 10) << shift
        value //= 10
    return result


@dataclass(slots=True)
class _Channel:
    """One counter: the programmed mode, its CE (lazy) and its latches."""
    mode_bits: int = Mode.SQUARE_WAVE     # M2..M0 exactly as written (status shows them)
    bcd: bool = False
    access: int = Access.LOHI
    gate: bool = True
    phase: int = _Phase.IDLE
    n: int = BINARY_MODULUS               # the count the CE runs with
    start: int = 0                        # tick at which d == 0 (COUNTING)
    held_d: int = 0                       # d while GATED
    held_count: int = 0                   # count shown while IDLE
    cr: int | None = None                 # count register (decoded); None until a count is written
    null: bool = False                    # NULL COUNT: the CR holds a count not yet in the CE
    null_clear: int | None = None         # tick the CR reaches the CE (None: at the next GATE trigger)
    swap_start: int | None = None         # mode 2/3: at null_clear the CE reloads cr with this start
    read_msb: bool = False                # read flip-flop (LOHI): the next live read is the MSB
    write_msb: bool = False               # write flip-flop (LOHI): the next write is the MSB
    write_lsb: int = 0                    # the LSB held between the two writes
    latch_access: int = Access.LATCH      # what is left to read of the latched count (LATCH: none)
    latch_value: int = 0
    status_latched: bool = False
    status: int = 0

    @property
    def mode(self) -> Mode:
        return _normal_mode(self.mode_bits)

    @property
    def modulus(self) -> int:
        return BCD_MODULUS if self.bcd else BINARY_MODULUS

    # -- lazy evaluation at tick t (t never goes backwards) ------------------------------------
    def settle(self, t: int) -> None:
        """Apply the CR -> CE transfer that has happened by tick ``t``."""
        if self.null and self.null_clear is not None and t >= self.null_clear:
            if self.swap_start is not None:
                assert self.cr is not None
                self.n = self.cr
                self.start = self.swap_start
                self.swap_start = None
            self.null = False
            self.null_clear = None

    def elapsed(self, t: int) -> int:
        return t - self.start if self.phase == _Phase.COUNTING else self.held_d

    def out(self, t: int) -> bool:
        self.settle(t)
        mode = self.mode
        if self.phase == _Phase.IDLE:
            return mode != Mode.INTERRUPT_ON_TERMINAL_COUNT   # control word: mode 0 low, others high
        if self.phase == _Phase.GATED and mode in (Mode.RATE_GENERATOR, Mode.SQUARE_WAVE):
            return True
        return _out_at(mode, self.elapsed(t), self.n)

    def count(self, t: int) -> int:
        """The CE value (an integer, not yet BCD-encoded)."""
        self.settle(t)
        if self.phase == _Phase.IDLE:
            return self.held_count
        return _count_at(self.mode, self.elapsed(t), self.n, self.modulus)

    def register_count(self, t: int) -> int:
        value = self.count(t)
        return _to_bcd(value) if self.bcd else value

    def next_change_tick(self, t: int) -> int | None:
        """The first tick after ``t`` at which OUT (or the CE's count) changes."""
        self.settle(t)
        if self.phase != _Phase.COUNTING:
            return None
        d = self.elapsed(t)
        step = _next_change(self.mode, d, self.n)
        tick = None if step is None else self.start + step
        if self.null and self.swap_start is not None:
            assert self.null_clear is not None
            tick = self.null_clear if tick is None else min(tick, self.null_clear)
        return tick

    def status_byte(self, t: int) -> int:
        status = 0
        if self.out(t):
            status |= Status.OUTPUT
        if self.null:                                   # settled by out()
            status |= Status.NULL_COUNT
        if self.bcd:
            status |= Status.BCD
        return int(status) | self.access << STATUS_ACCESS_SHIFT | self.mode_bits << STATUS_MODE_SHIFT

    # -- state changes at tick t ---------------------------------------------------------------
    def control(self, mode_bits: int, access: Access, bcd: bool, t: int) -> None:
        """A control word for this counter: stop, set the mode, wait for a count."""
        self.held_count = self.count(t)
        self.mode_bits = mode_bits
        self.access = access
        self.bcd = bcd
        self.phase = _Phase.IDLE
        self.cr = None
        self.null = True
        self.null_clear = None
        self.swap_start = None
        self.read_msb = self.write_msb = False
        self.latch_access = Access.LATCH
        self.status_latched = False

    def stop(self, t: int) -> None:
        """Mode 0, first byte of a two-byte count: counting stops and OUT drops at once."""
        self.held_count = self.count(t)
        self.phase = _Phase.IDLE

    def load(self, value: int, t: int) -> None:
        """A complete count written to the CR (datasheet, each mode's "new count" rule)."""
        self.settle(t)
        mode = self.mode
        self.cr = value
        self.null = True
        self.swap_start = None
        if mode in (Mode.RETRIGGERABLE_ONE_SHOT, Mode.HARDWARE_STROBE):
            self.null_clear = None                      # waits for a GATE rising edge
        elif mode in (Mode.RATE_GENERATOR, Mode.SQUARE_WAVE) and self.phase == _Phase.COUNTING:
            self._reload_at_period_end(value, t)
        elif mode in (Mode.RATE_GENERATOR, Mode.SQUARE_WAVE) and self.phase == _Phase.GATED:
            self.null_clear = None                      # the GATE rising edge loads it
        else:
            self._start(value, t)

    def _start(self, value: int, t: int) -> None:
        """Load ``value`` into the CE at tick ``t`` (counting unless GATE holds it)."""
        self.n = value
        self.swap_start = None
        if self.gate or self.mode in (Mode.RETRIGGERABLE_ONE_SHOT, Mode.HARDWARE_STROBE):
            self.phase = _Phase.COUNTING
            self.start = t
        else:
            self.phase = _Phase.GATED
            self.held_d = 0
        if self.null:
            self.null_clear = t + 1

    def _reload_at_period_end(self, value: int, t: int) -> None:
        n = self.n
        d = t - self.start
        period_start = self.start + d - d % n
        if self.mode == Mode.RATE_GENERATOR:
            at = start = period_start + n
        else:
            high = (n + 1) // 2
            if d % n < high:
                # End of the high half: OUT falls and the new count runs its low half.
                at = period_start + high
                start = at - (value + 1) // 2
            else:
                at = start = period_start + n
        self.null_clear = at
        self.swap_start = start

    def set_gate(self, level: bool, t: int) -> None:
        self.settle(t)
        if level == self.gate:
            return
        self.gate = level
        mode = self.mode
        if mode in (Mode.RETRIGGERABLE_ONE_SHOT, Mode.HARDWARE_STROBE):
            if level and self.cr is not None:
                self._start(self.cr, t)
        elif mode in (Mode.RATE_GENERATOR, Mode.SQUARE_WAVE):
            if not level and self.phase == _Phase.COUNTING:
                self.phase = _Phase.GATED
                self.held_d = t - self.start
                if self.swap_start is not None:         # the period never ends: wait for the trigger
                    self.swap_start = None
                    self.null_clear = None
            elif level and self.phase == _Phase.GATED:
                assert self.cr is not None
                self._start(self.cr, t)
        else:
            if not level and self.phase == _Phase.COUNTING:
                self.phase = _Phase.GATED
                self.held_d = t - self.start
            elif level and self.phase == _Phase.GATED:
                self.phase = _Phase.COUNTING
                self.start = t - self.held_d


_CHANNEL_FIELDS = tuple(f.name for f in fields(_Channel))


class PIT8254:
    """Intel 8254 PIT: counters 0-2 at offsets 0-2, control word at offset 3 (ports 0x40-0x43).

    ``irq0`` follows OUT of counter 0.  The machine wires GATE 2 through
    :class:`SystemControlPortB`, which also reads OUT 2 (:meth:`out`).
    """

    WINDOW_SIZE = 4

    def __init__(self, clock: Clock, irq0: IrqLine, log: Log = nolog) -> None:
        self.clock = clock
        self.irq0 = irq0
        self.log = log
        self._channels = [_Channel() for _ in range(NUM_CHANNELS)]
        self._timer = clock.timer(self._on_timer, "pit0")
        self._timer_tick: int | None = None
        self.reset()

    def reset(self) -> None:
        """The state a PC BIOS leaves (as QEMU's reset): every counter in mode 3, binary,
        LSB-then-MSB, count 65536 loaded now; GATE 0/1 high, GATE 2 low."""
        t = pit_ticks(self.clock.now)
        for i in range(NUM_CHANNELS):
            ch = _Channel(gate=(i != Select.COUNTER2))
            ch.cr = BINARY_MODULUS
            ch._start(BINARY_MODULUS, t)
            self._channels[i] = ch
        self._update_irq(t)

    # -- register window ---------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        value = 0
        for i in range(size):
            value |= self._read_byte(offset + i) << (8 * i)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            self._write_byte(offset + i, (value >> (8 * i)) & BYTE)

    def _read_byte(self, offset: int) -> int:
        if offset == Port.CONTROL:
            self.log("pit: read of the write-only control word port")
            return FLOATING_BUS
        if not Port.COUNTER0 <= offset <= Port.COUNTER2:
            return FLOATING_BUS
        t = self._sync()
        ch = self._channels[offset]
        if ch.status_latched:
            ch.status_latched = False
            return ch.status
        if ch.latch_access != Access.LATCH:
            value = ch.latch_value
            if ch.latch_access == Access.LOHI:
                ch.latch_access = Access.MSB
                return value & BYTE
            high = ch.latch_access == Access.MSB
            ch.latch_access = Access.LATCH
            return (value >> 8) & BYTE if high else value & BYTE
        value = ch.register_count(t)
        if ch.access == Access.LOHI:
            high = ch.read_msb
            ch.read_msb = not high
        else:
            high = ch.access == Access.MSB
        return (value >> 8) & BYTE if high else value & BYTE

    def _write_byte(self, offset: int, value: int) -> None:
        if not Port.COUNTER0 <= offset <= Port.CONTROL:
            return
        t = self._sync()
        if offset == Port.CONTROL:
            self._write_control(value, t)
        else:
            self._write_count(offset, value, t)

    def _write_control(self, value: int, t: int) -> None:
        select = Select(value >> CW_SELECT_SHIFT)
        if select == Select.READ_BACK:
            self._read_back(value, t)
            return
        ch = self._channels[select]
        access = Access((value >> CW_ACCESS_SHIFT) & CW_ACCESS_MASK)
        if access == Access.LATCH:
            self._latch_count(ch, t)
            return
        ch.control((value >> CW_MODE_SHIFT) & CW_MODE_MASK, access, bool(value & CW_BCD), t)
        if select == Select.COUNTER0:
            self._update_irq(t)

    def _write_count(self, index: int, value: int, t: int) -> None:
        ch = self._channels[index]
        if ch.access == Access.LSB:
            raw = value
        elif ch.access == Access.MSB:
            raw = value << 8
        elif not ch.write_msb:
            ch.write_lsb = value
            ch.write_msb = True
            if ch.phase != _Phase.IDLE and ch.mode == Mode.INTERRUPT_ON_TERMINAL_COUNT:
                ch.stop(t)
                if index == Select.COUNTER0:
                    self._update_irq(t)
            return
        else:
            ch.write_msb = False
            raw = ch.write_lsb | value << 8
        ch.load(self._decode(index, ch, raw), t)
        if index == Select.COUNTER0:
            self._update_irq(t)

    def _decode(self, index: int, ch: _Channel, raw: int) -> int:
        if ch.bcd:
            digits = [(raw >> shift) & 0xF for shift in range(0, 16, 4)]
            if any(digit > 9 for digit in digits):
                self.log(f"pit: counter {index}: invalid BCD count {raw:#06x}")
            value = sum(digit * 10 ** i for i, digit in enumerate(digits)) or BCD_MODULUS
        else:
            value = raw or BINARY_MODULUS
        if value == 1 and ch.mode in (Mode.RATE_GENERATOR, Mode.SQUARE_WAVE):
            self.log(f"pit: counter {index}: count 1 is illegal in mode {int(ch.mode)}")
        return value

    def _latch_count(self, ch: _Channel, t: int) -> None:
        """Counter latch command: a second latch before the first is read is ignored."""
        if ch.latch_access == Access.LATCH:
            ch.latch_value = ch.register_count(t)
            ch.latch_access = ch.access

    def _read_back(self, value: int, t: int) -> None:
        if value & ReadBack.RESERVED:
            self.log(f"pit: read-back command {value:#04x} with reserved bit 0 set")
        for index, select in enumerate((ReadBack.CNT0, ReadBack.CNT1, ReadBack.CNT2)):
            if not value & select:
                continue
            ch = self._channels[index]
            if not value & ReadBack.NO_COUNT:
                self._latch_count(ch, t)
            if not value & ReadBack.NO_STATUS and not ch.status_latched:
                ch.status = ch.status_byte(t)
                ch.status_latched = True

    # -- pins ---------------------------------------------------------------------------------
    def set_gate(self, channel: int, level: bool) -> None:
        """Drive the GATE input of ``channel`` (the machine ties 0 and 1 high)."""
        t = self._sync()
        self._channels[channel].set_gate(bool(level), t)
        if channel == Select.COUNTER0:
            self._update_irq(t)

    def gate(self, channel: int) -> bool:
        return self._channels[channel].gate

    def out(self, channel: int) -> bool:
        """The OUT pin of ``channel`` now."""
        t = self._sync()
        return self._channels[channel].out(t)

    # -- time and the interrupt ----------------------------------------------------------------
    def _sync(self) -> int:
        """The current tick, after emitting any OUT0 edge whose timer is due but not yet run.

        Discussion: the machine stops the CPU at every deadline, so a register
        access never finds the channel-0 timer overdue.  A driver that moves
        the clock past a deadline and touches the PIT before ``run_due`` would
        otherwise make the late timer evaluate settled (future) state; catching
        up here keeps the edges in order and the state consistent.
        """
        t = pit_ticks(self.clock.now)
        while self._timer_tick is not None and self._timer_tick <= t:
            self._update_irq(self._timer_tick)
        return t

    def _on_timer(self) -> None:
        if self._timer_tick is not None:
            self._update_irq(self._timer_tick)

    def _update_irq(self, t: int) -> None:
        """Drive irq0 from OUT0 at tick ``t`` and arm the timer for OUT0's next change."""
        ch = self._channels[Select.COUNTER0]
        self.irq0.set(ch.out(t))
        self._arm(ch.next_change_tick(t))

    def _arm(self, tick: int | None) -> None:
        self._timer_tick = tick
        if tick is None:
            self._timer.cancel()
        else:
            self._timer.arm(tick_ns(tick))

    # -- snapshots -------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        return {
            "channels": [
                {name: _plain(getattr(ch, name)) for name in _CHANNEL_FIELDS} for ch in self._channels
            ],
            "timer_tick": self._timer_tick,
            "irq0": self.irq0.level,
        }

    def restore(self, state: dict) -> None:
        """Restore the counters, re-arm the channel-0 timer for the saved tick and drive irq0
        to its saved level (restore interrupt controllers after this, so that level fix-up
        cannot leave a stale edge in them)."""
        self._channels = [_Channel(**dict(saved)) for saved in state["channels"]]
        self.irq0.set(state["irq0"])
        self._arm(state["timer_tick"])


def _plain(value: object) -> object:
    if isinstance(value, bool) or value is None:
        return value
    assert isinstance(value, int)
    return int(value)


class SystemControlPortB:
    """PC/AT System Control Port B at I/O 0x61 (offset 0, one byte).

    Bit 0 drives GATE 2 of the PIT and bit 1 (speaker data enable) is stored;
    bits 2 and 3 (parity / I/O channel check NMI disables) are stored and read
    back, as on the AT.  Bit 4 toggles every 15.085 us of virtual time (the
    refresh request), bit 5 is OUT 2.  Bits 6 and 7 report NMI sources that
    never occur here and read 0.  Writes to bits 4-7 are ignored.  There is no
    interrupt, so no ``_update_irq``.  (QEMU's pcspk flips bit 4 on every read
    and drops bits 2-3; here bit 4 is a function of virtual time, so a delay
    loop that counts its toggles measures 15.085 us each.)
    """

    WINDOW_SIZE = 1

    def __init__(self, pit: PIT8254, log: Log = nolog) -> None:
        self._pit = pit
        self._clock = pit.clock
        self.log = log
        self._bits = 0
        self.reset()

    def reset(self) -> None:
        self._bits = 0
        self._pit.set_gate(Select.COUNTER2, False)

    @property
    def speaker_enabled(self) -> bool:
        """Speaker data enable (bit 1): the speaker follows OUT 2 while this and the gate are set."""
        return bool(self._bits & PortB.SPEAKER_DATA)

    def read(self, offset: int, size: int) -> int:
        value = 0
        for i in range(size):
            value |= (self._read_byte() if offset + i == 0 else FLOATING_BUS) << (8 * i)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self._write_byte(value & BYTE)

    def _read_byte(self) -> int:
        value = self._bits
        if (self._clock.now // REFRESH_TOGGLE_NS) & 1:
            value |= PortB.REFRESH_TOGGLE
        if self._pit.out(Select.COUNTER2):
            value |= PortB.TIMER2_OUT
        return int(value)

    def _write_byte(self, value: int) -> None:
        self._bits = value & PORTB_WRITABLE
        self._pit.set_gate(Select.COUNTER2, bool(self._bits & PortB.TIMER2_GATE))

    def snapshot(self) -> dict:
        return {"bits": int(self._bits)}

    def restore(self, state: dict) -> None:
        """The GATE 2 level itself is part of the PIT's snapshot: this does not drive it."""
        self._bits = state["bits"] & PORTB_WRITABLE
