"""The MP tables (boot/mptable.py) read back with the offsets of the MP Spec 1.4, chapter 4,
and found in RAM by the search xv6's mp.c describes (EBDA, top of base memory, F segment)."""
from __future__ import annotations

import struct

import pytest

from vmk.boot import mptable
from vmk.boot.firmware import bios_tables
from vmk.machine.pc import Machine, MachineConfig


def test_floating_pointer() -> None:
    fp = mptable.floating_pointer(0xF0050)
    assert len(fp) == 16
    assert fp[0:4] == b"_MP_"
    assert struct.unpack_from("<I", fp, 4)[0] == 0xF0050      # PHYSICAL ADDRESS POINTER
    assert fp[8] == 1                                          # LENGTH in paragraphs
    assert fp[9] == 4                                          # SPEC_REV 1.4
    assert sum(fp) % 256 == 0
    assert fp[11] == 0                                         # MP FEATURE INFORMATION BYTE 1: a table exists
    assert fp[12] & 0x80 == 0                                  # IMCRP clear: virtual wire mode


def parse(ct: bytes) -> list[tuple[int, bytes]]:
    entries = []
    off = 44
    for _ in range(struct.unpack_from("<H", ct, 34)[0]):      # ENTRY COUNT
        size = 20 if ct[off] == 0 else 8
        entries.append((ct[off], ct[off:off + size]))
        off += size
    assert off == len(ct)
    return entries


@pytest.mark.parametrize("cpus", [1, 2])
def test_config_table(cpus: int) -> None:
    ct = mptable.config_table(cpus)
    assert ct[0:4] == b"PCMP"
    assert struct.unpack_from("<H", ct, 4)[0] == len(ct)       # BASE TABLE LENGTH
    assert ct[6] == 4                                          # SPEC_REV
    assert sum(ct) % 256 == 0
    assert struct.unpack_from("<I", ct, 36)[0] == 0xFEE0_0000  # ADDRESS OF LOCAL APIC
    assert struct.unpack_from("<H", ct, 40)[0] == 0            # no extended table
    entries = parse(ct)
    kinds = [k for k, _ in entries]
    assert kinds == sorted(kinds)                              # §4.3: entries in type order
    cpu_entries = [e for k, e in entries if k == 0]
    assert [(e[1], e[3]) for e in cpu_entries] == [(0, 3)] + [(n, 1) for n in range(1, cpus)]   # EN, BP
    assert all(e[2] == 0x14 for e in cpu_entries)              # LOCAL APIC VERSION
    buses = [e for k, e in entries if k == 1]
    assert [(e[1], e[2:8]) for e in buses] == [(0, b"ISA   ")]
    ioapics = [e for k, e in entries if k == 2]
    assert [(e[1], e[2], e[3], struct.unpack_from("<I", e, 4)[0]) for e in ioapics] == [(0, 0x11, 1, 0xFEC0_0000)]
    ints = {e[5]: (e[1], struct.unpack_from("<H", e, 2)[0], e[4], e[6], e[7]) for k, e in entries if k == 3}
    assert sorted(ints) == [n for n in range(16) if n != 2]
    assert ints[0] == (0, 0, 0, 0, 2)                          # INT, conforms, ISA bus, IO-APIC 0, pin 2
    assert ints[4] == (0, 0, 0, 0, 4)
    assert ints[9] == (0, 0x0D, 0, 0, 9)                       # the SCI: level, active high
    local = [(e[1], e[6], e[7]) for k, e in entries if k == 4]
    assert local == [(3, 0, 0), (1, 0xFF, 1)]                  # ExtINT -> BSP LINT0, NMI -> all LINT1


def test_found_by_the_mp_spec_search() -> None:
    m = Machine(MachineConfig(mem=16 << 20))
    bios_tables(m)
    rd = m.read_physical
    ebda = struct.unpack("<H", rd(0x40E, 2))[0] << 4
    base_kb = struct.unpack("<H", rd(0x413, 2))[0]
    assert (ebda, base_kb) == (0x9FC00, 639)
    found = None
    for lo, n in ((ebda, 1024), ((base_kb << 10) - 1024, 1024), (0xF0000, 0x10000)):
        for a in range(lo, lo + n, 16):
            if rd(a, 4) == b"_MP_" and sum(rd(a, 16)) % 256 == 0:
                found = a
                break
        if found:
            break
    assert found is not None and 0xF0000 <= found < 0x100000     # where SeaBIOS puts it
    ct_addr = struct.unpack("<I", rd(found + 4, 4))[0]
    length = struct.unpack("<H", rd(ct_addr + 4, 2))[0]
    assert sum(rd(ct_addr, length)) % 256 == 0
    assert struct.unpack("<4H", rd(0x400, 8)) == (0x3F8, 0x2F8, 0, 0)     # COM1-4 bases in the BDA
