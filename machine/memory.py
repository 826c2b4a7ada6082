"""Physical memory: guest RAM and the MMIO bus.

RAM is one anonymous ``mmap`` mapped into Unicorn with ``mem_map_ptr``, so
Python reads and writes it directly (no binding call) and the guest sees the
same bytes.  RAM starts at physical 0 and is contiguous; it must stay below the
MMIO window at 3 GiB (the IO-APIC at 0xFEC00000, the LAPIC at 0xFEE00000).

The MMIO bus maps device windows with Unicorn's ``mmio_map`` (the lookup is
done in C, per page); the Python side keeps a sorted table for the debugger's
physical accesses.  An access to a physical address that is neither RAM nor a
device window stops the CPU with a report (``CPU._hook_unmapped``): on a real
PC it would read all-ones, but a wild pointer is what users want to see.
"""
from __future__ import annotations

import bisect
import ctypes
import mmap
from typing import Callable, Protocol

from unicorn import UC_PROT_ALL, Uc

__all__ = ["RAM", "MmioBus", "MmioDevice", "MMIO_LIMIT", "PAGE"]

PAGE = 4096
MMIO_LIMIT = 0xC000_0000        # RAM must end below this (PCI/APIC hole)


class MmioDevice(Protocol):
    def read(self, offset: int, size: int) -> int: ...
    def write(self, offset: int, size: int, value: int) -> None: ...


class RAM:
    """Guest RAM at physical 0..size."""

    def __init__(self, uc: Uc, size: int) -> None:
        if size <= 0 or size % PAGE:
            raise ValueError(f"RAM size must be a positive multiple of 4 KiB, not {size}")
        if size > MMIO_LIMIT:
            raise ValueError(f"RAM size {size >> 20} MiB is above the 3 GiB limit of this machine")
        self.size = size
        self.buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.host_address = ctypes.addressof(ctypes.c_char.from_buffer(self.buf))
        self.view = memoryview(self.buf)
        uc.mem_map_ptr(0, size, UC_PROT_ALL, self.host_address)

    def contains(self, addr: int, size: int = 1) -> bool:
        return 0 <= addr and addr + size <= self.size

    def read(self, addr: int, size: int) -> bytes:
        if not self.contains(addr, size):
            raise IndexError(f"physical read {addr:#x}+{size} outside RAM")
        return self.buf[addr:addr + size]

    def write(self, addr: int, data: bytes) -> None:
        if not self.contains(addr, len(data)):
            raise IndexError(f"physical write {addr:#x}+{len(data)} outside RAM")
        self.buf[addr:addr + len(data)] = data

    def close(self) -> None:
        self.view.release()


class MmioBus:
    """Device windows in physical address space."""

    def __init__(self, map_window: Callable[[int, int, Callable, Callable], None]) -> None:
        # map_window(base, size, read(offset, size), write(offset, size, value)): CPU.map_mmio
        self._map_window = map_window
        self._bases: list[int] = []
        self._windows: list[tuple[int, int, MmioDevice, str]] = []

    def map(self, base: int, size: int, device: MmioDevice, name: str = "") -> None:
        if base % PAGE or size % PAGE:
            raise ValueError("MMIO windows are page aligned")
        i = bisect.bisect(self._bases, base)
        if (i > 0 and self._windows[i - 1][0] + self._windows[i - 1][1] > base) or \
                (i < len(self._bases) and base + size > self._bases[i]):
            raise ValueError(f"MMIO window {base:#x}+{size:#x} overlaps another")
        self._bases.insert(i, base)
        self._windows.insert(i, (base, size, device, name))
        self._map_window(base, size, device.read, device.write)

    def find(self, addr: int) -> tuple[int, MmioDevice, str] | None:
        i = bisect.bisect(self._bases, addr) - 1
        if i >= 0:
            base, size, dev, name = self._windows[i]
            if addr < base + size:
                return base, dev, name
        return None

    def windows(self) -> list[tuple[int, int, str]]:
        return [(b, s, n) for b, s, _, n in self._windows]
