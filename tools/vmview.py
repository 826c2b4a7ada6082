"""The debugger's view of a running VM kernel: fibers as gdb threads.

Every fiber is a thread: guest fibers (a register context in a container) and
pid 0's kernel fibers (Python generators: they have no x86 registers, gdb
shows them as unavailable).  The extra text (``qXfer:threads`` or
``qThreadExtraInfo``) says which container, the state, and what the fiber
waits on.  Monitor commands: ``fibers``,
``channels``, ``containers``.

The thread on the CPU is the running guest fiber; when the CPU idles, a
pseudo-thread "idle" stands for it.
"""
from __future__ import annotations

from vmk.hal.context import NAMES as CTX_NAMES
from vmk.kernel.pid0 import VMKernel

from .kernelview import MonitorCommand, ThreadInfo

__all__ = ["VMKernelView", "attach"]

IDLE_TID = 1 << 20


class VMKernelView:
    name = "vmk VM kernel"

    def __init__(self, kernel: VMKernel) -> None:
        self.kernel = kernel

    # -- threads
    def threads(self) -> list[ThreadInfo]:
        k = self.kernel
        out = []
        for fid, f in sorted(k.sched.fibers.items()):
            c = f.container
            where = f"pid {c.pid} ({c.name})" if c is not None else "pid 0 (kernel)"
            state = f.state.name.lower()
            waits = f", waiting on {f.waiting_on}" if f.waiting_on else ""
            out.append(ThreadInfo(fid, f.name or f"fiber {fid}", f"{where}, {state}{waits}"))
        if k.current is None:
            out.append(ThreadInfo(IDLE_TID, "idle", "pid 0: CPU halted, waiting for an interrupt"))
        return out

    def current_thread(self) -> int:
        cur = self.kernel.current
        return cur.fid if cur is not None else IDLE_TID

    def thread_registers(self, tid: int) -> dict[str, int] | None:
        k = self.kernel
        cur = k.current
        if tid == IDLE_TID or (cur is not None and tid == cur.fid):
            return None
        f = k.sched.fibers.get(tid)
        if f is None or f.ctx is None:
            return {}
        regs = dict(zip(CTX_NAMES, f.ctx.regs))
        regs["eflags"] = regs.pop("rflags")
        return regs

    # -- monitor commands
    def monitor_commands(self) -> dict[str, MonitorCommand]:
        return {
            "fibers": MonitorCommand(lambda args: self._fibers(), "list the fibers (kernel and guest)"),
            "channels": MonitorCommand(lambda args: self._channels(), "list the open channels"),
            "containers": MonitorCommand(lambda args: self._containers(), "list the containers"),
        }

    def _fibers(self) -> str:
        lines = [f"{'fid':>4}  {'name':<18} {'where':<22} state"]
        for t in self.threads():
            if t.tid == IDLE_TID:
                continue
            where, _, rest = t.extra.partition(", ")
            lines.append(f"{t.tid:>4}  {t.name:<18} {where:<22} {rest}")
        return "\n".join(lines)

    def _channels(self) -> str:
        k = self.kernel
        lines = [f"{'id':>4}  {'name':<14} {'size':>5} {'tag':>4} {'sends':>6}  holders"]
        for ch in k.channels:
            holders = ", ".join(f"pid {getattr(p, 'pid', 0)} ({n})" for p, n in ch.holders.items())
            lines.append(f"{ch.cid:>4}  {ch.name or '-':<14} {ch.msg_size:>5} {ch.tag:>4} {ch.sends:>6}  {holders}")
        lines.append(f"{k.channels.in_use} of {k.image.kernel.channels} channels in use")
        return "\n".join(lines)

    def _containers(self) -> str:
        k = self.kernel
        lines = [f"{'pid':>4}  {'name':<14} {'memory':>8} {'fibers':>6}  state"]
        for pid, c in sorted(k.containers.items()):
            state = "running" if c.exit_code is None else f"exited {c.exit_code}"
            lines.append(f"{pid:>4}  {c.name:<14} {c.aspace.limit // 1024:>6}K {len(c.fibers):>6}  {state}")
        return "\n".join(lines)


def attach(stub, kernel: VMKernel) -> None:
    """Make a GDB stub drive pid 0's loop instead of the bare machine's."""
    stub.debug.runner = kernel.run
