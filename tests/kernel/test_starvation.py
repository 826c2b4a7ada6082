"""Two busy containers cannot starve an interrupt-driven one: bounded wakeup latency.

Both scheduling policies run the same scenario."""
from __future__ import annotations

from pathlib import Path

import pytest

from vmk.boot.vmkimage import read_image
from vmk.kernel.pid0 import VMKernel
from vmk.machine.pc import Machine, MachineConfig
from vmk.testing.harness import SerialCapture
from vmk.testing.workloads import BUSY_S, ECHO_S, busy_and_echo_manifest
from vmk.tools.build import build

TIMESLICE = 1_000_000


def image(tmp: Path, policy: str) -> Path:
    (tmp / "busy.s").write_text(BUSY_S)
    (tmp / "echo.s").write_text(ECHO_S)
    (tmp / "img.toml").write_text(busy_and_echo_manifest(policy, TIMESLICE))
    build(tmp / "img.toml", tmp / f"img-{policy}.img")
    return tmp / f"img-{policy}.img"


@pytest.mark.parametrize("policy", ["global", "per-container"])
def test_busy_containers_do_not_starve_the_echo(tmp_path: Path, policy: str) -> None:
    com1 = SerialCapture()
    m = Machine(MachineConfig(serial=[com1]))
    k = VMKernel(m, read_image(image(tmp_path, policy)))
    typed_at = [5_000_000 + 7_000_000 * i for i in range(5)]
    for i, t in enumerate(typed_at):
        m.clock.timer(lambda i=i: m.uarts[0].receive(bytes([0x61 + i]))).arm(t)
    k.run(until=45_000_000)
    assert com1.data.decode() == "abcde"
    # A byte takes one character time to arrive and one to leave at 115200 baud (~87 us each);
    # the echo must get the CPU within a few time slices even though two containers never block.
    latencies = [out - t for out, t in zip(com1.times, typed_at)]
    assert all(lat < 3 * TIMESLICE for lat in latencies), latencies
    # and the busy containers did run (they were preempted, not stopped)
    assert k.containers[1].exit_code is None and k.containers[2].exit_code is None
