"""Concurrent ML operations on a virtual clock: exactly one arm commits, combinators,
exact timeouts, and a property test over random operation mixes."""
from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernelsim import Box, Sim, live_timers
from vmk.kernel.channel import ChannelTable, recv, send
from vmk.kernel.events import (
    Condition,
    IrqSource,
    KernelError,
    OpState,
    always,
    at_time,
    choice,
    cond_wait,
    guard,
    irq,
    join,
    never,
    timeout,
    with_nack,
    wrap,
    wrap_handler,
)
from vmk.kernel.fiber import FiberState
from vmk.kernel.scheduler import BLOCKED, Completed
from vmk.kernel.syscall_table import Errno


def recorded(op: Any, log: list[Any], tag: Any) -> Any:
    """``op`` whose commit is logged as (tag, value)."""
    def f(v: Any) -> Any:
        log.append((tag, v))
        return (tag, v)
    return wrap(op, f)


# -- exactly one arm ------------------------------------------------------------------

def test_first_enabled_arm_commits_and_no_other(sim: Sim) -> None:
    log: list[Any] = []
    out: list[Any] = []

    def f():  # type: ignore[no-untyped-def]
        out.append((yield choice(recorded(always(1), log, "a"), recorded(always(2), log, "b"))))
        out.append((yield choice(recorded(never(), log, "n"), recorded(always(3), log, "c"))))
    sim.kernel(f(), "f")
    sim.run()
    assert out == [("a", 1), ("c", 3)]
    assert log == [("a", 1), ("c", 3)]


RENDEZVOUS_CASES = {
    # name: (program of A, program of B, expected A value, expected B value)
    "crossed choices": (
        lambda c: choice(recorded(send(c[0], "a"), [], "s1"), recorded(recv(c[1]), [], "r2")),
        lambda c: choice(recorded(recv(c[0]), [], "r1"), recorded(send(c[1], "b"), [], "s2")),
        ("s1", 0), ("r1", "a")),
    "both sides offered, partner sends": (
        lambda c: choice(recorded(send(c[0], 1), [], "s"), recorded(recv(c[0]), [], "r")),
        lambda c: recorded(send(c[0], 2), [], "s"),
        ("r", 2), ("s", 0)),
    "both sides offered by both": (
        lambda c: choice(recorded(send(c[0], 1), [], "s"), recorded(recv(c[0]), [], "r")),
        lambda c: choice(recorded(send(c[0], 2), [], "s"), recorded(recv(c[0]), [], "r")),
        ("r", 2), ("s", 0)),
    "two recv arms on one channel": (
        lambda c: choice(recorded(recv(c[0]), [], "r0"), recorded(recv(c[0]), [], "r1")),
        lambda c: send(c[0], "x"),
        ("r0", "x"), 0),
    "two send arms on one channel": (
        lambda c: choice(recorded(send(c[0], 1), [], "s0"), recorded(send(c[0], 2), [], "s1")),
        lambda c: recv(c[0]),
        ("s0", 0), 1),
    "recv among channels and a timeout": (
        lambda c: choice(recorded(recv(c[0]), [], "r0"), recorded(recv(c[1]), [], "r1"),
                         recorded(timeout(50), [], "t")),
        lambda c: choice(recorded(send(c[1], "z"), [], "s1"), recorded(timeout(100), [], "t")),
        ("r1", "z"), ("s1", 0)),
    "partner too late, timeout wins": (
        lambda c: choice(recorded(recv(c[0]), [], "r"), recorded(timeout(5), [], "t")),
        lambda c: choice(recorded(send(c[0], 9), [], "s"), recorded(timeout(20), [], "t")),
        ("t", 0), ("t", 0)),
}


# "partner too late" only with A first: B first would meet A in time (order matters by design)
@pytest.mark.parametrize("case, b_first", [(case, b_first) for case in sorted(RENDEZVOUS_CASES)
                                           for b_first in (False, True)
                                           if not (b_first and case == "partner too late, timeout wins")])
