"""The fiber scheduler: both policies on one suite (fairness, priorities, prioritised
wakeups, no starvation, blocked fibers cost nothing), exits and kills, kernel fibers."""
from __future__ import annotations

import itertools
from typing import Any

import pytest
from kernelsim import Box, Sim, live_timers
from vmk.kernel.channel import ChannelTable, recv, send
from vmk.kernel.events import (
    KERNEL,
    Condition,
    IrqSource,
    KernelError,
    always,
    choice,
    cond_wait,
    irq,
    join,
    never,
    timeout,
    with_nack,
)
from vmk.kernel.fiber import KERNEL_PRIORITY, Fiber, FiberState
from vmk.kernel.scheduler import AGING, BLOCKED, QUANTUM, Completed, Scheduler
from vmk.kernel.syscall_table import Errno
from vmk.machine.clock import Clock


def yielder(n: int | None):  # type: ignore[no-untyped-def]
    """Yield the CPU n times (forever if None), then end."""
    i = 0
    while n is None or i < n:
        yield None
        i += 1


def dispatch_until(sim: Sim, done: list[Fiber], limit: int) -> int:
    """Dispatch until every fiber of ``done`` has ended; returns the dispatch count."""
    for n in range(1, limit + 1):
        assert sim.dispatch() is not None, "nothing runnable"
        if all(f.done for f in done):
            return n
    raise AssertionError(f"not done after {limit} dispatches: {[f for f in done if not f.done]}")


# -- fairness at one priority -------------------------------------------------------------

def test_equal_priority_is_fifo_and_yield_is_round_robin(policy: str) -> None:
    sim = Sim(policy)
    for n in "abc":
        sim.kernel(yielder(2), n)
    sim.run()
    assert "".join(sim.trace) == "abcabcabc"
    box = Box("c")
    sim.trace.clear()
    for n in "xyz":
        sim.guest(yielder(2), box, n)
    sim.run()
    assert "".join(sim.trace) == "xyzxyzxyz"


def test_containers_of_one_priority_take_turns(policy: str) -> None:
    sim = Sim(policy)
    boxes = [Box(n) for n in "ABC"]
    fs = [sim.guest(yielder(20), b, b.name) for b in boxes]
    dispatch_until(sim, fs, 1000)
    longest = max(len(list(run)) for _, run in itertools.groupby(sim.trace))
    assert longest == (1 if policy == "global" else QUANTUM)
    assert sorted(sim.trace) == sorted("ABC" * 21)


# -- priorities ------------------------------------------------------------------------------

def test_prioritised_wakeups(policy: str) -> None:
    sim = Sim(policy)
    src = IrqSource(4, "com1")
    boxes = {p: Box(f"prio{p}", p) for p in (1, 3, 2)}
    got: dict[str, Any] = {}

    def waiter(name: str, source: IrqSource):  # type: ignore[no-untyped-def]
        got[name] = yield irq(source)
    for box in boxes.values():              # they block in the order 1, 3, 2
        sim.guest(waiter(box.name, src), box, box.name)
        sim.run()
    assert sim.trace == ["prio1", "prio3", "prio2"]
    assert [w.sync.fiber.name for w in src.waiters] == ["prio1", "prio3", "prio2"]
    sim.trace.clear()
    assert src.fire() == 3                  # one IRQ wakes all three
    sim.run()
    assert sim.trace == ["prio3", "prio2", "prio1"]
    assert got == {"prio1": 1, "prio2": 1, "prio3": 1}

    # a burst of several IRQs, the least urgent first
    low, high = IrqSource(3), IrqSource(4)
    sim.trace.clear()
    sim.guest(waiter("low", low), boxes[1], "low")
    sim.guest(waiter("high", high), boxes[3], "high")
    sim.run()
    assert sim.trace == ["high", "low"]
    sim.trace.clear()
    low.fire()
    high.fire()
    sim.run()
    assert sim.trace == ["high", "low"]


def test_a_busy_fiber_cannot_starve_its_peers(policy: str) -> None:
    sim = Sim(policy)
    a, b = Box("A"), Box("B")
    sim.guest(yielder(None), a, "busy")
    peers = [sim.guest(yielder(5), a, "peer"), sim.guest(yielder(10), b, "other")]
    peers.append(sim.kernel(yielder(10), "kernel"))
    n = dispatch_until(sim, peers, 500)
    assert n <= 60


def test_aging_bounds_the_wait_of_a_less_urgent_fiber(policy: str) -> None:
    sim = Sim(policy)
    urgent, lazy = Box("urgent", 3), Box("lazy", 0)
    for i in range(3):
        sim.guest(yielder(None), urgent, f"busy{i}")
    late = sim.guest(yielder(0), lazy, "late")
    n = dispatch_until(sim, [late], 1000)
    bound = 3 * AGING + 3 + (QUANTUM if policy == "per-container" else 0)
    assert n <= bound
    # and strict priority holds when nobody has waited long
    sim2 = Sim(policy)
    sim2.guest(yielder(0), lazy, "lazy")
    sim2.guest(yielder(0), urgent, "urgent")
    sim2.run()
    assert sim2.trace == ["urgent", "lazy"]


