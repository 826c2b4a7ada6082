"""Benchmarks of the VM kernel (``vmk bench kernel``).

null-syscall   getpid in a loop from a container, per host second; reference:
               the same loop on raw Unicorn with an empty Python syscall hook
               that writes RAX (the floor for any syscall that exits to Python)
rtt-fibers     channel round trips between two fibers of one container
rtt-containers channel round trips between two containers
rtt-crowded    (not yet: the crowd container must be set up before the
               ping-pong starts; the harness for that is still to write)
wakeup         interrupt-to-fiber latency in virtual ns: a byte arrives at the
               UART, the echo fiber's recv completes (busy containers around)
policies       the wakeup workload under both scheduling policies
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

__all__ = ["bench_kernel"]

NULL_LOOP = """
    mov r12, {n}
again:
    mov rax, SYS_GETPID
    syscall
    dec r12
    jnz again
    mov rdi, 0
    mov rax, SYS_EXIT
    syscall
"""

PINGPONG_C = r"""
#include "vmk.h"
enum { N = %(n)d };
static void pong(long arg)
{
    long v;
    for (;;) { if (vmk_recv(%(ping)d, &v, 8) < 0) break; v++; vmk_send(%(pong)d, &v, 8); }
    vmk_fiber_exit(0);
}
int main(void)
{
    long mode = %(mode)d, v = 0;
    if (mode == 0) {                       /* both ends in this container: a second fiber */
        vmk_fiber_spawn((void *)pong, 0, 0);
    } else if (mode == 2) {                /* the other end: just pong */
        pong(0);
    }
    if (mode != 2) {
        long t0 = vmk_time();
        for (long i = 0; i < N; i++) { vmk_send(%(ping)d, &v, 8); vmk_recv(%(pong)d, &v, 8); }
        (void)t0;
        return v == N ? 0 : 1;
    }
    return 0;
}
"""

CROWD_C = r"""
#include "vmk.h"
static void idle(long h) { long v; vmk_recv(h, &v, 8); vmk_fiber_exit(0); }
int main(void)
{
    long h = vmk_chan_create(8, 0);
    for (int i = 0; i < 1000; i++) vmk_fiber_spawn((void *)idle, 0, h);
    for (int i = 0; i < %(channels)d; i++) if (vmk_chan_create(8, 0) < 0) return 2;
    long v; return (int)vmk_recv(h, &v, 8);     /* blocks for ever */
}
"""


def _build(tmp: Path, manifest: str, files: dict[str, str]) -> Path:
    from vmk.tools.build import build
    for name, text in files.items():
        (tmp / name).write_text(text)
    (tmp / "img.toml").write_text(manifest)
    build(tmp / "img.toml", tmp / "img.img")
    return tmp / "img.img"


def _boot(img: Path):
    from vmk.boot.vmkimage import read_image
    from vmk.kernel.pid0 import VMKernel
    from vmk.machine.pc import Machine, MachineConfig
    from vmk.testing.harness import SerialCapture
    com1 = SerialCapture()
    m = Machine(MachineConfig(mem=256 << 20, serial=[com1]))
    return m, VMKernel(m, read_image(img)), com1


def _null_syscalls(tmp: Path, n: int) -> tuple[float, float]:
    img = _build(tmp, """
