"""16550A UART (COM1 at 0x3F8 on IRQ4, COM2 at 0x2F8 on IRQ3).

Register set and behaviour follow the National Semiconductor PC16550D data
sheet (section numbers below), with QEMU's ``hw/char/serial.c`` as the
reference wherever the issue asks for "as on QEMU".

How it works
------------

The UART is an eight-byte port window (offsets 0..7, byte access).  Its
state is one set of registers plus three queues:

* the transmit side: ``_tx_fifo`` (the 16-byte XMIT FIFO, or the one-byte
  THR when FIFOs are off) feeding the transmitter shift register ``_tsr``;
* the receive side: ``_rx_fifo`` (the 16-byte RCVR FIFO) or ``_rbr`` (FIFOs
  off), fed by the receiver shift register;
* ``_rx_pending``: host input that :meth:`UART16550.receive` queued and that
  has not yet crossed the serial line.

Two transmit timings (:class:`SerialTiming`, a constructor option):

* ``BAUD`` (the default): the data sheet.  A byte written to THR leaves the
  line one character time later (below); a guest that polls LSR.THRE sees
  the FIFO drain at the programmed baud rate.
* ``INSTANT``: QEMU's ``serial.c``.  A THR write hands the byte (and so the
  whole FIFO) to the back end, or in loopback to the receiver, at once:
  right after the write LSR reads THRE|TEMT and the THR-empty interrupt is
  pending again (with IER.ETBEI), so every THR write raises it.  The IRQ
  line is not gated by MCR.OUT2 (QEMU has no OUT2 wiring) unless the
  caller asks for it.  The receiver, the character timeout and the modem
  lines are the same in both modes (host input still crosses the line one
  character time per byte).  Both modes are deterministic.

Time is virtual.  One *character time* is the frame length (start bit, 5..8
data bits, optional parity, 1/1.5/2 stop bits) times ``divisor * 16`` clocks
of the 1.8432 MHz baud crystal, in integer ns rounded up
(:func:`character_time_ns`).  Three internal events can be pending, each an
absolute virtual time:

* ``_tx_done``: the character in the TSR has been shifted out.  It reaches
  the back end (``chardev.write(byte, time_ns)``) or, in loopback, the
  receiver, and the next byte moves from the THR/FIFO into the TSR.
* ``_rx_done``: the host byte on the line has been shifted in.  The line is
  flow-controlled like QEMU's ``serial_can_receive``: a byte only starts
  when the receiver has room for it (FIFO not full, or RBR empty with FIFOs
  off) and loopback is off, so host input is never lost.
* ``_timeout_at``: four character times after the last byte entered the RCVR
  FIFO or the last read of RBR left data in it (PC16550D 8.10).

One :class:`~vmk.machine.clock.Timer` is armed for the earliest of the three.
:meth:`_run_until` processes every event due by ``clock.now`` in time order
(ties: transmit, then receive, then timeout); it runs from the timer and at
the top of every register access, so registers are exact even if the timer
has not fired yet.

Invariants
----------

* ``_tsr is None`` iff ``_tx_done is None``; the TSR is only idle when the
  THR/FIFO is empty (a written byte moves into an idle TSR at once).
* LSR.THRE == ``not _tx_fifo``; LSR.TEMT == THRE and the TSR is idle.
* In ``INSTANT`` timing the transmitter is always idle between accesses:
  ``_tx_fifo`` is empty and ``_tsr`` is None.
* ``_rx_done is not None`` implies ``_rx_pending`` is non-empty (its head is
  the byte on the line).
* ``_update_irq`` is the only place that drives the IRQ line.  The line is
  ``IIR != no-interrupt`` gated by MCR.OUT2 (PC wiring: OUT2 enables the
  IRQ driver on the ISA bus).  On real hardware the OUT2 *pin* is forced
  inactive in loopback (PC16550D 8.8), which silences the IRQ; QEMU keeps
  RX/THRE interrupts working in loopback, guests' self-tests rely on that,
  and the QEMU comparison test checks it, so vmk gates on the MCR bit.
  QEMU does not gate on OUT2 at all; ``out2_gates_irq=False`` selects that
  (the default in ``INSTANT`` timing).
  Reset sets MCR = OUT2 as QEMU does, so a guest that never writes MCR still
  gets interrupts, as it would on QEMU.

Choices where the data sheet is silent, taken from QEMU
-------------------------------------------------------

* Changing FCR bit 0 resets both FIFOs: a byte held in RBR is discarded
  (LSR.DR cleared), and an empty RCVR FIFO reads as 0.
* TX reset (FCR bit 2) sets THRE and marks the THR-empty interrupt pending;
  the byte in the TSR still goes out.
* A THR write into a full XMIT FIFO (or a full THR with FIFOs off) drops the
  oldest byte.
* Enabling IER.ETBEI while THRE is set raises the THR-empty interrupt at once.
* The character-timeout interrupt is masked by IER.ERBFI, is raised whenever
  data sits in the FIFO for four character times (whatever the trigger
  level; it then shows as IIR 0xC rather than 0x4) and is cleared by an RBR
  read.
* Divisor 0 keeps the previous character time (transmission continues);
  the character time is recomputed on writes to LCR, DLL and DLM.  Reset
  gives 9600 baud 8N1 timing even though LCR reads 0 (QEMU's default).
* Data bits are not masked to the word length.

Not modelled
------------

Parity and framing errors (host bytes are always well formed; PE/FE exist
only as register bits); sending a break (LCR bit 6) to the back end; DMA
mode and the TXRDY/RXRDY pins (FCR bit 3 is stored only); the sub-character
phase of the baud generator (the THR->TSR transfer is instantaneous); the
host side's modem lines (:meth:`UART16550.set_modem_lines` drives CTS, DSR,
RI and DCD for the machine and tests; the default is CTS, DSR and DCD
asserted as on QEMU).
"""
from __future__ import annotations

