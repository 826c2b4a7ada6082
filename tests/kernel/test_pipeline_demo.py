"""The pipeline demo: timer-driven ticker -> interrupt-driven mixer (CML sync) -> printer."""
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


def test_pipeline_passes_timer_and_keyboard_events_in_order(tmp_path: Path) -> None:
    img = tmp_path / "pipeline.img"
    build(ROOT / "demo" / "pipeline" / "pipeline.toml", img)
    com1 = SerialCapture()
    m = Machine(MachineConfig(serial=[com1]))
    k = VMKernel(m, read_image(img))
    m.clock.timer(lambda: m.uarts[0].receive(b"k")).arm(30_000_000)      # between tick 1 and tick 2
    r = k.run(until=1_000_000_000)
    assert r.why == Why.EXIT
    assert com1.data.decode().splitlines() == [
        "[20 ms] tick 1", "[30 ms] key k", "[40 ms] tick 2", "[60 ms] tick 3", "[80 ms] tick 4",
        "[100 ms] tick 5", "[100 ms] done"]
    assert all(c.exit_code == 0 for c in k.containers.values())
