"""The device state a PC BIOS leaves behind, set through the device registers.

``qemu-system-x86_64 -kernel`` runs SeaBIOS before the multiboot kernel, so a
kernel starts on a PC whose firmware already programmed the interrupt
controllers.  Measured on QEMU 7.2 (a probe kernel printing the registers at
entry) and reproduced here with the same register writes a BIOS makes:

* 8259 pair initialised (ICW1-4) with vector bases 0x08 and 0x70, IMR master
  0xB8 (IRQ0, 1, 2, 6 open), slave 0x8E; ELCR: IRQ10 and 11 level-triggered;
* 8254 channel 0 in mode 2 with count 65536 (18.2 Hz): a kernel that executes
  ``sti`` without programming the PIC gets IRQ0 on vector 8, as on QEMU;
* local APIC software-enabled (SVR 0x1FF), LINT0 ExtINT and LINT1 NMI, both
  level-triggered (the MP-spec virtual wire); timer and IO-APIC entries masked;
* COM1 at divisor 12 (9600 baud), LCR 0, MCR = OUT2.

Not reproduced: BIOS data area contents, the real-mode IVT, option ROMs.
"""
from __future__ import annotations

from vmk.machine.pc import Machine

__all__ = ["bios_state"]


def _outb(m: Machine, port: int, value: int) -> None:
    m.ports.write(port, 1, value)


def _mmio32(m: Machine, addr: int, value: int) -> None:
    base, dev, _ = m.mmio.find(addr)
    dev.write(addr - base, 4, value)


def bios_state(m: Machine) -> None:
    for cmd, data, base, cascade, mask in ((0x20, 0x21, 0x08, 0x04, 0xB8), (0xA0, 0xA1, 0x70, 0x02, 0x8E)):
        _outb(m, cmd, 0x11)
        _outb(m, data, base)
        _outb(m, data, cascade)
        _outb(m, data, 0x01)
        _outb(m, data, mask)
    _outb(m, 0x4D1, 0x0C)
    _outb(m, 0x43, 0x34)           # channel 0, lo/hi, mode 2
    _outb(m, 0x40, 0x00)
    _outb(m, 0x40, 0x00)
    _mmio32(m, 0xFEE000F0, 0x1FF)
    _mmio32(m, 0xFEE00350, 0x8700)
    _mmio32(m, 0xFEE00360, 0x8400)
    _outb(m, 0x3FB, 0x80)
    _outb(m, 0x3F8, 0x0C)
    _outb(m, 0x3F9, 0x00)
    _outb(m, 0x3FB, 0x00)
    _outb(m, 0x3FC, 0x08)
