"""Concurrent ML from guest code, and the sync call's own bugs (C guests built with ``vmk build``):

* values: an ``EV_ALWAYS`` result of 2**63 or more is written back as 64 bits
  (it raised ``struct.error`` in pid 0); a negative ``EV_TIMEOUT`` or an
  ``EV_AT_TIME`` in the past is ready at once (a negative timeout never
  returned); a far (INT64_MAX) timeout parks next to an arm that wins;
* ``with-nack`` (``EV_WITH_NACK`` scope markers): the condition is signalled
  exactly when the sync commits outside the scope (at once or after parking,
  nested and side-by-side scopes), never when an arm inside wins, and when the
  sync is abandoned because its container ends; markers are never the returned
  index; malformed markers are -EINVAL / -EBADF;
* ``guard`` and ``wrap`` (vmk.h's ``vmk_sync_ops``): every guard runs at every
  sync before the kernel tries an arm; only the winner's wrap runs, on its value;
* messages (``sendmsg``/``recvmsg``, ``EV_SENDMSG``/``EV_RECVMSG``): tags set
  and read by guests, handles passed by copy and by move (the moved handle
  leaves the sender; a moved only handle is not freed in flight), handles that
  do not fit (``VMK_MSG_CTRUNC``) or reach a plain ``recv`` are dropped, never
  leaked; malformed messages are errors.  With the C fast path on and off.

Each program prints ``key=value`` lines; the tests compare them."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vmk.boot.vmkimage import read_image
from vmk.kernel.pid0 import VMKernel
from vmk.kernel.syscall_table import Errno
from vmk.machine.pc import Machine, MachineConfig, Why
from vmk.testing.harness import SerialCapture
from vmk.tools.build import build

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="the guest programs are C (gcc needed)")

MS = 1_000_000                      # virtual ns
EINVAL, EBADF, EMSGSIZE = int(Errno.EINVAL), int(Errno.EBADF), int(Errno.EMSGSIZE)

PRELUDE = r"""
#include "vmk.h"
static __attribute__((unused)) void out(const char *s)
{
    long n = 0;
    while (s[n])
        n++;
    vmk_console_write(s, n);
}
static __attribute__((unused)) void kv(const char *k, long v)
{
    char b[32];
    int i = 31;
    b[i] = 0;
    unsigned long u = v < 0 ? -(unsigned long)v : (unsigned long)v;
    do { b[--i] = (char)('0' + u % 10); u /= 10; } while (u);
    if (v < 0)
        b[--i] = '-';
    out(k); out("="); out(b + i); out("\n");
}
/* 1 if condition c is signalled (a zero timeout loses to it only then) */
static __attribute__((unused)) long signalled(long c)
{
    struct vmk_event e[2] = {{.kind = EV_COND, .handle = c}, {.kind = EV_TIMEOUT, .arg0 = 0}};
    return vmk_sync(e, 2) == 0;
}
"""

# ---------------------------------------------------------------------------- 1. values and times
VALUES_C = r"""
static void sender(long h)
{
    vmk_sleep(1000000L);
    long v = 42;
    vmk_send(h, &v, 8);
    vmk_fiber_exit(0);
}
int main(void)
{
    struct vmk_event e[1] = {{.kind = EV_ALWAYS, .arg0 = 1UL << 63, .result = 5}};
    kv("top.arm", vmk_sync(e, 1));
    kv("top.is_min", e[0].result == (long)(1UL << 63));
    e[0] = (struct vmk_event){.kind = EV_ALWAYS, .arg0 = ~0UL, .result = 5};
    kv("ones.arm", vmk_sync(e, 1));
    kv("ones.result", e[0].result);
    long t0 = vmk_time();
    struct vmk_event t[2] = {{.kind = EV_TIMEOUT, .arg0 = (uint64_t)-5L}, {.kind = EV_NEVER}};
    kv("neg.arm", vmk_sync(t, 2));
    t[0].arg0 = 0;
    kv("zero.arm", vmk_sync(t, 2));
    t[0].arg0 = 1UL << 63;                      /* INT64_MIN ns */
    kv("min.arm", vmk_sync(t, 2));
    t[0] = (struct vmk_event){.kind = EV_AT_TIME, .arg0 = (uint64_t)-1000L};
    kv("at_neg.arm", vmk_sync(t, 2));
    t[0].arg0 = (uint64_t)vmk_time();
    kv("at_now.arm", vmk_sync(t, 2));
    kv("at_once", vmk_time() - t0 < 1000000L);
    long ch = vmk_chan_create(8, 0), v = 0;
    vmk_fiber_spawn((void *)sender, 0, ch);
    struct vmk_event f[2] = {{.kind = EV_TIMEOUT, .arg0 = 0x7fffffffffffffffUL},
                             {.kind = EV_RECV, .handle = ch, .arg0 = (uint64_t)&v, .arg1 = 8}};
    kv("far.arm", vmk_sync(f, 2));
    kv("far.v", v);
    kv("far.result", f[1].result);
    out("done\n");
    return 0;
}
"""

# ---------------------------------------------------------------------------- 2. with-nack, one container
NACK_C = r"""
long t0;
static void watcher(long c)
{
    struct vmk_event e[1] = {{.kind = EV_COND, .handle = c}};
    vmk_sync(e, 1);
    kv("plose.watcher_ms", (vmk_time() - t0) / 1000000);
    vmk_fiber_exit(0);
}
static void late_sender(long h)
{
    vmk_sleep(1000000L);
    long v = 42;
    vmk_send(h, &v, 8);
    vmk_fiber_exit(0);
}
int main(void)
{
    long ch = vmk_chan_create(8, 0), v = 0;
    /* 1. the scope's recv is not ready: an arm outside it wins at once */
    long c = vmk_cond_create();
    struct vmk_event a[3] = {{.kind = EV_WITH_NACK, .handle = c, .arg0 = 1},
                             {.kind = EV_RECV, .handle = ch, .arg0 = (uint64_t)&v, .arg1 = 8},
                             {.kind = EV_ALWAYS, .arg0 = 7}};
    kv("lose.arm", vmk_sync(a, 3));
    kv("lose.result", a[2].result);
    kv("lose.nack", signalled(c));
    /* 2. an arm inside wins at once */
    c = vmk_cond_create();
    struct vmk_event b[3] = {{.kind = EV_WITH_NACK, .handle = c, .arg0 = 1},
                             {.kind = EV_ALWAYS, .arg0 = 5}, {.kind = EV_TIMEOUT, .arg0 = 1000000}};
    kv("win.arm", vmk_sync(b, 3));
    kv("win.nack", signalled(c));
    /* 3. parked; a timeout outside the scope wins after 1 ms: a fiber waiting on the nack wakes then */
    c = vmk_cond_create();
    long w = vmk_fiber_spawn((void *)watcher, 0, c);
    vmk_yield();
    t0 = vmk_time();
    struct vmk_event p[3] = {{.kind = EV_WITH_NACK, .handle = c, .arg0 = 1},
                             {.kind = EV_RECV, .handle = ch, .arg0 = (uint64_t)&v, .arg1 = 8},
                             {.kind = EV_TIMEOUT, .arg0 = 1000000}};
    kv("plose.arm", vmk_sync(p, 3));
    vmk_fiber_join(w);
    kv("plose.nack", signalled(c));
    /* 4. parked; the scope's recv wins (a sibling sends after 1 ms) */
    c = vmk_cond_create();
    vmk_fiber_spawn((void *)late_sender, 0, ch);
    struct vmk_event q[3] = {{.kind = EV_WITH_NACK, .handle = c, .arg0 = 1},
                             {.kind = EV_RECV, .handle = ch, .arg0 = (uint64_t)&v, .arg1 = 8},
                             {.kind = EV_TIMEOUT, .arg0 = 10000000}};
    kv("pwin.arm", vmk_sync(q, 3));
    kv("pwin.v", v);
    kv("pwin.nack", signalled(c));
    /* 5. nested: the winner is in the outer scope only */
    long c1 = vmk_cond_create(), c2 = vmk_cond_create();
    struct vmk_event n[4] = {{.kind = EV_WITH_NACK, .handle = c1, .arg0 = 3},
                             {.kind = EV_WITH_NACK, .handle = c2, .arg0 = 1},
                             {.kind = EV_NEVER}, {.kind = EV_ALWAYS, .arg0 = 9}};
    kv("nest.arm", vmk_sync(n, 4));
    kv("nest.outer", signalled(c1));
    kv("nest.inner", signalled(c2));
    /* 6. two scopes side by side: the first one's arm wins */
    c1 = vmk_cond_create(); c2 = vmk_cond_create();
    struct vmk_event s[4] = {{.kind = EV_WITH_NACK, .handle = c1, .arg0 = 1}, {.kind = EV_ALWAYS, .arg0 = 1},
                             {.kind = EV_WITH_NACK, .handle = c2, .arg0 = 1}, {.kind = EV_ALWAYS, .arg0 = 2}};
    kv("side.arm", vmk_sync(s, 4));
    kv("side.first", signalled(c1));
    kv("side.second", signalled(c2));
    /* 7. malformed markers */
    c = vmk_cond_create();
    struct vmk_event m[2] = {{.kind = EV_WITH_NACK, .handle = c, .arg0 = 2}, {.kind = EV_ALWAYS}};
    kv("bad.past_end", vmk_sync(m, 2));
    m[0].arg0 = (uint64_t)-1L;
    kv("bad.negative", vmk_sync(m, 2));
    m[0].arg0 = 1; m[0].handle = 99;
    kv("bad.handle", vmk_sync(m, 2));
    m[0].handle = ch;
    kv("bad.channel", vmk_sync(m, 2));
    struct vmk_event o[4] = {{.kind = EV_WITH_NACK, .handle = c, .arg0 = 2},
                             {.kind = EV_WITH_NACK, .handle = c, .arg0 = 2}, {.kind = EV_ALWAYS}, {.kind = EV_ALWAYS}};
    kv("bad.past_outer", vmk_sync(o, 4));
    kv("bad.untouched", signalled(c));
    out("done\n");
    return 0;
}
"""

# ---------------------------------------------------------------------------- 3. with-nack, the container ends
ABORT_PARENT_C = r"""
int main(void)
{
    long c = vmk_cond_create();
    long hs[1] = {c};
    long pid = vmk_spawn("child", 5, hs, 1);
    long t0 = vmk_time();
    struct vmk_event e[2] = {{.kind = EV_COND, .handle = c}, {.kind = EV_TIMEOUT, .arg0 = 100000000}};
    kv("parent.arm", vmk_sync(e, 2));
    kv("parent.ms", (vmk_time() - t0) / 1000000);
    kv("parent.child_code", vmk_wait(pid));
    return 0;
}
"""

ABORT_CHILD_C = r"""
static void blocker(long c)
{
    long v, ch = vmk_chan_create(8, 0);
    struct vmk_event e[3] = {{.kind = EV_WITH_NACK, .handle = c, .arg0 = 1},
                             {.kind = EV_RECV, .handle = ch, .arg0 = (uint64_t)&v, .arg1 = 8},
                             {.kind = EV_NEVER}};
    vmk_sync(e, 3);
    out("child: never\n");
    vmk_fiber_exit(0);
}
int main(void)
{
    vmk_fiber_spawn((void *)blocker, 0, 0);
    vmk_sleep(2000000L);
    vmk_exit(3);
}
"""

# ---------------------------------------------------------------------------- 4. guard and wrap (vmk_sync_ops)
LIB_C = r"""
long guards[4], wraps[4];
static void count_guard(struct vmk_event *ev, void *arg)
{
    long i = (long)arg;
    guards[i]++;
    if (ev->kind == EV_ALWAYS)
        ev->arg0 = 100 * guards[i] + i;         /* the kernel must see this: the guard ran first */
}
static long double_wrap(long v, void *arg)
{
    wraps[(long)arg]++;
    return 2 * v;
}
static void enable(struct vmk_event *ev, void *arg)
{
    (void)arg;
    ev->kind = EV_ALWAYS;
    ev->arg0 = 33;
}
static void fresh_nack(struct vmk_event *ev, void *arg)
{
    (void)arg;
    ev->handle = vmk_cond_create();
}
int main(void)
{
    long ch = vmk_chan_create(8, 0), buf = 0, v = 0;
    struct vmk_op ops[3] = {
        {.ev = {.kind = EV_RECV, .handle = ch, .arg0 = (uint64_t)&buf, .arg1 = 8},
         .guard = count_guard, .wrap = double_wrap, .arg = (void *)0},
        {.ev = {.kind = EV_ALWAYS}, .guard = count_guard, .wrap = double_wrap, .arg = (void *)1},
        {.ev = {.kind = EV_ALWAYS}, .guard = count_guard, .wrap = double_wrap, .arg = (void *)2},
    };
    kv("r1.arm", vmk_sync_ops(ops, 3, &v));
    kv("r1.value", v);
    kv("r1.result", ops[1].ev.result);
    kv("r2.arm", vmk_sync_ops(ops, 3, &v));
    kv("r2.value", v);
    kv("guards0", guards[0]); kv("guards1", guards[1]); kv("guards2", guards[2]);
    kv("wraps0", wraps[0]); kv("wraps1", wraps[1]); kv("wraps2", wraps[2]);
    /* a guard that enables its arm: it wins at once (the try comes after the guard) */
    struct vmk_op g[2] = {{.ev = {.kind = EV_NEVER}, .guard = enable},
                          {.ev = {.kind = EV_TIMEOUT, .arg0 = 1000000}}};
    long t0 = vmk_time();
    kv("enable.arm", vmk_sync_ops(g, 2, &v));
    kv("enable.value", v);
    kv("enable.at_once", vmk_time() - t0 < 1000000);
    /* a guard making a fresh nack condition at every sync */
    struct vmk_op n[3] = {{.ev = {.kind = EV_WITH_NACK, .arg0 = 1}, .guard = fresh_nack},
                          {.ev = {.kind = EV_RECV, .handle = ch, .arg0 = (uint64_t)&buf, .arg1 = 8}},
                          {.ev = {.kind = EV_TIMEOUT, .arg0 = 0}, .wrap = double_wrap, .arg = (void *)3}};
    kv("n1.arm", vmk_sync_ops(n, 3, &v));
    long first = n[0].ev.handle;
    kv("n1.nack", signalled(first));
    kv("n2.arm", vmk_sync_ops(n, 3, &v));
    kv("n2.fresh", n[0].ev.handle != first);
    kv("n2.nack", signalled(n[0].ev.handle));
    kv("wraps3", wraps[3]);
    /* an error: no wrap runs */
    struct vmk_op bad[1] = {{.ev = {.kind = EV_RECV, .handle = 99, .arg0 = (uint64_t)&buf, .arg1 = 8},
                             .wrap = double_wrap, .arg = (void *)0}};
    v = 12345;
    kv("bad.arm", vmk_sync_ops(bad, 1, &v));
    kv("bad.value", v);
    kv("bad.wraps0", wraps[0]);
    out("done\n");
    return 0;
}
"""

# ---------------------------------------------------------------------------- 5. messages: tags and handles
SERVER_C = r"""
long tags[4], lens[4], d_handle = -1, t_handle = -1;
static void tag_reader(long t)
{
    long u = t >> 8;
    t &= 0xff;
    for (int i = 0; i < 4; i++) {
        char b[8];
        struct vmk_msg m = {.buf = b, .len = 8, .tag = -1};
        lens[i] = vmk_recvmsg(i < 3 ? t : u, &m);
        tags[i] = m.tag;
    }
    vmk_fiber_exit(0);
}
int main(void)
{
    /* tags */
    long t = vmk_chan_create(0, 77), u = vmk_chan_create(0, 0);
    t_handle = t;
    long r = vmk_fiber_spawn((void *)tag_reader, 0, t | (u << 8));
    kv("tag.claim", vmk_send_tagged(t, "abc", 3, 77));
    kv("tag.none", vmk_send_tagged(t, "de", 2, 0));
    kv("tag.wrong", vmk_send_tagged(t, "x", 1, 78));
    kv("tag.plain", vmk_send(t, "f", 1));
    kv("tag.untyped", vmk_send_tagged(u, "g", 1, 5));
    vmk_fiber_join(r);
    for (int i = 0; i < 4; i++) {
        kv("tag.len", lens[i]);
        kv("tag.tag", tags[i]);
    }
    /* a copy: both keep it */
    char b[8];
    long x = vmk_chan_create(0, 0);
    kv("copy.send", vmk_send_handle(0, x, 0));
    kv("copy.recv", vmk_recv(x, b, 8));
    /* a move: the sender's handle is gone at once; a dup still reaches the channel */
    long y = vmk_chan_create(0, 0), y2 = vmk_handle_dup(y);
    kv("move.send", vmk_send_handle(0, y, 1));
    kv("move.gone", vmk_chan_close(y));
    kv("move.recv", vmk_recv(y2, b, 8));
    /* a move of the only handle: the channel lives on in the client */
    long z = vmk_chan_create(0, 0);
    kv("only.send", vmk_send_handle(0, z, 1));
    kv("only.gone", vmk_chan_close(z));
    /* two handles, room for one: VMK_MSG_CTRUNC */
    int64_t hs[2] = {vmk_chan_create(0, 0), vmk_cond_create()};
    struct vmk_msg m = {.buf = "two", .len = 3, .handles = hs, .nhandles = 2};
    kv("trunc.send", vmk_sendmsg(0, &m));
    /* a plain recv of a message with a handle: dropped */
    d_handle = vmk_chan_create(0, 0);
    kv("drop.send", vmk_send_handle(0, d_handle, 0));
    /* EV_SENDMSG arm against the client's EV_RECVMSG arm */
    struct vmk_msg sm = {.buf = "sync", .len = 4, .tag = 9};
    struct vmk_event e[2] = {{.kind = EV_TIMEOUT, .arg0 = 50000000},
                             {.kind = EV_SENDMSG, .handle = 0, .arg0 = (uint64_t)&sm}};
    kv("ev.arm", vmk_sync(e, 2));
    /* malformed messages */
    int64_t many[17] = {0};
    struct vmk_msg bad = {.buf = "b", .len = 1, .handles = many, .nhandles = 17};
    kv("bad.nhandles", vmk_sendmsg(0, &bad));
    many[0] = 99;
    bad.nhandles = 1;
    kv("bad.handle", vmk_sendmsg(0, &bad));
    bad.handles = 0; bad.nhandles = 0; bad.flags = 4;
    kv("bad.flags", vmk_sendmsg(0, &bad));
    bad.flags = 0; bad.len = 5000;
    kv("bad.len", vmk_sendmsg(0, &bad));
    bad.len = 1; bad.tag = -3;
    kv("bad.tag", vmk_sendmsg(0, &bad));
    kv("bad.pointer", vmk_recvmsg(0, (struct vmk_msg *)8));
    out("server: done\n");
    for (;;)
        vmk_sleep(1000000000L);
}
"""

CLIENT_C = r"""
static void zsender(long h)
{
    vmk_send(h, "zz", 2);
    vmk_fiber_exit(0);
}
long got[16];
int main(void)
{
    long i = 0;
    long hx = vmk_recv_handle(0);
    got[i++] = hx >= 0;
    got[i++] = vmk_send(hx, "hi", 2);
    long hy = vmk_recv_handle(0);
    got[i++] = vmk_send(hy, "yo!", 3);
    long hz = vmk_recv_handle(0);
    vmk_fiber_spawn((void *)zsender, 0, hz);
    char b[8];
    got[i++] = vmk_recv(hz, b, 8);
    got[i++] = vmk_chan_close(hz);
    int64_t hs[1] = {-1};
    struct vmk_msg m = {.buf = b, .len = 8, .handles = hs, .nhandles = 1};
    got[i++] = vmk_recvmsg(0, &m);
    got[i++] = m.len;
    got[i++] = m.nhandles;
    got[i++] = m.flags;
    got[i++] = vmk_chan_close(hs[0]);
    got[i++] = vmk_recv(0, b, 8);
    struct vmk_msg rm = {.buf = b, .len = 8};
    struct vmk_event e[2] = {{.kind = EV_RECVMSG, .handle = 0, .arg0 = (uint64_t)&rm},
                             {.kind = EV_TIMEOUT, .arg0 = 50000000}};
    got[i++] = vmk_sync(e, 2);
    got[i++] = e[0].result;
    got[i++] = rm.tag;
    got[i++] = b[0] == 's' && b[3] == 'c';
    static const char *names[] = {"x_ok", "x_send", "y_send", "only.recv", "only.close", "trunc.recv", "trunc.len",
                                  "trunc.nhandles", "trunc.flags", "trunc.close", "drop.recv", "ev.arm",
                                  "ev.result", "ev.tag", "ev.bytes"};
    for (long k = 0; k < i; k++) {
        out("client."); kv(names[k], got[k]);
    }
    return 0;
}
"""

MSG_TOML = """
[kernel]
channels = 32
[[program]]
name = "server"
source = "server.c"
[[program]]
name = "client"
source = "client.c"
[[channel]]
name = "link"
[[container]]
name = "server"
program = "server"
memory = "256K"
handles = ["link"]
[[container]]
name = "client"
program = "client"
memory = "256K"
handles = ["link"]
"""


def _one(name: str) -> str:
    return f"""
