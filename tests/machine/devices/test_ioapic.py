"""IO-APIC: register window, pin routing, edge/level semantics, and the LAPIC link."""
from __future__ import annotations

import pytest

from vmk.machine.clock import Clock
from vmk.machine.devices.ioapic import IOAPIC, NUM_PINS, IoReg, Mmio
from vmk.machine.devices.lapic import LocalAPIC, Reg
from vmk.machine.irq import IrqLine

MASKED = 1 << 16
LEVEL = 1 << 15
REMOTE_IRR = 1 << 14
ACTIVE_LOW = 1 << 13
LOGICAL = 1 << 11


def make(**kw) -> tuple[IOAPIC, list[tuple[int, bool]], list[str]]:
    sent: list[tuple[int, bool]] = []
    logs: list[str] = []
    io = IOAPIC(lambda vector, level: sent.append((vector, level)), log=logs.append, **kw)
    return io, sent, logs


def reg_read(io: IOAPIC, reg: int) -> int:
    io.write(Mmio.IOREGSEL, 4, reg)
    return io.read(Mmio.IOWIN, 4)


def reg_write(io: IOAPIC, reg: int, value: int) -> None:
    io.write(Mmio.IOREGSEL, 4, reg)
    io.write(Mmio.IOWIN, 4, value)


def set_entry(io: IOAPIC, pin: int, low: int, high: int = 0) -> None:
    reg_write(io, IoReg.REDTBL0 + 2 * pin + 1, high)
    reg_write(io, IoReg.REDTBL0 + 2 * pin, low)


def entry_low(io: IOAPIC, pin: int) -> int:
    return reg_read(io, IoReg.REDTBL0 + 2 * pin)


# -- register window -------------------------------------------------------------------

def test_ioregsel_iowin_id_version_arbitration() -> None:
    io, _, _ = make()
    assert reg_read(io, IoReg.VERSION) == 0x00170011
    reg_write(io, IoReg.ID, 0xFF000000)
    assert reg_read(io, IoReg.ID) == 0x0F000000
    assert reg_read(io, IoReg.ARBITRATION) == 0x0F000000
    reg_write(io, IoReg.VERSION, 0)
    assert reg_read(io, IoReg.VERSION) == 0x00170011
    io.write(Mmio.IOREGSEL, 4, 0x12)
    assert io.read(Mmio.IOREGSEL, 4) == 0x12


def test_reset_masks_every_entry() -> None:
    io, _, _ = make()
    set_entry(io, 3, 0x33)
    io.reset()
    for pin in range(NUM_PINS):
        assert entry_low(io, pin) == MASKED
        assert reg_read(io, IoReg.REDTBL0 + 2 * pin + 1) == 0


def test_entry_halves_read_only_and_reserved_bits() -> None:
    io, _, _ = make()
    set_entry(io, 5, 0xFFFFFFFF, 0xFFFFFFFF)
    # Delivery status, remote IRR (RO) and reserved bits 31:17 read 0.
    assert entry_low(io, 5) == 0xFFFFFFFF & ~(REMOTE_IRR | (1 << 12)) & 0x1FFFF
    assert reg_read(io, IoReg.REDTBL0 + 2 * 5 + 1) == 0xFF000000


def test_bad_accesses_are_logged_and_read_zero() -> None:
    io, _, logs = make()
    assert io.read(Mmio.IOWIN, 2) == 0
    assert io.read(0x20, 4) == 0
    io.write(Mmio.EOI, 4, 0x30)                  # version 0x11: no EOI register
    assert reg_read(io, 0x50) == 0               # not a register
    assert len(logs) == 4


def test_bad_version_refused() -> None:
    with pytest.raises(ValueError):
        IOAPIC(lambda v, lvl: None, version=0x13)


# -- edge -----------------------------------------------------------------------------

def test_edge_pin_routes_to_its_vector() -> None:
    io, sent, _ = make()
    set_entry(io, 1, 0x31)
    set_entry(io, 4, 0x34)
    io.set_irq(1, True)
    io.set_irq(1, False)
    io.set_irq(4, True)
    io.set_irq(4, True)                          # no new edge
    io.set_irq(1, True)
    assert sent == [(0x31, False), (0x34, False), (0x31, False)]


def test_masked_pin_delivers_nothing_and_edge_is_lost() -> None:
    io, sent, _ = make()
    set_entry(io, 2, MASKED | 0x32)
    line = IrqLine("irq0")
    line.connect(io.pin_sink(2))
    line.pulse()
    set_entry(io, 2, 0x32)                       # unmask: the edge is gone
    assert sent == []
    line.pulse()
    assert sent == [(0x32, False)]


def test_edge_entry_active_low_fires_on_falling_wire() -> None:
    io, sent, _ = make()
    io.set_irq(6, True)                          # wire idles high
    set_entry(io, 6, ACTIVE_LOW | 0x36)
    assert sent == []
    io.set_irq(6, False)
    assert sent == [(0x36, False)]
    io.set_irq(6, True)
    assert sent == [(0x36, False)]


# -- level ----------------------------------------------------------------------------

