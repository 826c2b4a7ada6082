"""How many fibers a container may have, and what 10,000 of them cost.

* ``max_fibers`` ([kernel], and a [[container]]'s own) is obeyed: the spawn
  over it gets -EAGAIN, an exit makes room again; the default allows 10,000
  blocked fibers next to a working pair;
* 10,000 blocked fibers (in the round trip's container) cost a channel round
  trip nothing: the same virtual time and the same scheduler work per round
  trip as with none;
* ``fiber_stack``: the stacks the kernel chooses (``fiber_spawn`` with
  stack_top 0) are that big, from the top of the heap, -ENOMEM when the heap
  has no room for one more;
* the manifest refuses a bad value with one line; an image written before
  these settings existed reads with the defaults."""
from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import pytest

from vmk.boot.vmkimage import (DEFAULT_FIBER_STACK, DEFAULT_MAX_FIBERS, HEADER_SIZE, KernelSettings,
                               encode_image, read_image)
from vmk.kernel.fiber import FiberState
from vmk.kernel.pid0 import VMKernel
from vmk.kernel.syscall_table import Errno
from vmk.machine.pc import Machine, MachineConfig
from vmk.testing.harness import SerialCapture
from vmk.testing.vmimage import peek
from vmk.tools.build import BuildError, build, build_image

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="the guest programs are C (gcc needed)")

EAGAIN = -int(Errno.EAGAIN)
ENOMEM = -int(Errno.ENOMEM)
START = 20_000_000                  # virtual ns: the round trips start here, the crowd is set up by then

# Spawns up to N fibers (own stacks) that block on a recv, records how far it got
# (at the limit: the first of them is let go, and once it has ended a spawn must
# succeed again), then makes ROUNDS round trips with a partner fiber (spawned
# first) from START on.
CROWD_C = r"""
#include "vmk.h"
enum { N = %(n)d, ROUNDS = %(rounds)d, STACK = 512 };
static char stacks[N + 1][STACK] __attribute__((aligned(16)));
long spawned, spawn_err, again = 12345, t_start, t_end, rounds = -1;
static long idle_chan, leave_chan, ping, pong, leaver;
static void idle(long chan)
{
    long v;
    vmk_recv(chan, &v, 8);             /* idle_chan: nobody sends */
    vmk_fiber_exit(0);
}
static void quit(long arg)
{
    vmk_fiber_exit(0);
}
static void echo(long arg)
{
    long v;
    for (;;) { if (vmk_recv(ping, &v, 8) < 0) break; v++; vmk_send(pong, &v, 8); }
    vmk_fiber_exit(0);
}
int main(void)
{
    long v = 0;
    idle_chan = vmk_chan_create(8, 0);
    leave_chan = vmk_chan_create(8, 0);
    ping = vmk_chan_create(8, 0);
    pong = vmk_chan_create(8, 0);
    if (vmk_fiber_spawn((void *)echo, stacks[N] + STACK, 0) < 0) return 2;
    for (long i = 0; i < N; i++) {
        long r = vmk_fiber_spawn((void *)idle, stacks[i] + STACK, i ? idle_chan : leave_chan);
        if (r < 0) { spawn_err = r; break; }
        if (i == 0) leaver = r;
        spawned++;
    }
    if (spawn_err && spawned) {        /* at the limit: a fiber that ends makes room for one */
        vmk_send(leave_chan, &v, 8);
        vmk_fiber_join(leaver);
        again = vmk_fiber_join(vmk_fiber_spawn((void *)quit, 0, 0));
    }
    vmk_sleep(%(start)dL - vmk_time());
    t_start = vmk_time();
    for (long i = 0; i < ROUNDS; i++) { vmk_send(ping, &v, 8); vmk_recv(pong, &v, 8); }
    t_end = vmk_time();
    rounds = v;
    for (;;) vmk_sleep(1000000000L);
}
"""

# Spawns fibers with kernel-chosen stacks until an error; each stores its stack address.
KSTACKS_C = r"""
#include "vmk.h"
enum { MAX = 64 };
long spawned, spawn_err, where[MAX];
static void note(long i)
{
    long here;
    where[i] = (long)&here;
    for (;;) vmk_sleep(1000000000L);
}
int main(void)
{
    for (long i = 0; i < MAX; i++) {
        long r = vmk_fiber_spawn((void *)note, 0, i);
        if (r < 0) { spawn_err = r; break; }
        spawned++;
    }
    for (;;) vmk_sleep(1000000000L);
}
"""


