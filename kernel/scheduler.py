"""The VM fiber scheduler (pid 0): one scheduler for kernel and guest fibers.

Who calls what
--------------

The HAL owns the CPU loop; the scheduler only answers "who runs next" and
parks/wakes fibers.  A HAL loop looks like::

    sched.run_kernel_fibers()           # drivers first: eager bottom halves
    f = sched.next_fiber()              # policy's choice, now RUNNING
    if f is None:       idle until the next clock deadline or interrupt
    elif f.is_kernel:   sched.step(f)   # resume the generator until it waits
    else:               run f.ctx until a trap; the syscall layer then calls
                        sched.sync(f, op) / sched.yield_(f) / sched.exit(f, v),
                        and a preempting HAL calls sched.yield_(f)

Preconditions are asserted where the switch happens (xv6): ``next_fiber``
only when no fiber is RUNNING for the HAL, ``sync`` only for that fiber.

Blocking is "try, then park" (trio): :func:`~vmk.kernel.events.perform` tries
every arm and otherwise parks the sync on its sources with cancel tokens.  A
parked fiber is in no run queue: it is referenced only by what it waits on,
so 10,000 blocked fibers cost the scheduler nothing, and nothing is polled.
When a source commits the sync, the fiber is queued RUNNABLE; a guest fiber's
``result`` is set then (RAX), a kernel fiber's value is sent at its next step.

Policies
--------

Priorities are integers, **higher runs first**, as in the image (containers
0..255; pid 0's fibers default to :data:`~vmk.kernel.fiber.KERNEL_PRIORITY` =
255).  Both policies are built on one aging queue: an entry queued at dispatch
count ``tick`` with priority ``p`` gets the key ``tick - p * aging`` and the
smallest key runs first (ties FIFO).  So:

* at equal priority it is exactly FIFO, and a fiber that yields goes behind
  everything already queued (round robin);
* a more urgent entry queued at the same moment goes first: when one event
  (an IRQ burst, a condition) wakes several fibers in one go they are queued
  by priority (*prioritised wakeups*);
* no starvation: an entry of priority ``p`` is overtaken by an entry of
  priority ``q > p`` only if that one was queued less than ``(q - p) * aging``
  dispatches after it, so it waits at most ``(q - p) * aging`` dispatches plus
  whatever was ahead of it when it was queued, however busy the more urgent
  fibers are.  (Strict priority would let one yielding fiber starve every
  fiber of a lower priority.)  With the defaults a kernel fiber (255) that
  never blocks delays a priority-1 container by at most 254 * 16 = 4064
  dispatches; drivers are expected to block, not spin.

``global``
    One run queue over all fibers of all containers, ordered as above (kept
    as two heaps, kernel and guest, sharing one key space, so that
    ``run_kernel_fibers`` can take kernel fibers without scanning).

``per-container``
    A run queue per container (FIFO inside, or by fiber priority for pid 0's
    group of kernel fibers), and a queue of containers with runnable fibers
    ordered the same way by container priority, which is round robin inside
    a priority.  The current container runs for at most ``quantum`` fiber
    dispatches, or until the HAL's container scheduler calls
    :meth:`Scheduler.slice_expired` (its time slice ran out) or switches with
    :meth:`Scheduler.pick_container`; it then goes behind the containers of
    its priority.  A container that floods its queue (many fibers, or fibers
    that keep yielding) therefore gets one turn like any other container of
    its priority.  Kernel fibers form pid 0's group (KERNEL_PRIORITY).

Exits
-----

``exit`` ends one fiber, ``kill_container`` all fibers of a container (both
abort a parked sync: its arms are cancelled, its nacks signalled), and every
fiber parked in ``join`` on them wakes with the exit value.  Closing the
container's handles is the handle layer's job.  A kernel fiber that raises
ends alone (logged, kept in ``fiber.error``); its joiners get the exception
object as the exit value.
"""
from __future__ import annotations

import heapq
import inspect
import itertools
import logging
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from .events import KERNEL, NOT_READY, Failed, KernelError, Operation, Sync, perform
from .fiber import KERNEL_PRIORITY, Fiber, FiberKind, FiberState
from .syscall_table import Errno

if TYPE_CHECKING:
    import random

    from vmk.machine.clock import Clock

__all__ = ["AGING", "BLOCKED", "POLICIES", "QUANTUM", "Blocked", "Completed", "Scheduler"]

AGING = 16
"""Dispatches one priority level is worth (the aging rate)."""
QUANTUM = 8
"""Fiber dispatches per container turn in the per-container policy."""

_log = logging.getLogger("vmk.kernel")


