"""Channels and handles: rendezvous order, typing, table exhaustion, unforgeable
handles, and EPIPE when the other side of a channel is gone."""
from __future__ import annotations

from typing import Any

import pytest
from kernelsim import Box, Sim
from vmk.kernel.channel import MAX_MSG, ChannelTable, recv, send
from vmk.kernel.events import KERNEL, Condition, KernelError, always, choice, timeout, wrap
from vmk.kernel.fiber import FiberState
from vmk.kernel.handles import HandleTable
from vmk.kernel.scheduler import BLOCKED, Completed
from vmk.kernel.syscall_table import Errno


def syscall(fn: Any, *args: Any) -> Any:
    """What the syscall layer does with the table/handle API: errors become -errno."""
    try:
        return fn(*args)
    except KernelError as e:
        return -int(e.errno)


def container(name: str, priority: int = 4) -> Box:
    box = Box(name, priority)
    box.handles = HandleTable(box)     # type: ignore[attr-defined]
    return box


# -- rendezvous ------------------------------------------------------------------------

def test_senders_are_served_in_fifo_order(sim: Sim) -> None:
    table = ChannelTable(1)
    ch = table.create()
    got: list[Any] = []

    def sender(msg: str):  # type: ignore[no-untyped-def]
        got.append(("sent", msg, (yield send(ch, msg))))

    def receiver():  # type: ignore[no-untyped-def]
        yield timeout(10)
        for _ in range(3):
            got.append(("recv", (yield recv(ch))))
    for m in ("m1", "m2", "m3"):
        sim.kernel(sender(m), m)
    sim.kernel(receiver(), "rx")
    sim.run(until=5)
    assert len(ch.sendq) == 3 and [w.payload for w in ch.sendq] == ["m1", "m2", "m3"]
    sim.run()
    assert [g[1] for g in got if g[0] == "recv"] == ["m1", "m2", "m3"]
    assert sorted(g for g in got if g[0] == "sent") == [("sent", m, 0) for m in ("m1", "m2", "m3")]
    assert ch.sends == 3 and not ch.sendq and not ch.recvq


def test_receivers_are_served_in_fifo_order(sim: Sim) -> None:
    table = ChannelTable(1)
    ch = table.create()
    got: list[tuple[str, Any]] = []

    def receiver(name: str):  # type: ignore[no-untyped-def]
        got.append((name, (yield recv(ch))))

    def sender():  # type: ignore[no-untyped-def]
        yield timeout(10)
        for m in (b"a", b"b", b"c"):
            yield send(ch, m)
    for n in ("r1", "r2", "r3"):
        sim.kernel(receiver(n), n)
    sim.kernel(sender(), "tx")
    sim.run()
    assert got == [("r1", b"a"), ("r2", b"b"), ("r3", b"c")]


def test_messages_are_copied_at_send(sim: Sim) -> None:
    table = ChannelTable(1)
    ch = table.create()
    buf = bytearray(b"abc")
    op = send(ch, buf)
    buf[0] = ord("X")
    got: list[Any] = []

    def rx():  # type: ignore[no-untyped-def]
        got.append((yield recv(ch)))

    def tx():  # type: ignore[no-untyped-def]
        yield op
    sim.kernel(rx(), "rx")
    sim.kernel(tx(), "tx")
    sim.run()
    assert got == [b"abc"]


# -- typing ----------------------------------------------------------------------------

@pytest.mark.parametrize("size, tag, msg, msg_tag, err", [
    (8, 0, b"12345678", 0, None),
    (8, 0, b"1234567", 0, Errno.EMSGSIZE),
    (8, 0, b"123456789", 0, Errno.EMSGSIZE),
    (8, 0, "not bytes", 0, Errno.EINVAL),
    (0, 0, b"x" * MAX_MSG, 0, None),
    (0, 0, b"x" * (MAX_MSG + 1), 0, Errno.EMSGSIZE),
    (0, 0, ("any", "kernel", "object"), 0, None),
    (0, 7, b"x", 7, None),
    (0, 7, b"x", 0, None),                # tag 0: no claim
    (0, 7, b"x", 8, Errno.EINVAL),
    (0, 0, b"x", 8, None),                # untyped channel
])
def test_send_is_checked_for_size_and_tag(sim: Sim, size: int, tag: int, msg: Any, msg_tag: int,
                                          err: Errno | None) -> None:
    table = ChannelTable(1)
    ch = table.create(size, tag)
    box = container("c")
    g = sim.guest(iter(()), box, "g")      # type: ignore[arg-type]
    ch.hold(box)                           # the guest holds it too (connected: KERNEL and box)
    assert sim.sched.next_fiber() is g
    r = sim.sched.sync(g, choice(send(ch, msg, msg_tag), wrap(always(1), lambda _: "fallback")))
    if err is None:
        assert r == Completed("fallback")  # checked fine, no receiver: the next arm wins
    else:
        assert isinstance(r, Completed) and r.value == -err and r.error is not None
        assert r.error.errno == err
    assert not ch.sendq


