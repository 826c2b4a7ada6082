"""System Control Port A (I/O 0x92, "fast A20 and reset", PS/2 and later PCs).

IBM PS/2 Hardware Interface Technical Reference, "System Control Port A":
bit 0 (alternate hot reset) resets the CPU on a 0 to 1 transition, bit 1
(alternate gate A20) gates address line 20; the other bits are stored (bit 3
is the power-on password lock, bits 6-7 the fixed disk activity lights).  The
register reads back what was written.  A reset goes to the ``reset``
callback, as QEMU's ``port92``.  Power-on value 0x02 (A20 enabled), as QEMU
shows after SeaBIOS.

Not modelled: A20 masking (bit 1 is stored; the CPU always sees A20).
"""
from __future__ import annotations

from typing import Callable

from vmk.machine.devices import Log, nolog

__all__ = ["Port92", "FAST_RESET", "FAST_A20"]

FAST_RESET = 0x01
FAST_A20 = 0x02
POWER_ON = FAST_A20


class Port92:
    def __init__(self, reset: Callable[[str], None], log: Log = nolog) -> None:
        self._reset_request = reset
        self.log = log
        self.reset()

    def reset(self) -> None:
        self.value = POWER_ON

    def read(self, offset: int, size: int) -> int:
        return self.value

    def write(self, offset: int, size: int, value: int) -> None:
        old, self.value = self.value, value & 0xFF
        if not value & FAST_A20:
            self.log("A20 masking (port 0x92 bit 1 = 0) is not modelled")
        if value & FAST_RESET and not old & FAST_RESET:
            self._reset_request("port 0x92 fast reset")

    def snapshot(self) -> dict:
        return {"value": self.value}

    def restore(self, state: dict) -> None:
        self.value = state["value"]
