"""Host back ends for the serial ports (QEMU's ``-serial``/``-chardev``).

A :class:`CharDev` is the host side of a UART: the device calls
``write(data, time_ns)`` with every byte the guest transmits, stamped with
the virtual time its stop bit ended.  Host input goes the other way without
ever blocking: the machine waits on ``fileno()`` with ``select()`` (or just
polls) and calls ``pump()``, which reads what ``read_available()`` returns and
hands it to the sink the UART attached (``UART16550.receive``).  The UART
meters the bytes into the guest at the line rate; the back end never has to
know about virtual time.

Back ends: :class:`NullChar`, :class:`MemoryChar` (tests), :class:`FileChar`
(output only), :class:`StdioChar`, :class:`TCPChar` (a listening server, one
client at a time) and :class:`PtyChar`.  :func:`parse_chardev` builds one
from a ``--serial`` spec.

Invariants: ``read_available()`` and ``write()`` never block on the host
(output that cannot be written at once to a socket or pty is buffered up to
a bound, then dropped and counted in ``dropped``); ``fileno()`` returns None
once there is nothing left to wait for (EOF on stdin, a closed device).

Not modelled: modem control lines and line parameters towards the host
(QEMU's serial ioctls), telnet negotiation, TLS, reconnecting client mode,
QEMU's ``mux`` (monitor on the same stdio).
"""
from __future__ import annotations

import atexit
import os
import select
import termios
import tty
from collections.abc import Callable
from typing import Any, Self

__all__ = [
    "CHARDEV_FORMS",
    "CharDev",
    "FileChar",
    "MemoryChar",
    "NullChar",
    "PtyChar",
    "StdioChar",
    "TCPChar",
    "parse_chardev",
]

CHARDEV_FORMS = "stdio, null, file:PATH, tcp:HOST:PORT, pty, mem"

_READ_CHUNK = 4096
_STDIN_FD, _STDOUT_FD = 0, 1         # the process's real stdio, whatever sys.stdin has become
_OUTPUT_BUFFER_LIMIT = 64 * 1024     # bytes kept for a slow socket/pty reader before dropping


class CharDev:
    """Base back end: no input, output discarded.  Subclasses override."""

    def __init__(self) -> None:
        self.eof = False                                   # host input has ended for good
        self._sink: Callable[[bytes], None] | None = None

    def write(self, data: bytes, time_ns: int) -> None:
        """Output from the guest, transmitted at virtual time ``time_ns``."""

    def fileno(self) -> int | None:
        """A descriptor ``select()`` can wait on for input, or None."""
        return None

    def read_available(self) -> bytes:
        """Host input that is available now, without blocking (b"" if none)."""
        return b""

    def close(self) -> None:
        """Release host resources (restore a terminal, close sockets)."""

    def attach(self, sink: Callable[[bytes], None]) -> None:
        """Set where :meth:`pump` delivers input (the UART's ``receive``)."""
        self._sink = sink

    def pump(self) -> int:
        """Move available host input to the attached sink; returns the byte count."""
        data = self.read_available()
        if data and self._sink is not None:
            self._sink(data)
        return len(data)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NullChar(CharDev):
    """``null``: output discarded, never any input."""


class MemoryChar(CharDev):
    """``mem``: records output and serves queued input; for tests.

    ``output`` holds every byte written; ``timeline`` the same bytes as
    ``(time_ns, byte)`` pairs, in order.  ``feed(data)`` queues input.
    """

    def __init__(self) -> None:
        super().__init__()
        self.output = bytearray()
        self.timeline: list[tuple[int, int]] = []
        self._input = bytearray()

    def write(self, data: bytes, time_ns: int) -> None:
        self.output += data
        self.timeline.extend((time_ns, b) for b in data)

    def feed(self, data: bytes) -> None:
        """Queue host input for :meth:`read_available` / :meth:`pump`."""
        self._input += data

    def read_available(self) -> bytes:
        data = bytes(self._input)
        self._input.clear()
        return data

    @property
    def text(self) -> str:
        """The output decoded as UTF-8 (undecodable bytes replaced)."""
        return self.output.decode("utf-8", "replace")

    def clear(self) -> None:
        self.output.clear()
        self.timeline.clear()


class FileChar(CharDev):
    """``file:PATH``: output written to a file (created or truncated, as QEMU); no input."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        # Unbuffered: someone may be following the file while the guest runs.
        self._file = open(path, "wb", buffering=0)     # noqa: SIM115 -- open for the device's life

    def write(self, data: bytes, time_ns: int) -> None:
        if not self._file.closed:
            self._file.write(data)

    def close(self) -> None:
        self._file.close()


def _write_all(fd: int, data: bytes) -> None:
    """Write everything to a blocking-or-not descriptor, waiting when it is full."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[n:]