def test_create_checks_its_arguments() -> None:
    table = ChannelTable(2)
    for size, tag in ((-1, 0), (MAX_MSG + 1, 0), (0, -3)):
        with pytest.raises(KernelError) as e:
            table.create(size, tag)
        assert e.value.errno == Errno.EINVAL
    assert table.in_use == 0


# -- the table -----------------------------------------------------------------------------

def test_exhaustion_is_an_error_and_things_go_on() -> None:
    table = ChannelTable(2)
    box = container("c")
    h: HandleTable = box.handles          # type: ignore[attr-defined]
    a = syscall(h.create_channel, table)
    b = syscall(h.create_channel, table, 16, 3)
    assert (a, b) == (0, 1)
    assert syscall(h.create_channel, table) == -Errno.ENFILE
    assert syscall(h.create_channel, table) == -Errno.ENFILE
    assert len(h) == 2 and table.in_use == 2 and table.high_water == 2
    assert syscall(h.close, a) is None
    c = syscall(h.create_channel, table, 4)
    assert c == 0 and h.channel(c).cid == 0 and h.channel(c).msg_size == 4
    assert syscall(h.create_channel, table) == -Errno.ENFILE


def test_handle_table_capacity_is_emfile() -> None:
    table = ChannelTable(8)
    box = Box("c")
    h = HandleTable(box, capacity=2)
    syscall(h.create_channel, table)
    syscall(h.create_channel, table)
    assert syscall(h.create_channel, table) == -Errno.EMFILE
    assert syscall(h.dup, 0) == -Errno.EMFILE
    assert table.in_use == 2                  # no channel leaked by the refusal


# -- handles -------------------------------------------------------------------------------

def test_forged_closed_and_foreign_handles_are_refused() -> None:
    table = ChannelTable(4)
    a, b = container("a"), container("b")
    ha: HandleTable = a.handles              # type: ignore[attr-defined]
    hb: HandleTable = b.handles              # type: ignore[attr-defined]
    x = ha.create_channel(table)
    ha.create_channel(table)
    hc = ha.install(Condition("c"))
    for bad in (x, 1, 7, -1, True, "0", None):
        assert syscall(hb.channel, bad) == -Errno.EBADF      # a's numbers mean nothing in b
    assert syscall(ha.channel, 99) == -Errno.EBADF           # never opened
    assert syscall(ha.channel, hc) == -Errno.EBADF           # wrong kind
    assert isinstance(ha.get(hc, Condition), Condition)
    ha.close(x)
    assert syscall(ha.channel, x) == -Errno.EBADF            # closed
    assert syscall(ha.close, x) == -Errno.EBADF              # closed twice
    assert syscall(ha.dup, x) == -Errno.EBADF


def test_dup_copy_and_free_with_the_last_handle() -> None:
    table = ChannelTable(4)
    a, b = container("a"), container("b")
    ha: HandleTable = a.handles              # type: ignore[attr-defined]
    hb: HandleTable = b.handles              # type: ignore[attr-defined]
    h0 = ha.create_channel(table)
    ch = ha.channel(h0)
    h1 = ha.dup(h0)
    assert h1 == 1 and ha.channel(h1) is ch and not ch.connected
    hb0 = ha.copy_to(h0, hb)
    assert hb0 == 0 and hb.channel(hb0) is ch
    assert ch.connected and ch.holders == {a: 2, b: 1}
    ha.close(h0)
    ha.close(h1)
    assert not ch.freed and table.in_use == 1
    hb.close(hb0)
    assert ch.freed and table.in_use == 0 and table.get(0) is None


def test_close_all_closes_a_containers_handles() -> None:
    table = ChannelTable(4)
    a, b = container("a"), container("b")
    ha: HandleTable = a.handles              # type: ignore[attr-defined]
    hb: HandleTable = b.handles              # type: ignore[attr-defined]
    for _ in range(3):
        ha.create_channel(table)
    ha.copy_to(2, hb)
    ha.install(Condition())
    assert ha.close_all() == 4 and len(ha) == 0
    assert table.in_use == 1                 # the one b still holds
    assert ha.create_channel(table) == 0     # numbers are reused, lowest first


# -- the other side is gone ----------------------------------------------------------------------

