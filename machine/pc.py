"""The PC: CPU, RAM, buses, devices and the run loop.

The run loop (``Machine.run``) is the event loop of the whole emulator:

1. fire every timer that is due;
2. take a pending CPU event (fault, INT n) or, if RFLAGS.IF=1 and no STI/MOV SS
   shadow, the highest pending interrupt, and deliver it through the sink
   (the guest IDT in bare-metal mode, the HAL in VM-kernel mode);
3. if the CPU is halted, jump the clock to the next deadline (idle costs no
   host time), or wait for host input, or report a dead machine;
4. otherwise run the CPU for as many instructions as fit before the next
   deadline (capped by a quantum) and advance virtual time by what retired.

A device that makes an interrupt deliverable in the middle of a slice (an EOI
that unmasks a lower vector, a self-IPI, THRE after a THR write) calls
``cpu.request_stop()`` through the LAPIC's ``on_change``: the slice ends after
the current instruction and step 2 runs at the right boundary.

Wiring follows QEMU's "pc" machine: ISA IRQ n goes to PIC pin n and IO-APIC
pin n, except IRQ0 (the PIT) which goes to IO-APIC pin 2 (the MADT interrupt
source override); the PIC's INT output goes to LAPIC LINT0 (ExtINT).
"""
from __future__ import annotations

import ctypes
import select
import struct
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Protocol

from unicorn import UC_PROT_ALL

from .chardev import CharDev, NullChar
from .clock import Clock, cannot_shorten
from .cpu import CPU, EFLAGS, HF, CpuEvent, Ctx, Reg, Stop
from .blockdev import DiskImage
from .devices.acpipm import PM_IO_SIZE, AcpiPm
from .devices.debugport import DebugCon, DebugExit
from .devices.hpet import HPET, HPET_BASE
from .devices.i8042 import I8042
from .devices.ide import PRIMARY, SECONDARY, IDEChannel
from .devices.ioapic import IOAPIC
from .devices.lapic import LocalAPIC
from .devices.pic8259 import PICPair
from .devices.pci_host import PciHost
from .devices.pit8254 import PIT8254, SystemControlPortB
from .devices.port92 import Port92
from .devices.rtc_cmos import DEFAULT_BASE, RTC, bios_cmos_bytes
from .devices.uart16550 import UART16550, SerialTiming
from .devices.vga import TEXT_BASE, TEXT_WINDOW, VGA, VGA_PORT_BASE, VGA_PORT_COUNT
from .irq import IrqLine
from .memory import RAM, MmioBus
from .mmu import PageFault, Paging, translate
from .ports import PortBus
from . import smp
from .devices.apicbus import ApicBus
from .smp import MAX_CPUS, SMP_QUANTUM_NS, ApState, Processor
from .trace import Tracer
from .x86 import EXCEPTION_NAMES, IdtSink, TripleFault

__all__ = ["Machine", "MachineConfig", "RunResult", "Why", "InterruptSink", "SerialTiming", "LAPIC_BASE", "IO_COST_PC_NS",
           "IOAPIC_BASE", "IOAPIC_PIN_OF_ISA_IRQ0", "ACPI_PM_BASE", "ACPI_SCI_IRQ", "HPET_BASE"]

LAPIC_BASE = 0xFEE0_0000
IOAPIC_BASE = 0xFEC0_0000
COM_PORTS = ((0x3F8, 4), (0x2F8, 3))       # (base, ISA IRQ)
IOAPIC_PIN_OF_ISA_IRQ0 = 2
ACPI_PM_BASE = 0x600                       # PIIX4 PMBA as SeaBIOS sets it on QEMU
ACPI_SCI_IRQ = 9
RTC_IRQ = 8
KBD_IRQ, AUX_IRQ = 1, 12

# Discussion: what a port access costs on a PC.  The legacy ports (the UARTs,
# PIC, PIT, port 0x61, POST port 0x80) sit behind the chipset on the ISA bus or
# its successor LPC.  An ISA 8-bit I/O cycle is 6 BCLK at 8.33 MHz with the
# default 4 wait states (720 ns); an LPC I/O cycle is 13 LCLK at 33 MHz
# (390 ns: START, CYCTYPE, 4 address, 2 turnaround, SYNC, 2 data, 2
# turnaround) plus the SYNC wait states a Super I/O inserts (SMSC's LPC47
# parts use long-wait SYNC on every I/O cycle), plus the trip through the
# chipset; the CPU's IN/OUT is serializing and waits for all of it.  Linux
# times its I/O delay as one OUT to port 0x80 ("2 usecs is an upper-bound",
# arch/x86/kernel/io_delay.c), and measured IN from a PC's UART or port 0x80
# is 1-2 us.  vmk charges 1 us per access to every port (mapped or not: an
# unclaimed cycle still goes out to LPC and ends in a SYNC time-out or a
# master abort).
#
# Why a cost and not "spin skipping" (detecting a guest that re-reads a status
# register that cannot change before the device's next event, and jumping the
# clock there): both were measured on a multiboot kernel that polls 300 bytes
# out at 115200 baud and then waits 10 PIT ticks with HLT (Machine.run only,
# a loaded 2-core host): no cost, ~26 M instructions and 26-59 s; 1 us per
# access, 148,845 instructions, 25,973 charged accesses, 0.30-0.44 s (0.21 s
# with a CPU hook that shortens the slice's budget instead of ending it: not
# in cpu.py yet); a spin-skipping prototype, 0.015 s.  Spin skipping is exact
# only if the loop provably has no effect but time: "the same registers at
# every read" is checkable in the hook, but a loop that also writes memory (a
# timeout or statistics variable) cannot be told apart without a write hook on
# every store, and a loop that counts a timeout down in a register (Linux's
# serial8250 wait_for_xmitr, most real drivers) never repeats its state and is
# not sped up at all.  The cost is exact for every loop, deterministic (a
# function of the instruction stream), gives a polling guest the number of
# reads it makes on hardware (85-86 per byte here), and costs an add per access.
IO_COST_PC_NS = 1_000


