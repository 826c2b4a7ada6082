"""pytest plugin: the ``vmk`` fixture (registered through the ``pytest11`` entry point).

    def test_echo(vmk):
        h = vmk.boot("kernel.elf")
        h.serial().write("hi\\r", at=1_000_000)
        assert h.serial().wait_line(timeout=10_000_000) == "hi"
"""
from __future__ import annotations

import pytest

from .harness import Harness


class _Factory:
    def __init__(self) -> None:
        self.made: list[Harness] = []

    def boot(self, path: str, **kw) -> Harness:
        """:meth:`Harness.boot`."""
        h = Harness.boot(path, **kw)
        self.made.append(h)
        return h

    def from_asm(self, source: str, **kw) -> Harness:
        """:meth:`Harness.from_asm`."""
        h = Harness.from_asm(source, **kw)
        self.made.append(h)
        return h

    asm = from_asm                      # the short spelling


@pytest.fixture
def vmk():
    """Build machines under test: ``vmk.boot(path)``, ``vmk.from_asm(source)`` (or ``vmk.asm(source)``),
    the same as :meth:`Harness.boot` and :meth:`Harness.from_asm`; ``vmk.made`` lists them."""
    return _Factory()
