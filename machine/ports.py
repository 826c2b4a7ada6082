"""The port-I/O bus (0x0000-0xFFFF).

A flat table of 65536 slots gives O(1) dispatch from the IN/OUT hooks.
Unmapped ports read all-ones and ignore writes, as on a PC; the first access
to each unmapped port is logged (a guest probing for absent hardware is
normal, a typo in a port number is not).

Each mapped port keeps, besides its slot (device, base, name), the device's
``read``/``write`` with the port's offset already bound (``functools.partial``,
called from C): an access is one table look-up and one call into the device,
no offset arithmetic or tuple unpacking in Python.  A guest polling a status
register (LSR.THRE) makes tens of thousands of reads per second of run time.

Every port also has a *cost*: the virtual ns an IN or OUT on it takes beyond
the instruction's own time (the bus cycle; see ``MachineConfig.io_cost_ns``
for the PC's value and why).  The bus only keeps the table (``cost``); the
machine charges it to the clock when the CPU executes the access.  Accesses
that do not come from guest instructions (firmware set-up, the HAL, the
debugger) are not charged.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Protocol

__all__ = ["PortBus", "PortDevice"]


class PortDevice(Protocol):
    def read(self, offset: int, size: int) -> int: ...
    def write(self, offset: int, size: int, value: int) -> None: ...


class PortBus:
    def __init__(self, log: Callable[[str], None], cost_ns: int = 0) -> None:
        if cost_ns < 0:
            raise ValueError(f"an I/O port access cannot cost {cost_ns} ns")
        self._slots: list[tuple[PortDevice, int, str] | None] = [None] * 0x10000
        # device.read / device.write with the port's offset bound: reader(size), writer(size, value)
        self._readers: list[Callable[[int], int] | None] = [None] * 0x10000
        self._writers: list[Callable[[int, int], None] | None] = [None] * 0x10000
        self.cost: list[int] = [cost_ns] * 0x10000      # virtual ns per access, by port (unmapped too)
        self._log = log
        self._reported: set[int] = set()
        self.unmapped_reads = 0
        self.unmapped_writes = 0

    def map(self, base: int, count: int, device: PortDevice, name: str = "",
            cost_ns: int | None = None) -> None:
        """Map ``count`` ports from ``base``; ``cost_ns`` overrides the bus's access cost for them."""
        for port in range(base, base + count):
            if self._slots[port] is not None:
                raise ValueError(f"port {port:#x} is already mapped to {self._slots[port][2]}")
        if cost_ns is not None and cost_ns < 0:
            raise ValueError(f"an I/O port access cannot cost {cost_ns} ns")
        read, write = device.read, device.write
        for port in range(base, base + count):
            self._slots[port] = (device, base, name)
            self._readers[port] = partial(read, port - base)
            self._writers[port] = partial(write, port - base)
            if cost_ns is not None:
                self.cost[port] = cost_ns

    def read(self, port: int, size: int) -> int:
        reader = self._readers[port & 0xFFFF]
        if reader is None:
            self.unmapped_reads += 1
            self._note(port, "read")
            return (1 << (8 * size)) - 1
        return reader(size) & ((1 << (8 * size)) - 1)

    def write(self, port: int, size: int, value: int) -> None:
        writer = self._writers[port & 0xFFFF]
        if writer is None:
            self.unmapped_writes += 1
            self._note(port, "write")
            return
        writer(size, value & ((1 << (8 * size)) - 1))

    def name(self, port: int) -> str | None:
        slot = self._slots[port & 0xFFFF]
        return None if slot is None else slot[2]

    def mapped(self) -> list[tuple[int, int, str]]:
        """(first port, count, name) for every mapped range."""
        out: list[tuple[int, int, str]] = []
        for port, slot in enumerate(self._slots):
            if slot is None:
                continue
            if out and out[-1][2] == slot[2] and out[-1][0] + out[-1][1] == port:
                out[-1] = (out[-1][0], out[-1][1] + 1, slot[2])
            else:
                out.append((port, 1, slot[2]))
        return out

    def _note(self, port: int, kind: str) -> None:
        if port not in self._reported:
            self._reported.add(port)
            self._log(f"unmapped I/O port {port:#06x} {kind} (reads 0xff.., writes ignored)")
