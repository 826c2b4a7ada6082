"""pid 0: the VM kernel that boots a vmk image and runs its containers.

How it works
------------
pid 0 is Python; containers (pid >= 1) are guest code in ring 3, each with
its own address space (hal/aspace.py).  This module joins the pieces:

* the **fiber scheduler** (kernel/scheduler.py) decides who runs: kernel
  fibers (the console drivers, generators) and guest fibers (register
  contexts);
* the **HAL** (hal/vm.py) runs a guest fiber on the CPU until it traps into
  the kernel: a syscall that blocks, a fault, an interrupt that woke someone,
  or the end of its time slice;
* **syscalls** are dispatched here (``syscall``), from Unicorn's syscall hook:
  one that completes at once returns its value into RAX without leaving the
  CPU slice; one that blocks parks the fiber (``sched.sync``) and the next
  fiber is switched to in the hook (``switch_in_place``) or the slice ends.
  Plain send/recv meet the C fast path first (kernel/_fastipc.c, the HAL's
  syscall entry wrapped by ``_fast_door``): it does the common rendezvous on
  these same objects and hands everything else to ``syscall`` untouched;
* **time** is tickless: :class:`KernelClock` keeps pid 0's timers (fiber
  timeouts, sleeps) and the HAL programs the LAPIC one-shot for the earliest
  of them, the end of the running time slice, or the running fiber's
  preemption deadline (below), whichever comes first.

Preemption
----------
Containers are always preemptible; fibers inside a container are cooperative
unless the image asks otherwise:

* **time slice** (``timeslice_ns``): a container that gets the CPU (from
  another container, or after its last slice ran out) gets a slice; a fiber
  switch inside the container keeps it.  When it runs out, the fiber on the
  CPU is preempted with ``sched.requeue_front`` (first of its container
  again: no sibling runs in its place) and ``sched.slice_expired`` moves the
  container behind its peers.
* **wakeup**: an interrupt that woke a fiber (a driver, a fiber syncing on an
  IRQ, a sleeper or a timeout whose time came) stops the running fiber the
  same way (``requeue_front``), so the policy can choose: per-container, the
  container stays current until its slice or quantum ends; global, it goes
  behind the fibers already queued.
  Either way the same fiber goes on when its container runs again.  An
  interrupt that woke nobody stops nothing.
* **fiber timer** (``fiber_preemption_ns`` > 0, Guile fibers' ``hz``): a
  guest fiber that has been on the CPU that long since it last blocked or
  yielded (``Fiber.ran_ns``, counted across preemptions) is rotated behind
  its siblings (``sched.rotate``) and the container goes on with the next
  one.  0 (the default): cooperative, only blocking, ``yield`` and
  ``fiber_exit`` let a sibling run.

All three are exact in virtual time: each is a LAPIC one-shot deadline, and
the CPU stops at the first instruction boundary at or after it.

This is our event loop (``VMKernel.run``)::

    run the kernel fibers that are runnable (drivers: eager bottom halves)
    pick the next guest fiber; none -> the CPU idles until an interrupt
    load it, arm the timer, run the machine until the HAL stops it
    save its registers; a blocked/exited fiber stays where the syscall put it

A fault in a container (page fault, #GP, #UD, ...) ends that container with a
one-line report (pid, fault, RIP, address); the others go on.
"""
from __future__ import annotations

import heapq
import struct
from dataclasses import dataclass, field
from typing import Any, Callable

from vmk.boot.loader import ImageError
from vmk.boot.vmkimage import DEFAULT_MAX_FIBERS, Image, SegFlag
from vmk.hal.aspace import PAGE, AddressSpace, OutOfMemory, UserFault
from vmk.hal.context import RAX_SLOT, GuestContext
from vmk.hal.vm import Hal
from vmk.machine.mmu import PFEC
from vmk.machine.pc import Machine, RunResult, Why

from . import events as ev
from . import _fastipc
from .channel import IMAGE, MAX_MSG, MAX_TAG, Channel, ChannelTable, Message, recv, send
from .events import NOT_READY, Condition, Failed, IrqSource, KernelError, OpState, Sync, WaitQueue
from .fiber import Fiber, FiberKind, FiberState
from .handles import HandleTable
from .scheduler import Blocked, Scheduler
from .syscall_table import (CONSOLE_WRITE_MAX, EVENT_SIZE, MAX_MSG_HANDLES, MSG_SIZE, SPAWN_MAX_HANDLES,
                            SPAWN_MAX_NAME, SYNC_MAX_EVENTS, Errno, EventKind, MsgFlag, Syscall)

__all__ = ["VMKernel", "Container", "KernelClock"]

KSTOP = "kernel: "          # prefix of the machine stops pid 0 makes for itself

EXCEPTION_NAMES = {0: "#DE divide error", 6: "#UD invalid opcode", 13: "#GP general protection",
                   14: "#PF page fault", 3: "#BP breakpoint", 17: "#AC alignment check"}


class KernelClock:
    """pid 0's timers, on the machine's virtual time, delivered by the LAPIC one-shot."""

    def __init__(self, machine: Machine, on_change: Callable[[], None]) -> None:
        self._machine = machine
        self._heap: list[tuple[int, int, "KTimer"]] = []
        self._seq = 0
        self._on_change = on_change
        self._tracer = machine.tracer

    @property
    def now(self) -> int:
        return self._machine.clock.now

    def timer(self, callback: Callable[[], None], name: str = "") -> "KTimer":
        return KTimer(self, callback, name)

    def _push(self, t: "KTimer") -> None:
        if self._tracer is not None:
            self._tracer.timer_deadline(t.name or "kernel timer", t.deadline)
        self._seq += 1
        heapq.heappush(self._heap, (t.deadline, self._seq, t))
        self._on_change()

    def next_deadline(self) -> int | None:
        h = self._heap
        while h and h[0][2].deadline != h[0][0]:
            heapq.heappop(h)
        return h[0][0] if h else None

    def run_due(self) -> None:
        now = self.now
        h = self._heap
        while h and h[0][0] <= now:
            deadline, _, t = heapq.heappop(h)
            if t.deadline != deadline:
                continue
            t.deadline = None
            t.callback()


