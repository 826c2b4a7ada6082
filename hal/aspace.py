"""Container address spaces: physical frames and 4-level page tables.

How it works
------------
The HAL owns all guest RAM above ``KERNEL_RESERVED`` (the low megabytes hold
the boot data).  A :class:`FrameAllocator` hands out 4 KiB frames; each
:class:`AddressSpace` gets its own PML4 and maps only *user* pages (U/S=1)
in the low canonical half:

    0x0040_0000 ...            program code and data (from the image)
    ... 0x7FFF_F000            the stack, growing down

Nothing of the kernel is mapped: pid 0 is Python, it needs no guest mapping,
so a container cannot even name another container's memory or a page table.
Switching containers is a CR3 write (which also flushes Unicorn's TLB).

Pages carry the permissions of what they hold (W^X): program segments as
their ELF flags say (text r-x, rodata r--, data rw-), the stack and the heap
rw- and never executable.  Non-executable is the NX bit (63) of the PTE,
which the CPU honours because the HAL sets EFER.NXE (``enter_user_mode``;
Unicorn 2.1.4 enforces it on instruction fetch: #PF with error code
P|U|I/D = 0x15, measured, tests/kernel/test_hardening_hw.py).  The kernel's
own loading writes go around the permissions (``write(force=True)``).

Every page a space maps is also kept in a dict (virtual page -> frame,
writable), so the kernel checks a syscall's pointer arguments and copies
message bytes without walking the tables: ``check``/``read``/``write`` raise
:class:`UserFault` for anything outside the container.

Invariants: a frame belongs to at most one space; ``used`` (the pages the
container can touch) never exceeds the space's ``limit``, which is the
``memory`` of its image entry; its page-table frames are kernel memory, kept
in ``tables`` and not counted; ``destroy()`` returns every frame.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

__all__ = ["FrameAllocator", "AddressSpace", "UserFault", "OutOfMemory", "PAGE",
           "USER_CODE_BASE", "USER_STACK_TOP", "USER_LIMIT", "KERNEL_RESERVED"]

PAGE = 4096
USER_CODE_BASE = 0x0040_0000
USER_STACK_TOP = 0x7FFF_F000
USER_LIMIT = 0x0000_8000_0000_0000           # first non-canonical address of the low half
KERNEL_RESERVED = 0x0020_0000                # physical RAM below this is not handed out

_P, _W, _U = 1, 2, 4
_NX = 1 << 63                                # execute disable (SDM vol. 3 §4.5, with EFER.NXE)
_ADDR = 0x000F_FFFF_FFFF_F000
_PAGE_MASK = ~(PAGE - 1)


class UserFault(Exception):
    """A container pointer that does not lead to its own memory (-EFAULT)."""


class OutOfMemory(Exception):
    """The container's memory limit (or the machine's RAM) is exhausted."""


class FrameAllocator:
    """4 KiB physical frames in [start, end): a free list, lowest address first."""

    def __init__(self, ram, start: int, end: int) -> None:
        self.ram = ram
        self._next = (start + PAGE - 1) & ~(PAGE - 1)
        self._end = end & ~(PAGE - 1)
        self._free: list[int] = []
        self.in_use = 0
        # Called after code is written into a space: Unicorn keeps translated
        # blocks until told (the HAL passes the CPU's translation flush).
        self.on_code_write = None

    def alloc(self) -> int:
        if self._free:
            frame = self._free.pop()
        elif self._next < self._end:
            frame = self._next
            self._next += PAGE
        else:
            raise OutOfMemory("out of physical memory")
        self.ram.buf[frame:frame + PAGE] = bytes(PAGE)
        self.in_use += 1
        return frame

    def free(self, frame: int) -> None:
        self._free.append(frame)
        self.in_use -= 1

    @property
    def available(self) -> int:
        return len(self._free) + (self._end - self._next) // PAGE


@dataclass(slots=True)
class AddressSpace:
    """One container's page tables and the pages they map."""
    frames: FrameAllocator
    limit: int                                        # bytes of RAM this space may use
    pml4: int = 0
    pages: dict[int, tuple[int, bool]] = field(default_factory=dict)     # vpage -> (frame, writable)
    _tables: list[int] = field(default_factory=list)
    used: int = 0
    # A range mapped on first touch (the heap): a page fault or a kernel access
    # there maps a zeroed page, up to the limit.
    demand: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        self.pml4 = self.frames.alloc()
        self._tables.append(self.pml4)

    @property
    def cr3(self) -> int:
        return self.pml4

    # -- building
    def _take_frame(self) -> int:
        if self.used + PAGE > self.limit:
            raise OutOfMemory(f"container memory limit of {self.limit // 1024} KiB reached")
        frame = self.frames.alloc()
        self.used += PAGE
        return frame

    def map(self, va: int, size: int, writable: bool = True, executable: bool = False) -> None:
        """Back [va, va+size) with fresh zeroed frames (user pages; only code is ``executable``)."""
        if va % PAGE or va < PAGE or va + size > USER_LIMIT:
            raise ValueError(f"cannot map {va:#x}+{size:#x}: outside the user half or unaligned")
        for page in range(va, va + size, PAGE):
            if page in self.pages:
                continue
            frame = self._take_frame()
            self._set_pte(page, frame, writable, executable)
            self.pages[page] = (frame, writable)

    def _set_pte(self, va: int, frame: int, writable: bool, executable: bool) -> None:
        buf = self.frames.ram.buf
        table = self.pml4
        for shift in (39, 30, 21):
            slot = table + ((va >> shift) & 0x1FF) * 8
            entry = struct.unpack_from("<Q", buf, slot)[0]
            if not entry & _P:
                new = self.frames.alloc()
                self._tables.append(new)
                entry = new | _P | _W | _U
                struct.pack_into("<Q", buf, slot, entry)
            table = entry & _ADDR
        slot = table + ((va >> 12) & 0x1FF) * 8
        struct.pack_into("<Q", buf, slot, frame | _P | _U | (_W if writable else 0) | (0 if executable else _NX))

    def fault_in(self, va: int) -> bool:
        """Map the page of ``va`` (rw-, never executable) if it lies in the demand range
        (raises OutOfMemory at the limit)."""
        page = va & ~(PAGE - 1)
        if page in self.pages or not self.demand[0] <= page < self.demand[1]:
            return False
        self.map(page, PAGE)
        return True

    def destroy(self) -> None:
        for frame, _ in self.pages.values():
            self.frames.free(frame)
        for frame in self._tables:
            self.frames.free(frame)
        self.pages.clear()
        self._tables.clear()
        self.used = 0

    # -- access from the kernel (syscall arguments, message copies)
    def check(self, va: int, size: int, write: bool = False) -> None:
        """Raise UserFault unless [va, va+size) is mapped in this space (and writable if asked)."""
        got = self.pages.get(va & _PAGE_MASK)
        if got is not None and 0 <= size <= PAGE - (va & (PAGE - 1)) and (got[1] or not write):
            return                              # one mapped page: the common case of every syscall
        if size < 0 or va < 0 or va + size > USER_LIMIT:
            raise UserFault(f"bad user range {va:#x}+{size:#x}")
        page = va & ~(PAGE - 1)
        while page < va + size:
            got = self.pages.get(page)
            if got is None and self.demand[0] <= page < self.demand[1]:
                self.map(page, PAGE)
                got = self.pages[page]
            if got is None or (write and not got[1]):
                raise UserFault(f"address {max(page, va):#x} is not {'writable' if write else 'mapped'}")
            page += PAGE

    def read(self, va: int, size: int) -> bytes:
        off = va & (PAGE - 1)
        got = self.pages.get(va - off)
        if got is not None and 0 <= size <= PAGE - off:
            at = got[0] + off
            return bytes(self.frames.ram.buf[at:at + size])
        self.check(va, size)
        buf = self.frames.ram.buf
        out = bytearray()
        while size:
            frame, _ = self.pages[va & ~(PAGE - 1)]
            off = va & (PAGE - 1)
            n = min(size, PAGE - off)
            out += buf[frame + off:frame + off + n]
            va += n
            size -= n
        return bytes(out)

    def write(self, va: int, data: bytes, force: bool = False) -> None:
        """Copy into the container (``force`` also writes read-only pages: loading code)."""
        off = va & (PAGE - 1)
        got = self.pages.get(va - off)
        if got is not None and got[1] and not force and len(data) <= PAGE - off:
            at = got[0] + off
            self.frames.ram.buf[at:at + len(data)] = data
            return
        self.check(va, len(data), write=not force)
        buf = self.frames.ram.buf
        pos = 0
        while pos < len(data):
            frame, _ = self.pages[(va + pos) & ~(PAGE - 1)]
            off = (va + pos) & (PAGE - 1)
            n = min(len(data) - pos, PAGE - off)
            buf[frame + off:frame + off + n] = data[pos:pos + n]
            pos += n
        if force and self.frames.on_code_write is not None:
            self.frames.on_code_write()
