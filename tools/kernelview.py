"""What the debugger knows about the software running on the machine.

The GDB stub and the debugger shell show the guest through a
:class:`KernelView`: the list of threads (for a VM image, the kernel's
fibers; gdb sees them as threads), each thread's registers and a one-line
description (container, state, what it waits on), and the kernel's monitor
commands (``fibers``, ``channels``, ``containers``).

The VM kernel plugs its view in with :func:`register_view`: a factory that
looks at the booted image and returns a view, or ``None`` when the image is
not one of its own.  :func:`view_for` asks the registered factories, newest
first, and falls back to :class:`BareMetalView`: one thread per CPU (ids
1..N, names CPU0..CPU{N-1}), and a clear "no VM kernel in this image" answer
to the kernel commands.

A view whose threads are CPUs says which with ``thread_cpu(tid)`` (the CPU's
index, or None): the GDB stub then reads and writes that CPU's live
registers, steps that CPU, and tells the view where the machine stopped
(``current_cpu``).  Views without the method (the VM kernel's fibers) run on
CPU 0.

Invariants: thread ids are positive and stable while the machine is stopped;
exactly one thread is the current one (``current_thread``: the one on the
CPU, or with several CPUs the CPU the machine stopped on), and a thread on a
CPU has that CPU's live registers (``thread_registers`` returns ``None`` for
it).  Views only read the machine; they never run it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from vmk.machine.cpu import HF
from vmk.machine.pc import Machine
from vmk.machine.smp import ApState

__all__ = ["ThreadInfo", "MonitorCommand", "KernelView", "BareMetalView", "register_view", "view_for",
           "NO_KERNEL"]

NO_KERNEL = "no VM kernel in this image (bare-metal kernel)"


@dataclass(frozen=True, slots=True)
class ThreadInfo:
    tid: int                        # gdb thread id, > 0
    name: str                       # short name ("CPU0", "uart-rx")
    extra: str                      # container, state, what it waits on (gdb's qThreadExtraInfo)


@dataclass(frozen=True, slots=True)
class MonitorCommand:
    run: Callable[[list[str]], str]     # arguments -> text to print
    help: str                           # one line


class KernelView(Protocol):
    """The debugger's window onto the guest software."""

    name: str

    def threads(self) -> list[ThreadInfo]: ...

    def current_thread(self) -> int:
        """The thread whose context is on the CPU now."""
        ...

    def thread_registers(self, tid: int) -> dict[str, int] | None:
        """Saved registers of a thread that is not on the CPU (gdb register names:
        rax.., rip, eflags, ...); ``None`` for the thread on the CPU.  Registers
        missing from the dict are reported to gdb as unavailable."""
        ...

    def monitor_commands(self) -> dict[str, MonitorCommand]: ...


class BareMetalView:
    """A kernel vmk knows nothing about: each CPU is a thread, as QEMU shows them
    (thread ``CPU_TID + k`` is CPU k, named ``CPU{k}``)."""

    name = "bare metal"
    CPU_TID = 1

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.current_cpu = 0                # the CPU the machine stopped on (the GDB stub sets it)

    def threads(self) -> list[ThreadInfo]:
        m = self.machine
        procs = m.processors
        out = []
        for k, cpu in enumerate(m.cpus):
            if procs and procs[k].state is ApState.WAIT_FOR_SIPI:
                extra = "bare metal, waiting for SIPI"     # no mode yet: the SIPI starts it in real mode
            else:
                state = ("executing" if not cpu.halted else
                         "halted" + ("" if cpu.interrupts_enabled() else " with interrupts off"))
                mode = ("long mode" if cpu.long_mode() else
                        "protected mode" if cpu.hflags() & HF.PE else "real mode")
                extra = f"bare metal, {state}, {mode}, CPL {cpu.cpl()}"
            out.append(ThreadInfo(self.CPU_TID + k, f"CPU{k}", extra))
        return out

    def current_thread(self) -> int:
        return self.CPU_TID + self.current_cpu

    def thread_cpu(self, tid: int) -> int | None:
        """The index of the CPU that thread ``tid`` is (None: no such thread)."""
        k = tid - self.CPU_TID
        return k if 0 <= k < len(self.machine.cpus) else None

    def thread_registers(self, tid: int) -> dict[str, int] | None:
        return None

    def monitor_commands(self) -> dict[str, MonitorCommand]:
        def none(what: str) -> MonitorCommand:
            return MonitorCommand(lambda args: f"{NO_KERNEL}: no {what}",
                                  f"list the VM kernel's {what}")
        return {"fibers": none("fibers"), "channels": none("channels"), "containers": none("containers")}


ViewFactory = Callable[[Machine, object], "KernelView | None"]
_factories: list[ViewFactory] = []


def register_view(factory: ViewFactory) -> None:
    """Register ``factory(machine, boot_info) -> KernelView | None`` (the VM kernel does this)."""
    _factories.append(factory)


def view_for(machine: Machine, boot_info: object = None) -> KernelView:
    """The view for the booted image: the newest factory that claims it, else bare metal."""
    for factory in reversed(_factories):
        view = factory(machine, boot_info)
        if view is not None:
            return view
    return BareMetalView(machine)