def test_a_flooding_container_cannot_starve_another(policy: str) -> None:
    sim = Sim(policy)
    flood, victim = Box("flood"), Box("victim")
    for i in range(50):
        sim.guest(yielder(None), flood, f"f{i}")
    v = sim.guest(yielder(10), victim, "victim")
    n = dispatch_until(sim, [v], 2000)
    if policy == "per-container":
        assert n <= 3 * QUANTUM + 10
    else:
        assert n <= 11 * 51


# -- blocked fibers cost nothing ----------------------------------------------------------------

def _work_with_blocked(policy: str, n_blocked: int, dispatches: int) -> tuple[int, int]:
    sim = Sim(policy)
    table = ChannelTable(1)
    ch = table.create()
    cond = Condition()
    box = Box("sleepy")

    def sleeper(i: int):  # type: ignore[no-untyped-def]
        kind = i % 4
        if kind == 0:
            yield recv(ch)
        elif kind == 1:
            yield timeout(10 ** 12 + i)
        elif kind == 2:
            yield cond_wait(cond)
        else:
            yield never()
    for i in range(n_blocked):
        if i % 2:
            sim.kernel(sleeper(i), f"s{i}")
        else:
            sim.guest(sleeper(i), box, f"s{i}")
    sim.run(until=0)
    assert sum(1 for _ in sim.sched.blocked()) == n_blocked
    sim.guest(yielder(None), Box("busy"), "busy1")
    sim.kernel(yielder(None), "busy2")
    before = sim.sched.work
    for _ in range(dispatches):
        assert sim.dispatch() is not None
    return sim.sched.work - before, sim.sched.runnable


def test_blocked_fibers_cost_nothing(policy: str) -> None:
    few, _ = _work_with_blocked(policy, 8, 1000)
    many, runnable = _work_with_blocked(policy, 10_000, 1000)
    assert many == few                       # the same work whatever the number of blocked fibers
    assert many <= 4 * 1000                  # and a small constant per dispatch
    assert runnable == 2


# -- exits, joins, kills ------------------------------------------------------------------------

def test_exit_wakes_joiners_and_join_after_exit(policy: str) -> None:
    sim = Sim(policy)
    box = Box("c")

    def worker():  # type: ignore[no-untyped-def]
        yield timeout(100)
        return 7
    w = sim.guest(worker(), box, "worker")
    got: list[Any] = []

    def joiner():  # type: ignore[no-untyped-def]
        got.append(((yield join(w)), sim.clock.now))
    sim.guest(joiner(), box, "joiner")
    sim.run()
    assert got == [(7, 100)] and w.done and w.exit_value == 7
    late = sim.guest(iter(()), box, "late")       # type: ignore[arg-type]
    assert sim.sched.next_fiber() is late
    assert sim.sched.sync(late, join(w)) == Completed(7)
    assert sim.sched.fiber(w.fid) is w            # a guest fiber stays until reaped
    sim.sched.exit(late, 0)
    sim.sched.reap(w)
    assert sim.sched.fiber(w.fid) is None


def test_kill_container_ends_its_fibers_and_wakes_joiners(policy: str) -> None:
    sim = Sim(policy)
    table = ChannelTable(2)
    ch = table.create()
    a, b = Box("a"), Box("b")
    nacks: list[Any] = []

    def with_nack_recv(nack: Any) -> Any:
        nacks.append(nack)
        return recv(ch)

    def blocked_recv():  # type: ignore[no-untyped-def]
        yield choice(with_nack(with_nack_recv), timeout(5000))

    def sleeper():  # type: ignore[no-untyped-def]
        yield timeout(10 ** 6)
    g1 = sim.guest(blocked_recv(), a, "g1")
    g3 = sim.guest(sleeper(), a, "g3")
    got: list[Any] = []

    def kernel_joiner():  # type: ignore[no-untyped-def]
        got.append(("kernel", (yield join(g1)), sim.clock.now))

    def guest_joiner():  # type: ignore[no-untyped-def]
        got.append(("guest", (yield join(g3)), sim.clock.now))
    sim.kernel(kernel_joiner(), "kj")
    sim.guest(guest_joiner(), b, "gj")
    sim.run(until=20)
    assert all(f.state is FiberState.BLOCKED for f in sim.sched.fibers.values())
    g2 = sim.guest(yielder(3), a, "g2")          # runnable, never runs
    sim.trace.clear()
    killed = sim.sched.kill_container(a, exit_value=-9)
    assert [f.name for f in killed] == ["g1", "g3", "g2"]
    assert all(f.done and f.exit_value == -9 for f in killed) and g2.done
    assert not ch.recvq and live_timers(sim.clock) == 0
    assert nacks[0].cond.signalled                # the aborted sync's nack fires
    assert sim.sched.fibers_of(a) == [] and all(sim.sched.fiber(f.fid) is None for f in killed)
    sim.run()
    assert sorted(got) == [("guest", -9, 20), ("kernel", -9, 20)]
    assert sorted(sim.trace) == ["gj", "kj"]