from collections import deque
from enum import Enum, IntEnum
from typing import Protocol

from vmk.machine.clock import NS_PER_SEC, Clock
from vmk.machine.devices import Log, nolog
from vmk.machine.irq import IrqLine

__all__ = [
    "BAUD_CLOCK_HZ",
    "COM1_BASE",
    "COM1_IRQ",
    "COM2_BASE",
    "COM2_IRQ",
    "FCR",
    "FIFO_SIZE",
    "IER",
    "LCR",
    "LSR",
    "MCR",
    "MSR",
    "UART16550",
    "IntId",
    "Reg",
    "SerialBackend",
    "SerialTiming",
    "character_time_ns",
]

COM1_BASE, COM1_IRQ = 0x3F8, 4
COM2_BASE, COM2_IRQ = 0x2F8, 3

BAUD_CLOCK_HZ = 1_843_200     # PC crystal; 8.3: baud = clock / (16 * divisor)
BAUD_CLOCK_DIV = 16
FIFO_SIZE = 16                # 1.0: 16-byte transmit and receive FIFOs
TIMEOUT_CHARS = 4             # 8.10: character timeout after 4 character times
RESET_DIVISOR = 12            # 9600 baud, QEMU's reset value


class SerialTiming(Enum):
    """When a byte written to THR leaves the transmitter (see the module docstring)."""

    BAUD = "baud"         # PC16550D: one character time per byte at the programmed rate
    INSTANT = "instant"   # QEMU: at the THR write; THRE never falls, OUT2 does not gate the IRQ


class Reg(IntEnum):
    """Register offsets in the 8-byte window (PC16550D Table II)."""

    RBR_THR = 0   # RBR (read) / THR (write); DLL when LCR.DLAB = 1
    IER = 1       # DLM when LCR.DLAB = 1
    IIR_FCR = 2   # IIR (read) / FCR (write)
    LCR = 3
    MCR = 4
    LSR = 5
    MSR = 6
    SCR = 7


class IER(IntEnum):
    """Interrupt Enable Register (8.7)."""

    ERBFI = 0x01   # received data available (and character timeout)
    ETBEI = 0x02   # transmitter holding register empty
    ELSI = 0x04    # receiver line status
    EDSSI = 0x08   # modem status


IER_MASK = 0x0F


class IntId(IntEnum):
    """IIR bits 0-3: the pending interrupt of highest priority (8.6, Table IV)."""

    MODEM_STATUS = 0x00
    NONE = 0x01
    THR_EMPTY = 0x02
    RX_DATA = 0x04
    LINE_STATUS = 0x06
    CHAR_TIMEOUT = 0x0C


IIR_FIFOS_ENABLED = 0xC0      # 8.6: IIR bits 6-7 set when FCR bit 0 = 1


class FCR(IntEnum):
    """FIFO Control Register (8.5), write only."""

    ENABLE = 0x01
    RX_RESET = 0x02
    TX_RESET = 0x04
    DMA_MODE = 0x08
    TRIGGER = 0xC0