def test_exactly_one_arm_commits_in_rendezvous(case: str, b_first: bool, policy: str) -> None:
    prog_a, prog_b, want_a, want_b = RENDEZVOUS_CASES[case]
    sim = Sim(policy)
    table = ChannelTable(4)
    chans = [table.create(), table.create()]
    got: dict[str, Any] = {}
    commits: dict[str, int] = defaultdict(int)

    def fiber(name: str, prog: Any, delay: int):  # type: ignore[no-untyped-def]
        if delay:
            yield timeout(delay)
        op = prog(chans)
        got[name] = yield wrap(op, lambda v: (commits.__setitem__(name, commits[name] + 1), v)[1])

    if case == "partner too late, timeout wins":
        sim.kernel(fiber("A", prog_a, 0), "A")
        sim.kernel(fiber("B", prog_b, 10), "B")
    elif b_first:
        sim.kernel(fiber("B", prog_b, 0), "B")
        sim.kernel(fiber("A", prog_a, 1), "A")
    else:
        sim.kernel(fiber("A", prog_a, 0), "A")
        sim.kernel(fiber("B", prog_b, 1), "B")
    sim.run()
    if b_first and case in ("both sides offered by both",):
        want_a, want_b = ("s", 0), ("r", 1)
    assert (got.get("A"), got.get("B")) == (want_a, want_b)
    assert dict(commits) == {"A": 1, "B": 1}
    for ch in chans:
        assert len(ch.sendq) == 0 and len(ch.recvq) == 0
    assert live_timers(sim.clock) == 0


def test_a_choice_never_matches_itself(sim: Sim) -> None:
    table = ChannelTable(1)
    c = table.create()

    def a():  # type: ignore[no-untyped-def]
        yield choice(send(c, 1), recv(c))
    fa = sim.kernel(a(), "a")
    sim.run()
    assert fa.state is FiberState.BLOCKED
    assert fa.waiting_on == "send on channel 0 | recv on channel 0"
    assert len(c.sendq) == 1 and len(c.recvq) == 1


def test_never_blocks_forever_and_describes_itself(sim: Sim) -> None:
    def f():  # type: ignore[no-untyped-def]
        yield never()
    fb = sim.kernel(f(), "f")
    sim.run(until=10**9)
    assert fb.state is FiberState.BLOCKED and fb.waiting_on == "never"


# -- wrap, guard, with_nack ----------------------------------------------------------------

def test_wrap_applies_to_the_chosen_value_innermost_first(sim: Sim) -> None:
    out: list[Any] = []

    def f():  # type: ignore[no-untyped-def]
        op = wrap(wrap(always(3), lambda v: v + 1), lambda v: v * 10)
        out.append((yield op))
        both = wrap(choice(wrap(timeout(10), lambda _: "t"), wrap(always(5), lambda v: ("a", v))), repr)
        out.append((yield both))
    sim.kernel(f(), "f")
    sim.run()
    assert out == [40, "('a', 5)"]


def test_guard_runs_at_sync_time_each_sync(sim: Sim) -> None:
    calls: list[int] = []

    def thunk() -> Any:
        calls.append(sim.clock.now)
        return timeout(100)
    op = guard(thunk)           # built once, at t = 0
    ends: list[int] = []

    def f():  # type: ignore[no-untyped-def]
        yield at_time(250)
        yield op
        ends.append(sim.clock.now)
        yield op
        ends.append(sim.clock.now)
    sim.kernel(f(), "f")
    assert calls == []
    sim.run()
    assert calls == [250, 350]
    assert ends == [350, 450]


def test_with_nack_fires_on_the_losers_not_on_the_winner(sim: Sim) -> None:
    table = ChannelTable(2)
    c = table.create()
    nacks: dict[str, Any] = {}

    def keep(name: str, op: Any) -> Any:
        def f(nack: Any) -> Any:
            nacks[name] = nack
            return op
        return with_nack(f)
    woke: list[tuple[str, int]] = []

    def client():  # type: ignore[no-untyped-def]
        v = yield choice(keep("recv", wrap(recv(c), lambda m: ("recv", m))),
                         keep("timeout", wrap(timeout(100), lambda _: "timeout")))
        woke.append((v, sim.clock.now))

    def server():  # type: ignore[no-untyped-def]
        yield timeout(1)                     # the client has synced by now
        yield nacks["recv"]
        woke.append(("nack recv", sim.clock.now))
    sim.kernel(client(), "client")
    sim.kernel(server(), "server")
    sim.run()
    # the nack is signalled inside the commit, so the server is queued first
    assert woke == [("nack recv", 100), ("timeout", 100)]
    assert nacks["recv"].cond.signalled and not nacks["timeout"].cond.signalled
    assert len(c.recvq) == 0