class Why(Enum):
    """Why Machine.run returned."""
    EXIT = "exit"                   # isa-debug-exit or an explicit exit
    TIME_LIMIT = "time-limit"       # the virtual-time limit was reached
    STOPPED = "stopped"             # stop() or a stop condition (tests, debugger)
    BREAKPOINT = "breakpoint"       # a debugger breakpoint/watchpoint (tools/)
    DEAD = "dead"                   # HLT with IF=0, or halted with nothing that can wake it
    TRIPLE_FAULT = "triple-fault"
    ERROR = "error"                 # emulation error (unmapped memory, ...)
    INTERRUPTED = "interrupted"     # Ctrl-C on the host
    RESET = "reset"                 # the guest reset the machine (0xCF9, i8042 0xFE, port 0x92)


@dataclass(slots=True)
class RunResult:
    why: Why
    message: str = ""
    exit_status: int | None = None


@dataclass(slots=True)
class MachineConfig:
    mem: int = 128 << 20
    ns_per_insn: int = 1            # icount: virtual ns per retired instruction
    quantum: int = 1_000_000        # max instructions per slice (host responsiveness)
    serial: list[CharDev] = field(default_factory=list)     # COM1, COM2 back ends
    debugcon: CharDev | None = None
    log: Callable[[str], None] | None = None
    # Idle time follows the host clock (QEMU's icount sleep=on): for people at
    # a terminal. Off, a halted CPU jumps straight to its next timer (tests).
    realtime_idle: bool = False
    # COM1/COM2 transmit timing: "baud" (the PC16550D: bytes leave at the
    # programmed rate) or "instant" (QEMU: at the THR write, IRQ not gated on OUT2).
    serial_timing: SerialTiming | str = SerialTiming.BAUD
    # A load or store to a physical address with no RAM or device behind it: True
    # (QEMU, a PC) reads 0 and drops the write, reported once per 2 MiB; False
    # stops the machine with a report (Why.ERROR), for hunting wild pointers.
    unassigned_ok: bool = True
    # CPUs (1..255): each its own Unicorn instance over the same RAM, APIC IDs 0..N-1 as the
    # MP table and MADT list them; CPU 0 boots, the others wait for INIT-SIPI-SIPI (machine/smp.py).
    cpus: int = 1
    # With cpus > 1: one CPU's turn in the round-robin, in virtual ns (machine/smp.py).
    smp_quantum_ns: int = SMP_QUANTUM_NS
    # The RTC's date at virtual time 0 (seconds since 1970, UTC; default 2000-01-01T00:00:00),
    # and the 128 CMOS bytes to start with (a reboot keeps them; None: what SeaBIOS leaves).
    rtc_base: int = DEFAULT_BASE
    cmos: bytes | None = None
    # IDE disks by QEMU index: 0/1 primary master/slave, 2/3 secondary master/slave (None: absent).
    drives: list[DiskImage | None] = field(default_factory=list)
    # Virtual ns an IN/OUT takes beyond its instruction's ns (the bus cycle);
    # 0 (QEMU's icount: I/O is free) keeps every instruction at ns_per_insn;
    # IO_COST_PC_NS is the PC's value (vmk boot's default, --io-cost).
    io_cost_ns: int = 0
    # The same for guest loads/stores to an MMIO window, by window name
    # ("lapic", "ioapic"); windows not named cost nothing.
    mmio_cost_ns: dict[str, int] = field(default_factory=dict)
    # A machine/trace.py Tracer to report to (IRQ lines, deliveries, EOIs; pid 0 reads
    # Machine.tracer for its own events); None: nothing is traced and nothing costs.
    tracer: Tracer | None = None


class InterruptSink(Protocol):
    """Where interrupts and CPU events go: the guest IDT or the HAL."""

    def deliver(self, vector: int, *, error_code: int | None = None, software: bool = False,
                external: bool = True, return_rip: int | None = None, cr2: int | None = None) -> None: ...


