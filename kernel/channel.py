"""Channels: synchronous rendezvous points in one global table.

A :class:`Channel` has no buffer: ``send(ch, msg)`` and ``recv(ch)`` are CML
base operations (kernel/events.py) that commit together, the sender with 0,
the receiver with the message.  Each side has a FIFO :class:`WaitQueue` of
parked arms, so blocked senders are served in the order they blocked (and the
same for receivers).  A try looks only at the head of the opposite queue:
queues hold only live (WAITING) entries, because a commit removes all of its
sync's entries at once.

The table
---------

:class:`ChannelTable` is global (in no container's memory) with a capacity
fixed at boot.  ``create`` takes the lowest free slot (the slot number is the
channel id the debugger shows) and raises ``KernelError(ENFILE)`` when the
table is full: an error the syscall layer returns as ``-ENFILE``; the kernel
goes on, and a slot comes back when a channel is freed.

Typing
------

A channel is created with a message size (0 = any size up to
:data:`MAX_MSG` bytes) and a tag (0 = untyped).  ``send`` checks them when it
is synced, and a bad message is an arm that fails at once: ``EMSGSIZE`` for a
wrong size, ``EINVAL`` for a tag that differs from the channel's (a send with
tag 0 makes no claim and is accepted) or for a non-bytes message on a sized
channel.  Kernel fibers may send any Python object on a size-0 channel
(bytes-like messages are copied to ``bytes`` when the operation is made).

Holders, and when "the other side is gone"
------------------------------------------

A channel is *held* by parties: every handle to it in a container's
:class:`~vmk.kernel.handles.HandleTable` counts once for that container, and
kernel code may hold it directly with ``hold()`` / ``release()`` (party
:data:`~vmk.kernel.events.KERNEL` by default, e.g. the console rx/tx channels
of the UART driver).  The party of a syncing fiber is its container, or
KERNEL for a kernel fiber without one.

* The channel is *freed* when its last hold goes: its slot returns to the
  table, and every fiber parked on it wakes with ``EPIPE``; any later sync on
  it (through a stale Python reference) fails with ``EPIPE`` at once.
* It becomes *connected* the first time two different parties hold it.
* An arm on a channel fails with ``EPIPE`` ("the other side is gone") iff the
  channel is freed, or it is connected and the syncing party is its only
  holder: nobody else holds it, so no partner can ever arrive.  This is
  checked at every try, and re-checked for every parked arm whenever a hold
  is dropped (a handle closed, a container's table closed).

The image's hold.  A channel named in the image is held by :data:`IMAGE`
for as long as the image lives (a container spawned later from the image gets
its handle then), but IMAGE is not a side of it: it does not count for
*connected* nor as "someone else holds it".  So a pipe the manifest declares
between two containers breaks for one of them as soon as the other is gone,
as a pipe does, and works again if a new container of the image takes it.

A channel used only inside one container (never connected) never breaks:
fibers of one container may rendezvous on it freely.  A connected channel
whose holders shrink to one party breaks for that party until it is passed on
again (holders are counted, not remembered, so a server can hand the same
channel to the next client).  A party that syncs without holding the channel
(a kernel fiber borrowing it) never gets ``EPIPE`` from a living channel, and
does not keep it alive: hold what you use.
"""
from __future__ import annotations

import heapq
from collections.abc import Iterator
from typing import Any

from .events import KERNEL, NOT_READY, BaseOp, Failed, KernelError, Operation, Sync, Waiter, WaitQueue
from .syscall_table import Errno

__all__ = ["IMAGE", "MAX_MSG", "MAX_TAG", "Channel", "ChannelTable", "Message", "message_size", "recv", "send"]


class _ImageParty:
    """The hold of the boot image on the channels it names (see the module doc)."""
    __slots__ = ()

    def __repr__(self) -> str:
        return "IMAGE"


IMAGE: Any = _ImageParty()

MAX_MSG = 4096
"""Largest message on a channel created with size 0."""
MAX_TAG = 0xFFFF_FFFF
"""Largest channel tag (tags are u32 in the image; 0 = untyped)."""


class Message:
    """A guest's ``sendmsg``: bytes, the sender's tag claim and handles in flight.

    ``objs`` are the objects behind the sender's ``handles`` (looked up when the
    send was synced); ``sender`` is the sending party.  Who receives it turns
    them into handles of its own (kernel/pid0.py) and, for a ``move``, closes
    the sender's handles afterwards.  Its size is that of its bytes, so channel
    typing treats it as a bytes message; it is never ``bytes`` itself, so the C
    fast path (kernel/_fastipc.c) leaves it to Python."""
    __slots__ = ("data", "handles", "move", "objs", "sender", "tag")

    def __init__(self, data: bytes, tag: int = 0, sender: Any = None, handles: tuple[int, ...] = (),
                 objs: tuple[Any, ...] = (), move: bool = False) -> None:
        self.data = data
        self.tag = tag
        self.sender = sender
        self.handles = handles
        self.objs = objs
        self.move = move

    def __bytes__(self) -> bytes:
        return self.data

    def __repr__(self) -> str:
        return f"<Message {len(self.data)} bytes tag={self.tag} handles={len(self.objs)}{' move' if self.move else ''}>"