class _Queued(Protocol):
    _rq: int | None         # the sequence number of its live entry, or None


_T = TypeVar("_T", bound=_Queued)


@dataclass(frozen=True, slots=True)
class Completed:
    """``sync`` committed at once: ``value`` is the result (``-errno`` if ``error``)."""
    value: Any
    error: KernelError | None = None


class Blocked:
    """``sync`` parked the fiber; it will be RUNNABLE with ``fiber.result`` set."""
    __slots__ = ()

    def __repr__(self) -> str:
        return "BLOCKED"


BLOCKED = Blocked()


class _Stats:
    __slots__ = ("seq", "work")

    def __init__(self) -> None:
        self.work = 0           # run-queue entries touched (pushes, pops, stale skips)
        self.seq = 0            # one FIFO sequence shared by every queue


class _AgingQueue(Generic[_T]):
    """A heap keyed by ``tick - priority * aging``, then FIFO; O(log n) in queued entries.

    Items carry an ``_rq`` token: an entry is live iff the item's token is its
    sequence number, so ``discard`` is O(1) and the stale entry is dropped
    when it reaches the top.
    """
    __slots__ = ("_aging", "_heap", "_live", "_stats")

    def __init__(self, aging: int, stats: _Stats) -> None:
        self._heap: list[tuple[int, int, _T]] = []
        self._live = 0
        self._aging = aging
        self._stats = stats

    def push(self, item: _T, priority: int, tick: int) -> None:
        self._stats.seq += 1
        seq = item._rq = self._stats.seq
        heapq.heappush(self._heap, (tick - priority * self._aging, seq, item))
        self._live += 1
        self._stats.work += 1

    def _clean(self) -> None:
        h = self._heap
        while h and h[0][2]._rq != h[0][1]:
            heapq.heappop(h)
            self._stats.work += 1

    def peek(self) -> tuple[int, int] | None:
        self._clean()
        return self._heap[0][:2] if self._heap else None

    def peek_item(self) -> _T | None:
        self._clean()
        return self._heap[0][2] if self._heap else None

    def pop(self) -> _T | None:
        self._clean()
        if not self._heap:
            return None
        _, _, item = heapq.heappop(self._heap)
        item._rq = None
        self._live -= 1
        self._stats.work += 1
        return item

    def discard(self, item: _T) -> None:
        if item._rq is not None:
            item._rq = None
            self._live -= 1

    def __len__(self) -> int:
        return self._live


class GlobalPolicy:
    """One run queue over all fibers: priority (with aging), then FIFO."""
    name = "global"

    def __init__(self, stats: _Stats, aging: int, quantum: int) -> None:
        self._kernel: _AgingQueue[Fiber] = _AgingQueue(aging, stats)
        self._guest: _AgingQueue[Fiber] = _AgingQueue(aging, stats)

    def _queue(self, f: Fiber) -> _AgingQueue[Fiber]:
        return self._kernel if f.kind is FiberKind.KERNEL else self._guest

    def push(self, f: Fiber, tick: int) -> None:
        self._queue(f).push(f, f.priority, tick)

    def pop_next(self, tick: int) -> Fiber | None:
        k, g = self._kernel.peek(), self._guest.peek()
        if k is None and g is None:
            return None
        if g is None or (k is not None and k < g):
            return self._kernel.pop()
        return self._guest.pop()

    def pop_kernel(self, tick: int) -> Fiber | None:
        return self._kernel.pop()

    def discard(self, f: Fiber) -> None:
        self._queue(f).discard(f)

    def drop_container(self, container: Any) -> None:
        pass

    def pick_container(self, tick: int) -> Any:
        k, g = self._kernel.peek(), self._guest.peek()
        if k is None and g is None:
            return None
        if g is None or (k is not None and k < g):
            return KERNEL
        head = self._guest.peek_item()
        return head.container if head is not None else None

    def slice_expired(self, tick: int) -> None:
        pass

    def runnable(self) -> int:
        return len(self._kernel) + len(self._guest)


class _Group:
    """One container's run queue (per-container policy); pid 0's kernel fibers are KERNEL's."""
    __slots__ = ("_rq", "container", "queue")

    def __init__(self, container: Any, aging: int, stats: _Stats) -> None:
        self.container = container
        self.queue: _AgingQueue[Fiber] = _AgingQueue(aging, stats)
        self._rq: int | None = None

    @property
    def priority(self) -> int:
        return KERNEL_PRIORITY if self.container is KERNEL else int(self.container.priority)


