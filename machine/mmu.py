"""Linear-to-physical translation, done the way the CPU does it.

Used wherever Python must touch guest memory by linear address: pushing an
interrupt frame, reading the IDT/GDT/TSS, the debugger, syscall pointer
checks.  It walks the guest's page tables in RAM (4-level long mode, 3-level
PAE, 2-level 32-bit with 4 MiB pages), checks present/write/user permissions
as the SDM says (vol. 3, §4.6), sets Accessed/Dirty bits, and raises
:class:`PageFault` with the architectural error code.

Not modelled: protection keys, SMAP/SMEP, 5-level paging, PCID, caching of
translations (every walk reads the tables; Unicorn has its own TLB).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["PageFault", "Paging", "PFEC", "translate"]

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


class PFEC:
    """#PF error-code bits (SDM vol. 3, §4.7)."""
    P = 1 << 0        # the fault was a protection violation (page present)
    W = 1 << 1        # write access
    U = 1 << 2        # user-mode access
    RSVD = 1 << 3
    I = 1 << 4        # instruction fetch  # noqa: E741


class PageFault(Exception):
    def __init__(self, linear: int, error_code: int) -> None:
        super().__init__(f"#PF at {linear:#x} ec={error_code:#x}")
        self.linear = linear
        self.error_code = error_code


CR0_PE = 1 << 0
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5

PTE_P = 1 << 0
PTE_W = 1 << 1
PTE_U = 1 << 2
PTE_A = 1 << 5
PTE_D = 1 << 6
PTE_PS = 1 << 7
_ADDR52 = 0x000F_FFFF_FFFF_F000


@dataclass(slots=True)
class Paging:
    """The control-register state a walk depends on."""
    cr0: int
    cr3: int
    cr4: int
    lma: bool

    @property
    def enabled(self) -> bool:
        return bool(self.cr0 & CR0_PG)


def translate(buf, ram_size: int, pg: Paging, linear: int, write: bool = False, user: bool = False,
              set_ad: bool = True, fetch: bool = False) -> int:
    """Translate ``linear`` to a physical address or raise :class:`PageFault`.

    ``buf`` is the RAM buffer (page tables outside RAM read as not present).
    """
    if pg.lma and not user and not fetch:
        pa = _fast_long_mode(buf, ram_size, pg, linear, write, set_ad)
        if pa >= 0:
            return pa
    if not (pg.cr0 & CR0_PG):
        return linear & 0xFFFF_FFFF if not pg.lma else linear
    ec_base = (PFEC.W if write else 0) | (PFEC.U if user else 0) | (PFEC.I if fetch else 0)
    wp = bool(pg.cr0 & CR0_WP)
    if pg.lma:
        levels = ((39, 0x1FF), (30, 0x1FF), (21, 0x1FF), (12, 0x1FF))
        table = pg.cr3 & _ADDR52
        entry_size = 8
        # Canonical check is #GP, not #PF: callers check canonicality.
    elif pg.cr4 & CR4_PAE:
        pdpt = pg.cr3 & 0xFFFF_FFE0
        idx = (linear >> 30) & 3
        e = _read_entry(buf, ram_size, pdpt + idx * 8, 8)
        if not e & PTE_P:
            raise PageFault(linear, ec_base)
        table = e & _ADDR52
        levels = ((21, 0x1FF), (12, 0x1FF))
        entry_size = 8
        linear &= 0xFFFF_FFFF
    else:
        table = pg.cr3 & 0xFFFF_F000
        levels = ((22, 0x3FF), (12, 0x3FF))
        entry_size = 4
        linear &= 0xFFFF_FFFF

    writable = True
    usr = True
    nx = False                 # XD (bit 63) on the path: only set where EFER.NXE allows it
    touched: list[int] = []
    last = len(levels) - 1
    for depth, (shift, mask) in enumerate(levels):
        addr = table + ((linear >> shift) & mask) * entry_size
        e = _read_entry(buf, ram_size, addr, entry_size)
        if not e & PTE_P:
            raise PageFault(linear, ec_base)
        writable = writable and bool(e & PTE_W)
        usr = usr and bool(e & PTE_U)
        nx = nx or (entry_size == 8 and bool(e >> 63))
        touched.append(addr)
        large = False
        if depth < last and e & PTE_PS:
            if pg.lma:
                large = depth > 0            # 1 GiB (PDPTE) or 2 MiB (PDE); PS is reserved in a PML4E
            elif entry_size == 8:
                large = True                 # PAE 2 MiB page
            else:
                large = bool(pg.cr4 & CR4_PSE)   # 32-bit 4 MiB page
        if depth == last or large:
            if user and not usr:
                raise PageFault(linear, ec_base | PFEC.P)
            if write and not writable and (user or wp):
                raise PageFault(linear, ec_base | PFEC.P)
            if fetch and nx:
                raise PageFault(linear, ec_base | PFEC.P)
            if entry_size == 4 and large:
                frame = (e & 0xFFC0_0000) | ((e >> 13) & 0xFF) << 32
                off = linear & 0x3F_FFFF
            elif large:
                size = 1 << shift
                frame = e & _ADDR52 & ~(size - 1)
                off = linear & (size - 1)
            else:
                frame = e & (_ADDR52 if entry_size == 8 else 0xFFFF_F000)
                off = linear & 0xFFF
            if set_ad:
                _set_bits(buf, ram_size, touched, entry_size, PTE_A, PTE_D if write else 0)
            return frame | off
        table = e & (_ADDR52 if entry_size == 8 else 0xFFFF_F000)
    raise AssertionError("unreachable")


