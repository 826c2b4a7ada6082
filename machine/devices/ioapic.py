"""IO-APIC (Intel 82093AA) with 24 input pins.

Section numbers refer to the 82093AA I/O Advanced Programmable Interrupt
Controller datasheet (order no. 290566).

How it works
------------
The MMIO window at :data:`IOAPIC_BASE` has two registers (§3.0): IOREGSEL
(offset 0x00) selects an internal register, IOWIN (offset 0x10) reads or
writes it as a dword.  The internal registers (§3.2) are ID, version
(0x00170011: version 0x11, 24 entries), arbitration (reads the ID, as on
QEMU) and 24 redirection entries of 64 bits, each accessed as two dwords at
0x10 + 2n (low) and 0x11 + 2n (high).  With ``version=0x20`` the ICH-style
EOI register at 0x40 exists too (as on QEMU, which only honours it for 0x20).

A redirection entry turns its pin into a message for the local APIC, sent
through the ``deliver(vector, level_triggered)`` callable (the machine passes
``LocalAPIC.accept``).  The pin is first corrected for polarity: an
active-low entry sees the inverted wire level.  Then:

* edge trigger: a rising edge of the (corrected) input sends one message if
  the entry is unmasked.  An edge that arrives while masked is lost (QEMU and
  the datasheet both ignore it); unmasking later sends nothing.
* level trigger: while the input is asserted, the entry unmasked and Remote
  IRR clear, a message is sent and Remote IRR set.  :meth:`IOAPIC.eoi` (the
  local APIC's EOI broadcast, or the EOI register) clears Remote IRR of every
  level entry with that vector and sends again if the input is still
  asserted.  Writing an entry re-evaluates it, so unmasking an asserted level
  pin sends at once (QEMU's ``ioapic_service`` after every write).

Remote IRR is cleared whenever an entry is written as edge-triggered, like
QEMU (Linux clears a stuck Remote IRR by switching the entry to edge and
back on IO-APICs without an EOI register).

Destination with several CPUs: the machine passes ``route`` (the APIC bus's
``ioapic_message(vector, level_triggered, mode, dest, logical)``), which
resolves the destination field (physical or logical) to the local APICs it
names and arbitrates lowest priority (machine/devices/apicbus.py).

Destination with one CPU (a choice): fixed and lowest-priority
messages always go to the one local APIC.  When the destination field would
name no CPU of this machine (physical mode: neither APIC ID 0 nor the 0xFF
broadcast; logical mode: bit 0 clear, assuming CPU 0 has logical ID bit 0 as
Linux and the HAL set it) the message is still delivered and one line is
logged per pin until the entry is rewritten.  QEMU would drop such a message;
delivering it keeps a mis-programmed destination visible instead of silent.

Invariants
----------
* Delivery status (bit 12) always reads 0: messages are sent at once.
* Remote IRR is only ever set on a level-triggered entry whose message was
  delivered, and only :meth:`eoi` (or rewriting the entry as edge) clears it.
* Pin levels are wires: reset does not change them.

Not modelled
------------
SMI, NMI, INIT and ExtINT delivery modes (logged, no message; QEMU reads the
PIC for ExtINT), reserved delivery modes, other CPUs and lowest-priority
arbitration, the APIC serial bus, QEMU's slowdown of level-interrupt storms
(re-delivery after 10000 back-to-back EOIs is delayed 10 ms there), and
QEMU's mapping of ISA IRQ 0 to pin 2 inside ``ioapic_set_irq``: here the
machine wires each line to the pin it wants (the PIT to pin 2 on a PC).
"""
from __future__ import annotations

from enum import IntEnum
from typing import Callable

from vmk.machine.devices import Log, nolog

__all__ = [
    "IOAPIC",
    "IOAPIC_BASE",
    "IOAPIC_WINDOW",
    "NUM_PINS",
    "Mmio",
    "IoReg",
    "Rte",
    "DeliveryMode",
]

IOAPIC_BASE = 0xFEC00000
IOAPIC_WINDOW = 0x1000

NUM_PINS = 24
DWORD = 4
DWORD_MASK = 0xFFFFFFFF
DWORD_BITS = 32
BYTE_MASK = 0xFF

ID_SHIFT = 24                   # IOAPICID bits 27:24 (§3.2.1)
ID_MASK = 0xF
VERSION_ENTRIES_SHIFT = 16      # IOAPICVER bits 23:16: max redirection entry (§3.2.2)
VERSION_82093AA = 0x11
VERSION_WITH_EOI = 0x20         # ICH-style IO-APIC with the EOI register
SUPPORTED_VERSIONS = (VERSION_82093AA, VERSION_WITH_EOI)

PHYSICAL_CPU0 = 0               # APIC ID of our only CPU
BROADCAST_DEST = 0xFF
LOGICAL_CPU0_BIT = 0x01


