"""PCI configuration mechanism #1 with QEMU's "pc" bus 0: i440FX host bridge and PIIX3 ISA bridge.

How it works
------------
PCI Local Bus Specification 3.0, §3.2.2.3.2: CONFIG_ADDRESS is the dword at
I/O 0xCF8 (bit 31 enable, 23:16 bus, 15:11 device, 10:8 function, 7:2
register); CONFIG_DATA is 0xCFC-0xCFF, read and written as bytes, words or a
dword at ``register + (port - 0xCFC)``.  Only a dword access to 0xCF8 reaches
CONFIG_ADDRESS, which reads back what was written (as QEMU); byte and word
accesses to 0xCF8-0xCFB, and CONFIG_DATA accesses while the enable bit is
clear, are plain I/O to nothing: reads give all-ones, writes are dropped.  The
exception is the byte at 0xCF9, the PIIX3's Reset Control Register (82371SB
datasheet §4.1.17, RC): a write with bit 2 (RCPU) set resets the machine
through the ``reset`` callback; bit 1 (SRST, hard or soft reset) is kept and
read back.

Bus 0 has two functions, each a 256-byte type 0 header (spec §6.1) holding
the values QEMU 7.2's ``-M pc`` shows after SeaBIOS: 00:00.0 the 82441FX PMC
(8086:1237, class 06 00 00, revision 02) and 00:01.0 the 82371SB PIIX3
function 0 (8086:7000, class 06 01 00, header type 0x80: multifunction).
Every other bus/device/function is absent and reads 0xFFFFFFFF.  A write
changes only the bits of each byte's write mask (the command register's I/O,
memory, bus master, parity, SERR and INTx disable bits; cache line size,
latency timer, interrupt line; the chipset registers listed in ``_I440FX_W``
and ``_PIIX3_W``); status bits 15-11 and 8 are write-one-to-clear
(spec §6.2.3); the rest is read-only.

Not modelled
------------
* PAM (0x59-0x5F) and SMRAM (0x72) are stored but do not change the memory
  map: there is no BIOS image to shadow.  PIRQ routing (PIIX3 0x60-0x63) is
  stored; no PCI device here raises INTx.
* QEMU's other functions (IDE 00:01.1, ACPI 00:01.3, VGA 00:02.0, e1000
  00:03.0) and any BAR.  Configuration mechanism #2 and extended (>= 0x100)
  registers.
"""
from __future__ import annotations

from typing import Callable

from vmk.machine.devices import Log, nolog

__all__ = ["PciHost", "ConfigFunction", "ENABLE", "RCR_SRST", "RCR_RCPU", "absent"]

ENABLE = 0x8000_0000                # CONFIG_ADDRESS bit 31
RCR_SRST = 0x02                     # 82371SB RC bit 1: system reset (hard) vs CPU soft reset
RCR_RCPU = 0x04                     # RC bit 2: reset CPU
ALL_ONES = 0xFFFF_FFFF
CONFIG_SIZE = 256


class Port:
    """Offsets in the 0xCF8 window."""
    ADDRESS = 0                     # 0xCF8, dword only
    RESET_CONTROL = 1               # 0xCF9, byte only (PIIX3)
    DATA = 4                        # 0xCFC-0xCFF


class Hdr:
    """Type 0 header offsets (PCI 3.0 §6.1, Figure 6-1)."""
    VENDOR_ID = 0x00
    DEVICE_ID = 0x02
    COMMAND = 0x04
    STATUS = 0x06
    REVISION = 0x08
    CLASS_PROG = 0x09
    CACHE_LINE = 0x0C
    LATENCY = 0x0D
    HEADER_TYPE = 0x0E
    SUBSYS_VENDOR = 0x2C
    SUBSYS_ID = 0x2E
    INTERRUPT_LINE = 0x3C


COMMAND_WMASK = 0x0547              # I/O, memory, bus master, parity, SERR, INTx disable
STATUS_W1C = 0xF900                 # parity error, SERR, master/target aborts, data parity (RW1C)
HEADER_MULTIFUNCTION = 0x80
QEMU_SUBSYSTEM = (0x1AF4, 0x1100)   # QEMU's default subsystem vendor/ID on every function


class ConfigFunction:
    """One function's 256-byte configuration space with write and write-one-to-clear masks."""

    def __init__(self, name: str, init: dict[int, int], wmask: dict[int, int]) -> None:
        self.name = name
        self._init = dict(init)
        self.wmask = bytearray(CONFIG_SIZE)
        self.w1c = bytearray(CONFIG_SIZE)
        for off, m in wmask.items():
            self.wmask[off] = m
        self.w1c[Hdr.STATUS] = STATUS_W1C & 0xFF
        self.w1c[Hdr.STATUS + 1] = STATUS_W1C >> 8
        self.space = bytearray(CONFIG_SIZE)
        self.reset()

    def reset(self) -> None:
        self.space = bytearray(CONFIG_SIZE)
        for off, v in self._init.items():
            self.space[off] = v

    def read(self, reg: int, size: int) -> int:
        return int.from_bytes(bytes(self.space[(reg + i) % CONFIG_SIZE] for i in range(size)), "little")

    def write(self, reg: int, size: int, value: int) -> None:
        for i in range(size):
            off = (reg + i) % CONFIG_SIZE
            b = (value >> (8 * i)) & 0xFF
            w, c = self.wmask[off], self.w1c[off]
            self.space[off] = (self.space[off] & ~w & ~(b & c) | (b & w)) & 0xFF


