"""The vmk test kit: boot a kernel (or a few lines of assembly) on a
deterministic machine, drive it in virtual time, and look at it.

    from vmk.testing import Harness

    h = Harness.from_asm('''
        mov dx, 0x3f8
        mov al, 'A'
        out dx, al
        hlt
    ''')
    h.run_for(10_000)                       # virtual ns
    assert h.serial(0).text == "A"

    h = Harness.boot("kernel.elf")
    h.serial(0).write(b"ping\\r", at=2_000_000)   # bytes reach COM1 at t = 2 ms
    line = h.serial(0).wait_line(timeout=50_000_000)
    assert h.irq_counts[0x20] >= 10

Everything is virtual: ``run_for``/``wait_*`` never sleep, and the same test
gives the same instruction count, the same interrupt order and the same output
every time.  The pytest plugin (``vmk.testing.plugin``) adds a ``vmk`` fixture
whose ``boot`` and ``from_asm`` (also spelled ``asm``) are :meth:`Harness.boot`
and :meth:`Harness.from_asm`.
"""
from __future__ import annotations

import functools

from vmk.boot.loader import BootInfo, enter_long_mode, enter_protected_mode, load_kernel
from vmk.machine.chardev import CharDev
from vmk.machine.cpu import GPR_NAMES, Reg
from vmk.machine.pc import Machine, MachineConfig, RunResult, Why
from vmk.machine.trace import Tracer
from vmk.tools.build import assemble_snippet

from .trace import TraceView

__all__ = ["Harness", "SerialPort", "VmkTimeout", "assemble"]

ASM_ORG = 0x100000


class VmkTimeout(AssertionError):
    """A wait_* ran out of virtual time."""


@functools.lru_cache(maxsize=4096)
def assemble(source: str, addr: int = ASM_ORG, bits: int = 64) -> bytes:
    """Assemble with keystone (Intel syntax) at ``addr``; ``ValueError`` with keystone's reason if it
    cannot.  Keystone runs in a child process (``vmk.tools.build.assemble_snippet``): on some input
    (``.text``, ``.data``) keystone 0.9.2 crashes the process, which would end the whole test run.
    Results are cached (assembling is a pure function; the child costs a few ms).  Note keystone
    0.9.2 mis-encodes ``mov reg, [imm]`` (emits RIP-relative): use a register base in test code."""
    return assemble_snippet(source, addr, bits)


