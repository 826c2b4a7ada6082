"""Physical memory: guest RAM and the MMIO bus.

RAM is one anonymous ``mmap`` mapped into Unicorn with ``mem_map_ptr``, so
Python reads and writes it directly (no binding call) and the guest sees the
same bytes.  RAM starts at physical 0 and is contiguous; it must stay below the
MMIO window at 3 GiB (the IO-APIC at 0xFEC00000, the LAPIC at 0xFEE00000).

The MMIO bus maps device windows with Unicorn's ``mmio_map`` (the lookup is
done in C, per page); the Python side keeps a sorted table for the debugger's
physical accesses.  An access to a physical address that is neither RAM nor a
device window reads 0 and drops the store, as on QEMU 7.2, reported once
per 2 MiB (``CPU._hook_unmapped``; real kernels such as xv6 touch RAM they
assume is there); ``MachineConfig.unassigned_ok=False`` makes it stop the
CPU with a report instead, for hunting wild pointers.

A window may have an access *cost* (``cost_ns``): virtual ns each guest load
or store to it takes beyond the instruction's own time, charged to the clock
(``charge``) after the device has answered, as port I/O is (``ports.py``).
The default is 0: the local APIC sits in the core, and vmk does not model
the chipset's uncached-access latency unless asked (``MachineConfig.mmio_cost_ns``).
A window without a cost calls the device directly: no extra Python frame.
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

    def __init__(self, map_window: Callable[[int, int, Callable, Callable], None],
                 charge: Callable[[int], None] | None = None) -> None:
        # map_window(base, size, read(offset, size), write(offset, size, value)): CPU.map_mmio
        # charge(ns): Clock.charge, for windows with an access cost
        self._map_window = map_window
        self._charge = charge
        self._bases: list[int] = []
        self._windows: list[tuple[int, int, MmioDevice, str]] = []

    def map(self, base: int, size: int, device: MmioDevice, name: str = "", cost_ns: int = 0) -> None:
        if base % PAGE or size % PAGE:
            raise ValueError("MMIO windows are page aligned")
        if cost_ns < 0:
            raise ValueError(f"an MMIO access cannot cost {cost_ns} ns")
        if cost_ns and self._charge is None:
            raise ValueError("an MMIO access cost needs a clock to charge")
        i = bisect.bisect(self._bases, base)
        if (i > 0 and self._windows[i - 1][0] + self._windows[i - 1][1] > base) or \
                (i < len(self._bases) and base + size > self._bases[i]):
            raise ValueError(f"MMIO window {base:#x}+{size:#x} overlaps another")
        self._bases.insert(i, base)
        self._windows.insert(i, (base, size, device, name))
        read, write = device.read, device.write
        if cost_ns:
            read, write = _charged(read, write, self._charge, cost_ns)  # type: ignore[arg-type]
        self._map_window(base, size, read, write)

    def find(self, addr: int) -> tuple[int, MmioDevice, str] | None:
        i = bisect.bisect(self._bases, addr) - 1
        if i >= 0:
            base, size, dev, name = self._windows[i]
            if addr < base + size:
                return base, dev, name
        return None

    def windows(self) -> list[tuple[int, int, str]]:
        return [(b, s, n) for b, s, _, n in self._windows]


def _charged(read: Callable[[int, int], int], write: Callable[[int, int, int], None],
             charge: Callable[[int], None], cost_ns: int) -> tuple[Callable, Callable]:
    """A device's read/write that charge ``cost_ns`` after each access (the CPU's view only)."""
    def charged_read(offset: int, size: int) -> int:
        value = read(offset, size)
        charge(cost_ns)
        return value

    def charged_write(offset: int, size: int, value: int) -> None:
        write(offset, size, value)
        charge(cost_ns)
    return charged_read, charged_write
