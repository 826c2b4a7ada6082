"""The IPC fast path's deferred queueing (``Scheduler.deferred``) and direct
hand-off (``policy.handoff``) must be invisible: a fiber committed and left in
``deferred`` gives the same dispatches, the same run-queue sequence and work
counts as the same fiber queued at its commit (``Scheduler.committed``).

Random schedules (spawns, yields, blocks, wakeups, kills, fiber-timer
rotations, preemptions, slice ends, switches by
``next_guest`` and by ``next_fiber``) are run twice from one seed, once with
each way of waking, and their traces compared."""
from __future__ import annotations

import random
from typing import Any

import pytest
from kernelsim import Box
from vmk.kernel.fiber import FiberState
from vmk.kernel.scheduler import Scheduler
from vmk.machine.clock import Clock


class _Sync:
    """Stands for the sync a fiber is parked in (a kill aborts it)."""

    def abort(self) -> None:
        pass


def _wake_deferred(sched: Scheduler, f: Any) -> None:
    """What kernel/_fastipc.c's commit does to the scheduler."""
    f._sync = None
    f.result, f.error = 0, None
    f.state = FiberState.RUNNABLE
    sched.wakeups += 1
    if sched.deferred is not None:
        sched.policy                            # noqa: B018  (the look that queues the earlier one)
    sched.deferred = f


def _schedule(policy: str, seed: int, defer: bool) -> tuple[list[tuple], int]:
    rng = random.Random(seed)
    sched = Scheduler(Clock(), policy)
    boxes = [Box(f"c{i}", rng.choice([1, 5, 5, 9])) for i in range(rng.choice([1, 2, 3]))]
    pushes = 0
    real_push = sched._policy.push

    def push(f: Any, tick: int) -> None:
        nonlocal pushes
        pushes += 1
        real_push(f, tick)

    sched._policy.push = push
    for b in boxes:
        for _ in range(rng.randint(1, 2)):
            sched.spawn_guest(object(), b)
    trace: list[tuple] = []
    for _ in range(300):
        cur = sched.running
        blocked = sorted((f for f in sched.blocked()), key=lambda f: f.fid)
        live = [b for b in boxes if sched.fibers_of(b)]
        r = rng.random()
        if cur is None:
            f = sched.next_guest() if r < 0.7 else sched.next_fiber()
            trace.append(("run", f and f.fid, sched.stats.seq, sched.stats.work, sched.runnable))
        elif r < 0.45:
            sched.park(cur, _Sync())
            if blocked and rng.random() < 0.8:
                w = rng.choice(blocked)
                if defer:
                    _wake_deferred(sched, w)
                else:
                    sched.committed(w, 0)
        elif r < 0.7:
            sched.yield_(cur)
        elif r < 0.8:
            if blocked:                                 # an interrupt wakes someone while cur runs
                sched.committed(rng.choice(blocked), 0)
        elif r < 0.85 and len(live) > 1:
            victims = [b for b in live if b is not cur.container]
            if victims:
                sched.kill_container(rng.choice(victims))
        elif r < 0.87:
            sched.spawn_guest(object(), rng.choice(boxes))
        elif r < 0.95:
            sched.rotate(cur)                           # the fiber timer: its container's turn is held
        else:
            sched.requeue_front(cur)
            if rng.random() < 0.5:
                sched.slice_expired()
    trace.append(("end", sched.runnable, sched.work, sched.stats.seq, sched.wakeups))
    return trace, pushes


@pytest.mark.parametrize("seed", range(25))
def test_a_deferred_wakeup_schedules_as_a_queued_one(policy: str, seed: int) -> None:
    queued, pushes_queued = _schedule(policy, seed, defer=False)
    deferred, pushes_deferred = _schedule(policy, seed, defer=True)
    assert deferred == queued
    if policy == "global":
        assert pushes_deferred <= pushes_queued


def _counting_push(sched: Scheduler) -> list[int]:
    count = [0]
    real = sched._policy.push

    def push(f: Any, tick: int) -> None:
        count[0] += 1
        real(f, tick)

    sched._policy.push = push
    return count


def test_the_hand_off_skips_the_heaps_when_nothing_else_runs() -> None:
    """Global policy, a ping-pong: each side wakes the other and blocks; the
    other is switched to without ever being queued."""
    sched = Scheduler(Clock(), "global")
    box = Box("c")
    a, b = sched.spawn_guest(object(), box), sched.spawn_guest(object(), box)
    assert sched.next_fiber() is a
    sched.park(a, _Sync())
    assert sched.next_fiber() is b
    pushes = _counting_push(sched)
    cur, other = b, a
    for _ in range(20):
        _wake_deferred(sched, other)
        sched.park(cur, _Sync())
        assert sched.next_guest() is other
        cur, other = other, cur
    assert pushes[0] == 0


def test_a_runnable_fiber_goes_before_the_deferred_one() -> None:
    sched = Scheduler(Clock(), "global")
    box = Box("c")
    a, b, c = (sched.spawn_guest(object(), box) for _ in range(3))
    assert sched.next_fiber() is a
    sched.park(a, _Sync())
    assert sched.next_fiber() is b                      # c stays queued
    pushes = _counting_push(sched)
    _wake_deferred(sched, a)
    sched.park(b, _Sync())
    assert sched.next_guest() is c                      # queued before a woke
    assert pushes[0] == 1 and sched.deferred is None
    sched.yield_(c)
    assert sched.next_fiber() is a
