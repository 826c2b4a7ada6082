"""The GDB remote stub: ``vmk boot IMAGE --gdb [HOST]:PORT [--wait-gdb]``.

A stock gdb (``target remote :1234``) or ``vmk debug`` drives the machine over
TCP with the Remote Serial Protocol.  The stub is thin: framing lives in
``rsp.py``, breakpoints/watchpoints/registers/memory in
``vmk.machine.debug``, what the guest software looks like (threads, kernel
monitor commands) in ``kernelview.py``.  Here: one small handler per packet,
found through dispatch tables, and the server loop.

The server loop (one thread, no nested run loops)
-------------------------------------------------
The stub owns the machine's run loop.  While the machine is *stopped* for the
client, the stub blocks on the socket and answers packets; a resume packet
(``c``, ``s``, ``vCont``) makes it call ``Debug.cont``/``Debug.step``, which run
``Machine.run``.  While the machine runs, the stub polls its sockets between
slices (``Debug.host_poll``, from ``machine.after_slice``, at most every
``POLL_INTERVAL`` of host time) and, while the CPU idles waiting for host
input, through ``machine.add_host_input``:

* 0x03 from the client (Ctrl-C) stops the machine (stop reply ``T02``);
* a client that disconnects is dropped, its breakpoints removed, and the
  machine keeps running;
* a new client connecting to a free-running machine stops it (as QEMU does).

Without a client the machine runs freely; a gdb may attach at any time.
Detaching (``D``) removes every breakpoint and lets the machine run on, except
under ``--wait-gdb`` (QEMU's ``-S``) before any client continued it: then a
client that detaches or disconnects leaves it stopped for the next one.  The
guest exiting ends the session with ``W``; a dead or faulted machine is
reported as a stop (with an ``O`` console line saying why) so it can be
inspected, and ends the session on the next resume.

Robustness: every packet is answered by its handler, by ``E..`` for a
malformed one, by an empty packet for an unknown one; a bad checksum gets
``-``; a client that does not read its replies is dropped after
``SEND_TIMEOUT``.  Nothing a client sends can stop the machine from running
other than the packets meant to.

QEMU's own packets (``qemu.Supported``, ``qemu.sstepbits``, ``qemu.sstep``,
``qemu.PhyMemMode``) and ``monitor info mem|tlb|registers`` answer in QEMU's
words, so pwndbg and GEF take vmk for QEMU in system mode.

Several CPUs (``--smp N``): with the bare-metal view every CPU is a thread
(ids 1..N, as QEMU numbers its vCPUs).  The machine stops as a whole
(all-stop) when any CPU hits a breakpoint or watchpoint, and the stop reply
names that CPU; ``Hg`` selects the CPU whose registers ``g/G/p/P`` and whose
page tables ``m/M/X`` use; a step (``vCont;s:THREAD``) steps that CPU alone
(``Debug.step``).  ``monitor info registers`` is the selected CPU's
(``-a``: every CPU's, as QEMU), ``monitor time`` counts per CPU.

Not supported: non-stop mode, extended-remote (``!``, ``vRun``), ``vFile``,
tracepoints, reverse execution, changing segment selectors.
"""
from __future__ import annotations

import os
import select
import socket
import sys
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

from vmk.machine.cpu import HF
from vmk.machine.debug import (
    PTE_NX,
    REG_INDEX,
    REGISTERS,
    WHERE_REGISTERS,
    BreakKind,
    Debug,
    DebugError,
    StopEvent,
    WatchKind,
)
from vmk.machine.devices.lapic import Lvt
from vmk.machine.pc import Machine, RunResult, Why

from . import rsp
from .kernelview import BareMetalView, KernelView, MonitorCommand
from .units import format_ns, parse_duration

__all__ = ["GdbStub", "Resume", "Signal", "target_xml", "parse_listen_address", "PACKET_SIZE"]

PACKET_SIZE = 0x4000            # advertised PacketSize (bytes of payload we accept)
POLL_INTERVAL = 0.005           # host seconds between socket polls while the machine runs
SEND_TIMEOUT = 5.0              # a client that does not read its replies for this long is dropped
RECV_CHUNK = 65536
POLL_SPIN = 200e-6              # seconds the stopped stub polls for the next packet before it sleeps
_DONTWAIT = socket.MSG_DONTWAIT


class Signal(int, Enum):
    """gdb's signal numbers used in stop replies."""
    INT = 2
    ILL = 4
    TRAP = 5
    BUS = 7
    KILL = 9
    SEGV = 11
    ALRM = 14


@dataclass(frozen=True, slots=True)
class Resume:
    step: bool
    addr: int | None = None
    # The thread to step (vCont;s:THREAD, or Hc); not compared: it only picks the
    # CPU on a machine with several (on one CPU every thread steps that CPU).
    thread: int | None = field(default=None, compare=False)


class _Action(Enum):
    DETACH = "detach"
    KILL = "kill"
    DISCONNECTED = "disconnected"


Reply = bytes | Resume | _Action

# Why a run ended -> the signal the stop reply carries when the machine cannot go on.
_FINAL_SIGNAL = {Why.DEAD: Signal.TRAP, Why.TRIPLE_FAULT: Signal.SEGV, Why.ERROR: Signal.BUS,
                 Why.TIME_LIMIT: Signal.ALRM}
_ATTACH = "gdb-attach"
_INTERRUPT = "gdb-interrupt"