def message_size(msg: Any) -> int | None:
    """Length of a bytes-like message (a :class:`Message`'s bytes), None for an opaque kernel object."""
    if isinstance(msg, (bytes, bytearray)):
        return len(msg)
    if isinstance(msg, Message):
        return len(msg.data)
    if isinstance(msg, memoryview):
        return msg.nbytes
    return None


class Channel:
    """One slot of the :class:`ChannelTable`.  Made by ``ChannelTable.create`` only."""
    __slots__ = (
        "__weakref__",
        "_holders",
        "_table",
        "cid",
        "connected",
        "freed",
        "msg_size",
        "name",
        "recvq",
        "sendq",
        "sends",
        "tag",
    )

    def __init__(self, table: ChannelTable, cid: int, msg_size: int, tag: int, name: str) -> None:
        self._table = table
        self.cid = cid
        self.msg_size = msg_size
        self.tag = tag
        self.name = name
        self.sendq = WaitQueue()        # parked senders (payload = message)
        self.recvq = WaitQueue()        # parked receivers
        self._holders: dict[Any, int] = {}
        self.connected = False
        self.freed = False
        self.sends = 0                  # messages delivered, for the debugger

    # -- holders -------------------------------------------------------------
    def hold(self, party: Any = KERNEL) -> None:
        """Add a hold by ``party`` (a container or KERNEL)."""
        if self.freed:
            raise KernelError(Errno.EBADF, f"channel {self.cid} is freed")
        h = self._holders
        h[party] = h.get(party, 0) + 1
        if len(h) - (IMAGE in h) >= 2:
            self.connected = True

    def release(self, party: Any = KERNEL) -> None:
        """Drop one hold by ``party``; frees the channel with its last hold."""
        n = self._holders.get(party, 0)
        if n <= 0:
            raise ValueError(f"{party!r} does not hold channel {self.cid}")
        if n == 1:
            del self._holders[party]
        else:
            self._holders[party] = n - 1
            return                      # the set of parties is unchanged
        if not self._holders:
            self.freed = True
            self._table._free(self)
        self._wake_broken()

    def transfer(self, src: Any, dst: Any) -> None:
        """Move one hold from ``src`` to ``dst`` (a handle moved in a message): the
        channel is never without it, and is connected only if it was, or if
        ``dst`` joins a party that holds it still."""
        n = self._holders.get(src, 0)
        if n <= 0:
            raise ValueError(f"{src!r} does not hold channel {self.cid}")
        if src is dst:
            return
        h = self._holders
        if n == 1:
            del h[src]
        else:
            h[src] = n - 1
        h[dst] = h.get(dst, 0) + 1
        if len(h) - (IMAGE in h) >= 2:
            self.connected = True
        self._wake_broken()

    @property
    def holders(self) -> dict[Any, int]:
        return dict(self._holders)

    def broken_for(self, party: Any) -> bool:
        """True iff an arm synced by ``party`` must fail with EPIPE (see module doc)."""
        if self.freed:
            return True
        h = self._holders
        return self.connected and len(h) - (IMAGE in h) == 1 and party in h

    def _wake_broken(self) -> None:
        for q in (self.sendq, self.recvq):
            for w in q:
                if self.broken_for(w.sync.party):
                    q.remove(w)
                    w.sync.complete(w.arm, Failed(KernelError(Errno.EPIPE, f"channel {self.cid}")))

    # -- typing ----------------------------------------------------------------
    def check(self, msg: Any, tag: int = 0) -> KernelError | None:
        """The error a send of ``msg`` with ``tag`` would get, or None."""
        size = message_size(msg)
        if self.msg_size:
            if size is None:
                return KernelError(Errno.EINVAL, f"channel {self.cid} carries {self.msg_size}-byte messages")
            if size != self.msg_size:
                return KernelError(Errno.EMSGSIZE, f"{size} bytes on a {self.msg_size}-byte channel")
        elif size is not None and size > MAX_MSG:
            return KernelError(Errno.EMSGSIZE, f"{size} bytes > {MAX_MSG}")
        if tag and self.tag and tag != self.tag:
            return KernelError(Errno.EINVAL, f"tag {tag} on a channel of tag {self.tag}")
        return None

    # -- the rendezvous itself (a send or recv arm's try, and the syscall fast path) ----
    def hand_over(self, msg: Any, tag: int, party: Any, exclude: Sync | None = None) -> Any:
        """Give ``msg`` to the first parked receiver: 0, a :class:`Failed`, or NOT_READY."""
        if not (type(msg) is bytes and not tag and len(msg) == self.msg_size):    # else check it
            err = self.check(msg, tag)
            if err is not None:
                return Failed(err)
        if self.broken_for(party):
            return Failed(KernelError(Errno.EPIPE, f"channel {self.cid}"))
        w = self.recvq.first(exclude)
        if w is None:
            return NOT_READY
        self.recvq.remove(w)
        self.sends += 1
        t = self._table.tracer
        if t is not None:
            t.rendezvous(self, exclude.fiber if exclude is not None else None, w.sync.fiber, message_size(msg))
        w.sync.complete(w.arm, msg)
        return 0

    def take(self, party: Any, exclude: Sync | None = None) -> Any:
        """Take the first parked sender's message (it commits with 0): the message,
        a :class:`Failed`, or NOT_READY."""
        if self.broken_for(party):
            return Failed(KernelError(Errno.EPIPE, f"channel {self.cid}"))
        w = self.sendq.first(exclude)
        if w is None:
            return NOT_READY
        self.sendq.remove(w)
        self.sends += 1
        t = self._table.tracer
        if t is not None:
            t.rendezvous(self, w.sync.fiber, exclude.fiber if exclude is not None else None,
                         message_size(w.payload))
        w.sync.complete(w.arm, 0)
        return w.payload

    def __repr__(self) -> str:
        state = "freed" if self.freed else f"holders={len(self._holders)}"
        return (f"<Channel {self.cid}{' ' + self.name if self.name else ''} {state} "
                f"senders={len(self.sendq)} receivers={len(self.recvq)}>")


