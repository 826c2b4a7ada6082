"""The HAL for VM-kernel mode: between the PC and pid 0.

What it does
------------
* **Programs the controllers through their registers**, as a real HAL would:
  the 8259s are masked (ICW/OCW port writes), the local APIC is enabled (SVR)
  and its timer set one-shot, the IO-APIC routes COM1's pin to a vector, the
  UART gets its divisor, FIFO and IER.  Every access goes through the same
  port and MMIO buses the CPU uses (:meth:`outb`, :meth:`mmio_write`).
* **Is the machine's interrupt sink**: vectors below 32 are CPU exceptions in
  the running container and go to the kernel (which ends that container);
  a software interrupt (INT n, INT3, INTO) from a container never reaches a
  top half (see :meth:`Hal.deliver`); other vectors run the registered *top half* (drain the device, e.g. the UART RX
  FIFO into a bounded ring), EOI at once so more interrupts can come, and
  tell the kernel, which wakes the fibers waiting on the event.
* **Is the syscall door**: the ``syscall`` hook reads the Linux-convention
  registers, calls the kernel, and either writes the result into RAX and lets
  the container continue in the same slice (no exit from Unicorn at all), or,
  when the call blocks, ends the slice after the instruction so pid 0 can
  switch fibers.
* **Tickless timer service**: one LAPIC one-shot at the next deadline pid 0
  asks for (a fiber timeout or the end of a time slice), never a fixed tick.
* **Port grants**: ``in``/``out`` from a container reach the bus only for the
  ports its image entry grants (Unicorn itself does not check).

The kernel side is any object with ``syscall(nr, args) -> int | None``
(None: the caller blocked), ``switch_in_place() -> bool`` (after a blocking
syscall: True if the kernel put the next fiber on the CPU itself, with
``switch_in_syscall``, so the CPU slice goes on), ``fault(vector,
error_code, cr2, rip)`` and ``interrupt(source)`` — see ``vmk.kernel.pid0``.
"""
from __future__ import annotations

from collections import deque
from enum import IntEnum
from typing import Callable, Protocol

from vmk.machine.cpu import Reg
from vmk.machine.pc import Machine

from .aspace import KERNEL_RESERVED, FrameAllocator
from .context import ContextSwitcher, enter_user_mode

__all__ = ["Hal", "KernelPort", "Vector", "SerialRing"]

LAPIC = 0xFEE0_0000
IOAPIC = 0xFEC0_0000
PIT_CONTROL = 0x43
PIT_CH0_MODE0 = 0x30        # 8254 control word (datasheet: control word format): counter 0, LSB then MSB, mode 0, binary


class Vector(IntEnum):
    TIMER = 0x20
    COM1 = 0x24
    COM2 = 0x23
    SPURIOUS = 0xFF


class LapicReg(IntEnum):
    EOI = 0xB0
    SVR = 0xF0
    LVT_TIMER = 0x320
    LVT_LINT0 = 0x350
    LVT_LINT1 = 0x360
    TIMER_INIT = 0x380
    TIMER_DIVIDE = 0x3E0


LVT_MASKED = 1 << 16
SVR_ENABLE = 1 << 8
DIVIDE_BY_1 = 0xB
COUNT_MAX = 0xFFFF_FFFF        # the LAPIC initial-count register is 32 bits


class UartReg(IntEnum):
    RBR_THR = 0
    IER = 1
    IIR_FCR = 2
    LCR = 3
    MCR = 4
    LSR = 5


LSR_DR = 0x01
LSR_THRE = 0x20
IER_RX = 0x01
IER_THRE = 0x02
COM1 = 0x3F8
COM1_PIN = 4


class KernelPort(Protocol):
    def syscall(self, nr: int, args: tuple[int, ...]) -> int | None: ...
    def switch_in_place(self) -> bool: ...
    def fault(self, vector: int, error_code: int | None, cr2: int, rip: int) -> None: ...
    def interrupt(self, source: str) -> None: ...


