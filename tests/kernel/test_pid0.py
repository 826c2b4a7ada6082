"""pid 0 on the machine: a vmk image boots, its containers run in ring 3 and talk over channels."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vmk.boot.vmkimage import read_image
from vmk.kernel.pid0 import VMKernel
from vmk.machine.pc import Machine, MachineConfig, Why
from vmk.testing.harness import SerialCapture
from vmk.tools.build import build

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="the demo programs are C (gcc needed)")


@pytest.fixture(scope="module")
def console_image(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("img") / "console.img"
    build(ROOT / "demo" / "console" / "console.toml", out)
    return out


def boot(image: Path, typed: bytes = b"", at: int = 1_000_000):
    com1 = SerialCapture()
    m = Machine(MachineConfig(serial=[com1]))
    k = VMKernel(m, read_image(image))
    if typed:
        m.clock.timer(lambda: m.uarts[0].receive(typed)).arm(at)
    return m, k, com1


def test_console_demo_answers_typed_commands(console_image: Path) -> None:
    m, k, com1 = boot(console_image, b"echo hello\rps\rspawn hello\rexit\r")
    r = k.run(until=5_000_000_000)
    out = com1.data.decode()
    assert r.why == Why.EXIT and r.exit_status == 0
    assert out.startswith("vmk console: type help\r\n> ")
    assert "> echo hello\r\nhello\r\n" in out
    assert "pid 1 fiber" in out
    assert "hello from a spawned container" in out and "exit code 7" in out
    assert out.endswith("> exit\r\nbye\r\n")
    assert k.containers[2].exit_code == 7


def test_two_runs_are_identical(console_image: Path) -> None:
    runs = []
    for _ in range(2):
        m, k, com1 = boot(console_image, b"ps\rexit\r")
        k.run(until=5_000_000_000)
        runs.append((bytes(com1.data), com1.times, m.instructions, m.now))
    assert runs[0] == runs[1]


def test_typed_faster_than_read_is_not_lost(console_image: Path) -> None:
    line = b"echo " + b"x" * 100 + b"\r"
    m, k, com1 = boot(console_image, line + b"exit\r")
    k.run(until=5_000_000_000)
    assert ("x" * 100 + "\r\n") in com1.data.decode()
    assert k.hal.rx.overflow == 0


def test_a_kernel_that_can_never_wake_again_says_what_its_fibers_wait_for(console_image: Path) -> None:
    """No more input will come and no timer is armed: the run ends (it does not idle
    for ever) with one line naming what the blocked fibers wait on."""
    m, k, com1 = boot(console_image, b"ps\r")
    r = k.run()
    assert r.why == Why.DEAD
    assert r.message.startswith("every fiber is blocked and nothing can wake one")
    assert "waiting on recv on channel 0" in r.message          # the shell, on console.rx
    assert com1.data.decode().endswith("> ")                     # it answered, then waited for a line