class StdioChar(CharDev):
    """``stdio``: guest output to stdout, host stdin to the guest.

    When stdin is a terminal it is switched to the mode QEMU's ``-serial
    stdio`` uses: no echo, no line buffering, no CR/NL translation on input,
    8-bit clean, but ISIG kept so Ctrl-C still raises SIGINT; output post-
    processing (NL -> CR NL) stays on.  :meth:`close` (and interpreter exit)
    restores the previous settings.

    Discussion: stdin is *not* set O_NONBLOCK.  On a terminal stdin and stdout
    usually share one open file description, so O_NONBLOCK would also make
    stdout writes fail with EAGAIN.  Reads are made non-blocking by asking
    ``select()`` first, which is enough: a readable tty or pipe returns what
    it has without waiting.
    """

    def __init__(self, stdin_fd: int | None = None, stdout_fd: int | None = None) -> None:
        super().__init__()
        self._in = _STDIN_FD if stdin_fd is None else stdin_fd
        self._out = _STDOUT_FD if stdout_fd is None else stdout_fd
        self._saved_tty: list[Any] | None = None
        self._closed = False
        self._out_broken = False
        if os.isatty(self._in):
            self._saved_tty = termios.tcgetattr(self._in)
            termios.tcsetattr(self._in, termios.TCSANOW, _serial_stdio_mode(self._saved_tty))
            atexit.register(self._restore_tty)

    def write(self, data: bytes, time_ns: int) -> None:
        if self._closed or self._out_broken:
            return
        try:
            _write_all(self._out, data)
        except OSError:
            self._out_broken = True      # e.g. `vmk boot | head` went away: keep running

    def fileno(self) -> int | None:
        return None if self.eof or self._closed else self._in

    def read_available(self) -> bytes:
        if self.eof or self._closed:
            return b""
        readable, _, _ = select.select([self._in], [], [], 0)
        if not readable:
            return b""
        try:
            data = os.read(self._in, _READ_CHUNK)
        except BlockingIOError:
            return b""
        if not data:
            self.eof = True
        return data

    def _restore_tty(self) -> None:
        if self._saved_tty is not None:
            try:
                termios.tcsetattr(self._in, termios.TCSADRAIN, self._saved_tty)
            except termios.error:
                pass
            self._saved_tty = None

    def close(self) -> None:
        self._restore_tty()
        atexit.unregister(self._restore_tty)
        self._closed = True


