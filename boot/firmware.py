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

And the memory SeaBIOS leaves (``bios_tables``), at the places QEMU has them:

* the BIOS data area (IBM PC/AT Technical Reference; SeaBIOS ``struct
  bios_data_area_s``): COM port bases at 0x400 (COM1 0x3F8, COM2 0x2F8), no
  LPT, the EBDA segment 0x9FC0 at 0x40E, the equipment word at 0x410, base
  memory 639 KiB at 0x413, an empty keyboard buffer (0x41A/0x41C, 0x480/0x482);
* the 1 KiB EBDA at 0x9FC00 (its first byte: its size in KiB);
* in the F segment: the ACPI RSDP (``acpi.py``) at 0xF0000 and the MP floating
  pointer and configuration table (``mptable.py``) after it;
* the other ACPI tables in the last 128 KiB of RAM, which the memory map
  (:func:`memory_map`, the E820 map SeaBIOS reports) marks reserved, as on QEMU.

Not reproduced: the real-mode IVT, option ROMs, SMBIOS.
"""
from __future__ import annotations

import struct

from vmk.machine.pc import Machine

from . import acpi, mptable

__all__ = ["bios_state", "bios_tables", "memory_map", "E820_RAM", "E820_RESERVED", "EBDA_ADDR", "BASE_MEM_KB",
           "ACPI_AREA_SIZE", "RSDP_ADDR", "MP_ADDR"]

E820_RAM = 1
E820_RESERVED = 2
EBDA_ADDR = 0x9FC00                 # 639 KiB of conventional memory below it, as QEMU reports
EBDA_KB = 1
BASE_MEM_KB = EBDA_ADDR >> 10
VGA_START = 0xA0000
BIOS_AREA = 0xF0000                 # the F segment, reserved in the map
HIGH_MEM = 0x100000
ACPI_AREA_SIZE = 0x20000            # SeaBIOS's tables at the top of RAM, reserved
BIOS_FLASH = (0xFFFC0000, 0x40000)  # the BIOS ROM alias below 4 GiB
HT_HOLE = (0xFD_0000_0000, 0x3_0000_0000)   # QEMU reserves the AMD HyperTransport range (1 TiB - 12 GiB)
RSDP_ADDR = BIOS_AREA
MP_ADDR = RSDP_ADDR + 0x40

# BIOS data area (offsets from 0x400)
BDA = 0x400
BDA_COM = 0x00
BDA_LPT = 0x08
BDA_EBDA_SEG = 0x0E
BDA_EQUIPMENT = 0x10
BDA_BASE_MEM_KB = 0x13
BDA_KBD_HEAD = 0x1A
BDA_KBD_TAIL = 0x1C
BDA_KBD_START = 0x80
BDA_KBD_END = 0x82
KBD_BUF, KBD_BUF_END = 0x1E, 0x3E
COM_BASES = (0x3F8, 0x2F8, 0, 0)
EQUIP_FPU = 1 << 1
EQUIP_VIDEO_80X25_COLOR = 0b10 << 4
EQUIP_SERIAL_SHIFT = 9


def memory_map(ram_size: int) -> list[tuple[int, int, int]]:
    """The E820 map (base, length, type) of a PC with ``ram_size`` bytes of RAM at 0,
    as SeaBIOS reports it on QEMU: conventional memory up to the EBDA, the EBDA and
    the F segment reserved, RAM from 1 MiB to the ACPI tables, those reserved."""
    top = ram_size - ACPI_AREA_SIZE
    return [
        (0, EBDA_ADDR, E820_RAM),
        (EBDA_ADDR, VGA_START - EBDA_ADDR, E820_RESERVED),
        (BIOS_AREA, HIGH_MEM - BIOS_AREA, E820_RESERVED),
        (HIGH_MEM, top - HIGH_MEM, E820_RAM),
        (top, ACPI_AREA_SIZE, E820_RESERVED),
        (*BIOS_FLASH, E820_RESERVED),
        (*HT_HOLE, E820_RESERVED),
    ]


def bios_tables(m: Machine) -> None:
    """Write the BIOS data area, the EBDA, the ACPI tables and the MP tables into RAM."""
    w = m.write_physical
    serial = sum(1 for port in COM_BASES if port)
    w(BDA + BDA_COM, struct.pack("<4H", *COM_BASES))
    w(BDA + BDA_LPT, bytes(6))
    w(BDA + BDA_EBDA_SEG, struct.pack("<H", EBDA_ADDR >> 4))
    w(BDA + BDA_EQUIPMENT, struct.pack("<H", EQUIP_FPU | EQUIP_VIDEO_80X25_COLOR | (serial << EQUIP_SERIAL_SHIFT)))
    w(BDA + BDA_BASE_MEM_KB, struct.pack("<H", BASE_MEM_KB))
    w(BDA + BDA_KBD_HEAD, struct.pack("<HH", KBD_BUF, KBD_BUF))
    w(BDA + BDA_KBD_START, struct.pack("<HH", KBD_BUF, KBD_BUF_END))
    w(EBDA_ADDR, bytes([EBDA_KB]) + bytes(EBDA_KB * 1024 - 1))
    cpus = m.config.cpus
    tables = acpi.build(m.ram.size - ACPI_AREA_SIZE, cpus)
    w(tables.base, tables.blob)
    w(RSDP_ADDR, tables.rsdp)
    config = mptable.config_table(cpus)
    w(MP_ADDR, mptable.floating_pointer(MP_ADDR + 16))
    w(MP_ADDR + 16, config)


def _outb(m: Machine, port: int, value: int) -> None:
    m.ports.write(port, 1, value)


def _mmio32(m: Machine, addr: int, value: int) -> None:
    base, dev, _ = m.mmio.find(addr)
    dev.write(addr - base, 4, value)


def bios_state(m: Machine) -> None:
    """Program the devices as the BIOS leaves them and write its tables (``bios_tables``)."""
    bios_tables(m)
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