class SerialCapture(CharDev):
    """An in-memory serial back end that can stop the machine when text arrives."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.times: list[int] = []
        self.eof = False
        self.on_byte = None

    def write(self, data: bytes, time_ns: int) -> None:
        for b in data:
            self.data.append(b)
            self.times.append(time_ns)
            if self.on_byte is not None:
                self.on_byte(b)

    def fileno(self) -> int | None:
        return None

    def read_available(self) -> bytes:
        return b""

    def close(self) -> None:
        return None


class SerialPort:
    """One UART as a test sees it: what the guest sent, and a way to type."""

    def __init__(self, harness: "Harness", index: int, dev: SerialCapture) -> None:
        self._h = harness
        self.index = index
        self._dev = dev
        self._read_pos = 0

    @property
    def output(self) -> bytes:
        """Every byte the guest has sent on this port so far (waits do not consume it)."""
        return bytes(self._dev.data)

    @property
    def text(self) -> str:
        """:attr:`output` as text, one character per byte (latin-1: no decoding errors)."""
        return self._dev.data.decode("latin-1")

    @property
    def times(self) -> list[int]:
        """Virtual time at which each output byte left the UART."""
        return list(self._dev.times)

    def write(self, data: bytes | str, at: int | None = None) -> None:
        """Feed input to the UART now, or at absolute virtual time ``at``."""
        if isinstance(data, str):
            data = data.encode()
        uart = self._h.machine.uarts[self.index]
        if at is None or at <= self._h.machine.now:
            uart.receive(data)
            return
        t = self._h.machine.clock.timer(lambda: uart.receive(data), name=f"input-com{self.index + 1}")
        t.arm(at)
        self._h._input_timers.append(t)

    def wait_for(self, text: bytes | str, timeout: int) -> int:
        """Run until ``text`` appears in the output (after what earlier waits consumed).

        Returns the virtual time it completed at; raises :class:`VmkTimeout`
        when ``timeout`` ns of virtual time pass first."""
        if isinstance(text, str):
            text = text.encode()
        m = self._h.machine
        deadline = m.now + timeout
        found = self._dev.data.find(text, self._read_pos)
        if found < 0:
            def on_byte(_b: int) -> None:
                if self._dev.data.find(text, max(self._read_pos, len(self._dev.data) - len(text) - 1)) >= 0:
                    m.stop("serial-match")
            self._dev.on_byte = on_byte
            try:
                result = m.run(until=deadline)
            finally:
                self._dev.on_byte = None
            self._h.last_result = result
            found = self._dev.data.find(text, self._read_pos)
            if found < 0:
                raise VmkTimeout(f"{text!r} not seen on COM{self.index + 1} within {timeout} ns "
                                 f"(run ended: {result.why.value}: {result.message}); "
                                 f"output so far: {self.text[-200:]!r}")
        end = found + len(text)
        self._read_pos = end
        return self._dev.times[end - 1]

    def wait_line(self, timeout: int) -> str:
        """Run until a complete line arrives; return it without the line ending."""
        start = self._read_pos
        self.wait_for(b"\n", timeout)
        return self._dev.data[start:self._read_pos - 1].decode("latin-1").rstrip("\r")


class _Regs:
    def __init__(self, machine: Machine) -> None:
        object.__setattr__(self, "_m", machine)

    def __getattr__(self, name: str) -> int:
        try:
            return self._m.cpu.reg(Reg[name.upper()])
        except KeyError:
            raise AttributeError(f"no register {name!r}; known: {', '.join(GPR_NAMES)}, rip, rflags, "
                                 "cr0..cr4, cs..gs") from None

    def __setattr__(self, name: str, value: int) -> None:
        try:
            self._m.cpu.set_reg(Reg[name.upper()], value)
        except KeyError:
            raise AttributeError(f"no register {name!r}") from None


class Harness:
    """A machine under test: a :class:`~vmk.machine.pc.Machine` with both UARTs and the 0xE9 debug
    console captured in memory.

    Build one with :meth:`boot` (a kernel file) or :meth:`from_asm` (assembly in long
    or protected mode); ``Harness(mem=..., icount=..., **MachineConfig fields)`` is an
    empty machine.  Attributes: ``machine``, ``regs`` (``h.regs.rax``, assignable),
    ``debugcon`` (what the guest wrote to port 0xE9: ``.data``), ``boot_info``
    (after :meth:`boot`: entry point, symbols), ``last_result`` (the last run's
    :class:`~vmk.machine.pc.RunResult`).
    """

    def __init__(self, mem: int = 64 << 20, icount: int = 1, trace: bool = False, **config) -> None:
        self._chars = [SerialCapture(), SerialCapture()]
        self.debugcon = SerialCapture()
        if trace:
            config["tracer"] = Tracer()
        self.machine = Machine(MachineConfig(mem=mem, ns_per_insn=icount, serial=list(self._chars),
                                             debugcon=self.debugcon, **config))
        # trace=True: what the machine (and a VM kernel on it) reports, for assertions (testing/trace.py).
        self.trace: TraceView | None = TraceView(self.machine.tracer) if self.machine.tracer is not None else None
        self._ports = [SerialPort(self, i, c) for i, c in enumerate(self._chars)]
        self._input_timers: list = []
        self.regs = _Regs(self.machine)
        self.boot_info: BootInfo | None = None
        self.last_result: RunResult | None = None

    # -- construction
    @classmethod
    def boot(cls, path: str, cmdline: str = "", initrd: list[str] | None = None, **kw) -> "Harness":
        """Load a kernel as ``vmk boot``/QEMU ``-kernel`` does (a Linux bzImage, multiboot ELF32, or
        ELF64 entered in long mode), ready to run: ``vmk boot path --append cmdline --initrd a,b``.

        ``cmdline`` is ``-append`` (the multiboot command line is "KERNEL-PATH ARGS", as on QEMU),
        ``initrd`` a Linux kernel's initial ramdisk or the multiboot modules ("FILE [ARGS]" each);
        ``kw`` go to :class:`Harness` (``mem``, ``icount``, ``trace``) and on to
        :class:`~vmk.machine.pc.MachineConfig` (e.g. ``io_cost_ns``, ``serial_timing``, ``cpus``).
        Symbols are in ``boot_info``."""
        h = cls(**kw)
        h.boot_info = load_kernel(h.machine, path, cmdline, initrd)
        return h

    @classmethod
    def from_asm(cls, source: str, bits: int = 64, org: int = ASM_ORG, **kw) -> "Harness":
        """Assemble ``source`` at ``org`` and start it: long mode with the first
        4 GiB identity-mapped (bits=64) or flat 32-bit protected mode (bits=32)."""
        h = cls(**kw)
        code = assemble(source, org, bits)
        h.machine.write_physical(org, code)
        if bits == 64:
            enter_long_mode(h.machine, org, 0)
        else:
            enter_protected_mode(h.machine, org, 0)
        h.code_org, h.code_end = org, org + len(code)
        return h

    def addrs_of(self, insn: str) -> list[int]:
        """Addresses in the ``from_asm`` code of the instructions that encode like
        ``insn`` (a position-independent instruction)."""
        code = self.machine.read_physical(self.code_org, self.code_end - self.code_org)
        enc = assemble(insn, 0)
        assert enc, f"{insn!r} does not assemble"
        found, pos = [], code.find(enc)
        while pos >= 0:
            found.append(self.code_org + pos)
            pos = code.find(enc, pos + len(enc))
        return found

    def addr_of(self, insn: str) -> int:
        """Address of the one instruction in the ``from_asm`` code that encodes like ``insn``."""
        found = self.addrs_of(insn)
        assert len(found) == 1, f"{insn!r} occurs {len(found)} times in the test code"
        return found[0]

    # -- running
    def run_for(self, ns: int) -> RunResult:
        """Run for ``ns`` virtual nanoseconds, or less if the guest exits, halts for good or faults.

        The result's ``why`` says which (``Why.TIME_LIMIT`` when the time ran out)."""
        self.last_result = self.machine.run(until=self.machine.now + ns)
        return self.last_result

    def run(self, until: int | None = None, max_instructions: int | None = None) -> RunResult:
        """Run until absolute virtual time ``until`` or ``max_instructions`` more instructions (None: no
        limit), or until the guest exits, halts for good or faults."""
        self.last_result = self.machine.run(until=until, max_instructions=max_instructions)
        return self.last_result

    def run_to_end(self, limit: int = 1_000_000_000) -> RunResult:
        """Run until the guest exits, halts for good or faults; fail if ``limit`` ns pass first."""
        r = self.run_for(limit)
        if r.why == Why.TIME_LIMIT:
            raise VmkTimeout(f"guest still running after {limit} ns")
        return r

    # -- looking
    def serial(self, n: int = 0) -> SerialPort:
        """COM1 (``n = 0``) or COM2 (``n = 1``): the guest's output and a way to type."""
        return self._ports[n]

    @property
    def now(self) -> int:
        """The virtual time, in ns since power-on."""
        return self.machine.now

    @property
    def instructions(self) -> int:
        """Instructions the guest has retired so far."""
        return self.machine.instructions

    @property
    def irq_counts(self) -> dict[int, int]:
        """How many times each vector was delivered to the guest."""
        return dict(self.machine.idt.delivered)

    def read(self, addr: int, size: int) -> bytes:
        """Guest memory at a linear address (through the guest's page tables)."""
        return self.machine.read_linear(addr, size)

    def write(self, addr: int, data: bytes) -> None:
        """Store ``data`` at a linear address (through the guest's page tables), as :meth:`read` reads."""
        self.machine.write_linear(addr, data)

    def u64(self, addr: int) -> int:
        """The little-endian 64-bit word at a linear address."""
        return int.from_bytes(self.read(addr, 8), "little")

    def u32(self, addr: int) -> int:
        """The little-endian 32-bit word at a linear address."""
        return int.from_bytes(self.read(addr, 4), "little")