class PerContainerPolicy:
    """A run queue per container; containers by priority (aging), round robin inside one."""
    name = "per-container"

    def __init__(self, stats: _Stats, aging: int, quantum: int) -> None:
        self._stats = stats
        self._aging = aging
        self.quantum = quantum
        self._groups: dict[Any, _Group] = {}
        self._ready: _AgingQueue[_Group] = _AgingQueue(aging, stats)      # groups with runnable fibers, not current
        self.current: _Group | None = None
        self.budget = 0

    def _group_of(self, f: Fiber) -> _Group:
        key = KERNEL if f.kind is FiberKind.KERNEL or f.container is None else f.container
        g = self._groups.get(key)
        if g is None:
            g = self._groups[key] = _Group(key, self._aging, self._stats)
        return g

    def push(self, f: Fiber, tick: int) -> None:
        g = self._group_of(f)
        g.queue.push(f, f.priority, tick)
        if g is not self.current and g._rq is None:
            self._ready.push(g, g.priority, tick)

    def _rotate(self, tick: int) -> None:
        g, self.current = self.current, None
        if g is not None and len(g.queue) and g._rq is None:
            self._ready.push(g, g.priority, tick)

    def _pick(self) -> _Group | None:
        while (g := self._ready.pop()) is not None:
            if len(g.queue):
                self.current, self.budget = g, self.quantum
                return g
        return None

    def pop_next(self, tick: int) -> Fiber | None:
        g = self.current
        if g is not None and (self.budget <= 0 or not len(g.queue)):
            self._rotate(tick)
            g = None
        if g is None:
            g = self._pick()
            if g is None:
                return None
        self.budget -= 1
        return g.queue.pop()

    def pop_kernel(self, tick: int) -> Fiber | None:
        g = self._groups.get(KERNEL)
        return g.queue.pop() if g is not None else None

    def discard(self, f: Fiber) -> None:
        self._group_of(f).queue.discard(f)

    def drop_container(self, container: Any) -> None:
        g = self._groups.pop(container, None)
        if g is not None:
            self._ready.discard(g)
            if self.current is g:
                self.current = None

    def pick_container(self, tick: int) -> Any:
        self._rotate(tick)
        g = self._pick()
        return g.container if g is not None else None

    def slice_expired(self, tick: int) -> None:
        self._rotate(tick)

    def runnable(self) -> int:
        return sum(len(g.queue) for g in self._groups.values())


POLICIES: dict[str, type[GlobalPolicy | PerContainerPolicy]] = {
    GlobalPolicy.name: GlobalPolicy,
    PerContainerPolicy.name: PerContainerPolicy,
}


