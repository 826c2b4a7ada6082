"""``vmk debug [HOST]:PORT``: the vmk debugger shell, for people who do not want gdb.

It is an RSP client (framing from ``rsp.py``) of the stub that ``vmk boot
--gdb`` runs, so it works with anything that speaks the protocol.  The
register layout comes from the stub's target description; symbols come from
the stub (``monitor symbols``), so no ELF file is needed.

Commands are plain functions ``cmd(target, out, arg)`` in one table
(:data:`COMMANDS`): ``target`` is the connection plus the shell's state
(breakpoint numbers, symbols), ``out`` where to print, ``arg`` the rest of the
line.  A command that fails raises :class:`CommandError`; ``--batch FILE``
runs a script and stops with status 1 at the first failure, killing the
machine (``vmk boot`` ends) so that nothing is left running unattended.

Interactive use has history (``~/.vmk_debug_history``), tab completion of
commands, registers and symbols (readline), and ``help``.  Without a terminal
(a pipe, ``--batch``) commands are read line by line with no prompt.

``asm ADDR "INSTR; ..."`` assembles with keystone and disassembles the result
with capstone before writing anything: keystone 0.9.2 mis-encodes some forms
(``mov reg, [imm]`` becomes RIP-relative with an unadjusted displacement,
``fs:[imm]`` likewise); the round trip compares registers, immediates and
memory operands (base, index, scale, displacement) and refuses the patch when
they differ.
"""
from __future__ import annotations

import os
import re
import select
import shlex
import socket
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Callable, TextIO

from . import rsp

__all__ = ["Remote", "RemoteError", "StopReply", "Target", "CommandError", "COMMANDS", "run_line", "main",
           "parse_x_format", "check_round_trip"]

CONNECT_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 5.0     # for the stub's first reply (it polls its socket every few ms even while running)
REPLY_TIMEOUT = 30.0
MAX_READ = 0x800            # bytes per 'm' request
HISTORY = os.path.expanduser("~/.vmk_debug_history")
EFER_LMA = 1 << 10
EFLAGS_BITS = (("CF", 0), ("PF", 2), ("AF", 4), ("ZF", 6), ("SF", 7), ("TF", 8), ("IF", 9), ("DF", 10),
               ("OF", 11), ("NT", 14), ("RF", 16), ("VM", 17), ("AC", 18), ("ID", 21))
SIGNAL_NAMES = {2: "SIGINT", 4: "SIGILL", 5: "SIGTRAP", 7: "SIGBUS", 9: "SIGKILL", 11: "SIGSEGV",
                14: "SIGALRM"}


class RemoteError(Exception):
    """The stub refused a request, or the connection failed."""


class CommandError(Exception):
    """A shell command that cannot be done (bad argument, error from the target)."""


# ====================================================================== the RSP client
@dataclass(slots=True)
class StopReply:
    raw: bytes
    signal: int = 0
    exited: int | None = None           # W: exit status; X: -signal
    reason: str = ""                    # "swbreak", "hwbreak", "watch", "rwatch", "awatch" or ""
    data_addr: int | None = None
    thread: int | None = None

    @classmethod
    def parse(cls, raw: bytes) -> "StopReply":
        r = cls(raw)
        kind = raw[:1]
        if kind == b"W":
            r.exited = int(raw[1:3], 16)
        elif kind == b"X":
            r.exited = -int(raw[1:3], 16)
            r.signal = int(raw[1:3], 16)
        elif kind in (b"T", b"S"):
            r.signal = int(raw[1:3], 16)
            for pair in raw[3:].split(b";"):
                key, _, val = pair.partition(b":")
                name = key.decode("latin-1")
                if name in ("watch", "rwatch", "awatch"):
                    r.reason, r.data_addr = name, int(val, 16)
                elif name in ("swbreak", "hwbreak"):
                    r.reason = name
                elif name == "thread":
                    r.thread = int(val.split(b".")[-1], 16)
        else:
            raise RemoteError(f"unexpected stop reply {raw[:40]!r}")
        return r


@dataclass(frozen=True, slots=True)
class RegInfo:
    name: str
    regnum: int
    bits: int
    offset: int                         # in the 'g' packet


