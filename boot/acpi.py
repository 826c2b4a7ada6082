"""The ACPI tables a PC firmware leaves for the OS (ACPI 6.5 spec, chapter 5).

SeaBIOS on QEMU builds them before it runs a ``-kernel``; vmk builds the same
kinds of table, describing vmk's PC, from the spec's layouts:

* RSDP (§5.2.5), revision 2: both checksums, the RSDT and the XSDT address.
  It lives in the BIOS read-only area (0xE0000-0xFFFFF, 16-byte aligned),
  where OSPM searches for it (§5.2.5.1).
* RSDT (§5.2.7) and XSDT (§5.2.8): the FADT, MADT and HPET table.
* FADT (§5.2.9), revision 6: the PM1a event/control blocks and the PM timer
  at the PIIX4 PM base (0x600: PM1a_EVT 0x600, PM1a_CNT 0x604, PM_TMR 0x608,
  ``vmk.machine.devices.acpipm``), SCI_INT 9, both the 32-bit and the X_
  (Generic Address Structure) fields, FACS and DSDT.  SMI_CMD is 0: there is
  no SMM, the platform is always in ACPI mode (SCI_EN reads 1).
* FACS (§5.2.10), 64-byte aligned, version 2.
* DSDT (§5.2.11.1): the one object ``\\_S5`` (§7.4.2, the S5 soft-off
  package), written in AML below with its ASL.
* MADT (§5.2.12): LAPIC address 0xFEE00000, PCAT_COMPAT, one Processor Local
  APIC per CPU, the IO-APIC with GSI base 0, interrupt source overrides
  IRQ0 -> GSI 2 (the PIT is wired to IO-APIC pin 2) and IRQ9 -> GSI 9 level,
  active high (the SCI), and a Local APIC NMI on LINT1 of every processor.
* HPET (IA-PC HPET specification 1.0a, §3.2.4): an Intel HPET with three
  timers at 0xFED00000.

Every table is built as bytes by a pure function (tests check them against the
spec's offsets); :func:`build` lays them out at an address and patches the
pointers between them.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from vmk.machine.devices.acpipm import PM_IO_SIZE, Reg
from vmk.machine.pc import ACPI_PM_BASE, ACPI_SCI_IRQ, IOAPIC_BASE, IOAPIC_PIN_OF_ISA_IRQ0, LAPIC_BASE

__all__ = ["AcpiTables", "build", "checksum", "sdt", "rsdp", "rsdt", "xsdt", "fadt", "facs", "dsdt", "madt", "hpet",
           "gas", "OEM_ID", "OEM_TABLE_ID", "LAPIC_ADDR", "IOAPIC_ADDR", "HPET_ADDR", "PM_BASE", "SCI_IRQ",
           "HPET_EVENT_TIMER_BLOCK_ID", "DSDT_AML"]

OEM_ID = b"VMK   "
OEM_TABLE_ID = b"VMKPC   "
OEM_REVISION = 1
CREATOR_ID = b"VMK "
CREATOR_REVISION = 1
SDT_HEADER = 36

LAPIC_ADDR = LAPIC_BASE
IOAPIC_ADDR = IOAPIC_BASE
IOAPIC_ID = 0                   # the IO-APIC's ID register at reset (QEMU's tables say 0 too)
HPET_ADDR = 0xFED0_0000
PM_BASE = ACPI_PM_BASE
SCI_IRQ = ACPI_SCI_IRQ
PIT_GSI = IOAPIC_PIN_OF_ISA_IRQ0

RSDP_REVISION = 2
FADT_REVISION = 6
FADT_MINOR = 5                  # ACPI 6.5
FADT_LENGTH = 276
MADT_REVISION = 5
FACS_VERSION = 2

# Generic Address Structure (§5.2.3.2)
SPACE_MEMORY = 0
SPACE_IO = 1
ACCESS_BYTE, ACCESS_WORD, ACCESS_DWORD = 1, 2, 3

# FADT fixed feature flags (§5.2.9, table 5.10)
FADT_WBINVD = 1 << 0
FADT_PROC_C1 = 1 << 2
FADT_SLP_BUTTON = 1 << 5          # no sleep button
FADT_FIX_RTC = 1 << 6             # no RTC_STS in the fixed registers
FADT_USE_PLATFORM_CLOCK = 1 << 15
FADT_FLAGS = FADT_WBINVD | FADT_PROC_C1 | FADT_SLP_BUTTON | FADT_FIX_RTC | FADT_USE_PLATFORM_CLOCK
# IA-PC boot architecture flags (§5.2.9.3): ISA-style devices (COM ports), no 8042, no VGA
IAPC_LEGACY_DEVICES = 1 << 0
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_BOOT_ARCH = IAPC_LEGACY_DEVICES | IAPC_VGA_NOT_PRESENT
C_STATE_NOT_SUPPORTED = 0x0FFF    # P_LVL2_LAT > 100 and P_LVL3_LAT > 1000: no C2/C3
RTC_CENTURY = 0x32                # CMOS index of the century (as QEMU's MC146818)

# MADT (§5.2.12)
MADT_PCAT_COMPAT = 1 << 0
MADT_LAPIC, MADT_IOAPIC, MADT_ISO, MADT_LAPIC_NMI = 0, 1, 2, 4
LAPIC_ENABLED = 1 << 0
MPS_POLARITY_HIGH = 0b01          # MPS INTI flags (table 5.26)
MPS_TRIGGER_LEVEL = 0b11 << 2
ALL_PROCESSORS = 0xFF

# HPET Event Timer Block ID (HPET spec §3.2.4, the General Capabilities register's low half)
HPET_VENDOR_INTEL = 0x8086
HPET_TIMERS = 3
HPET_EVENT_TIMER_BLOCK_ID = ((HPET_VENDOR_INTEL << 16) | (1 << 15)      # LEG_RT_CAP
                             | (1 << 13)                                # COUNT_SIZE_CAP: 64-bit
                             | ((HPET_TIMERS - 1) << 8) | 0x01)         # NUM_TIM_CAP, REV_ID

# DSDT body, AML (§20.2).  The ASL:
#
#     DefinitionBlock ("", "DSDT", 2, "VMK   ", "VMKPC   ", 1)
#     {
#         Name (_S5, Package (4) { Zero, Zero, Zero, Zero })   // S5: SLP_TYPa = SLP_TYPb = 0
#     }
#
# DefNameOp NameString DataRefObject; DefPackage := PackageOp PkgLength NumElements
# PackageElementList, PkgLength one byte (< 64) counting itself: 1 + 1 + 4 = 6.
AML_NAME_OP = 0x08
AML_PACKAGE_OP = 0x12
AML_ZERO_OP = 0x00
DSDT_AML = bytes([AML_NAME_OP]) + b"_S5_" + bytes([AML_PACKAGE_OP, 0x06, 0x04,
                                                  AML_ZERO_OP, AML_ZERO_OP, AML_ZERO_OP, AML_ZERO_OP])
DSDT_REVISION = 2                 # 64-bit AML integers


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` plus it sum to 0 mod 256."""
    return -sum(data) & 0xFF