def test_with_nack_immediate_nested_and_fresh_per_sync(sim: Sim) -> None:
    seen: list[Any] = []

    def mk(tag: str, inner: Any) -> Any:
        def f(nack: Any) -> Any:
            seen.append((tag, nack))
            return inner
        return with_nack(f)
    op = choice(mk("outer", choice(mk("inner", never()), wrap(always(1), lambda v: "won"))), always(2))
    out: list[Any] = []

    def f():  # type: ignore[no-untyped-def]
        out.append((yield op))
        out.append((yield op))
    sim.kernel(f(), "f")
    sim.run()
    assert out == ["won", "won"]
    assert [t for t, _ in seen] == ["outer", "inner", "outer", "inner"]
    # the winner lies in "outer" but not in "inner"
    assert [n.cond.signalled for _, n in seen] == [False, True, False, True]
    assert seen[0][1].cond is not seen[2][1].cond


def test_wrap_handler_turns_a_failure_into_a_value(sim: Sim) -> None:
    table = ChannelTable(1)
    c = table.create()
    c.release()                                 # freed: every arm on it fails with EPIPE
    out: list[Any] = []

    def f():  # type: ignore[no-untyped-def]
        out.append((yield wrap_handler(wrap(recv(c), lambda v: "not called"), lambda e: -e.errno)))
        try:
            yield recv(c)
        except KernelError as e:
            out.append(e.errno)
    sim.kernel(f(), "f")
    sim.run()
    assert out == [-Errno.EPIPE, Errno.EPIPE]


