"""i8042 keyboard controller commands (IBM PC/AT Technical Reference), IRQ 1 and the reset line."""
from __future__ import annotations

from vmk.machine.devices.i8042 import I8042
from vmk.machine.irq import IrqLine

DATA, CMD = 0, 4


def rig() -> tuple[I8042, IrqLine, list[str]]:
    irq1, irq12 = IrqLine("irq1"), IrqLine("irq12")
    resets: list[str] = []
    return I8042(irq1, irq12, resets.append), irq1, resets


def test_power_on_and_self_tests() -> None:
    k, irq1, _ = rig()
    assert k.read(CMD, 1) == 0x1C
    k.write(CMD, 1, 0xAA)
    assert k.read(CMD, 1) == 0x1D and irq1.level                # OBF; INT is set in the command byte
    assert k.read(DATA, 1) == 0x55 and not irq1.level
    k.write(CMD, 1, 0xAB)
    assert k.read(DATA, 1) == 0x00
    assert k.read(DATA, 1) == 0x00                              # empty: the last byte again


def test_command_byte_and_enable_bits() -> None:
    k, irq1, _ = rig()
    k.write(CMD, 1, 0x60)
    k.write(DATA, 1, 0x20)                                      # no interrupts
    assert k.read(CMD, 1) & 0x08 == 0                           # last write was data
    k.write(CMD, 1, 0xAD)
    k.write(CMD, 1, 0x20)
    assert not irq1.level and k.read(DATA, 1) == 0x30
    k.write(CMD, 1, 0xAE)
    k.write(CMD, 1, 0x20)
    assert k.read(DATA, 1) == 0x20


def test_keyboard_and_mouse_answers() -> None:
    k, _, _ = rig()
    k.write(DATA, 1, 0xFF)
    assert [k.read(DATA, 1) for _ in range(2)] == [0xFA, 0xAA]
    k.write(DATA, 1, 0xF2)                                      # identify, translated (command byte bit 6)
    assert [k.read(DATA, 1) for _ in range(3)] == [0xFA, 0xAB, 0x41]
    k.write(CMD, 1, 0xD4)
    k.write(DATA, 1, 0xF2)
    assert k.read(CMD, 1) & 0x21 == 0x21                        # AUX_OBF | OBF
    assert [k.read(DATA, 1) for _ in range(2)] == [0xFA, 0x00]


def test_reset_line() -> None:
    k, _, resets = rig()
    k.write(CMD, 1, 0xD0)
    assert k.read(DATA, 1) & 0x03 == 0x03
    k.write(CMD, 1, 0xFF)                                       # pulses nothing (bit 0 = 1)
    assert resets == []
    k.write(CMD, 1, 0xFE)
    k.write(CMD, 1, 0xD1)
    k.write(DATA, 1, 0xCE)                                      # output port with the reset bit low
    assert len(resets) == 2