[kernel]
channels = 4
[[program]]
name = "loop"
source = "loop.s"
[[container]]
name = "loop"
program = "loop"
memory = "64K"
""", {"loop.s": NULL_LOOP.format(n=n)})
    m, k, _ = _boot(img)
    t = time.perf_counter()
    k.run(until=10_000_000_000)
    ours = n / (time.perf_counter() - t)
    # reference: raw Unicorn, same loop shape, Python syscall hook writing RAX
    from unicorn import UC_ARCH_X86, UC_HOOK_INSN, UC_MODE_64, Uc
    from unicorn.x86_const import UC_X86_INS_SYSCALL, UC_X86_REG_RAX

    from vmk.testing import assemble
    code = assemble(f"mov r12, {n}\nagain:\nmov rax, 13\nsyscall\ndec r12\njnz again\nhlt", 0x1000)
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x100000)
    uc.mem_write(0x1000, code)
    uc.hook_add(UC_HOOK_INSN, lambda u, d: u.reg_write(UC_X86_REG_RAX, 1), None, 1, 0, UC_X86_INS_SYSCALL)
    t = time.perf_counter()
    uc.emu_start(0x1000, 0x1000 + len(code), count=10 * n)
    raw = n / (time.perf_counter() - t)
    return ours, raw


_PP_MANIFEST_ONE = """
[kernel]
channels = 16
[[program]]
name = "pp"
source = "pp.c"
[[channel]]
name = "ping"
msg_size = 8
[[channel]]
name = "pong"
msg_size = 8
[[container]]
name = "pp"
program = "pp"
memory = "256K"
handles = ["ping", "pong"]
"""

_PP_MANIFEST_TWO = """
[kernel]
channels = {channels}
[[program]]
name = "a"
source = "a.c"
[[program]]
name = "b"
source = "b.c"
{crowd_program}
[[channel]]
name = "ping"
msg_size = 8
[[channel]]
name = "pong"
msg_size = 8
[[container]]
name = "a"
program = "a"
memory = "256K"
handles = ["ping", "pong"]
[[container]]
name = "b"
program = "b"
memory = "256K"
handles = ["ping", "pong"]
{crowd_container}
"""


def _rtt(tmp: Path, n: int, two: bool, crowd: bool) -> float:
    if not two:
        img = _build(tmp, _PP_MANIFEST_ONE, {"pp.c": PINGPONG_C % {"n": n, "mode": 0, "ping": 0, "pong": 1}})
    else:
        files = {"a.c": PINGPONG_C % {"n": n, "mode": 1, "ping": 0, "pong": 1},
                 "b.c": PINGPONG_C % {"n": n, "mode": 2, "ping": 0, "pong": 1}}
        cp = cc = ""
        channels = 16
        if crowd:
            files["crowd.c"] = CROWD_C % {"channels": 10_000}
            cp = '[[program]]\nname = "crowd"\nsource = "crowd.c"'
            cc = '[[container]]\nname = "crowd"\nprogram = "crowd"\nmemory = "20M"\npriority = 3'
            channels = 10_100
        img = _build(tmp, _PP_MANIFEST_TWO.format(channels=channels, crowd_program=cp, crowd_container=cc), files)
    m, k, _ = _boot(img)
    if crowd:
        k.run(until=m.now + 2_000_000_000)          # let the crowd spawn and block first: it never ends
    t = time.perf_counter()
    k.run(until=m.now + 60_000_000_000)
    return n / (time.perf_counter() - t)


def _wakeup(tmp: Path, policy: str, n: int) -> tuple[float, float]:
    from vmk.machine.pc import Why  # noqa: F401
    busy = "spin:\n inc rax\n jmp spin\n"
    echo = """
loop:
    lea rsi, [rip + buf]
    mov rdi, 0
    mov rdx, 1
    mov rax, SYS_RECV
    syscall
    mov rax, SYS_TIME
    syscall
    mov rbx, rax
    lea rsi, [rip + buf]
    mov [rsi+8], rbx
    mov rdi, 1
    mov rdx, 1
    mov rax, SYS_SEND
    syscall
    jmp loop
buf:
    .quad 0
    .quad 0
"""
    img = _build(tmp, f"""
[kernel]
policy = "{policy}"
channels = 8
timeslice_ns = 1000000
[[program]]
name = "busy"
source = "busy.s"
[[program]]
name = "echo"
source = "echo.s"
[[container]]
name = "busy1"
program = "busy"
memory = "64K"
[[container]]
name = "busy2"
program = "busy"
memory = "64K"
[[container]]
name = "echo"
program = "echo"
memory = "64K"
priority = 2
handles = ["console.rx", "console.tx"]
""", {"busy.s": busy, "echo.s": echo})
    m, k, com1 = _boot(img)
    period = 3_000_000
    arrivals = []
    for i in range(n):
        t = 1_000_000 + period * i
        m.clock.timer(lambda: m.uarts[0].receive(b"x")).arm(t)
        arrivals.append(t)
    start = time.perf_counter()
    k.run(until=arrivals[-1] + period)
    host = time.perf_counter() - start
    char_ns = m.uarts[0]._char_ns
    lat = [out - a - 2 * char_ns for out, a in zip(com1.times, arrivals)]
    return (sum(lat) / len(lat) if lat else float("inf")), len(lat) / host


def bench_kernel(quick: bool) -> list[tuple[str, str, str, str]]:
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        n = 20_000 if quick else 100_000
        ours, raw = _null_syscalls(tmp, n)
        rows.append(("kernel: null syscall (getpid) from a container", f"{ours:,.0f}/s",
                     f"raw Unicorn + empty Python hook {raw:,.0f}/s (ratio {ours / raw:.2f})",
                     "target >= 250,000/s: " + ("ok" if ours >= 250_000 else "BELOW TARGET")))
        n = 2_000 if quick else 10_000
        one = _rtt(tmp, n, two=False, crowd=False)
        rows.append(("kernel: channel round trips, two fibers of one container", f"{one:,.0f}/s",
                     "target 50,000/s", "ok" if one >= 50_000 else "BELOW TARGET"))
        two = _rtt(tmp, n, two=True, crowd=False)
        rows.append(("kernel: channel round trips between two containers", f"{two:,.0f}/s",
                     "target 30,000/s", "ok" if two >= 30_000 else "BELOW TARGET"))
        for policy in ("global", "per-container"):
            lat, rate = _wakeup(tmp, policy, 10 if quick else 30)
            rows.append((f"kernel: interrupt-to-fiber wakeup, {policy} policy, 2 busy containers",
                         f"{lat:,.0f} ns virtual (mean)", f"{rate:,.1f} wakeups per host second", ""))
    return rows
