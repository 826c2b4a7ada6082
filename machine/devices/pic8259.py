"""Intel 8259A programmable interrupt controller, and the PC's master/slave pair.

How it works
------------
A :class:`PIC8259` is one chip (Intel 8259A datasheet, "Functional
description"): eight input pins IR0-IR7, the Interrupt Request Register
(IRR), the In-Service Register (ISR), the Interrupt Mask Register (IMR) and
a priority resolver.  Its INT output :attr:`PIC8259.intr` is high exactly when
the resolver finds an unmasked request of higher priority than everything in
service; :meth:`PIC8259._update_irq` is the only code that sets it, and every
state change calls it.

* **Pins and IRR.** ``pins`` holds the current level of each input wire.  In
  edge mode a low-to-high transition of a pin sets its IRR bit, and the bit
  stays set until the INTA cycle (or ICW1) clears it.  In level mode the IRR
  bit *is* the pin, and INTA does not clear it.  A pin is level-triggered
  when ICW1.LTIM is set (the whole chip) or its ELCR bit is set (PIIX3,
  per pin).  Edges are found by comparing with ``pins``, so an
  :class:`~vmk.machine.irq.IrqLine` that reports only changes can never make
  a phantom edge.
* **Priority.** ``lowest`` is the IR with the lowest priority (7 after ICW1);
  priority falls from ``lowest + 1`` round to ``lowest``.  Rotation and the
  set-priority command only move ``lowest``.  A request is delivered when its
  priority beats the highest-priority ISR bit (in special mask mode, ISR bits
  that are masked do not count; in special fully nested mode the master does
  not count the ISR bit of its cascade pin).
* **INTA** (:meth:`PICPair.acknowledge`): the master resolves; if the winner
  is IR2 the slave resolves too and supplies the vector.  The acknowledged
  chip sets the ISR bit (unless auto-EOI), clears an edge IRR bit and answers
  ``vector_base + irq``.
* **Spurious interrupts** (datasheet, "Interrupt sequence": the default IR7).
  If the request is gone at INTA time (a level pin dropped, the guest masked
  it, ICW1 cleared it) the chip answers ``vector_base + 7`` and sets no ISR
  bit.  When that happens on the slave, the master still acknowledges its IR2
  (its edge latch was set by the slave's INT), so the master gets ISR bit 2
  while the slave answers IRQ15: the guest must EOI the master only.
* **Poll command** (OCW3.P): the next read of either port is an INTA of that
  one chip: it returns ``0x80 | irq`` (or 0 when nothing is pending) and sets
  the ISR bit.  Polling the master for IR2 does not acknowledge the slave;
  software polls the slave next, as on the real part.

The pair (:class:`PICPair`) is the PC/AT wiring: master at 0x20/0x21 with
vector base set by the guest, slave at 0xA0/0xA1 with its INT on master IR2,
and the PIIX3 edge/level control registers ELCR1/ELCR2 at 0x4D0/0x4D1, whose
bits for IRQ 0, 1, 2, 8 and 13 are read-only 0 (QEMU's ``elcr_mask`` 0xF8 /
0xDE).  ``pair.intr`` is the master's INT pin: connect it to LAPIC LINT0 (or
the CPU INTR); the CPU side calls :meth:`PICPair.acknowledge` when it takes
the interrupt.

Reset (power-on), as QEMU's i8259 reset: IRR/ISR/IMR = 0, ELCR = 0, LTIM off,
IR0 highest priority, vector base 0, and the chip is in the ready state (a
write to the data port sets the IMR) without any ICW having been written.  No
firmware-style vector base (0x08/0x70) is set: vmk boots without a BIOS, the
guest programs the ICWs itself, and base 0 is what a guest that forgets to
would see on QEMU too.  Input pin levels survive a reset: the wires are still
driven by their devices.

Invariants
----------
* ``chip.intr.level == (chip._next_irq() is not None)`` after every public
  call; ``pair.intr is pair.master.intr``.
* Master pin 2 level == ``pair.slave.intr.level`` (the cascade wire).
* In level mode ``irr & bit == pins & bit``.

Not modelled
------------
* 8080/8085 mode (ICW4.uPM = 0, or ICW1 without IC4), the CALL opcode and
  the ADI call-address interval: 8080 mode is logged when the ICW sequence
  ends; the chip answers 8086-style vectors anyway.
* Buffered mode (ICW4.BUF, M/S) and the SP/EN pin; ICW3 cascade identities
  are stored but the wiring is fixed (slave on master IR2, as on the PC).
* The datasheet rule that an *edge* request whose pin falls before INTA gives
  the default IR7.  As QEMU, the edge latch holds the request: ISA devices
  here pulse their line (``IrqLine.pulse()``, an edge lasting no virtual
  time), and those interrupts must be delivered.
* Non-specific EOI in special mask mode clears the highest-priority ISR bit
  (QEMU's behaviour); the datasheet says a guest must use a specific EOI.
* Special fully nested mode is modelled only as QEMU does it (the master
  ignores its cascade ISR bit when resolving); checking the slave's ISR before
  a master EOI is the guest's job, as on the real part.
* After ICW1 the chip answers requests before the sequence is complete (as
  QEMU); the datasheet leaves that undefined.
* Bus timing of the two INTA pulses; word-wide accesses (the bus splits them;
  a non-byte access is logged and handled as its low byte).
"""
from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum

from vmk.machine.devices import Log, nolog
from vmk.machine.irq import IrqLine

__all__ = [
    "CASCADE_IRQ",
    "ELCR",
    "ELCR_MASTER_WRITABLE",
    "ELCR_SLAVE_WRITABLE",
    "ICW1",
    "ICW4",
    "OCW2",
    "OCW3",
    "PIC8259",
    "SPURIOUS_IRQ",
    "InitState",
    "PICPair",
    "Reg",
]

PINS = 8
_BYTE = 0xFF


class Reg(IntEnum):
    """Register offsets in the chip's window: the A0 address line (datasheet, Table 2)."""

    COMMAND = 0     # 0x20 / 0xA0: ICW1, OCW2, OCW3; reads IRR or ISR
    DATA = 1        # 0x21 / 0xA1: ICW2-ICW4, OCW1 (IMR); reads IMR


class ICW1(IntEnum):
    """Initialization command word 1, written to COMMAND with D4 = 1 (datasheet, Figure 6)."""

    IC4 = 0x01      # ICW4 follows
    SNGL = 0x02     # single chip: no ICW3
    ADI = 0x04      # call address interval (8080 mode only)
    LTIM = 0x08     # level-triggered mode for all pins
    INIT = 0x10     # identifies ICW1


class ICW4(IntEnum):
    """Initialization command word 4 (datasheet, Figure 6)."""

    UPM = 0x01      # 1 = 8086/8088 mode, 0 = 8080/8085 mode
    AEOI = 0x02     # automatic end of interrupt
    MS = 0x04       # buffered mode: 1 = master
    BUF = 0x08      # buffered mode
    SFNM = 0x10     # special fully nested mode


class OCW2(IntEnum):
    """Operation command word 2: the R, SL, EOI bits D7-D5 (datasheet, Figure 8)."""

    ROTATE_AEOI_CLEAR = 0       # rotate in automatic EOI mode (clear)
    EOI = 1                     # non-specific EOI
    NOP = 2                     # no operation
    SPECIFIC_EOI = 3            # specific EOI, level in L2-L0
    ROTATE_AEOI_SET = 4         # rotate in automatic EOI mode (set)
    ROTATE_EOI = 5              # rotate on non-specific EOI
    SET_PRIORITY = 6            # set priority: L2-L0 becomes the lowest
    ROTATE_SPECIFIC_EOI = 7     # rotate on specific EOI


OCW2_CMD_SHIFT = 5
OCW2_LEVEL = 0x07               # L2-L0