def _serial_stdio_mode(attrs: list[Any]) -> list[Any]:
    """Terminal attributes like QEMU's stdio back end (signals kept)."""
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = attrs
    iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
               | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON)
    oflag |= termios.OPOST
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.IEXTEN)
    lflag |= termios.ISIG
    cflag = (cflag & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
    cc = list(cc)
    cc[termios.VMIN] = 1
    cc[termios.VTIME] = 0
    return [iflag, oflag, cflag, lflag, ispeed, ospeed, cc]


class _BufferedOutput:
    """Non-blocking writes to a socket or pty master with a bounded backlog."""

    def __init__(self) -> None:
        self.pending = bytearray()
        self.dropped = 0

    def queue(self, data: bytes) -> None:
        room = _OUTPUT_BUFFER_LIMIT - len(self.pending)
        if len(data) > room:
            self.dropped += len(data) - max(room, 0)
            data = data[:max(room, 0)]
        self.pending += data

    def flush(self, send: Callable[[bytes], int]) -> None:
        """Send what the peer takes now; raises OSError if the peer is gone."""
        while self.pending:
            try:
                n = send(bytes(self.pending))
            except BlockingIOError:
                return
            del self.pending[:n]


class TCPChar(CharDev):
    """``tcp:HOST:PORT``: a listening server like QEMU's ``server=on,wait=off``.

    One client at a time; further connections wait in the listen backlog
    until the current client disconnects.  Output while no client is
    connected is dropped (counted in ``dropped``).  A client that disconnects
    is not EOF: the server waits for the next one.  ``port`` is the bound port
    (useful with port 0).
    """

    def __init__(self, host: str, port: int) -> None:
        import socket                       # here: most runs have no TCP back end (3 ms of start-up)
        super().__init__()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, port))
        self._listener.listen(1)
        self._listener.setblocking(False)
        self.host = host
        self.port: int = self._listener.getsockname()[1]
        self._client: socket.socket | None = None
        self._out = _BufferedOutput()

    @property
    def connected(self) -> bool:
        return self._client is not None

    @property
    def dropped(self) -> int:
        return self._out.dropped

    def _accept(self) -> None:
        if self._client is not None or self._listener.fileno() < 0:
            return
        try:
            client, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        import socket
        client.setblocking(False)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._client = client
        self._out.pending.clear()

    def _drop_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self._out.pending.clear()

    def write(self, data: bytes, time_ns: int) -> None:
        self._accept()
        if self._client is None:
            self._out.dropped += len(data)
            return
        self._out.queue(data)
        try:
            self._out.flush(self._client.send)
        except OSError:
            self._drop_client()

    def fileno(self) -> int | None:
        if self._client is not None:
            return self._client.fileno()
        fd = self._listener.fileno()
        return fd if fd >= 0 else None

    def read_available(self) -> bytes:
        self._accept()
        client = self._client
        if client is None:
            return b""
        try:
            self._out.flush(client.send)
            data = client.recv(_READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError:
            self._drop_client()
            return b""
        if not data:
            self._drop_client()        # the client hung up; wait for the next
        return data

    def close(self) -> None:
        self._drop_client()
        self._listener.close()


class PtyChar(CharDev):
    """``pty``: a new pseudo-terminal; connect to ``path`` (e.g. ``screen PATH``).

    The slave side is put in raw mode (as QEMU does).  We keep our own slave
    descriptor open so the master does not see a hang-up between users;
    output beyond what the terminal buffers while nobody reads it is dropped
    (counted in ``dropped``).
    """

    def __init__(self) -> None:
        super().__init__()
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave, termios.TCSANOW)
        os.set_blocking(self._master, False)
        self.path: str = os.ttyname(self._slave)
        self._out = _BufferedOutput()

    @property
    def dropped(self) -> int:
        return self._out.dropped

    def _send(self, data: bytes) -> int:
        return os.write(self._master, data)

    def write(self, data: bytes, time_ns: int) -> None:
        if self._master < 0:
            return
        self._out.queue(data)
        try:
            self._out.flush(self._send)
        except OSError:
            self._out.dropped += len(self._out.pending)
            self._out.pending.clear()

    def fileno(self) -> int | None:
        return self._master if self._master >= 0 else None

    def read_available(self) -> bytes:
        if self._master < 0:
            return b""
        try:
            self._out.flush(self._send)
        except OSError:
            self._out.pending.clear()
        try:
            return os.read(self._master, _READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError:           # EIO: no slave open (cannot happen while we hold one)
            return b""

    def close(self) -> None:
        if self._master >= 0:
            os.close(self._master)
            os.close(self._slave)
            self._master = self._slave = -1


def parse_chardev(spec: str) -> CharDev:
    """Build a back end from a ``--serial`` spec (QEMU's spellings).

    Accepted: ``stdio``, ``null``, ``file:PATH``, ``tcp:HOST:PORT`` (empty
    HOST = all interfaces, ``[v6addr]`` allowed, QEMU's ``,server=on``,
    ``,wait=off``, ``,server``, ``,nowait`` suffixes accepted), ``pty``,
    ``mem``.  Raises ValueError naming the spec and the accepted forms.
    """
    def bad(why: str) -> ValueError:
        return ValueError(f"bad serial spec {spec!r}: {why}; expected one of {CHARDEV_FORMS}")

    kind, sep, arg = spec.partition(":")
    match kind:
        case "stdio" | "null" | "pty" | "mem" if sep:
            raise bad(f"{kind} takes no argument")
        case "stdio":
            return StdioChar()
        case "null":
            return NullChar()
        case "pty":
            return PtyChar()
        case "mem":
            return MemoryChar()
        case "file":
            if not arg:
                raise bad("file needs a path")
            return FileChar(arg)
        case "tcp":
            host, port = _parse_tcp(arg, bad)
            return TCPChar(host, port)
    raise bad("unknown back end")


_TCP_OPTIONS = {"server", "server=on", "nowait", "wait=off"}


def _parse_tcp(arg: str, bad: Callable[[str], ValueError]) -> tuple[str, int]:
    address, *options = arg.split(",")
    unsupported = [o for o in options if o not in _TCP_OPTIONS]
    if unsupported:
        raise bad(f"unsupported tcp option {unsupported[0]!r} (only a non-waiting server is provided)")
    host, sep, port_text = address.rpartition(":")
    if not sep:
        raise bad("tcp needs HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise bad("write an IPv6 host in brackets")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise bad(f"port {port_text!r} is not a number in 0..65535")
    return host or "0.0.0.0", int(port_text)
