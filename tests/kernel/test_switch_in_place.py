"""pid 0's fast paths must be invisible: the same image gives the same output,
the same virtual times and the same instruction count with each of them off:

* the fiber switch inside the syscall hook (``VMKernel.switch_in_place``)
  against every switch going round pid 0's loop;
* a plain send/recv parked as a ``_Parked`` (``VMKernel.plain_park``) against
  the generic one-arm sync;
* the lazily reprogrammed LAPIC one-shot (``Hal.lazy_timer``) against one
  reprogrammed at every change of deadline;
* the C fast path of plain send/recv (``VMKernel.fast_ipc``,
  kernel/_fastipc.c) against pid 0's Python syscalls.

Checked on the pipeline demo (three containers, timers, an interrupt), the
console demo and a two-container ping-pong, under both scheduling policies."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from vmk.boot.vmkimage import Policy, read_image
from vmk.kernel.pid0 import VMKernel
from vmk.machine.pc import Machine, MachineConfig
from vmk.testing.harness import SerialCapture
from vmk.testing.workloads import ping_pong_manifest
from vmk.tools.build import build

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="the demo programs are C (gcc needed)")


FAST_PATHS = ("in_place", "plain_park", "lazy_timer", "fast_ipc")


def _run(img: Path, in_place: bool, policy: str | None, typed: bytes, plain_park: bool = True,
         lazy_timer: bool = True, fast_ipc: bool = True) -> tuple:
    image = read_image(img)
    if policy is not None:
        image = dataclasses.replace(image, kernel=dataclasses.replace(image.kernel, policy=Policy(policy)))
    com1 = SerialCapture()
    m = Machine(MachineConfig(serial=[com1]))
    k = VMKernel(m, image)
    k.plain_park = plain_park
    k.hal.lazy_timer = lazy_timer
    k.fast_ipc = fast_ipc
    switched = []
    real = k.switch_in_place

    def spy() -> bool:
        ok = in_place and real()
        switched.append(ok)
        return ok

    k.switch_in_place = spy
    m.clock.timer(lambda: m.uarts[0].receive(typed)).arm(30_000_000)
    r = k.run(until=400_000_000)
    return (r.why, r.message, com1.data, m.now, m.instructions), sum(switched), k.door.fast


@pytest.mark.parametrize("policy", ["global", "per-container"])
@pytest.mark.parametrize("demo, typed", [("pipeline", b"k"), ("console", b"echo hi\rps\r")])
def test_switching_in_the_hook_changes_nothing(tmp_path: Path, demo: str, typed: bytes, policy: str) -> None:
    img = tmp_path / f"{demo}.img"
    build(ROOT / "demo" / demo / f"{demo}.toml", img)
    fast, n_fast, _ = _run(img, True, policy, typed)
    slow, n_slow, _ = _run(img, False, policy, typed)
    assert n_slow == 0
    if demo == "pipeline":
        assert n_fast > 0                       # its containers hand the CPU to each other in the hook
    assert fast == slow
    assert fast[2]                              # the demo did print


PINGPONG = r"""
#include "vmk.h"
int main(void)
{
    long v = 0, pid = vmk_getpid();
    for (int i = 0; i < 50; i++) {
        if (pid == 1) { vmk_send(0, &v, 8); vmk_recv(1, &v, 8); }
        else { vmk_recv(0, &v, 8); v++; vmk_send(1, &v, 8); }
        if (i % 10 == 0) vmk_sleep(3000);
    }
    if (pid == 1) vmk_console_write("done\n", 5);
    return v == 50 ? 0 : 1;
}
"""

@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("fast-paths")
    (tmp / "pp.c").write_text(PINGPONG)
    (tmp / "pp.toml").write_text(ping_pong_manifest("pp.c", memory="128K"))
    out = {"pingpong": tmp / "pp.img"}
    build(tmp / "pp.toml", out["pingpong"])
    for demo in ("pipeline", "console"):
        out[demo] = tmp / f"{demo}.img"
        build(ROOT / "demo" / demo / f"{demo}.toml", out[demo])
    return out


@pytest.mark.parametrize("policy", ["global", "per-container"])
@pytest.mark.parametrize("demo, typed", [("pipeline", b"k"), ("console", b"echo hi\rps\r"), ("pingpong", b"")])
@pytest.mark.parametrize("off", FAST_PATHS + ("all",))
def test_each_fast_path_changes_nothing(images: dict[str, Path], demo: str, typed: bytes, policy: str,
                                        off: str) -> None:
    on = {name: True for name in FAST_PATHS}
    slow = {name: off not in (name, "all") for name in FAST_PATHS}
    fast, _, door = _run(images[demo], policy=policy, typed=typed, **on)
    other, _, other_door = _run(images[demo], policy=policy, typed=typed, **slow)
    assert fast == other
    assert fast[2]                              # the demo did print
    if demo == "pingpong":
        assert door >= 50                       # the fast path took at least one syscall per round trip
    if not slow["fast_ipc"] or not slow["plain_park"]:
        assert other_door == 0