def _fast_long_mode(buf, ram_size: int, pg: Paging, linear: int, write: bool, set_ad: bool) -> int:
    """The common case, straight-line: a supervisor access in 4-level paging
    whose entries are present, writable when needed, with A (and D) already
    set.  Anything else returns -1 and takes the general walk."""
    unpack = _U64.unpack_from
    limit = ram_size - 8
    need = PTE_P | PTE_A | (PTE_W if write else 0)
    a = (pg.cr3 & _ADDR52) | ((linear >> 36) & 0xFF8)
    if a > limit:
        return -1
    e = unpack(buf, a)[0]
    if e & need != need:
        return -1
    a = (e & _ADDR52) | ((linear >> 27) & 0xFF8)
    if a > limit:
        return -1
    e = unpack(buf, a)[0]
    if e & need != need:
        return -1
    if e & PTE_PS:
        return -1
    a = (e & _ADDR52) | ((linear >> 18) & 0xFF8)
    if a > limit:
        return -1
    e = unpack(buf, a)[0]
    if e & need != need:
        return -1
    leaf_need = need | (PTE_D if write and set_ad else 0)
    if e & PTE_PS:
        if e & leaf_need != leaf_need:
            return -1
        return (e & _ADDR52 & ~0x1F_FFFF) | (linear & 0x1F_FFFF)
    a = (e & _ADDR52) | ((linear >> 9) & 0xFF8)
    if a > limit:
        return -1
    e = unpack(buf, a)[0]
    if e & leaf_need != leaf_need:
        return -1
    return (e & _ADDR52) | (linear & 0xFFF)


def _read_entry(buf, ram_size: int, addr: int, size: int) -> int:
    if addr + size > ram_size:
        return 0
    return (_U64 if size == 8 else _U32).unpack_from(buf, addr)[0]


def _set_bits(buf, ram_size: int, addrs: list[int], size: int, a: int, d: int) -> None:
    fmt = _U64 if size == 8 else _U32
    for i, addr in enumerate(addrs):
        e = fmt.unpack_from(buf, addr)[0]
        new = e | a | (d if i == len(addrs) - 1 else 0)
        if new != e:
            fmt.pack_into(buf, addr, new)