class Scheduler:
    """The fiber scheduler of pid 0, on a virtual clock.

    ``policy`` is ``"global"`` or ``"per-container"`` (named in the image).
    ``rng``: an optional seeded ``random.Random``; if given, each sync's try
    phase starts at a random arm (Guile fibers' policy) instead of the first.
    ``log`` receives one line per kernel fiber that crashed.
    """

    def __init__(self, clock: Clock, policy: str = "global", *, aging: int = AGING,
                 quantum: int = QUANTUM, rng: random.Random | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown scheduling policy {policy!r} (known: {', '.join(POLICIES)})")
        if aging < 0 or quantum < 1:
            raise ValueError("aging must be >= 0 and quantum >= 1")
        self.clock = clock
        self.stats = _Stats()
        self.policy = POLICIES[policy](self.stats, aging, quantum)
        self.rng = rng
        self.log = log if log is not None else _log.warning
        self.fibers: dict[int, Fiber] = {}              # by fid, until reaped
        self._by_container: dict[Any, dict[Fiber, None]] = {}
        self._fids = itertools.count(1)
        self.running: Fiber | None = None               # the fiber the HAL (or step) runs
        self._stepping: Fiber | None = None             # the kernel fiber inside its generator
        self.tick = 0                                   # dispatches so far

    # -- creating fibers -----------------------------------------------------------
    def spawn_kernel(self, gen: Generator[Any, Any, Any], name: str = "", container: Any = None,
                     priority: int | None = None) -> Fiber:
        """A kernel fiber running generator ``gen``; RUNNABLE."""
        if not inspect.isgenerator(gen):
            raise TypeError(f"spawn_kernel needs a generator, not {gen!r}")
        f = Fiber(next(self._fids), FiberKind.KERNEL, name or gen.__name__, container, priority, gen=gen)
        return self._register(f)

    def spawn_guest(self, ctx: Any, container: Any, name: str = "", priority: int | None = None) -> Fiber:
        """A guest fiber (``ctx`` is the HAL's) in ``container``; RUNNABLE."""
        if container is None:
            raise ValueError("a guest fiber belongs to a container")
        f = Fiber(next(self._fids), FiberKind.GUEST, name, container, priority, ctx=ctx)
        return self._register(f)

    def _register(self, f: Fiber) -> Fiber:
        self.fibers[f.fid] = f
        if f.container is not None:
            self._by_container.setdefault(f.container, {})[f] = None
        self.policy.push(f, self.tick)
        return f

    # -- syncing -------------------------------------------------------------------
    def sync(self, fiber: Fiber, op: Operation) -> Completed | Blocked:
        """Sync the running guest fiber on ``op`` (the syscall layer's entry).

        ``Completed(value)`` if an arm committed at once (``Completed(-errno,
        error)`` if it failed); the fiber goes on running.  Otherwise
        ``BLOCKED``: the fiber is parked, and becomes RUNNABLE with
        ``fiber.result`` set when an arm commits.
        """
        assert fiber is self.running and fiber.kind is FiberKind.GUEST, \
            f"sync: {fiber!r} is not the running guest fiber ({self.running!r})"
        outcome = self._perform(fiber, op)
        if outcome is NOT_READY:
            self.running = None
            return BLOCKED
        if isinstance(outcome, Failed):
            err = outcome.error
            assert isinstance(err, KernelError), err
            fiber.error = err
            return Completed(-int(err.errno), err)
        return Completed(outcome)

    def _perform(self, fiber: Fiber, op: Operation) -> Any:
        sync = Sync(self.clock, fiber.party, partial(self._committed, fiber), fiber=fiber,
                    catch_all=fiber.kind is FiberKind.KERNEL)
        outcome = perform(sync, op, self.rng)
        if outcome is NOT_READY:
            fiber.state = FiberState.BLOCKED
            fiber._sync = sync
            fiber.waiting_on = sync.describe()
        return outcome

    def _committed(self, fiber: Fiber, outcome: Any) -> None:
        """A parked sync committed: the fiber becomes RUNNABLE with its result."""
        assert fiber.state is FiberState.BLOCKED, fiber
        fiber._sync = None
        fiber.waiting_on = None
        if fiber.kind is FiberKind.KERNEL:
            fiber._resume = (None, outcome.error) if isinstance(outcome, Failed) else (outcome, None)
        elif isinstance(outcome, Failed):
            err = outcome.error
            assert isinstance(err, KernelError), err
            fiber.result, fiber.error = -int(err.errno), err
        else:
            fiber.result, fiber.error = outcome, None
        fiber.state = FiberState.RUNNABLE
        self.policy.push(fiber, self.tick)

    # -- choosing and running --------------------------------------------------------
    def next_fiber(self) -> Fiber | None:
        """The fiber that runs next (now RUNNING), or None if nothing is runnable."""
        assert self.running is None, f"next_fiber while {self.running!r} is running"
        f = self.policy.pop_next(self.tick)
        if f is None:
            return None
        assert f.state is FiberState.RUNNABLE, f
        self.tick += 1
        f.state = FiberState.RUNNING
        self.running = f
        return f

    def step(self, fiber: Fiber) -> None:
        """Run a kernel fiber that ``next_fiber`` returned until it waits, yields or ends."""
        assert fiber is self.running and fiber.kind is FiberKind.KERNEL, fiber
        self.running = None
        if self._run_kernel(fiber):
            fiber.state = FiberState.RUNNABLE
            self.policy.push(fiber, self.tick)

    def run_kernel_fibers(self, max_steps: int | None = None) -> int:
        """Step runnable kernel fibers until none is runnable; returns the steps.

        A fiber that wakes another (a rendezvous) lets it run in the same
        call, but a fiber that yields the CPU is queued again only when the
        call ends, so a busy kernel fiber cannot keep this loop going.  A
        guest fiber the HAL has interrupted stays RUNNING meanwhile, unless a
        kernel fiber ended it (``kill_container``): then it is DONE and
        ``running`` is None, and the HAL must not resume it.
        """
        steps = 0
        yielded: list[Fiber] = []
        while max_steps is None or steps < max_steps:
            f = self.policy.pop_kernel(self.tick)
            if f is None:
                break
            assert f.state is FiberState.RUNNABLE, f
            self.tick += 1
            steps += 1
            f.state = FiberState.RUNNING
            if self._run_kernel(f):
                yielded.append(f)
        for f in yielded:
            f.state = FiberState.RUNNABLE
            self.policy.push(f, self.tick)
        return steps

    def _run_kernel(self, fiber: Fiber) -> bool:
        self._stepping = fiber
        try:
            return self._step(fiber)
        finally:
            self._stepping = None

    def _step(self, fiber: Fiber) -> bool:
        """Resume the generator until it parks, yields (True) or ends."""
        gen = fiber.gen
        assert gen is not None
        value, exc = fiber._resume
        fiber._resume = (None, None)
        while True:
            try:
                op = gen.throw(exc) if exc is not None else gen.send(value)
            except StopIteration as stop:
                self._end(fiber, stop.value)
                return False
            except Exception as e:  # noqa: BLE001 - an error in a fiber ends only that fiber
                fiber.error = e
                self.log(f"kernel fiber {fiber.fid} ({fiber.name}) crashed: {e!r}")
                self._end(fiber, e)
                return False
            if fiber.state is FiberState.DONE:      # it killed itself (exit, kill_container)
                self._close(fiber)
                return False
            if op is None:
                return True
            try:
                outcome = self._perform(fiber, op)
            except Exception as e:  # noqa: BLE001 - a guard's error is raised in the fiber
                value, exc = None, e
                continue
            if outcome is NOT_READY:
                return False
            if isinstance(outcome, Failed):
                value, exc = None, outcome.error
            else:
                value, exc = outcome, None

    def yield_(self, fiber: Fiber) -> None:
        """The running fiber gives up the CPU (or the HAL preempted it): RUNNABLE, behind its peers."""
        assert fiber.state is FiberState.RUNNING, fiber
        if fiber is self.running:
            self.running = None
        fiber.state = FiberState.RUNNABLE
        self.policy.push(fiber, self.tick)

    # -- ending fibers -----------------------------------------------------------------
    def exit(self, fiber: Fiber, value: Any = 0) -> None:
        """End ``fiber`` with exit value ``value`` (``fiber_exit``); its joiners wake."""
        self._end(fiber, value)

    def kill_container(self, container: Any, exit_value: Any = -int(Errno.EINTR)) -> list[Fiber]:
        """End every fiber of ``container`` (joiners wake with ``exit_value``); reaps them."""
        fibers = list(self._by_container.pop(container, {}))
        for f in fibers:
            self._end(f, exit_value)
        self.policy.drop_container(container)
        for f in fibers:
            self.fibers.pop(f.fid, None)
        return fibers

    def _end(self, fiber: Fiber, value: Any) -> None:
        if fiber.state is FiberState.DONE:
            return
        if fiber.state is FiberState.BLOCKED:
            sync, fiber._sync = fiber._sync, None
            assert sync is not None
            sync.abort()
        elif fiber.state is FiberState.RUNNABLE:
            self.policy.discard(fiber)
        if self.running is fiber:
            self.running = None
        fiber.state = FiberState.DONE
        fiber.waiting_on = None
        fiber.exit_value = value
        if fiber.kind is FiberKind.KERNEL and fiber is not self._stepping:
            self._close(fiber)
        fiber.joiners.wake_all(value)
        if fiber.container is None:
            self.fibers.pop(fiber.fid, None)

    def _close(self, fiber: Fiber) -> None:
        assert fiber.gen is not None
        try:
            fiber.gen.close()
        except Exception as e:  # noqa: BLE001 - a bad finally block ends nothing more
            self.log(f"kernel fiber {fiber.fid} ({fiber.name}) failed to close: {e!r}")

    def reap(self, fiber: Fiber) -> None:
        """Forget a DONE fiber (its fid no longer resolves)."""
        assert fiber.state is FiberState.DONE, fiber
        self.fibers.pop(fiber.fid, None)
        group = self._by_container.get(fiber.container)
        if group is not None:
            group.pop(fiber, None)

    # -- the container scheduler's side --------------------------------------------------
    def pick_container(self) -> Any:
        """Per-container: end the current container's turn and choose the next
        (a container, KERNEL for pid 0's fibers, or None).  Global: the
        container whose fiber would run next."""
        return self.policy.pick_container(self.tick)

    def slice_expired(self) -> None:
        """The HAL's time slice for the current container ran out (per-container policy)."""
        self.policy.slice_expired(self.tick)

    # -- looking -------------------------------------------------------------------------
    def fiber(self, fid: int) -> Fiber | None:
        return self.fibers.get(fid)

    def fibers_of(self, container: Any) -> list[Fiber]:
        return list(self._by_container.get(container, ()))

    def blocked(self) -> Iterator[Fiber]:
        return (f for f in self.fibers.values() if f.state is FiberState.BLOCKED)

    @property
    def runnable(self) -> int:
        return self.policy.runnable()

    @property
    def work(self) -> int:
        """Run-queue entries touched so far: a cost counter for tests and benchmarks."""
        return self.stats.work