class Machine:
    """A deterministic single-CPU PC."""

    def __init__(self, config: MachineConfig | None = None) -> None:
        cfg = config or MachineConfig()
        self.config = cfg
        self.log_lines: list[str] = []
        self.log = cfg.log or self.log_lines.append
        self.ns_per_insn = cfg.ns_per_insn
        if self.ns_per_insn < 1:
            raise ValueError("icount must be at least 1 ns per instruction")
        self.clock = Clock()
        self.cpu = CPU()
        self.ram = RAM(self.cpu.uc, cfg.mem)
        self.cpu.attach_ram(self.ram.host_address, self.ram.size)
        if cfg.io_cost_ns < 0:
            raise ValueError(f"an I/O port access cannot cost {cfg.io_cost_ns} ns")
        # --- SMP (issue 12): CPUs 1..N-1, each its own Unicorn over the same RAM (machine/smp.py).
        if not 1 <= cfg.cpus <= MAX_CPUS:
            raise ValueError(f"{cfg.cpus} CPUs: a PC with xAPICs has 1 to {MAX_CPUS} (8-bit APIC IDs, 0xFF broadcast)")
        if cfg.smp_quantum_ns < self.ns_per_insn:
            raise ValueError(f"an SMP turn of {cfg.smp_quantum_ns} ns is shorter than one instruction")
        self.cpus = [self.cpu] + [CPU(apic_id=k, bsp=False) for k in range(1, cfg.cpus)]
        for ap in self.cpus[1:]:
            ap.uc.mem_map_ptr(0, self.ram.size, UC_PROT_ALL, self.ram.host_address)
            ap.attach_ram(self.ram.host_address, self.ram.size)
        self.mmio = MmioBus(self.cpu.map_mmio if cfg.cpus == 1 else self._map_mmio_all, self.clock.charge)
        self.ports = PortBus(self.log, cfg.io_cost_ns)
        self._port_cost = self.ports.cost
        self.instructions = 0
        self._exit_status: int | None = None
        self._stop_requested: str | None = None
        self._reset_source = ""
        self._dev_log = self.log

        # --- interrupt controllers
        self.isa_irq = [IrqLine(f"irq{n}") for n in range(16)]
        self.pic = PICPair(log=self._tagged("pic"))
        self.lapic = LocalAPIC(self.clock, log=self._tagged("lapic"))
        # SMP: one local APIC per CPU on the APIC bus, which also routes the IO-APIC's messages.
        self.lapics = [self.lapic] + [LocalAPIC(self.clock, log=self._tagged(f"lapic{k}"), apic_id=k, bsp=False)
                                      for k in range(1, cfg.cpus)]
        self.apic_bus = None if cfg.cpus == 1 else ApicBus(
            self.lapics, init=self._smp_init, startup=self._smp_startup, received=self._smp_ipi_received,
            log=self._tagged("apic-bus"))
        # Version 0x20 (with the EOI register), QEMU's default for current pc machines.
        self.ioapic = IOAPIC(self.lapic.accept, log=self._tagged("ioapic"), version=0x20,
                             route=None if self.apic_bus is None else self.apic_bus.ioapic_message)
        for k, lapic in enumerate(self.lapics):
            lapic.eoi_broadcast = self.ioapic.eoi
            lapic.on_change = self._interrupt_became_pending if cfg.cpus == 1 else \
                (lambda k=k: self._smp_interrupt_pending(k))
        self.lapic.extint_ack = self.pic.acknowledge
        self.pic.intr.connect(self.lapic.set_lint0)
        for n, line in enumerate(self.isa_irq):
            line.connect(lambda level, n=n: self.pic.set_irq(n, level))
            pin = IOAPIC_PIN_OF_ISA_IRQ0 if n == 0 else n
            line.connect(lambda level, pin=pin: self.ioapic.set_irq(pin, level or self._hpet_level_at(pin)))

        # --- devices
        # --- PC chipset (issue 12): RTC/CMOS, PCI configuration, i8042, port 0x92, HPET.
        # IRQ0 and IRQ8 come from the PIT and the RTC, or from HPET timers 0 and 1 in legacy
        # replacement mode (HPET spec 1.0a, 2.3.2); an HPET timer routed to an IO-APIC pin is
        # ORed with the ISA line on that pin.
        self.pit_irq, self.rtc_irq = IrqLine("pit"), IrqLine("rtc")
        hpet_legacy = (IrqLine("hpet0"), IrqLine("hpet1"))
        self.hpet_gsi = {IOAPIC_PIN_OF_ISA_IRQ0: IrqLine("hpet-gsi2")}
        self._hpet_legacy = False
        for src, hpet_line, irq in ((self.pit_irq, hpet_legacy[0], 0), (self.rtc_irq, hpet_legacy[1], RTC_IRQ)):
            src.connect(lambda level, irq=irq: None if self._hpet_legacy else self.isa_irq[irq].set(level))
            hpet_line.connect(lambda level, irq=irq: self.isa_irq[irq].set(level) if self._hpet_legacy else None)
        for pin, line in self.hpet_gsi.items():
            line.connect(lambda level, pin=pin: self.ioapic.set_irq(pin, level or self._isa_level_at(pin)))
        self.rtc = RTC(self.clock, self.rtc_irq, base=cfg.rtc_base, log=self._tagged("rtc"),
                       cmos=cfg.cmos if cfg.cmos is not None else bios_cmos_bytes(cfg.mem))
        self.pci = PciHost(self.request_reset, log=self._tagged("pci"))
        self.i8042 = I8042(self.isa_irq[KBD_IRQ], self.isa_irq[AUX_IRQ], self.request_reset,
                           log=self._tagged("i8042"))
        self.port92 = Port92(self.request_reset, log=self._tagged("port92"))
        self.hpet = HPET(self.clock, hpet_legacy, self.hpet_gsi, on_legacy=self._set_hpet_legacy,
                         log=self._tagged("hpet"))
        self.pit = PIT8254(self.clock, self.pit_irq, log=self._tagged("pit"))
        self.port61 = SystemControlPortB(self.pit, log=self._tagged("port61"))
        serial = list(cfg.serial) + [NullChar() for _ in range(2 - len(cfg.serial))]
        timing = SerialTiming(cfg.serial_timing)       # ValueError for a bad name, before anything runs
        self.uarts = [UART16550(self.clock, self.isa_irq[irq], serial[i], log=self._tagged(f"com{i + 1}"),
                                name=f"COM{i + 1}", timing=timing)
                      for i, (base, irq) in enumerate(COM_PORTS)]
        self.debug_exit = DebugExit(self.exit)
        self.debugcon_dev = cfg.debugcon or NullChar()
        self.debugcon = DebugCon(lambda data: self.debugcon_dev.write(data, self.clock.now))

        ports = self.ports
        ports.map(0x20, 2, self.pic.master, "pic-master")
        ports.map(0xA0, 2, self.pic.slave, "pic-slave")
        ports.map(0x4D0, 1, self.pic.elcr_master, "elcr-master")
        ports.map(0x4D1, 1, self.pic.elcr_slave, "elcr-slave")
        ports.map(0x40, 4, self.pit, "pit")
        ports.map(0x61, 1, self.port61, "port61")
        for i, (base, _) in enumerate(COM_PORTS):
            ports.map(base, 8, self.uarts[i], f"com{i + 1}")
        ports.map(0xF4, 4, self.debug_exit, "isa-debug-exit")
        ports.map(0xE9, 1, self.debugcon, "debugcon")
        ports.map(0x80, 1, _PostCode(), "post")
        # ACPI PM1a/PM timer at the PIIX4 PM base SeaBIOS gives it; SCI on ISA IRQ 9;
        # an S5 request powers off (exit status 0, as QEMU).
        self.acpi_pm = AcpiPm(self.clock, self.isa_irq[ACPI_SCI_IRQ], lambda: self.exit(0),
                              log=self._tagged("acpi"))
        ports.map(ACPI_PM_BASE, PM_IO_SIZE, self.acpi_pm, "acpi-pm")
        mmio_cost = dict(cfg.mmio_cost_ns)
        self._lapic_cost = mmio_cost.pop("lapic", 0)
        self.mmio.map(LAPIC_BASE, 0x1000, self.lapic, "lapic", self._lapic_cost)

        # --- IDE (PIIX legacy ports) and VGA text mode
        drives = list(cfg.drives) + [None] * (4 - len(cfg.drives))
        self.ide = [IDEChannel(self.isa_irq[irq], (drives[2 * i], drives[2 * i + 1]), log=self._tagged(f"ide{i}"),
                               name=f"ide{i}") for i, (_, _, irq) in enumerate((PRIMARY, SECONDARY))]
        for i, (cmd_base, ctl_port, _) in enumerate((PRIMARY, SECONDARY)):
            ports.map(cmd_base, 8, self.ide[i], f"ide{i}")
            ports.map(ctl_port, 1, self.ide[i].control, f"ide{i}-control")
        ram_buf = self.ram.buf
        vram = (lambda off, n: ram_buf[TEXT_BASE + off:TEXT_BASE + off + n]) \
            if self.ram.size >= TEXT_BASE + TEXT_WINDOW else None
        self.vga = VGA(self.clock, vram, log=self._tagged("vga"))
        ports.map(VGA_PORT_BASE, VGA_PORT_COUNT, self.vga, "vga")
        self.mmio.map(IOAPIC_BASE, 0x1000, self.ioapic, "ioapic", mmio_cost.pop("ioapic", 0))
        if mmio_cost:
            raise ValueError(f"no MMIO window named {', '.join(sorted(mmio_cost))} (lapic, ioapic)")
        ports.map(0x70, 2, self.rtc, "rtc")
        ports.map(0xCF8, 8, self.pci, "pci-config")
        ports.map(0x60, 1, _Offset(self.i8042, 0), "i8042-data")
        ports.map(0x64, 1, _Offset(self.i8042, 4), "i8042-status")
        ports.map(0x92, 1, self.port92, "port92")
        self.mmio.map(HPET_BASE, 0x1000, self.hpet, "hpet")

        # --- CPU wiring
        for cpu in self.cpus:
            cpu.port_in = self._port_in
            cpu.port_out = self._port_out
            cpu.rdtsc = self.clock.read                  # the TSC counts virtual ns (1 GHz)
            cpu.set_time_at(self.clock.at, self.ns_per_insn)   # the same time, for RDTSC in C
            cpu.cpuid = self._cpuid
            cpu.insn_emu.log = self._tagged("cpu" if cpu.bsp else f"cpu{cpu.apic_id}")
            cpu.fetch_fault = self._fetch_fault
            cpu.unassigned_ok = cfg.unassigned_ok
            cpu.unassigned_log = self._tagged("memory")
        self.idt = IdtSink(self.cpu, self.ram.buf, self.ram.size, self._tagged("cpu"))
        self.sink: InterruptSink = self.idt
        # SMP: the CPUs in turn order; self.cpu/lapic/idt/sink are the running one's (_select).
        self.processors: list[Processor] = []
        self._cpuid1: tuple[int, int, int, int] | None = None
        if cfg.cpus > 1:
            self.processors = [Processor(0, self.cpu, self.lapic, self.idt)] + [
                Processor(k, self.cpus[k], self.lapics[k],
                          IdtSink(self.cpus[k], self.ram.buf, self.ram.size, self._tagged(f"cpu{k}")))
                for k in range(1, cfg.cpus)]
            self._current = self.processors[0]
            self._cpuid1 = smp.native_cpuid(1)
        self.port_allowed: Callable[[int, int], bool] = self._port_allowed_iopl
        # The running CPU's live hflags word: the IOPL policy reads the CPL
        # there (no register read per IN/OUT; at CPL 0 nothing else is read).
        self._hflags = self.cpu.live_hflags
        self.interrupts_taken = 0
        self._io_fault_rax: int | None = None     # RAX before a faulting IN (restored: the fault wins)
        self._pollers: list[CharDev] = [c for c in serial if c.fileno() is not None]
        self._next_poll = 0.0
        self._host_ref = 0.0
        self._virt_ref = 0
        # hooks for tools (debugger): called with the machine after each slice, may stop
        self.after_slice: Callable[[], None] | None = None
        self.slice_limit: Callable[[], int | None] | None = None
        # debugger single step of one CPU of several (--smp): only this one runs (smp.run)
        self.run_only: Processor | None = None
        # --smp: (CPU index, end of its turn) of a turn a run ended in; the next run goes on there
        self.turn_at: tuple[int, int] | None = None
        # debugger single step with `step-irq off`: keep external interrupts pending
        self.hold_interrupts = False
        self.tracer = cfg.tracer
        if self.tracer is not None:
            self._attach_tracer(self.tracer)

    def _attach_tracer(self, tracer: Tracer) -> None:
        """Hand the tracer to what reports to it: the IRQ lines (ISA IRQ 0-15, and the PIT
        and RTC outputs before the HPET's legacy switch) and the local APIC (EOIs)."""
        tracer.attach(self.clock)
        for line in [*self.isa_irq, self.pit_irq, self.rtc_irq]:
            line.tracer = tracer
            tracer.add_line(line.name, line.level)
        for lapic in self.lapics:
            lapic.tracer = tracer

    # ------------------------------------------------------------------ helpers
    def _tagged(self, tag: str) -> Callable[[str], None]:
        return lambda msg: self.log(f"{tag}: {msg}")

    @property
    def now(self) -> int:
        return self.clock.now

    def exit(self, status: int) -> None:
        """End the run with a process exit status (isa-debug-exit)."""
        self._exit_status = status
        self._stop_requested = _EXIT
        self.cpu.request_stop()

    def add_host_input(self, source) -> None:
        """Also poll ``source`` (``fileno()``, ``eof``, ``pump()``, like a CharDev) for
        host input, including while the CPU idles (a debugger's socket)."""
        self._pollers.append(source)

    def remove_host_input(self, source) -> None:
        if source in self._pollers:
            self._pollers.remove(source)

    @property
    def stop_pending(self) -> bool:
        """A stop was asked for and the run loop has not returned yet."""
        return self._stop_requested is not None

    def stop(self, reason: str = "stopped") -> None:
        """Ask the run loop to return at the next instruction boundary (the first reason given wins)."""
        if self._stop_requested is None:
            self._stop_requested = reason
        self.cpu.request_stop()

    def request_reset(self, source: str) -> None:
        """A device pulled the reset line: the run ends with Why.RESET (``vmk boot`` reboots)."""
        if self._stop_requested is None:
            self._reset_source = source
        self.stop(_RESET)

    def _set_hpet_legacy(self, on: bool) -> None:
        """HPET legacy replacement: IRQ0 and IRQ8 follow HPET timers 0 and 1 instead of the PIT and RTC."""
        self._hpet_legacy = on
        for irq, src in ((0, self.pit_irq), (RTC_IRQ, self.rtc_irq)):
            self.isa_irq[irq].set(False if on else src.level)

    def _isa_level_at(self, pin: int) -> bool:
        if pin == IOAPIC_PIN_OF_ISA_IRQ0:
            return self.isa_irq[0].level or self.isa_irq[2].level
        return 0 < pin < len(self.isa_irq) and self.isa_irq[pin].level

    def _hpet_level_at(self, pin: int) -> bool:
        line = self.hpet_gsi.get(pin)
        return line is not None and line.level

    # ------------------------------------------------------------------ SMP (machine/smp.py)
    def _map_mmio_all(self, base: int, size: int, read: Callable, write: Callable) -> None:
        """Map a device window into every CPU's Unicorn; at LAPIC_BASE each CPU gets its own APIC."""
        for k, cpu in enumerate(self.cpus):
            if base == LAPIC_BASE and k > 0:
                lapic, cost, charge = self.lapics[k], self._lapic_cost, self.clock.charge
                if cost:
                    def read(off: int, n: int, lapic=lapic) -> int:
                        value = lapic.read(off, n)
                        charge(cost)
                        return value

                    def write(off: int, n: int, value: int, lapic=lapic) -> None:
                        lapic.write(off, n, value)
                        charge(cost)
                else:
                    read, write = lapic.read, lapic.write
            cpu.map_mmio(base, size, read, write)

    def _select(self, p: Processor) -> None:
        """Make ``p`` the CPU the machine's helpers act on (cpu, lapic, idt, sink, the clock's stops)."""
        cur = self._current
        if cur is not p:
            cur.sink = self.sink               # a sink installed on the machine (a HAL) stays with its CPU
            self._current = p
            self.cpu, self.lapic, self.idt, self.sink = p.cpu, p.lapic, p.idt, p.sink
            self._hflags = p.cpu.live_hflags   # the port bus's CPL is the running CPU's
        cpu, nspi, clock = p.cpu, self.ns_per_insn, self.clock
        clock.preempt = cpu.request_stop
        clock.shorten = lambda t: cpu.limit_slice(max(0, (t - clock.now) // nspi))   # noqa: E731

    def _smp_interrupt_pending(self, k: int) -> None:
        """LAPIC ``k``: an interrupt may be deliverable; only the running CPU is stopped
        (the others look at their APIC at the start of their turn)."""
        if self.cpu is self.cpus[k]:
            self._interrupt_became_pending()

    def _smp_init(self, k: int) -> None:
        """INIT to CPU ``k``: its APIC resets and it waits for SIPI (SDM §9.4)."""
        p = self.processors[k]
        if k == 0:
            self.log(f"apic-bus: INIT to the BSP not modelled (no BIOS to reset into), t={self.clock.now} ns")
            return
        p.lapic.init_reset()
        p.state = ApState.WAIT_FOR_SIPI
        p.cpu.halted = False
        p.cpu.event = None
        if self.cpu is p.cpu:
            p.cpu.request_stop()

    def _smp_startup(self, k: int, vector: int) -> None:
        """STARTUP to CPU ``k``: if it waits for SIPI, it starts in real mode at vector << 12."""
        p = self.processors[k]
        if p.state is not ApState.WAIT_FOR_SIPI:
            return                              # a second SIPI, or one to a running CPU: ignored
        smp.start_at_sipi(p.cpu, vector, self._cpuid1[0] if self._cpuid1 else 0)
        p.state = ApState.RUNNING
        p.sipis += 1

    def _smp_ipi_received(self, k: int) -> None:
        self.processors[k].flush_pending = True

    def _interrupt_became_pending(self) -> None:
        """LAPIC: an interrupt may be deliverable. Stop the slice now if IF=1;
        with IF=0, arm the window hook so the slice stops once IF is set."""
        cpu = self.cpu
        if not cpu.running:
            return
        if cpu.rflags & EFLAGS.IF:
            cpu.request_stop()
        else:
            cpu.arm_interrupt_window()

    # ------------------------------------------------------------------ ports
    def _port_in(self, port: int, size: int) -> int:
        if not self.port_allowed(port, size):
            self._io_fault()
            return 0
        value = self.ports.read(port, size)
        cost = self._port_cost[port & 0xFFFF]
        if cost:
            self.clock.charge(cost)      # the device answered at the start of the cycle; the CPU waits it out
        return value

    def _port_out(self, port: int, size: int, value: int) -> None:
        if not self.port_allowed(port, size):
            self._io_fault()
            return
        self.ports.write(port, size, value)
        cost = self._port_cost[port & 0xFFFF]
        if cost:
            self.clock.charge(cost)

    def _io_fault(self) -> None:
        # Quirk: Unicorn does not check I/O permission (gen_check_io returns
        # early); the bus does, and raises #GP(0) on the IN/OUT instruction.
        rip = self.cpu.rip
        self.cpu.event = CpuEvent(13, 0, False, rip, rip)
        self._io_fault_rax = self.cpu.reg(Reg.RAX)
        self.cpu.request_stop(Stop.EVENT)

    def _port_allowed_iopl(self, port: int, size: int) -> bool:
        """Protected-mode I/O permission: CPL <= IOPL, else the TSS I/O bitmap (SDM §19.5)."""
        cpl = self._hflags.value & 3
        if cpl == 0:
            return True
        iopl = (self.cpu.rflags >> 12) & 3
        if cpl <= iopl:
            return True
        tr = self.cpu.table_regs()["tr"]
        _, base, limit, _ = tr
        try:
            pg = self.paging()
            if limit < 0x67:
                return False
            bm = int.from_bytes(self.read_linear(base + 0x66, 2, pg=pg), "little")
            first, last = port >> 3, (port + size - 1) >> 3
            if bm + last + 1 > limit:
                return False
            bits = int.from_bytes(self.read_linear(base + bm + first, last - first + 1, pg=pg), "little")
            mask = ((1 << size) - 1) << (port & 7)
            return not (bits & mask)
        except PageFault:
            return False

    def _cpuid(self, leaf: int, sub: int) -> tuple[int, int, int, int] | None:
        if leaf == 0x4000_0000:
            sig = b"vmkVMKvmkVMK"
            return (0x4000_0010, int.from_bytes(sig[0:4], "little"), int.from_bytes(sig[4:8], "little"),
                    int.from_bytes(sig[8:12], "little"))
        if leaf == 0x4000_0010:
            # VMware-style timing leaf: TSC and LAPIC bus frequencies in kHz.
            khz = 1_000_000 // self.ns_per_insn
            return (khz, 1_000_000, 0, 0)
        if leaf == 1 and self._cpuid1 is not None:
            # SMP: EBX[31:24] is the initial APIC ID of the CPU that executes it.
            return smp.cpuid_leaf1(self._cpuid1, self.cpu)
        return None

    # ------------------------------------------------------------------ memory by linear address
    def _fetch_fault(self, rip: int) -> int | None:
        """The #PF error code an instruction fetch at ``rip`` raises now, or None."""
        user = (self.cpu.cs_and_rflags()[0] & 3) == 3
        try:
            translate(self.ram.buf, self.ram.size, self.paging(), rip, user=user, set_ad=False, fetch=True)
        except PageFault as e:
            return e.error_code
        return None

    def paging(self, cpu: CPU | None = None) -> Paging:
        """The paging state of ``cpu`` (default: the running CPU)."""
        b = (cpu or self.cpu).ctx_read()
        hf = struct.unpack_from("<I", b, Ctx.HFLAGS)[0]
        return Paging(struct.unpack_from("<Q", b, Ctx.CR0)[0], struct.unpack_from("<Q", b, Ctx.CR3)[0],
                      struct.unpack_from("<Q", b, Ctx.CR4)[0], bool(hf & HF.LMA))

    def translate(self, linear: int, write: bool = False, user: bool = False,
                  pg: Paging | None = None) -> int:
        """Linear → physical through the guest page tables (raises PageFault)."""
        return translate(self.ram.buf, self.ram.size, pg or self.paging(), linear, write, user, set_ad=False)

    def read_linear(self, addr: int, size: int, pg: Paging | None = None) -> bytes:
        pg = pg or self.paging()
        out = bytearray()
        while size > 0:
            n = min(size, 0x1000 - (addr & 0xFFF))
            pa = self.translate(addr, pg=pg)
            out += self.read_physical(pa, n)
            addr += n
            size -= n
        return bytes(out)

    def write_linear(self, addr: int, data: bytes, pg: Paging | None = None) -> None:
        pg = pg or self.paging()
        pos = 0
        while pos < len(data):
            n = min(len(data) - pos, 0x1000 - ((addr + pos) & 0xFFF))
            pa = self.translate(addr + pos, pg=pg)
            self.write_physical(pa, data[pos:pos + n])
            pos += n
        if data:
            # Code may have been patched (debugger): drop stale translations.
            self.cpu.uc.ctl_remove_cache(addr & ~0xFFF, (addr + len(data) + 0xFFF) & ~0xFFF)

    def read_physical(self, addr: int, size: int) -> bytes:
        if self.ram.contains(addr, size):
            return self.ram.read(addr, size)
        win = self.mmio.find(addr)
        if win is not None:
            base, dev, _ = win
            return b"".join(dev.read(addr - base + i, 1).to_bytes(1, "little") for i in range(size))
        raise IndexError(f"physical address {addr:#x} is not RAM")

    def write_physical(self, addr: int, data: bytes) -> None:
        if self.ram.contains(addr, len(data)):
            self.ram.write(addr, data)
            return
        raise IndexError(f"physical address {addr:#x} is not RAM")

    # ------------------------------------------------------------------ interrupts
    def _take_event(self) -> RunResult | None:
        ev = self.cpu.event
        self.cpu.event = None
        if ev.vector == 13 and self._io_fault_rax is not None:
            self.cpu.set_reg(Reg.RAX, self._io_fault_rax)
            self._io_fault_rax = None
        if self.tracer is not None:
            self.tracer.irq_delivered(ev.vector, external=False)
        try:
            self.sink.deliver(ev.vector, error_code=ev.error_code, software=ev.is_int, external=False,
                              return_rip=ev.next_rip if ev.is_int else ev.rip,
                              cr2=ev.cr2 if ev.vector == 14 else None)
        except TripleFault as tf:
            return RunResult(Why.TRIPLE_FAULT, f"{tf} at RIP {ev.rip:#x} "
                             f"({EXCEPTION_NAMES.get(ev.vector, ev.vector)}), t={self.clock.now} ns")
        return None

    def _take_interrupt(self) -> RunResult | None:
        cpu = self.cpu
        w = cpu.interrupt_window()
        if w != _WINDOW_OPEN:
            return None if w == _WINDOW_IF_CLEAR else _SHADOW
        vector = self.lapic.acknowledge()
        self.interrupts_taken += 1
        cpu.halted = False
        if self.tracer is not None:
            self.tracer.irq_delivered(vector)
        try:
            self.sink.deliver(vector, external=True)
        except TripleFault as tf:
            return RunResult(Why.TRIPLE_FAULT, f"{tf} (interrupt vector {vector}), t={self.clock.now} ns")
        return None

    # ------------------------------------------------------------------ run loop
    def run(self, until: int | None = None, max_instructions: int | None = None) -> RunResult:
        """Run until ``until`` (absolute virtual ns), an exit, a stop or an error.

        When the run ends for good (isa-debug-exit, HLT with IF=0 or nothing
        left to wake the CPU, a triple fault, an emulation error), every byte
        the guest gave a UART reaches its back end before this returns, stamped
        with the time it would have left the line.  A time limit, a stop or a
        breakpoint can be resumed, so the transmitters are left as they are
        (``vmk boot`` flushes them itself after ``--max-time``)."""
        r = self._run(until, max_instructions) if not self.processors else smp.run(self, until, max_instructions)
        if r.why in _FINAL:
            for uart in self.uarts:
                uart.flush_tx()
        return r

    def _run(self, until: int | None, max_instructions: int | None) -> RunResult:
        cpu = self.cpu
        clock = self.clock
        lapic = self.lapic
        nspi = self.ns_per_insn
        quantum = self.config.quantum
        insn_limit = None if max_instructions is None else self.instructions + max_instructions
        self._stop_requested = None
        clock.preempt = cpu.request_stop
        clock.shorten = lambda t: cpu.limit_slice(max(0, (t - clock.now) // nspi))   # noqa: E731
        self._host_ref, self._virt_ref = time.monotonic(), clock.now
        in_slice = cpu.slice_source(nspi)
        try:
            # This is our event loop.
            while True:
                cpu.invalidate_ctx()             # tools may have written registers between slices
                clock.run_due()
                if self._stop_requested is not None:
                    return self._stopped()
                if cpu.event is not None:
                    r = self._take_event()
                    if r is not None:
                        return r
                    continue                       # the sink may have stopped the machine
                shadow = False
                if lapic.pending() and not self.hold_interrupts:
                    r = self._take_interrupt()
                    if r is _SHADOW:
                        shadow = True              # run the one shadowed instruction, then deliver
                    elif r is not None:
                        return r
                    elif self._stop_requested is not None:
                        return self._stopped()     # the sink stopped the machine
                    elif lapic.pending() and not (cpu.rflags & _IF):
                        cpu.arm_interrupt_window()    # held by IF=0: stop as soon as IF is set
                    elif cpu.halted and lapic.pending():
                        continue                   # the sink's handler raised another: take it before idling
                now = clock._base
                if until is not None and now >= until:
                    return RunResult(Why.TIME_LIMIT, f"virtual time limit reached at {now} ns")
                deadline = clock.next_deadline()
                if cpu.halted:
                    r = self._idle(deadline, until)
                    if r is not None:
                        return r
                    continue
                budget = 1 if shadow else quantum
                limit = deadline                   # the slice must not run past it (I/O costs: Clock.charge)
                if deadline is not None:
                    n = -(-(deadline - now) // nspi)
                    if n < budget:
                        budget = n if n > 1 else 1
                if until is not None:
                    n = -(-(until - now) // nspi)
                    if n < budget:
                        budget = n if n > 1 else 1
                    if limit is None or until < limit:
                        limit = until
                if insn_limit is not None:
                    if self.instructions >= insn_limit:
                        return RunResult(Why.STOPPED, "instruction limit reached")
                    budget = min(budget, insn_limit - self.instructions)
                if self.slice_limit is not None:
                    lim = self.slice_limit()
                    if lim is not None:
                        budget = min(budget, lim)
                clock.begin_slice(in_slice, now + budget * nspi, limit)
                try:
                    executed, why = cpu.run(budget)
                except BaseException:
                    clock.end_slice(cpu.retired_in_slice() * nspi)
                    raise
                clock.end_slice(executed * nspi)
                self.instructions += executed
                if why is _HALT:
                    if not (cpu.rflags_after & _IF) and not lapic.nmi_pending:
                        self._drain()
                        if self._stop_requested is not None:
                            return self._stopped()
                        return RunResult(Why.DEAD, f"CPU halted with interrupts disabled at RIP {cpu.rip - 1:#x}, "
                                         f"t={clock.now} ns: nothing can wake it")
                elif why == Stop.ERROR:
                    return RunResult(Why.ERROR, f"{cpu.error}, t={clock.now} ns")
                if self.after_slice is not None:
                    self.after_slice()
                if self._pollers:
                    self._poll_host(False)
        except KeyboardInterrupt:
            return RunResult(Why.INTERRUPTED, f"interrupted at t={clock.now} ns")
        finally:
            clock.preempt = _nothing
            clock.shorten = cannot_shorten

    def _drain(self, span: int = 10_000_000, max_events: int = 10_000) -> None:
        """The CPU is dead: let devices finish what is in flight (bytes in a
        UART shift register), for at most ``span`` ns of virtual time."""
        clock = self.clock
        end = clock.now + span
        for _ in range(max_events):
            d = clock.next_deadline()
            if d is None or d > end or self._stop_requested is not None:
                break
            clock.advance_to(d)
            clock.run_due()

    def _stopped(self) -> RunResult:
        reason = self._stop_requested
        self._stop_requested = None
        if reason == _EXIT:
            return RunResult(Why.EXIT, f"guest exit with status {self._exit_status}", self._exit_status)
        if reason == "breakpoint":
            return RunResult(Why.BREAKPOINT, "breakpoint")
        if reason == _RESET:
            return RunResult(Why.RESET, f"machine reset by {self._reset_source}, t={self.clock.now} ns")
        return RunResult(Why.STOPPED, reason or "stopped")

    def _idle(self, deadline: int | None, until: int | None) -> RunResult | None:
        """The CPU is halted with IF=1: skip virtual time to the next event."""
        target = deadline
        if until is not None and (target is None or until < target):
            target = until
        if self.config.realtime_idle and target is not None:
            return self._sleep_until(target)
        if self._pollers:
            waited_from = time.monotonic()
            got = self._poll_host(True, block=target is None)
            if target is None and self.config.realtime_idle:
                # Nothing armed, waiting for input (a prompt): virtual time still follows the host
                # clock, by the host time this wait took (not by any lag from before it).
                self.clock.advance_to(self.clock.now + int((time.monotonic() - waited_from) * 1e9))
            if got:
                return None
        if target is None:
            if self._pollers and not all(p.eof for p in self._pollers):
                return None
            return RunResult(Why.DEAD, f"CPU halted at RIP {self.cpu.rip:#x} with no timer armed and no "
                             f"input source: nothing can wake it (t={self.clock.now} ns)")
        self.clock.advance_to(target)
        return None

    def _sleep_until(self, target: int) -> None:
        """Realtime idle: wait on the host until virtual ``target`` is due, or
        until host input arrives (then virtual time is what the host clock says)."""
        now_host = time.monotonic()
        due = self._host_ref + (target - self._virt_ref) / 1e9
        if due - now_host < -0.1:
            # Far behind (the guest computed for a long time): re-anchor, no burst.
            self._host_ref, self._virt_ref = now_host, target
            due = now_host
        delay = due - now_host
        if delay > 0:
            fds = [f for f in (p.fileno() for p in self._pollers if not p.eof) if f is not None]
            ready = []
            if fds:
                try:
                    ready, _, _ = select.select(fds, [], [], delay)
                except (OSError, ValueError):
                    ready = []
            else:
                time.sleep(delay)
            if ready:
                elapsed = int((time.monotonic() - self._host_ref) * 1e9) + self._virt_ref
                self.clock.advance_to(min(max(elapsed, self.clock.now), target))
                self._next_poll = 0.0
                self._poll_host(True)
                return None
        self.clock.advance_to(target)
        return None

    def _poll_host(self, idle: bool, block: bool = False) -> bool:
        """Move host input into the UARTs. Cheap: checked at most every 5 ms of host time."""
        now = time.monotonic()
        if not idle and now < self._next_poll:
            return False
        self._next_poll = now + 0.005
        fds = [p.fileno() for p in self._pollers if not p.eof]
        fds = [f for f in fds if f is not None]
        if not fds:
            return False
        timeout = 0.05 if block else 0
        try:
            ready, _, _ = select.select(fds, [], [], timeout)
        except (OSError, ValueError):
            return False
        if not ready:
            return False
        got = False
        for dev in self._pollers:
            fd = dev.fileno()
            if fd is not None and fd in ready and dev.pump():
                got = True
        return got

    # ------------------------------------------------------------------ snapshots
    def snapshot(self) -> dict:
        """The whole machine: CPU context, RAM, devices, clock. Host back ends are not included."""
        return {
            "cpu": bytes(self.cpu.uc.context_save()),
            "rflags": self.cpu.rflags,
            "halted": self.cpu.halted,
            "ram": bytes(self.ram.buf),
            "clock": self.clock.snapshot(),
            "instructions": self.instructions,
            "devices": {name: dev.snapshot() for name, dev in self._devices().items()},
            "aps": [{"cpu": bytes(p.cpu.uc.context_save()), "halted": p.cpu.halted, "state": p.state.value,
                     "sipis": p.sipis} for p in self.processors[1:]],
            "per_cpu_instructions": [p.instructions for p in self.processors],
            "turn_at": self.turn_at,
        }

    def restore(self, snap: dict) -> None:
        ctx = self.cpu.uc.context_save()
        ctypes.memmove(ctx.context, snap["cpu"], len(snap["cpu"]))
        self.cpu.uc.context_restore(ctx)
        self.cpu.rflags = snap["rflags"]
        self.cpu.halted = snap["halted"]
        self.ram.buf[:] = snap["ram"]
        self.clock.restore(snap["clock"])
        self.instructions = snap["instructions"]
        for name, dev in self._devices().items():
            dev.restore(snap["devices"][name])
        self.cpu.flush_translations()
        self.cpu.flush_tlb()
        for p, n in zip(self.processors, snap.get("per_cpu_instructions", [])):
            p.instructions = n
        self.turn_at = snap.get("turn_at")
        for p, ap in zip(self.processors[1:], snap.get("aps", [])):
            ctx = p.cpu.uc.context_save()
            ctypes.memmove(ctx.context, ap["cpu"], len(ap["cpu"]))
            p.cpu.uc.context_restore(ctx)
            p.cpu.invalidate_ctx()
            p.cpu.halted, p.state = ap["halted"], ApState(ap["state"])
            p.sipis = ap["sipis"]
            p.cpu.flush_translations()
            p.cpu.flush_tlb()

    def _devices(self) -> dict:
        # Restore order matters: sources first (they drive lines on restore),
        # then the controllers, whose own saved state wins.
        return {"pit": self.pit, "port61": self.port61, "com1": self.uarts[0], "com2": self.uarts[1],
                "acpi_pm": self.acpi_pm,
                "rtc": self.rtc, "pci": self.pci, "i8042": self.i8042, "port92": self.port92, "hpet": self.hpet,
                "pic": self.pic, "ioapic": self.ioapic, "lapic": self.lapic,
                "ide0": self.ide[0], "ide1": self.ide[1], "vga": self.vga,
                **{f"lapic{k}": lapic for k, lapic in enumerate(self.lapics) if k}}


_SHADOW = RunResult(Why.STOPPED, "interrupt shadow")
_FINAL = frozenset((Why.EXIT, Why.DEAD, Why.TRIPLE_FAULT, Why.ERROR, Why.RESET))     # runs that cannot go on
_IF = int(EFLAGS.IF)
_HALT = Stop.HALT
_WINDOW_IF_CLEAR, _WINDOW_SHADOW, _WINDOW_OPEN = 0, 1, 2      # CPU.interrupt_window()
_EXIT = "\0debug-exit"        # not a reason anyone passes to stop()
_RESET = "\0reset"


class _Offset:
    """A one-port window of a device whose registers sit at other offsets (i8042: 0x60 and 0x64)."""

    def __init__(self, device, offset: int) -> None:
        self._device = device
        self._offset = offset

    def read(self, offset: int, size: int) -> int:
        return self._device.read(self._offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._device.write(self._offset, size, value)


class _PostCode:
    """Port 0x80: POST codes; guests also use it as a short I/O delay."""
    last = 0

    def read(self, offset: int, size: int) -> int:
        return self.last

    def write(self, offset: int, size: int, value: int) -> None:
        self.last = value & 0xFF


def _nothing() -> None:
    return None