def _with_checksum(table: bytearray, at: int) -> bytes:
    table[at] = 0
    table[at] = checksum(table)
    return bytes(table)


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A System Description Table: the 36-byte header (§5.2.6) + ``body``, checksummed."""
    t = bytearray(struct.pack("<4sIBB6s8sI4sI", signature, SDT_HEADER + len(body), revision, 0, OEM_ID,
                              OEM_TABLE_ID, OEM_REVISION, CREATOR_ID, CREATOR_REVISION) + body)
    return _with_checksum(t, 9)


def gas(space: int, bit_width: int, access: int, address: int, bit_offset: int = 0) -> bytes:
    """Generic Address Structure (§5.2.3.2), 12 bytes."""
    return struct.pack("<BBBBQ", space, bit_width, bit_offset, access, address)


def rsdp(rsdt_addr: int, xsdt_addr: int) -> bytes:
    """RSDP revision 2 (§5.2.5.3), 36 bytes: checksum over the first 20, extended checksum over all."""
    r = bytearray(struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, OEM_ID, RSDP_REVISION, rsdt_addr, 36, xsdt_addr, 0))
    r[8] = checksum(r[:20])
    return _with_checksum(r, 32)


def rsdt(entries: list[int]) -> bytes:
    return sdt(b"RSDT", 1, b"".join(struct.pack("<I", a) for a in entries))


def xsdt(entries: list[int]) -> bytes:
    return sdt(b"XSDT", 1, b"".join(struct.pack("<Q", a) for a in entries))


def facs() -> bytes:
    """FACS (§5.2.10), 64 bytes, no checksum; the global lock and waking vectors are 0."""
    return struct.pack("<4sIIIIIQB3xI24x", b"FACS", 64, 0, 0, 0, 0, 0, FACS_VERSION, 0)


def dsdt() -> bytes:
    return sdt(b"DSDT", DSDT_REVISION, DSDT_AML)


def fadt(facs_addr: int, dsdt_addr: int, pm_base: int = PM_BASE) -> bytes:
    """FADT revision 6 (§5.2.9, table 5.9), 276 bytes."""
    evt, cnt, tmr = pm_base + Reg.PM1_STS, pm_base + Reg.PM1_CNT, pm_base + Reg.PM_TMR
    assert tmr + 4 <= pm_base + PM_IO_SIZE
    body = bytearray(FADT_LENGTH - SDT_HEADER)

    def put(offset: int, fmt: str, *values: int | bytes) -> None:
        struct.pack_into("<" + fmt, body, offset - SDT_HEADER, *values)

    put(36, "II", facs_addr, dsdt_addr)
    put(45, "BH", 0, SCI_IRQ)                      # Preferred_PM_Profile unspecified, SCI_INT
    put(48, "IBBBB", 0, 0, 0, 0, 0)                # SMI_CMD 0: no SMM, always in ACPI mode
    put(56, "IIIIII", evt, 0, cnt, 0, 0, tmr)      # PM1a_EVT, PM1b_EVT, PM1a_CNT, PM1b_CNT, PM2_CNT, PM_TMR
    put(80, "II", 0, 0)                            # GPE0/GPE1 blocks: none
    put(88, "BBBBBBBB", 4, 2, 0, 4, 0, 0, 0, 0)    # PM1_EVT_LEN PM1_CNT_LEN PM2 PM_TMR_LEN GPE0 GPE1 GPE1_BASE CST
    put(96, "HH", C_STATE_NOT_SUPPORTED, C_STATE_NOT_SUPPORTED)
    put(108, "BH", RTC_CENTURY, IAPC_BOOT_ARCH)
    put(112, "I", FADT_FLAGS)
    put(131, "B", FADT_MINOR)
    put(132, "QQ", facs_addr, dsdt_addr)          # X_FIRMWARE_CTRL, X_DSDT
    put(148, "12s", gas(SPACE_IO, 32, ACCESS_WORD, evt))
    put(172, "12s", gas(SPACE_IO, 16, ACCESS_WORD, cnt))
    put(208, "12s", gas(SPACE_IO, 32, ACCESS_DWORD, tmr))
    put(268, "8s", b"VMK\0\0\0\0\0")               # Hypervisor Vendor Identity
    return sdt(b"FACP", FADT_REVISION, bytes(body))


def madt(cpus: int) -> bytes:
    """MADT (§5.2.12): the processors' LAPICs, the IO-APIC, the ISA overrides, LINT1 = NMI."""
    body = struct.pack("<II", LAPIC_ADDR, MADT_PCAT_COMPAT)
    for n in range(cpus):
        body += struct.pack("<BBBBI", MADT_LAPIC, 8, n, n, LAPIC_ENABLED)
    body += struct.pack("<BBBBII", MADT_IOAPIC, 12, IOAPIC_ID, 0, IOAPIC_ADDR, 0)
    body += struct.pack("<BBBBIH", MADT_ISO, 10, 0, 0, PIT_GSI, 0)
    body += struct.pack("<BBBBIH", MADT_ISO, 10, 0, SCI_IRQ, SCI_IRQ, MPS_POLARITY_HIGH | MPS_TRIGGER_LEVEL)
    body += struct.pack("<BBBHB", MADT_LAPIC_NMI, 6, ALL_PROCESSORS, 0, 1)
    return sdt(b"APIC", MADT_REVISION, body)


