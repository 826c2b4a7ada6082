"""The little of ELF the loader reads: the file header, the program headers
and the symbol tables (System V gABI, "ELF-64 Object File Format" 1.5 and the
ELF32 TIS spec).  pyelftools does all of it and more, but importing it costs
about 30 ms, a sixth of a whole ``vmk boot`` of a small kernel; the image
builder (tools/build.py) keeps using it.

Malformed input raises :class:`ElfError` with a message saying what is wrong.
"""
from __future__ import annotations

import struct

__all__ = ["ElfError", "ElfImage", "PT_LOAD", "PF_X", "EM_X86_64", "EM_386"]

PT_LOAD = 1
PF_X = 1
EM_386 = 3
EM_X86_64 = 62
SHT_SYMTAB, SHT_DYNSYM = 2, 11
STT_NOTYPE, STT_OBJECT, STT_FUNC = 0, 1, 2
SHN_UNDEF = 0

# (header after e_ident, program header, section header, symbol) layouts by class
_LAYOUT = {
    1: ("<HHIIIIIHHHHHH", "<IIIIIIII", "<IIIIIIIIII", "<IIIBBH"),
    2: ("<HHIQQQIHHHHHH", "<IIQQQQQQ", "<IIQQQQIIQQ", "<IBBHQQ"),
}


class ElfError(ValueError):
    pass


class ElfImage:
    """A parsed ELF file: ``elfclass`` (32/64), ``machine`` (e_machine),
    ``entry``, ``segments`` (program headers as dicts with the gABI field
    names), and :meth:`symbols`."""

    def __init__(self, data: bytes) -> None:
        if len(data) < 16 or data[:4] != b"\x7fELF":
            raise ElfError("no ELF magic")
        cls, order = data[4], data[5]
        if cls not in _LAYOUT:
            raise ElfError(f"unknown ELF class {cls}")
        if order != 1:
            raise ElfError("big-endian ELF (x86 is little-endian)")
        self._data = data
        self._ehdr, self._phdr, self._shdr, self._sym = (struct.Struct(f) for f in _LAYOUT[cls])
        self.elfclass = 32 if cls == 1 else 64
        h = self._unpack(self._ehdr, 16, "the ELF header")
        (_, self.machine, _, self.entry, phoff, self._shoff, _, _, phentsize, phnum,
         self._shentsize, self._shnum, _) = h
        if phnum and phentsize < self._phdr.size:
            raise ElfError(f"program header entries of {phentsize} bytes (at least {self._phdr.size})")
        self.segments = []
        for i in range(phnum):
            f = self._unpack(self._phdr, phoff + i * phentsize, f"program header {i}")
            if self.elfclass == 32:
                p_type, off, vaddr, paddr, filesz, memsz, flags, align = f
            else:
                p_type, flags, off, vaddr, paddr, filesz, memsz, align = f
            self.segments.append({"p_type": p_type, "p_flags": flags, "p_offset": off, "p_vaddr": vaddr,
                                  "p_paddr": paddr, "p_filesz": filesz, "p_memsz": memsz, "p_align": align})

    def _unpack(self, s: struct.Struct, off: int, what: str) -> tuple:
        if off < 0 or off + s.size > len(self._data):
            raise ElfError(f"{what} at offset {off:#x} runs past the end of the file ({len(self._data):#x} bytes)")
        return s.unpack_from(self._data, off)

    def _sections(self) -> list[tuple]:
        if not self._shoff or self._shentsize < self._shdr.size:
            return []
        return [self._unpack(self._shdr, self._shoff + i * self._shentsize, f"section header {i}")
                for i in range(self._shnum)]

    def symbols(self) -> dict[str, int]:
        """Defined function, object and untyped symbols, name -> value (the first
        of a name wins); what cannot be read is left out."""
        out: dict[str, int] = {}
        try:
            secs = self._sections()
        except ElfError:
            return out
        for sec in secs:
            sh_type, off, size, link, entsize = sec[1], sec[4], sec[5], sec[6], sec[9]
            if sh_type not in (SHT_SYMTAB, SHT_DYNSYM) or not 0 <= link < len(secs):
                continue
            stroff, strsize = secs[link][4], secs[link][5]
            strtab = self._data[stroff:stroff + strsize]
            step = entsize or self._sym.size
            if step < self._sym.size:
                continue
            for at in range(off, min(off + size, len(self._data) - self._sym.size + 1), step):
                f = self._sym.unpack_from(self._data, at)
                if self.elfclass == 32:
                    name, value, _, info, _, shndx = f
                else:
                    name, info, _, shndx, value, _ = f
                if not name or shndx == SHN_UNDEF or info & 0xF not in (STT_NOTYPE, STT_OBJECT, STT_FUNC):
                    continue
                end = strtab.find(b"\0", name)
                if end < 0:
                    continue
                out.setdefault(strtab[name:end].decode("latin-1"), value)
        return out
