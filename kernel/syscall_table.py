"""The one table of vmk system calls.

Containers enter the kernel only through ``syscall``: number in RAX,
arguments in RDI, RSI, RDX, R10, R8, R9, result in RAX, a negative errno on
failure (the Linux convention).  Every pointer argument is checked against the
caller's address space.  ``vmk.h`` (C) and ``vmk.inc`` (assembler) for guest
programs are generated from this table (``vmk.tools.guestapi``); nothing else
defines a syscall number.

The CML ``sync`` call takes an array of event descriptors (:data:`EVENT_LAYOUT`)
and returns the index of the arm that fired; the arm's value (bytes received,
fiber exit value, ...) is written back into that descriptor's ``result`` field.

Values.  Every value the kernel writes back to a guest (RAX, an event's
``result``, a ``struct vmk_msg`` field) is reduced to 64 bits as two's
complement (a value of 2**63 or more reads as negative in an ``int64_t``);
nothing a guest passes can make the write fail.  Values read from a guest are
read with the signedness the C declaration gives them: ``long`` and
``int64_t`` fields are signed, ``uint64_t`` fields (``arg0``/``arg1`` used as
pointers or lengths) unsigned, except where a kind says otherwise below.

Time.  Every duration and time in the ABI is a *signed* 64-bit count of
virtual nanoseconds (``EV_TIMEOUT``/``EV_AT_TIME`` read ``arg0`` as signed).
A duration <= 0, or an ``EV_AT_TIME`` at or before now, is ready at once (a
time in the past is ready, as in CML and Guile fibers).

Concurrent ML.  ``wrap`` and ``guard`` run in the syncing fiber (CML: the guard
before the sync, the wrap after the commit), so they are guest code:
``vmk_sync_ops`` in ``vmk.h`` (a static inline library emitted with the
wrappers).  ``with-nack`` needs the kernel: an ``EV_WITH_NACK`` descriptor is a
*scope marker*, not an arm: ``{kind=EV_WITH_NACK, handle=condition, arg0=k}``
puts the next k descriptors (markers inside count, and may nest) in a scope;
when the sync commits to an arm outside the scope, or is aborted (the fiber's
container ends), the kernel signals the condition (a ``cond_create`` handle; a
server waits for it with ``EV_COND``).  It is never signalled when an arm
inside the scope wins.  A marker is never the returned index.  k < 0 or past
the end of the array is ``-EINVAL``, a handle that is not a condition
``-EBADF``.  Conditions are one-shot: use a fresh one for every sync.

Messages.  ``sendmsg``/``recvmsg`` (and ``EV_SENDMSG``/``EV_RECVMSG``, arg0 =
``struct vmk_msg *``, :data:`MSG_LAYOUT`) carry bytes, a tag and up to
:data:`MAX_MSG_HANDLES` handles (channels or conditions).  Send: ``buf``/``len``
the bytes, ``tag`` the sender's claim (0 = none; a claim that differs from a
tagged channel's is ``-EINVAL``), ``handles``/``nhandles`` the handles to pass,
``flags`` ``VMK_MSG_MOVE`` to lose them at the commit (else the sender keeps
them: a copy).  Receive: ``buf``/``len``/``handles``/``nhandles`` are
capacities; on return ``len`` (bytes delivered), ``tag`` (the sender's, or the
channel's when the sender made no claim), ``nhandles`` (new handles written to
``handles``, in the order sent) and ``flags`` (``VMK_MSG_CTRUNC`` when handles
were dropped for want of room) are written back; the result is the byte count.
The receiver's handles are installed before a moved handle is closed in the
sender, so a channel in flight is never freed.  A plain ``recv`` of a message
with handles gets the bytes; the handles are dropped (closed), never leaked.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

__all__ = ["Syscall", "SYSCALLS", "Errno", "EventKind", "EVENT_LAYOUT", "EVENT_SIZE", "MSG_LAYOUT", "MSG_SIZE",
           "MsgFlag", "MAX_MSG_HANDLES", "SyscallSpec", "ERRORS", "EVENT_DOCS", "LIMITS", "SYNC_MAX_EVENTS",
           "SPAWN_MAX_NAME", "SPAWN_MAX_HANDLES", "CONSOLE_WRITE_MAX"]


@dataclass(frozen=True, slots=True)
class SyscallSpec:
    number: int
    name: str
    args: tuple[str, ...]          # C declarations, in register order
    returns: str
    doc: str


class Syscall(IntEnum):
    EXIT = 0
    YIELD = 1
    FIBER_SPAWN = 2
    FIBER_JOIN = 3
    FIBER_EXIT = 4
    FIBER_SELF = 5
    CHAN_CREATE = 6
    CHAN_CLOSE = 7
    SEND = 8
    RECV = 9
    SYNC = 10
    SLEEP = 11
    TIME = 12
    GETPID = 13
    SPAWN = 14
    WAIT = 15
    CONSOLE_WRITE = 16
    HANDLE_DUP = 17
    COND_CREATE = 18
    COND_SIGNAL = 19
    SENDMSG = 20
    RECVMSG = 21


SYSCALLS: tuple[SyscallSpec, ...] = (
    SyscallSpec(0, "exit", ("long code",), "void", "End the calling container (all its fibers) with an exit code."),
    SyscallSpec(1, "yield", (), "long", "Let other fibers run; returns 0."),
    SyscallSpec(2, "fiber_spawn", ("void *entry", "void *stack_top", "long arg"), "long",
                "Start a fiber in this container at entry(arg) on the given stack; returns its fiber id."),
    SyscallSpec(3, "fiber_join", ("long fid",), "long",
                "Wait for a fiber of this container to end; returns its exit value.  A fiber is joined once: "
                "the first join (or EV_JOIN arm) that commits forgets it, and a later join of its id is -ESRCH."),
    SyscallSpec(4, "fiber_exit", ("long value",), "void", "End the calling fiber with a value for fiber_join."),
    SyscallSpec(5, "fiber_self", (), "long", "The calling fiber's id."),
    SyscallSpec(6, "chan_create", ("long msg_size", "long tag"), "long",
                "A new channel for messages of exactly msg_size bytes (0 = any size up to 4096) and tag "
                "(0 = any); returns a handle, or -ENFILE when the global channel table is full."),
    SyscallSpec(7, "chan_close", ("long handle",), "long",
                "Close a handle; the channel is freed with its last handle, and fibers blocked on it wake with -EPIPE."),
    SyscallSpec(8, "send", ("long handle", "const void *buf", "long len"), "long",
                "Rendezvous: block until a receiver takes the message; returns 0."),
    SyscallSpec(9, "recv", ("long handle", "void *buf", "long len"), "long",
                "Rendezvous: block until a sender offers a message; returns its length."),
    SyscallSpec(10, "sync", ("struct vmk_event *events", "long count"), "long",
                "Concurrent ML sync on an array of events: exactly one arm commits; returns its index."),
    SyscallSpec(11, "sleep", ("long ns",), "long", "Block for ns nanoseconds of virtual time; returns 0."),
    SyscallSpec(12, "time", (), "long", "Virtual time in nanoseconds since boot."),
    SyscallSpec(13, "getpid", (), "long", "The calling container's pid."),
    SyscallSpec(14, "spawn", ("const char *program", "long name_len", "const long *handles", "long nhandles"), "long",
                "Start a container from a program of the boot image, passing it copies of handles; returns its pid."),
    SyscallSpec(15, "wait", ("long pid",), "long", "Wait for a container to end; returns its exit code."),
    SyscallSpec(16, "console_write", ("const void *buf", "long len"), "long",
                "Early-debug output straight to the console; returns len.  Blocks while the console "
                "is more than 4 KiB behind (the bytes go out in order, the writer waits)."),
    SyscallSpec(17, "handle_dup", ("long handle",), "long", "A second handle to the same channel."),
    SyscallSpec(18, "cond_create", (), "long", "A condition (a one-shot broadcast event); returns a handle."),
    SyscallSpec(19, "cond_signal", ("long handle",), "long", "Signal a condition: every waiter, now and later, wakes."),
    SyscallSpec(20, "sendmsg", ("long handle", "struct vmk_msg *msg"), "long",
                "Rendezvous: send bytes, a tag and handles (struct vmk_msg; VMK_MSG_MOVE in flags: the handles "
                "leave this container at the commit); returns 0."),
    SyscallSpec(21, "recvmsg", ("long handle", "struct vmk_msg *msg"), "long",
                "Rendezvous: receive bytes, tag and handles into struct vmk_msg (capacities in, len/tag/nhandles/"
                "flags written back); returns the byte count."),
)

assert [s.number for s in SYSCALLS] == [int(s) for s in Syscall], "table and enum disagree"


class Errno(IntEnum):
    """Errors returned as -errno (Linux numbers)."""
    EPERM = 1
    ESRCH = 3
    EINTR = 4
    EBADF = 9
    ECHILD = 10
    EAGAIN = 11
    ENOMEM = 12
    EFAULT = 14
    EINVAL = 22
    ENFILE = 23
    EMFILE = 24
    EPIPE = 32
    ENOSYS = 38
    EMSGSIZE = 90
    ETIMEDOUT = 110


class EventKind(IntEnum):
    """``struct vmk_event.kind`` for sync()."""
    SEND = 1          # handle, buf, len
    RECV = 2          # handle, buf, len   -> result = bytes received
    TIMEOUT = 3       # arg0 = ns relative to the sync (signed; <= 0: ready at once)
    AT_TIME = 4       # arg0 = absolute virtual ns (signed; at or before now: ready at once)
    IRQ = 5           # handle = IRQ line granted to the container -> result = count since last
    JOIN = 6          # handle = fiber id -> result = exit value
    COND = 7          # handle = condition
    ALWAYS = 8        # result = arg0
    NEVER = 9
    WITH_NACK = 10    # scope marker: handle = condition, arg0 = k (the next k descriptors)
    SENDMSG = 11      # handle, arg0 = struct vmk_msg *
    RECVMSG = 12      # handle, arg0 = struct vmk_msg *  -> result = bytes received


# struct vmk_event { u32 kind; u32 flags; i64 handle; u64 arg0; u64 arg1; i64 result; }  (40 bytes)
EVENT_LAYOUT = (("kind", "I"), ("flags", "I"), ("handle", "q"), ("arg0", "Q"), ("arg1", "Q"), ("result", "q"))
EVENT_SIZE = 40

# struct vmk_msg { const void *buf; i64 len; i64 tag; i64 *handles; i64 nhandles; i64 flags; }  (48 bytes)
MSG_LAYOUT = (("buf", "Q"), ("len", "q"), ("tag", "q"), ("handles", "Q"), ("nhandles", "q"), ("flags", "q"))
MSG_SIZE = 48
MAX_MSG_HANDLES = 16
"""Most handles one message carries (more is -EINVAL)."""


class MsgFlag(IntEnum):
    """``struct vmk_msg.flags`` (``VMK_MSG_*``)."""
    MOVE = 1          # send: the handles leave the sender at the commit
    CTRUNC = 2        # recv (written back): handles were dropped, the receiver's array was too small


SYNC_MAX_EVENTS = 64
"""Most descriptors (arms and markers) one ``sync`` takes."""
SPAWN_MAX_NAME = 64
"""Longest program name ``spawn`` takes."""
SPAWN_MAX_HANDLES = 16
"""Most handles ``spawn`` passes to the new container."""
CONSOLE_WRITE_MAX = 65536
"""Most bytes one ``console_write`` takes."""

_E = Errno
_CHAN = ((_E.EBADF, "the handle is not an open channel of this container"),)
_BUF = ((_E.EFAULT, "the buffer is not (writable) memory of this container"),)
_PIPE = ((_E.EPIPE, "the other side of the channel is gone: every other holder closed it or exited"),)
_SENDTYPE = ((_E.EMSGSIZE, "the length differs from the channel's message size (or exceeds 4096 on an "
              "unsized channel)"),
             (_E.EINVAL, "a tag that differs from the channel's"))

ERRORS: dict[str, tuple[tuple[Errno, str], ...]] = {
    "fiber_spawn": ((_E.EAGAIN, "the container has its maximum number of live fibers"),
                    (_E.ENOMEM, "stack_top = 0 and the heap has no room left for a kernel-chosen stack"),
                    (_E.EFAULT, "stack_top is not writable memory of this container")),
    "fiber_join": ((_E.ESRCH, "no fiber of this container has that id, or it was joined already"),),
    "chan_create": ((_E.EINVAL, "msg_size outside 0..4096 or tag outside 0..2^32-1"),
                    (_E.ENFILE, "the global channel table is full"),
                    (_E.EMFILE, "the container's handle table is full")),
    "chan_close": ((_E.EBADF, "not an open handle of this container"),),
    "send": _CHAN + _BUF + _SENDTYPE + _PIPE,
    "recv": _CHAN + _BUF + _PIPE,
    "sync": ((_E.EINVAL, "count outside 1..64, an unknown kind, or an EV_WITH_NACK scope that runs past "
              "the array or its enclosing scope"),
             (_E.EBADF, "a handle that is not an open channel / condition of the kind the event needs"),
             (_E.EFAULT, "the array or an event's buffer is not memory of this container"),
             (_E.ESRCH, "EV_JOIN on a fiber that is not of this container"),
             (_E.EPERM, "EV_IRQ on a line not granted to this container"),
             (_E.EMSGSIZE, "a send arm's message does not fit the channel")) + _PIPE,
    "spawn": ((_E.EINVAL, "name_len outside 1..64 or nhandles outside 0..16"),
              (_E.EFAULT, "the name or the handle array is not memory of this container"),
              (_E.ESRCH, "the image has no container of that name"),
              (_E.EBADF, "a handle to pass is not open"),
              (_E.ENOMEM, "guest RAM cannot hold the new container")),
    "wait": ((_E.ECHILD, "no container has that pid"),),
    "console_write": ((_E.EINVAL, "len < 0 or len > 65536"),) + _BUF,
    "handle_dup": ((_E.EBADF, "not an open handle of this container"),
                   (_E.EMFILE, "the container's handle table is full")),
    "cond_create": ((_E.EMFILE, "the container's handle table is full"),),
    "cond_signal": ((_E.EBADF, "the handle is not an open condition"),),
    "sendmsg": _CHAN + ((_E.EFAULT, "the struct, the bytes or the handle array is not memory of this container"),
                        (_E.EINVAL, "flags other than VMK_MSG_MOVE, nhandles outside 0..16, a negative length, "
                         "a tag outside 0..2^32-1 or one that differs from the channel's"),
                        (_E.EBADF, "a handle to pass is not open"),
                        (_E.EMSGSIZE, "the length does not fit the channel")) + _PIPE,
    "recvmsg": _CHAN + ((_E.EFAULT, "the struct, the buffer or the handle array is not writable memory of "
                         "this container"),
                        (_E.EINVAL, "a negative length or nhandles outside 0..16")) + _PIPE,
}
"""The errors each call returns, and when (docs/abi.md; calls not listed return none)."""

EVENT_DOCS: dict[EventKind, tuple[str, str]] = {
    EventKind.SEND: ("handle = channel, arg0 = buf, arg1 = len", "0"),
    EventKind.RECV: ("handle = channel, arg0 = buf, arg1 = capacity", "bytes received"),
    EventKind.TIMEOUT: ("arg0 = signed ns after the sync (<= 0: ready at once)", "0"),
    EventKind.AT_TIME: ("arg0 = signed absolute virtual ns (at or before now: ready at once)", "0"),
    EventKind.IRQ: ("handle = IRQ line granted to the container in the image", "interrupts since the last consumer"),
    EventKind.JOIN: ("handle = fiber id of this container", "the fiber's exit value"),
    EventKind.COND: ("handle = condition", "0"),
    EventKind.ALWAYS: ("arg0 = the value", "arg0"),
    EventKind.NEVER: ("(none)", "(never commits)"),
    EventKind.WITH_NACK: ("scope marker, not an arm: handle = condition, arg0 = k, the next k descriptors; "
                          "the condition is signalled when the sync commits outside the scope or is aborted",
                          "(never the returned index)"),
    EventKind.SENDMSG: ("handle = channel, arg0 = struct vmk_msg * (bytes, tag, handles, flags)", "0"),
    EventKind.RECVMSG: ("handle = channel, arg0 = struct vmk_msg * (capacities; len, tag, nhandles, flags "
                        "written back)", "bytes received"),
}
"""What each event kind reads and what it writes to ``result`` (docs/abi.md)."""

LIMITS: tuple[tuple[str, str, str], ...] = (
    ("descriptors in one sync", str(SYNC_MAX_EVENTS), "fixed"),
    ("handles in one message", str(MAX_MSG_HANDLES), "fixed"),
    ("program name of spawn", f"{SPAWN_MAX_NAME} bytes", "fixed"),
    ("handles passed by spawn", str(SPAWN_MAX_HANDLES), "fixed"),
    ("bytes in one console_write", str(CONSOLE_WRITE_MAX), "fixed"),
    ("channels in the whole system", "the image's [kernel] channels", "manifest (ENFILE beyond)"),
    ("channel tag", "0..2^32-1 (0 = untyped)", "chan_create"),
)
"""The limits a guest meets that this table sets (docs/abi.md adds the channel and handle
tables' own: kernel/channel.py ``MAX_MSG``, kernel/handles.py ``DEFAULT_HANDLES``)."""

assert set(ERRORS) <= {s.name for s in SYSCALLS}, "ERRORS names a call that is not in the table"
assert set(EVENT_DOCS) == set(EventKind), "every event kind needs its EVENT_DOCS line"