class Mmio(IntEnum):
    """Offsets in the MMIO window (§3.0)."""
    IOREGSEL = 0x00
    IOWIN = 0x10
    EOI = 0x40                  # only with version 0x20


class IoReg(IntEnum):
    """Internal registers selected by IOREGSEL (§3.2, Table 2)."""
    ID = 0x00
    VERSION = 0x01
    ARBITRATION = 0x02
    REDTBL0 = 0x10              # entry n: 0x10 + 2n (low dword), 0x11 + 2n (high)


REDTBL_END = IoReg.REDTBL0 + 2 * NUM_PINS


class Rte(IntEnum):
    """Redirection table entry fields (§3.2.4)."""
    VECTOR = 0xFF
    DELIVERY_MODE = 0x700
    DEST_LOGICAL = 1 << 11
    DELIVERY_STATUS = 1 << 12   # read-only
    POLARITY_LOW = 1 << 13
    REMOTE_IRR = 1 << 14        # read-only
    LEVEL = 1 << 15
    MASKED = 1 << 16
    DESTINATION = 0xFF << 56


RTE_WRITABLE = int(Rte.VECTOR | Rte.DELIVERY_MODE | Rte.DEST_LOGICAL | Rte.POLARITY_LOW
                   | Rte.LEVEL | Rte.MASKED | Rte.DESTINATION)
RTE_READ_ONLY = int(Rte.DELIVERY_STATUS | Rte.REMOTE_IRR)
DELIVERY_MODE_SHIFT = 8
DESTINATION_SHIFT = 56


class DeliveryMode(IntEnum):
    """Delivery mode field (§3.2.4, bits 10:8)."""
    FIXED = 0
    LOWEST = 1
    SMI = 2
    NMI = 4
    INIT = 5
    EXTINT = 7