def test_peer_exit_wakes_the_partner_with_epipe(sim: Sim) -> None:
    table = ChannelTable(4)
    a, b = container("a"), container("b")
    ha: HandleTable = a.handles              # type: ignore[attr-defined]
    hb: HandleTable = b.handles              # type: ignore[attr-defined]
    h = ha.create_channel(table)
    hb_h = ha.copy_to(h, hb)
    results: list[Any] = []

    def b_prog():  # type: ignore[no-untyped-def]
        results.append((yield recv(hb.channel(hb_h))))

    def a_prog():  # type: ignore[no-untyped-def]
        yield timeout(10 ** 9)
    gb = sim.guest(b_prog(), b, "gb")
    ga = sim.guest(a_prog(), a, "ga")
    sim.run(until=100)
    assert gb.state is FiberState.BLOCKED and gb.waiting_on == "recv on channel 0"
    # container a exits: its fibers end, then its handles close
    sim.sched.kill_container(a, exit_value=0)
    assert ga.done
    ha.close_all()
    assert gb.state is FiberState.RUNNABLE and gb.result == -Errno.EPIPE
    assert gb.error is not None and gb.error.errno == Errno.EPIPE
    sim.run()
    assert results == [-Errno.EPIPE]
    ch = hb.channel(hb_h)
    assert not ch.recvq and not ch.sendq and not ch.freed
    # and any later op by b on it fails at once instead of hanging
    g2 = sim.guest(iter(()), b, "g2")       # type: ignore[arg-type]
    assert sim.sched.next_fiber() is g2
    r1, r2 = sim.sched.sync(g2, send(ch, b"x")), sim.sched.sync(g2, recv(ch))
    assert isinstance(r1, Completed) and isinstance(r2, Completed)
    assert r1.value == r2.value == -Errno.EPIPE


def test_a_kernel_driver_gets_epipe_when_its_last_client_closes(sim: Sim) -> None:
    # the console pattern: the UART driver holds rx/tx directly, pid 1 through a handle
    table = ChannelTable(4)
    rx = table.create(name="console rx")                 # held by KERNEL
    c = container("init")
    h: HandleTable = c.handles                           # type: ignore[attr-defined]
    hrx = h.install(rx)
    events: list[Any] = []

    def driver():  # type: ignore[no-untyped-def]
        try:
            while True:
                yield send(rx, b"k")
                events.append(("delivered", sim.clock.now))
        except KernelError as e:
            events.append(("driver", e.errno, sim.clock.now))
            rx.release(KERNEL)

    def reader():  # type: ignore[no-untyped-def]
        yield recv(h.channel(hrx))
        yield timeout(50)
    sim.kernel(driver(), "uart")
    sim.guest(reader(), c, "init")
    sim.run(until=20)
    assert events == [("delivered", 0)]
    sim.clock.advance_to(60)
    h.close(hrx)                                          # pid 1 lets go of the console
    sim.run()
    assert events == [("delivered", 0), ("driver", Errno.EPIPE, 60)]
    assert rx.freed and table.in_use == 0


def test_closing_the_last_handle_wakes_blocked_fibers(sim: Sim) -> None:
    table = ChannelTable(2)
    c = container("c")
    h: HandleTable = c.handles                            # type: ignore[attr-defined]
    hh = h.create_channel(table)
    ch = h.channel(hh)
    results: list[Any] = []

    def waiter():  # type: ignore[no-untyped-def]
        results.append((yield choice(recv(ch), timeout(1000))))
    g = sim.guest(waiter(), c, "w")
    sim.run(until=10)
    assert g.state is FiberState.BLOCKED
    h.close(hh)                                           # another fiber of c closed it
    assert ch.freed and g.result == -Errno.EPIPE
    sim.run()
    assert results == [-Errno.EPIPE] and sim.clock.now == 10   # the timeout was disarmed


def test_a_channel_inside_one_container_never_breaks(sim: Sim) -> None:
    table = ChannelTable(1)
    c = container("c")
    h: HandleTable = c.handles                            # type: ignore[attr-defined]
    ch = h.channel(h.create_channel(table))
    got: list[Any] = []

    def rx():  # type: ignore[no-untyped-def]
        got.append((yield recv(ch)))

    def tx():  # type: ignore[no-untyped-def]
        yield timeout(5)
        got.append((yield send(ch, b"hi")))
    sim.guest(rx(), c, "rx")
    sim.guest(tx(), c, "tx")
    sim.run()
    assert sorted(got, key=repr) == [0, b"hi"]


