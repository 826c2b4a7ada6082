"""Random syscalls from guest containers (tests/kernel/fuzz/): vmk never stops.

A supervisor container keeps three fuzzer containers running (fuzzer.c: every
syscall number of the table and out-of-range ones, arguments from interesting
value classes, random event arrays for sync) and replaces each one that ends
(exit, a fault it caused, its budget done) until FUZZ_TOTAL syscalls are
done; a witness container prints a known sequence on its own console handle
meanwhile.  Under both policies: pid 0 never raises, the run ends because
every container ended (not a deadlock, not an emulation error, not the time
limit), the supervisor counted the calls, and the witness's lines are all
there, in order, whole; the only containers killed are fuzzers.

    make test                       a seeded, bounded run (SYSCALLS below)
    make fuzz                       1e6 calls per policy, a random seed (printed)
    VMK_FUZZ_SYSCALLS=N VMK_FUZZ_SEED=S VMK_FUZZ_KNOWN_BUGS=0 pytest tests/kernel/test_fuzz_guest.py

VMK_FUZZ_KNOWN_BUGS=0 leaves out the argument classes of the bugs known when
this was written (fuzzer.c's FUZZ_KNOWN_BUGS), to find the next ones.
"""
from __future__ import annotations

import dataclasses
import os
import random
import re
import shutil
from pathlib import Path

import pytest

from vmk.boot.vmkimage import Policy, read_image
from vmk.kernel.pid0 import VMKernel
from vmk.machine.pc import Machine, MachineConfig, Why
from vmk.testing.harness import SerialCapture
from vmk.tools.build import build

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="the guest programs are C (gcc needed)")

FUZZ_DIR = Path(__file__).parent / "fuzz"
SYSCALLS = int(os.environ.get("VMK_FUZZ_SYSCALLS", "50000"))    # ~10 s of host time per policy
_seed = os.environ.get("VMK_FUZZ_SEED", "1")
SEED = random.randrange(1, 2**32) if _seed == "random" else int(_seed, 0)
KNOWN_BUGS = int(os.environ.get("VMK_FUZZ_KNOWN_BUGS", "1"))
# Fibers inside a fuzzer are preempted (Guile's hz) only with the known-bug
# classes: a container that ends on the CPU leaves its fiber deadline armed,
# and the idle CPU then stops every virtual ns until something wakes.
PREEMPT = '"200us"' if KNOWN_BUGS else "0"
BATCH = 2000                     # calls per fuzzer container before it exits by itself
WITNESS_LINES = 200
WITNESS_GAP_NS = max(50_000, SYSCALLS * 30)    # the witness spans most of the run
# virtual time: generous (the run ends by itself long before; only a hang meets it)
LIMIT_NS = 2_000_000_000 + SYSCALLS * 200_000

MANIFEST = """
[kernel]
policy = "global"
channels = 256
fiber_preemption_ns = {preempt}

[[program]]
name = "super"
source = "{dir}/supervisor.c"
cflags = ["-DFUZZ_SEED={seed}UL", "-DFUZZ_TOTAL={total}UL", "-DFUZZ_BATCH={batch}UL", "-DFUZZ_PAR=3"]

[[program]]
name = "fuzz"
source = "{dir}/fuzzer.c"
cflags = ["-DFUZZ_KNOWN_BUGS={known}"]

[[program]]
name = "witness"
source = "{dir}/witness.c"
cflags = ["-DWITNESS_LINES={lines}", "-DWITNESS_GAP={gap}L"]

[[program]]
name = "dud"
source = "{dir}/dud.c"

[[channel]]
name = "pool"

[[container]]
name = "super"
program = "super"
memory = "256K"
handles = ["console.tx", "pool", "console.rx"]

[[container]]
name = "witness"
program = "witness"
memory = "128K"
handles = ["console.tx"]

[[container]]
name = "fuzz"
program = "fuzz"
memory = "4M"
irqs = [5]
autostart = false

[[container]]
name = "dud"
program = "dud"
memory = "64K"
autostart = false
"""

DONE = re.compile(rb"fuzz done: calls (\d+) fuzzers (\d+) exits: ok (\d+) fault (\d+) other (\d+) stalled (\d+)\n")
WITNESS = re.compile(rb"witness (\d{4}) ok\n")


def manifest() -> str:
    return MANIFEST.format(dir=FUZZ_DIR, seed=SEED, total=SYSCALLS, batch=BATCH, known=KNOWN_BUGS,
                           lines=WITNESS_LINES, gap=WITNESS_GAP_NS, preempt=PREEMPT)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("fuzz")
    (tmp / "fuzz.toml").write_text(manifest())
    build(tmp / "fuzz.toml", tmp / "fuzz.img")
    return tmp / "fuzz.img"


@pytest.mark.parametrize("policy", ["global", "per-container"])
def test_three_fuzzers_never_stop_vmk_and_the_witness_is_intact(image: Path, policy: str) -> None:
    print(f"fuzz: seed {SEED} syscalls {SYSCALLS} known-bug classes {'on' if KNOWN_BUGS else 'off'} "
          f"policy {policy}")
    img = read_image(image)
    img = dataclasses.replace(img, kernel=dataclasses.replace(img.kernel, policy=Policy(policy)))
    com1 = SerialCapture()
    m = Machine(MachineConfig(serial=[com1]))
    k = VMKernel(m, img)
    r = k.run(until=LIMIT_NS)                  # pid 0 must not raise: that is most of the test
    out = bytes(com1.data)
    tail = out[-2000:].decode("latin-1")
    assert r.why is Why.EXIT, f"seed {SEED}: {r.why} {r.message}\n...{tail}"
    done = DONE.search(out)
    assert done, f"seed {SEED}: the supervisor did not finish\n...{tail}"
    calls, fuzzers = int(done[1]), int(done[2])
    print(f"fuzz: {done[0].decode().strip()}; {m.now / 1e9:.3f} s virtual")
    assert calls >= SYSCALLS
    assert fuzzers >= 3
    # the witness: every line, in order, each one whole (a message is written whole)
    got = [int(n) for n in WITNESS.findall(out)]
    assert got == list(range(WITNESS_LINES)), f"seed {SEED}: witness lines {got[:5]}...{got[-5:]}"
    assert out.count(b"witness ") == WITNESS_LINES + 1 and b"witness done\n" in out
    # only fuzzers (and what they spawned) were killed; the supervisor and the witness ended well
    for c in k.containers.values():
        if c.name in ("super", "witness"):
            assert c.exit_code == 0, (c, c.exit_code, k.reports)
    assert all("(super)" not in line and "(witness)" not in line for line in k.reports)