class OCW3(IntEnum):
    """Operation command word 3, written to COMMAND with D4 = 0, D3 = 1 (datasheet, Figure 8)."""

    RIS = 0x01      # read ISR (1) or IRR (0) ...
    RR = 0x02       # ... if this bit is set
    P = 0x04        # poll command
    SELECT = 0x08   # identifies OCW3 (OCW2 has D3 = 0)
    SMM = 0x20      # special mask mode set (1) / reset (0) ...
    ESMM = 0x40     # ... if this bit is set


class InitState(IntEnum):
    """Which word the next DATA write is: the ICW sequence (datasheet, Figure 5)."""

    READY = 0       # OCW1: the IMR
    ICW2 = 1
    ICW3 = 2
    ICW4 = 3


VECTOR_BASE_MASK = 0xF8         # ICW2 T7-T3; T2-T0 come from the IR number
POLL_INT = 0x80                 # poll word: I bit (datasheet, "The Poll Command")
CASCADE_IRQ = 2                 # the master pin wired to the slave's INT (PC/AT)
SPURIOUS_IRQ = 7                # the default IR7 answered when the request vanished
_NO_PRIORITY = PINS             # "no bit found" from _priority()

# PIIX3 ELCR1/ELCR2: IRQ 0, 1, 2 (master) and 8, 13 (slave) are always edge (QEMU elcr_mask).
ELCR_MASTER_WRITABLE = 0xF8
ELCR_SLAVE_WRITABLE = 0xDE


