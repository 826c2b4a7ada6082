"""The APIC bus of a multi-CPU PC: interprocessor and IO-APIC messages.

Section numbers refer to the Intel SDM Vol. 3A, chapter "Advanced
Programmable Interrupt Controller (APIC)" (chapter 11 since 2023, 10 before;
the section numbers inside the chapter are the same) and chapter 9 (8 before
2023) "Multiple-Processor Management", §9.4 MP initialization.

How it works
------------
Every local APIC of the machine hangs on the bus (``lapics``, index = CPU
number; the APIC IDs are the registers' values, which software may change).
A write to a local APIC's ICR low dword calls :meth:`ApicBus.send` with the
ICR and the destination field; the IO-APIC sends its redirection entries'
messages through :meth:`ApicBus.ioapic_message`.  A message is resolved to the
APICs it names (§11.6.2):

* shorthand (ICR bits 19:18): self, all including self, all excluding self;
  no shorthand: the destination field, physical (an APIC ID; 0xFF is a
  broadcast) or logical (each APIC's LDR under its DFR model, flat or
  cluster: ``LocalAPIC.matches``);
* delivery mode (ICR bits 10:8): fixed goes to every named APIC's IRR;
  lowest priority goes to one of them, chosen deterministically: the lowest
  TPR, then the lowest APIC ID (§11.6.2.4 leaves the choice to the
  chipset; QEMU's arbitration is round-robin-like, ours is fixed so two runs
  are identical); NMI sets the target's NMI request; INIT resets the target
  APIC (``LocalAPIC.init_reset``) and puts its CPU into wait-for-SIPI
  (``init(cpu)``); STARTUP starts a CPU that waits for SIPI at vector VV, in
  real mode at CS:IP = VV00:0000 (``startup(cpu, vector)``; a CPU that does
  not wait ignores it, §9.4.4.1: this is why INIT-SIPI-SIPI may send the
  second SIPI blindly).
* INIT level de-assert (mode INIT, level bit 14 clear, trigger level) only
  resynchronised arbitration IDs on P6/Pentium APICs (§11.6.1): no effect.

Delivery is immediate: the message is in the target when the ICR write
returns, so the sender's delivery-status bit never reads "send pending".  The
target CPU sees it at its next turn (machine/smp.py): the machine runs one
CPU at a time, so "immediately" is a deterministic point in its slice.
``received(cpu)`` tells the machine a CPU got a message from another one
(cross-modifying code: the machine drops that CPU's translations, see
machine/smp.py).

Not modelled
------------
SMI (logged), the ExtINT mode in IPIs (logged), remote read (mode 3,
reserved since the Pentium 4), focus processor checking, the APIC serial
bus's arbitration cycles and their timing.
"""
from __future__ import annotations

from typing import Callable, Sequence

from vmk.machine.devices import Log, nolog
from vmk.machine.devices.lapic import (
    BROADCAST_DEST,
    SHORTHAND_SHIFT,
    DeliveryMode,
    Icr,
    LocalAPIC,
    Shorthand,
)

__all__ = ["ApicBus"]


def _nothing(*_args) -> None:
    return None


class ApicBus:
    """Messages between the local APICs ``lapics`` (index = CPU) and from the IO-APIC.

    ``init(cpu)`` and ``startup(cpu, vector)`` act on a CPU (the machine's);
    ``received(cpu)``: a CPU got an IPI from another CPU."""

    def __init__(self, lapics: Sequence[LocalAPIC], *, init: Callable[[int], None] = _nothing,
                 startup: Callable[[int, int], None] = _nothing, received: Callable[[int], None] = _nothing,
                 log: Log = nolog) -> None:
        self.lapics = list(lapics)
        self._init = init
        self._startup = startup
        self._received = received
        self._log = log
        self.sent = 0                          # IPIs sent (statistics, tests)
        for lapic in self.lapics:
            lapic.bus = self

    # -- resolving destinations -------------------------------------------------------
    def targets(self, source: LocalAPIC | None, shorthand: int, dest: int, logical: bool) -> list[int]:
        """The CPUs (indices, ascending) a message names (§11.6.2, §11.6.1 shorthands)."""
        if shorthand == Shorthand.SELF:
            return [self.lapics.index(source)] if source is not None else []
        if shorthand == Shorthand.ALL_INCLUDING_SELF:
            return list(range(len(self.lapics)))
        if shorthand == Shorthand.ALL_EXCLUDING_SELF:
            return [i for i, a in enumerate(self.lapics) if a is not source]
        if not logical and dest == BROADCAST_DEST:
            return list(range(len(self.lapics)))
        return [i for i, a in enumerate(self.lapics) if a.matches(dest, logical)]

    def _lowest(self, cpus: list[int]) -> list[int]:
        """Lowest-priority arbitration, made deterministic: lowest TPR, then lowest APIC ID."""
        if not cpus:
            return cpus
        return [min(cpus, key=lambda i: (self.lapics[i].tpr, self.lapics[i].apic_id, i))]

    # -- messages ------------------------------------------------------------------------
    def send(self, source: LocalAPIC, icr_lo: int, dest: int) -> None:
        """An ICR write on ``source`` (the low dword; ``dest`` from the high dword's 31:24)."""
        mode = (icr_lo & Icr.DELIVERY_MODE) >> 8
        vector = icr_lo & Icr.VECTOR
        shorthand = (icr_lo & Icr.SHORTHAND) >> SHORTHAND_SHIFT
        cpus = self.targets(source, shorthand, dest, bool(icr_lo & Icr.DEST_LOGICAL))
        self.sent += 1
        if mode == DeliveryMode.INIT and not icr_lo & Icr.LEVEL_ASSERT and icr_lo & Icr.TRIGGER_LEVEL:
            return                                    # INIT level de-assert: no effect (§11.6.1)
        self._deliver(source, mode, vector, cpus, level=False)

    def ioapic_message(self, vector: int, level_triggered: bool, mode: int, dest: int, logical: bool) -> None:
        """A redirection entry's message (82093AA §3.2.4): destination field bits 63:56."""
        cpus = self.targets(None, Shorthand.NONE, dest & 0xFF, logical)
        if not cpus:
            self._log(f"apic bus: IO-APIC message vector {vector:#x} to {'logical' if logical else 'physical'} "
                      f"destination {dest:#x} names no CPU, dropped")
        self._deliver(None, mode, vector, cpus, level=level_triggered)

    def _deliver(self, source: LocalAPIC | None, mode: int, vector: int, cpus: list[int], *, level: bool) -> None:
        if mode == DeliveryMode.LOWEST:
            cpus = self._lowest(cpus)
            mode = DeliveryMode.FIXED
        for i in cpus:
            target = self.lapics[i]
            if source is not None and target is not source:
                self._received(i)
            if mode == DeliveryMode.FIXED:
                target.accept(vector, level)
            elif mode == DeliveryMode.NMI:
                target.raise_nmi()
            elif mode == DeliveryMode.INIT:
                target.init_reset()
                self._init(i)
            elif mode == DeliveryMode.STARTUP:
                self._startup(i, vector)
            else:
                self._log(f"apic bus: delivery mode {mode} to CPU {i} not modelled, dropped")