def _header(vendor: int, device: int, command: int, status: int, revision: int, klass: int,
            header_type: int) -> dict[int, int]:
    out: dict[int, int] = {}

    def put(off: int, value: int, size: int) -> None:
        for i in range(size):
            out[off + i] = (value >> (8 * i)) & 0xFF
    put(Hdr.VENDOR_ID, vendor, 2)
    put(Hdr.DEVICE_ID, device, 2)
    put(Hdr.COMMAND, command, 2)
    put(Hdr.STATUS, status, 2)
    put(Hdr.REVISION, revision, 1)
    put(Hdr.CLASS_PROG, klass, 3)
    put(Hdr.HEADER_TYPE, header_type, 1)
    put(Hdr.SUBSYS_VENDOR, QEMU_SUBSYSTEM[0], 2)
    put(Hdr.SUBSYS_ID, QEMU_SUBSYSTEM[1], 2)
    return out


_COMMON_W = {Hdr.COMMAND: COMMAND_WMASK & 0xFF, Hdr.COMMAND + 1: COMMAND_WMASK >> 8,
             Hdr.CACHE_LINE: 0xFF, Hdr.LATENCY: 0xFF, Hdr.INTERRUPT_LINE: 0xFF}

# 82441FX (i440FX PMC) chipset registers: PAM0-PAM6 (0x59-0x5F), SMRAM (0x72); values after SeaBIOS.
_I440FX_INIT = {**_header(0x8086, 0x1237, 0x0103, 0x0000, 0x02, 0x060000, 0x00),
                0x57: 0x10, 0x59: 0x10, 0x5A: 0x11, 0x5B: 0x11, 0x5C: 0x11, 0x5D: 0x11, 0x5E: 0x11,
                0x5F: 0x33, 0x72: 0x0A}
_I440FX_W = {**_COMMON_W, 0x59: 0x30, **{off: 0x33 for off in range(0x5A, 0x60)}, 0x72: 0x78}

# 82371SB PIIX3 function 0 (PCI-to-ISA bridge): IORT 0x4C, XBCS 0x4E, PIRQ route 0x60-0x63, TOM 0x69,
# MBIRQ 0x70-0x71, MBDMA 0x76-0x77, PCSC 0x78, SMI registers 0xA0-0xA8; values after SeaBIOS.
_PIIX3_INIT = {**_header(0x8086, 0x7000, 0x0103, 0x0200, 0x00, 0x060100, HEADER_MULTIFUNCTION),
               0x4C: 0x4D, 0x4E: 0x03, 0x60: 0x0A, 0x61: 0x0A, 0x62: 0x0B, 0x63: 0x0B, 0x69: 0x02,
               0x70: 0x80, 0x71: 0x80, 0x76: 0x0C, 0x77: 0x0C, 0x78: 0x02, 0xA0: 0x08, 0xA8: 0x0F}
_PIIX3_W = {**_COMMON_W, 0x4C: 0xFF, 0x4E: 0xFF, 0x4F: 0x03, **{off: 0x8F for off in range(0x60, 0x64)},
            0x69: 0xFE, 0x70: 0xCF, 0x71: 0xCF, 0x76: 0x8F, 0x77: 0x8F, 0x78: 0xFF, 0x79: 0x03,
            0xA0: 0xFF, 0xA2: 0xFF, 0xA3: 0xFF, 0xA8: 0xFF}


def absent(size: int) -> int:
    return (1 << (8 * size)) - 1


class PciHost:
    """Ports 0xCF8-0xCFF: CONFIG_ADDRESS, the PIIX3 reset control register, CONFIG_DATA."""

    def __init__(self, reset: Callable[[str], None], log: Log = nolog) -> None:
        self._reset_request = reset
        self.log = log
        self.functions: dict[tuple[int, int, int], ConfigFunction] = {
            (0, 0, 0): ConfigFunction("i440fx", _I440FX_INIT, _I440FX_W),
            (0, 1, 0): ConfigFunction("piix3", _PIIX3_INIT, _PIIX3_W),
        }
        self.reset()

    def reset(self) -> None:
        self.address = 0
        self.rcr = 0
        for f in self.functions.values():
            f.reset()

    def _target(self) -> ConfigFunction | None:
        a = self.address
        if not a & ENABLE:
            return None
        return self.functions.get(((a >> 16) & 0xFF, (a >> 11) & 0x1F, (a >> 8) & 0x7))

    def read(self, offset: int, size: int) -> int:
        if offset == Port.ADDRESS and size == 4:
            return self.address
        if offset == Port.RESET_CONTROL and size == 1:
            return self.rcr
        if offset >= Port.DATA:
            if not self.address & ENABLE:
                return absent(size)
            f = self._target()
            if f is None:
                return absent(size)
            return f.read((self.address & 0xFC) + offset - Port.DATA, size)
        return absent(size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == Port.ADDRESS and size == 4:
            self.address = value & ALL_ONES
        elif offset == Port.RESET_CONTROL and size == 1:
            if value & RCR_RCPU:
                self._reset_request("reset control register 0xCF9")
                return
            self.rcr = value & RCR_SRST
        elif offset >= Port.DATA:
            f = self._target()
            if f is not None:
                f.write((self.address & 0xFC) + offset - Port.DATA, size, value)

    def snapshot(self) -> dict:
        return {"address": self.address, "rcr": self.rcr,
                "spaces": {f.name: bytes(f.space) for f in self.functions.values()}}

    def restore(self, state: dict) -> None:
        self.address = state["address"]
        self.rcr = state["rcr"]
        for f in self.functions.values():
            f.space = bytearray(state["spaces"][f.name])
