"""A plain send/recv that finds no partner parks as a ``_Parked`` (pid0.py,
``VMKernel.plain_park``) instead of a generic one-arm sync: checked through
real guest programs, each with ``plain_park`` on and off, under both
scheduling policies where the scheduler matters:

* EPIPE: a parked recv / send wakes with -EPIPE when the other container (the
  only other holder of a channel it was handed) exits;
* the debugger's view of a parked fiber (state, ``waiting_on``);
* a container that faults while a sibling fiber is parked: the fiber is done,
  off the channel's queue, and a container sharing the channel goes on;
* interop with ``vmk_sync``: a parked plain recv / send is served by a
  two-arm sync (channel arm + far timeout) of another container;
* typing: a send of the wrong size is -EMSGSIZE at once, it never parks."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import pytest

from vmk.boot.vmkimage import Policy, read_image
from vmk.kernel.fiber import FiberState
from vmk.kernel.pid0 import VMKernel, _Parked
from vmk.kernel.scheduler import POLICIES
from vmk.kernel.syscall_table import Errno
from vmk.machine.pc import Machine, MachineConfig, Why
from vmk.testing.harness import SerialCapture
from vmk.testing.vmimage import peek
from vmk.tools.build import build

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="the guest programs are C (gcc needed)")

MS = 1_000_000                      # virtual ns
EPIPE = -int(Errno.EPIPE)
EMSGSIZE = -int(Errno.EMSGSIZE)

PARK = pytest.mark.parametrize("plain_park", [True, False], ids=["parked", "generic"])
POLICY = pytest.mark.parametrize("policy", ["global", "per-container"])

# ---------------------------------------------------------------------------- the guest programs
# 1/2: pid 1 hands two fresh channels to a child container, then blocks on
# both (a fiber in recv on one, main in send on the other); the child sleeps
# 1 ms and exits: pid 1 is then the only holder of both.
PARENT_C = r"""
#include "vmk.h"
long ch_recv = -1, ch_send = -1, child_pid = -1;
long r_recv = 12345, r_send = 12345, t_recv = -1, t_send = -1, child_code = 12345;
static long rbuf;
static void receiver(long h)
{
    r_recv = vmk_recv(h, &rbuf, 8);
    t_recv = vmk_time();
    vmk_fiber_exit(0);
}
int main(void)
{
    ch_recv = vmk_chan_create(8, 0);
    ch_send = vmk_chan_create(8, 0);
    long hs[2] = {ch_recv, ch_send};
    child_pid = vmk_spawn("child", 5, hs, 2);
    vmk_fiber_spawn((void *)receiver, 0, ch_recv);
    long v = 42;
    r_send = vmk_send(ch_send, &v, 8);
    t_send = vmk_time();
    child_code = vmk_wait(child_pid);
    for (;;) vmk_sleep(1000000000L);
}
"""

CHILD_C = r"""
#include "vmk.h"
int main(void)
{
    vmk_sleep(1000000L);
    return 7;
}
"""

EPIPE_TOML = """
[kernel]
channels = 16
[[program]]
name = "parent"
source = "parent.c"
[[program]]
name = "child"
source = "child.c"
[[container]]
name = "parent"
program = "parent"
memory = "256K"
[[container]]
name = "child"
program = "child"
memory = "128K"
autostart = false
"""

# 3: the victim parks a fiber in recv on "link", then faults (1 ms); the
# bystander (which holds "link" too) later offers a message on "link" with a
# 1 ms timeout: the victim was the only other side of that image pipe, so the
# offer fails at once with EPIPE (nobody took it), then it prints.
VICTIM_C = r"""
#include "vmk.h"
long got = 0, bad_address = 0;
static void waiter(long arg)
{
    long v;
    got = vmk_recv(0, &v, 8);
    vmk_fiber_exit(0);
}
int main(void)
{
    vmk_fiber_spawn((void *)waiter, 0, 0);
    vmk_sleep(1000000L);
    *(volatile long *)bad_address = 1;          /* page fault */
    return 0;
}
"""

BYSTANDER_C = r"""
#include "vmk.h"
long arm = -1, res = 12345;
int main(void)
{
    vmk_sleep(2000000L);
    long v = 99;
    struct vmk_event e[2] = {
        {.kind = EV_SEND, .handle = 0, .arg0 = (uint64_t)&v, .arg1 = 8, .result = 12345},
        {.kind = EV_TIMEOUT, .arg0 = 1000000L, .result = 12345},
    };
    arm = vmk_sync(e, 2);
    res = e[0].result;
    char msg[] = "bystander: arm ?\n";
    msg[15] = arm < 0 ? 'E' : (char)('0' + (arm <= 9 ? arm : 9));
    vmk_console_write(msg, sizeof msg - 1);
    for (;;) vmk_sleep(1000000000L);
}
"""

FAULT_TOML = """
[kernel]
channels = 16
[[program]]
name = "victim"
source = "victim.c"
[[program]]
name = "bystander"
source = "bystander.c"
[[channel]]
name = "link"
msg_size = 8
[[container]]
name = "victim"
program = "victim"
memory = "256K"
handles = ["link"]
[[container]]
name = "bystander"
program = "bystander"
memory = "128K"
handles = ["link"]
"""

# 4: pid 1 parks a plain recv (fiber, on "rs") and a plain send (main, on
# "sr"); 1 ms later pid 2 serves each with a two-arm sync (channel + 1 s timeout).
PLAIN_C = r"""
#include "vmk.h"
long r_recv = 12345, r_send = 12345, got = 0;
static void receiver(long arg)
{
    r_recv = vmk_recv(0, &got, 8);
    vmk_fiber_exit(0);
}
int main(void)
{
    vmk_fiber_spawn((void *)receiver, 0, 0);
    char msg[16] = "0123456789abcdef";
    r_send = vmk_send(1, msg, 16);
    for (;;) vmk_sleep(1000000000L);
}
"""

SYNCER_C = r"""
#include "vmk.h"
long arm_send = -1, res_send = 12345, arm_recv = -1, res_recv = 12345;
long rbuf[2] = {0, 0};
int main(void)
{
    vmk_sleep(1000000L);
    unsigned long v = 0x1122334455667788UL;
    struct vmk_event s[2] = {
        {.kind = EV_SEND, .handle = 0, .arg0 = (uint64_t)&v, .arg1 = 8, .result = 12345},
        {.kind = EV_TIMEOUT, .arg0 = 1000000000UL, .result = 12345},
    };
    arm_send = vmk_sync(s, 2);
    res_send = s[0].result;
    struct vmk_event r[2] = {
        {.kind = EV_RECV, .handle = 1, .arg0 = (uint64_t)rbuf, .arg1 = 16, .result = 12345},
        {.kind = EV_TIMEOUT, .arg0 = 1000000000UL, .result = 12345},
    };
    arm_recv = vmk_sync(r, 2);
    res_recv = r[0].result;
    for (;;) vmk_sleep(1000000000L);
}
"""

INTEROP_TOML = """
[kernel]
channels = 16
[[program]]
name = "plain"
source = "plain.c"
[[program]]
name = "syncer"
source = "syncer.c"
[[channel]]
name = "rs"
msg_size = 8
[[channel]]
name = "sr"
msg_size = 16
[[container]]
name = "plain"
program = "plain"
memory = "256K"
handles = ["rs", "sr"]
[[container]]
name = "syncer"
program = "syncer"
memory = "128K"
handles = ["rs", "sr"]
"""

# 5: wrong sizes, nobody on the other side; then the same with a receiver
# parked (it must stay parked, and take the next well-sized message).
TYPING_C = r"""
#include "vmk.h"
long h8 = -1, h0 = -1, r_small = 12345, r_big = 12345, reached = 0, t0 = -1, t1 = -1;
long r_parked = 12345, r_right = 12345, r_recv = 12345, got = 0, reached2 = 0;
static char big[8192];
static void receiver(long h)
{
    r_recv = vmk_recv(h, &got, 8);
    vmk_fiber_exit(0);
}
int main(void)
{
    h8 = vmk_chan_create(8, 0);
    h0 = vmk_chan_create(0, 0);
    t0 = vmk_time();
    r_small = vmk_send(h8, big, 4);             /* 4 bytes on an 8-byte channel */
    r_big = vmk_send(h0, big, 4097);            /* over MAX_MSG on an any-size channel */
    t1 = vmk_time();
    reached = 1;
    vmk_fiber_spawn((void *)receiver, 0, h8);
    vmk_sleep(1000000L);                        /* the receiver parks */
    r_parked = vmk_send(h8, big, 16);
    reached2 = 1;
    long v = 0x0102030405060708L;
    r_right = vmk_send(h8, &v, 8);
    for (;;) vmk_sleep(1000000000L);
}
"""

TYPING_TOML = """
[kernel]
channels = 16
[[program]]
name = "typing"
source = "typing.c"
[[container]]
name = "typing"
program = "typing"
memory = "256K"
"""

# 6: a pipe the manifest declares: the producer sends 3 messages and exits; the
# consumer reads until recv fails, and must get EPIPE then, not hang.
PRODUCER_C = r"""
#include "vmk.h"
int main(void)
{
    for (long i = 1; i <= 3; i++) { vmk_sleep(100000L); vmk_send(0, &i, 8); }
    return 0;
}
"""

CONSUMER_C = r"""
#include "vmk.h"
long got = 0, sum = 0, last = 0;
int main(void)
{
    long v;
    while ((last = vmk_recv(0, &v, 8)) == 8) { got++; sum += v; }
    for (;;) vmk_sleep(1000000000L);
}
"""

PIPE_TOML = """
[kernel]
channels = 8
[[program]]
name = "producer"
source = "producer.c"
[[program]]
name = "consumer"
source = "consumer.c"
[[channel]]
name = "pipe"
msg_size = 8
[[container]]
name = "consumer"
program = "consumer"
memory = "128K"
handles = ["pipe"]
[[container]]
name = "producer"
program = "producer"
memory = "128K"
handles = ["pipe"]
"""

IMAGES = {
    "pipe": (PIPE_TOML, {"producer.c": PRODUCER_C, "consumer.c": CONSUMER_C}),
    "epipe": (EPIPE_TOML, {"parent.c": PARENT_C, "child.c": CHILD_C}),
    "fault": (FAULT_TOML, {"victim.c": VICTIM_C, "bystander.c": BYSTANDER_C}),
    "interop": (INTEROP_TOML, {"plain.c": PLAIN_C, "syncer.c": SYNCER_C}),
    "typing": (TYPING_TOML, {"typing.c": TYPING_C}),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name, (manifest, files) in IMAGES.items():
        tmp = tmp_path_factory.mktemp(name)
        for fname, text in files.items():
            (tmp / fname).write_text(text)
        (tmp / f"{name}.toml").write_text(manifest)
        out[name] = tmp / f"{name}.img"
        build(tmp / f"{name}.toml", out[name])
    return out


# ---------------------------------------------------------------------------- helpers
def _boot(img: Path, plain_park: bool, policy: str | None = None) -> tuple[VMKernel, SerialCapture]:
    image = read_image(img)
    if policy is not None:
        image = dataclasses.replace(image, kernel=dataclasses.replace(image.kernel, policy=Policy(policy)))
    com1 = SerialCapture()
    m = Machine(MachineConfig(serial=[com1]))
    k = VMKernel(m, image)
    if policy is not None:
        assert type(k.sched.policy) is POLICIES[policy]
    k.plain_park = plain_park
    return k, com1


def _run(k: VMKernel, until: int) -> None:
    r = k.run(until=until)
    assert r.why is Why.TIME_LIMIT, (r.why, r.message, k.reports)
    assert k.machine.now >= until


_peek = peek


def _channel(k: VMKernel, pid: int, handle: int) -> Any:
    return k.containers[pid].handles.channel(handle)


def _assert_parked(k: VMKernel, fiber: Any, what: str, ch: Any, plain_park: bool) -> None:
    assert fiber.state is FiberState.BLOCKED, fiber
    assert fiber.waiting_on == f"{what} on channel {ch.cid}"
    # the path under test is the one taken (a _Parked only when plain_park is on)
    assert isinstance(fiber._sync, _Parked) is plain_park, fiber._sync


# ---------------------------------------------------------------------------- 1. EPIPE
@POLICY
@PARK
def test_parked_recv_and_send_get_epipe_when_the_other_container_exits(images: dict[str, Path], plain_park: bool,
                                                                      policy: str) -> None:
    k, _ = _boot(images["epipe"], plain_park, policy)
    _run(k, 5 * MS)
    assert k.reports == []
    assert _peek(k, 1, "child_pid") == 2
    assert k.containers[2].exit_code == 7
    assert _peek(k, 1, "child_code") == 7
    assert _peek(k, 1, "r_recv") == EPIPE
    assert _peek(k, 1, "r_send") == EPIPE
    # they woke when the child exited (after its 1 ms sleep), not before
    assert _peek(k, 1, "t_recv") >= MS
    assert _peek(k, 1, "t_send") >= MS
    for h in (_peek(k, 1, "ch_recv"), _peek(k, 1, "ch_send")):
        ch = _channel(k, 1, h)
        assert len(ch.recvq) == len(ch.sendq) == 0
        assert ch.holders == {k.containers[1]: 1}


# ---------------------------------------------------------------------------- 2. the debugger's view
@POLICY
@PARK
def test_a_parked_plain_recv_and_send_are_described(images: dict[str, Path], plain_park: bool, policy: str) -> None:
    k, _ = _boot(images["epipe"], plain_park, policy)
    _run(k, MS // 2)                            # both blocked; the child still sleeps
    parent = k.containers[1]
    main, receiver = parent.fibers
    ch_recv = _channel(k, 1, _peek(k, 1, "ch_recv"))
    ch_send = _channel(k, 1, _peek(k, 1, "ch_send"))
    assert ch_recv.cid != ch_send.cid
    _assert_parked(k, receiver, "recv", ch_recv, plain_park)
    _assert_parked(k, main, "send", ch_send, plain_park)
    assert len(ch_recv.recvq) == 1 and len(ch_recv.sendq) == 0
    assert len(ch_send.sendq) == 1 and len(ch_send.recvq) == 0
    assert f"on recv on channel {ch_recv.cid}" in repr(receiver)
    assert _peek(k, 1, "r_recv") == _peek(k, 1, "r_send") == 12345     # nothing returned yet
    _run(k, 5 * MS)                             # the child exits: both wake, no longer described
    assert receiver.state is FiberState.DONE and receiver.waiting_on is None
    assert main.state is not FiberState.DONE and main.waiting_on != f"send on channel {ch_send.cid}"
    assert _peek(k, 1, "r_recv") == _peek(k, 1, "r_send") == EPIPE


# ---------------------------------------------------------------------------- 3. a fault next to a parked fiber
@POLICY
@PARK
def test_a_container_faulting_next_to_a_parked_recv(images: dict[str, Path], plain_park: bool, policy: str) -> None:
    k, com1 = _boot(images["fault"], plain_park, policy)
    _run(k, MS // 2)
    victim = k.containers[1]
    main, waiter = victim.fibers
    link = _channel(k, 1, 0)
    assert link is _channel(k, 2, 0)
    _assert_parked(k, waiter, "recv", link, plain_park)
    assert len(link.recvq) == 1
    _run(k, 10 * MS)
    assert len(k.reports) == 1
    assert k.reports[0].startswith("pid 1 (victim) killed: #PF page fault") and "at address 0x0" in k.reports[0]
    assert victim.exit_code == -128 - 14
    assert main.state is FiberState.DONE and waiter.state is FiberState.DONE
    assert waiter.waiting_on is None
    assert len(link.recvq) == 0 and len(link.sendq) == 0
    assert link.sends == 0                      # nobody took the bystander's message
    # the bystander goes on: its offer on the pipe fails at once (EPIPE: the victim,
    # the pipe's only other side, is gone; the image's hold is no side), then it printed
    assert k.containers[2].exit_code is None
    assert _peek(k, 2, "arm") == EPIPE
    assert _peek(k, 2, "res") == 12345          # the send arm never committed
    assert b"bystander: arm E\n" in com1.data
    assert com1.data.index(b"vmk: pid 1 (victim) killed") < com1.data.index(b"bystander: arm E")


# ---------------------------------------------------------------------------- 4. interop with vmk_sync
@POLICY
@PARK
def test_parked_plain_ops_served_by_a_two_arm_sync(images: dict[str, Path], plain_park: bool, policy: str) -> None:
    k, _ = _boot(images["interop"], plain_park, policy)
    _run(k, MS // 2)
    main, receiver = k.containers[1].fibers
    rs, sr = _channel(k, 1, 0), _channel(k, 1, 1)
    _assert_parked(k, receiver, "recv", rs, plain_park)
    _assert_parked(k, main, "send", sr, plain_park)
    _run(k, 5 * MS)
    assert k.reports == []
    # the plain recv got the 8 bytes the sync's EV_SEND arm offered
    assert _peek(k, 1, "r_recv") == 8
    assert _peek(k, 1, "got") == 0x1122334455667788
    assert _peek(k, 2, "arm_send") == 0
    assert _peek(k, 2, "res_send") == 0
    # the plain send's 16 bytes went to the sync's EV_RECV arm
    assert _peek(k, 1, "r_send") == 0
    assert _peek(k, 2, "arm_recv") == 0
    assert _peek(k, 2, "res_recv") == 16
    rbuf = _peek(k, 2, "rbuf", 2)
    assert b"".join(v.to_bytes(8, "little", signed=True) for v in rbuf) == b"0123456789abcdef"
    assert rs.sends == 1 and sr.sends == 1
    assert receiver.state is FiberState.DONE
    for ch in (rs, sr):
        assert len(ch.recvq) == len(ch.sendq) == 0


# ---------------------------------------------------------------------------- 5. typing
@POLICY
@PARK
def test_a_send_of_the_wrong_size_is_refused_at_once(images: dict[str, Path], plain_park: bool, policy: str) -> None:
    k, _ = _boot(images["typing"], plain_park, policy)
    _run(k, MS // 2)
    assert _peek(k, 1, "reached") == 1          # neither send blocked
    assert _peek(k, 1, "r_small") == EMSGSIZE
    assert _peek(k, 1, "r_big") == EMSGSIZE
    h8, h0 = _peek(k, 1, "h8"), _peek(k, 1, "h0")
    ch8, ch0 = _channel(k, 1, h8), _channel(k, 1, h0)
    assert (ch8.msg_size, ch0.msg_size) == (8, 0)
    assert ch8.sends == ch0.sends == 0
    assert len(ch8.sendq) == len(ch0.sendq) == len(ch0.recvq) == 0     # the refused sends left nothing
    # since then the receiver parked (main sleeps): a wrong-size send must not disturb it
    main, receiver = k.containers[1].fibers
    assert len(ch8.recvq) == 1
    _assert_parked(k, receiver, "recv", ch8, plain_park)
    _run(k, 5 * MS)
    assert _peek(k, 1, "reached2") == 1
    assert _peek(k, 1, "r_parked") == EMSGSIZE
    assert _peek(k, 1, "r_right") == 0
    assert _peek(k, 1, "r_recv") == 8
    assert _peek(k, 1, "got") == 0x0102030405060708
    assert ch8.sends == 1
    assert len(ch8.sendq) == 0 and len(ch8.recvq) == 0


# ---------------------------------------------------------------------------- 6. a pipe of the image
@POLICY
@PARK
def test_an_image_pipe_breaks_when_the_producer_exits(images: dict[str, Path], plain_park: bool, policy: str) -> None:
    k, _ = _boot(images["pipe"], plain_park, policy)
    _run(k, 5 * MS)
    assert k.containers[2].exit_code == 0                   # the producer is done
    assert _peek(k, 1, "got") == 3 and _peek(k, 1, "sum") == 6
    assert _peek(k, 1, "last") == EPIPE                     # woken with the error, not parked for ever
    pipe = _channel(k, 1, 0)
    assert not pipe.freed and len(pipe.recvq) == 0          # the image still holds it