class ChannelTable:
    """The global channel pool, ``capacity`` slots, lowest free slot first."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        self._slots: list[Channel | None] = [None] * capacity
        self._free_ids = list(range(capacity))       # a heap
        self.high_water = 0
        self.tracer: Any = None                      # a machine/trace.py Tracer (pid 0 sets it)

    def create(self, msg_size: int = 0, tag: int = 0, *, holder: Any = KERNEL, name: str = "") -> Channel:
        """A new channel held once by ``holder``.

        Raises ``KernelError(EINVAL)`` for a size outside 0..MAX_MSG or a tag
        outside 0..MAX_TAG, ``KernelError(ENFILE)`` when the table is full.
        """
        if not 0 <= msg_size <= MAX_MSG:
            raise KernelError(Errno.EINVAL, f"message size {msg_size}")
        if not 0 <= tag <= MAX_TAG:
            raise KernelError(Errno.EINVAL, f"tag {tag}")
        if not self._free_ids:
            raise KernelError(Errno.ENFILE, f"all {self.capacity} channels in use")
        cid = heapq.heappop(self._free_ids)
        ch = Channel(self, cid, msg_size, tag, name)
        self._slots[cid] = ch
        ch.hold(holder)
        self.high_water = max(self.high_water, self.in_use)
        return ch

    def _free(self, ch: Channel) -> None:
        assert self._slots[ch.cid] is ch
        self._slots[ch.cid] = None
        heapq.heappush(self._free_ids, ch.cid)

    def get(self, cid: int) -> Channel | None:
        if 0 <= cid < self.capacity:
            return self._slots[cid]
        return None

    @property
    def in_use(self) -> int:
        return self.capacity - len(self._free_ids)

    def __iter__(self) -> Iterator[Channel]:
        return (ch for ch in self._slots if ch is not None)

    def __len__(self) -> int:
        return self.in_use


class _Send(BaseOp):
    __slots__ = ("ch", "msg", "tag")

    def __init__(self, ch: Channel, msg: Any, tag: int) -> None:
        self.ch = ch
        self.msg = bytes(msg) if isinstance(msg, (bytearray, memoryview)) else msg
        self.tag = tag

    def try_(self, sync: Sync, arm: int) -> Any:
        return self.ch.hand_over(self.msg, self.tag, sync.party, sync)

    def block(self, sync: Sync, arm: int) -> Waiter:
        return self.ch.sendq.park(sync, arm, self.msg)

    def describe(self, sync: Sync) -> str:
        return f"send on channel {self.ch.cid}"


class _Recv(BaseOp):
    __slots__ = ("ch",)

    def __init__(self, ch: Channel) -> None:
        self.ch = ch

    def try_(self, sync: Sync, arm: int) -> Any:
        return self.ch.take(sync.party, sync)

    def block(self, sync: Sync, arm: int) -> Waiter:
        return self.ch.recvq.park(sync, arm)

    def describe(self, sync: Sync) -> str:
        return f"recv on channel {self.ch.cid}"


def send(ch: Channel, msg: Any, tag: int = 0) -> Operation:
    """Rendezvous with a receiver, offering ``msg``; commits with 0."""
    return _Send(ch, msg, tag)


def recv(ch: Channel) -> Operation:
    """Rendezvous with a sender; commits with its message."""
    return _Recv(ch)
