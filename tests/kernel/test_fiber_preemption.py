"""Fibers are cooperative inside a container; ``fiber_preemption_ns`` makes them round robin.

The scheduler's side on the kernel simulator (``requeue_front`` / ``rotate``
under both policies), then pid 0 on the machine: a container whose first fiber
spins for ever without a syscall next to a second container that prints, on
virtual time (1 ns per instruction), with the expected times computed from
the image's settings."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from kernelsim import Box, Sim
from vmk.boot.vmkimage import read_image
from vmk.hal.context import GuestContext
from vmk.kernel.events import Condition, IrqSource, cond_wait, irq
from vmk.kernel.fiber import Fiber, FiberState
from vmk.kernel.pid0 import VMKernel
from vmk.kernel.scheduler import AGING, BLOCKED
from vmk.machine.pc import Machine, MachineConfig
from vmk.testing.harness import SerialCapture
from vmk.tools.build import build

# -- the scheduler: requeue_front and rotate ------------------------------------------------------


def spinner():  # type: ignore[no-untyped-def]
    """A guest fiber that never syncs: the test drives it with next_fiber and the preemptions."""
    while True:
        yield None


def _three(policy: str) -> tuple[Sim, Fiber, Fiber, Fiber]:
    """Container C with fibers a and b, container D with d; queued a, d, b.

    (Under the global policy the share is per runnable fiber: queued a, b, d,
    C would have two turns before D's first.)"""
    sim = Sim(policy)
    c, d = Box("C"), Box("D")
    a = sim.guest(spinner(), c, "a")
    dd = sim.guest(spinner(), d, "d")
    b = sim.guest(spinner(), c, "b")
    return sim, a, b, dd


def test_a_preempted_fiber_goes_on_before_its_siblings(policy: str) -> None:
    sim, a, b, d = _three(policy)
    sched = sim.sched
    assert sched.next_fiber() is a
    order = []
    for _ in range(6):                          # six time slices: the HAL preempts whoever runs
        cur = sched.running
        assert cur is not None
        sched.requeue_front(cur)
        sched.slice_expired()
        nxt = sched.next_fiber()
        assert nxt is not None
        order.append(nxt.name)
    # The containers alternate (no starvation); C always goes on with a, never b.
    assert "b" not in order and "d" in order
    assert b.state is FiberState.RUNNABLE and sched.runnable == 2


def test_rotate_hands_the_cpu_to_the_next_sibling_in_the_same_turn(policy: str) -> None:
    sim, a, b, d = _three(policy)
    sched = sim.sched
    assert sched.next_fiber() is a
    sched.rotate(a)                             # the fiber timer: a goes behind b, C keeps its turn
    assert sched.next_fiber() is b
    sched.rotate(b)
    assert sched.next_fiber() is a
    sched.requeue_front(a)                      # then the slice ends: D's turn, then a again
    sched.slice_expired()
    assert sched.next_fiber() is d
    sched.requeue_front(d)
    sched.slice_expired()
    assert sched.next_fiber() is a


def test_rotate_of_a_lone_fiber_keeps_its_container_on_the_cpu(policy: str) -> None:
    sim = Sim(policy)
    a = sim.guest(spinner(), Box("C"), "a")
    sim.guest(spinner(), Box("D"), "d")
    assert sim.sched.next_fiber() is a
    sim.sched.rotate(a)
    assert sim.sched.next_fiber() is a


def test_yield_lets_a_sibling_run(policy: str) -> None:
    sim, a, b, d = _three(policy)
    sched = sim.sched
    assert sched.next_fiber() is a
    sched.yield_(a)
    nxt = sched.next_fiber()
    assert nxt is not None
    if policy == "per-container":
        assert nxt is b                         # C stays current: its next fiber
    else:
        assert nxt is d                         # global: C's turn ended, D's slot came first
        sched.yield_(d)
        assert sched.next_fiber() is b


def test_a_wakeup_preemption_keeps_the_fiber_first_of_its_container(policy: str) -> None:
    """The HAL stops the running fiber when an interrupt wakes someone.  Per-container:
    the container keeps the CPU until its slice ends.  Global: it goes behind the
    fibers already queued, like a yield.  Either way its sibling does not run first."""
    sim = Sim(policy)
    c, peer, urgent = Box("C", 4), Box("peer", 4), Box("urgent", 9)
    src_peer, src_urgent = IrqSource(3), IrqSource(4)

    def waiter(src: IrqSource):  # type: ignore[no-untyped-def]
        while True:
            yield irq(src)
    w_peer = sim.guest(waiter(src_peer), peer, "peer")
    w_urgent = sim.guest(waiter(src_urgent), urgent, "urgent")
    sim.run()                                   # both park on their IRQ
    a = sim.guest(spinner(), c, "a")
    sched = sim.sched
    assert sched.next_fiber() is a
    src_peer.fire()
    src_urgent.fire()
    sim.guest(spinner(), c, "b")                # then a spawns a sibling
    sched.requeue_front(a)
    if policy == "per-container":
        assert sched.next_fiber() is a          # the current container keeps the CPU ...
        sched.requeue_front(a)
        sched.slice_expired()                   # ... until its slice ends
    assert sched.next_fiber() is w_urgent       # then by priority ...
    assert sched.sync(w_urgent, irq(src_urgent)) is BLOCKED
    assert sched.next_fiber() is w_peer         # ... and FIFO
    assert sched.sync(w_peer, irq(src_peer)) is BLOCKED
    assert sched.next_fiber() is a              # C goes on with a, not b


def test_a_held_turn_does_not_age_while_its_container_runs() -> None:
    """Global policy: a container whose fiber the fiber timer rotated many times in one
    slice still lets a more urgent wakeup in, however many dispatches its turn lasted."""
    sim = Sim("global")
    src = IrqSource(4)

    def waiter():  # type: ignore[no-untyped-def]
        while True:
            yield irq(src)
    urgent = sim.guest(waiter(), Box("urgent", 2), "urgent")
    sim.run()
    a = sim.guest(spinner(), Box("C", 1), "a")
    sched = sim.sched
    assert sched.next_fiber() is a
    for _ in range(10 * AGING):                 # far beyond the aging window of one priority level
        sched.rotate(a)
        assert sched.next_fiber() is a
    src.fire()
    sched.rotate(a)
    assert sched.pick_container() is urgent.container
    assert sched.next_fiber() is urgent


def test_killing_a_container_with_a_preempted_fiber(policy: str) -> None:
    sim, a, b, d = _three(policy)
    sched = sim.sched
    assert sched.next_fiber() is a
    sched.requeue_front(a)
    sched.kill_container(a.container)
    assert sched.runnable == 1
    assert sched.next_fiber() is d
    sched.requeue_front(d)
    assert sched.next_fiber() is d


def test_random_preemptions_keep_the_books(policy: str) -> None:
    """A seeded mix of dispatches, preemptions, rotations, yields, blocks, wakeups,
    exits and kills: the runnable count is always right, nothing is lost or run
    twice, and a preempted fiber is always the next of its container to run."""
    rng = random.Random(1234)
    sim = Sim(policy)
    sched = sim.sched
    boxes = [Box(f"C{i}", rng.choice([1, 1, 2])) for i in range(4)]
    conds: dict[Fiber, Condition] = {}
    first: dict[Any, Fiber] = {}            # container -> the preempted fiber that must run next
    seen = {"requeue_front": 0, "rotate": 0, "first": 0}

    def spawn() -> None:
        f = sim.guest(spinner(), rng.choice(boxes))
        conds[f] = Condition()
    for _ in range(12):
        spawn()
    for _ in range(10_000):
        cur = sched.running
        if cur is None:
            f = sched.next_fiber()
            runnable = [g for g in sched.fibers.values() if g.state is FiberState.RUNNABLE]
            assert sched.runnable == len(runnable)
            if f is None:
                assert not runnable
                for g in [g for g in conds if g.state is FiberState.BLOCKED]:
                    conds[g].signal()            # wake everyone
                spawn()
                continue
            assert f.state is FiberState.RUNNING
            expected = first.pop(f.container, None)
            assert expected is None or f is expected, (f, expected)
            seen["first"] += expected is not None
            continue
        op = rng.random()
        if op < 0.35:
            sched.requeue_front(cur)
            seen["requeue_front"] += 1
            first[cur.container] = cur
            if rng.random() < 0.5:
                sched.slice_expired()
        elif op < 0.55:
            sched.rotate(cur)
            seen["rotate"] += 1
        elif op < 0.65:
            sched.yield_(cur)
        elif op < 0.85:
            conds[cur] = Condition()            # a latch: a fresh one per wait
            assert sched.sync(cur, cond_wait(conds[cur])) is BLOCKED
        elif op < 0.9:
            sched.exit(cur)
            sched.reap(cur)
        elif op < 0.995:
            spawn()
            continue
        else:
            first.pop(cur.container, None)
            boxes[boxes.index(cur.container)] = Box(f"{cur.container.name}'", cur.container.priority)
            sched.kill_container(cur.container)
        if rng.random() < 0.5:
            blocked = [g for g in conds if g.state is FiberState.BLOCKED]
            if blocked:
                conds[rng.choice(blocked)].signal()
    assert sched.runnable == sum(1 for g in sched.fibers.values() if g.state is FiberState.RUNNABLE)
    assert min(seen.values()) > 500, seen


# -- pid 0 on the machine -------------------------------------------------------------------------

TIMESLICE = 1_000_000
NS_PER_INSN = MachineConfig().ns_per_insn
SLACK = 2 * NS_PER_INSN          # a switch is seen by the next fiber's first syscall: two instructions on

PAIR = """
    lea rdi, [rip + sibling]
    mov rsi, 0
    mov rdx, 0
    mov rax, SYS_FIBER_SPAWN
    syscall
spin:
    inc r15
    jmp spin
sibling:
    mov rax, SYS_TIME
    syscall
    lea rbx, [rip + started]
    mov [rbx], rax
    lea rdi, [rip + msg]
    mov rsi, 1
    mov rax, SYS_CONSOLE_WRITE
    syscall
spin2:
    inc r14
    jmp spin2
started:
    .quad 0
msg:
    .ascii "B"
"""

LONE = """
spin:
    inc r15
    jmp spin
"""

# Prints a 'd' about every 200 us (100,000 turns of a two-instruction loop), never blocking.
OTHER = """
    mov rax, SYS_TIME
    syscall
    lea rbx, [rip + started]
    mov [rbx], rax
loop:
    lea rdi, [rip + msg]
    mov rsi, 1
    mov rax, SYS_CONSOLE_WRITE
    syscall
    mov rcx, 100000
wait:
    dec rcx
    jnz wait
    jmp loop
started:
    .quad 0
msg:
    .ascii "d"
"""


def boot(tmp: Path, policy: str, first: str = "pair", fiber_preemption_ns: int | None = None
         ) -> tuple[Machine, VMKernel, SerialCapture]:
    """Containers ``first`` (pid 1) and ``other`` (pid 2), one priority, both booted at t=0."""
    (tmp / "pair.s").write_text(PAIR)
    (tmp / "lone.s").write_text(LONE)
    (tmp / "other.s").write_text(OTHER)
    preempt = "" if fiber_preemption_ns is None else f"fiber_preemption_ns = {fiber_preemption_ns}"
    (tmp / "img.toml").write_text(f"""
[kernel]
policy = "{policy}"
channels = 8
timeslice_ns = {TIMESLICE}
{preempt}
[[program]]
name = "{first}"
source = "{first}.s"
[[program]]
name = "other"
source = "other.s"
[[container]]
name = "{first}"
program = "{first}"
memory = "256K"
[[container]]
name = "other"
program = "other"
memory = "64K"
""")
    build(tmp / "img.toml", tmp / "img.img")
    com1 = SerialCapture()
    m = Machine(MachineConfig(serial=[com1]))
    k = VMKernel(m, read_image(tmp / "img.img"))
    assert m.now == 0
    return m, k, com1


def started(k: VMKernel, pid: int) -> int:
    """The time the program stored at its ``started`` label (0: that code never ran)."""
    c = k.containers[pid]
    addr = k.image.program(k.image.container(c.name).program).symbols["started"]
    return int.from_bytes(c.aspace.read(addr, 8), "little")


def regs(k: VMKernel, f: Fiber) -> GuestContext:
    """A fiber's registers, from the CPU if it is the one loaded there."""
    if k.current is f:
        ctx = GuestContext()
        k.hal.save(ctx)
        return ctx
    ctx = f.ctx
    assert isinstance(ctx, GuestContext)
    return ctx


def test_cooperative_spinner_keeps_its_container_for_many_slices(tmp_path: Path, policy: str) -> None:
    m, k, com1 = boot(tmp_path, policy)
    slices = 20
    k.run(until=slices * TIMESLICE)
    main, sibling = k.containers[1].fibers
    # The other container ran, slice after slice ...
    assert com1.data.count(b"d") >= 10 and started(k, 2) > 0
    # ... and so did the spinner, for at least a quarter of the time (two instructions a turn) ...
    assert 2 * regs(k, main)["r15"] * NS_PER_INSN >= slices * TIMESLICE // 4
    # ... but its sibling never did: it was runnable the whole time.
    assert b"B" not in com1.data and started(k, 1) == 0
    assert sibling.state is FiberState.RUNNABLE and regs(k, sibling)["r14"] == 0


@pytest.mark.parametrize("slices", [0.5, 1.5])
def test_fiber_timer_lets_the_sibling_run_at_the_exact_time(tmp_path: Path, policy: str, slices: float) -> None:
    preempt = int(slices * TIMESLICE)
    m, k, com1 = boot(tmp_path, policy, fiber_preemption_ns=preempt)
    # pair (pid 1) runs from t=0; whenever its slice ends, the other container runs a whole
    # slice (its spinner has used less than the fiber timer so far).  Its main fiber has been
    # on the CPU for `preempt` ns after (preempt // TIMESLICE) of the other's slices.
    expected = preempt + (preempt // TIMESLICE) * TIMESLICE
    k.run(until=expected + 3 * TIMESLICE)
    assert expected <= started(k, 1) <= expected + SLACK
    assert b"B" in com1.data and com1.data.count(b"d") >= 3
    main, sibling = k.containers[1].fibers
    assert regs(k, sibling)["r14"] > 0 and regs(k, main)["r15"] > 0


def test_fiber_timer_does_not_cut_a_lone_fibers_slice(tmp_path: Path, policy: str) -> None:
    """A container whose only fiber is rotated by the fiber timer keeps the CPU for its slice."""
    m, k, com1 = boot(tmp_path, policy, first="lone", fiber_preemption_ns=TIMESLICE // 4)
    k.run(until=2 * TIMESLICE)
    assert TIMESLICE <= started(k, 2) <= TIMESLICE + SLACK


def test_an_explicit_default_is_cooperative(tmp_path: Path, policy: str) -> None:
    """``fiber_preemption_ns = 0`` in the manifest is the default: no fiber timer."""
    m, k, com1 = boot(tmp_path, policy, fiber_preemption_ns=0)
    k.run(until=6 * TIMESLICE)
    assert b"B" not in com1.data and b"d" in com1.data


# Exits at once (its fiber deadline is far in the future when it does).
QUICK_EXIT = """
    mov rdi, 0
    mov rax, SYS_EXIT
    syscall
"""

# Sleeps SLEEP ns, prints, exits.
SLEEPER = """
    mov rdi, {sleep}
    mov rax, SYS_SLEEP
    syscall
    lea rdi, [rip + msg]
    mov rsi, 1
    mov rax, SYS_CONSOLE_WRITE
    syscall
    mov rdi, 0
    mov rax, SYS_EXIT
    syscall
msg:
    .ascii "z"
"""


@pytest.mark.parametrize("how", ["exit", "fault"])
def test_a_container_that_ends_on_the_cpu_leaves_no_fiber_deadline(tmp_path: Path, policy: str,
                                                                   how: str) -> None:
    """With the fiber timer on, a container ending while its fiber is on the CPU (exit,
    or a fault) next to a sleeping one: the ended fiber's preemption deadline went
    with it.  It used to outlive the container, and the idle CPU then re-armed the
    LAPIC 1 ns ahead again and again until the sleeper woke (virtual time crawled)."""
    sleep = 2_000_000
    preempt = 500_000
    (tmp_path / "first.s").write_text(QUICK_EXIT if how == "exit" else "    ud2\n")
    (tmp_path / "sleeper.s").write_text(SLEEPER.format(sleep=sleep))
    (tmp_path / "img.toml").write_text(f"""
[kernel]
policy = "{policy}"
channels = 8
fiber_preemption_ns = {preempt}
[[program]]
name = "sleeper"
source = "sleeper.s"
[[program]]
name = "first"
source = "first.s"
[[container]]
name = "sleeper"
program = "sleeper"
memory = "64K"
[[container]]
name = "first"
program = "first"
memory = "64K"
""")
    build(tmp_path / "img.toml", tmp_path / "img.img")
    com1 = SerialCapture()
    m = Machine(MachineConfig(serial=[com1]))
    k = VMKernel(m, read_image(tmp_path / "img.img"))
    r = k.run(until=10 * sleep, max_instructions=100_000)
    assert r.message == "all containers ended", r
    assert com1.data.endswith(b"z") and k.containers[2].exit_code is not None
    assert (b"killed: #UD" in com1.data) == (how == "fault")
    # The sleeper's wakeup, and a spare one (the lazy LAPIC may fire early once); the
    # stale deadline made one interrupt per virtual ns from `preempt` to `sleep`.
    assert k.hal.irq_counts.get(0x20, 0) <= 3, k.hal.irq_counts
    # It ends when the sleeper's byte (and the fault's report before it) has left the UART.
    assert sleep <= m.now <= sleep + (len(com1.data) + 1) * m.uarts[0]._char_ns