class IOAPIC:
    """The IO-APIC; ``deliver(vector, level_triggered)`` reaches the local APIC."""

    def __init__(self, deliver: Callable[[int, bool], None], log: Log = nolog,
                 *, version: int = VERSION_82093AA,
                 route: Callable[[int, bool, int, int, bool], None] | None = None) -> None:
        if version not in SUPPORTED_VERSIONS:
            raise ValueError(f"IO-APIC version must be 0x11 or 0x20, not {version:#x}")
        self._deliver = deliver
        self._route = route
        self._log = log
        self._version = version
        self._pins = [False] * NUM_PINS      # wire levels, as driven
        self.reset()

    def reset(self) -> None:
        """Power-on state: ID 0, every entry masked (§3.2.4)."""
        self._id = 0
        self._ioregsel = 0
        self._redtbl = [int(Rte.MASKED)] * NUM_PINS
        self._dest_warned = [False] * NUM_PINS

    # -- MMIO --------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset == Mmio.IOREGSEL and size <= DWORD:
            return self._ioregsel
        if offset == Mmio.IOWIN and size == DWORD:
            return self._read_register(self._ioregsel)
        self._log(f"ioapic: unsupported read of {size} bytes at +{offset:#x}, returning 0")
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == Mmio.IOREGSEL and size <= DWORD:
            self._ioregsel = value & BYTE_MASK
        elif offset == Mmio.IOWIN and size == DWORD:
            self._write_register(self._ioregsel, value & DWORD_MASK)
        elif offset == Mmio.EOI and size == DWORD and self._version == VERSION_WITH_EOI:
            self.eoi(value & BYTE_MASK)
        else:
            self._log(f"ioapic: unsupported write of {size} bytes at +{offset:#x} ignored")

    def _read_register(self, reg: int) -> int:
        if reg in (IoReg.ID, IoReg.ARBITRATION):
            return self._id << ID_SHIFT
        if reg == IoReg.VERSION:
            return ((NUM_PINS - 1) << VERSION_ENTRIES_SHIFT) | self._version
        if IoReg.REDTBL0 <= reg < REDTBL_END:
            pin, high = divmod(reg - IoReg.REDTBL0, 2)
            return (self._redtbl[pin] >> (DWORD_BITS * high)) & DWORD_MASK
        self._log(f"ioapic: read of unknown register {reg:#x}")
        return 0

    def _write_register(self, reg: int, value: int) -> None:
        if reg == IoReg.ID:
            self._id = (value >> ID_SHIFT) & ID_MASK
        elif reg in (IoReg.VERSION, IoReg.ARBITRATION):
            self._log(f"ioapic: write to read-only register {reg:#x} ignored")
        elif IoReg.REDTBL0 <= reg < REDTBL_END:
            pin, high = divmod(reg - IoReg.REDTBL0, 2)
            self._write_entry(pin, high, value)
        else:
            self._log(f"ioapic: write to unknown register {reg:#x} ignored")

    def _write_entry(self, pin: int, high: int, value: int) -> None:
        old = self._redtbl[pin]
        shift = DWORD_BITS * high
        merged = (old & ~(DWORD_MASK << shift)) | (value << shift)
        entry = (merged & RTE_WRITABLE) | (old & RTE_READ_ONLY)
        if not entry & Rte.LEVEL:
            entry &= ~int(Rte.REMOTE_IRR)
        self._redtbl[pin] = entry
        self._dest_warned[pin] = False
        if entry & Rte.LEVEL:
            self._service_level(pin)

    # -- pins ----------------------------------------------------------------------
    def set_irq(self, pin: int, level: bool) -> None:
        """Drive input ``pin`` (an IrqLine sink, see :meth:`pin_sink`)."""
        if not 0 <= pin < NUM_PINS:
            self._log(f"ioapic: no input pin {pin}")
            return
        level = bool(level)
        if level == self._pins[pin]:
            return
        self._pins[pin] = level
        entry = self._redtbl[pin]
        if entry & Rte.LEVEL:
            self._service_level(pin)
        elif self._asserted(pin) and not entry & Rte.MASKED:
            # The corrected input just rose: an edge.  Masked edges are lost.
            self._send(pin)

    def pin_sink(self, pin: int) -> Callable[[bool], None]:
        """A ``sink(level)`` for ``IrqLine.connect`` driving ``pin``."""
        if not 0 <= pin < NUM_PINS:
            raise ValueError(f"IO-APIC has no pin {pin}")
        return lambda level: self.set_irq(pin, level)

    def _asserted(self, pin: int) -> bool:
        return self._pins[pin] != bool(self._redtbl[pin] & Rte.POLARITY_LOW)

    def _service_level(self, pin: int) -> None:
        """Send a level-triggered pin's message if it may go now."""
        entry = self._redtbl[pin]
        if entry & (Rte.MASKED | Rte.REMOTE_IRR) or not self._asserted(pin):
            return
        if self._send(pin):
            self._redtbl[pin] |= int(Rte.REMOTE_IRR)

    def _send(self, pin: int) -> bool:
        """Send pin's message to the local APIC; False if the mode is not modelled."""
        entry = self._redtbl[pin]
        mode = (entry & Rte.DELIVERY_MODE) >> DELIVERY_MODE_SHIFT
        if mode not in (DeliveryMode.FIXED, DeliveryMode.LOWEST):
            self._log(f"ioapic: pin {pin} delivery mode {_mode_name(mode)} not modelled, dropped")
            return False
        if self._route is not None:
            self._route(int(entry & Rte.VECTOR), bool(entry & Rte.LEVEL), int(mode),
                        entry >> DESTINATION_SHIFT, bool(entry & Rte.DEST_LOGICAL))
            return True
        self._check_destination(pin, entry)
        self._deliver(int(entry & Rte.VECTOR), bool(entry & Rte.LEVEL))
        return True

    def _check_destination(self, pin: int, entry: int) -> None:
        if self._dest_warned[pin]:
            return
        dest = entry >> DESTINATION_SHIFT
        if entry & Rte.DEST_LOGICAL:
            names_cpu0 = bool(dest & LOGICAL_CPU0_BIT)
        else:
            names_cpu0 = dest in (PHYSICAL_CPU0, BROADCAST_DEST)
        if not names_cpu0:
            kind = "logical" if entry & Rte.DEST_LOGICAL else "physical"
            self._log(f"ioapic: pin {pin} {kind} destination {dest:#x} names no CPU "
                      "(single CPU); delivering to CPU 0 anyway")
            self._dest_warned[pin] = True

    # -- EOI -----------------------------------------------------------------------
    def eoi(self, vector: int) -> None:
        """EOI for ``vector``: clear Remote IRR of matching level entries, resend."""
        for pin, entry in enumerate(self._redtbl):
            if (entry & Rte.VECTOR != vector or not entry & Rte.LEVEL
                    or not entry & Rte.REMOTE_IRR):
                continue
            self._redtbl[pin] = entry & ~int(Rte.REMOTE_IRR)
            self._service_level(pin)

    # -- snapshots -------------------------------------------------------------------
    def snapshot(self) -> dict:
        return {
            "id": self._id,
            "ioregsel": self._ioregsel,
            "redtbl": list(self._redtbl),
            "pins": list(self._pins),
        }

    def restore(self, state: dict) -> None:
        self._id = state["id"]
        self._ioregsel = state["ioregsel"]
        self._redtbl = list(state["redtbl"])
        self._pins = list(state["pins"])
        self._dest_warned = [False] * NUM_PINS


def _mode_name(mode: int) -> str:
    try:
        return DeliveryMode(mode).name
    except ValueError:
        return f"reserved ({mode})"
