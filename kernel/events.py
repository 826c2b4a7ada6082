"""Concurrent ML operations: the one way a fiber waits for anything.

An *operation* (CML's "event"; Guile fibers' word) is a first-class value that
describes something a fiber may wait for.  Nothing happens until a fiber
*syncs* on it: a kernel fiber by ``value = yield op``, a guest fiber through
``Scheduler.sync(fiber, op)`` from the syscall layer.

Vocabulary (Guile fibers names, Reppy's CML semantics)::

    base:        always(v)  never()  timeout(ns)  at_time(ns)  join(fiber)
                 cond_wait(cond)  irq(source)      (send/recv: kernel/channel.py)
    combinators: choice(*ops)  wrap(op, f)  wrap_handler(op, h)  guard(thunk)
                 with_nack(f)

How a sync works (Parallel CML, Reppy/Russo/Xiao; Guile ``perform-operation``)
-----------------------------------------------------------------------------

1. *Force.*  The operation tree is flattened into *arms*, one per base
   operation.  ``guard`` thunks and ``with_nack`` functions run now, at every
   sync (CML: guards are evaluated at synchronisation time).  Each arm keeps
   the chain of ``wrap`` / ``wrap_handler`` functions above it (innermost
   first) and the set of ``with_nack`` scopes it lies in.
2. *Try.*  Each arm's ``try_`` is called in order.  The first one that is
   ready commits the sync at once (a rendezvous try also commits the partner
   it found).  Nothing is registered anywhere.
3. *Block.*  Otherwise every arm's ``block`` parks the sync on its source (a
   channel queue, a condition's waiters, a clock timer, ...) and returns a
   cancel token.  The fiber is parked: blocked fibers are only referenced from
   what they wait on, and nobody polls them.
4. *Commit.*  Whoever makes an arm ready (a partner fiber's try, a timer, an
   IRQ, a condition signal) calls ``Sync.complete(arm, result)``.  All arms of
   one sync share one op-state flag, :class:`OpState`:

   * ``WAITING`` (W): parked, every arm may still fire;
   * ``CLAIMED`` (C): an arm has won and the commit is in progress (the other
     arms are being cancelled, nacks signalled, wrap functions run);
   * ``SYNCED`` (S): done (or aborted); any later attempt is refused.

   ``complete`` only succeeds from W, so EXACTLY ONE arm commits.  The commit
   cancels every arm's token (timers are disarmed, queue entries removed at
   once, not skipped lazily: queues only ever hold W entries), signals the
   nack of every ``with_nack`` scope the winner is not in, then applies the
   winner's wrap chain and hands the outcome to the scheduler.

This kernel is single-threaded, so the C state never has to be spun on as in
Parallel CML; it still guards re-entrancy: a wrap function or a nack that
signals something this very sync waits on finds it CLAIMED and is refused.

Decisions
---------

* Deterministic.  Arms are tried in the order written, wait queues are FIFO.
  Guile fibers starts the try phase at a *random* arm so that a fiber which
  always has two enabled arms does not starve the later one; we do not, so
  the first enabled arm wins and runs are reproducible.  An optional seeded
  ``random.Random`` given to the scheduler rotates the start arm Guile's way.
* Errors are outcomes, not hangs.  An arm may commit with an error
  (:class:`KernelError`, e.g. ``EPIPE`` on a channel whose other side is
  gone, ``EMSGSIZE`` on a bad send).  Such an arm is *enabled*: it commits at
  once in the try phase.  A failed outcome skips ``wrap`` functions and is
  caught by ``wrap_handler`` (CML's ``wrapHandler``); uncaught, it is raised
  at the kernel fiber's ``yield`` or becomes ``-errno`` for a guest fiber.
* Wrap functions run at commit time, in whatever context commits (another
  fiber's try, a timer callback), so that a guest fiber is runnable with its
  final ``result``.  They must not block.  An exception in a wrap function
  fails the sync (it is raised in the kernel fiber); for a guest fiber
  anything but a KernelError is a kernel bug and propagates.
* Nacks are signalled inside the commit, before the winner's wrap functions
  run, so a server parked on a nack is queued before the syncing fiber.
* A fiber killed while blocked aborts its sync: all arms are cancelled and
  every nack of the sync is signalled (the client gave up on all of them;
  CML would leave them unsignalled and servers waiting forever).
* A guest's nack is its own condition: ``with_nack(f, cond)`` signals ``cond``
  instead of a fresh one (kernel/pid0.py maps an ``EV_WITH_NACK`` scope marker
  onto it), so guest and kernel nacks are the one mechanism above.  Guest
  ``wrap`` and ``guard`` are guest code (vmk.h's ``vmk_sync_ops``).
* Values: ``timeout``, ``at_time``, ``cond_wait``, ``send`` and a nack commit
  with 0 (ready for a guest's RAX); ``irq`` with the number of fires since the
  last consumer; ``join`` with the fiber's exit value; ``always(v)`` with v.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

from .syscall_table import Errno

if TYPE_CHECKING:
    import random

    from vmk.machine.clock import Clock

__all__ = [
    "KERNEL",
    "NOT_READY",
    "BaseOp",
    "Choice",
    "Condition",
    "Failed",
    "Guard",
    "IrqSource",
    "KernelError",
    "OpState",
    "Operation",
    "Sync",
    "WaitQueue",
    "Waiter",
    "WithNack",
    "Wrap",
    "always",
    "at_time",
    "choice",
    "cond_wait",
    "guard",
    "irq",
    "join",
    "never",
    "perform",
    "timeout",
    "with_nack",
    "wrap",
    "wrap_handler",
]


class KernelError(Exception):
    """An error with an errno: the one exception the syscall layer maps to ``-errno``.

    Raised by the table/handle layers (``ENFILE``, ``EBADF``, ...) and carried
    as the outcome of an arm that fails (``EPIPE``, ``EMSGSIZE``).  Anything
    else escaping the kernel is a kernel bug.
    """

    def __init__(self, errno: Errno, detail: str = "") -> None:
        self.errno = Errno(errno)
        self.detail = detail
        super().__init__(f"{self.errno.name}: {detail}" if detail else self.errno.name)


class OpState(Enum):
    """The op-state flag shared by all arms of one sync (Parallel CML)."""
    WAITING = "W"
    CLAIMED = "C"
    SYNCED = "S"


class _KernelParty:
    """The party of pid 0: kernel fibers without a container, direct channel holds."""
    __slots__ = ()

    def __repr__(self) -> str:
        return "KERNEL"


KERNEL: Any = _KernelParty()


class Failed:
    """The outcome of an arm that ends with an exception instead of a value."""
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __repr__(self) -> str:
        return f"Failed({self.error!r})"


class _NotReady:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NOT_READY"


NOT_READY: Any = _NotReady()
"""What ``BaseOp.try_`` returns when the arm cannot commit now."""


class _Cancellable(Protocol):
    def cancel(self) -> None: ...


# ---------------------------------------------------------------------------
# Operations
# ---------------------------------------------------------------------------

class Operation:
    """Something a fiber can sync on.  Immutable; may be synced many times."""
    __slots__ = ()


class BaseOp(Operation):
    """A base operation: the try / block / cancel triple.

    ``try_(sync, arm)`` returns the arm's result if it can commit now (having
    committed any partner it consumed), else :data:`NOT_READY`.  It must not
    change anything when it returns NOT_READY.

    ``block(sync, arm)`` parks the sync on the source and returns a token with
    a ``cancel()`` method (or None).  When the source fires it calls
    ``sync.complete(arm, result)``; a False answer means the sync has already
    committed elsewhere and the source must act as if nobody was there.

    ``cancel(token)`` undoes ``block``; it must be idempotent.
    """
    __slots__ = ()

    def try_(self, sync: Sync, arm: int) -> Any:
        return NOT_READY

    def block(self, sync: Sync, arm: int) -> _Cancellable | None:
        return None

    def cancel(self, token: _Cancellable | None) -> None:
        if token is not None:
            token.cancel()

    def describe(self, sync: Sync) -> str:
        return type(self).__name__.lower()


@dataclass(frozen=True, slots=True)
class Choice(Operation):
    """``choice(*ops)``: commits exactly one of ``ops``; no arms = never."""
    ops: tuple[Operation, ...]


@dataclass(frozen=True, slots=True)
class Wrap(Operation):
    """``wrap(op, f)`` (``handler=False``) or ``wrap_handler(op, f)`` (``handler=True``)."""
    op: Operation
    f: Callable[[Any], Any]
    handler: bool = False


@dataclass(frozen=True, slots=True)
class Guard(Operation):
    """``guard(thunk)``: ``thunk()`` builds the operation at every sync."""
    thunk: Callable[[], Operation]


@dataclass(frozen=True, slots=True)
class WithNack(Operation):
    """``with_nack(f)``: ``f(nack)`` builds the operation at every sync; ``nack``
    becomes enabled when the sync commits to an arm outside it (or is aborted).
    ``cond``: the condition to signal then (a guest's ``EV_WITH_NACK`` scope names
    its own); None: a fresh one at every sync."""
    f: Callable[[Operation], Operation]
    cond: Condition | None = None


# ---------------------------------------------------------------------------
# Wait queues and the per-sync state
# ---------------------------------------------------------------------------

class Waiter:
    """One parked arm in a :class:`WaitQueue`; its own cancel token."""
    __slots__ = ("arm", "payload", "queue", "sync")

    def __init__(self, sync: Sync, arm: int, payload: Any, queue: WaitQueue) -> None:
        self.sync = sync
        self.arm = arm
        self.payload = payload
        self.queue = queue

    def cancel(self) -> None:
        self.queue.remove(self)


class WaitQueue:
    """A FIFO of parked arms with O(1) removal from anywhere (an OrderedDict).

    Invariant: every entry belongs to a sync in state WAITING, because a
    commit removes all of its sync's entries at once.  ``first`` still checks
    the state (and skips the caller's own sync) so that a re-entrant call
    during a commit cannot match a CLAIMED sync.
    """
    __slots__ = ("_q",)

    def __init__(self) -> None:
        self._q: OrderedDict[Waiter, None] = OrderedDict()

    def park(self, sync: Sync, arm: int, payload: Any = None) -> Waiter:
        w = Waiter(sync, arm, payload, self)
        self._q[w] = None
        return w

    def add(self, w: Any) -> None:
        """Queue a ready-made waiter (an object with ``sync``, ``arm``, ``payload`` and
        ``cancel``): a one-arm sync can be its own waiter (kernel/pid0.py)."""
        self._q[w] = None

    def remove(self, w: Any) -> None:
        self._q.pop(w, None)

    def first(self, exclude: Sync | None = None) -> Waiter | None:
        for w in self._q:
            if w.sync.state is OpState.WAITING and w.sync is not exclude:
                return w
        return None

    def wake_all(self, result: Any) -> int:
        """Commit every parked arm with ``result``; returns how many committed."""
        woken = 0
        for w in list(self._q):
            self._q.pop(w, None)
            if w.sync.complete(w.arm, result):
                woken += 1
        return woken

    def __len__(self) -> int:
        return len(self._q)

    def __iter__(self) -> Iterator[Waiter]:
        return iter(list(self._q))

    def __bool__(self) -> bool:
        return bool(self._q)


class _Arm:
    __slots__ = ("chain", "nacks", "op", "token")

    def __init__(self, op: BaseOp, chain: tuple[tuple[Callable[[Any], Any], bool], ...],
                 nacks: frozenset[Condition]) -> None:
        self.op = op
        self.chain = chain          # (function, is_handler), innermost first
        self.nacks = nacks          # the with_nack scopes this arm lies in
        self.token: _Cancellable | None = None


class Sync:
    """One synchronisation: the op-state flag and the arms that share it.

    ``party`` is who syncs (a container, or :data:`KERNEL`): channels use it to
    decide whether the other side is gone.  ``t0`` is the virtual time of the
    sync (``timeout`` is relative to it).  ``on_commit(outcome)`` is called
    when a *parked* sync commits (the scheduler makes the fiber runnable).
    """
    __slots__ = (
        "arms",
        "catch_all",
        "clock",
        "fiber",
        "nacks",
        "on_commit",
        "party",
        "state",
        "t0",
        "winner",
    )

    def __init__(self, clock: Clock, party: Any, on_commit: Callable[[Any], None],
                 fiber: Any = None, catch_all: bool = True) -> None:
        self.state = OpState.WAITING
        self.party = party
        self.clock = clock
        self.t0 = clock.now
        self.arms: list[_Arm] = []
        self.nacks: list[Condition] = []
        self.on_commit = on_commit
        self.winner: int | None = None
        self.fiber = fiber              # for descriptions and tests only
        self.catch_all = catch_all      # False: only KernelError from wraps becomes Failed

    # -- commit ------------------------------------------------------------
    def complete(self, arm: int, result: Any) -> bool:
        """A parked arm fired with ``result`` (a value or :class:`Failed`).

        Returns False, changing nothing, unless the sync is still WAITING.
        """
        if self.state is not OpState.WAITING:
            return False
        self.on_commit(self._commit(arm, result))
        return True

    def _commit(self, arm: int, result: Any) -> Any:
        # Discussion: the flag goes W -> C before anything else runs, so every
        # re-entrant attempt (a nack signal or wrap function that fires a
        # source this sync is parked on) is refused by complete(); the arms
        # are cancelled before the wrap functions run, so a wrap function
        # never sees this sync still queued anywhere.
        self.state = OpState.CLAIMED
        self.winner = arm
        for a in self.arms:
            if a.token is not None:
                a.op.cancel(a.token)
                a.token = None
        won = self.arms[arm]
        for cond in self.nacks:
            if cond not in won.nacks:
                cond.signal()
        outcome = result
        for f, is_handler in won.chain:
            if isinstance(outcome, Failed) is not is_handler:
                continue
            try:
                outcome = f(outcome.error if is_handler else outcome)
            except Exception as exc:
                if not self.catch_all and not isinstance(exc, KernelError):
                    self.state = OpState.SYNCED
                    raise
                outcome = Failed(exc)
        self.state = OpState.SYNCED
        return outcome

    def abort(self) -> None:
        """The fiber is gone: cancel every arm and signal every nack."""
        if self.state is not OpState.WAITING:
            return
        self.state = OpState.CLAIMED
        for a in self.arms:
            if a.token is not None:
                a.op.cancel(a.token)
                a.token = None
        for cond in self.nacks:
            cond.signal()
        self.state = OpState.SYNCED

    def describe(self) -> str:
        if not self.arms:
            return "never"
        return " | ".join(a.op.describe(self) for a in self.arms)


def _flatten(op: Operation, chain: tuple[tuple[Callable[[Any], Any], bool], ...],
             nacks: frozenset[Condition], sync: Sync, out: list[_Arm]) -> None:
    if isinstance(op, BaseOp):
        out.append(_Arm(op, chain, nacks))
    elif isinstance(op, Choice):
        for sub in op.ops:
            _flatten(sub, chain, nacks, sync, out)
    elif isinstance(op, Wrap):
        _flatten(op.op, ((op.f, op.handler),) + chain, nacks, sync, out)
    elif isinstance(op, Guard):
        _flatten(_check(op.thunk(), "guard thunk"), chain, nacks, sync, out)
    elif isinstance(op, WithNack):
        cond = op.cond if op.cond is not None else Condition("nack")
        if cond not in sync.nacks:
            sync.nacks.append(cond)
        inner = _check(op.f(_NackWait(cond)), "with_nack function")
        _flatten(inner, chain, nacks | {cond}, sync, out)
    else:
        raise TypeError(f"not an operation: {op!r}")


def _check(op: Any, what: str) -> Operation:
    if not isinstance(op, Operation):
        raise TypeError(f"{what} returned {op!r}, not an operation")
    return op


def perform(sync: Sync, op: Operation, rng: random.Random | None = None) -> Any:
    """Force, try and, failing that, block: the whole sync protocol.

    Returns the outcome (a value or :class:`Failed`) if an arm committed at
    once, else :data:`NOT_READY` with the sync parked on every arm.  Raises
    what a guard thunk or with_nack function raises (nothing is parked then).
    """
    if not isinstance(op, Operation):
        raise TypeError(f"sync on {op!r}, which is not an operation")
    arms = sync.arms
    _flatten(op, (), frozenset(), sync, arms)
    n = len(arms)
    start = rng.randrange(n) if (rng is not None and n > 1) else 0
    for k in range(n):
        i = (start + k) % n
        result = arms[i].op.try_(sync, i)
        if result is not NOT_READY:
            return sync._commit(i, result)
    for i, a in enumerate(arms):
        a.token = a.op.block(sync, i)
    return NOT_READY


# ---------------------------------------------------------------------------
# Base operations
# ---------------------------------------------------------------------------

class _Always(BaseOp):
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def try_(self, sync: Sync, arm: int) -> Any:
        return self.value

    def describe(self, sync: Sync) -> str:
        return f"always {self.value!r}"


class _Timeout(BaseOp):
    __slots__ = ("ns",)

    def __init__(self, ns: int) -> None:
        self.ns = int(ns)

    def deadline(self, sync: Sync) -> int:
        return sync.t0 + self.ns

    def try_(self, sync: Sync, arm: int) -> Any:
        return 0 if sync.clock.now >= self.deadline(sync) else NOT_READY

    def block(self, sync: Sync, arm: int) -> _Cancellable:
        t = sync.clock.timer(lambda: sync.complete(arm, 0), name=self.describe(sync))
        t.arm(self.deadline(sync))
        return t

    def describe(self, sync: Sync) -> str:
        return f"timeout at {self.deadline(sync)} ns"


class _AtTime(_Timeout):
    __slots__ = ()

    def deadline(self, sync: Sync) -> int:
        return self.ns

    def describe(self, sync: Sync) -> str:
        return f"until {self.ns} ns"


class Condition:
    """A one-shot broadcast event (Guile's condition, Loko's cvar).

    ``signal()`` wakes every waiter, now and later; it returns True the first
    time and False afterwards (idempotent).
    """
    __slots__ = ("cid", "name", "signalled", "waiters")
    _ids = itertools.count(1)

    def __init__(self, name: str = "") -> None:
        self.cid = next(Condition._ids)
        self.name = name or f"condition {self.cid}"
        self.signalled = False
        self.waiters = WaitQueue()

    def signal(self) -> bool:
        if self.signalled:
            return False
        self.signalled = True
        self.waiters.wake_all(0)
        return True

    def __repr__(self) -> str:
        return f"<Condition {self.name}{' signalled' if self.signalled else ''}>"


class _CondWait(BaseOp):
    __slots__ = ("cond",)

    def __init__(self, cond: Condition) -> None:
        self.cond = cond

    def try_(self, sync: Sync, arm: int) -> Any:
        return 0 if self.cond.signalled else NOT_READY

    def block(self, sync: Sync, arm: int) -> _Cancellable:
        return self.cond.waiters.park(sync, arm)

    def describe(self, sync: Sync) -> str:
        return f"wait on {self.cond.name}"


class _NackWait(_CondWait):
    __slots__ = ()

    def describe(self, sync: Sync) -> str:
        return "nack"


class IrqSource:
    """An interrupt as a CML source.  The HAL calls :meth:`fire` from the top half.

    ``fires`` counts every fire (for the debugger).  Fires accumulate in
    ``pending`` while nobody waits; ``irq(source)`` commits with the pending
    count and resets it.  A fire with fibers waiting is a broadcast: all of
    them wake with the count (Loko signals the IRQ's cvar the same way); they
    are queued by priority by the scheduler, not here.
    """
    __slots__ = ("fires", "line", "name", "pending", "waiters")

    def __init__(self, line: int, name: str = "") -> None:
        self.line = line
        self.name = name
        self.fires = 0
        self.pending = 0
        self.waiters = WaitQueue()

    def fire(self, count: int = 1) -> int:
        """Record ``count`` interrupts; returns how many fibers woke."""
        self.fires += count
        self.pending += count
        if not self.waiters:
            return 0
        value, self.pending = self.pending, 0
        return self.waiters.wake_all(value)

    def take(self) -> int:
        value, self.pending = self.pending, 0
        return value

    def __repr__(self) -> str:
        return f"<IrqSource {self.line} {self.name} fires={self.fires} pending={self.pending}>"


class _Irq(BaseOp):
    __slots__ = ("source",)

    def __init__(self, source: IrqSource) -> None:
        self.source = source

    def try_(self, sync: Sync, arm: int) -> Any:
        return self.source.take() if self.source.pending else NOT_READY

    def block(self, sync: Sync, arm: int) -> _Cancellable:
        return self.source.waiters.park(sync, arm)

    def describe(self, sync: Sync) -> str:
        s = self.source
        return f"irq {s.line}" + (f" ({s.name})" if s.name else "")


class _Joinable(Protocol):
    fid: int
    exit_value: Any
    joiners: WaitQueue

    @property
    def done(self) -> bool: ...


class _Join(BaseOp):
    __slots__ = ("fiber",)

    def __init__(self, fiber: _Joinable) -> None:
        self.fiber = fiber

    def try_(self, sync: Sync, arm: int) -> Any:
        return self.fiber.exit_value if self.fiber.done else NOT_READY

    def block(self, sync: Sync, arm: int) -> _Cancellable:
        return self.fiber.joiners.park(sync, arm)

    def describe(self, sync: Sync) -> str:
        return f"join fiber {self.fiber.fid}"


# ---------------------------------------------------------------------------
# Constructors (the public vocabulary)
# ---------------------------------------------------------------------------

def always(value: Any = 0) -> Operation:
    """Always enabled; commits with ``value``."""
    return _Always(value)


def never() -> Operation:
    """Never enabled (the empty choice)."""
    return Choice(())


def timeout(ns: int) -> Operation:
    """Enabled ``ns`` virtual nanoseconds after the sync (exactly); commits with 0."""
    return _Timeout(ns)


def at_time(ns: int) -> Operation:
    """Enabled at absolute virtual time ``ns`` (at once if it has passed); commits with 0."""
    return _AtTime(ns)


def join(fiber: _Joinable) -> Operation:
    """Enabled when ``fiber`` has ended; commits with its exit value."""
    return _Join(fiber)


def cond_wait(cond: Condition) -> Operation:
    """Enabled once ``cond`` is signalled; commits with 0."""
    return _CondWait(cond)


def irq(source: IrqSource) -> Operation:
    """Enabled when ``source`` has fired since its last consumer; commits with the count."""
    return _Irq(source)


def choice(*ops: Operation) -> Operation:
    """Exactly one of ``ops`` commits; the first enabled one in the try phase."""
    for op in ops:
        _check(op, "choice argument")
    return Choice(tuple(ops))


def wrap(op: Operation, f: Callable[[Any], Any]) -> Operation:
    """``op`` whose value is passed through ``f`` when it commits (every arm of a choice)."""
    return Wrap(_check(op, "wrap argument"), f)


def wrap_handler(op: Operation, h: Callable[[BaseException], Any]) -> Operation:
    """``op`` whose failure (an exception outcome) is turned into a value by ``h`` (CML wrapHandler)."""
    return Wrap(_check(op, "wrap_handler argument"), h, handler=True)


def guard(thunk: Callable[[], Operation]) -> Operation:
    """An operation built by ``thunk()`` at each sync."""
    return Guard(thunk)


def with_nack(f: Callable[[Operation], Operation], cond: Condition | None = None) -> Operation:
    """``f(nack)`` at each sync; ``nack`` is enabled if the sync commits elsewhere.

    ``cond``: signal this condition as the nack (``nack`` waits on it) instead of
    a fresh one; a condition named by several scopes of one sync is signalled
    when the winner lies in none of them."""
    return WithNack(f, cond)