class KTimer:
    __slots__ = ("_clock", "callback", "deadline", "name")

    def __init__(self, clock: KernelClock, callback: Callable[[], None], name: str) -> None:
        self._clock = clock
        self.callback = callback
        self.deadline: int | None = None
        self.name = name

    @property
    def armed(self) -> bool:
        return self.deadline is not None

    def arm(self, deadline: int) -> None:
        self.deadline = int(deadline)
        self._clock._push(self)

    def arm_in(self, delay: int) -> None:
        self.arm(self._clock.now + delay)

    def cancel(self) -> None:
        self.deadline = None


@dataclass(eq=False)
class Container:
    pid: int
    name: str
    aspace: AddressSpace
    handles: HandleTable
    priority: int
    ports: frozenset[int]
    exit_code: int | None = None
    ended: Condition = field(default_factory=Condition)
    fibers: "_FiberSet" = field(default_factory=lambda: _FiberSet())
    stack_next: int = 0                 # where the next kernel-chosen fiber stack goes (grows down)
    # The image's fiber settings for this container (boot/vmkimage.py: max_fibers, fiber_stack).
    max_fibers: int = 0
    fiber_stack: int = 0
    heap_base: int = 0
    irqs: dict = field(default_factory=dict)     # IRQ line -> IrqSource, for the lines granted in the image

    def __repr__(self) -> str:
        return f"<container {self.pid} {self.name}>"