[kernel]
channels = 16
[[program]]
name = "{name}"
source = "{name}.c"
[[container]]
name = "{name}"
program = "{name}"
memory = "256K"
"""


ABORT_TOML = """
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
memory = "256K"
autostart = false
"""

IMAGES = {
    "values": (_one("values"), {"values.c": VALUES_C}),
    "nack": (_one("nack"), {"nack.c": NACK_C}),
    "lib": (_one("lib"), {"lib.c": LIB_C}),
    "abort": (ABORT_TOML, {"parent.c": ABORT_PARENT_C, "child.c": ABORT_CHILD_C}),
    "msg": (MSG_TOML, {"server.c": SERVER_C, "client.c": CLIENT_C}),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name, (manifest, files) in IMAGES.items():
        tmp = tmp_path_factory.mktemp(name)
        for fname, text in files.items():
            (tmp / fname).write_text(PRELUDE + text)
        (tmp / f"{name}.toml").write_text(manifest)
        out[name] = tmp / f"{name}.img"
        build(tmp / f"{name}.toml", out[name])
    return out


def _boot(img: Path, fast_ipc: bool = True) -> tuple[VMKernel, SerialCapture]:
    com1 = SerialCapture()
    k = VMKernel(Machine(MachineConfig(serial=[com1])), read_image(img))
    k.fast_ipc = fast_ipc
    return k, com1


def _lines(com1: SerialCapture) -> list[str]:
    return bytes(com1.data).decode("latin-1").splitlines()


def _values(lines: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for ln in lines:
        if "=" in ln:
            key, val = ln.split("=", 1)
            assert key not in out, f"{key} printed twice"
            out[key] = int(val)
    return out


def _run_to_end(img: Path, until: int = 200 * MS) -> tuple[VMKernel, list[str]]:
    k, com1 = _boot(img)
    r = k.run(until=until)
    assert r.why is Why.EXIT, (r.why, r.message, _lines(com1))
    assert k.reports == []
    return k, _lines(com1)


# ---------------------------------------------------------------------------- tests
def test_values_are_written_back_as_64_bits_and_past_times_are_ready_at_once(images: dict[str, Path]) -> None:
    _, lines = _run_to_end(images["values"])
    assert lines[-1] == "done"
    assert _values(lines) == {
        "top.arm": 0, "top.is_min": 1,              # 2**63 comes back as INT64_MIN (was struct.error)
        "ones.arm": 0, "ones.result": -1,
        "neg.arm": 0, "zero.arm": 0, "min.arm": 0,  # a timeout of -5 ns was never ready
        "at_neg.arm": 0, "at_now.arm": 0, "at_once": 1,
        "far.arm": 1, "far.v": 42, "far.result": 8,
    }


def test_nack_is_signalled_exactly_when_its_scope_loses(images: dict[str, Path]) -> None:
    _, lines = _run_to_end(images["nack"])
    assert lines[-1] == "done"
    v = _values(lines)
    assert v == {
        "lose.arm": 2, "lose.result": 7, "lose.nack": 1,
        "win.arm": 1, "win.nack": 0,
        "plose.watcher_ms": 1, "plose.arm": 2, "plose.nack": 1,
        "pwin.arm": 1, "pwin.v": 42, "pwin.nack": 0,
        "nest.arm": 3, "nest.outer": 0, "nest.inner": 1,
        "side.arm": 1, "side.first": 0, "side.second": 1,
        "bad.past_end": -EINVAL, "bad.negative": -EINVAL, "bad.handle": -EBADF, "bad.channel": -EBADF,
        "bad.past_outer": -EINVAL, "bad.untouched": 0,
    }
    # the watcher woke (with the nack) before the syncing fiber went on
    assert lines.index("plose.watcher_ms=1") < lines.index("plose.arm=2")


def test_nack_is_signalled_when_the_syncing_container_ends(images: dict[str, Path]) -> None:
    _, lines = _run_to_end(images["abort"])
    assert "child: never" not in lines
    assert _values(lines) == {"parent.arm": 0, "parent.ms": 2, "parent.child_code": 3}


def test_guard_runs_at_every_sync_before_the_try_and_only_the_winners_wrap_runs(images: dict[str, Path]) -> None:
    _, lines = _run_to_end(images["lib"])
    assert lines[-1] == "done"
    assert _values(lines) == {
        "r1.arm": 1, "r1.value": 2 * 101, "r1.result": 101,
        "r2.arm": 1, "r2.value": 2 * 201,
        "guards0": 2, "guards1": 2, "guards2": 2,
        "wraps0": 0, "wraps1": 2, "wraps2": 0,
        "enable.arm": 0, "enable.value": 33, "enable.at_once": 1,
        "n1.arm": 2, "n1.nack": 1, "n2.arm": 2, "n2.fresh": 1, "n2.nack": 1, "wraps3": 2,
        "bad.arm": -EBADF, "bad.value": 12345, "bad.wraps0": 0,
    }


@pytest.mark.parametrize("fast_ipc", [True, False], ids=["fast", "python"])
def test_messages_carry_tags_and_handles(images: dict[str, Path], fast_ipc: bool) -> None:
    k, com1 = _boot(images["msg"], fast_ipc)
    r = k.run(until=200 * MS)
    lines = _lines(com1)
    assert r.why is Why.TIME_LIMIT, (r.why, r.message, lines)
    assert k.reports == []
    assert "server: done" in lines
    v = _values([ln for ln in lines if not ln.startswith(("tag.tag=", "tag.len="))])
    tags = [int(ln.split("=")[1]) for ln in lines if ln.startswith("tag.tag=")]
    lens = [int(ln.split("=")[1]) for ln in lines if ln.startswith("tag.len=")]
    assert tags == [77, 77, 77, 5]          # the claim; the channel's (no claim, plain send); an untyped channel's
    assert lens == [3, 2, 1, 1]
    assert v == {
        "tag.claim": 0, "tag.none": 0, "tag.wrong": -EINVAL, "tag.plain": 0, "tag.untyped": 0,
        "copy.send": 0, "copy.recv": 2,
        "move.send": 0, "move.gone": -EBADF, "move.recv": 3,
        "only.send": 0, "only.gone": -EBADF,
        "trunc.send": 0, "drop.send": 0, "ev.arm": 1,
        "bad.nhandles": -EINVAL, "bad.handle": -EBADF, "bad.flags": -EINVAL, "bad.len": -EMSGSIZE,
        "bad.tag": -EINVAL, "bad.pointer": -int(Errno.EFAULT),
        "client.x_ok": 1, "client.x_send": 0, "client.y_send": 0,
        "client.only.recv": 2, "client.only.close": 0,
        "client.trunc.recv": 3, "client.trunc.len": 3, "client.trunc.nhandles": 1,
        "client.trunc.flags": 2, "client.trunc.close": 0,
        "client.drop.recv": 0,
        "client.ev.arm": 0, "client.ev.result": 4, "client.ev.tag": 9, "client.ev.bytes": 1,
    }
    server, client = k.containers[1], k.containers[2]
    assert client.exit_code == 0
    # nothing leaked: the handle dropped by the plain recv, the copies the client closed or
    # lost with its end; the server's own handles are the only holds left
    prog = k.image.program(k.image.container("server").program)
    d = int.from_bytes(server.aspace.read(prog.symbols["d_handle"], 8), "little", signed=True)
    assert server.handles.channel(d).holders == {server: 1}
    for ch in k.channels:
        assert client not in ch.holders, ch
    named = {k.named["link"], k.console_rx, k.console_tx}
    assert {ch for ch in k.channels if ch not in named} == {
        obj for _, obj in server.handles.items() if type(obj).__name__ == "Channel" and obj not in named}