def test_a_wrap_error_is_raised_in_the_fiber(sim: Sim) -> None:
    out: list[Any] = []

    def f():  # type: ignore[no-untyped-def]
        try:
            yield wrap(timeout(10), lambda v: 1 // 0)
        except ZeroDivisionError:
            out.append(sim.clock.now)
    sim.kernel(f(), "f")
    sim.run()
    assert out == [10]


def test_reentrant_commit_is_refused_by_the_claimed_flag(sim: Sim) -> None:
    cond = Condition("c")
    table = ChannelTable(1)
    ch = table.create()
    out: list[Any] = []

    def waiter():  # type: ignore[no-untyped-def]
        # When recv wins, its wrap signals `cond`, which this very sync also
        # waits on: the sync is CLAIMED then, so the cond arm cannot commit too.
        out.append((yield choice(wrap(recv(ch), lambda m: (cond.signal(), m)[1]),
                                 wrap(cond_wait(cond), lambda _: "cond"))))

    def other():  # type: ignore[no-untyped-def]
        yield cond_wait(cond)
        out.append("other woke")

    def sender():  # type: ignore[no-untyped-def]
        yield timeout(5)
        yield send(ch, "m")
    w = sim.kernel(waiter(), "w")
    sim.kernel(other(), "o")
    sim.kernel(sender(), "s")
    sim.run()
    assert sorted(out) == ["m", "other woke"]
    assert w.done and len(cond.waiters) == 0


# -- time -----------------------------------------------------------------------------------

def test_timeout_is_exact_to_the_ns() -> None:
    sim = Sim()
    ends: list[int] = []

    def f():  # type: ignore[no-untyped-def]
        yield at_time(500)
        yield timeout(1000)
        ends.append(sim.clock.now)
    fb = sim.kernel(f(), "f")
    sim.run(until=1499)
    assert sim.clock.now == 1499 and fb.state is FiberState.BLOCKED and ends == []
    assert fb.waiting_on == "timeout at 1500 ns"
    sim.run()
    assert ends == [1500]


def test_guest_timeout_relative_to_the_syscall(sim: Sim) -> None:
    box = Box("c")
    results: list[Any] = []

    def prog():  # type: ignore[no-untyped-def]
        results.append((yield timeout(1000)))
    g = sim.guest(prog(), box, "g")
    sim.clock.advance_to(500)
    f = sim.sched.next_fiber()
    assert f is g
    assert sim.sched.sync(g, timeout(1000)) is BLOCKED
    assert g.state is FiberState.BLOCKED and g.waiting_on == "timeout at 1500 ns"
    sim.advance(1499)
    assert g.state is FiberState.BLOCKED
    sim.advance(1500)
    assert g.state is FiberState.RUNNABLE and g.result == 0


@pytest.mark.parametrize("ns", [0, -5])
def test_timeout_zero_or_negative_is_immediate(sim: Sim, ns: int) -> None:
    ends: list[int] = []

    def f():  # type: ignore[no-untyped-def]
        yield at_time(70)
        ends.append((yield choice(wrap(timeout(ns), lambda _: "t"), always("a"))))
    sim.kernel(f(), "f")
    sim.run()
    assert ends == ["t"] and sim.clock.now == 70 and live_timers(sim.clock) == 0


def test_at_time(sim: Sim) -> None:
    ends: list[tuple[str, int]] = []

    def f():  # type: ignore[no-untyped-def]
        yield at_time(2000)
        ends.append(("abs", sim.clock.now))
        yield at_time(1000)                     # in the past: at once
        ends.append(("past", sim.clock.now))
        yield at_time(2000)                     # now: at once
        ends.append(("now", sim.clock.now))
    sim.kernel(f(), "f")
    sim.run()
    assert ends == [("abs", 2000), ("past", 2000), ("now", 2000)]


def test_a_losing_timer_is_disarmed(sim: Sim) -> None:
    table = ChannelTable(1)
    c = table.create()
    out: list[Any] = []

    def rx():  # type: ignore[no-untyped-def]
        out.append((yield choice(recv(c), wrap(timeout(1000), lambda _: "t"))))
        out.append((yield choice(wrap(timeout(1000), lambda _: "t"), always("a"))))

    def tx():  # type: ignore[no-untyped-def]
        yield timeout(10)
        yield send(c, "m")
    sim.kernel(rx(), "rx")
    sim.kernel(tx(), "tx")
    sim.run()
    assert out == ["m", "a"]
    assert live_timers(sim.clock) == 0
    assert sim.clock.now == 10                  # nothing left to wake up for


# -- conditions, IRQs, join ---------------------------------------------------------------------

def test_condition_broadcast_and_idempotent_signal(sim: Sim) -> None:
    cond = Condition("ready")
    woke: list[str] = []

    def w(name: str):  # type: ignore[no-untyped-def]
        yield cond_wait(cond)
        woke.append(name)
    for n in "abc":
        sim.kernel(w(n), n)
    sim.run()
    assert len(cond.waiters) == 3
    assert cond.signal() is True
    assert cond.signal() is False
    sim.kernel(w("late"), "late")
    sim.run()
    assert woke == ["a", "b", "c", "late"]


def test_irq_counts_and_accumulates(sim: Sim) -> None:
    src = IrqSource(4, "com1")
    got: list[tuple[str, int, int]] = []
    src.fire()
    src.fire(2)
    assert (src.fires, src.pending) == (3, 3)

    def driver(name: str, n: int):  # type: ignore[no-untyped-def]
        for _ in range(n):
            got.append((name, (yield irq(src)), sim.clock.now))
    sim.kernel(driver("d", 2), "d")
    sim.run()
    assert got == [("d", 3, 0)] and src.pending == 0
    e = sim.kernel(driver("e", 1), "e")
    sim.run()
    assert e.waiting_on == "irq 4 (com1)"
    sim.clock.advance_to(40)
    assert src.fire() == 2                      # broadcast: both drivers wake
    sim.run()
    assert got[1:] == [("d", 1, 40), ("e", 1, 40)]
    assert src.fires == 4 and src.pending == 0 and len(src.waiters) == 0


def test_join_waits_for_the_exit_value(sim: Sim) -> None:
    out: list[Any] = []

    def worker():  # type: ignore[no-untyped-def]
        yield timeout(30)
        return 42

    w = sim.kernel(worker(), "w")

    def joiner():  # type: ignore[no-untyped-def]
        out.append(((yield join(w)), sim.clock.now))
        out.append(((yield join(w)), sim.clock.now))    # already done: at once
    sim.kernel(joiner(), "j")
    sim.run()
    assert out == [(42, 30), (42, 30)]


def test_seeded_policy_rotates_the_start_arm() -> None:
    def run(seed: int) -> list[int]:
        sim = Sim(rng=random.Random(seed))
        out: list[int] = []

        def f():  # type: ignore[no-untyped-def]
            for _ in range(30):
                out.append((yield choice(always(0), always(1), always(2))))
        sim.kernel(f(), "f")
        sim.run()
        return out
    a, b = run(7), run(7)
    assert a == b and set(a) == {0, 1, 2}
    assert Sim().sched.rng is None              # default: deterministic first arm


def test_guest_sync_completes_or_blocks(sim: Sim) -> None:
    box = Box("c")
    g = sim.guest(iter(()), box, "g")          # type: ignore[arg-type]
    assert sim.sched.next_fiber() is g
    assert sim.sched.sync(g, wrap(always(5), lambda v: v + 1)) == Completed(6)
    assert g.state is FiberState.RUNNING
    r = sim.sched.sync(g, choice(never(), timeout(10)))
    assert r is BLOCKED and g.waiting_on == "timeout at 10 ns"
    sim.advance(10)
    assert g.state is FiberState.RUNNABLE and g.result == 0 and g.error is None


# -- property: random operation mixes ---------------------------------------------------------------

ARM = st.one_of(
    st.tuples(st.just("send"), st.integers(0, 2)),
    st.tuples(st.just("recv"), st.integers(0, 2)),
    st.tuples(st.just("timeout"), st.integers(-2, 300)),
    st.tuples(st.just("at"), st.integers(0, 600)),
    st.tuples(st.just("always"), st.just(0)),
    st.tuples(st.just("never"), st.just(0)),
    st.tuples(st.just("cond"), st.integers(0, 1)),
)
MODE = st.sampled_from(["plain", "plain", "nack", "guard"])
SYNC = st.lists(st.tuples(ARM, MODE), min_size=1, max_size=4)
FIBER = st.tuples(st.booleans(), st.integers(0, 40), st.lists(SYNC, min_size=1, max_size=4))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fibers=st.lists(FIBER, min_size=1, max_size=5),
       signals=st.lists(st.tuples(st.integers(0, 1), st.integers(0, 600)), max_size=2),
       policy=st.sampled_from(["global", "per-container"]))