class Remote:
    """A connection to a GDB stub: one request at a time, all-stop mode."""

    def __init__(self, host: str, port: int, console: Callable[[str], None] | None = None,
                 timeout: float = REPLY_TIMEOUT) -> None:
        self.timeout = timeout
        self.console = console or (lambda text: sys.stdout.write(text))
        try:
            self.sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
        except OSError as e:
            raise RemoteError(f"cannot connect to {host}:{port}: {e.strerror or e}") from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = rsp.Decoder()
        self.no_ack = False
        self.interrupted = False            # Ctrl-C came during the last resume
        self._events: list[rsp.Event] = []
        self.thread: int | None = None      # the thread selected with Hg (None: the one that stopped)
        try:
            self.features = self.request(b"qSupported:swbreak+;hwbreak+;vContSupported+;xmlRegisters=i386",
                                         timeout=HANDSHAKE_TIMEOUT)
        except RemoteError as e:
            # Something accepted the connection but no stub answers (not a stub,
            # or a stub busy with another debugger): say so instead of waiting.
            self.close()
            raise RemoteError(f"no GDB stub answers at {host}:{port} ({e}; another debugger attached, "
                              "or not a stub?)") from None
        if b"QStartNoAckMode+" in self.features and self.request(b"QStartNoAckMode") == b"OK":
            self.no_ack = True
        self.registers = self._read_layout()
        self.by_name = {r.name: r for r in self.registers}
        self.g_size = sum(r.bits // 8 for r in self.registers)
        self.last_stop = StopReply.parse(self.request(b"?"))

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # -- packets
    def _send(self, payload: bytes) -> None:
        try:
            self.sock.sendall(rsp.frame(payload))
        except OSError as e:
            raise RemoteError(f"connection lost: {e}") from None

    def _next_packet(self, timeout: float | None) -> bytes:
        """The next packet from the stub (acks handled); None timeout waits forever."""
        while True:
            while self._events:
                ev = self._events.pop(0)
                if isinstance(ev, rsp.Packet):
                    if not self.no_ack:
                        self.sock.sendall(b"+")
                    return rsp.rle_decode(ev.payload)
                if isinstance(ev, rsp.BadPacket) and not self.no_ack:
                    self.sock.sendall(b"-")
            ready, _, _ = select.select([self.sock], [], [], timeout)
            if not ready:
                raise RemoteError(f"no reply from the stub within {timeout:g} s")
            try:
                data = self.sock.recv(65536)
            except OSError as e:
                raise RemoteError(f"connection lost: {e}") from None
            if not data:
                raise RemoteError("the stub closed the connection")
            self._events.extend(self.decoder.feed(data))

    def request(self, payload: bytes, timeout: float | None = -1.0) -> bytes:
        """Send one packet and return the reply, printing console ('O') output on the way."""
        self._send(payload)
        wait = self.timeout if timeout == -1.0 else timeout
        while True:
            reply = self._next_packet(wait)
            if _is_console(reply):
                self.console(rsp.unhexlify(reply[1:]).decode("utf-8", "replace"))
                continue
            return reply

    def _checked(self, payload: bytes) -> bytes:
        reply = self.request(payload)
        if reply.startswith(b"E") and len(reply) == 3:
            what = payload[:24].decode("latin-1")
            raise RemoteError(f"the stub refused {what!r}: error {reply[1:].decode()}")
        return reply

    # -- target description
    def _read_layout(self) -> list[RegInfo]:
        xml, off = b"", 0
        while True:
            reply = self._checked(f"qXfer:features:read:target.xml:{off:x},{0xFFB:x}".encode())
            if not reply or reply[:1] not in (b"m", b"l"):
                raise RemoteError("the stub sent no target description")
            chunk = rsp.unescape(reply[1:])
            xml += chunk
            off += len(chunk)
            if reply[:1] == b"l":
                break
        root = ET.fromstring(xml.decode())
        regs, num = [], 0
        for reg in root.iter("reg"):
            num = int(reg.get("regnum", num))
            regs.append((num, reg.get("name", ""), int(reg.get("bitsize", "64"))))
            num += 1
        regs.sort()
        out, offset = [], 0
        for num, name, bits in regs:
            out.append(RegInfo(name, num, bits, offset))
            offset += bits // 8
        return out

    # -- state
    def read_registers(self) -> dict[str, int]:
        reply = self._checked(b"g")
        data = reply.decode("latin-1")
        out: dict[str, int] = {}
        for r in self.registers:
            text = data[2 * r.offset: 2 * (r.offset + r.bits // 8)]
            if text and "x" not in text:
                out[r.name] = int.from_bytes(bytes.fromhex(text), "little")
        return out

    def write_register(self, name: str, value: int) -> None:
        r = self.by_name.get(name)
        if r is None:
            raise RemoteError(f"no register {name!r}")
        data = (value & ((1 << r.bits) - 1)).to_bytes(r.bits // 8, "little")
        if self._checked(f"P{r.regnum:x}=".encode() + rsp.hexlify(data)) != b"OK":
            raise RemoteError(f"cannot write {name}")

    def read_memory(self, addr: int, size: int) -> bytes:
        out = bytearray()
        while size > 0:
            n = min(size, MAX_READ)
            reply = self.request(f"m{addr:x},{n:x}".encode())
            if reply.startswith(b"E"):
                break
            chunk = rsp.unhexlify(reply)
            if not chunk:
                break
            out += chunk
            addr += len(chunk)
            size -= len(chunk)
            if len(chunk) < n:
                break
        if not out:
            raise RemoteError(f"cannot access memory at {addr:#x}")
        return bytes(out)

    def write_memory(self, addr: int, data: bytes) -> None:
        for pos in range(0, len(data), MAX_READ):
            chunk = data[pos:pos + MAX_READ]
            if self.request(f"M{addr + pos:x},{len(chunk):x}:".encode() + rsp.hexlify(chunk)) != b"OK":
                raise RemoteError(f"cannot access memory at {addr + pos:#x}")

    def set_point(self, insert: bool, kind: int, addr: int, length: int) -> None:
        reply = self._checked(f"{'Z' if insert else 'z'}{kind},{addr:x},{length:x}".encode())
        if reply != b"OK":
            raise RemoteError("the stub does not support this breakpoint type")

    def monitor(self, text: str) -> str:
        out: list[str] = []
        saved = self.console
        self.console = out.append
        try:
            reply = self.request(b"qRcmd," + rsp.hexlify(text.encode()))
        finally:
            self.console = saved
        if reply == b"":
            raise RemoteError("the stub has no monitor commands")
        if reply.startswith(b"E") and len(reply) == 3:
            raise RemoteError(f"monitor {text!r} failed: error {reply[1:].decode()}")
        if reply != b"OK":
            out.append(rsp.unhexlify(reply).decode("utf-8", "replace"))
        return "".join(out)

    # -- threads (on a bare-metal machine, one per CPU)
    def threads(self) -> list[tuple[int, str]]:
        """(thread id, description) of every thread the stub lists."""
        ids: list[int] = []
        reply = self._checked(b"qfThreadInfo")
        while reply.startswith(b"m"):
            ids += [int(t.split(b".")[-1], 16) for t in reply[1:].split(b",") if t]
            reply = self._checked(b"qsThreadInfo")
        out = []
        for tid in ids:
            extra = self.request(f"qThreadExtraInfo,{tid:x}".encode())
            text = "" if extra.startswith(b"E") else rsp.unhexlify(extra).decode("utf-8", "replace")
            out.append((tid, text))
        return out

    def select_thread(self, tid: int) -> None:
        """Registers, memory and steps act on thread ``tid`` from now until the next stop."""
        if self._checked(f"Hg{tid:x}".encode()) != b"OK":
            raise RemoteError(f"no thread {tid}")
        self.thread = tid

    # -- running
    def resume(self, step: bool) -> StopReply:
        """Continue or step (the selected thread); wait for the stop (Ctrl-C sends the
        interrupt and keeps waiting).  The thread that stopped is selected afterwards."""
        self.interrupted = False
        if step and self.thread is not None:
            self._send(f"vCont;s:{self.thread:x}".encode())
        else:
            self._send(b"vCont;s" if step else b"vCont;c")
        self.thread = None
        while True:
            try:
                reply = self._next_packet(None)
            except KeyboardInterrupt:
                if self.interrupted:
                    raise
                self.interrupted = True
                self.sock.sendall(rsp.INTERRUPT)
                continue
            if _is_console(reply):
                self.console(rsp.unhexlify(reply[1:]).decode("utf-8", "replace"))
                continue
            self.last_stop = StopReply.parse(reply)
            return self.last_stop

    def detach(self) -> None:
        try:
            self.request(b"D")
        finally:
            self.close()

    def kill(self) -> None:
        try:
            self._send(b"vKill;1")
        finally:
            self.close()


def _is_console(reply: bytes) -> bool:
    return len(reply) > 1 and reply[:1] == b"O" and len(reply) % 2 == 1 and \
        all(c in b"0123456789abcdefABCDEF" for c in reply[1:])


# ====================================================================== the shell's state
@dataclass(slots=True)
class Point:
    number: int
    kind: str                           # "break", "watch", "rwatch", "awatch"
    addr: int
    length: int = 1
    temporary: bool = False


_Z_KIND = {"break": 0, "watch": 2, "rwatch": 3, "awatch": 4}


@dataclass(slots=True)
class Target:
    """What every command gets: the connection and the shell's own state."""
    remote: Remote
    points: dict[int, Point] = field(default_factory=dict)
    next_point: int = 1
    _symbols: dict[str, int] | None = None
    _by_addr: list[tuple[int, str]] = field(default_factory=list)
    exited: bool = False

    # -- symbols (from the stub)
    def symbols(self) -> dict[str, int]:
        if self._symbols is None:
            syms: dict[str, int] = {}
            try:
                text = self.remote.monitor("symbols")
            except RemoteError:
                text = ""
            for line in text.splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[0].startswith("0x"):
                    syms[parts[1]] = int(parts[0], 16)
            self._symbols = syms
            self._by_addr = sorted((a, n) for n, a in syms.items())
        return self._symbols

    def symbolize(self, addr: int) -> str:
        """'<name+off>' for an address inside the kernel's symbols, else ''."""
        self.symbols()
        lo, hi = 0, len(self._by_addr)
        while lo < hi:
            mid = (lo + hi) // 2
            if self._by_addr[mid][0] <= addr:
                lo = mid + 1
            else:
                hi = mid
        if lo == 0:
            return ""
        base, name = self._by_addr[lo - 1]
        off = addr - base
        if off > 0x10000:
            return ""
        return f"<{name}+{off:#x}>" if off else f"<{name}>"

    def eval(self, text: str, regs: dict[str, int] | None = None) -> int:
        """ADDR expressions: numbers (0x.., decimal), $registers, symbols, joined by + and -."""
        text = text.strip()
        if not text:
            raise CommandError("missing address")
        tokens = re.findall(r"[+-]|[^+\s-]+", text)
        total, sign, expect_term = 0, 1, True
        for tok in tokens:
            if tok in "+-":
                if expect_term and tok == "-":
                    sign = -sign
                    continue
                if expect_term:
                    raise CommandError(f"bad expression {text!r}")
                sign = 1 if tok == "+" else -1
                expect_term = True
                continue
            if not expect_term:
                raise CommandError(f"bad expression {text!r}")
            total += sign * self._term(tok, regs)
            sign, expect_term = 1, False
        if expect_term:
            raise CommandError(f"bad expression {text!r}")
        return total & 0xFFFF_FFFF_FFFF_FFFF

    def _term(self, tok: str, regs: dict[str, int] | None) -> int:
        if tok.startswith("$"):
            name = tok[1:].lower()
            name = {"pc": "rip", "sp": "rsp", "fp": "rbp", "rflags": "eflags"}.get(name, name)
            regs = regs if regs is not None else self.remote.read_registers()
            if name not in regs and name not in REGISTER_VIEWS:
                raise CommandError(f"no register {tok}")
            return register_value(regs, name)
        try:
            return int(tok, 0)
        except ValueError:
            pass
        syms = self.symbols()
        if tok in syms:
            return syms[tok]
        raise CommandError(f"no symbol {tok!r} (and not a number or $register)")

    def bits(self, regs: dict[str, int] | None = None) -> int:
        """64 in long mode, else 32 (the decoding mode for disas/asm)."""
        regs = regs if regs is not None else self.remote.read_registers()
        return 64 if regs.get("efer", EFER_LMA) & EFER_LMA else 32


# ====================================================================== commands
def _register_views() -> dict[str, tuple[str, int, int]]:
    """Partial-register names -> (full register, shift, bits): eax, ax, al, ah, r8d, ..."""
    views: dict[str, tuple[str, int, int]] = {}
    for x in "abcd":
        full = f"r{x}x"
        views.update({f"e{x}x": (full, 0, 32), f"{x}x": (full, 0, 16), f"{x}l": (full, 0, 8),
                      f"{x}h": (full, 8, 8)})
    for x in ("si", "di", "bp", "sp"):
        views.update({f"e{x}": (f"r{x}", 0, 32), x: (f"r{x}", 0, 16), f"{x}l": (f"r{x}", 0, 8)})
    for i in range(8, 16):
        views.update({f"r{i}d": (f"r{i}", 0, 32), f"r{i}w": (f"r{i}", 0, 16), f"r{i}b": (f"r{i}", 0, 8),
                      f"r{i}l": (f"r{i}", 0, 8)})
    views.update({"eip": ("rip", 0, 32), "ip": ("rip", 0, 16), "rflags": ("eflags", 0, 32),
                  "flags": ("eflags", 0, 16)})
    return views


REGISTER_VIEWS = _register_views()


def register_value(regs: dict[str, int], name: str) -> int:
    """A register by name, or a 32/16/8-bit view of one (eax, ax, al, ah, r8d, ...)."""
    name = name.lstrip("$").lower()
    if name in regs:
        return regs[name]
    view = REGISTER_VIEWS.get(name)
    if view is None or view[0] not in regs:
        raise CommandError(f"no register {name!r}")
    full, shift, bits = view
    return (regs[full] >> shift) & ((1 << bits) - 1)


def cmd_regs(t: Target, out: TextIO, arg: str) -> None:
    """regs [all|NAME...]: registers (all: with x87, SSE); NAME may be a part (eax, ax, al, r8d)."""
    regs = t.remote.read_registers()
    names = arg.split()
    if names and names != ["all"]:
        for n in names:
            v = register_value(regs, n)
            n = n.lstrip("$").lower()
            out.write(f"{n:<9} {v:#x} ({v})\n")
        return
    gprs = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"]
    for i in range(0, 16, 4):
        out.write(" ".join(f"{n.upper():<3}={regs.get(n, 0):016x}" for n in gprs[i:i + 4]) + "\n")
    fl = regs.get("eflags", 0)
    flags = " ".join(n for n, b in EFLAGS_BITS if fl >> b & 1)
    rip = regs.get("rip", 0)
    out.write(f"RIP={rip:016x} {t.symbolize(rip)} RFL={fl:08x} [ {flags} ]\n")
    segs = ("cs", "ss", "ds", "es", "fs", "gs")
    out.write(" ".join(f"{n.upper()}={regs.get(n, 0):04x}" for n in segs) + "\n")
    bases = ("fs_base", "gs_base", "k_gs_base")
    out.write(" ".join(f"{n.upper()}={regs.get(n, 0):016x}" for n in bases) + "\n")
    out.write(" ".join(f"{n.upper()}={regs.get(n, 0):x}" for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer"))
              + "\n")
    if names == ["all"]:
        for i in range(8):
            out.write(f"ST{i}={regs.get(f'st{i}', 0):020x} ")
            if i % 4 == 3:
                out.write("\n")
        fpu = ("fctrl", "fstat", "ftag", "fop")
        out.write(" ".join(f"{n.upper()}={regs.get(n, 0):04x}" for n in fpu) + "\n")
        for i in range(16):
            out.write(f"XMM{i:02d}={regs.get(f'xmm{i}', 0):032x}" + ("\n" if i % 2 else " "))
        out.write(f"MXCSR={regs.get('mxcsr', 0):08x}\n")


_X_RE = re.compile(r"^/(\d*)([xduoci]?)([bhwg]?)$")
_SIZES = {"b": 1, "h": 2, "w": 4, "g": 8}


def parse_x_format(spec: str) -> tuple[int, str, int]:
    """QEMU monitor ``/Nfs``: count, format (x d u o c i), size in bytes (b h w g)."""
    m = _X_RE.match(spec)
    if not m:
        raise CommandError(f"bad format {spec!r}: use /Nfs with f in x,d,u,o,c,i and s in b,h,w,g "
                           "(e.g. /16xb)")
    count = int(m.group(1)) if m.group(1) else 1
    fmt = m.group(2) or "x"
    size = _SIZES[m.group(3)] if m.group(3) else (1 if fmt == "c" else 4)
    if count <= 0 or count > 0x10000:
        raise CommandError(f"bad count {count}")
    return count, fmt, size


def cmd_x(t: Target, out: TextIO, arg: str, spec: str = "") -> None:
    """x/Nfs ADDR: examine memory, QEMU monitor style (x/16xb $rsp, x/4i $pc, x/2g sym)."""
    count, fmt, size = parse_x_format(spec or "/1xw")
    addr = t.eval(arg)
    if fmt == "i":
        _disassemble(t, out, addr, count)
        return
    data = _read(t, addr, count * size)
    per_line = 8 if size == 1 else 16 // size
    for i in range(count):
        if i % per_line == 0:
            if i:
                out.write("\n")
            out.write(f"{addr + i * size:016x}:")
        v = int.from_bytes(data[i * size:(i + 1) * size], "little")
        if fmt == "x":
            out.write(f" 0x{v:0{size * 2}x}")
        elif fmt == "d":
            if v >> (8 * size - 1):
                v -= 1 << (8 * size)
            out.write(f" {v:>{size * 3}d}")
        elif fmt == "u":
            out.write(f" {v:>{size * 3}d}")
        elif fmt == "o":
            out.write(f" {v:#o}")
        else:
            out.write(" " + _printable(v & 0xFF))
    out.write("\n")


def _printable(b: int) -> str:
    if 32 <= b < 127:
        return f"'{chr(b)}'"
    return f"'\\x{b:02x}'"


def _read(t: Target, addr: int, n: int) -> bytes:
    try:
        data = t.remote.read_memory(addr, n)
    except RemoteError as e:
        raise CommandError(str(e)) from None
    if len(data) < n:
        raise CommandError(f"cannot access memory at {addr + len(data):#x}")
    return data


def _capstone(bits: int):
    import capstone
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64 if bits == 64 else capstone.CS_MODE_32)
    md.detail = True
    return md


def _disassemble(t: Target, out: TextIO, addr: int, count: int) -> None:
    regs = t.remote.read_registers()
    md = _capstone(t.bits(regs))
    try:
        code = t.remote.read_memory(addr, count * 15)
    except RemoteError as e:
        raise CommandError(str(e)) from None
    pc = regs.get("rip")
    n, end = 0, addr
    for ins in md.disasm(code, addr):
        mark = "=>" if ins.address == pc else "  "
        sym = t.symbolize(ins.address)
        out.write(f"{mark} {ins.address:#018x} {sym:<20} {ins.bytes.hex():<20} {ins.mnemonic} {ins.op_str}"
                  .rstrip() + "\n")
        n += 1
        end = ins.address + ins.size
        if n == count:
            return
    out.write(f"   {end:#018x} (cannot decode: {code[end - addr:end - addr + 4].hex(' ') or 'no bytes'})\n")


def cmd_disas(t: Target, out: TextIO, arg: str) -> None:
    """disas [ADDR] [N]: disassemble N instructions (default $pc, 10)."""
    words = arg.split()
    addr = t.eval(words[0]) if words else t.eval("$pc")
    n = int(words[1], 0) if len(words) > 1 else 10
    if len(words) > 2 or n <= 0:
        raise CommandError("usage: disas [ADDR] [N]")
    _disassemble(t, out, addr, n)


def cmd_asm(t: Target, out: TextIO, arg: str) -> None:
    """asm ADDR "INSTR; ...": assemble (keystone), check by disassembly (capstone), write."""
    try:
        words = shlex.split(arg)
    except ValueError as e:
        raise CommandError(f"usage: asm ADDR \"INSTR; ...\" ({e})") from None
    if len(words) < 2:
        raise CommandError('usage: asm ADDR "INSTR; ..."')
    addr = t.eval(words[0])
    source = " ".join(words[1:])
    code = assemble_checked(source, addr, t.bits())
    try:
        t.remote.write_memory(addr, code)
    except RemoteError as e:
        raise CommandError(str(e)) from None
    out.write(f"wrote {len(code)} bytes at {addr:#x}\n")
    _disassemble(t, out, addr, len(_split_statements(source)))


def _split_statements(source: str) -> list[str]:
    return [s.strip() for s in re.split(r"[;\n]", source) if s.strip()]


def assemble_checked(source: str, addr: int, bits: int = 64) -> bytes:
    """Assemble one statement at a time and refuse any that does not disassemble to itself."""
    from .build import assemble_snippet         # keystone in a child: '.text' crashes it
    md = _capstone(bits)
    code = bytearray()
    for stmt in _split_statements(source):
        at = addr + len(code)
        try:
            data = assemble_snippet(stmt, at, 64 if bits == 64 else 32)
        except ValueError as e:
            raise CommandError(f"cannot assemble {stmt!r}: {e}") from None
        if not data:
            raise CommandError(f"keystone produced no code for {stmt!r}")
        problem = check_round_trip(stmt, data, at, md)
        if problem:
            raise CommandError(f"refusing {stmt!r}: keystone encoded {data.hex(' ')} which is {problem}; "
                               "nothing written (use a register base: mov rbx, ADDR; mov rax, [rbx])")
        code += data
    if not code:
        raise CommandError("nothing to assemble")
    return bytes(code)


_ALIASES = [{"je", "jz"}, {"jne", "jnz"}, {"jb", "jc", "jnae"}, {"jae", "jnb", "jnc"}, {"ja", "jnbe"},
            {"jbe", "jna"}, {"jg", "jnle"}, {"jge", "jnl"}, {"jl", "jnge"}, {"jle", "jng"}, {"jp", "jpe"},
            {"jnp", "jpo"}, {"sal", "shl"}, {"mov", "movabs"}, {"ret", "retq"}, {"iret", "iretq"},
            {"sysret", "sysretq"}, {"pushf", "pushfq"}, {"popf", "popfq"}, {"sete", "setz"},
            {"setne", "setnz"}, {"cmove", "cmovz"}, {"cmovne", "cmovnz"}, {"xchg", "nop"}]
_SIZE_WORDS = re.compile(r"\b(byte|word|dword|qword|tbyte|xmmword|ymmword|fword)\s+(ptr\s+)?", re.I)


def _same_mnemonic(a: str, b: str) -> bool:
    a, b = a.lower(), b.lower()
    if a == b or a.startswith(b) or b.startswith(a):
        return True
    return any(a in s and b in s for s in _ALIASES)


def _split_operands(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def _number(text: str) -> int | None:
    text = text.replace(" ", "")
    if not text:
        return None
    try:
        total = 0
        for sign, tok in re.findall(r"([+-]?)([^+-]+)", text):
            v = int(tok, 0) if not tok.lower().endswith("h") else int(tok[:-1], 16)
            total += -v if sign == "-" else v
        return total
    except ValueError:
        return None


def check_round_trip(stmt: str, data: bytes, addr: int, md) -> str | None:
    """None if capstone reads ``data`` back as ``stmt``; else what it read instead."""
    insns = list(md.disasm(data, addr))
    if len(insns) != 1 or insns[0].size != len(data):
        text = "; ".join(f"{i.mnemonic} {i.op_str}" for i in insns) or "undecodable"
        return f"'{text}' (not one instruction)"
    ins = insns[0]
    shown = f"'{ins.mnemonic} {ins.op_str}'".replace(" '", "'")
    words = stmt.split(None, 1)
    prefixes = {"rep", "repe", "repz", "repne", "repnz", "lock"}
    mnem = words[0]
    rest = words[1] if len(words) > 1 else ""
    if mnem.lower() in prefixes and rest:
        more = rest.split(None, 1)
        mnem = f"{mnem} {more[0]}"
        rest = more[1] if len(more) > 1 else ""
    if not _same_mnemonic(mnem.split()[-1], ins.mnemonic.split()[-1]):
        return shown
    src_ops = _split_operands(rest)
    if not src_ops or len(src_ops) != len(ins.operands):
        return None                         # implicit operands: nothing to compare
    import capstone.x86 as cx
    for src, op in zip(src_ops, ins.operands):
        src = _SIZE_WORDS.sub("", src).strip()
        if op.type == cx.X86_OP_REG:
            if src.lower() != ins.reg_name(op.reg):
                return shown
        elif op.type == cx.X86_OP_IMM:
            v = _number(src)
            if v is None:
                continue                    # a label: keystone resolved it
            mask = (1 << (8 * max(op.size, 1))) - 1 if op.size < 8 else (1 << 64) - 1
            if (v - op.imm) & mask and (v - op.imm) & ((1 << 64) - 1):
                return shown
        elif op.type == cx.X86_OP_MEM:
            if _mem_differs(src, op.mem, ins):
                return shown
    return None


def _mem_differs(src: str, mem, ins) -> bool:
    seg = None
    m = re.match(r"^\s*([a-z]s)\s*:\s*(.*)$", src, re.I)
    if m:
        seg, src = m.group(1).lower(), m.group(2)
    m = re.match(r"^\s*\[(.*)\]\s*$", src)
    if not m:
        return False                        # e.g. a moffs form written without brackets
    base = index = None
    scale, disp = 1, 0
    for sign, term in re.findall(r"([+-]?)\s*([^+-]+)", m.group(1)):
        term = term.strip().lower()
        if "*" in term:
            a, b = (x.strip() for x in term.split("*", 1))
            reg, sc = (a, b) if not a[:1].isdigit() else (b, a)
            index, scale = reg, int(sc, 0)
            continue
        v = _number(term)
        if v is not None:
            disp += -v if sign == "-" else v
        elif base is None:
            base = term
        else:
            index = term
    cs_base = ins.reg_name(mem.base) if mem.base else None
    cs_index = ins.reg_name(mem.index) if mem.index else None
    cs_seg = ins.reg_name(mem.segment) if mem.segment else None
    if base != cs_base or index != cs_index:
        return True
    if index is not None and scale != mem.scale:
        return True
    if seg is not None and cs_seg is not None and seg != cs_seg:
        return True
    return (disp - mem.disp) & ((1 << 64) - 1) != 0


def cmd_set(t: Target, out: TextIO, arg: str, spec: str = "") -> None:
    """set $REG VALUE | set[/b|/h|/w|/g] ADDR VALUE: write a register or memory (default a byte)."""
    words = arg.split()
    if len(words) != 2:
        raise CommandError("usage: set $REG VALUE, or set/SIZE ADDR VALUE with SIZE b, h, w or g")
    target_text, value_text = words
    value = t.eval(value_text)
    if target_text.startswith("$") and not spec:
        name = target_text[1:].lower()
        name = {"pc": "rip", "sp": "rsp", "rflags": "eflags"}.get(name, name)
        try:
            t.remote.write_register(name, value)
        except RemoteError as e:
            raise CommandError(str(e)) from None
        out.write(f"{name} = {value:#x}\n")
        return
    size = _SIZES.get(spec.lstrip("/"), 0) if spec else 1
    if not size:
        raise CommandError(f"bad size {spec!r}: use /b, /h, /w or /g")
    addr = t.eval(target_text)
    try:
        t.remote.write_memory(addr, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
    except RemoteError as e:
        raise CommandError(str(e)) from None
    out.write(f"{addr:#x} <- {value:#x} ({size} byte{'s' if size > 1 else ''})\n")


def _add_point(t: Target, out: TextIO, kind: str, addr: int, length: int, temporary: bool = False) -> Point:
    try:
        t.remote.set_point(True, _Z_KIND[kind], addr, length if kind != "break" else 1)
    except RemoteError as e:
        raise CommandError(str(e)) from None
    p = Point(0 if temporary else t.next_point, kind, addr, length, temporary)
    if not temporary:
        t.next_point += 1
    t.points[p.number] = p
    if not temporary:
        what = "breakpoint" if kind == "break" else f"{kind}point" if kind == "watch" else kind
        out.write(f"{what} {p.number} at {addr:#x} {t.symbolize(addr)}".rstrip()
                  + (f", {length} bytes" if kind != "break" else "") + "\n")
    return p


def cmd_break(t: Target, out: TextIO, arg: str) -> None:
    """break ADDR: breakpoint (ADDR: number, symbol, $reg, sums)."""
    _add_point(t, out, "break", t.eval(arg), 1)


def _watch_cmd(kind: str) -> Callable[[Target, TextIO, str], None]:
    def cmd(t: Target, out: TextIO, arg: str) -> None:
        words = arg.split()
        if not 1 <= len(words) <= 2:
            raise CommandError(f"usage: {kind} ADDR [LENGTH]")
        length = int(words[1], 0) if len(words) == 2 else 4
        _add_point(t, out, kind, t.eval(words[0]), length)
    cmd.__doc__ = {"watch": "watch ADDR [LEN]: stop after a write to LEN bytes (default 4)",
                   "rwatch": "rwatch ADDR [LEN]: stop after a read",
                   "awatch": "awatch ADDR [LEN]: stop after a read or a write"}[kind]
    return cmd


def cmd_delete(t: Target, out: TextIO, arg: str) -> None:
    """delete [N...|all]: remove breakpoints/watchpoints (all without argument)."""
    words = arg.split()
    numbers = list(t.points) if not words or words == ["all"] else []
    for w in words:
        if w == "all":
            continue
        try:
            numbers.append(int(w))
        except ValueError:
            raise CommandError(f"bad breakpoint number {w!r}") from None
    for n in numbers:
        p = t.points.pop(n, None)
        if p is None:
            raise CommandError(f"no breakpoint number {n}")
        try:
            t.remote.set_point(False, _Z_KIND[p.kind], p.addr, p.length if p.kind != "break" else 1)
        except RemoteError as e:
            raise CommandError(str(e)) from None
    out.write(f"deleted {len(numbers)}\n")


def cmd_points(t: Target, out: TextIO, arg: str) -> None:
    """breakpoints: list breakpoints and watchpoints."""
    if not t.points:
        out.write("no breakpoints or watchpoints\n")
    for p in t.points.values():
        out.write(f"{p.number:<3} {p.kind:<6} {p.addr:#018x} {t.symbolize(p.addr)}".rstrip()
                  + (f" len {p.length}" if p.kind != "break" else "") + "\n")


def _report_where_now(t: Target, out: TextIO) -> None:
    pc = t.remote.read_registers().get("rip", 0)
    out.write(f"stopped at {pc:#x} {t.symbolize(pc)}".rstrip() + "\n")


def _report_stop(t: Target, out: TextIO, stop: StopReply) -> None:
    if stop.exited is not None:
        t.exited = True
        if stop.exited >= 0:
            out.write(f"the guest exited with status {stop.exited}\n")
        else:
            out.write(f"the machine ended ({SIGNAL_NAMES.get(-stop.exited, -stop.exited)})\n")
        return
    regs = t.remote.read_registers()
    pc = regs.get("rip", 0)
    where = f"{pc:#x} {t.symbolize(pc)}".rstrip()
    if stop.reason in ("swbreak", "hwbreak"):
        nums = [p.number for p in t.points.values() if p.kind == "break" and p.addr == pc and not p.temporary]
        label = f"breakpoint {nums[0]}" if nums else "breakpoint"
        out.write(f"stopped: {label} at {where}\n")
    elif stop.reason:
        da = stop.data_addr or 0
        nums = [p.number for p in t.points.values()
                if p.kind == stop.reason and p.addr <= da < p.addr + p.length]
        label = f"{stop.reason}point" if stop.reason == "watch" else stop.reason
        out.write(f"stopped: {label}{' ' + str(nums[0]) if nums else ''} ({da:#x} {t.symbolize(da)}".rstrip()
                  + f") at {where}\n")
    elif stop.signal == 2:
        out.write(f"stopped: interrupted at {where}\n")
    elif stop.signal != 5:
        out.write(f"stopped: {SIGNAL_NAMES.get(stop.signal, stop.signal)} at {where}\n")
    if stop.thread is not None and stop.thread != 1:
        out.write(f"in thread {stop.thread}\n")
    _disassemble(t, out, pc, 1)


def _running(t: Target) -> None:
    if t.exited:
        raise CommandError("the guest has exited")


def cmd_step(t: Target, out: TextIO, arg: str) -> None:
    """step [N]: execute N instructions (default 1); Ctrl-C stops after the current one."""
    _running(t)
    n = int(arg, 0) if arg.strip() else 1
    if n <= 0:
        raise CommandError("usage: step [N] with N >= 1")
    stop = None
    done = 0
    interrupted = False
    try:
        for _ in range(n):
            stop = t.remote.resume(step=True)
            done += 1
            if t.remote.interrupted:
                interrupted = True
                break
            if stop.exited is not None or stop.signal != 5 or stop.reason:
                break
    except KeyboardInterrupt:              # Ctrl-C between two steps: the machine is stopped
        interrupted = True
    if interrupted and done < n:
        out.write(f"interrupted after {done} of {n} steps\n")
    if stop is None:
        _report_where_now(t, out)
        return
    _report_stop(t, out, stop)


def cmd_next(t: Target, out: TextIO, arg: str) -> None:
    """next: one instruction, stepping over calls."""
    _running(t)
    regs = t.remote.read_registers()
    pc = regs["rip"]
    md = _capstone(t.bits(regs))
    ins = next(md.disasm(_read(t, pc, 15), pc), None)
    if ins is None or not ins.mnemonic.startswith("call"):
        cmd_step(t, out, "")
        return
    temp = _add_point(t, out, "break", pc + ins.size, 1, temporary=True)
    try:
        stop = t.remote.resume(step=False)
    finally:
        t.points.pop(temp.number, None)
        if not t.exited:
            try:
                t.remote.set_point(False, 0, temp.addr, 1)
            except RemoteError:
                pass
    _report_stop(t, out, stop)


def cmd_continue(t: Target, out: TextIO, arg: str) -> None:
    """continue: run until a breakpoint, a watchpoint, Ctrl-C or the end."""
    _running(t)
    _report_stop(t, out, t.remote.resume(step=False))


def cmd_threads(t: Target, out: TextIO, arg: str) -> None:
    """threads: the threads (a bare-metal machine's CPUs, a VM kernel's fibers); * marks the selected one."""
    current = t.remote.thread if t.remote.thread is not None else t.remote.last_stop.thread
    for tid, text in t.remote.threads():
        out.write(f"{'*' if tid == current else ' '} {tid:>3}  {text}\n")


def cmd_thread(t: Target, out: TextIO, arg: str) -> None:
    """thread [N]: select thread N (regs, x, set, step act on it until the next stop), or show the selected one."""
    if arg.strip():
        try:
            t.remote.select_thread(int(arg, 0))
        except (ValueError, RemoteError) as e:
            raise CommandError(f"thread {arg.strip()}: {e}") from None
    current = t.remote.thread if t.remote.thread is not None else t.remote.last_stop.thread
    out.write(f"thread {current}\n")
    if arg.strip():
        _report_where_now(t, out)


def _monitor_cmd(name: str, doc: str) -> Callable[[Target, TextIO, str], None]:
    def cmd(t: Target, out: TextIO, arg: str) -> None:
        try:
            text = t.remote.monitor(f"{name} {arg}".strip())
        except RemoteError as e:
            raise CommandError(str(e)) from None
        out.write(text if text.endswith("\n") else text + "\n")
        if text.startswith("error:"):
            raise CommandError(text.strip()[len("error:"):].strip())
    cmd.__doc__ = doc
    return cmd


def cmd_monitor(t: Target, out: TextIO, arg: str) -> None:
    """monitor TEXT: any monitor command of the stub ('monitor help' lists them)."""
    _monitor_cmd(arg.strip(), "")(t, out, "")


def cmd_detach(t: Target, out: TextIO, arg: str) -> None:
    """detach: remove breakpoints and let the machine run on; ends the shell."""
    t.remote.detach()
    t.exited = True
    out.write("detached\n")
    raise _Quit()


def cmd_kill(t: Target, out: TextIO, arg: str) -> None:
    """kill: end the machine (vmk boot exits); ends the shell."""
    t.remote.kill()
    t.exited = True
    out.write("killed\n")
    raise _Quit()


def cmd_quit(t: Target, out: TextIO, arg: str) -> None:
    """quit: leave the shell (detaches: the machine runs on)."""
    if not t.exited:
        try:
            t.remote.detach()
        except RemoteError:
            pass
    raise _Quit()


def cmd_help(t: Target, out: TextIO, arg: str) -> None:
    """help [COMMAND]: this list, or one command's help."""
    name = arg.strip()
    if name:
        c = COMMANDS.get(ALIASES.get(name, name))
        if c is None:
            raise CommandError(f"no command {name!r}")
        out.write((c.__doc__ or name) + "\n")
        return
    for n, c in COMMANDS.items():
        out.write(f"  {(c.__doc__ or n).splitlines()[0]}\n")
    out.write("  aliases: " + ", ".join(f"{a}={n}" for a, n in ALIASES.items()) + "\n")


class _Quit(Exception):
    pass


COMMANDS: dict[str, Callable[..., None]] = {
    "regs": cmd_regs, "x": cmd_x, "disas": cmd_disas, "asm": cmd_asm, "set": cmd_set,
    "break": cmd_break, "watch": _watch_cmd("watch"), "rwatch": _watch_cmd("rwatch"),
    "awatch": _watch_cmd("awatch"), "delete": cmd_delete, "breakpoints": cmd_points,
    "step": cmd_step, "next": cmd_next, "continue": cmd_continue, "threads": cmd_threads, "thread": cmd_thread,
    "run-for": _monitor_cmd("run-for", "run-for DURATION: run this much virtual time (10ms, 2s)"),
    "fibers": _monitor_cmd("fibers", "fibers: the VM kernel's fibers"),
    "channels": _monitor_cmd("channels", "channels: the VM kernel's channels"),
    "containers": _monitor_cmd("containers", "containers: the VM kernel's containers"),
    "irq": _monitor_cmd("irq", "irq: interrupt controllers and delivery counts"),
    "devices": _monitor_cmd("devices", "devices: port and MMIO maps, device state"),
    "time": _monitor_cmd("time", "time: virtual time and instructions retired"),
    "monitor": cmd_monitor, "detach": cmd_detach, "kill": cmd_kill, "quit": cmd_quit, "help": cmd_help,
}
ALIASES = {"b": "break", "c": "continue", "s": "step", "si": "step", "stepi": "step", "n": "next",
           "ni": "next", "d": "delete", "q": "quit", "exit": "quit", "info": "breakpoints", "r": "regs"}


def run_line(t: Target, out: TextIO, line: str) -> None:
    """Run one command line; raises CommandError (or RemoteError) when it fails."""
    line = line.strip()
    if not line or line.startswith("#"):
        return
    m = re.match(r"^([A-Za-z][\w-]*)(/\S*)?\s*(.*)$", line)
    if not m:
        raise CommandError(f"cannot parse {line!r}; 'help' lists the commands")
    name, spec, arg = m.group(1), m.group(2) or "", m.group(3)
    name = ALIASES.get(name, name)
    cmd = COMMANDS.get(name)
    if cmd is None:
        raise CommandError(f"unknown command {name!r}; 'help' lists the commands")
    if spec:
        if cmd not in (cmd_x, cmd_set):
            raise CommandError(f"{name} takes no /format")
        cmd(t, out, arg, spec)
    else:
        cmd(t, out, arg)


# ====================================================================== the shell
def _setup_readline(t: Target):
    try:
        import readline
    except ImportError:
        return None
    try:
        readline.read_history_file(HISTORY)
    except OSError:
        pass
    readline.set_history_length(2000)

    def complete(text: str, state: int) -> str | None:
        buf = readline.get_line_buffer()
        if " " not in buf.lstrip():
            options = [c for c in list(COMMANDS) + list(ALIASES) if c.startswith(text)]
        elif text.startswith("$"):
            options = ["$" + r.name for r in t.remote.registers if ("$" + r.name).startswith(text)] + \
                      [f"${a}" for a in ("pc", "sp") if f"${a}".startswith(text)]
        else:
            options = [s for s in t.symbols() if s.startswith(text)]
        options.sort()
        return options[state] if state < len(options) else None

    readline.set_completer(complete)
    readline.set_completer_delims(" \t\n;,+-")
    readline.parse_and_bind("tab: complete")
    return readline


def main(address: str, batch: str | None = None, out: TextIO | None = None) -> int:
    """``vmk debug``: 0, 1 when a batch command failed, 2 for a bad address or file."""
    from .units import parse_hostport
    out = out or sys.stdout
    try:
        host, port = parse_hostport(address)
    except ValueError as e:
        sys.stderr.write(f"vmk: {e}\n")
        return 2
    lines = None
    if batch is not None:
        try:
            with open(batch, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as e:
            sys.stderr.write(f"vmk: --batch {batch}: {e.strerror}\n")
            return 2
    try:
        remote = Remote(host, port, console=out.write)
    except RemoteError as e:
        sys.stderr.write(f"vmk: {e}\n")
        return 1
    t = Target(remote)
    try:
        if lines is not None:
            return _run_batch(t, out, lines)
        return _interactive(t, out)
    finally:
        remote.close()


def _run_batch(t: Target, out: TextIO, lines: list[str]) -> int:
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.strip().startswith("#"):
            continue
        out.write(f"(vmk) {line.strip()}\n")
        try:
            run_line(t, out, line)
        except _Quit:
            return 0
        except (CommandError, RemoteError) as e:
            out.flush()
            sys.stderr.write(f"vmk: line {number}: {line.strip()}: {e}\n")
            # A failed script must not leave the machine running unattended
            # (a CI job would wait for it for ever): end it, as 'kill' does.
            try:
                t.remote.kill()
            except (RemoteError, OSError):
                pass
            return 1
        out.flush()
    return 0


def _interactive(t: Target, out: TextIO) -> int:
    tty = sys.stdin.isatty()
    rl = _setup_readline(t) if tty else None
    if tty:
        _report_where(t, out)
    try:
        while True:
            try:
                line = input("(vmk) ") if tty else sys.stdin.readline()
            except EOFError:
                line = None
            except KeyboardInterrupt:
                out.write("\n")
                continue
            if line is None or (not tty and line == ""):
                cmd_quit(t, out, "")
            try:
                run_line(t, out, line)
            except (CommandError, RemoteError) as e:
                out.write(f"error: {e}\n")
                if isinstance(e, RemoteError) and "connection" in str(e):
                    return 1
            except KeyboardInterrupt:
                out.write("\n")
            out.flush()
    except _Quit:
        return 0
    finally:
        if rl is not None:
            try:
                rl.write_history_file(HISTORY)
            except OSError:
                pass


def _report_where(t: Target, out: TextIO) -> None:
    try:
        regs = t.remote.read_registers()
        pc = regs.get("rip", 0)
        out.write(f"attached; stopped at {pc:#x} {t.symbolize(pc)}  ('help' lists the commands)\n")
    except RemoteError as e:
        out.write(f"attached ({e})\n")