class VMKernel:
    """Boot a vmk image on a machine and run it."""

    # Live fibers per container unless the image says otherwise (it does: [kernel]
    # max_fibers, a container's own max_fibers): a fiber bomb gets -EAGAIN, not
    # the kernel's memory.  A blocked fiber costs pid 0 its records only
    # (about 1.5 KiB of Python objects) and the scheduler nothing.
    MAX_FIBERS = DEFAULT_MAX_FIBERS
    # Bytes queued for the console UART (0.35 s at 115200 baud) beyond which writers
    # (console_write, the console.tx driver) wait for it to drain: a container that
    # floods the console holds itself back, not pid 0's memory and every other writer.
    CONSOLE_HIGH = 4096
    # A plain send/recv that blocks parks as a _Parked (False: as a generic
    # one-arm sync; the same behaviour, slower: tests compare the two).
    plain_park = True
    # Plain send/recv between guest fibers go through the C fast path first
    # (kernel/_fastipc.c; it takes them only while this and plain_park are
    # True; False: all of them through ``syscall``; tests compare).
    fast_ipc = True

    def __init__(self, machine: Machine, image: Image, log: Callable[[str], None] | None = None) -> None:
        self.machine = machine
        self.image = image
        self.log = log or (lambda msg: machine.log(f"kernel: {msg}"))
        k = image.kernel
        self.hal = Hal(machine, ring_size=k.console_ring)
        self.kclock = KernelClock(machine, self._reprogram_timer)
        self.sched = Scheduler(self.kclock, policy=str(getattr(k.policy, "value", k.policy)), log=self.log)
        self.channels = ChannelTable(k.channels)
        self.timeslice = k.timeslice_ns
        self.fiber_preemption = k.fiber_preemption_ns     # 0: fibers are cooperative
        self.containers: dict[int, Container] = {}
        self._next_pid = 1
        self.current = None                     # the guest fiber on the CPU
        self._slice_end: int | None = None
        self._slice_owner: Container | None = None
        self._fiber_deadline: int | None = None  # when the fiber timer rotates the current fiber
        self._loaded_at = 0                      # virtual time the current fiber was loaded
        self._yielded = False                    # the current fiber called yield
        self.reports: list[str] = []            # one line per container that faulted or was killed
        self._free_stacks: dict[int, list[int]] = {}     # pid -> stack tops to reuse
        self._fiber_stacks: dict[int, int] = {}          # fid -> the stack the kernel gave it
        # console: the UART driver speaks these two channels (Loko's ns8250 pattern)
        self.console_rx = self.channels.create(0, name="console.rx")
        self.console_tx = self.channels.create(0, name="console.tx")
        self._console_room: Condition | None = None     # signalled when the console drains
        self.rx_irq = IrqSource(4, "console-rx")
        self.irq_sources: dict[int, IrqSource] = {}
        self.named = {c.name: self.channels.create(c.msg_size, c.tag, holder=IMAGE, name=c.name)
                      for c in image.channels}
        self.sched.spawn_kernel(self._uart_rx_driver(), "uart-rx")
        self.sched.spawn_kernel(self._uart_tx_driver(), "uart-tx")
        self.hal.start(self)
        self.door: Any = None                    # the fast path's syscall entry
        self.tracer = machine.tracer             # machine/trace.py: None, or what it reports to
        if self.tracer is None:
            self.hal.wrap_syscall_entry(self._fast_door)
        else:
            # Traced: every syscall through a door that records it, and no C fast path
            # (it would rendezvous and switch fibers without reporting them).
            self.fast_ipc = False
            self.sched.tracer = self.channels.tracer = self.tracer
            self.hal.wrap_syscall_entry(self._traced_door)
        # Heaps are demand-paged, but what the image promises its containers must exist.
        free = self.hal.frames.available * PAGE
        for spec in image.boot_order():
            if spec.memory > free:
                raise ImageError(f"container {spec.name!r} needs {spec.memory >> 10} KiB but only "
                                 f"{free >> 10} KiB of guest RAM is left (try --mem)")
            free -= spec.memory
        for spec in image.boot_order():
            try:
                self.start_container(spec.name)
            except OutOfMemory:
                free = self.hal.frames.available * PAGE
                raise ImageError(f"container {spec.name!r} needs {spec.memory >> 10} KiB but only "
                                 f"{free >> 10} KiB of guest RAM is left (try --mem)") from None

    def _fast_door(self, entry: Callable[..., int | None], stop: Callable[[], None]) -> Any:
        ram = self.hal.frames.ram
        self.door = _fastipc.Door(
            slow=entry, stop=stop, kernel=self, sched=self.sched, channel_type=Channel,
            parked_type=_Parked, image=IMAGE, waiting=OpState.WAITING, synced=OpState.SYNCED,
            blocked_state=FiberState.BLOCKED, runnable=FiberState.RUNNABLE, guest=FiberKind.GUEST,
            fiber_type=Fiber, queue_type=WaitQueue,
            ram=ram.host_address, ram_size=ram.size, nr_send=int(Syscall.SEND),
            nr_recv=int(Syscall.RECV), max_msg=MAX_MSG)
        return self.door

    def _traced_door(self, entry: Callable[..., int | None], stop: Callable[[], None]) -> Any:
        tracer = self.tracer

        def door(nr: int, *args: int) -> int | None:
            rec = tracer.syscall(self.current, nr, _syscall_name(nr), args)
            rec["result"] = result = entry(nr, *args)
            return result
        return door

    # ------------------------------------------------------------------ containers
    def start_container(self, name: str, passed: list[Any] | None = None) -> Container:
        spec = self.image.container(name)
        prog = self.image.program(spec.program)
        layout = self.image.layout(spec)
        aspace = AddressSpace(self.hal.frames, spec.memory)
        try:
            # W^X: each segment's pages get its ELF flags (segments never share a page:
            # validate_image); the loading write goes around them.  Stack and heap: rw-.
            for seg in prog.segments:
                start = seg.vaddr & ~(PAGE - 1)
                end = (seg.vaddr + seg.memsz + PAGE - 1) & ~(PAGE - 1)
                aspace.map(start, end - start, writable=bool(seg.flags & SegFlag.W),
                           executable=bool(seg.flags & SegFlag.X))
                aspace.write(seg.vaddr, bytes(seg.data), force=True)
            # The heap is mapped on first touch (page faults and kernel accesses).
            aspace.demand = (layout.heap_base, layout.heap_base + layout.heap_size)
            aspace.map(layout.stack_bottom, layout.stack_top - layout.stack_bottom)
        except OutOfMemory:
            aspace.destroy()
            raise
        pid = self._next_pid
        self._next_pid += 1
        c = Container(pid, name, aspace, HandleTable(None), spec.priority, frozenset(_ports(spec)))
        c.handles = HandleTable(c)
        c.max_fibers, c.fiber_stack = self.image.max_fibers(spec), self.image.fiber_stack(spec)
        for h in spec.handles:
            ch = {"console.rx": self.console_rx, "console.tx": self.console_tx}.get(h) or self.named[h]
            c.handles.install(ch)
        for obj in passed or []:
            c.handles.install(obj)
        # fiber_spawn(stack_top=0) stacks come from the top of the heap, downwards.
        for line in spec.irqs:
            src = self.irq_sources.get(line)
            if src is None:
                src = self.irq_sources[line] = IrqSource(line, f"irq {line}")
                self.hal.grant_irq(line, lambda src=src: self._irq_fired(src))
            c.irqs[line] = src
        c.stack_next = layout.heap_base + layout.heap_size
        c.heap_base = layout.heap_base
        self.containers[pid] = c
        ctx = GuestContext.start(prog.entry, layout.stack_top)
        f = self.sched.spawn_guest(ctx, c, name=f"{name}.main", priority=c.priority)
        c.fibers.append(f)
        return c

    def _end_container(self, c: Container, code: int, report: str | None = None) -> None:
        if c.exit_code is not None:
            return
        c.exit_code = code
        if report:
            self.reports.append(report)
            self.hal.console_write((f"vmk: {report}\n").encode())
        self.sched.kill_container(c)
        for f in c.fibers:                      # the kernel's records of its stacks go with it
            self._fiber_stacks.pop(f.fid, None)
        self._free_stacks.pop(c.pid, None)
        c.handles.close_all()
        c.aspace.destroy()
        c.ended.signal()
        if self.current is not None and self.current.container is c:
            # The fiber on the CPU ended with its container: nothing of it stays
            # loaded, its fiber-timer deadline included (_unload, which clears it
            # for every other stop, is not called for a fiber that is gone).  A
            # deadline that outlived its fiber re-armed the idle CPU's LAPIC 1 ns
            # ahead at each interrupt until something else became runnable.
            self.current = None
            self._fiber_deadline = None
            self._yielded = False
            if self.tracer is not None:
                self.tracer.fiber_on_cpu(None)
            self.machine.stop(KSTOP + "container ended")

    # ------------------------------------------------------------------ the loop
    def run(self, until: int | None = None, max_instructions: int | None = None) -> RunResult:
        """This is our event loop: schedule fibers and run the machine between traps.

        Returns on the end of the image, the time limit, or any machine stop
        that is not pid 0's own (a debugger breakpoint or step): the fiber on
        the CPU then stays loaded, and the next call goes on with it."""
        sched = self.sched
        m = self.machine
        limit = None if max_instructions is None else m.instructions + max_instructions
        while True:
            if self.current is None and not self.hal.idling:
                sched.run_kernel_fibers()
                if self._finished():
                    self.hal.stop_timer()            # (a slice end may still be armed)
                    m._drain()                       # the last bytes leave the UART's shift register
                    return RunResult(Why.EXIT, "all containers ended", self.containers[1].exit_code
                                     if 1 in self.containers else 0)
                f = sched.next_fiber()
                if f is None:
                    self.hal.idle()
                    self._slice_end = None
                    self._slice_owner = None
                    self._reprogram_timer()
                else:
                    self.hal.resume(self._load(f, m.now), f.container.aspace.cr3, f.container.ports)
            left = None if limit is None else max(0, limit - m.instructions)
            if left == 0:
                return RunResult(Why.STOPPED, "instruction limit reached")
            r = m.run(until=until, max_instructions=left)
            if not (r.why == Why.STOPPED and r.message.startswith(KSTOP)):
                if r.why == Why.DEAD and self.current is None:
                    return self._deadlock()
                return r                        # not ours: the fiber stays on the CPU
            if self.current is not None:
                self._unload(self.current)
            self.hal.idling = False
            if self._slice_end is not None and m.now >= self._slice_end:
                sched.slice_expired()           # the container goes behind its peers

    def salvage_console(self) -> None:
        """A vmk bug stopped the run: hand everything the containers wrote to the
        console to the UART's back end now (messages parked on console.tx, the
        driver's queue, the UART's FIFO), so no guest output is lost with it."""
        q = self.hal.tx_queue
        for w in self.console_tx.sendq:
            if isinstance(w.payload, (bytes, bytearray)):
                q.extend(w.payload)
        uarts = self.machine.uarts
        for _ in range(len(q) // 16 + 2):
            try:
                self.hal.pump_tx()
            finally:
                for uart in uarts:
                    uart.flush_tx()
            if not q:
                break

    def _deadlock(self) -> RunResult:
        """The CPU idles for ever: every fiber is blocked and no timer, no interrupt
        source (the console's input is closed) can wake one."""
        waits = sorted({w for f in self.sched.blocked() if f.container is not None
                        and (w := f.waiting_on) is not None})
        what = "; ".join(waits[:3]) + (" ..." if len(waits) > 3 else "")
        return RunResult(Why.DEAD, f"every fiber is blocked and nothing can wake one (no timer armed, "
                                   f"no input to come) at t={self.machine.now} ns"
                                   + (f": waiting on {what}" if what else ""))

    def _load(self, f, now: int) -> GuestContext:
        """Make ``f`` the current fiber at virtual time ``now`` (its context is what
        the CPU must load)."""
        self.current = f
        c = f.container
        ctx: GuestContext = f.ctx
        if self.tracer is not None:
            self.tracer.fiber_on_cpu(f)
        if f.result is not None:
            ctx.regs[RAX_SLOT] = f.result & _U64
            f.result = None
        if c is not self._slice_owner or self._slice_end is None or now >= self._slice_end:
            # A new time slice when another container gets the CPU (or the last one ran out).
            self._slice_owner = c
            self._slice_end = now + self.timeslice
        if self.fiber_preemption:
            self._loaded_at = now
            self._fiber_deadline = now + self.fiber_preemption - f.ran_ns
        self._reprogram_timer(now)
        return ctx

    def switch_in_place(self) -> bool:
        """The current fiber just blocked in a syscall: if the next fiber to run is
        a guest fiber (no kernel fiber waiting, the time slice still running,
        nothing else asked pid 0 to stop), switch to it right here in the
        syscall hook, changing address space if it is of another container.
        Exactly what the loop would do (save, choose, load), without ending
        the CPU slice and coming round the loop: a channel round trip costs
        two of these."""
        cur = self.current
        m = self.machine
        if cur is None or cur.state is not FiberState.BLOCKED or m.stop_pending:
            return False
        now = m.clock.now
        end = self._slice_end
        if end is None or now >= end:
            return False
        f = self.sched.next_guest()
        if f is None:
            return False
        cur.ran_ns = 0
        self._fiber_deadline = None
        old = cur.ctx
        c = f.container
        self.hal.switch_in_syscall(old, self._load(f, now), c.aspace.cr3, c.ports)
        return True

    def _unload(self, cur) -> None:
        """Take the current fiber off the CPU after one of pid 0's stops.

        A fiber still RUNNING was preempted: it yielded, the fiber timer ran
        out (rotate: behind its siblings), or the time slice ended / an
        interrupt woke someone (requeue_front: first of its container, so a
        sibling never runs in its place).  A fiber that blocked or ended is
        where the syscall put it; its CPU account starts again.  (The account
        is kept only while the fiber timer is on: a fiber deadline is set.)"""
        if cur.state is FiberState.DONE:
            cur.ctx = None              # an ended fiber keeps its exit value for a join, not its registers
        else:
            self.hal.save(cur.ctx)
        deadline, self._fiber_deadline = self._fiber_deadline, None
        yielded, self._yielded = self._yielded, False
        self.current = None
        if self.tracer is not None:
            self.tracer.fiber_on_cpu(None)
        if cur.state is not FiberState.RUNNING:
            cur.ran_ns = 0
        elif yielded:
            cur.ran_ns = 0
            self.sched.yield_(cur)
        elif deadline is None:
            self.sched.requeue_front(cur)
        elif self.machine.now >= deadline:
            cur.ran_ns = 0
            self.sched.rotate(cur)
        else:
            cur.ran_ns += self.machine.now - self._loaded_at
            self.sched.requeue_front(cur)

    def _finished(self) -> bool:
        """Every container has ended and the console has sent everything."""
        return bool(self.containers) and all(c.exit_code is not None for c in self.containers.values()) \
            and not self.hal.tx_queue and not self.sched.policy.runnable()

    def _reprogram_timer(self, now: int | None = None) -> None:
        """The LAPIC one-shot at the earliest deadline: pid 0's timers, the slice end,
        the current fiber's preemption (``now``: the virtual time, if known)."""
        d = self.kclock.next_deadline()
        t = self._slice_end
        if t is not None and (d is None or t < d):
            d = t
        t = self._fiber_deadline
        if t is not None and (d is None or t < d):
            d = t
        self.hal.set_deadline(d, now)

    # ------------------------------------------------------------------ the HAL's calls
    def interrupt(self, source: str) -> None:
        """An interrupt's top half ran (HAL).  Stops the machine when pid 0 has to
        choose again: a deadline of the running fiber passed, or the interrupt
        woke a fiber (a timer's wakeups too: a sleeper runs on time under the
        global policy; tests/kernel/test_starvation.py).
        While the CPU idles, anything runnable ends the idling."""
        now = self.machine.now
        woken = self.sched.wakeups
        if source == "timer":
            self.kclock.run_due()
            if self._slice_end is not None and now >= self._slice_end:
                self.machine.stop(KSTOP + "time slice")
            elif self._fiber_deadline is not None and now >= self._fiber_deadline:
                self.machine.stop(KSTOP + "fiber preemption")
            self._reprogram_timer()
        elif source == "console-rx":
            self.rx_irq.fire()
        elif source == "console-tx-done":
            room, self._console_room = self._console_room, None
            if room is not None:
                room.signal()                   # writers held back by a full console go on
            if self._finished():
                self.machine.stop(KSTOP + "finished")
        if self.current is None:
            if self.sched.policy.runnable():
                self.machine.stop(f"{KSTOP}wakeup ({source})")
        elif self.sched.wakeups != woken:
            self.machine.stop(f"{KSTOP}wakeup ({source})")

    def _irq_fired(self, src: IrqSource) -> None:
        """Top half of a line granted to a container: count it; the waiting fiber wakes."""
        if src.fire():
            self.machine.stop(f"{KSTOP}wakeup (irq {src.line})")

    def fault(self, vector: int, error_code: int | None, cr2: int, rip: int) -> None:
        f = self.current
        if f is None:
            self.machine.stop(KSTOP + "fault with no fiber")
            return
        ec_idt = 0x2                                # #GP error code bit: the selector is an IDT vector
        c = f.container
        who = f"pid {c.pid} ({c.name}) killed:"
        if vector == 14 and error_code is not None and not error_code & (PFEC.P | PFEC.I):
            # A data access to a page that is not there: the heap's next page, or a
            # container that ran past its memory (heap, stack, or the machine's RAM).
            a = c.aspace
            oom = f"{who} out of memory (limit {a.limit >> 10} KiB)"
            try:
                if a.fault_in(cr2):
                    return                      # demand-paged heap: the instruction runs again
            except OutOfMemory:
                why = "" if a.used + PAGE > a.limit else ", the machine's RAM is exhausted"
                self._end_container(c, -int(Errno.ENOMEM), f"{oom}{why}: page fault at address {cr2:#x} "
                                    f"in its heap, RIP {rip:#x}")
                return
            layout = self.image.layout(self.image.container(c.name))
            stack = layout.stack_top - layout.stack_bottom
            if cr2 < layout.stack_bottom and cr2 >= self.hal.stack_pointer() - PAGE:
                # At or above RSP (less a push's reach), below the stack: the stack grew out of it.
                self._end_container(c, -int(Errno.ENOMEM), f"{who} stack overflow (stack {stack >> 10} KiB): "
                                    f"page fault at address {cr2:#x} below the stack at "
                                    f"{layout.stack_bottom:#x}, RIP {rip:#x}")
                return
            if a.demand[1] <= cr2 < layout.stack_bottom:
                self._end_container(c, -int(Errno.ENOMEM), f"{oom}: page fault at address {cr2:#x} beyond its "
                                    f"heap ({a.demand[0]:#x}..{a.demand[1]:#x}), RIP {rip:#x}")
                return
        what = EXCEPTION_NAMES.get(vector, f"exception {vector}")
        extra = ""
        if vector == 14:
            extra = f" at address {cr2:#x}"
            # Say what a W^X or wild-jump fault was; a plain missing page needs no words.
            ec_ = error_code or 0
            if ec_ & PFEC.I:
                extra += " (execute of a no-execute page)" if ec_ & PFEC.P else " (instruction fetch)"
            elif ec_ & PFEC.P:
                extra += " (write to a read-only page)" if ec_ & PFEC.W else " (protection)"
        elif vector == 13 and error_code is not None and error_code & ec_idt:
            extra = f" (INT {error_code >> 3:#x}: no gate for ring 3)"
        ec = f" error {error_code:#x}" if error_code is not None else ""
        self._end_container(c, -128 - vector, f"{who} {what}{ec} at RIP {rip:#x}{extra}")

    # ------------------------------------------------------------------ drivers (kernel fibers)
    def _uart_rx_driver(self):
        while True:
            yield ev.irq(self.rx_irq)
            data = self.hal.rx.take(len(self.hal.rx.data))
            try:
                for b in data:
                    yield send(self.console_rx, bytes([b]))
            except KernelError:
                return                  # nobody can read the console any more

    def _uart_tx_driver(self):
        while True:
            try:
                msg = yield recv(self.console_tx)
            except KernelError:
                return                  # every container that could write is gone (EPIPE)
            if len(self.hal.tx_queue) >= self.CONSOLE_HIGH:
                yield ev.cond_wait(self._console_drained())
            self.hal.console_write(bytes(msg))

    def _console_drained(self) -> Condition:
        """A condition signalled when the console's output queue next runs empty."""
        if self._console_room is None:
            self._console_room = Condition("console drained")
        return self._console_room

    # ------------------------------------------------------------------ syscalls
    def syscall(self, nr: int, args: tuple[int, ...]) -> int | None:
        f = self.current
        if f is None:
            return -Errno.ENOSYS
        c = f.container
        handler = _SYSCALLS.get(nr)
        if handler is None:
            return -int(Errno.ENOSYS)
        try:
            return handler(self, f, c, *args[:6])
        except UserFault:
            return -int(Errno.EFAULT)
        except OutOfMemory:
            return -int(Errno.ENOMEM)
        except KernelError as e:
            return -int(e.errno)
        except Exception as e:          # a vmk bug: say where it happened (tools/cli.py reports it)
            e.add_note(f"in syscall {_syscall_name(nr)}({', '.join(hex(a) for a in args[:6])}) "
                       f"of pid {c.pid} ({c.name}), fiber {f.fid}")
            raise

    def _sync(self, f, op) -> int | None:
        out = self.sched.sync(f, op)
        return None if isinstance(out, Blocked) else out.value

    # each takes (kernel, fiber, container, rdi, rsi, rdx, r10, r8, r9)
    def sys_exit(self, f, c, code, *_):
        self._end_container(c, _signed(code))
        return None

    def sys_yield(self, f, c, *_):
        self._yielded = True
        self.machine.stop(KSTOP + "yield")
        return 0

    def sys_fiber_spawn(self, f, c, entry, stack_top, arg, *_):
        if len(c.fibers) >= c.max_fibers:
            return -int(Errno.EAGAIN)
        given = stack_top == 0
        if given:
            # A kernel-chosen stack: fiber_stack bytes from the top of the heap
            # (demand-paged: only the pages the fiber touches count against the
            # container's memory), reused after its fiber exits; -ENOMEM when the
            # heap has no room for another.
            free = self._free_stacks.setdefault(c.pid, [])
            if free:
                stack_top = free.pop()
            else:
                if c.stack_next - c.fiber_stack < c.heap_base:
                    return -int(Errno.ENOMEM)
                stack_top = c.stack_next
                c.stack_next -= c.fiber_stack
        c.aspace.check(stack_top - 8, 8, write=True)
        ctx = GuestContext.start(entry, stack_top & ~0xF, arg)
        nf = self.sched.spawn_guest(ctx, c, name=f"{c.name}.fiber", priority=c.priority)
        if given:
            self._fiber_stacks[nf.fid] = stack_top
        c.fibers.append(nf)
        return nf.fid

    def sys_fiber_join(self, f, c, fid, *_):
        target = self.sched.fibers.get(fid)
        if target is None or target.container is not c:
            return -int(Errno.ESRCH)
        return self._sync(f, self._join(target))

    def _join(self, target):
        """``join(target)`` that forgets the fiber once a join of it commits (pthread's
        rule: a fiber is joined once; a later join of its id is ESRCH), so a container
        that spawns and joins for ever does not grow pid 0."""
        return ev.wrap(ev.join(target), lambda v: (self.sched.reap(target), v)[1])

    def sys_fiber_exit(self, f, c, value, *_):
        self.sched.exit(f, _signed(value))
        top = self._fiber_stacks.pop(f.fid, None)
        if top is not None:
            self._free_stacks.setdefault(c.pid, []).append(top)
        c.fibers.remove(f)
        self.machine.stop(KSTOP + "fiber exit")
        if not c.fibers:
            self._end_container(c, 0)
        return None

    def sys_fiber_self(self, f, c, *_):
        return f.fid

    def sys_chan_create(self, f, c, size, tag, *_):
        return c.handles.create_channel(self.channels, size, tag)

    def sys_chan_close(self, f, c, h, *_):
        c.handles.close(h)
        return 0

    # send and recv: a partner already parked on the channel is the common case
    # (a server waiting for requests); the rendezvous is then done at once, as
    # the one-arm sync would do it.  With nobody there the fiber parks as a
    # :class:`_Parked` (that sync without the generic machinery).  Anything that
    # fails (a bad type, EPIPE) takes the sync, which gives the error.
    def sys_send(self, f, c, h, buf, n, *_):
        ch = c.handles.channel(h)
        data = c.aspace.read(buf, n)
        if ch.recvq:
            r = ch.hand_over(data, 0, c)
            if r is not NOT_READY and not isinstance(r, Failed):
                return r
        elif self.plain_park and (ch.msg_size == n or not ch.msg_size and n <= MAX_MSG) \
                and not ch.broken_for(c):
            self.sched.park(f, _Parked(self.sched, f, ch, ch.sendq, data, c, 0, 0))
            return None
        return self._sync(f, send(ch, data))

    def sys_recv(self, f, c, h, buf, n, *_):
        ch = c.handles.channel(h)
        c.aspace.check(buf, n, write=True)
        if ch.sendq:
            msg = ch.take(c)
            if msg is not NOT_READY and not isinstance(msg, Failed):
                return _deliver(c, buf, n, msg)
        elif self.plain_park and not ch.broken_for(c):
            self.sched.park(f, _Parked(self.sched, f, ch, ch.recvq, None, c, buf, n))
            return None
        return self._sync(f, ev.wrap(recv(ch), lambda msg: _deliver(c, buf, n, msg)))

    def sys_sync(self, f, c, events_ptr, count, *_):
        if not 0 < count <= SYNC_MAX_EVENTS:
            return -int(Errno.EINVAL)
        raw = c.aspace.read(events_ptr, count * EVENT_SIZE)
        descs = [struct.unpack_from("<IIqQQq", raw, i * EVENT_SIZE) for i in range(count)]

        def scope(i: int, end: int) -> list:
            # The arms of descriptors i..end-1; an EV_WITH_NACK marker makes the
            # next k of them (nested markers too) one with_nack scope, not an arm.
            ops = []
            while i < end:
                kind, _flags, handle, a0, a1, _res = descs[i]
                if kind == EventKind.WITH_NACK:
                    k = _signed(a0)
                    if not 0 <= k < end - i:
                        raise KernelError(Errno.EINVAL, f"nack scope of {k} at event {i} runs past its end")
                    cond = c.handles.get(handle, Condition)
                    inner = scope(i + 1, i + 1 + k)
                    ops.append(ev.with_nack(lambda _nack, inner=inner: ev.choice(*inner), cond))
                    i += 1 + k
                else:
                    ops.append(ev.wrap(self._event_op(c, kind, handle, a0, a1),
                                       lambda v, i=i: _store_result(c, events_ptr, i, v)))
                    i += 1
            return ops
        return self._sync(f, ev.choice(*scope(0, count)))

    def _event_op(self, c: Container, kind: int, handle: int, a0: int, a1: int):
        if kind == EventKind.SEND:
            return send(c.handles.channel(handle), c.aspace.read(a0, a1))
        if kind == EventKind.RECV:
            c.aspace.check(a0, a1, write=True)
            return ev.wrap(recv(c.handles.channel(handle)), lambda msg: _deliver(c, a0, a1, msg))
        if kind == EventKind.TIMEOUT:            # signed ns: <= 0 is ready at once
            return ev.timeout(_signed(a0))
        if kind == EventKind.AT_TIME:            # signed ns: at or before now is ready at once
            return ev.at_time(_signed(a0))
        if kind == EventKind.JOIN:
            target = self.sched.fibers.get(handle)
            if target is None or target.container is not c:
                raise KernelError(Errno.ESRCH, "no such fiber")
            return self._join(target)
        if kind == EventKind.COND:
            return ev.cond_wait(c.handles.get(handle, Condition))
        if kind == EventKind.IRQ:
            src = c.irqs.get(handle)
            if src is None:
                raise KernelError(Errno.EPERM, f"IRQ {handle} is not granted to this container")
            return ev.irq(src)
        if kind == EventKind.ALWAYS:
            return ev.always(a0)
        if kind == EventKind.NEVER:
            return ev.never()
        if kind == EventKind.SENDMSG:
            ch = c.handles.channel(handle)
            msg = _read_message(c, a0)
            return send(ch, msg, msg.tag)
        if kind == EventKind.RECVMSG:
            ch = c.handles.channel(handle)
            buf, n, _tag, hp, nh, _flags = struct.unpack("<QqqQqq", c.aspace.read(a0, MSG_SIZE))
            if n < 0 or nh < 0:
                raise KernelError(Errno.EINVAL, "negative capacity in struct vmk_msg")
            room = min(nh, MAX_MSG_HANDLES)
            c.aspace.check(a0, MSG_SIZE, write=True)
            c.aspace.check(buf, n, write=True)
            c.aspace.check(hp, 8 * room, write=True)
            return ev.wrap(recv(ch), lambda m: _deliver_message(c, ch, a0, buf, n, hp, room, m))
        raise KernelError(Errno.EINVAL, f"unknown event kind {kind}")

    def sys_sendmsg(self, f, c, h, msg_ptr, *_):
        return self._sync(f, self._event_op(c, EventKind.SENDMSG, h, msg_ptr, 0))

    def sys_recvmsg(self, f, c, h, msg_ptr, *_):
        return self._sync(f, self._event_op(c, EventKind.RECVMSG, h, msg_ptr, 0))

    def sys_sleep(self, f, c, ns, *_):
        # A signed duration: one <= 0 is a time already past, ready at once (CML, Guile fibers).
        ns = _signed(ns)
        if ns <= 0:
            return 0
        return self._sync(f, ev.timeout(ns))

    def sys_time(self, f, c, *_):
        return self.machine.now

    def sys_getpid(self, f, c, *_):
        return c.pid

    def sys_spawn(self, f, c, name_ptr, name_len, handles_ptr, nhandles, *_):
        if not 0 < name_len <= SPAWN_MAX_NAME or not 0 <= nhandles <= SPAWN_MAX_HANDLES:
            return -int(Errno.EINVAL)
        name = c.aspace.read(name_ptr, name_len).decode("latin-1")
        hs = struct.unpack(f"<{nhandles}q", c.aspace.read(handles_ptr, 8 * nhandles)) if nhandles else ()
        try:
            self.image.container(name)
        except (KeyError, ValueError, LookupError):
            return -int(Errno.ESRCH)
        objs = [c.handles.get(h) for h in hs]
        try:
            child = self.start_container(name, objs)
        except OutOfMemory:
            return -int(Errno.ENOMEM)
        return child.pid

    def sys_wait(self, f, c, pid, *_):
        child = self.containers.get(pid)
        if child is None:
            return -int(Errno.ECHILD)
        if child.exit_code is not None:
            return child.exit_code
        return self._sync(f, ev.wrap(ev.cond_wait(child.ended), lambda _v: child.exit_code))

    def sys_console_write(self, f, c, buf, n, *_):
        if n < 0 or n > CONSOLE_WRITE_MAX:
            return -int(Errno.EINVAL)
        data = c.aspace.read(buf, n)
        if len(self.hal.tx_queue) < self.CONSOLE_HIGH:
            self.hal.console_write(data)
            return n
        # The console is behind: wait until it has sent what it holds (backpressure,
        # as a blocking write to a tty); the bytes go out when the wait commits.
        return self._sync(f, ev.wrap(ev.cond_wait(self._console_drained()),
                                     lambda _: (self.hal.console_write(data), n)[1]))

    def sys_handle_dup(self, f, c, h, *_):
        return c.handles.dup(h)

    def sys_cond_create(self, f, c, *_):
        return c.handles.install(Condition())

    def sys_cond_signal(self, f, c, h, *_):
        c.handles.get(h, Condition).signal()
        return 0


_SYSCALLS: dict[int, Callable[..., int | None]] = {
    Syscall.EXIT: VMKernel.sys_exit, Syscall.YIELD: VMKernel.sys_yield,
    Syscall.FIBER_SPAWN: VMKernel.sys_fiber_spawn, Syscall.FIBER_JOIN: VMKernel.sys_fiber_join,
    Syscall.FIBER_EXIT: VMKernel.sys_fiber_exit, Syscall.FIBER_SELF: VMKernel.sys_fiber_self,
    Syscall.CHAN_CREATE: VMKernel.sys_chan_create, Syscall.CHAN_CLOSE: VMKernel.sys_chan_close,
    Syscall.SEND: VMKernel.sys_send, Syscall.RECV: VMKernel.sys_recv, Syscall.SYNC: VMKernel.sys_sync,
    Syscall.SLEEP: VMKernel.sys_sleep, Syscall.TIME: VMKernel.sys_time, Syscall.GETPID: VMKernel.sys_getpid,
    Syscall.SPAWN: VMKernel.sys_spawn, Syscall.WAIT: VMKernel.sys_wait,
    Syscall.CONSOLE_WRITE: VMKernel.sys_console_write, Syscall.HANDLE_DUP: VMKernel.sys_handle_dup,
    Syscall.COND_CREATE: VMKernel.sys_cond_create, Syscall.COND_SIGNAL: VMKernel.sys_cond_signal,
    Syscall.SENDMSG: VMKernel.sys_sendmsg, Syscall.RECVMSG: VMKernel.sys_recvmsg,
}


class _FiberSet:
    """A container's live fibers, in spawn order: a dict used as an ordered set, so
    that a fiber's exit is O(1) however many siblings it has (a list's remove was
    a scan of them all)."""
    __slots__ = ("_d",)

    def __init__(self) -> None:
        self._d: dict[Fiber, None] = {}

    def append(self, f: Fiber) -> None:
        self._d[f] = None

    def remove(self, f: Fiber) -> None:
        del self._d[f]

    def __contains__(self, f: object) -> bool:
        return f in self._d

    def __len__(self) -> int:
        return len(self._d)

    def __iter__(self) -> Any:
        return iter(self._d)

    def __repr__(self) -> str:
        return f"_FiberSet({list(self._d)!r})"


class _Parked(Sync):
    """A guest fiber parked in a plain ``send`` or ``recv`` (no choice): a sync of
    one arm that is its own waiter in the channel's queue.

    It behaves as ``sync(send(ch, data))`` / ``sync(wrap(recv(ch), deliver))``
    parked on that one arm (the partner's try commits it; EPIPE wakes it;
    a kill aborts it), without what only choices need: no arm list, wrap chain,
    nack scopes or cancel tokens.  A plain send/recv is most of a server's
    life, and this is most of its cost (``vmk bench kernel``, rtt rows).
    A recv's ``buf``/``n`` say where the message goes when it commits."""
    __slots__ = ("arm", "buf", "ch", "n", "payload", "queue", "sched", "sync")

    def __init__(self, sched: Scheduler, fiber: Any, ch: Any, queue: Any, payload: Any,
                 party: Container, buf: int, n: int) -> None:
        self.state = OpState.WAITING
        self.party = party
        self.fiber = fiber
        self.sched = sched
        self.ch = ch
        self.queue = queue
        self.payload = payload
        self.buf = buf
        self.n = n
        self.sync = self
        self.arm = 0
        self.winner = None
        queue.add(self)

    def complete(self, arm: int, result: Any) -> bool:
        if self.state is not OpState.WAITING:
            return False
        self.state = OpState.SYNCED
        self.winner = 0
        self.queue.remove(self)
        if self.queue is self.ch.recvq and not isinstance(result, Failed):
            result = _deliver(self.party, self.buf, self.n, result)
        self.sched.committed(self.fiber, result)
        return True

    def cancel(self) -> None:
        self.queue.remove(self)

    def abort(self) -> None:
        if self.state is OpState.WAITING:
            self.state = OpState.SYNCED
            self.queue.remove(self)

    def describe(self) -> str:
        return f"{'recv' if self.queue is self.ch.recvq else 'send'} on channel {self.ch.cid}"


_U64 = 0xFFFF_FFFF_FFFF_FFFF


def _syscall_name(nr: int) -> str:
    try:
        return Syscall(nr).name.lower()
    except ValueError:
        return f"#{nr}"


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _u64(v: int) -> int:
    """A value written back to a guest: reduced to 64 bits, two's complement."""
    return v & _U64


def _deliver(c: Container, buf: int, n: int, msg: Any) -> int:
    """A plain recv's delivery: the bytes; a message's handles are dropped."""
    if type(msg) is Message:
        _pass_handles(msg, None, 0)
        msg = msg.data
    data = bytes(msg)[:n]
    if c.exit_code is None:
        c.aspace.write(buf, data)
    return len(data)


def _read_message(c: Container, ptr: int) -> Message:
    """A sendmsg's ``struct vmk_msg`` at ``ptr``: the bytes, the tag claim and the
    objects behind the handles (channels or conditions), read at the sync."""
    buf, n, tag, hp, nh, flags = struct.unpack("<QqqQqq", c.aspace.read(ptr, MSG_SIZE))
    if n < 0 or not 0 <= tag <= MAX_TAG or not 0 <= nh <= MAX_MSG_HANDLES or flags & ~int(MsgFlag.MOVE):
        raise KernelError(Errno.EINVAL, "bad struct vmk_msg")
    if n > MAX_MSG:
        raise KernelError(Errno.EMSGSIZE, f"{n} bytes > {MAX_MSG}")
    data = c.aspace.read(buf, n)
    hs = struct.unpack(f"<{nh}q", c.aspace.read(hp, 8 * nh)) if nh else ()
    objs = tuple(c.handles.get(h) for h in hs)
    for h, obj in zip(hs, objs):
        if not isinstance(obj, (Channel, Condition)):
            raise KernelError(Errno.EBADF, f"handle {h} cannot be passed")
    return Message(data, tag, c, hs, objs, bool(flags & MsgFlag.MOVE))


def _pass_handles(msg: Message, dest: Container | None, room: int) -> tuple[list[int], bool]:
    """Commit a message's handles: install up to ``room`` of them in ``dest`` (None:
    drop them all).  A moved handle still open in the sender hands its hold over
    (the channel is never without one, and a channel only its sender held is not
    made *connected* by the move); one that is not delivered is closed in the
    sender.  Returns (the new handles, whether any was dropped)."""
    out: list[int] = []
    dropped = False
    sender = msg.sender
    mover = sender.handles if msg.move and isinstance(sender, Container) and sender.exit_code is None else None
    for h, obj in zip(msg.handles, msg.objs):
        moving = mover is not None and mover.names(h, obj)
        if dest is None or dest.exit_code is not None or len(out) >= room or getattr(obj, "freed", False):
            dropped = True
        else:
            try:
                out.append(dest.handles.install(obj, moved_from=sender if moving else None))
                if moving:
                    mover.forget(h)
                continue
            except KernelError:                 # EMFILE: the receiver's table is full
                dropped = True
        if moving:
            mover.close_if(h, obj)
    return out, dropped


def _deliver_message(c: Container, ch: Channel, ptr: int, buf: int, n: int, hp: int, room: int,
                     msg: Any) -> int:
    """A recvmsg's delivery: bytes, tag, handles, and the written-back fields."""
    if type(msg) is Message:
        tag = msg.tag or ch.tag
        hs, dropped = _pass_handles(msg, c, room)
        data = msg.data[:n]
    else:
        tag, hs, dropped = ch.tag, [], False
        data = bytes(msg)[:n]
    if c.exit_code is None:
        c.aspace.write(buf, data)
        if hs:
            c.aspace.write(hp, struct.pack(f"<{len(hs)}q", *hs))
        c.aspace.write(ptr + 8, struct.pack("<QQ", len(data), _u64(tag)))
        c.aspace.write(ptr + 32, struct.pack("<QQ", len(hs), int(MsgFlag.CTRUNC) if dropped else 0))
    return len(data)


def _store_result(c: Container, events_ptr: int, i: int, value: Any) -> Any:
    if c.exit_code is None and isinstance(value, int):
        c.aspace.write(events_ptr + i * EVENT_SIZE + 32, struct.pack("<Q", _u64(value)))
    return i


def _ports(spec) -> list[int]:
    out = []
    for p in spec.ports:
        if isinstance(p, (list, tuple)):
            out.extend(range(p[0], p[1] + 1))
        else:
            out.append(int(p))
    return out