class PIC8259:
    """One 8259A chip: register window of 2 bytes (``Reg``), 8 input pins, INT output ``intr``.

    ``cascade_pins`` marks the inputs wired to a slave's INT (the master's
    special fully nested mode ignores their ISR bits); the PC wiring is set
    by :class:`PICPair`.
    """

    def __init__(self, log: Log = nolog, name: str = "", *, cascade_pins: int = 0) -> None:
        self.log = log
        self.name = name or "pic"
        self.cascade_pins = cascade_pins & _BYTE
        self.intr = IrqLine(f"{self.name}.int")
        self.pins = 0               # input wire levels; not touched by reset
        self.elcr = 0               # PIIX3 per-pin level mode, written through ELCR
        self.irr = 0
        self.isr = 0
        self.imr = 0
        self.lowest = PINS - 1      # the IR with the lowest priority
        self.vector_base = 0
        self.init_state = InitState.READY
        self.icw1 = 0
        self.icw3 = 0
        self.icw4 = 0
        self.rotate_in_aeoi = False
        self.read_isr = False       # OCW3 RR/RIS: COMMAND reads ISR instead of IRR
        self.poll = False           # OCW3 P: the next read is a poll
        self.special_mask = False
        self.reset()

    # -- lifecycle -------------------------------------------------------------
    def reset(self) -> None:
        """Power-on state (QEMU's i8259 reset): see the module docstring."""
        self.elcr = 0
        self.icw1 = 0
        self._init_reset()
        self.init_state = InitState.READY
        self._update_irq()

    def _init_reset(self) -> None:
        """What ICW1 clears (datasheet, "Initialization command words" a-f; QEMU also clears ISR)."""
        lvl = self._level_mask()
        self.irr = self.pins & lvl  # edge latches reset; level requests follow their pins
        self.isr = 0
        self.imr = 0
        self.lowest = PINS - 1
        self.vector_base = 0
        self.icw3 = 0
        self.icw4 = 0
        self.rotate_in_aeoi = False
        self.read_isr = False
        self.poll = False
        self.special_mask = False

    # -- input pins ------------------------------------------------------------
    def set_irq(self, pin: int, level: bool) -> None:
        """Drive input pin IR``pin`` (0..7) to ``level``."""
        bit = 1 << pin
        was_high = self.pins & bit
        if level:
            self.pins |= bit
        else:
            self.pins &= ~bit
        if self._level_mask() & bit:
            self.irr = (self.irr & ~bit) | (self.pins & bit)
        elif level and not was_high:
            self.irr |= bit
        self._update_irq()

    def set_elcr(self, value: int) -> None:
        """Load the per-pin edge/level bits (the ELCR register object masks the fixed bits)."""
        self.elcr = value & _BYTE
        self._sync_level_irr()
        self._update_irq()

    def _level_mask(self) -> int:
        return _BYTE if self.icw1 & ICW1.LTIM else self.elcr

    def _sync_level_irr(self) -> None:
        # Level pins: IRR follows the wire.  A pin just switched to edge keeps its
        # IRR bit as a latched request (QEMU does the same).
        lvl = self._level_mask()
        self.irr = (self.irr & ~lvl) | (self.pins & lvl)

    # -- priority resolver ---------------------------------------------------------
    def _priority(self, mask: int) -> int:
        """Priority rank (0 = highest) of the best bit in ``mask``, or ``_NO_PRIORITY``."""
        if mask:
            for rank in range(PINS):
                if mask >> ((self.lowest + 1 + rank) % PINS) & 1:
                    return rank
        return _NO_PRIORITY

    def _irq_of(self, rank: int) -> int:
        return (self.lowest + 1 + rank) % PINS

    def _next_irq(self) -> int | None:
        """The IR this chip would deliver now, or None."""
        rank = self._priority(self.irr & ~self.imr & _BYTE)
        if rank == _NO_PRIORITY:
            return None
        busy = self.isr
        if self.special_mask:
            busy &= ~self.imr
        if self.icw4 & ICW4.SFNM:
            busy &= ~self.cascade_pins
        if rank < self._priority(busy):
            return self._irq_of(rank)
        return None

    def _update_irq(self) -> None:
        """The only place that sets ``intr``: high iff a request is deliverable."""
        self.intr.set(self._next_irq() is not None)

    def _intack(self, irq: int) -> None:
        """The INTA (or poll) of IR``irq``: ISR set unless auto-EOI; an edge request is consumed."""
        bit = 1 << irq
        if self.icw4 & ICW4.AEOI:
            if self.rotate_in_aeoi:
                self.lowest = irq
        else:
            self.isr |= bit
        if not self._level_mask() & bit:
            self.irr &= ~bit
        self._update_irq()

    # -- registers ----------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if size != 1:
            self.log(f"{self.name}: {size}-byte read at offset {offset}, only byte access is decoded")
        if offset not in (Reg.COMMAND, Reg.DATA):
            self.log(f"{self.name}: read at offset {offset} outside the window")
            return _BYTE
        if self.poll:
            # Discussion: a poll read is an INTA of this chip alone (datasheet, "The
            # Poll Command"); it works on either port, as in QEMU.
            self.poll = False
            irq = self._next_irq()
            if irq is None:
                return 0
            self._intack(irq)
            return POLL_INT | irq
        if offset == Reg.COMMAND:
            return self.isr if self.read_isr else self.irr
        return self.imr

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 1:
            self.log(f"{self.name}: {size}-byte write at offset {offset}, only byte access is decoded")
        value &= _BYTE
        if offset == Reg.COMMAND:
            if value & ICW1.INIT:
                self._write_icw1(value)
            elif value & OCW3.SELECT:
                self._write_ocw3(value)
            else:
                self._write_ocw2(value)
        elif offset == Reg.DATA:
            self._write_data(value)
        else:
            self.log(f"{self.name}: write {value:#04x} at offset {offset} outside the window")

    def _write_icw1(self, value: int) -> None:
        self.icw1 = value
        self._init_reset()          # uses the new LTIM: level pins stay requested
        self.init_state = InitState.ICW2
        self._update_irq()

    def _write_data(self, value: int) -> None:
        state = self.init_state
        if state == InitState.READY:          # OCW1
            self.imr = value
            self._update_irq()
        elif state == InitState.ICW2:
            self.vector_base = value & VECTOR_BASE_MASK
            if not self.icw1 & ICW1.SNGL:
                self.init_state = InitState.ICW3
            else:
                self._after_icw3()
        elif state == InitState.ICW3:
            self.icw3 = value
            self._after_icw3()
        else:                                   # ICW4
            self.icw4 = value
            self._init_done()

    def _after_icw3(self) -> None:
        if self.icw1 & ICW1.IC4:
            self.init_state = InitState.ICW4
        else:
            self._init_done()

    def _init_done(self) -> None:
        self.init_state = InitState.READY
        if not self.icw4 & ICW4.UPM:
            self.log(f"{self.name}: 8080/8085 mode (ICW4.uPM=0) not modelled, answering in 8086 mode")
        self._update_irq()

    def _write_ocw2(self, value: int) -> None:
        cmd = OCW2(value >> OCW2_CMD_SHIFT)
        level = value & OCW2_LEVEL
        if cmd in (OCW2.ROTATE_AEOI_CLEAR, OCW2.ROTATE_AEOI_SET):
            self.rotate_in_aeoi = cmd == OCW2.ROTATE_AEOI_SET
        elif cmd in (OCW2.EOI, OCW2.ROTATE_EOI):
            rank = self._priority(self.isr)
            if rank != _NO_PRIORITY:
                irq = self._irq_of(rank)
                self.isr &= ~(1 << irq)
                if cmd == OCW2.ROTATE_EOI:
                    self.lowest = irq
        elif cmd in (OCW2.SPECIFIC_EOI, OCW2.ROTATE_SPECIFIC_EOI):
            self.isr &= ~(1 << level)
            if cmd == OCW2.ROTATE_SPECIFIC_EOI:
                self.lowest = level
        elif cmd == OCW2.SET_PRIORITY:
            self.lowest = level
        self._update_irq()

    def _write_ocw3(self, value: int) -> None:
        if value & OCW3.P:
            self.poll = True
        if value & OCW3.RR:
            self.read_isr = bool(value & OCW3.RIS)
        if value & OCW3.ESMM:
            self.special_mask = bool(value & OCW3.SMM)
        self._update_irq()

    # -- snapshots -----------------------------------------------------------------
    _FIELDS = ("pins", "elcr", "irr", "isr", "imr", "lowest", "vector_base", "icw1", "icw3", "icw4")
    _FLAGS = ("rotate_in_aeoi", "read_isr", "poll", "special_mask")

    def snapshot(self) -> dict:
        state: dict = {f: getattr(self, f) for f in self._FIELDS}
        state.update({f: getattr(self, f) for f in self._FLAGS})
        state["init_state"] = int(self.init_state)
        return state

    def _load(self, state: dict) -> None:
        for f in self._FIELDS:
            setattr(self, f, int(state[f]))
        for f in self._FLAGS:
            setattr(self, f, bool(state[f]))
        self.init_state = InitState(state["init_state"])

    def restore(self, state: dict) -> None:
        """Load ``state`` and drive ``intr`` to the restored level."""
        self._load(state)
        self._update_irq()