def test_property_one_commit_per_sync_and_no_leaks(fibers: list[Any], signals: list[Any], policy: str) -> None:
    sim = Sim(policy)
    clock = sim.clock
    table = ChannelTable(3)
    chans = [table.create() for _ in range(3)]
    conds = [Condition("c0"), Condition("c1")]
    boxes = [Box("A", 2), Box("B", 5)]
    t0: dict[tuple[int, int], int] = {}
    commits: dict[tuple[int, int], list[tuple[int, Any, int]]] = defaultdict(list)
    done: dict[tuple[int, int], Any] = {}
    nacks: dict[tuple[int, int, int], Any] = {}

    def base(i: int, j: int, k: int, kind: str, arg: int) -> Any:
        if kind == "send":
            return send(chans[arg], (i, j, k))
        if kind == "recv":
            return recv(chans[arg])
        if kind == "timeout":
            return timeout(arg)
        if kind == "at":
            return at_time(arg)
        if kind == "always":
            return always("always")
        if kind == "never":
            return never()
        return cond_wait(conds[arg])

    def arm(i: int, j: int, k: int, spec: Any) -> Any:
        (kind, a), mode = spec

        def rec(v: Any) -> Any:
            commits[(i, j)].append((k, v, clock.now))
            return (k, v)

        def make() -> Any:
            return wrap(base(i, j, k, kind, a), rec)
        if mode == "guard":
            return guard(make)
        if mode == "nack":
            def f(nack: Any) -> Any:
                nacks[(i, j, k)] = nack
                return make()
            return with_nack(f)
        return make()

    def prog(i: int, delay: int, syncs: list[Any]):  # type: ignore[no-untyped-def]
        if delay:
            yield timeout(delay)
        for j, arms in enumerate(syncs):
            t0[(i, j)] = clock.now
            done[(i, j)] = yield choice(*[arm(i, j, k, s) for k, s in enumerate(arms)])

    def signaller():  # type: ignore[no-untyped-def]
        for c, t in sorted(signals, key=lambda x: x[1]):
            yield at_time(t)
            conds[c].signal()

    fs = []
    for i, (is_guest, delay, syncs) in enumerate(fibers):
        if is_guest:
            fs.append(sim.guest(prog(i, delay, syncs), boxes[i % 2], f"g{i}"))
        else:
            fs.append(sim.kernel(prog(i, delay, syncs), f"k{i}"))
    sim.kernel(signaller(), "signaller")
    sim.run(until=5000)

    sent: dict[tuple[int, int, int], int] = {}
    received: list[tuple[Any, int]] = []
    for i, (_, _, syncs) in enumerate(fibers):
        f = fs[i]
        n_done = sum(1 for j in range(len(syncs)) if (i, j) in done)
        assert all((i, j) in done for j in range(n_done)), "syncs complete in order"
        if n_done < len(syncs):
            assert f.state is FiberState.BLOCKED and f._sync is not None
            assert f._sync.state is OpState.WAITING
            assert commits[(i, n_done)] == []
        else:
            assert f.state is FiberState.DONE
        for j in range(len(syncs)):
            arms = syncs[j]
            if (i, j) not in done:
                for k in range(len(arms)):
                    if (i, j, k) in nacks:
                        assert not nacks[(i, j, k)].cond.signalled
                continue
            # exactly one arm committed, and it is the value the fiber got
            assert len(commits[(i, j)]) == 1
            k, v, when = commits[(i, j)][0]
            assert done[(i, j)] == (k, v)
            (kind, a), _ = arms[k]
            assert kind != "never"
            start = t0[(i, j)]
            if kind == "timeout":
                assert when == start + max(a, 0)
            elif kind == "at":
                assert when == max(start, a)
            elif kind == "send":
                sent[(i, j, k)] = a
                assert v == 0
            elif kind == "recv":
                received.append((v, a))
            # a timer arm that lost was not due before the commit (unless it was immediate)
            for kk, ((kind2, a2), _) in enumerate(arms):
                if kk != k and when > start and kind2 in ("timeout", "at"):
                    deadline = start + a2 if kind2 == "timeout" else a2
                    assert deadline >= when
                if kk != k and kind2 == "always":
                    assert when == start
            # nacks: signalled exactly for the arms that lost
            for kk in range(len(arms)):
                if (i, j, kk) in nacks:
                    assert nacks[(i, j, kk)].cond.signalled == (kk != k)
    # every message received was sent by a committed send on that channel, once
    assert sorted(m for m, _ in received) == sorted(sent)
    for m, ch in received:
        assert sent[m] == ch

    # no leaked queue entries or timers: only blocked fibers' current syncs are parked
    blocked_syncs = {f._sync for f in fs if f.state is FiberState.BLOCKED}
    want_chan = want_cond = want_timers = 0
    for f in fs:
        if f.state is FiberState.BLOCKED:
            for a in f._sync.arms:  # type: ignore[union-attr]
                d = a.op.describe(f._sync)
                if d.startswith(("send", "recv")):
                    want_chan += 1
                elif d.startswith(("timeout", "until")):
                    want_timers += 1
                elif d.startswith("wait on"):
                    want_cond += 1
    entries = [w for ch in chans for q in (ch.sendq, ch.recvq) for w in q]
    assert len(entries) == want_chan
    assert all(w.sync in blocked_syncs and w.sync.state is OpState.WAITING for w in entries)
    assert sum(len(c.waiters) for c in conds) == want_cond
    assert live_timers(clock) == want_timers
    for ch in chans:
        if ch.sendq and ch.recvq:           # only a sync offering both sides to itself
            assert len({w.sync for q in (ch.sendq, ch.recvq) for w in q}) == 1
    for c in conds:
        assert not (c.signalled and c.waiters)