def parse_listen_address(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """'[HOST]:PORT' -> (host, port); port 0 asks the system for a free port."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"bad address {text!r}: use [HOST]:PORT with a port from 0 to 65535 (e.g. :1234)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]                       # [::1]:1234
    return host or default_host, int(port)


# ---------------------------------------------------------------------- target description
_FLAG_FIELDS = {
    # EFLAGS (SDM vol. 1, §3.4.3)
    "i386_eflags": (("CF", 0), ("PF", 2), ("AF", 4), ("ZF", 6), ("SF", 7), ("TF", 8), ("IF", 9), ("DF", 10),
                    ("OF", 11), ("NT", 14), ("RF", 16), ("VM", 17), ("AC", 18), ("VIF", 19), ("VIP", 20),
                    ("ID", 21)),
    # MXCSR (SDM vol. 1, §10.2.3)
    "i386_mxcsr": (("IE", 0), ("DE", 1), ("ZE", 2), ("OE", 3), ("UE", 4), ("PE", 5), ("DAZ", 6), ("IM", 7),
                   ("DM", 8), ("ZM", 9), ("OM", 10), ("UM", 11), ("PM", 12), ("FZ", 15)),
}
_VECTORS = (("v4f", "ieee_single", 4), ("v2d", "ieee_double", 2), ("v16i8", "int8", 16),
            ("v8i16", "int16", 8), ("v4i32", "int32", 4), ("v2i64", "int64", 2))


def target_xml() -> str:
    """The x86-64 target description: QEMU's register set and numbering
    (GPRs, rip, eflags, selectors, fs/gs base, k_gs_base, control registers,
    efer, x87, SSE), in gdb's standard features so gdb knows what each is."""
    lines = ['<?xml version="1.0"?>', '<!DOCTYPE target SYSTEM "gdb-target.dtd">', "<target>",
             "  <architecture>i386:x86-64</architecture>"]
    features: dict[str, list[int]] = {}
    for i, r in enumerate(REGISTERS):
        features.setdefault(r.feature, []).append(i)
    for name, regs in features.items():
        lines.append(f'  <feature name="{name}">')
        types = {REGISTERS[i].type for i in regs}
        for tid, fields in _FLAG_FIELDS.items():
            if tid in types:
                lines.append(f'    <flags id="{tid}" size="4">')
                lines += [f'      <field name="{f}" start="{b}" end="{b}"/>' for f, b in fields]
                lines.append("    </flags>")
        if "vec128" in types:
            lines += [f'    <vector id="{v}" type="{t}" count="{n}"/>' for v, t, n in _VECTORS]
            lines.append('    <union id="vec128">')
            lines += [f'      <field name="{f}" type="{v}"/>' for v, f in
                      (("v4f", "v4_float"), ("v2d", "v2_double"), ("v16i8", "v16_int8"),
                       ("v8i16", "v8_int16"), ("v4i32", "v4_int32"), ("v2i64", "v2_int64"),
                       ("uint128", "uint128"))]
            lines.append("    </union>")
        for i in regs:
            r = REGISTERS[i]
            # Discussion: as in QEMU's description, st0-7 and xmm0-15 carry no
            # group (LLDB's plain 'register read' shows its general set, which
            # then ends at efer otherwise; gdb's 'info registers' still leaves
            # them out by type); the FPU control words and MXCSR keep theirs.
            group = ""
            if r.name in ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop"):
                group = ' group="float"'
            elif r.name == "mxcsr":
                group = ' group="vector"'
            lines.append(f'    <reg name="{r.name}" bitsize="{r.bits}" type="{r.type}" regnum="{i}"{group}/>')
        lines.append("  </feature>")
    lines.append("</target>")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- the stub
class GdbStub:
    """One machine served to one gdb client at a time."""

    def __init__(self, machine: Machine, *, host: str = "127.0.0.1", port: int = 0, wait: bool = False,
                 view: KernelView | None = None, symbols: dict[str, int] | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.machine = machine
        self.debug = Debug(machine)
        self.view: KernelView = view or BareMetalView(machine)
        # A view whose threads are the CPUs (BareMetalView): thread id -> CPU index.
        self._thread_cpu: Callable[[int], int | None] | None = getattr(self.view, "thread_cpu", None)
        self.symbols = dict(symbols or {})
        self.host = host
        self.port = port
        self.wait = wait
        self.log = log or (lambda msg: sys.stderr.write(f"vmk: {msg}\n"))
        self.listener: socket.socket | None = None
        self.client: socket.socket | None = None
        self.decoder = rsp.Decoder()
        self.no_ack = False
        self.final: RunResult | None = None     # the machine cannot go on (reported, awaiting the end)
        self.killed = False
        self._stopped = False                   # stopped under the client's control
        self._queued: list[rsp.Event] = []      # events read while the machine ran
        self._last_sent = b""
        self._multiprocess = False              # the client took multiprocess+: thread-ids are pPID.TID
        self._last_stop = self._stop_reply(Signal.TRAP)
        self._g_thread: int | None = None       # Hg: whose registers g/p read (None: the CPU's)
        self._c_thread: int | None = None       # Hc: the thread 's' steps (None: the stopped one)
        # --wait-gdb (QEMU's -S): the machine does not run until a client continues it;
        # a client that leaves before that leaves it stopped for the next one.
        self._held = wait
        self._next_poll = 0.0
        self._client_input = _ClientInput(self)
        self._xml = target_xml().encode()
        self._xfer_docs: dict[bytes, bytes] = {}  # qXfer documents made at offset 0, by object
        self._physical = False                  # Qqemu.PhyMemMode:1: m/M/X address physical memory
        self._handlers: dict[str, Callable[[bytes], Reply]] = {
            "?": self._h_stop_reason, "g": self._h_read_regs, "G": self._h_write_regs,
            "p": self._h_read_reg, "P": self._h_write_reg, "m": self._h_read_mem, "M": self._h_write_mem,
            "X": self._h_write_mem_binary, "c": self._h_continue, "C": self._h_continue_signal,
            "s": self._h_step, "S": self._h_step_signal, "Z": self._h_insert, "z": self._h_remove,
            "D": self._h_detach, "k": self._h_kill, "H": self._h_set_thread, "T": self._h_thread_alive,
        }
        self._named: dict[str, Callable[[bytes], Reply]] = {
            "qSupported": self._h_supported, "qXfer": self._h_xfer, "qAttached": self._h_attached,
            "qC": self._h_current_thread, "qfThreadInfo": self._h_thread_info_first,
            "qsThreadInfo": self._h_thread_info_next, "qThreadExtraInfo": self._h_thread_extra,
            "qRcmd": self._h_monitor, "qSymbol": self._h_symbol, "QStartNoAckMode": self._h_no_ack,
            "vCont?": self._h_vcont_query, "vCont": self._h_vcont, "vKill": self._h_vkill,
            "vCtrlC": self._h_vctrlc,
            "qqemu.Supported": self._h_qemu_supported, "qqemu.sstepbits": self._h_qemu_sstepbits,
            "Qqemu.sstepbits": self._h_qemu_sstepbits, "qqemu.sstep": self._h_qemu_sstep,
            "Qqemu.sstep": self._h_qemu_sstep, "qqemu.PhyMemMode": self._h_qemu_phymem_query,
            "Qqemu.PhyMemMode": self._h_qemu_phymem_set,
        }
        # Dispatch by first byte, and for q/Q/v packets by name; a payload that is a
        # whole name (qfThreadInfo, qsThreadInfo, qC, vCont? ...) is found in one look-up.
        self._by_byte = {ord(k): h for k, h in self._handlers.items()}
        self._exact = {k.encode(): h for k, h in self._named.items()}
        self.monitor: dict[str, MonitorCommand] = {
            "help": MonitorCommand(self._m_help, "list monitor commands"),
            "irq": MonitorCommand(self._m_irq, "interrupt controllers (PIC, IO-APIC, LAPIC), counts"),
            "devices": MonitorCommand(self._m_devices, "I/O port and MMIO maps, device state"),
            "time": MonitorCommand(self._m_time, "virtual time, instructions retired, next timer"),
            "run-for": MonitorCommand(self._m_run_for, "run-for DURATION: run for this much virtual time"),
            "step-irq": MonitorCommand(self._m_step_irq,
                                       "step-irq [on|off]: take pending interrupts during a single step"),
            "symbols": MonitorCommand(self._m_symbols, "symbols [TEXT]: kernel symbols (address, name)"),
            "symbol": MonitorCommand(self._m_symbol, "symbol NAME: the address of a kernel symbol"),
            "info": MonitorCommand(self._m_info, "info mem|tlb|registers: the page tables, the CPU "
                                                 "state, in QEMU's format (GEF and pwndbg parse it)"),
        }
        self.monitor.update(self.view.monitor_commands())

    # ================================================================== server
    def listen(self) -> tuple[str, int]:
        """Bind and listen; returns the actual (host, port)."""
        if self.listener is None:
            s = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((self.host, self.port))
                s.listen(16)
            except OSError:
                s.close()
                raise
            self.listener = s
            self.port = s.getsockname()[1]
        return self.host, self.port

    def close(self) -> None:
        self._drop_client()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        self.debug.close()

    def run(self, until: int | None = None) -> RunResult:
        """Serve until the machine's run is over (exit, kill, host Ctrl-C, ...)."""
        self.listen()
        try:
            if self.wait and self.client is None:
                self._wait_for_client()
            while True:
                if self.client is not None and self._stopped:
                    action = self._serve()
                    if action is _Action.KILL:
                        self.killed = True
                        return RunResult(Why.STOPPED, "killed by the debugger")
                    if not isinstance(action, Resume):           # detached or gone: run on
                        self._drop_client()
                        if self.final is not None:
                            return self.final
                        if self._held:
                            self._wait_for_client()
                        continue
                    if not action.step:
                        self._held = False
                    if self.final is not None:
                        if self.final.why == Why.DEAD and not self.machine.cpu.halted:
                            self.final = None                    # the client gave it a new RIP
                        else:
                            self._send_end(self.final)
                            return self.final
                    result = self._resume(action, until)
                else:
                    if self.final is not None:
                        return self.final
                    result = self._resume(Resume(step=False), until)
                end = self._after_run(result)
                if end is not None:
                    return end
        except KeyboardInterrupt:
            self._send_safely(b"X02")
            return RunResult(Why.INTERRUPTED, f"interrupted at t={self.machine.now} ns")
        finally:
            self.close()

    def _wait_for_client(self) -> None:
        """--wait-gdb: the machine stays stopped until a client connects."""
        self.log(f"waiting for gdb on {self.host}:{self.port}")
        assert self.listener is not None
        while self.client is None:
            select.select([self.listener], [], [], None)
            self._accept()

    def _left(self) -> str:
        """What happens to the machine when the client goes (for the log)."""
        return "the machine stays stopped (--wait-gdb)" if self._held else "the machine runs on"

    # ------------------------------------------------------------------ running the machine
    def _resume(self, action: Resume, until: int | None) -> RunResult:
        d = self.debug
        cpu = self._cpu_of(action.thread) if action.step and action.thread is not None else None
        # A step steps the thread gdb names, else the one that stopped.
        if cpu is None:
            cpu = d.stop_cpu
        if cpu != d.selected:
            d.select_cpu(cpu)
        if action.addr is not None:
            self.debug.write_register(REG_INDEX["rip"], action.addr.to_bytes(8, "little"))
        self.debug.host_poll = self._poll
        client_watched = self.client is not None
        if client_watched:
            self.machine.add_host_input(self._client_input)
        try:
            return self.debug.step(until) if action.step else self.debug.cont(until)
        finally:
            self.debug.host_poll = None
            if client_watched:
                self.machine.remove_host_input(self._client_input)

    def _after_run(self, result: RunResult) -> RunResult | None:
        """Tell the client why the machine stopped; return the result if the run is over."""
        why = result.why
        if why == Why.EXIT:
            self._send_end(result)
            return result
        if why == Why.INTERRUPTED:
            self._send_safely(b"X02")
            return result
        if self.client is None:
            if why in (Why.BREAKPOINT, Why.STOPPED):
                return None                      # e.g. a stop meant for a client that left meanwhile
            return result
        self._stopped = True
        # gdb takes the stop reply's thread (the one on the CPU) as the stub's
        # Hg thread from now on (remote.c, record_currthread): do the same.
        self._g_thread = None
        self._c_thread = None
        self._sync_view()
        if why == Why.BREAKPOINT:
            self._report(self._stop_reply(Signal.TRAP, self.debug.stop_event))
        elif why == Why.STOPPED:
            if result.message == _ATTACH:
                self._last_stop = self._stop_reply(Signal.TRAP)  # gdb asks with '?'
            elif result.message == _INTERRUPT:
                self._report(self._stop_reply(Signal.INT))
            else:
                self._report(self._stop_reply(Signal.TRAP, self.debug.stop_event))
        else:
            self.final = result
            self._send_safely(b"O" + rsp.hexlify(f"vmk: {why.value}: {result.message}\n".encode()))
            self._report(self._stop_reply(_FINAL_SIGNAL.get(why, Signal.TRAP)))
        return None

    def _report(self, reply: bytes) -> None:
        self._last_stop = reply
        self._send_safely(reply)

    def _send_end(self, result: RunResult) -> None:
        if result.why == Why.EXIT:
            self._send_safely(f"W{(result.exit_status or 0) & 0xFF:02x}".encode())
        else:
            self._send_safely(f"X{int(_FINAL_SIGNAL.get(result.why, Signal.KILL)):02x}".encode())
        self._drop_client()

    def _stop_reply(self, sig: Signal, event: StopEvent | None = None) -> bytes:
        out = f"T{int(sig):02x}"
        if event is not None:
            if event.kind == "watchpoint" and event.watch_kind is not None:
                out += f"{event.watch_kind.value}:{event.data_addr:x};"
            elif event.kind == "breakpoint" and event.break_kind is not None:
                out += f"{event.break_kind.value}:;"
        out += f"thread:{self._tid(self.view.current_thread())};"
        # Expedited registers (the stopped thread is the one on the CPU): with
        # pc, sp and fp in the reply, gdb's stepi needs no 'g' round trip.
        return out.encode() + _WHERE_FORMAT % tuple(v.hex().encode() for _, v in self.debug.read_where())

    def _cpu_of(self, tid: int | None) -> int | None:
        """The CPU index that thread ``tid`` is, if the view's threads are CPUs."""
        return None if self._thread_cpu is None or tid is None else self._thread_cpu(tid)

    def _sync_view(self) -> None:
        """Tell a CPU view where the machine stopped (its current thread)."""
        if self._thread_cpu is not None:
            self.view.current_cpu = self.debug.stop_cpu     # type: ignore[attr-defined]

    def _tid(self, tid: int) -> str:
        # Discussion: QEMU takes gdb's multiprocess+ and answers as process 1
        # ("QCp01.01"), so gdb's inferior has pid 1 ('process 1'); without it
        # gdb makes up pid 42000.  GEF's 'gef-remote -q' takes a stub for QEMU
        # only if the pid is 1 (and Qqemu.sstepbits answers ENABLE=1).
        return f"p1.{tid:x}" if self._multiprocess else f"{tid:x}"

    def _poll(self) -> None:
        """Between slices: look at the sockets at most every POLL_INTERVAL of host time."""
        now = time.monotonic()
        if now < self._next_poll:
            return
        self._next_poll = now + POLL_INTERVAL
        if self.client is None:
            if self.listener is not None and _readable(self.listener):
                self._accept()
                if self.client is not None:
                    self.machine.stop(_ATTACH)
        else:
            self._read_while_running()

    def _read_while_running(self) -> int:
        client = self.client
        if client is None or not _readable(client):
            return 0
        try:
            data = client.recv(RECV_CHUNK, _DONTWAIT)
        except BlockingIOError:
            return 0
        except OSError:
            data = b""
        if not data:
            self.log(f"gdb disconnected; {self._left()}")
            self._drop_client()
            return 0
        for ev in self.decoder.feed(data):
            if isinstance(ev, rsp.Interrupt):
                self.machine.stop(_INTERRUPT)
            else:
                self._queued.append(ev)
        return len(data)

    # ------------------------------------------------------------------ connection
    def _accept(self) -> None:
        assert self.listener is not None
        try:
            conn, peer = self.listener.accept()
        except OSError:
            return
        if self.client is not None:
            conn.close()                          # one debugger at a time
            return
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Discussion: a blocking socket, read and written with MSG_DONTWAIT
        # after select() said so; SEND_TIMEOUT is kept by _raw_send itself.
        # With settimeout() Python polls before every recv and send: two
        # syscalls more per packet, 22 per gdb stepi (measured ~60 us of it).
        conn.setblocking(True)
        self.client = conn
        self.decoder.reset()
        self.no_ack = False
        self._queued.clear()
        self._g_thread = None
        self._stopped = True
        self.log(f"gdb attached from {peer[0]}:{peer[1]}")

    def _drop_client(self) -> None:
        if self.client is not None:
            try:
                self.client.close()
            except OSError:
                pass
            self.client = None
            self.machine.remove_host_input(self._client_input)
        self.debug.clear()
        self._stopped = False
        self._queued.clear()
        self._physical = False                  # the next client starts with linear addresses

    def _serve(self) -> Reply:
        """The machine is stopped: answer packets until one resumes, detaches or kills."""
        while self.client is not None:
            queued, self._queued = self._queued, []
            for i, ev in enumerate(queued):
                action = self._on_event(ev)
                if action is not None:
                    self._queued = queued[i + 1:] + self._queued
                    return action
            if self.client is None:
                break
            data = self._poll_client()
            if data is None:
                ready, _, _ = select.select([self.client, self.listener], [], [], None)
                if self.listener in ready and self.client not in ready:
                    # Discussion: only a client with nothing pending is still there for
                    # sure; one that sent its last packets and closed is read to the
                    # end (its packets answered, its EOF seen) before the place is
                    # given away, so a new connection waits for the next round.
                    self._reject()
                    continue
                try:
                    data = self.client.recv(RECV_CHUNK, _DONTWAIT)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
            if not data:
                self.log(f"gdb disconnected; {self._left()}")
                return _Action.DISCONNECTED
            self._queued.extend(self.decoder.feed(data))
        return _Action.DISCONNECTED

    # Discussion: a debugger sends its next packet some tens of microseconds
    # after our reply (gdb's stepi is about ten packets in a row).  Asleep in
    # select(), the stub pays the host's wake-up for each of them: on this
    # 2-CPU VM ~25 us per packet, a third of a stepi.  So the stub first polls
    # the socket for POLL_SPIN seconds, as QEMU's AioContext busy-polls before
    # it blocks (poll-max-ns), and only then sleeps.  Measured with real gdb,
    # 3000 stepi: 1,000 us per step asleep; 580 us spinning 100 us or 1 ms;
    # 770-870 us spinning 30 us; QEMU 1,000-1,070 us.  Each turn yields the
    # CPU, so on a loaded host the spin gives way to whatever else (gdb
    # included) is runnable.  It costs at most POLL_SPIN of CPU per packet.
    def _poll_client(self) -> bytes | None:
        """The client's next bytes if they come within POLL_SPIN (b"" at EOF), else None."""
        client, clock = self.client, time.perf_counter
        assert client is not None
        deadline = clock() + POLL_SPIN
        while True:
            try:
                return client.recv(RECV_CHUNK, _DONTWAIT)
            except BlockingIOError:
                if clock() >= deadline:
                    return None
                os.sched_yield()
            except OSError:
                return b""

    def _reject(self) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
            conn.close()
        except OSError:
            pass

    def _on_event(self, ev: rsp.Event) -> Reply | None:
        if type(ev) is rsp.Packet:
            if not self.no_ack:
                self._raw_send(b"+")
            reply = self.handle(ev.payload)
            if isinstance(reply, bytes):
                self._send(reply)
                if ev.payload == b"QStartNoAckMode" and reply == b"OK":
                    self.no_ack = True
                return None if self.client is not None else _Action.DISCONNECTED
            return reply
        if isinstance(ev, rsp.BadPacket):
            if not self.no_ack:
                self._raw_send(b"-")
        elif isinstance(ev, rsp.Nack):
            if self._last_sent:
                self._raw_send(self._last_sent)
        return None if self.client is not None else _Action.DISCONNECTED

    def _send(self, payload: bytes) -> None:
        framed = rsp.frame(payload)
        self._last_sent = framed
        self._raw_send(framed)

    def _send_safely(self, payload: bytes) -> None:
        if self.client is not None:
            self._send(payload)

    def _raw_send(self, data: bytes) -> None:
        client = self.client
        if client is None:
            return
        try:
            sent = client.send(data, _DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError:
            sent = -1
        if sent == len(data) or sent >= 0 and self._send_rest(client, memoryview(data)[sent:]):
            return
        self.log(f"gdb connection lost; {self._left()}")     # gone, or not reading its replies
        self._drop_client()

    @staticmethod
    def _send_rest(client: socket.socket, data: memoryview) -> bool:
        """The socket's buffer is full: wait for room, for at most SEND_TIMEOUT."""
        deadline = time.monotonic() + SEND_TIMEOUT
        while data:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                _, writable, _ = select.select([], [client], [], left)
                if writable:
                    data = data[client.send(data, _DONTWAIT):]
            except BlockingIOError:
                pass
            except (OSError, ValueError):
                return False
        return True

    # ================================================================== packets
    def handle(self, payload: bytes) -> Reply:
        """Answer one packet: reply bytes, or a Resume/_Action for the server loop."""
        if not payload:
            return b""
        first = payload[0]
        if first in _NAMED_FIRST:
            handler = self._exact.get(payload) or self._named.get(_packet_name(payload))
        else:
            handler = self._by_byte.get(first)
        if handler is None:
            return b""                            # unknown packet: empty reply
        try:
            return handler(payload)
        except DebugError:
            return b"E14"                         # EFAULT: memory or register not accessible
        except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError):
            return b"E01"                         # malformed packet

    # -- stop state
    def _h_stop_reason(self, p: bytes) -> Reply:
        return self._last_stop

    # -- registers
    def _thread_regs(self) -> list[bytes | None]:
        """Register values of the Hg thread; None where the kernel view has none."""
        tid = self._g_thread
        saved = None if tid is None or tid == self.view.current_thread() else self.view.thread_registers(tid)
        if saved is None:
            return list(self.debug.read_registers())
        out: list[bytes | None] = []
        for r in REGISTERS:
            v = saved.get(r.name)
            out.append(None if v is None else (v & ((1 << r.bits) - 1)).to_bytes(r.size, "little"))
        return out

    def _other_thread_selected(self) -> bool:
        return self._g_thread is not None and self._g_thread != self.view.current_thread() \
            and self.view.thread_registers(self._g_thread) is not None

    def _h_read_regs(self, p: bytes) -> Reply:
        regs = self._thread_regs()
        if None not in regs:
            return rsp.hexlify(b"".join(regs))         # type: ignore[arg-type]
        return b"".join(rsp.hexlify(v) if v is not None else b"xx" * r.size for v, r in zip(regs, REGISTERS))

    def _h_write_regs(self, p: bytes) -> Reply:
        if self._other_thread_selected():
            return b"E01"
        data = rsp.unhexlify(p[1:])
        total = sum(r.size for r in REGISTERS)
        if len(data) != total:
            return b"E01"
        values, pos = [], 0
        for r in REGISTERS:
            values.append(data[pos:pos + r.size])
            pos += r.size
        self.debug.write_registers(values)
        return b"OK"

    def _h_read_reg(self, p: bytes) -> Reply:
        n = int(p[1:], 16)
        if not 0 <= n < len(REGISTERS):
            return b"E00"
        v = self._thread_regs()[n]
        return rsp.hexlify(v) if v is not None else b"xx" * REGISTERS[n].size

    def _h_write_reg(self, p: bytes) -> Reply:
        num, _, val = p[1:].partition(b"=")
        n = int(num, 16)
        if not 0 <= n < len(REGISTERS) or self._other_thread_selected():
            return b"E00"
        self.debug.write_register(n, rsp.unhexlify(val))
        return b"OK"

    # -- memory
    def _h_read_mem(self, p: bytes) -> Reply:
        addr, length = _addr_len(p[1:])
        length = min(length, PACKET_SIZE // 2)
        if length == 0:
            return b""
        read = self.debug.read_physical if self._physical else self.debug.read_memory
        return rsp.hexlify(read(addr, length))

    def _h_write_mem(self, p: bytes) -> Reply:
        head, _, data = p[1:].partition(b":")
        addr, length = _addr_len(head)
        raw = rsp.unhexlify(data)
        if len(raw) != length:
            return b"E01"
        self._write(addr, raw)
        return b"OK"

    def _h_write_mem_binary(self, p: bytes) -> Reply:
        head, sep, data = p[1:].partition(b":")
        if not sep:
            return b"E01"
        addr, length = _addr_len(head)
        raw = rsp.unescape(data)
        if len(raw) != length:
            return b"E01"
        self._write(addr, raw)
        return b"OK"

    def _write(self, addr: int, data: bytes) -> None:
        if self._physical:
            self.debug.write_physical(addr, data)
        else:
            self.debug.write_memory(addr, data)

    # -- running
    def _h_continue(self, p: bytes) -> Reply:
        return Resume(False, int(p[1:], 16) if len(p) > 1 else None)

    def _h_continue_signal(self, p: bytes) -> Reply:
        _, _, addr = p[1:].partition(b";")
        return Resume(False, int(addr, 16) if addr else None)

    def _h_step(self, p: bytes) -> Reply:
        return Resume(True, int(p[1:], 16) if len(p) > 1 else None, self._c_thread)

    def _h_step_signal(self, p: bytes) -> Reply:
        _, _, addr = p[1:].partition(b";")
        return Resume(True, int(addr, 16) if addr else None, self._c_thread)

    def _h_vcont_query(self, p: bytes) -> Reply:
        return b"vCont;c;C;s;S"

    def _h_vcont(self, p: bytes) -> Reply:
        # Discussion: the CPUs are the execution contexts; fibers are views of
        # CPU 0.  Any step action steps one CPU (the first step action's thread,
        # if it names a CPU; Debug.step says what the others do), otherwise the
        # machine continues.
        reply = _VCONT.get(p)
        if reply is None:                         # gdb sends the same few over and over: parse each once
            actions = [a.split(b":") for a in p[len(b"vCont;"):].split(b";") if a]
            kinds = {a[0][:1] for a in actions}
            if not actions or not kinds <= {b"c", b"C", b"s", b"S"}:
                reply = b"E01"                    # 't' and 'r' need non-stop / range stepping
            else:
                steps = [a for a in actions if a[0][:1] in (b"s", b"S")]
                thread = _thread_id(steps[0][1]) if steps and len(steps[0]) > 1 else None
                reply = Resume(step=bool(steps), thread=thread if thread is not None and thread > 0 else None)
            if len(_VCONT) < 64:
                _VCONT[p] = reply
        return reply

    def _h_vctrlc(self, p: bytes) -> Reply:
        return b"OK"                              # already stopped

    # -- breakpoints and watchpoints
    def _h_insert(self, p: bytes) -> Reply:
        kind, addr, length = _z_args(p)
        if kind in _BREAK_KINDS:
            self.debug.add_breakpoint(addr, _BREAK_KINDS[kind])
        elif kind in _WATCH_KINDS:
            self.debug.add_watchpoint(addr, length, _WATCH_KINDS[kind])
        else:
            return b""
        return b"OK"

    def _h_remove(self, p: bytes) -> Reply:
        kind, addr, length = _z_args(p)
        if kind in _BREAK_KINDS:
            self.debug.remove_breakpoint(addr, _BREAK_KINDS[kind])
        elif kind in _WATCH_KINDS:
            self.debug.remove_watchpoint(addr, length, _WATCH_KINDS[kind])
        else:
            return b""
        return b"OK"

    # -- session
    def _h_detach(self, p: bytes) -> Reply:
        self._send(b"OK")
        self.log(f"gdb detached; {self._left()}")
        return _Action.DETACH

    def _h_kill(self, p: bytes) -> Reply:
        return _Action.KILL

    def _h_vkill(self, p: bytes) -> Reply:
        self._send(b"OK")
        return _Action.KILL

    def _h_supported(self, p: bytes) -> Reply:
        features = p.partition(b":")[2].split(b";")
        multiprocess = b"multiprocess+" in features
        if multiprocess != self._multiprocess:
            self._multiprocess = multiprocess
            stop, at = self._last_stop, self._last_stop.find(b"thread:")     # '?' answers in the new form
            if at >= 0:
                end = stop.index(b";", at)
                self._last_stop = stop[:at + 7] + self._tid(_thread_id(stop[at + 7:end])).encode() + stop[end:]
        return (f"PacketSize={PACKET_SIZE:x};qXfer:features:read+;qXfer:memory-map:read+;qXfer:threads:read+;swbreak+;hwbreak+;"
                f"vContSupported+;QStartNoAckMode+" + (";multiprocess+" if multiprocess else "")).encode()

    # -- QEMU's own packets
    # Discussion: pwndbg (and GEF's forks) tell QEMU from other stubs by
    # 'maintenance packet Qqemu.sstepbits' answering "ENABLE=", and QEMU's
    # system mode from its user mode by qOffsets having no answer; with them
    # they take the kernel's memory map from 'monitor info mem'.  The texts
    # and error codes are QEMU's (gdbstub, system mode): sstepbits and sstep
    # answer as q or Q packets, "qemu.sstep=MASK" sets the mask, a mask with
    # bits the stub cannot honour gets E22 (as QEMU under KVM).  vmk honours
    # ENABLE (always set: a step is one instruction) and NOIRQ (= monitor
    # step-irq off).  NOTIMER is refused: vmk's timers run on virtual time,
    # which a step advances as the instruction would without a debugger.
    # PhyMemMode:1 makes m/M/X address guest-physical RAM.
    _SSTEP_ENABLE, _SSTEP_NOIRQ, _SSTEP_NOTIMER = 1, 2, 4

    def _h_qemu_supported(self, p: bytes) -> Reply:
        return b"sstepbits;sstep;PhyMemMode"

    def _h_qemu_sstepbits(self, p: bytes) -> Reply:
        return (f"ENABLE={self._SSTEP_ENABLE:x},NOIRQ={self._SSTEP_NOIRQ:x},"
                f"NOTIMER={self._SSTEP_NOTIMER:x}").encode()

    def _h_qemu_sstep(self, p: bytes) -> Reply:
        _, eq, value = p.partition(b"=")
        if not eq:
            mask = self._SSTEP_ENABLE | (self._SSTEP_NOIRQ if self.debug.hold_interrupts_on_step else 0)
            return f"{mask:#x}".encode()
        mask = int(value, 16)
        if mask & ~(self._SSTEP_ENABLE | self._SSTEP_NOIRQ) or not mask & self._SSTEP_ENABLE:
            return b"E22"
        self.debug.hold_interrupts_on_step = bool(mask & self._SSTEP_NOIRQ)
        return b"OK"

    def _h_qemu_phymem_query(self, p: bytes) -> Reply:
        return b"1" if self._physical else b"0"

    def _h_qemu_phymem_set(self, p: bytes) -> Reply:
        _, sep, value = p.partition(b":")
        if not sep:
            return b"E22"
        self._physical = int(value, 16) != 0     # as QEMU: any value but 0 turns it on
        return b"OK"

    def _h_no_ack(self, p: bytes) -> Reply:
        return b"OK"

    def _h_xfer(self, p: bytes) -> Reply:
        parts = p.split(b":")
        if len(parts) != 5 or parts[2] != b"read":
            return b""
        object_, annex = parts[1], parts[3]
        if object_ == b"features":
            if annex != b"target.xml":
                return b"E00"
            doc = self._xml
        else:
            make = {b"memory-map": self._memory_map, b"threads": self._thread_list}.get(object_)
            if make is None:
                return b""
            if annex:
                return b"E00"
            if _addr_len(parts[4])[0] == 0:
                self._xfer_docs[object_] = make()    # made at the first chunk, served from there
            doc = self._xfer_docs.get(object_, b"")
        off, length = _addr_len(parts[4])
        chunk = doc[off:off + min(length, PACKET_SIZE - 1)]
        more = off + len(chunk) < len(doc)
        return (b"m" if more else b"l") + rsp.escape(chunk)

    def _h_attached(self, p: bytes) -> Reply:
        return b"1"                               # attached to a running machine: 'quit' detaches

    def _h_symbol(self, p: bytes) -> Reply:
        return b"OK"

    # -- threads
    def _h_set_thread(self, p: bytes) -> Reply:
        if len(p) < 3:
            return b"E01"
        op, tid = chr(p[1]), _thread_id(p[2:])
        if tid > 0 and tid not in {t.tid for t in self.view.threads()}:
            return b"E01"
        if op == "g":
            self._g_thread = tid if tid > 0 else None
            cpu = self._cpu_of(tid) if tid > 0 else self.debug.stop_cpu
            if cpu is not None:
                self.debug.select_cpu(cpu)        # registers and memory are that CPU's (as QEMU)
        elif op == "c":
            self._c_thread = tid if tid > 0 else None
        return b"OK"

    def _h_thread_alive(self, p: bytes) -> Reply:
        tid = _thread_id(p[1:])
        return b"OK" if tid in {t.tid for t in self.view.threads()} else b"E01"

    def _h_current_thread(self, p: bytes) -> Reply:
        return f"QC{self._tid(self.view.current_thread())}".encode()

    # Discussion: gdb lists the threads after every stop, a stepi included.
    # With qXfer:threads:read that is one packet instead of qfThreadInfo plus
    # qsThreadInfo, and gdb takes each thread's name and extra text from the
    # document, so 'info threads' needs no qThreadExtraInfo either (gdbserver
    # does the same; QEMU 7.2 offers only the q*ThreadInfo pair).
    def _thread_list(self) -> bytes:
        from xml.sax.saxutils import escape, quoteattr
        rows = "".join(f'<thread id="{self._tid(t.tid)}" name={quoteattr(t.name)}>{escape(t.extra)}</thread>'
                       for t in self.view.threads())
        return f'<?xml version="1.0"?><threads>{rows}</threads>'.encode()

    def _h_thread_info_first(self, p: bytes) -> Reply:
        return b"m" + ",".join(self._tid(t.tid) for t in self.view.threads()).encode()

    def _h_thread_info_next(self, p: bytes) -> Reply:
        return b"l"

    def _h_thread_extra(self, p: bytes) -> Reply:
        tid = _thread_id(p.split(b",", 1)[1])
        for t in self.view.threads():
            if t.tid == tid:
                return rsp.hexlify(f"{t.name}: {t.extra}".encode())
        return b"E01"

    # -- monitor
    def _h_monitor(self, p: bytes) -> Reply:
        text = rsp.unhexlify(p.split(b",", 1)[1]).decode("utf-8", "replace")
        out = self.run_monitor(text)
        if not out.endswith("\n"):
            out += "\n"
        data = out.encode()
        if len(data) * 2 < PACKET_SIZE:
            return rsp.hexlify(data)
        for i in range(0, len(data), PACKET_SIZE // 4):
            self._send(b"O" + rsp.hexlify(data[i:i + PACKET_SIZE // 4]))
        return b"OK"

    def run_monitor(self, text: str) -> str:
        """Run one monitor command line; returns its output (errors start with 'error:')."""
        words = text.split()
        if not words:
            return self._m_help([])
        cmd = self.monitor.get(words[0])
        if cmd is None:
            return f"error: unknown monitor command {words[0]!r}; 'monitor help' lists them"
        try:
            return cmd.run(words[1:])
        except (ValueError, DebugError) as e:
            return f"error: {e}"
        except Exception as e:  # noqa: BLE001 - a broken monitor command must not end the session
            return f"error: monitor {words[0]} failed: {type(e).__name__}: {e}"
        finally:
            self.debug.forget()                   # a kernel command may have changed page tables

    def _m_help(self, args: list[str]) -> str:
        return "\n".join(f"{name:<11} {c.help}" for name, c in sorted(self.monitor.items()))

    def _m_time(self, args: list[str]) -> str:
        m = self.machine
        nxt = m.clock.next_deadline()
        nxt_text = "none" if nxt is None else f"t={nxt} ns (in {format_ns(max(0, nxt - m.now))})"
        text = (f"virtual time {format_ns(m.now)} ({m.now} ns), {m.instructions} instructions retired, "
                f"{m.ns_per_insn} ns per instruction; next timer: {nxt_text}")
        for p in m.processors:
            text += (f"\nCPU{p.index}: {p.instructions} instructions retired, "
                     f"{self.debug.cpu_state(p.index)}, RIP {p.cpu.rip:#x}")
        return text

    def _m_run_for(self, args: list[str]) -> str:
        if len(args) != 1:
            raise ValueError("usage: run-for DURATION (e.g. 10ms)")
        ns = parse_duration(args[0])
        m = self.machine
        start = m.now
        result = self._resume_monitor(start + ns)
        self._sync_view()
        where = f"rip={self.debug.cpu.rip:#x}" + (f" (CPU{self.debug.stop_cpu})" if m.processors else "")
        if result.why == Why.TIME_LIMIT:
            how = "time is up"
        elif result.why == Why.BREAKPOINT and self.debug.stop_event is not None:
            ev = self.debug.stop_event
            how = (f"stopped at a {ev.kind}" + (f" ({ev.watch_kind.value} {ev.data_addr:#x})"
                                                if ev.watch_kind else ""))
        else:
            how = f"stopped: {result.why.value}: {result.message}"
            if result.why not in (Why.STOPPED, Why.BREAKPOINT):
                self.final = result
        self._last_stop = self._stop_reply(Signal.TRAP, self.debug.stop_event)
        return (f"ran {format_ns(m.now - start)} of virtual time: {how}; now t={m.now} ns, {where}\n"
                "(gdb caches registers: 'maint flush register-cache' shows the new state)")

    def _resume_monitor(self, until: int) -> RunResult:
        if self.final is not None:
            return self.final
        return self._resume(Resume(step=False), until)

    def _m_step_irq(self, args: list[str]) -> str:
        if args:
            if args[0] not in ("on", "off"):
                raise ValueError("usage: step-irq [on|off]")
            self.debug.hold_interrupts_on_step = args[0] == "off"
        on = not self.debug.hold_interrupts_on_step
        return ("step-irq on: a single step takes pending interrupts as the CPU would" if on else
                "step-irq off: a single step keeps external interrupts pending (unless the CPU is halted)")

    def _m_symbols(self, args: list[str]) -> str:
        pat = args[0] if args else ""
        rows = sorted((a, n) for n, a in self.symbols.items() if pat in n)
        if not rows:
            return "no symbols" + (f" matching {pat!r}" if pat else " (the image has no symbol table)")
        return "\n".join(f"{a:#018x} {n}" for a, n in rows)

    def _m_symbol(self, args: list[str]) -> str:
        if len(args) != 1:
            raise ValueError("usage: symbol NAME")
        if args[0] not in self.symbols:
            raise ValueError(f"no symbol {args[0]!r}")
        return f"{self.symbols[args[0]]:#x}"

    def _m_info(self, args: list[str]) -> str:
        # Discussion: the text is QEMU's 'info mem' / 'info tlb' for x86-64
        # (4-level paging), because GEF and pwndbg parse it: info mem is
        # "START-END SIZE urw" per run of pages with the same user/write
        # rights (U and W ANDed over the levels), info tlb "LINEAR: PHYS
        # XGPDACTUW" per leaf entry (its own bits; P is the large-page bit).
        if args == ["registers"]:
            return self._info_registers()
        if args == ["registers", "-a"]:              # QEMU: every CPU, one after the other
            d, selected = self.debug, self.debug.selected
            try:
                texts = []
                for k in range(d.cpu_count):
                    d.select_cpu(k)
                    texts.append(self._info_registers())
                return "\n\n".join(texts)
            finally:
                d.select_cpu(selected)
        if args not in (["mem"], ["tlb"]):
            raise ValueError("usage: info mem | info tlb | info registers [-a]")
        pages = self.debug.page_mappings()
        if pages is None:
            return "PG disabled"
        if args == ["tlb"]:
            bits = ((PTE_NX, "X"), (1 << 8, "G"), (1 << 7, "P"), (1 << 6, "D"), (1 << 5, "A"), (1 << 4, "C"),
                    (1 << 3, "T"), (1 << 2, "U"), (1 << 1, "W"))
            lines = []
            for p in pages:
                e = p.entry & ~(1 << 7) if p.size == 0x1000 else p.entry      # bit 7 of a PTE is PAT
                lines.append(f"{p.linear:016x}: {p.phys:016x} " + "".join(c if e & b else "-" for b, c in bits))
            return "\n".join(lines)
        runs: list[list] = []                          # [start, end, user, writable]
        for p in pages:
            last = runs[-1] if runs else None
            if last is not None and last[1] == p.linear and last[2:] == [p.user, p.writable]:
                last[1] = p.linear + p.size
            else:
                runs.append([p.linear, p.linear + p.size, p.user, p.writable])
        return "\n".join(f"{a:016x}-{b & 0xFFFF_FFFF_FFFF_FFFF:016x} {b - a:016x} {'u' if u else '-'}r{'w' if w else '-'}"
                         for a, b, u, w in runs)

    def _info_registers(self) -> str:
        """The CPU's state as QEMU's 'info registers' prints it (x86-64 target).

        Discussion: GEF's forks (qreg, sysreg) and people's scripts read the
        hidden parts from it: segment caches (base, limit, flags), GDT/IDT,
        CPL, DRs.  The layout is QEMU's: 64-bit columns while CS is a 64-bit
        segment, 32-bit ones otherwise (real mode, the multiboot entry), DRs
        64-bit in both; flags are the cached descriptor's high dword &
        0x00ffff00.  Measured against QEMU 7.2 on gdbtarget: the same text at
        a breakpoint in long mode, except LDT/TR, whose never-loaded caches
        QEMU's reset fills (limit ffff, present) and Unicorn's leaves 0.
        The CPU is the selected one (gdb's Hg thread), as QEMU's monitor
        shows its current CPU."""
        cpu = self.debug.cpu
        regs = self.debug.read_registers()
        r = {d.name: int.from_bytes(v, "little") for d, v in zip(REGISTERS, regs)}
        hf = cpu.hflags()
        wide = bool(hf & HF.CS64)
        lma = bool(hf & HF.LMA)
        fl = r["eflags"]
        bits = "".join(c if fl & (1 << b) else "-" for c, b in
                       (("D", 10), ("O", 11), ("S", 7), ("Z", 6), ("A", 4), ("P", 2), ("C", 0)))
        state = (f"[{bits}] CPL={hf & 3} II={int(bool(hf & HF.INHIBIT_IRQ))} A20=1 SMM=0 "
                 f"HLT={int(bool(cpu.halted))}")
        out = [f"CPU#{getattr(cpu, 'apic_id', 0)}"]
        if wide:
            names = ("RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RBP", "RSP",
                     "R8", "R9", "R10", "R11", "R12", "R13", "R14", "R15")
            for row in range(4):
                out.append(" ".join(f"{n:<3}={r[n.lower()]:016x}" for n in names[row * 4:row * 4 + 4]))
            out.append(f"RIP={r['rip']:016x} RFL={fl:08x} {state}")
        else:
            names = ("EAX", "EBX", "ECX", "EDX", "ESI", "EDI", "EBP", "ESP")
            for row in range(2):
                out.append(" ".join(f"{n}={r['r' + n[1:].lower()] & 0xFFFF_FFFF:08x}"
                                    for n in names[row * 4:row * 4 + 4]))
            out.append(f"EIP={r['rip'] & 0xFFFF_FFFF:08x} EFL={fl:08x} {state}")
        pe = bool(hf & HF.PE)

        def seg_line(name: str, sel: int, base: int, limit: int, flags: int) -> str:
            text = (f"{name:<3}={sel:04x} {base:016x} {limit:08x} {flags & 0x00FFFF00:08x}" if wide else
                    f"{name:<3}={sel:04x} {base & 0xFFFF_FFFF:08x} {limit:08x} {flags & 0x00FFFF00:08x}")
            if not pe or not flags & (1 << 15):                 # real mode, or not present
                return text
            text += f" DPL={(flags >> 13) & 3} "
            typ = (flags >> 8) & 15
            if flags & (1 << 12):                               # code or data
                if typ & 8:
                    text += "CS64" if flags & (1 << 21) else "CS32" if flags & (1 << 22) else "CS16"
                    text += f" [{'C' if typ & 4 else '-'}{'R' if typ & 2 else '-'}"
                else:
                    text += "DS  " if flags & (1 << 22) or lma else "DS16"
                    text += f" [{'E' if typ & 4 else '-'}{'W' if typ & 2 else '-'}"
                return text + ("A]" if typ & 1 else "-]")
            return text + (_SYSTEM_TYPES_64 if lma else _SYSTEM_TYPES_32)[typ]

        for name, seg in (("ES", 0), ("CS", 1), ("SS", 2), ("DS", 3), ("FS", 4), ("GS", 5)):
            out.append(seg_line(name, *cpu.seg_cache(seg)))
        tables = cpu.table_regs()
        out.append(seg_line("LDT", *tables["ldt"]))
        out.append(seg_line("TR", *tables["tr"]))
        for name in ("gdt", "idt"):
            _, base, limit, _ = tables[name]
            out.append(f"{name.upper()}=     {base:016x} {limit:08x}" if wide else
                       f"{name.upper()}=     {base & 0xFFFF_FFFF:08x} {limit:08x}")
        dr = self.debug.debug_registers()
        w = 16 if wide else 8
        out.append(f"CR0={r['cr0']:08x} CR2={r['cr2']:0{w}x} CR3={r['cr3']:0{w}x} CR4={r['cr4']:08x}")
        out.append("".join(f"DR{n}={v:016x} " for n, v in zip(range(4), dr[:4])))     # 64-bit in any mode
        out.append(f"DR6={dr[4]:016x} DR7={dr[5]:016x}")
        out.append(f"EFER={r['efer']:016x}")
        fsw, ftag = r["fstat"], r["ftag"]
        top = (fsw >> 11) & 7
        valid = sum(1 << i for i in range(8) if (ftag >> (2 * i)) & 3 != 3)     # abridged tag word
        out.append(f"FCW={r['fctrl']:04x} FSW={fsw:04x} [ST={top}] FTW={valid:02x} MXCSR={r['mxcsr']:08x}")
        fpr = []
        for i in range(8):                                      # physical register i is ST((i - top) & 7)
            v = r[f"st{(i - top) & 7}"]
            fpr.append(f"FPR{i}={v & 0xFFFF_FFFF_FFFF_FFFF:016x} {v >> 64:04x}")
        out += [" ".join(fpr[i:i + 2]) for i in range(0, 8, 2)]
        xmm = [f"XMM{i:02d}={r[f'xmm{i}'] >> 64:016x} {r[f'xmm{i}'] & 0xFFFF_FFFF_FFFF_FFFF:016x}"
               for i in range(16 if wide else 8)]
        out += [" ".join(xmm[i:i + 2]) for i in range(0, len(xmm), 2)]
        return "\n".join(out)

    def _memory_map(self) -> bytes:
        """GDB's memory-map XML: guest RAM as "ram" where gdb's (linear) addresses reach
        it: physical RAM at its own addresses, and each mapped run of the current
        page tables that is RAM-backed."""
        ram = self.machine.ram.size
        spans = [(0, ram)]
        try:
            pages = self.debug.page_mappings() or []
        except DebugError:
            pages = []
        for p in pages:
            if p.phys < ram and p.linear >= spans[-1][1]:
                end = p.linear + min(p.size, ram - p.phys)
                if spans[-1][1] == p.linear:
                    spans[-1] = (spans[-1][0], end)
                else:
                    spans.append((p.linear, end))
        # The map is read once, when gdb connects (often before the kernel has
        # turned paging on), and with a map gdb refuses every address outside it
        # (mem inaccessible-by-default): a higher-half kernel's addresses would be
        # refused for the whole session.  So the holes are listed too, as
        # separate regions: the map tells RAM from the rest by its boundaries
        # and gdb can still read anything the stub can (as without a map).
        full, at = [], 0
        for a, b in spans:
            if a > at:
                full.append((at, a))
            full.append((a, b))
            at = b
        if at < 1 << 64:
            full.append((at, 1 << 64))
        body = "".join(f'  <memory type="ram" start="{a:#x}" length="{b - a:#x}"/>\n' for a, b in full)
        return ('<?xml version="1.0"?>\n<!DOCTYPE memory-map PUBLIC "+//IDN gnu.org//DTD GDB Memory Map V1.0//EN"'
                ' "http://sourceware.org/gdb/gdb-memory-map.dtd">\n<memory-map>\n' + body
                + "</memory-map>\n").encode()

    def _m_irq(self, args: list[str]) -> str:
        m = self.machine
        lines = []
        cpu = self.debug.cpu                       # the selected CPU (gdb's Hg thread), its APIC and IDT
        proc = m.processors[self.debug.selected] if m.processors else None
        lapic, idt = (proc.lapic, proc.idt) if proc is not None else (m.lapic, m.idt)
        lines.append(f"CPU{'' if proc is None else proc.index}: IF={int(cpu.interrupts_enabled())}, "
                     f"halted={cpu.halted}, "
                     f"interrupt pending at the LAPIC: {'yes' if lapic.pending() else 'no'}, "
                     f"external interrupts taken: {m.interrupts_taken}")
        counts = dict(sorted(idt.delivered.items()))
        lines.append("IDT deliveries by vector: " + (", ".join(f"{v:#04x}: {n}" for v, n in counts.items())
                                                     or "none"))
        la = lapic.snapshot()
        lvt = la.get("lvt", [])
        lines.append(f"LAPIC: SVR {la.get('svr', 0):#x}, TPR {la.get('tpr', 0):#04x}, "
                     f"IRR {_vectors(la.get('irr', 0))}, ISR {_vectors(la.get('isr', 0))}, "
                     f"TMR {_vectors(la.get('tmr', 0))}")
        if lvt:
            names = [e.name.lower() for e in Lvt]
            lines.append("  LVT " + ", ".join(f"{names[i] if i < len(names) else i} {v:#x}"
                                                for i, v in enumerate(lvt)))
        lines.append(f"  timer: divide {la.get('divide')}, initial count {la.get('initial')}, "
                     f"deadline {la.get('timer_deadline')}")
        io = m.ioapic.snapshot()
        routed = [(pin, e) for pin, e in enumerate(io.get("redtbl", [])) if not (e >> 16) & 1]
        lines.append("IO-APIC unmasked pins: " + (", ".join(
            f"pin {pin} -> vector {e & 0xFF:#04x} {'level' if (e >> 15) & 1 else 'edge'}"
            f"{' low' if (e >> 13) & 1 else ''} dest {e >> 56}" for pin, e in routed) or "none"))
        pic = m.pic.snapshot()
        for chip in ("master", "slave"):
            s = pic.get(chip, {})
            lines.append(f"PIC {chip}: IRR {s.get('irr', 0):#04x}, ISR {s.get('isr', 0):#04x}, "
                         f"IMR {s.get('imr', 0):#04x}, vector base {s.get('vector_base', 0):#04x}")
        return "\n".join(lines)

    def _m_devices(self, args: list[str]) -> str:
        m = self.machine
        lines = ["I/O ports:"]
        lines += [f"  {base:#06x}-{base + n - 1:#06x} {name}" for base, n, name in m.ports.mapped()]
        lines.append("MMIO:")
        lines += [f"  {base:#010x}-{base + size - 1:#010x} {name}" for base, size, name in m.mmio.windows()]
        devices = {"pit": m.pit, "port61": m.port61, "com1": m.uarts[0], "com2": m.uarts[1], "pic": m.pic,
                   "ioapic": m.ioapic, "lapic": m.lapic}
        lines.append("state:")
        for name, dev in devices.items():
            try:
                snap = dev.snapshot()
            except Exception as e:            # noqa: BLE001 - a device's display must not kill the stub
                snap = {"error": str(e)}
            lines.append(f"  {name}: {_brief(snap)}")
        return "\n".join(lines)


class _ClientInput:
    """The client socket as a machine host input (so Ctrl-C works while the CPU idles)."""

    def __init__(self, stub: GdbStub) -> None:
        self.stub = stub

    @property
    def eof(self) -> bool:
        return self.stub.client is None

    def fileno(self) -> int | None:
        c = self.stub.client
        return None if c is None else c.fileno()

    def pump(self) -> int:
        return self.stub._read_while_running()


# ---------------------------------------------------------------------- helpers
_VCONT: dict[bytes, Reply] = {}          # vCont packet -> its parsed reply
_NAMED_FIRST = frozenset(b"qQv")
_WHERE_FORMAT = b"".join(b"%02x:%%b;" % i for i in WHERE_REGISTERS)
_BREAK_KINDS = {0: BreakKind.SOFTWARE, 1: BreakKind.HARDWARE}
_WATCH_KINDS = {2: WatchKind.WRITE, 3: WatchKind.READ, 4: WatchKind.ACCESS}


# System segment names by descriptor type (Intel SDM vol. 3 table 3-2), as QEMU prints them.
_SYSTEM_TYPES_32 = ("Reserved", "TSS16-avl", "LDT", "TSS16-busy", "CallGate16", "TaskGate", "IntGate16",
                    "TrapGate16", "Reserved", "TSS32-avl", "Reserved", "TSS32-busy", "CallGate32", "Reserved",
                    "IntGate32", "TrapGate32")
_SYSTEM_TYPES_64 = ("<hiword>", "Reserved", "LDT", "Reserved", "Reserved", "Reserved", "Reserved", "Reserved",
                    "Reserved", "TSS64-avl", "Reserved", "TSS64-busy", "CallGate64", "Reserved", "IntGate64",
                    "TrapGate64")


def _packet_name(p: bytes) -> str:
    if p.startswith(b"vCont?"):
        return "vCont?"
    end = len(p)
    for sep in b":,;=":
        i = p.find(bytes((sep,)))
        if i > 0:
            end = min(end, i)
    return p[:end].decode("latin-1")


def _addr_len(text: bytes) -> tuple[int, int]:
    a, sep, n = text.partition(b",")
    if not sep:
        raise ValueError("expected ADDR,LENGTH")
    return int(a, 16), int(n, 16)


def _z_args(p: bytes) -> tuple[int, int, int]:
    fields = p[1:].split(b";")[0].split(b",")
    if len(fields) != 3:
        raise ValueError("expected TYPE,ADDR,KIND")
    return int(fields[0], 16), int(fields[1], 16), int(fields[2], 16)


def _thread_id(text: bytes) -> int:
    """gdb thread-id: 'N', '-1' (all), '0' (any), or multiprocess 'pP.T'."""
    text = text.strip()
    if text.startswith(b"p"):
        text = text.partition(b".")[2] or b"-1"
    if text == b"-1":
        return -1
    return int(text, 16)


def _readable(sock: socket.socket) -> bool:
    try:
        r, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return bool(r)


def _vectors(bits: int) -> str:
    vs = [v for v in range(256) if (bits >> v) & 1]
    return "[" + " ".join(f"{v:#04x}" for v in vs) + "]" if vs else "[]"


def _brief(value: object, depth: int = 0) -> str:
    """Compact one-line rendering of a device snapshot."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_brief(v, depth + 1)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        items = [_brief(v, depth + 1) for v in value[:8]]
        more = f", ... ({len(value)} items)" if len(value) > 8 else ""
        return "[" + ", ".join(items) + more + "]"
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:#x}" if value > 9 else str(value)
    return str(value)