def hpet() -> bytes:
    """HPET description table (HPET spec §3.2.4): block ID, base address, number 0, min tick 0."""
    return sdt(b"HPET", 1, struct.pack("<I12sBHB", HPET_EVENT_TIMER_BLOCK_ID,
                                       gas(SPACE_MEMORY, 64, 0, HPET_ADDR), 0, 0, 0))


@dataclass(slots=True)
class AcpiTables:
    """The tables laid out at ``base`` (``blob``) and the RSDP that points at them."""
    base: int
    blob: bytes
    rsdp: bytes
    addresses: dict[str, int]


def _align(n: int, a: int) -> int:
    return (n + a - 1) & -a


def build(base: int, cpus: int) -> AcpiTables:
    """Lay out FACS, DSDT, FADT, MADT, HPET, RSDT and XSDT from ``base`` (64-byte aligned)."""
    assert base % 64 == 0
    addr: dict[str, int] = {}
    parts: list[tuple[int, bytes]] = []
    pos = base

    def place(name: str, data: bytes, align: int = 16) -> int:
        nonlocal pos
        pos = _align(pos, align)
        addr[name] = pos
        parts.append((pos, data))
        pos += len(data)
        return addr[name]

    f = place("FACS", facs(), 64)
    d = place("DSDT", dsdt())
    tables = [place("FACP", fadt(f, d)), place("APIC", madt(cpus)), place("HPET", hpet())]
    r = place("RSDT", rsdt(tables))
    x = place("XSDT", xsdt(tables))
    blob = bytearray(pos - base)
    for at, data in parts:
        blob[at - base:at - base + len(data)] = data
    return AcpiTables(base, bytes(blob), rsdp(r, x), addr)