def boot(tmp: Path, manifest: str, files: dict[str, str]) -> tuple[Machine, VMKernel]:
    for name, text in files.items():
        (tmp / name).write_text(text)
    (tmp / "img.toml").write_text(manifest)
    build(tmp / "img.toml", tmp / "img.img")
    m = Machine(MachineConfig(mem=64 << 20, serial=[SerialCapture()]))
    return m, VMKernel(m, read_image(tmp / "img.img"))


def crowd(tmp: Path, n: int, rounds: int, kernel: str = "", container: str = "") -> tuple[Machine, VMKernel]:
    memory = "8M"
    return boot(tmp, f"""
[kernel]
channels = 16
{kernel}
[[program]]
name = "crowd"
source = "crowd.c"
[[container]]
name = "crowd"
program = "crowd"
memory = "{memory}"
{container}
""", {"crowd.c": CROWD_C % {"n": n, "rounds": rounds, "start": START}})


def test_the_default_allows_ten_thousand_blocked_fibers_next_to_a_working_pair(tmp_path: Path) -> None:
    """10,000 blocked fibers + the pair: within the default limit, and the round trips
    cost exactly what they cost without the crowd (virtual time, scheduler work)."""
    assert KernelSettings().max_fibers >= 10_002 and VMKernel.MAX_FIBERS == DEFAULT_MAX_FIBERS
    rounds = 200
    cost = {}
    for n in (0, 10_000):
        where = tmp_path / str(n)
        where.mkdir()
        m, k = crowd(where, n, rounds)
        k.run(until=START)
        c = k.containers[1]
        assert c.exit_code is None and peek(k, 1, "spawn_err") == 0 and peek(k, 1, "spawned") == n
        assert len(c.fibers) == n + 2
        assert sum(f.state is FiberState.BLOCKED for f in c.fibers) == n + 2     # main sleeps, echo waits
        work = k.sched.work
        k.run(until=START + 10_000_000)
        assert peek(k, 1, "rounds") == rounds
        cost[n] = (peek(k, 1, "t_end") - peek(k, 1, "t_start"), k.sched.work - work)
    assert cost[10_000] == cost[0]


def test_the_fiber_over_a_kernel_limit_gets_eagain(tmp_path: Path) -> None:
    """max_fibers = 10,000: main, echo and 9,998 idle fibers; the 10,001st fiber is
    refused, and once one fiber has ended a spawn succeeds again."""
    m, k = crowd(tmp_path, 10_000, 10, kernel="max_fibers = 10_000")
    k.run(until=START + 1_000_000)
    assert peek(k, 1, "spawned") == 10_000 - 2
    assert peek(k, 1, "spawn_err") == EAGAIN
    assert peek(k, 1, "again") == 0                 # spawned, ran and joined once one had ended
    assert len(k.containers[1].fibers) == 10_000 - 1
    assert peek(k, 1, "rounds") == 10               # the container goes on


def test_a_containers_own_small_limit_is_obeyed(tmp_path: Path) -> None:
    m, k = boot(tmp_path, """
[kernel]
channels = 16
max_fibers = 6
[[program]]
name = "crowd"
source = "crowd.c"
[[container]]
name = "small"
program = "crowd"
memory = "1M"
max_fibers = 3
[[container]]
name = "kernels"
program = "crowd"
memory = "1M"
""", {"crowd.c": CROWD_C % {"n": 100, "rounds": 5, "start": START}})
    k.run(until=START + 1_000_000)
    assert (peek(k, 1, "spawned"), peek(k, 1, "spawn_err"), peek(k, 1, "again")) == (1, EAGAIN, 0)
    assert (peek(k, 2, "spawned"), peek(k, 2, "spawn_err"), peek(k, 2, "again")) == (4, EAGAIN, 0)
    assert [len(c.fibers) for c in k.containers.values()] == [2, 5]
    assert peek(k, 1, "rounds") == 5 and peek(k, 2, "rounds") == 5


