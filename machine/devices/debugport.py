"""QEMU's two debug ports: isa-debug-exit and the 0xE9 debug console.

* ``DebugExit`` (``-device isa-debug-exit,iobase=0xf4,iosize=0x04``): a write
  of ``value`` ends the emulator with exit status ``(value << 1) | 1``, so a
  guest can never exit 0 through it (QEMU's convention; tests map "success"
  to an agreed odd status).  Reads return all-ones.
* ``DebugCon`` (``-debugcon``, port 0xE9): every byte written goes to a
  character back end; reading the port returns 0xE9, which is how guests
  (Bochs, QEMU, Loko) detect that it is present.
"""
from __future__ import annotations

from typing import Callable

from . import Log, nolog

__all__ = ["DebugExit", "DebugCon", "DEBUGCON_READBACK"]

DEBUGCON_READBACK = 0xE9


class DebugExit:
    def __init__(self, on_exit: Callable[[int], None], log: Log = nolog) -> None:
        self._on_exit = on_exit
        self.log = log

    def reset(self) -> None:
        return None

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        self._on_exit(((value << 1) | 1) & 0xFF)

    def snapshot(self) -> dict:
        return {}

    def restore(self, state: dict) -> None:
        return None


class DebugCon:
    def __init__(self, out: Callable[[bytes], None], log: Log = nolog) -> None:
        self._out = out
        self.log = log

    def reset(self) -> None:
        return None

    def read(self, offset: int, size: int) -> int:
        return DEBUGCON_READBACK

    def write(self, offset: int, size: int, value: int) -> None:
        self._out(bytes([value & 0xFF]))

    def snapshot(self) -> dict:
        return {}

    def restore(self, state: dict) -> None:
        return None