def test_level_pin_sets_remote_irr_and_redelivers_after_eoi() -> None:
    io, sent, _ = make()
    set_entry(io, 9, LEVEL | 0x49)
    io.set_irq(9, True)
    assert sent == [(0x49, True)]
    assert entry_low(io, 9) & REMOTE_IRR
    io.eoi(0x48)                                 # other vector: nothing
    assert entry_low(io, 9) & REMOTE_IRR and len(sent) == 1
    io.eoi(0x49)                                 # still high: again
    assert sent == [(0x49, True)] * 2
    assert entry_low(io, 9) & REMOTE_IRR
    io.set_irq(9, False)
    io.eoi(0x49)
    assert len(sent) == 2
    assert not entry_low(io, 9) & REMOTE_IRR


def test_unmasking_an_asserted_level_pin_delivers() -> None:
    io, sent, _ = make()
    set_entry(io, 10, MASKED | LEVEL | 0x4A)
    io.set_irq(10, True)
    assert sent == []
    set_entry(io, 10, LEVEL | 0x4A)
    assert sent == [(0x4A, True)]


def test_masked_level_pin_is_not_redelivered_at_eoi() -> None:
    io, sent, _ = make()
    set_entry(io, 11, LEVEL | 0x4B)
    io.set_irq(11, True)
    set_entry(io, 11, MASKED | LEVEL | 0x4B)
    io.eoi(0x4B)
    assert sent == [(0x4B, True)]
    assert not entry_low(io, 11) & REMOTE_IRR


def test_level_active_low_asserted_while_wire_low() -> None:
    io, sent, _ = make()
    set_entry(io, 16, ACTIVE_LOW | LEVEL | 0x50)  # wire is low: asserted
    assert sent == [(0x50, True)]
    io.set_irq(16, True)                         # deasserted
    io.eoi(0x50)
    assert len(sent) == 1


def test_writing_entry_as_edge_clears_remote_irr() -> None:
    io, sent, _ = make()
    set_entry(io, 12, LEVEL | 0x4C)
    io.set_irq(12, True)
    assert entry_low(io, 12) & REMOTE_IRR
    set_entry(io, 12, MASKED | 0x4C)
    assert not entry_low(io, 12) & REMOTE_IRR


def test_eoi_register_in_version_0x20() -> None:
    io, sent, _ = make(version=0x20)
    assert reg_read(io, IoReg.VERSION) == 0x00170020
    set_entry(io, 13, LEVEL | 0x4D)
    io.set_irq(13, True)
    io.write(Mmio.EOI, 4, 0x4D)
    assert sent == [(0x4D, True)] * 2


def test_unmodelled_delivery_modes_are_dropped_and_logged() -> None:
    io, sent, logs = make()
    set_entry(io, 14, LEVEL | (4 << 8) | 0x02)   # NMI
    io.set_irq(14, True)
    assert sent == [] and not entry_low(io, 14) & REMOTE_IRR
    assert any("NMI" in m for m in logs)
    set_entry(io, 15, (1 << 8) | 0x4F)           # lowest priority: our CPU
    io.set_irq(15, True)
    assert sent == [(0x4F, False)]


def test_destination_naming_no_cpu_is_delivered_and_logged_once() -> None:
    io, sent, logs = make()
    set_entry(io, 3, 0x33, 0x01000000)           # physical APIC 1
    io.set_irq(3, True)
    io.set_irq(3, False)
    io.set_irq(3, True)
    assert sent == [(0x33, False)] * 2
    assert sum("destination" in m for m in logs) == 1
    del logs[:]
    set_entry(io, 4, LOGICAL | 0x34, 0x01000000)  # logical bit 0: CPU 0
    set_entry(io, 5, 0x35, 0xFF000000)           # physical broadcast
    io.set_irq(4, True)
    io.set_irq(5, True)
    assert logs == []


def test_ioapic_snapshot_restore() -> None:
    io, sent, _ = make()
    set_entry(io, 7, LEVEL | 0x47)
    io.set_irq(7, True)
    s = io.snapshot()
    io.reset()
    io.restore(s)
    assert entry_low(io, 7) == LEVEL | REMOTE_IRR | 0x47
    io.eoi(0x47)
    assert sent == [(0x47, True)] * 2


# -- IO-APIC -> local APIC -------------------------------------------------------------

def test_integration_level_interrupt_through_lapic_eoi_broadcast() -> None:
    clock = Clock()
    lapic = LocalAPIC(clock)
    io = IOAPIC(lapic.accept)
    lapic.eoi_broadcast = io.eoi
    changes: list[int] = []
    lapic.on_change = lambda: changes.append(clock.now)
    lapic.write(Reg.SVR, 4, 0x1FF)
    line = IrqLine("uart")
    line.connect(io.pin_sink(4))
    set_entry(io, 4, LEVEL | 0x64)
    set_entry(io, 2, 0x60)                       # an edge source too
    line.raise_()
    assert lapic.pending() and changes
    assert lapic.acknowledge() == 0x64
    assert not lapic.pending()
    lapic.write(Reg.EOI, 4, 0)                   # line still high: re-delivered
    assert lapic.pending()
    assert lapic.acknowledge() == 0x64
    line.lower()                                 # the handler drained the device
    lapic.write(Reg.EOI, 4, 0)
    assert not lapic.pending()
    assert not entry_low(io, 4) & REMOTE_IRR
    io.set_irq(2, True)                          # edge: no EOI broadcast needed
    assert lapic.acknowledge() == 0x60
    lapic.write(Reg.EOI, 4, 0)
    assert not lapic.pending()
