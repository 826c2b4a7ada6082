"""Interrupt request lines.

An :class:`IrqLine` is a wire: a device drives its level, and every input
connected to it (a PIC pin, an IO-APIC pin, a LAPIC LINT pin) is told when the
level changes.  Devices are handed the line they drive; they never look for the
controller.  Edge-triggered inputs act on the rising edge; ``pulse()`` raises
and lowers the line at once (an ISA edge that lasts no virtual time).
"""
from __future__ import annotations

from typing import Callable

__all__ = ["IrqLine"]


class IrqLine:
    __slots__ = ("name", "level", "_sinks", "raised", "tracer")

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.level = False
        self._sinks: list[Callable[[bool], None]] = []
        self.raised = 0          # rising edges seen, for statistics and tests
        self.tracer = None       # a machine/trace.py Tracer, set by the machine that traces

    def connect(self, sink: Callable[[bool], None]) -> None:
        """Call ``sink(level)`` on every change of level."""
        self._sinks.append(sink)

    def set(self, level: bool) -> None:
        level = bool(level)
        if level == self.level:
            return
        self.level = level
        if level:
            self.raised += 1
        t = self.tracer
        if t is not None:
            t.irq_line(self.name, level)
        for sink in self._sinks:
            sink(level)

    def raise_(self) -> None:
        self.set(True)

    def lower(self) -> None:
        self.set(False)

    def pulse(self) -> None:
        self.set(True)
        self.set(False)