def test_a_broken_channel_heals_when_passed_on(sim: Sim) -> None:
    table = ChannelTable(1)
    server, c1, c2 = container("server"), container("c1"), container("c2")
    hs: HandleTable = server.handles                      # type: ignore[attr-defined]
    h = hs.create_channel(table)
    ch = hs.channel(h)
    x = hs.copy_to(h, c1.handles)                         # type: ignore[attr-defined]
    c1.handles.close(x)                                   # type: ignore[attr-defined]
    assert ch.broken_for(server) and not ch.broken_for(c2) and not ch.broken_for(KERNEL)
    hs.copy_to(h, c2.handles)                             # type: ignore[attr-defined]
    assert not ch.broken_for(server)


def test_a_kernel_borrower_does_not_get_epipe_from_a_live_channel(sim: Sim) -> None:
    table = ChannelTable(1)
    a, b = container("a"), container("b")
    ch = a.handles.channel(a.handles.create_channel(table))    # type: ignore[attr-defined]
    hb = a.handles.copy_to(0, b.handles)                       # type: ignore[attr-defined]
    b.handles.close(hb)                                        # type: ignore[attr-defined]
    got: list[Any] = []

    def borrower():  # type: ignore[no-untyped-def]
        got.append((yield recv(ch)))
    k = sim.kernel(borrower(), "k")
    sim.run()
    assert k.state is FiberState.BLOCKED                      # a is still there to send


def test_killing_a_blocked_sender_removes_its_offer(sim: Sim) -> None:
    table = ChannelTable(1)
    a = container("a")
    ch = table.create()
    ch.hold(a)
    got: list[Any] = []

    def tx():  # type: ignore[no-untyped-def]
        yield send(ch, b"from the dead")

    def rx():  # type: ignore[no-untyped-def]
        yield timeout(10)
        got.append((yield choice(recv(ch), wrap(timeout(5), lambda _: "nothing"))))
    sim.guest(tx(), a, "tx")
    sim.kernel(rx(), "rx")
    sim.run(until=5)
    assert len(ch.sendq) == 1
    sim.sched.kill_container(a)
    assert len(ch.sendq) == 0
    sim.run()
    assert got == ["nothing"]


def test_guest_send_and_recv_through_the_scheduler(sim: Sim) -> None:
    table = ChannelTable(1)
    a, b = container("a", 1), container("b", 1)
    h = a.handles.create_channel(table, 4, 9)             # type: ignore[attr-defined]
    hb = a.handles.copy_to(h, b.handles)                  # type: ignore[attr-defined]
    ga = sim.guest(iter(()), a, "ga")                     # type: ignore[arg-type]
    gb = sim.guest(iter(()), b, "gb")                     # type: ignore[arg-type]
    assert sim.sched.next_fiber() is ga
    assert sim.sched.sync(ga, recv(a.handles.channel(h))) is BLOCKED   # type: ignore[attr-defined]
    assert sim.sched.next_fiber() is gb
    assert sim.sched.sync(gb, send(b.handles.channel(hb), b"ping", 9)) == Completed(0)  # type: ignore[attr-defined]
    assert ga.state is FiberState.RUNNABLE and ga.result == b"ping"


def test_the_image_hold_keeps_a_channel_alive_but_is_no_side_of_it(sim: Sim) -> None:
    """A pipe the image names: IMAGE holds it for ever, yet when one of the two
    containers using it is gone the other gets EPIPE, and a newcomer mends it."""
    from vmk.kernel.channel import IMAGE
    table = ChannelTable(4)
    ch = table.create(8, holder=IMAGE, name="pipe")
    a, b, c = container("a"), container("b"), container("c")
    ha: HandleTable = a.handles              # type: ignore[attr-defined]
    hb: HandleTable = b.handles              # type: ignore[attr-defined]
    hc: HandleTable = c.handles              # type: ignore[attr-defined]
    h_a = ha.install(ch)
    assert not ch.connected and not ch.broken_for(a)      # alone with the image: waits for a partner
    hb.install(ch)
    assert ch.connected and not ch.broken_for(a) and not ch.broken_for(b)
    got: list[Any] = []

    def reader():  # type: ignore[no-untyped-def]
        got.append((yield recv(ha.channel(h_a))))
    ga = sim.guest(reader(), a, "ga")
    sim.run(until=10)
    assert ga.state is FiberState.BLOCKED
    hb.close_all()                                        # b exits
    assert ga.state is FiberState.RUNNABLE and ga.result == -Errno.EPIPE
    sim.run()
    assert got == [-Errno.EPIPE] and not ch.freed        # still the image's
    assert ch.broken_for(a)
    hc.install(ch)                                        # a new container of the image takes it
    assert not ch.broken_for(a) and not ch.broken_for(c)
    ha.close_all()
    hc.close_all()
    assert not ch.freed and table.in_use == 1             # the image's hold outlives every container
