"""--idle realtime: while the CPU idles, virtual time follows the host clock, also when no timer is
armed and the guest waits for console input (the console demo at its prompt).  The host clock and
select() are fakes: no real sleeps."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

import vmk.machine.pc as pc
from vmk.boot.vmkimage import read_image
from vmk.kernel.pid0 import VMKernel
from vmk.machine.chardev import CharDev
from vmk.machine.pc import Machine, MachineConfig, Why
from vmk.tools.build import build

ROOT = Path(__file__).resolve().parent.parent.parent
FAKE_FD = 1_000_000                     # never a real descriptor: only the fake select() sees it


class Keyboard(CharDev):
    """A terminal on a fake host clock that moves only when the machine waits (select, sleep):
    ``text`` is typed ``typed_after`` host seconds in; the output is recorded with its virtual times."""

    def __init__(self, typed_after: float, text: bytes) -> None:
        super().__init__()
        self.now = 1000.0
        self.typed_at = self.now + typed_after
        self.text, self.out = text, bytearray()
        self.times: list[int] = []

    # the host, as vmk.machine.pc sees it
    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def select(self, rlist, wlist, xlist, timeout=None):
        assert timeout is not None, "the machine never blocks without a timeout"
        if not self._typed():
            self.now = min(self.now + timeout, self.typed_at)
        return ([FAKE_FD] if FAKE_FD in rlist and self._typed() else []), [], []

    def _typed(self) -> bool:
        return self.now >= self.typed_at and bool(self.text)

    # the character device
    def fileno(self) -> int:
        return FAKE_FD

    def read_available(self) -> bytes:
        if not self._typed():
            return b""
        data, self.text = self.text, b""
        return data

    def write(self, data: bytes, time_ns: int) -> None:
        self.out += data
        self.times += [time_ns] * len(data)


@pytest.fixture(scope="module")
def console_image(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("img") / "console.img"
    build(ROOT / "demo" / "console" / "console.toml", out)
    return out


def _at_the_prompt(console_image: Path, monkeypatch, realtime: bool, wait_s: float) -> int:
    """Boot the console demo, type 'exit' after ``wait_s`` host seconds: the virtual time of its echo."""
    kbd = Keyboard(wait_s, b"exit\r")
    monkeypatch.setattr(pc, "time", SimpleNamespace(monotonic=kbd.monotonic, sleep=kbd.sleep))
    monkeypatch.setattr(pc, "select", SimpleNamespace(select=kbd.select))
    m = Machine(MachineConfig(serial=[kbd], realtime_idle=realtime))
    r = VMKernel(m, read_image(console_image)).run(until=None)
    assert r.why == Why.EXIT and r.exit_status == 0
    assert kbd.out.endswith(b"> exit\r\nbye\r\n")
    return kbd.times[kbd.out.index(b"exit")]


def test_virtual_time_follows_the_host_clock_at_the_prompt(console_image: Path, monkeypatch) -> None:
    """Six minutes at the prompt are six minutes of virtual time (they were 649 ms)."""
    echoed = _at_the_prompt(console_image, monkeypatch, realtime=True, wait_s=360.0)
    assert 360_000_000_000 <= echoed < 360_000_000_000 + 100_000_000


def test_idle_skip_does_not_follow_the_host(console_image: Path, monkeypatch) -> None:
    """--idle skip: the same wait costs no virtual time (input is taken as soon as it comes)."""
    echoed = _at_the_prompt(console_image, monkeypatch, realtime=False, wait_s=360.0)
    assert echoed < 100_000_000