class SerialRing:
    """The bounded ring the UART top half drains into; overflow is counted, not hidden."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data: deque[int] = deque()
        self.overflow = 0

    def put(self, byte: int) -> None:
        if len(self.data) >= self.size:
            self.overflow += 1
            return
        self.data.append(byte)

    def take(self, n: int) -> bytes:
        out = bytearray()
        while self.data and len(out) < n:
            out.append(self.data.popleft())
        return bytes(out)


class Hal:
    def __init__(self, machine: Machine, ring_size: int = 4096, log: Callable[[str], None] | None = None) -> None:
        self.machine = machine
        self.cpu = machine.cpu
        self.log = log or machine.log
        self.kernel: KernelPort | None = None
        self.frames = FrameAllocator(machine.ram, KERNEL_RESERVED, machine.ram.size)
        self.frames.on_code_write = self.cpu.uc.ctl_flush_tb
        self.switcher = ContextSwitcher(self.cpu)
        self.rx = SerialRing(ring_size)
        self.tx_queue: deque[int] = deque()
        self.granted_ports: frozenset[int] = frozenset()
        self.idling = False
        self.lazy_timer = True                  # set_deadline keeps an earlier one-shot armed
        self._deadline: int | None = None
        self.irq_counts: dict[int, int] = {}
        self._top_halves: dict[int, Callable[[], None]] = {
            Vector.TIMER: self._timer_top_half,
            Vector.COM1: self._uart_top_half,
        }

    # ------------------------------------------------------------------ registers (through the buses)
    def outb(self, port: int, value: int) -> None:
        self.machine.ports.write(port, 1, value)

    def inb(self, port: int) -> int:
        return self.machine.ports.read(port, 1)

    def mmio_write(self, addr: int, value: int) -> None:
        base, dev, _ = self.machine.mmio.find(addr)
        dev.write(addr - base, 4, value)

    def mmio_read(self, addr: int) -> int:
        base, dev, _ = self.machine.mmio.find(addr)
        return dev.read(addr - base, 4)

    # ------------------------------------------------------------------ bring-up
    def start(self, kernel: KernelPort) -> None:
        """Take over the machine: controllers, CPU mode, sink, syscall door."""
        self.kernel = kernel
        m = self.machine
        # 8259 pair: initialise (vectors 0x30/0x38, out of the way) and mask everything.
        for port, icw2, icw3 in ((0x20, 0x30, 0x04), (0xA0, 0x38, 0x02)):
            self.outb(port, 0x11)
            self.outb(port + 1, icw2)
            self.outb(port + 1, icw3)
            self.outb(port + 1, 0x01)
            self.outb(port + 1, 0xFF)
        # 8254 counter 0: mode 0 with no count loaded waits for ever.  The firmware left it
        # at 18.2 Hz; masked or not, every period would wake an idle CPU for nothing (the
        # LAPIC one-shot is pid 0's only timer).  Linux's PIT shutdown writes the same mode.
        self.outb(PIT_CONTROL, PIT_CH0_MODE0)
        # Local APIC: enabled, LINT0/LINT1 masked (no virtual wire), timer one-shot on Vector.TIMER.
        self.mmio_write(LAPIC + LapicReg.SVR, SVR_ENABLE | Vector.SPURIOUS)
        self.mmio_write(LAPIC + LapicReg.LVT_LINT0, LVT_MASKED)
        self.mmio_write(LAPIC + LapicReg.LVT_LINT1, LVT_MASKED)
        self.mmio_write(LAPIC + LapicReg.TIMER_DIVIDE, DIVIDE_BY_1)
        self.mmio_write(LAPIC + LapicReg.LVT_TIMER, Vector.TIMER)
        # IO-APIC: COM1 (pin 4) -> Vector.COM1, edge, fixed, to APIC 0.
        self.mmio_write(IOAPIC, 0x10 + 2 * COM1_PIN + 1)
        self.mmio_write(IOAPIC + 0x10, 0)
        self.mmio_write(IOAPIC, 0x10 + 2 * COM1_PIN)
        self.mmio_write(IOAPIC + 0x10, Vector.COM1)
        # COM1: 115200 8N1, FIFO on (trigger 1), RX interrupts, OUT2 (the PC's IRQ enable).
        self.outb(COM1 + UartReg.LCR, 0x80)
        self.outb(COM1 + UartReg.RBR_THR, 1)
        self.outb(COM1 + UartReg.IER, 0)
        self.outb(COM1 + UartReg.LCR, 0x03)
        self.outb(COM1 + UartReg.IIR_FCR, 0x07)
        self.outb(COM1 + UartReg.MCR, 0x0B)
        self.outb(COM1 + UartReg.IER, IER_RX)
        enter_user_mode(m)
        m.sink = self
        self.cpu.syscall_door = self._syscall_entry
        m.port_allowed = self._port_allowed

    # ------------------------------------------------------------------ running containers
    def idle(self) -> None:
        """Nothing to run: halt the CPU with interrupts on; interrupts still reach the sink."""
        self.idling = True
        self.cpu.rflags = 0x202
        self.cpu.halted = True

    def resume(self, ctx, cr3: int, ports: frozenset[int] = frozenset()) -> None:
        """Load a container fiber's registers and address space; it runs at the next slice."""
        self.idling = False
        self.granted_ports = ports
        self.switcher.load(ctx, cr3)

    def save(self, ctx) -> None:
        self.switcher.save(ctx)

    def switch_in_syscall(self, old, new, cr3: int, ports: frozenset[int] = frozenset()) -> None:
        """From inside a SYSCALL: save ``old`` (it resumes after the SYSCALL) and put
        ``new`` on the CPU, without ending the CPU slice."""
        self.granted_ports = ports
        self.switcher.switch_in_syscall(old, new, cr3)

    # ------------------------------------------------------------------ IRQs granted to containers
    IRQ_VECTOR_BASE = 0x40

    def grant_irq(self, line: int, on_fire: Callable[[], None]) -> int:
        """Route ISA/IO-APIC line ``line`` to a vector whose top half calls ``on_fire``
        (the kernel turns it into an IRQ event a container syncs on).  Edge, unmasked."""
        pin = 2 if line == 0 else line
        vector = self.IRQ_VECTOR_BASE + line
        self.mmio_write(IOAPIC, 0x10 + 2 * pin + 1)
        self.mmio_write(IOAPIC + 0x10, 0)
        self.mmio_write(IOAPIC, 0x10 + 2 * pin)
        self.mmio_write(IOAPIC + 0x10, vector)
        self._top_halves[vector] = on_fire
        return vector

    # ------------------------------------------------------------------ timer service
    def set_deadline(self, at: int | None, now: int | None = None) -> None:
        """A LAPIC one-shot by virtual time ``at`` (None: no timer needed).  ``now``:
        the virtual time, if the caller has it.

        Lazy: a one-shot already armed for an earlier time stays armed (it fires,
        the kernel finds nothing due and asks again), and so does one armed when
        no timer is needed any more.  Switching containers moves the slice end
        later at every switch; reprogramming the LAPIC each time would cost a
        register write per switch for an interrupt that then never comes.  The
        kernel's deadlines stay exact: the early interrupt re-arms for them."""
        armed = self._deadline
        if armed is None:
            if at is None:
                return
        elif at == armed or (self.lazy_timer and (at is None or armed < at)):
            if now is None:
                now = self.machine.now
            if armed > now:
                return
        self._deadline = at
        if at is None:
            self.mmio_write(LAPIC + LapicReg.TIMER_INIT, 0)
            return
        if now is None:
            now = self.machine.now
        # The count register is 32 bits: a farther deadline fires early and is re-armed.
        self.mmio_write(LAPIC + LapicReg.TIMER_INIT, min(max(1, at - now), COUNT_MAX))

    def stop_timer(self) -> None:
        """Disarm the one-shot now (``set_deadline(None)`` may leave it armed)."""
        if self._deadline is not None:
            self._deadline = None
            self.mmio_write(LAPIC + LapicReg.TIMER_INIT, 0)

    # ------------------------------------------------------------------ the interrupt sink
    def deliver(self, vector: int, *, error_code: int | None = None, software: bool = False,
                external: bool = True, return_rip: int | None = None, cr2: int | None = None) -> None:
        if software:
            self._software_interrupt(vector, return_rip if return_rip is not None else self.cpu.rip)
            return
        self.irq_counts[vector] = self.irq_counts.get(vector, 0) + 1
        if vector < 32:
            rip = return_rip if return_rip is not None else self.cpu.rip
            self.kernel.fault(vector, error_code, cr2 or 0, rip)
            return
        top = self._top_halves.get(vector)
        if top is not None:
            top()
        if vector != Vector.SPURIOUS:
            self.mmio_write(LAPIC + LapicReg.EOI, 0)
        if self.idling:
            # No container context is loaded: stay halted until pid 0 resumes one.
            self.cpu.halted = True

    # Discussion: INT n is the guest choosing a vector, so the CPU checks the
    # gate's DPL against CPL (SDM vol. 3 §6.12.1.1) and a ring-3 INT through a
    # DPL-0 gate is #GP with the IDT error code (n << 3) | 2, raised on the INT
    # instruction (a fault: RIP is the INT's own address).  In VM mode the HAL
    # is the IDT and it has DPL 3 gates only for #BP (3) and #OF (4), as Linux
    # does: INT3 (CC), INT 3, INTO (CE) and INT 4 are the breakpoint/overflow
    # traps, reported as such (RIP after the instruction).  Every other vector
    # -- a device's (0x24), the timer's (0x20), a granted IRQ's (0x40 + line),
    # 0x80 -- is #GP, and no top half runs: a container cannot fake another's
    # interrupt.
    USER_GATES = frozenset({3, 4})

    def _software_interrupt(self, vector: int, next_rip: int) -> None:
        if vector in self.USER_GATES:
            self.irq_counts[vector] = self.irq_counts.get(vector, 0) + 1
            self.kernel.fault(vector, None, 0, next_rip)
            return
        self.irq_counts[13] = self.irq_counts.get(13, 0) + 1
        self.kernel.fault(13, (vector << 3) | 2, 0, self.machine.idt.int_insn_start(vector, next_rip))

    def stack_pointer(self) -> int:
        """RSP of the fiber on the CPU (the kernel's fault report tells a stack overflow by it)."""
        return self.cpu.reg(Reg.RSP)

    def _timer_top_half(self) -> None:
        self._deadline = None            # the one-shot has fired
        self.kernel.interrupt("timer")

    def _uart_top_half(self) -> None:
        # Eager: empty the RX FIFO into the ring now, so the UART can take more.
        got = False
        while self.inb(COM1 + UartReg.LSR) & LSR_DR:
            self.rx.put(self.inb(COM1 + UartReg.RBR_THR))
            got = True
        self.inb(COM1 + UartReg.IIR_FCR)            # acknowledge a THRE source
        if self.tx_queue:
            self.pump_tx()
            if not self.tx_queue:
                self.kernel.interrupt("console-tx-done")
        if got:
            self.kernel.interrupt("console-rx")

    # ------------------------------------------------------------------ console output (driver side)
    def console_write(self, data: bytes) -> None:
        self.tx_queue.extend(data)
        self.pump_tx()

    def pump_tx(self) -> None:
        """Fill the TX FIFO while THR is empty; THRE interrupts refill it."""
        if self.inb(COM1 + UartReg.LSR) & LSR_THRE:
            for _ in range(16):
                if not self.tx_queue:
                    break
                self.outb(COM1 + UartReg.RBR_THR, self.tx_queue.popleft())
        ier = IER_RX | (IER_THRE if self.tx_queue else 0)
        self.outb(COM1 + UartReg.IER, ier)

    # ------------------------------------------------------------------ syscalls
    def _syscall_entry(self, nr: int, *args: int) -> int | None:
        result = self.kernel.syscall(nr, args)
        if result is None:
            self.syscall_blocked()
        return result

    def syscall_blocked(self) -> None:
        """The fiber on the CPU blocked in its syscall: the kernel switches to the next
        one right here, or the run ends after this instruction (RIP is past it) and
        pid 0 chooses."""
        if not self.kernel.switch_in_place():
            self._blocked_stop()

    def wrap_syscall_entry(self, wrap: Callable[..., Callable[..., int | None]]) -> None:
        """Put ``wrap(entry, stop)`` in front of the syscall entry (the kernel's IPC
        fast path: kernel/_fastipc.c); ``entry`` is the entry above, ``stop()``
        ends the run after the syscall when the kernel did not switch in place
        (:meth:`syscall_blocked`, in two halves)."""
        self.cpu.syscall_door = wrap(self._syscall_entry, self._blocked_stop)

    def _blocked_stop(self) -> None:
        self.machine.stop("kernel: syscall blocked")

    # ------------------------------------------------------------------ ports
    def _port_allowed(self, port: int, size: int) -> bool:
        return all(p in self.granted_ports for p in range(port, port + size))