class ELCR:
    """A PIIX3 edge/level control register (ELCR1 0x4D0, ELCR2 0x4D1): offset 0, size 1.

    A bit set makes that pin level-triggered.  Bits outside ``writable`` read
    as 0 (IRQ 0, 1, 2, 8, 13 are always edge).  The value lives in the chip
    (``PIC8259.elcr``), so the chip's reset clears it and its snapshot holds
    it; this object is only the port window.
    """

    OFFSET = 0

    def __init__(self, pic: PIC8259, writable: int, log: Log = nolog) -> None:
        self.pic = pic
        self.writable = writable & _BYTE
        self.log = log

    def read(self, offset: int, size: int) -> int:
        if offset != self.OFFSET or size != 1:
            self.log(f"{self.pic.name}.elcr: {size}-byte read at offset {offset}")
        return self.pic.elcr

    def write(self, offset: int, size: int, value: int) -> None:
        if offset != self.OFFSET or size != 1:
            self.log(f"{self.pic.name}.elcr: {size}-byte write at offset {offset}")
        self.pic.set_elcr(value & self.writable)


class PICPair:
    """The PC/AT interrupt controllers: ``master`` (0x20), ``slave`` (0xA0) on master IR2.

    Wiring for the machine:

    * ISA IRQ line ``n`` (0..15, not 2) -> ``pair.set_irq(n, level)``;
      ``pair.pin(n)`` returns that sink for ``IrqLine.connect``.
    * ``pair.intr`` -> LAPIC LINT0 / CPU INTR; when the CPU takes the
      interrupt it calls ``pair.acknowledge()`` for the vector.
    * Port windows: ``master`` at 0x20, ``slave`` at 0xA0 (size 2),
      ``elcr_master`` at 0x4D0, ``elcr_slave`` at 0x4D1 (size 1).
    """

    def __init__(self, log: Log = nolog) -> None:
        self.log = log
        self.master = PIC8259(log, "pic.master", cascade_pins=1 << CASCADE_IRQ)
        self.slave = PIC8259(log, "pic.slave")
        self.slave.intr.connect(self._cascade)
        self.elcr_master = ELCR(self.master, ELCR_MASTER_WRITABLE, log)
        self.elcr_slave = ELCR(self.slave, ELCR_SLAVE_WRITABLE, log)
        self.intr: IrqLine = self.master.intr

    def _cascade(self, level: bool) -> None:
        self.master.set_irq(CASCADE_IRQ, level)

    def reset(self) -> None:
        self.slave.reset()
        self.master.reset()

    def set_irq(self, n: int, level: bool) -> None:
        """Drive ISA IRQ ``n`` (0..15).  IRQ2 is the cascade input and cannot be driven."""
        if not 0 <= n < 2 * PINS:
            raise ValueError(f"ISA IRQ {n} out of range 0..15")
        if n == CASCADE_IRQ:
            self.log("pic: ISA IRQ2 is the cascade input; driving it is ignored")
            return
        if n < PINS:
            self.master.set_irq(n, level)
        else:
            self.slave.set_irq(n - PINS, level)

    def pin(self, n: int) -> Callable[[bool], None]:
        """The sink for ISA IRQ line ``n``: ``line.connect(pair.pin(n))``."""
        if not 0 <= n < 2 * PINS:
            raise ValueError(f"ISA IRQ {n} out of range 0..15")

        def sink(level: bool) -> None:
            self.set_irq(n, level)

        return sink

    def acknowledge(self) -> int:
        """The INTA cycle: the vector of the interrupt the CPU takes now.

        Sets ISR bits (unless auto-EOI), consumes edge requests and updates
        ``intr``.  With nothing to deliver the master answers its default IR7
        (``master.vector_base + 7``, no ISR bit); if the master picks IR2 but
        the slave has nothing, the slave answers ``slave.vector_base + 7`` and
        the master still sets ISR bit 2 (datasheet; QEMU ``pic_read_irq``).
        """
        master, slave = self.master, self.slave
        irq = master._next_irq()
        if irq is None:
            return master.vector_base + SPURIOUS_IRQ
        if irq == CASCADE_IRQ:
            irq2 = slave._next_irq()
            if irq2 is None:
                vector = slave.vector_base + SPURIOUS_IRQ
            else:
                slave._intack(irq2)
                vector = slave.vector_base + irq2
        else:
            vector = master.vector_base + irq
        master._intack(irq)
        return vector

    def _update_irq(self) -> None:
        """Re-derive both INT pins (slave first: its INT is a master input)."""
        self.slave._update_irq()
        self.master._update_irq()

    def snapshot(self) -> dict:
        return {"master": self.master.snapshot(), "slave": self.slave.snapshot()}

    def restore(self, state: dict) -> None:
        # Discussion: load both chips before deriving any output.  Restoring the
        # slave alone would push its INT into a master still holding the old
        # state and could toggle ``intr`` on the way; with both loaded, master pin
        # 2 already equals the slave's restored INT, so no edge is seen and
        # ``intr`` changes at most once.
        self.master._load(state["master"])
        self.slave._load(state["slave"])
        self._update_irq()
