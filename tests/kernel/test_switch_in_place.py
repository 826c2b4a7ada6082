"""pid 0's fiber switch inside the syscall hook (``VMKernel.switch_in_place``)
must be invisible: the same image gives the same output, the same virtual
times and the same instruction count as with every switch going round pid 0's
loop.  Checked on the pipeline demo (three containers, timers, an interrupt)
and on the console demo, under both scheduling policies."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from vmk.boot.vmkimage import Policy, read_image
from vmk.kernel.pid0 import VMKernel
from vmk.machine.pc import Machine, MachineConfig
from vmk.testing.harness import SerialCapture
from vmk.tools.build import build

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="the demo programs are C (gcc needed)")


def _run(img: Path, in_place: bool, policy: str | None, typed: bytes) -> tuple:
    image = read_image(img)
    if policy is not None:
        image = dataclasses.replace(image, kernel=dataclasses.replace(image.kernel, policy=Policy(policy)))
    com1 = SerialCapture()
    m = Machine(MachineConfig(serial=[com1]))
    k = VMKernel(m, image)
    switched = []
    real = k.switch_in_place

    def spy() -> bool:
        ok = in_place and real()
        switched.append(ok)
        return ok

    k.switch_in_place = spy
    m.clock.timer(lambda: m.uarts[0].receive(typed)).arm(30_000_000)
    r = k.run(until=400_000_000)
    return (r.why, r.message, com1.data, m.now, m.instructions), sum(switched)


@pytest.mark.parametrize("policy", ["global", "per-container"])
@pytest.mark.parametrize("demo, typed", [("pipeline", b"k"), ("console", b"echo hi\rps\r")])
def test_switching_in_the_hook_changes_nothing(tmp_path: Path, demo: str, typed: bytes, policy: str) -> None:
    img = tmp_path / f"{demo}.img"
    build(ROOT / "demo" / demo / f"{demo}.toml", img)
    fast, n_fast = _run(img, True, policy, typed)
    slow, n_slow = _run(img, False, policy, typed)
    assert n_slow == 0
    if demo == "pipeline":
        assert n_fast > 0                       # its containers hand the CPU to each other in the hook
    assert fast == slow
    assert fast[2]                              # the demo did print
