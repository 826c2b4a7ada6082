"""The ACPI tables (boot/acpi.py) read back with the offsets of the ACPI 6.5 spec.

Every offset and value below is written from the spec's tables (§5.2.5 RSDP,
§5.2.6 header, §5.2.9 FADT, §5.2.10 FACS, §5.2.12 MADT, HPET spec §3.2.4), not
from the builder's constants; the layout test places the tables in a machine's
RAM as the firmware does and finds them as an OS does.
"""
from __future__ import annotations

import struct

import pytest

from vmk.boot import acpi
from vmk.boot.firmware import E820_RESERVED, bios_tables, memory_map
from vmk.machine.pc import Machine, MachineConfig


def u8(b: bytes, o: int) -> int:
    return b[o]


def u16(b: bytes, o: int) -> int:
    return struct.unpack_from("<H", b, o)[0]


def u32(b: bytes, o: int) -> int:
    return struct.unpack_from("<I", b, o)[0]


def u64(b: bytes, o: int) -> int:
    return struct.unpack_from("<Q", b, o)[0]


def assert_sdt(t: bytes, signature: bytes, length: int | None = None) -> None:
    """§5.2.6: signature 0-3, length 4-7 (the whole table), checksum 9: all bytes sum to 0."""
    assert t[0:4] == signature
    assert u32(t, 4) == len(t)
    if length is not None:
        assert len(t) == length
    assert sum(t) % 256 == 0
    assert t[10:16] == b"VMK   "            # OEMID, 6 bytes


def test_rsdp_revision_2_both_checksums() -> None:
    r = acpi.rsdp(0x1234_5678, 0x9_8765_4320)
    assert len(r) == 36
    assert r[0:8] == b"RSD PTR "
    assert sum(r[:20]) % 256 == 0              # checksum: the ACPI 1.0 part, bytes 0-19
    assert sum(r) % 256 == 0                   # extended checksum: all 36 bytes
    assert u8(r, 15) == 2                      # revision
    assert u32(r, 16) == 0x1234_5678           # RsdtAddress
    assert u32(r, 20) == 36                    # Length
    assert u64(r, 24) == 0x9_8765_4320         # XsdtAddress
    assert r[33:36] == b"\0\0\0"


def test_rsdt_and_xsdt_entries() -> None:
    entries = [0x7FE_0100, 0x7FE_0200, 0x7FE_0300]
    r = acpi.rsdt(entries)
    assert_sdt(r, b"RSDT", 36 + 4 * 3)
    assert [u32(r, 36 + 4 * i) for i in range(3)] == entries
    x = acpi.xsdt(entries)
    assert_sdt(x, b"XSDT", 36 + 8 * 3)
    assert [u64(x, 36 + 8 * i) for i in range(3)] == entries


def test_fadt_fields() -> None:
    f = acpi.fadt(0x7FE_0000, 0x7FE_0040)
    assert_sdt(f, b"FACP", 276)                # revision 6 is 276 bytes (table 5.9)
    assert u8(f, 8) == 6
    assert u8(f, 131) == 5                     # FADT minor version: ACPI 6.5
    assert u32(f, 36) == 0x7FE_0000            # FIRMWARE_CTRL
    assert u32(f, 40) == 0x7FE_0040            # DSDT
    assert u16(f, 46) == 9                     # SCI_INT
    assert u32(f, 48) == 0                     # SMI_CMD: no SMM
    assert u32(f, 56) == 0x600                 # PM1a_EVT_BLK
    assert u32(f, 60) == 0                     # PM1b_EVT_BLK
    assert u32(f, 64) == 0x604                 # PM1a_CNT_BLK
    assert u32(f, 76) == 0x608                 # PM_TMR_BLK
    assert (u8(f, 88), u8(f, 89), u8(f, 91)) == (4, 2, 4)     # PM1_EVT_LEN, PM1_CNT_LEN, PM_TMR_LEN
    assert u16(f, 96) > 100 and u16(f, 98) > 1000               # no C2, no C3
    flags = u32(f, 112)
    assert not flags & (1 << 8)                # TMR_VAL_EXT clear: 24-bit PM timer
    assert not flags & (1 << 20)               # not HW_REDUCED_ACPI: the fixed hardware exists
    assert u64(f, 132) == 0x7FE_0000           # X_FIRMWARE_CTRL
    assert u64(f, 140) == 0x7FE_0040           # X_DSDT
    # X_PM1a_EVT_BLK (148), X_PM1a_CNT_BLK (172), X_PM_TMR_BLK (208): GAS in system I/O space
    for off, width, address in ((148, 32, 0x600), (172, 16, 0x604), (208, 32, 0x608)):
        assert u8(f, off) == 1                 # address space ID: system I/O
        assert u8(f, off + 1) == width         # register bit width = the block length * 8
        assert u8(f, off + 2) == 0
        assert u64(f, off + 4) == address
    for off in (160, 184, 196, 220, 232):      # PM1b_EVT, PM1b_CNT, PM2_CNT, GPE0, GPE1: absent
        assert f[off:off + 12] == bytes(12)