FCR_STORED = FCR.ENABLE | FCR.DMA_MODE | FCR.TRIGGER     # the bits that stick
TRIGGER_LEVELS = {0x00: 1, 0x40: 4, 0x80: 8, 0xC0: 14}   # 8.5, FCR bits 6-7


class LCR(IntEnum):
    """Line Control Register (8.1)."""

    WLS = 0x03     # word length: 5 + value data bits
    STB = 0x04     # 2 stop bits (1.5 with 5-bit words)
    PEN = 0x08     # parity bit
    EPS = 0x10     # even parity
    STICK = 0x20   # stick parity
    BREAK = 0x40   # set break
    DLAB = 0x80    # divisor latch access


class MCR(IntEnum):
    """Modem Control Register (8.8)."""

    DTR = 0x01
    RTS = 0x02
    OUT1 = 0x04
    OUT2 = 0x08
    LOOP = 0x10


MCR_MASK = 0x1F


class LSR(IntEnum):
    """Line Status Register (8.4)."""

    DR = 0x01
    OE = 0x02
    PE = 0x04
    FE = 0x08
    BI = 0x10
    THRE = 0x20
    TEMT = 0x40
    FIFO_ERROR = 0x80


LSR_ERRORS = LSR.OE | LSR.PE | LSR.FE | LSR.BI          # sources of the line status interrupt
LSR_CHAR_ERRORS = LSR.PE | LSR.FE | LSR.BI              # tied to one received character


class MSR(IntEnum):
    """Modem Status Register (8.9)."""

    DCTS = 0x01
    DDSR = 0x02
    TERI = 0x04
    DDCD = 0x08
    CTS = 0x10
    DSR = 0x20
    RI = 0x40
    DCD = 0x80


MSR_DELTAS = MSR.DCTS | MSR.DDSR | MSR.TERI | MSR.DDCD
MSR_INPUTS = MSR.CTS | MSR.DSR | MSR.RI | MSR.DCD
MSR_RESET_INPUTS = MSR.CTS | MSR.DSR | MSR.DCD       # what QEMU reports for a back end without modem lines

# Plain ints of the bits the register-read path tests (an IntEnum member costs
# an attribute look-up and an enum operation on every access).
_WINDOW = len(Reg)            # the register window: offsets 0..7
_FCR_ENABLE = int(FCR.ENABLE)
_LCR_DLAB = int(LCR.DLAB)
_LSR_DR = int(LSR.DR)
_LSR_THRE = int(LSR.THRE)
_LSR_THRE_TEMT = int(LSR.THRE | LSR.TEMT)
_LSR_FIFO_ERROR = int(LSR.FIFO_ERROR)

# Host queue entry for a received break (a value no data byte can take).
_BREAK = 0x100
# An RCVR FIFO entry is ``byte | (LSR character error bits << _ERR_SHIFT)``.
_ERR_SHIFT = 8


class SerialBackend(Protocol):
    """What the UART needs from its host side (``vmk.machine.chardev.CharDev``)."""

    def write(self, data: bytes, time_ns: int) -> None: ...