def test_a_guest_ending_its_own_container_while_running(policy: str) -> None:
    sim = Sim(policy)
    a = Box("a")
    g = sim.guest(iter(()), a, "g")             # type: ignore[arg-type]
    other = sim.guest(iter(()), a, "other")     # type: ignore[arg-type]
    assert sim.sched.next_fiber() is g
    sim.sched.kill_container(a, exit_value=3)   # the exit syscall
    assert sim.sched.running is None and g.done and other.done
    assert sim.sched.next_fiber() is None


def test_a_kernel_fiber_killing_its_own_container() -> None:
    sim = Sim()
    a = Box("a")
    closed: list[bool] = []

    def suicidal():  # type: ignore[no-untyped-def]
        try:
            sim.sched.kill_container(a)
            yield timeout(5)
            closed.append(False)
        finally:
            closed.append(True)
    f = sim.kernel(suicidal(), "k", container=a)
    sim.run()
    assert f.done and closed == [True] and sim.crashes == []


# -- kernel fibers --------------------------------------------------------------------------------

def test_waiting_on_describes_the_sync(sim: Sim) -> None:
    table = ChannelTable(4)
    table.create()
    ch = table.create()
    cond = Condition("disk ready")

    def target():  # type: ignore[no-untyped-def]
        yield never()
    t = sim.kernel(target(), "t")

    def f(op: Any):  # type: ignore[no-untyped-def]
        yield op
    fs = [sim.kernel(f(choice(recv(ch), timeout(1200))), "a"),
          sim.kernel(f(choice(join(t), cond_wait(cond))), "c"),
          sim.kernel(f(with_nack(lambda nack: nack)), "d")]
    sim.run(until=0)
    assert [x.waiting_on for x in fs] == [
        "recv on channel 1 | timeout at 1200 ns",
        f"join fiber {t.fid} | wait on disk ready",
        "nack",
    ]
    assert t.waiting_on == "never" and "never" in repr(t) and "blocked" in repr(t)


def test_waiting_on_for_a_send_and_an_irq(sim: Sim) -> None:
    table = ChannelTable(1)
    ch = table.create()

    def f():  # type: ignore[no-untyped-def]
        yield choice(send(ch, b"x"), irq(IrqSource(3, "com2")), timeout(7))
    x = sim.kernel(f(), "x")
    sim.run(until=0)
    assert x.waiting_on == "send on channel 0 | irq 3 (com2) | timeout at 7 ns"
    sim.run()
    assert x.done and x.waiting_on is None


def test_a_crashing_kernel_fiber_ends_alone(sim: Sim) -> None:
    def crasher():  # type: ignore[no-untyped-def]
        yield timeout(10)
        raise ValueError("driver bug")

    def survivor():  # type: ignore[no-untyped-def]
        for _ in range(3):
            yield timeout(10)
        return "ok"
    c = sim.kernel(crasher(), "crasher")
    s = sim.kernel(survivor(), "survivor")
    got: list[Any] = []

    def joiner():  # type: ignore[no-untyped-def]
        got.append((yield join(c)))
    sim.kernel(joiner(), "joiner")
    sim.run()
    assert c.done and isinstance(c.error, ValueError) and got == [c.error]
    assert s.done and s.exit_value == "ok"
    assert len(sim.crashes) == 1 and "driver bug" in sim.crashes[0]


def test_yielding_a_non_operation_raises_in_the_fiber(sim: Sim) -> None:
    out: list[Any] = []

    def f():  # type: ignore[no-untyped-def]
        try:
            yield 42
        except TypeError as e:
            out.append("TypeError" if "not an operation" in str(e) else e)
        out.append((yield always("fine")))
    sim.kernel(f(), "f")
    sim.run()
    assert out == ["TypeError", "fine"]