@pytest.mark.parametrize("kernel, container, size", [
    ("", "", DEFAULT_FIBER_STACK),
    ('fiber_stack = "8K"', "", 8 << 10),
    ('fiber_stack = "64K"', 'fiber_stack = "4K"', 4 << 10),
])
def test_kernel_chosen_stacks_are_fiber_stack_apart_until_the_heap_is_full(
        tmp_path: Path, kernel: str, container: str, size: int) -> None:
    m, k = boot(tmp_path, f"""
[kernel]
channels = 4
{kernel}
[[program]]
name = "k"
source = "k.c"
[[container]]
name = "k"
program = "k"
memory = "128K"
{container}
""", {"k.c": KSTACKS_C})
    k.run(until=1_000_000)
    spec = k.image.container("k")
    layout = k.image.layout(spec)
    fits = min(64, layout.heap_size // size)
    spawned = peek(k, 1, "spawned")
    assert spawned == fits and peek(k, 1, "spawn_err") == (ENOMEM if fits < 64 else 0)
    where = peek(k, 1, "where", 64)[:spawned]
    top = layout.heap_base + layout.heap_size
    for i, addr in enumerate(where):                # each inside its own slice of the heap, from the top
        assert top - (i + 1) * size <= addr < top - i * size, (i, hex(addr))


def test_the_ten_thousand_fibers_spawned_with_kernel_stacks(tmp_path: Path) -> None:
    """fiber_stack = "4K": 10,000 kernel-chosen stacks need 40 MiB of heap; each
    fiber touches one page of it."""
    src = KSTACKS_C.replace("MAX = 64", "MAX = 10000")
    m, k = boot(tmp_path, """
[kernel]
channels = 4
fiber_stack = "4K"
[[program]]
name = "k"
source = "k.c"
[[container]]
name = "k"
program = "k"
memory = "48M"
""", {"k.c": src})
    k.run(until=50_000_000)
    assert peek(k, 1, "spawned") == 10_000 and peek(k, 1, "spawn_err") == 0
    assert sum(f.state is FiberState.BLOCKED for f in k.containers[1].fibers) == 10_001
    assert len(k._fiber_stacks) == 10_000
    k._end_container(k.containers[1], 0)            # the kernel forgets the stacks with the container
    assert not k._fiber_stacks and not k._free_stacks


# -- the manifest and the image -------------------------------------------------------------------
MANIFEST = """
[kernel]
{kernel}
[[program]]
name = "p"
source = "p.s"
[[container]]
name = "a"
program = "p"
memory = "64K"
{container}
"""


@pytest.mark.parametrize("kernel, container, message", [
    ("max_fibers = 0", "", "img.toml:3: max_fibers 0 is out of range (1..1048576)"),
    ("max_fibers = \"many\"", "", "img.toml:3: max_fibers must be an integer, not \"many\""),
    ("", "max_fibers = -1", "img.toml:11: container 'a': max_fibers -1 is out of range (1..1048576)"),
    ("fiber_stack = \"5000 bytes\"", "", "img.toml:3: fiber_stack must be a size such as"),
    ("fiber_stack = 5000", "", "img.toml:3: fiber_stack 5000 must be a positive multiple of the page size (4096)"),
    ("", "fiber_stack = 0", "img.toml:11: container 'a': fiber_stack 0 must be a positive multiple"),
])
def test_a_bad_value_is_one_line_naming_its_manifest_line(tmp_path: Path, kernel: str, container: str,
                                                          message: str) -> None:
    (tmp_path / "p.s").write_text("spin:\n    jmp spin\n")
    (tmp_path / "img.toml").write_text(MANIFEST.format(kernel=kernel, container=container))
    with pytest.raises(BuildError) as e:
        build_image(tmp_path / "img.toml")
    got = str(e.value).replace(str(tmp_path) + "/", "")
    assert got.startswith(message) and "\n" not in got, got


def test_the_settings_are_carried_in_the_image(tmp_path: Path) -> None:
    (tmp_path / "p.s").write_text("spin:\n    jmp spin\n")
    (tmp_path / "img.toml").write_text(MANIFEST.format(kernel='max_fibers = 100\nfiber_stack = "8K"',
                                                       container='max_fibers = 7\nfiber_stack = "12K"'))
    build(tmp_path / "img.toml", tmp_path / "img.img")
    image = read_image(tmp_path / "img.img")
    assert (image.kernel.max_fibers, image.kernel.fiber_stack) == (100, 8 << 10)
    spec = image.container("a")
    assert (spec.max_fibers, spec.fiber_stack) == (7, 12 << 10)
    assert (image.max_fibers(spec), image.fiber_stack(spec)) == (7, 12 << 10)


def test_an_image_from_before_the_fiber_settings_reads_with_the_defaults(tmp_path: Path) -> None:
    (tmp_path / "p.s").write_text("spin:\n    jmp spin\n")
    (tmp_path / "img.toml").write_text(MANIFEST.format(kernel="", container=""))
    data = encode_image(build_image(tmp_path / "img.toml"))
    # Rewrite the metadata without the new fields, as an older vmk wrote it.
    fields = struct.unpack_from("<8sIIQQQQQII", data)
    meta_off, meta_size, blob_off, blob_size = fields[4:8]
    meta = json.loads(data[meta_off:meta_off + meta_size])
    del meta["kernel"]["max_fibers"], meta["kernel"]["fiber_stack"]
    assert "max_fibers" not in meta["containers"][0]
    new_meta = json.dumps(meta, separators=(",", ":")).encode()
    blob = data[blob_off:blob_off + blob_size]
    new_blob_off = HEADER_SIZE + len(new_meta) + (-(HEADER_SIZE + len(new_meta)) % 16)
    header = struct.pack("<8sIIQQQQQII", fields[0], fields[1], fields[2], new_blob_off + len(blob), HEADER_SIZE,
                         len(new_meta), new_blob_off, len(blob), zlib.crc32(new_meta), zlib.crc32(blob))
    old = header + new_meta + bytes(new_blob_off - HEADER_SIZE - len(new_meta)) + blob
    image = read_image(old)
    assert (image.kernel.max_fibers, image.kernel.fiber_stack) == (DEFAULT_MAX_FIBERS, DEFAULT_FIBER_STACK)
    assert image.container("a").max_fibers is None


# ---------------------------------------------------------------------------- joined fibers are forgotten
JOINER_C = r"""
#include "vmk.h"
long joined_sum = 0, second_join = 12345, ev_second = 12345, sync_idx = 12345, ev_value = 12345;
static void quit(long arg)
{
    vmk_fiber_exit(arg);
}
int main(void)
{
    long last = -1;
    for (long i = 0; i < 3000; i++) {            /* spawn and join for ever: pid 0 must not grow */
        last = vmk_fiber_spawn((void *)quit, 0, i);
        joined_sum += vmk_fiber_join(last);
    }
    second_join = vmk_fiber_join(last);           /* joined once already */
    long f = vmk_fiber_spawn((void *)quit, 0, 77);
    vmk_yield();                                  /* f has ended: a zombie until its join */
    struct vmk_event e = {.kind = EV_JOIN, .handle = f};
    sync_idx = vmk_sync(&e, 1);
    ev_value = e.result;
    ev_second = vmk_fiber_join(f);
    vmk_console_write("done\n", 5);
    for (;;) vmk_sleep(1000000000L);
}
"""

JOINER_TOML = """
[[program]]
name = "joiner"
source = "joiner.c"
[[container]]
name = "joiner"
program = "joiner"
memory = "256K"
"""


def test_a_joined_fiber_is_forgotten(tmp_path: Path) -> None:
    (tmp_path / "joiner.c").write_text(JOINER_C)
    (tmp_path / "m.toml").write_text(JOINER_TOML)
    build(tmp_path / "m.toml", tmp_path / "m.img")
    com1 = SerialCapture()
    k = VMKernel(Machine(MachineConfig(serial=[com1])), read_image(tmp_path / "m.img"))
    k.run(until=200_000_000)
    assert b"done" in com1.data, k.reports
    c = k.containers[1]
    assert peek(k, 1, "joined_sum") == sum(range(3000))
    assert peek(k, 1, "second_join") == -int(Errno.ESRCH)
    assert [peek(k, 1, n) for n in ("sync_idx", "ev_value", "ev_second")] == [0, 77, -int(Errno.ESRCH)]
    # only the main fiber is left in pid 0's books (and the two console drivers)
    assert len([f for f in k.sched.fibers.values() if f.container is c]) == 1