def character_time_ns(lcr: int, divisor: int) -> int:
    """Virtual ns one frame takes at this LCR and divisor, rounded up.

    A frame is 1 start bit, 5..8 data bits, an optional parity bit and 1, 1.5
    (5-bit words with LCR.STB) or 2 stop bits; a bit lasts ``divisor * 16``
    periods of the 1.8432 MHz crystal.  Counted in half bits to stay exact.
    """
    if divisor <= 0:
        raise ValueError("divisor must be positive")
    data_bits = 5 + (lcr & LCR.WLS)
    half_bits = 2 * (1 + data_bits + (1 if lcr & LCR.PEN else 0))
    if lcr & LCR.STB:
        half_bits += 3 if data_bits == 5 else 4
    else:
        half_bits += 2
    num = half_bits * divisor * BAUD_CLOCK_DIV * NS_PER_SEC
    den = 2 * BAUD_CLOCK_HZ
    return -(-num // den)


_RESET_CHAR_NS = character_time_ns(LCR.WLS, RESET_DIVISOR)   # 9600 8N1


class UART16550:
    """A 16550A UART with FIFOs, driving one IRQ line and one host back end.

    ``chardev`` receives every transmitted byte as ``write(bytes, time_ns)``
    at the virtual time its stop bit ends (``SerialTiming.BAUD``) or at the
    time of the THR write (``SerialTiming.INSTANT``).  If it has ``attach(sink)`` (every
    :class:`~vmk.machine.chardev.CharDev` does), the UART attaches
    :meth:`receive` to it, so ``chardev.pump()`` delivers host input.
    """

    def __init__(
        self,
        clock: Clock,
        irq: IrqLine,
        chardev: SerialBackend,
        log: Log = nolog,
        name: str = "COM1",
        *,
        timing: SerialTiming | str = SerialTiming.BAUD,
        out2_gates_irq: bool | None = None,
    ) -> None:
        self._clock = clock
        self._irq = irq
        self._chardev = chardev
        self._log = log
        self.name = name
        self.timing = SerialTiming(timing)
        self._instant = self.timing is SerialTiming.INSTANT
        if out2_gates_irq is None:
            out2_gates_irq = not self._instant       # QEMU does not gate the line on OUT2
        self._out2_gates_irq = out2_gates_irq
        self._timer = clock.timer(self._on_timer, f"{name}.uart")
        # Host side state: survives a UART reset (the bytes are still on their way).
        self._rx_pending: deque[int] = deque()
        self._msr_inputs = int(MSR_RESET_INPUTS)
        self.tx_dropped = 0          # statistic: bytes lost to THR/XMIT FIFO overruns
        readers = {Reg.RBR_THR: self._read_rbr_dll, Reg.IER: self._read_ier_dlm, Reg.IIR_FCR: self._read_iir,
                   Reg.LCR: self._read_lcr, Reg.MCR: self._read_mcr, Reg.LSR: self._read_lsr,
                   Reg.MSR: self._read_msr, Reg.SCR: self._read_scr}
        self._readers = tuple(readers[Reg(offset)] for offset in range(_WINDOW))
        attach = getattr(chardev, "attach", None)
        if attach is not None:
            attach(self.receive)
        self.reset()

    # -- power-on state ------------------------------------------------------
    def reset(self) -> None:
        """Master reset (PC16550D Table III), with QEMU's MCR and divisor."""
        self._ier = 0
        self._lcr = 0
        self._mcr = int(MCR.OUT2)
        self._scr = 0
        self._fcr = 0
        self._divisor = RESET_DIVISOR
        self._char_ns = _RESET_CHAR_NS
        # transmitter
        self._tx_fifo: deque[int] = deque()
        self._tsr: int | None = None
        self._tx_done: int | None = None
        self._thr_ipending = False
        # receiver
        self._rx_fifo: deque[int] = deque()
        self._rbr = 0
        self._rbr_full = False
        self._lsr_err = 0
        self._fifo_err = False
        self._timeout_at: int | None = None
        self._timeout_ipending = False
        self._rx_done: int | None = None
        # modem status
        self._msr_seen = self._modem_inputs()
        self._msr_delta = 0
        self._rx_kick(self._clock.now)
        self._update_irq()
        self._rearm()

    # -- the bus -------------------------------------------------------------
    # Discussion: a guest that polls LSR.THRE reads it ~86 times per byte at
    # baud timing, so the read path is kept short: the register is found in a
    # table (``_readers``, one bound method per offset, each taking ``now``),
    # and internal events are only processed when one is due.  The timer is
    # armed for the earliest pending event (``_rearm`` runs after every change
    # of ``_tx_done``/``_rx_done``/``_timeout_at``), so "nothing due" is
    # ``_timer.deadline`` being None or later than now.
    def read(self, offset: int, size: int) -> int:
        """Register read; wider accesses are split into byte reads."""
        if size != 1 or not 0 <= offset < _WINDOW:
            value = 0
            for i in range(size):
                value |= self._read_byte(offset + i) << (8 * i)
            return value
        now = self._clock.now                  # _read_byte, inlined: the polling loop's path
        due = self._timer.deadline
        if due is not None and due <= now:
            self._run_until(now)
        return self._readers[offset](now)

    def write(self, offset: int, size: int, value: int) -> None:
        """Register write; wider accesses are split into byte writes."""
        for i in range(size):
            self._write_byte(offset + i, (value >> (8 * i)) & 0xFF)

    def _read_byte(self, offset: int) -> int:
        now = self._clock.now
        due = self._timer.deadline
        if due is not None and due <= now:
            self._run_until(now)
        if 0 <= offset < _WINDOW:
            return self._readers[offset](now)
        self._log(f"{self.name}: read outside the register window at offset {offset}")
        return 0xFF

    def _write_byte(self, offset: int, value: int) -> None:
        now = self._clock.now
        due = self._timer.deadline
        if due is not None and due <= now:
            self._run_until(now)
        dlab = self._lcr & LCR.DLAB
        match offset:
            case Reg.RBR_THR:
                if dlab:
                    self._set_divisor((self._divisor & 0xFF00) | value)
                else:
                    self._write_thr(value, now)
            case Reg.IER:
                if dlab:
                    self._set_divisor((self._divisor & 0x00FF) | (value << 8))
                else:
                    self._write_ier(value)
            case Reg.IIR_FCR:
                self._write_fcr(value, now)
            case Reg.LCR:
                self._lcr = value
                self._update_char_time()
            case Reg.MCR:
                self._write_mcr(value, now)
            case Reg.LSR | Reg.MSR:
                # 8.4: LSR writes are for factory test only; QEMU ignores both.
                self._log(f"{self.name}: write {value:#04x} to read-only {Reg(offset).name} ignored")
            case Reg.SCR:
                self._scr = value
            case _:
                self._log(f"{self.name}: write outside the register window at offset {offset}")

    # -- registers -----------------------------------------------------------
    def _set_divisor(self, divisor: int) -> None:
        self._divisor = divisor
        self._update_char_time()

    def _update_char_time(self) -> None:
        # Discussion: QEMU's serial_update_parameters returns early on divisor 0,
        # keeping the last character time; we do the same, and a character
        # already in a shift register keeps the deadline it was given.
        if self._divisor == 0:
            self._log(f"{self.name}: divisor 0, keeping the previous baud rate")
            return
        self._char_ns = character_time_ns(self._lcr, self._divisor)

    def _fifo_on(self) -> bool:
        return bool(self._fcr & FCR.ENABLE)

    # The register reads, by offset (``_readers``); each is given the time of the access.
    def _read_rbr_dll(self, now: int) -> int:
        return self._divisor & 0xFF if self._lcr & _LCR_DLAB else self._read_rbr(now)

    def _read_ier_dlm(self, now: int) -> int:
        return self._divisor >> 8 if self._lcr & _LCR_DLAB else self._ier

    def _read_lcr(self, now: int) -> int:
        return self._lcr

    def _read_mcr(self, now: int) -> int:
        return self._mcr

    def _read_scr(self, now: int) -> int:
        return self._scr

    def _read_rbr(self, now: int) -> int:
        if self._fifo_on():
            value = 0                         # QEMU: an empty FIFO reads 0
            if self._rx_fifo:
                value = self._rx_fifo.popleft() & 0xFF
                if self._rx_fifo:
                    # 8.4: a character's error bits show when it reaches the top.
                    self._lsr_err |= self._rx_fifo[0] >> _ERR_SHIFT
                    self._timeout_at = now + TIMEOUT_CHARS * self._char_ns
            self._timeout_ipending = False
        else:
            value = self._rbr
            self._rbr_full = False
        self._rx_kick(now)
        self._update_irq()
        self._rearm()
        return value

    def _read_iir(self, now: int) -> int:
        iid = self._interrupt_id()
        if iid == IntId.THR_EMPTY:
            # 8.6: reading IIR when THRE is the source clears it.
            self._thr_ipending = False
            self._update_irq()
        return int(iid) | (IIR_FIFOS_ENABLED if self._fifo_on() else 0)

    def _read_lsr(self, now: int) -> int:
        value = self._lsr_err                  # _lsr(), inlined: the polling loop's path
        if (self._rx_fifo if self._fcr & _FCR_ENABLE else self._rbr_full):
            value |= _LSR_DR
        if not self._tx_fifo:
            value |= _LSR_THRE_TEMT if self._tsr is None else _LSR_THRE
        if self._fifo_err:
            value |= _LSR_FIFO_ERROR
        # 8.4: the read clears the error bits; LSR7 clears unless more errored
        # characters are queued.  The IRQ is derived again only if that changed
        # anything (a polling loop reads LSR with no error pending).
        rx = self._rx_fifo
        fifo_err = bool(rx) and any(e >> _ERR_SHIFT for e in rx)
        if self._lsr_err or fifo_err != self._fifo_err:
            self._lsr_err = 0
            self._fifo_err = fifo_err
            self._update_irq()
        return int(value)

    def _read_msr(self, now: int) -> int:
        value = int(self._msr_seen | self._msr_delta)
        self._msr_delta = 0
        self._update_irq()
        return value

    def _write_thr(self, value: int, now: int) -> None:
        room = FIFO_SIZE if self._fifo_on() else 1
        if len(self._tx_fifo) >= room:
            # QEMU: transmit overruns overwrite the oldest byte.  Logged once:
            # a guest that never polls LSR.THRE would otherwise flood the log.
            self._tx_fifo.popleft()
            if not self.tx_dropped:
                self._log(f"{self.name}: THR written while full (LSR.THRE clear), oldest byte dropped")
            self.tx_dropped += 1
        self._tx_fifo.append(value)
        self._thr_ipending = False
        if self._instant:
            # Discussion: QEMU's serial_xmit runs inside the THR write: the byte
            # is on the wire and THRE (and the THR-empty interrupt) are back
            # before the guest's next instruction.  The line still drops for the
            # write first, as QEMU's does: without that low-high pulse an
            # edge-triggered controller that missed the earlier edge (the line
            # was held high by a source the handler did not acknowledge) would
            # never see THRE again; the VM kernel's console driver hung so.
            self._update_irq()
        if self._tsr is None:
            self._tx_start(now)
        if self._instant:
            self._tx_complete(now)
        self._update_irq()
        self._rearm()

    def _write_ier(self, value: int) -> None:
        value &= IER_MASK
        changed = self._ier ^ value
        self._ier = value
        if changed & IER.ETBEI:
            # QEMU (and Windows relies on it): enabling ETBEI while THRE is set
            # raises the interrupt even if an IIR read had cleared it before.
            self._thr_ipending = bool(value & IER.ETBEI) and not self._tx_fifo
        self._update_irq()

    def _write_fcr(self, value: int, now: int) -> None:
        if (value ^ self._fcr) & FCR.ENABLE:
            # QEMU: switching the FIFOs on or off flushes both of them.
            value |= FCR.RX_RESET | FCR.TX_RESET
        if value & FCR.RX_RESET:
            self._rx_fifo.clear()
            self._rbr_full = False
            self._lsr_err &= ~LSR_CHAR_ERRORS
            self._fifo_err = False
            self._timeout_at = None
            self._timeout_ipending = False
        if value & FCR.TX_RESET:
            # 8.5: the shift register is not cleared; its character goes out.
            self._tx_fifo.clear()
            self._thr_ipending = True
        self._fcr = value & FCR_STORED
        self._rx_kick(now)
        self._update_irq()
        self._rearm()

    def _write_mcr(self, value: int, now: int) -> None:
        self._mcr = value & MCR_MASK
        self._modem_inputs_changed()
        self._rx_kick(now)          # leaving loopback reconnects the host line
        self._update_irq()
        self._rearm()

    @property
    def _trigger(self) -> int:
        return TRIGGER_LEVELS[self._fcr & FCR.TRIGGER]

    # -- modem lines -----------------------------------------------------------
    def _modem_inputs(self) -> int:
        mcr = self._mcr
        if not mcr & MCR.LOOP:
            return self._msr_inputs
        # 8.8: in loopback the outputs drive the inputs: RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD.
        value = 0
        if mcr & MCR.RTS:
            value |= MSR.CTS
        if mcr & MCR.DTR:
            value |= MSR.DSR
        if mcr & MCR.OUT1:
            value |= MSR.RI
        if mcr & MCR.OUT2:
            value |= MSR.DCD
        return value

    def _modem_inputs_changed(self) -> None:
        new = self._modem_inputs()
        changed = new ^ self._msr_seen
        if changed:
            self._msr_delta |= (changed >> 4) & (MSR.DCTS | MSR.DDSR | MSR.DDCD)
            if changed & MSR.RI and not new & MSR.RI:
                self._msr_delta |= MSR.TERI      # 8.9: trailing edge of RI only
            self._msr_seen = new

    def set_modem_lines(
        self,
        *,
        cts: bool | None = None,
        dsr: bool | None = None,
        ri: bool | None = None,
        dcd: bool | None = None,
    ) -> None:
        """Drive the external modem inputs (None leaves a line as it is)."""
        self._run_until(self._clock.now)
        for flag, level in ((MSR.CTS, cts), (MSR.DSR, dsr), (MSR.RI, ri), (MSR.DCD, dcd)):
            if level is not None:
                self._msr_inputs = (self._msr_inputs | flag) if level else (self._msr_inputs & ~flag)
        self._modem_inputs_changed()
        self._update_irq()

    # -- interrupts --------------------------------------------------------------
    def _interrupt_id(self) -> IntId:
        """The IIR identification of the highest-priority pending interrupt (Table IV)."""
        ier = self._ier
        if ier & IER.ELSI and self._lsr_err & LSR_ERRORS:
            return IntId.LINE_STATUS
        if ier & IER.ERBFI:
            if self._timeout_ipending:
                return IntId.CHAR_TIMEOUT
            if self._fifo_on():
                if len(self._rx_fifo) >= self._trigger:
                    return IntId.RX_DATA
            elif self._rbr_full:
                return IntId.RX_DATA
        if ier & IER.ETBEI and self._thr_ipending:
            return IntId.THR_EMPTY
        if ier & IER.EDSSI and self._msr_delta:
            return IntId.MODEM_STATUS
        return IntId.NONE

    def _update_irq(self) -> None:
        """The only place that drives the IRQ line."""
        level = self._interrupt_id() != IntId.NONE
        if self._out2_gates_irq:
            # PC wiring: OUT2 enables the IRQ driver (the MCR bit, also in loopback: as QEMU).
            level = level and bool(self._mcr & MCR.OUT2)
        self._irq.set(level)

    # -- virtual time ------------------------------------------------------------
    def _on_timer(self) -> None:
        self._run_until(self._clock.now)

    def _run_until(self, now: int) -> None:
        """Process every internal event due at or before ``now``, in time order."""
        while True:
            due = None
            kind = 0
            if self._tx_done is not None and self._tx_done <= now:
                due, kind = self._tx_done, 1
            if self._rx_done is not None and self._rx_done <= now and (due is None or self._rx_done < due):
                due, kind = self._rx_done, 2
            if (self._timeout_at is not None and self._timeout_at <= now
                    and (due is None or self._timeout_at < due)):
                due, kind = self._timeout_at, 3
            if due is None:
                break
            if kind == 1:
                self._tx_complete(due)
            elif kind == 2:
                self._rx_arrive(due)
            else:
                self._timeout_at = None
                if self._fifo_on() and self._rx_fifo:
                    self._timeout_ipending = True
            self._update_irq()
        self._rearm()

    def _rearm(self) -> None:
        times = [t for t in (self._tx_done, self._rx_done, self._timeout_at) if t is not None]
        if not times:
            if self._timer.armed:
                self._timer.cancel()
            return
        nxt = min(times)
        if self._timer.deadline != nxt:
            self._timer.arm(nxt)

    # -- transmitter -------------------------------------------------------------
    def _tx_start(self, t: int) -> None:
        """Move the next byte from the THR/FIFO into the idle TSR at time ``t``."""
        self._tsr = self._tx_fifo.popleft()
        self._tx_done = t + self._char_ns
        if not self._tx_fifo:
            self._thr_ipending = True        # THRE rises

    def _tx_complete(self, t: int) -> None:
        byte = self._tsr
        assert byte is not None
        self._tsr = None
        self._tx_done = None
        if self._mcr & MCR.LOOP:
            self._rx_store(byte, 0, t)      # 8.8: TSR output loops back, SOUT stays marking
        else:
            self._chardev.write(bytes((byte,)), t)
        if self._tx_fifo:
            self._tx_start(t)

    def flush_tx(self) -> None:
        """Hand every byte still in the transmitter to the back end now.

        For the machine when it stops (a guest that writes and exits at once):
        each byte is stamped with the time it would have left the line.
        """
        self._run_until(self._clock.now)
        if self._tsr is None:
            return
        t = self._tx_done
        assert t is not None
        pending = [self._tsr, *self._tx_fifo]
        self._tsr = None
        self._tx_done = None
        self._tx_fifo.clear()
        self._thr_ipending = True
        if not self._mcr & MCR.LOOP:
            for byte in pending:
                self._chardev.write(bytes((byte,)), t)
                t += self._char_ns
        self._update_irq()
        self._rearm()

    # -- receiver ------------------------------------------------------------------
    def receive(self, data: bytes) -> None:
        """Queue host input; it crosses the line one character time per byte."""
        now = self._clock.now
        self._run_until(now)
        self._rx_pending.extend(data)
        self._rx_kick(now)
        self._rearm()

    def receive_break(self) -> None:
        """Queue a break condition from the host (received as a 0 byte with LSR.BI)."""
        now = self._clock.now
        self._run_until(now)
        self._rx_pending.append(_BREAK)
        self._rx_kick(now)
        self._rearm()

    @property
    def rx_pending(self) -> int:
        """Host bytes queued by :meth:`receive` that have not yet entered the UART."""
        return len(self._rx_pending)

    def _rx_has_room(self) -> bool:
        if self._mcr & MCR.LOOP:
            return False                    # 8.8: SIN is disconnected in loopback
        if self._fifo_on():
            return len(self._rx_fifo) < FIFO_SIZE
        return not self._rbr_full

    def _rx_kick(self, t: int) -> None:
        """Start the next host byte on the line at ``t`` if the receiver can take it."""
        if self._rx_done is None and self._rx_pending and self._rx_has_room():
            self._rx_done = t + self._char_ns

    def _rx_arrive(self, t: int) -> None:
        self._rx_done = None
        if not self._rx_has_room():
            # Loopback was switched on, or loopback data filled the FIFO, while
            # this byte was on the line: hold it (flow control) and resend later.
            return
        value = self._rx_pending.popleft()
        if value == _BREAK:
            self._rx_store(0, LSR.BI, t)
        else:
            self._rx_store(value, 0, t)
        self._rx_kick(t)

    def _rx_store(self, byte: int, errors: int, t: int) -> None:
        """A character has been shifted in at time ``t`` (8.4 overrun rules)."""
        if self._fifo_on():
            if len(self._rx_fifo) >= FIFO_SIZE:
                self._lsr_err |= LSR.OE     # the character in the shift register is lost
            else:
                if not self._rx_fifo:
                    self._lsr_err |= errors
                if errors:
                    self._fifo_err = True
                self._rx_fifo.append(byte | (errors << _ERR_SHIFT))
            self._timeout_at = t + TIMEOUT_CHARS * self._char_ns
        else:
            if self._rbr_full:
                self._lsr_err |= LSR.OE     # the unread RBR is overwritten
            self._rbr = byte
            self._rbr_full = True
            self._lsr_err |= errors

    # -- snapshots -------------------------------------------------------------------
    def snapshot(self) -> dict:
        self._run_until(self._clock.now)
        return {
            "ier": self._ier,
            "lcr": self._lcr,
            "mcr": self._mcr,
            "scr": self._scr,
            "fcr": int(self._fcr),
            "divisor": self._divisor,
            "char_ns": self._char_ns,
            "tx_fifo": list(self._tx_fifo),
            "tsr": self._tsr,
            "tx_done": self._tx_done,
            "thr_ipending": self._thr_ipending,
            "rx_fifo": list(self._rx_fifo),
            "rbr": self._rbr,
            "rbr_full": self._rbr_full,
            "lsr_err": int(self._lsr_err),
            "fifo_err": self._fifo_err,
            "timeout_at": self._timeout_at,
            "timeout_ipending": self._timeout_ipending,
            "rx_pending": list(self._rx_pending),
            "rx_done": self._rx_done,
            "msr_inputs": int(self._msr_inputs),
            "msr_seen": int(self._msr_seen),
            "msr_delta": int(self._msr_delta),
        }

    def restore(self, state: dict) -> None:
        self._ier = state["ier"]
        self._lcr = state["lcr"]
        self._mcr = state["mcr"]
        self._scr = state["scr"]
        self._fcr = state["fcr"]
        self._divisor = state["divisor"]
        self._char_ns = state["char_ns"]
        self._tx_fifo = deque(state["tx_fifo"])
        self._tsr = state["tsr"]
        self._tx_done = state["tx_done"]
        self._thr_ipending = state["thr_ipending"]
        self._rx_fifo = deque(state["rx_fifo"])
        self._rbr = state["rbr"]
        self._rbr_full = state["rbr_full"]
        self._lsr_err = state["lsr_err"]
        self._fifo_err = state["fifo_err"]
        self._timeout_at = state["timeout_at"]
        self._timeout_ipending = state["timeout_ipending"]
        self._rx_pending = deque(state["rx_pending"])
        self._rx_done = state["rx_done"]
        self._msr_inputs = state["msr_inputs"]
        self._msr_seen = state["msr_seen"]
        self._msr_delta = state["msr_delta"]
        # The clock's queue was cleared by Clock.restore: forget the old arming.
        self._timer.cancel()
        self._update_irq()
        self._rearm()