def test_run_kernel_fibers_runs_rendezvous_chains_but_yields_once(sim: Sim) -> None:
    table = ChannelTable(2)
    ping, pong = table.create(), table.create()
    log: list[str] = []

    def a():  # type: ignore[no-untyped-def]
        for i in range(5):
            yield send(ping, i)
            log.append(f"a{(yield recv(pong))}")

    def b():  # type: ignore[no-untyped-def]
        for _ in range(5):
            v = yield recv(ping)
            yield send(pong, v * 10)
    box = Box("g")
    g = sim.guest(iter(()), box, "g")            # type: ignore[arg-type]
    assert sim.sched.next_fiber() is g            # the HAL runs g; an interrupt comes
    sim.kernel(a(), "a")
    sim.kernel(b(), "b")
    busy = sim.kernel(yielder(None), "busy")
    steps = sim.sched.run_kernel_fibers()
    assert log == ["a0", "a10", "a20", "a30", "a40"]
    assert busy.state is FiberState.RUNNABLE and steps < 30
    assert sim.sched.running is g and g.state is FiberState.RUNNING
    assert sim.sched.run_kernel_fibers(max_steps=1) == 1


def test_kernel_fibers_with_priorities(sim: Sim) -> None:
    sim.kernel(yielder(0), "low", priority=0)
    sim.kernel(yielder(0), "high", priority=5)
    sim.run()
    assert sim.trace == ["high", "low"]
    # pid 0's fibers outrank every container (0..255) unless told otherwise
    sim.trace.clear()
    sim.guest(yielder(0), Box("high", 200), "guest")
    driver = sim.kernel(yielder(0), "driver")
    assert driver.priority == KERNEL_PRIORITY == 255
    sim.run()
    assert sim.trace == ["driver", "guest"]


# -- the container scheduler's side ------------------------------------------------------------------

def test_pick_container_round_robin_and_priority() -> None:
    sim = Sim("per-container")
    boxes = [Box("A"), Box("B"), Box("D")]
    for b in boxes:
        sim.guest(yielder(None), b, b.name)
    assert [sim.sched.pick_container().name for _ in range(4)] == ["A", "B", "D", "A"]
    urgent = Box("C", 9)
    sim.guest(yielder(None), urgent, "C")
    assert sim.sched.pick_container() is urgent
    # the HAL's time slice: the current container goes behind its peers
    sim.sched.slice_expired()
    sim.trace.clear()
    for _ in range(QUANTUM + 1):
        sim.dispatch()
    assert sim.trace == ["C"] * QUANTUM + ["C"]          # the only container of priority 9
    sim.sched.kill_container(urgent)
    sim.sched.slice_expired()
    sim.trace.clear()
    sim.dispatch()
    sim.sched.slice_expired()
    sim.dispatch()
    assert sim.trace[0] != sim.trace[1]
    sim.kernel(yielder(0), "k")
    assert KERNEL in [sim.sched.pick_container() for _ in range(4)]


def test_global_pick_container_tells_who_runs_next() -> None:
    sim = Sim("global")
    a = Box("A", 2)
    sim.guest(yielder(0), a, "a")
    assert sim.sched.pick_container() is a
    sim.kernel(yielder(0), "k")
    assert sim.sched.pick_container() is KERNEL
    sim.sched.slice_expired()                   # harmless under the global policy


def test_preconditions_and_errors() -> None:
    clock = Clock()
    with pytest.raises(ValueError):
        Scheduler(clock, "lottery")
    sched = Scheduler(clock)
    with pytest.raises(TypeError):
        sched.spawn_kernel(lambda: None)        # type: ignore[arg-type]
    with pytest.raises(ValueError):
        sched.spawn_guest(object(), None)
    g = sched.spawn_guest(object(), Box("c"))
    other = sched.spawn_guest(object(), Box("d"))
    assert sched.next_fiber() is g
    with pytest.raises(AssertionError):
        sched.next_fiber()                      # g is still running
    with pytest.raises(AssertionError):
        sched.sync(other, always(1))            # only the running fiber syncs
    sched.yield_(g)
    assert sched.next_fiber() is other


def test_guest_errors_become_negative_errno(sim: Sim) -> None:
    table = ChannelTable(1)
    ch = table.create()
    box = Box("c")
    ch.hold(box)
    g = sim.guest(iter(()), box, "g")          # type: ignore[arg-type]
    assert sim.sched.next_fiber() is g
    assert sim.sched.sync(g, recv(ch)) is BLOCKED
    ch.release(KERNEL)                          # the other side (pid 0) lets go
    assert g.result == -Errno.EPIPE and isinstance(g.error, KernelError)


def test_dynamic_container_priority(policy: str) -> None:
    sim = Sim(policy)
    a, b = Box("a", 5), Box("b", 5)
    src = IrqSource(1)

    def w():  # type: ignore[no-untyped-def]
        yield irq(src)
    sim.guest(w(), a, "a")
    sim.guest(w(), b, "b")
    sim.run()
    sim.trace.clear()
    b.priority = 9                              # read when the fiber is queued
    src.fire()
    sim.run()
    assert sim.trace == ["b", "a"]
