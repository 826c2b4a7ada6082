"""boot/elf.py, the loader's own ELF reader, against pyelftools (the reference)
on every kernel guest/Makefile builds, and on malformed files."""
from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection
from vmk.boot.elf import ElfError, ElfImage

FIELDS = ("p_type", "p_offset", "p_vaddr", "p_paddr", "p_filesz", "p_memsz", "p_flags")


def _reference(data: bytes) -> tuple[int, list[tuple], dict[str, int]]:
    r = ELFFile(io.BytesIO(data))
    segs = [tuple(s.header[k] if k != "p_type" else {"PT_LOAD": 1}.get(s.header[k], -1) for k in FIELDS)
            for s in r.iter_segments()]
    syms: dict[str, int] = {}
    for sec in r.iter_sections():
        if isinstance(sec, SymbolTableSection):
            for sym in sec.iter_symbols():
                if sym.name and sym["st_info"]["type"] in ("STT_FUNC", "STT_OBJECT", "STT_NOTYPE") \
                        and sym["st_shndx"] != "SHN_UNDEF":
                    syms.setdefault(sym.name, sym["st_value"])
    return r["e_entry"], segs, syms


def test_same_as_pyelftools_on_every_guest(guest_dir: Path) -> None:
    files = sorted(guest_dir.glob("*.elf")) + sorted(guest_dir.glob("*.elf64"))
    assert len(files) >= 10
    for f in files:
        data = f.read_bytes()
        e = ElfImage(data)
        entry, segs, syms = _reference(data)
        mine = [tuple(s[k] if k != "p_type" else (1 if s[k] == 1 else -1) for k in FIELDS) for s in e.segments]
        assert (e.entry, mine, e.symbols()) == (entry, segs, syms), f
        assert e.elfclass == (64 if f.suffix == ".elf64" else 32)
        assert len(syms) > 10


@pytest.mark.parametrize("damage, message", [
    (lambda d: d[:10], "no ELF magic"),
    (lambda d: d[:4] + b"\x07" + d[5:], "unknown ELF class 7"),
    (lambda d: d[:5] + b"\x02" + d[6:], "big-endian"),
    (lambda d: d[:30], "the ELF header at offset 0x10 runs past the end"),
    (lambda d: d[:0x34 + 8], "program header 0 at offset 0x34 runs past the end"),
])
def test_malformed_files_get_one_clear_error(guest_dir: Path, damage, message: str) -> None:
    data = (guest_dir / "pctest.elf").read_bytes()
    assert struct.unpack_from("<I", data, 28)[0] == 0x34          # e_phoff right after the header
    with pytest.raises(ElfError, match=message):
        ElfImage(damage(data))


def test_broken_section_headers_leave_symbols_out_not_the_load(guest_dir: Path) -> None:
    data = bytearray((guest_dir / "pctest.elf").read_bytes())
    struct.pack_into("<I", data, 32, len(data) + 0x1000)          # e_shoff past the end
    e = ElfImage(bytes(data))
    assert e.symbols() == {} and e.segments