def test_facs() -> None:
    f = acpi.facs()
    assert len(f) == 64
    assert f[0:4] == b"FACS" and u32(f, 4) == 64
    assert u8(f, 32) == 2                      # version


def test_dsdt_defines_s5_soft_off() -> None:
    d = acpi.dsdt()
    assert_sdt(d, b"DSDT")
    assert u8(d, 8) == 2                       # revision 2: 64-bit integers
    # NameOp "_S5_" PackageOp PkgLength(6) NumElements(4) ZeroOp x4 (ACPI §20.2.5.1, §20.2.5.4)
    assert d[36:] == bytes.fromhex("08") + b"_S5_" + bytes.fromhex("12 06 04 00 00 00 00")


@pytest.mark.parametrize("cpus", [1, 4])
def test_madt(cpus: int) -> None:
    m = acpi.madt(cpus)
    assert_sdt(m, b"APIC")
    assert u32(m, 36) == 0xFEE0_0000           # Local Interrupt Controller Address
    assert u32(m, 40) & 1                      # PCAT_COMPAT
    entries = []
    off = 44
    while off < len(m):
        kind, length = m[off], m[off + 1]
        entries.append((kind, m[off:off + length]))
        off += length
    assert off == len(m)
    lapics = [e for k, e in entries if k == 0]
    assert [(len(e), e[2], e[3], u32(e, 4) & 1) for e in lapics] == [(8, n, n, 1) for n in range(cpus)]
    ioapics = [e for k, e in entries if k == 1]
    assert len(ioapics) == 1 and len(ioapics[0]) == 12
    assert u32(ioapics[0], 4) == 0xFEC0_0000 and u32(ioapics[0], 8) == 0       # address, GSI base
    isos = {e[3]: (len(e), e[2], u32(e, 4), u16(e, 8)) for k, e in entries if k == 2}
    assert isos == {0: (10, 0, 2, 0x0000), 9: (10, 0, 9, 0x000D)}            # bus ISA; 9: level, active high
    nmis = [e for k, e in entries if k == 4]
    assert [(len(e), e[2], u16(e, 3), e[5]) for e in nmis] == [(6, 0xFF, 0, 1)]   # all CPUs, LINT1


def test_hpet_table() -> None:
    h = acpi.hpet()
    assert_sdt(h, b"HPET", 56)
    block_id = u32(h, 36)
    assert block_id >> 16 == 0x8086            # PCI vendor ID
    assert (block_id >> 8) & 0x1F == 2         # NUM_TIM_CAP: number of the last timer (3 timers)
    assert block_id & (1 << 13)                # COUNT_SIZE_CAP: 64-bit main counter
    assert block_id & (1 << 15)                # LEG_RT_CAP
    assert u8(h, 40) == 0                      # GAS in system memory
    assert u64(h, 44) == 0xFED0_0000
    assert u8(h, 52) == 0                      # HPET number


def test_tables_in_ram_are_found_as_an_os_finds_them() -> None:
    mem = 16 << 20
    m = Machine(MachineConfig(mem=mem, cpus=2))
    bios_tables(m)
    rd = m.read_physical
    hits = [a for a in range(0xE0000, 0x100000, 16) if rd(a, 8) == b"RSD PTR " and sum(rd(a, 20)) % 256 == 0]
    assert len(hits) == 1
    r = rd(hits[0], 36)
    assert sum(r) % 256 == 0
    reserved = [(b, b + n) for b, n, kind in memory_map(mem) if kind == E820_RESERVED]

    def table(addr: int) -> bytes:
        assert any(lo <= addr and addr + 36 <= hi for lo, hi in reserved), hex(addr)   # not usable RAM
        return rd(addr, u32(rd(addr, 8), 4))

    rsdt, xsdt = table(u32(r, 16)), table(u64(r, 24))
    n = (len(rsdt) - 36) // 4
    assert [u32(rsdt, 36 + 4 * i) for i in range(n)] == [u64(xsdt, 36 + 8 * i) for i in range(n)]
    by_sig = {}
    for i in range(n):
        t = table(u32(rsdt, 36 + 4 * i))
        assert sum(t) % 256 == 0
        by_sig[t[0:4]] = t
    assert set(by_sig) == {b"FACP", b"APIC", b"HPET"}
    fadt = by_sig[b"FACP"]
    assert sum(table(u32(fadt, 40))) % 256 == 0
    facs_addr = u32(fadt, 36)
    assert facs_addr % 64 == 0 and rd(facs_addr, 4) == b"FACS"
    assert len([1 for off in range(44, len(by_sig[b"APIC"]), 8) if by_sig[b"APIC"][off] == 0]) >= 2


def test_memory_map_matches_qemu_seabios_at_128_mib() -> None:
    # What SeaBIOS reports on QEMU 7.2 with -m 128 (read by a probe kernel)
    assert memory_map(128 << 20) == [
        (0x0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (0xF0000, 0x10000, 2), (0x100000, 0x7EE0000, 1),
        (0x7FE0000, 0x20000, 2), (0xFFFC0000, 0x40000, 2), (0xFD_0000_0000, 0x3_0000_0000, 2)]
