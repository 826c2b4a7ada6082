"""Device models of the emulated PC.

Every device has the same shape (see STYLE.md, rule 5):

* constructor arguments: the :class:`~vmk.machine.clock.Clock` if it keeps
  time, the :class:`~vmk.machine.irq.IrqLine` (or callables) it drives, and a
  ``log`` callable for guest errors and unmodelled features.  A device never
  looks for another device; the machine wires them (``vmk.machine.pc``).
* ``reset()``: the power-on state from the datasheet.
* ``read(offset, size) -> int`` / ``write(offset, size, value)``: register
  access, ``offset`` relative to the device's window on the port or MMIO bus.
* ``_update_irq()``: the one place that derives the interrupt line from state.
* ``snapshot() -> dict`` / ``restore(dict)``: plain data (ints, lists, bytes,
  str); ``restore`` re-arms the device's timers.
"""
from __future__ import annotations

from typing import Callable

__all__ = ["Log", "nolog"]

Log = Callable[[str], None]


def nolog(msg: str) -> None:
    """The default device log: drop the message."""
    return None
