"""Host serial back ends: spec parsing, memory, file, stdio, TCP and pty.

Real descriptors and loopback sockets are used, but every wait is a bounded
``select()`` on a descriptor, never a sleep.
"""
from __future__ import annotations

import os
import select
import socket
import termios

import pytest
from vmk.machine.chardev import (
    CharDev,
    FileChar,
    MemoryChar,
    NullChar,
    PtyChar,
    StdioChar,
    TCPChar,
    parse_chardev,
)

TIMEOUT = 5.0      # seconds; only ever reached when something is broken


def wait_readable(fd: int) -> None:
    readable, _, _ = select.select([fd], [], [], TIMEOUT)
    assert readable, "timed out waiting for input"


def read_until(dev: CharDev, n: int) -> bytes:
    """Collect ``n`` bytes of host input from ``dev``, waiting on its fileno()."""
    got = b""
    while len(got) < n:
        fd = dev.fileno()
        assert fd is not None
        wait_readable(fd)
        got += dev.read_available()
    return got


def os_read_exactly(fd: int, n: int) -> bytes:
    got = b""
    while len(got) < n:
        wait_readable(fd)
        got += os.read(fd, n - len(got))
    return got


# -- parse_chardev -------------------------------------------------------------------

def test_parse_accepts_every_form(tmp_path) -> None:
    made = [
        parse_chardev("null"),
        parse_chardev("mem"),
        parse_chardev(f"file:{tmp_path / 'out.txt'}"),
        parse_chardev("tcp:127.0.0.1:0"),
        parse_chardev("tcp:127.0.0.1:0,server=on,wait=off"),
        parse_chardev("pty"),
        parse_chardev("stdio"),
    ]
    try:
        kinds = [type(d) for d in made]
        assert kinds == [NullChar, MemoryChar, FileChar, TCPChar, TCPChar, PtyChar, StdioChar]
        assert made[2].path == str(tmp_path / "out.txt")
        assert made[3].host == "127.0.0.1" and made[3].port > 0
    finally:
        for d in made:
            d.close()


@pytest.mark.parametrize("spec", [
    "", "bogus", "file:", "file", "tcp:", "tcp:localhost", "tcp:127.0.0.1:",
    "tcp:127.0.0.1:x", "tcp:127.0.0.1:65536", "tcp:127.0.0.1:-1", "tcp:::1:4444",
    "tcp:127.0.0.1:4444,wait=on", "null:x", "stdio:1", "mem:", "pty:/dev/ttyS0", "STDIO",
])
def test_parse_refuses_bad_specs(spec: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_chardev(spec)
    message = str(info.value)
    assert repr(spec) in message
    assert "stdio, null, file:PATH, tcp:HOST:PORT, pty, mem" in message
    assert "\n" not in message


# -- memory, null, file -----------------------------------------------------------------

def test_memory_char_records_output_with_times_and_serves_input() -> None:
    mem = MemoryChar()
    mem.write(b"o", 100)
    mem.write(b"k\n", 250)
    assert mem.output == b"ok\n" and mem.text == "ok\n"
    assert mem.timeline == [(100, ord("o")), (250, ord("k")), (250, ord("\n"))]
    assert mem.fileno() is None and mem.read_available() == b""
    mem.feed(b"ab")
    mem.feed(b"c")
    assert mem.read_available() == b"abc"
    assert mem.read_available() == b""
    received: list[bytes] = []
    mem.attach(received.append)
    mem.feed(b"xyz")
    assert mem.pump() == 3 and received == [b"xyz"]
    assert mem.pump() == 0 and received == [b"xyz"]
    mem.clear()
    assert mem.output == b"" and mem.timeline == []


def test_null_char_discards() -> None:
    null = NullChar()
    null.write(b"gone", 1)
    assert null.read_available() == b"" and null.fileno() is None and not null.eof


def test_file_char_writes_through(tmp_path) -> None:
    path = tmp_path / "serial.log"
    path.write_bytes(b"old contents")
    dev = FileChar(str(path))
    assert path.read_bytes() == b""                # truncated, as QEMU's file back end
    dev.write(b"hello ", 10)
    assert path.read_bytes() == b"hello "          # visible before close (followers see it)
    dev.write(b"\x00\xffworld\n", 20)
    dev.close()
    assert path.read_bytes() == b"hello \x00\xffworld\n"
    assert dev.fileno() is None and dev.read_available() == b""


# -- stdio ---------------------------------------------------------------------------------

def test_stdio_char_with_pipes_is_non_blocking_and_sees_eof() -> None:
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    dev = StdioChar(stdin_fd=in_r, stdout_fd=out_w)
    try:
        assert dev.read_available() == b""         # nothing there: returns at once
        os.write(in_w, b"typed")
        assert read_until(dev, 5) == b"typed"
        dev.write(b"out\n", 0)
        assert os_read_exactly(out_r, 4) == b"out\n"
        os.close(in_w)
        wait_readable(in_r)
        assert dev.read_available() == b""
        assert dev.eof and dev.fileno() is None
    finally:
        dev.close()
        for fd in (in_r, out_r, out_w):
            os.close(fd)


def test_stdio_char_puts_a_terminal_in_serial_mode_and_restores_it() -> None:
    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        dev = StdioChar(stdin_fd=slave, stdout_fd=slave)
        attrs = termios.tcgetattr(slave)
        lflag, iflag = attrs[3], attrs[0]
        assert not lflag & (termios.ECHO | termios.ICANON)
        assert lflag & termios.ISIG                # Ctrl-C still interrupts vmk
        assert not iflag & termios.ICRNL
        os.write(master, b"a\r")                   # no line buffering, no CR->NL
        assert read_until(dev, 2) == b"a\r"
        dev.close()
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


# -- TCP ----------------------------------------------------------------------------------

def test_tcp_char_serves_one_client_at_a_time() -> None:
    dev = TCPChar("127.0.0.1", 0)
    try:
        dev.write(b"nobody listens", 1)
        assert dev.dropped == len(b"nobody listens") and not dev.connected
        client = socket.create_connection(("127.0.0.1", dev.port), timeout=TIMEOUT)
        try:
            wait_readable(dev.fileno())            # the listener: a connection is waiting
            assert dev.read_available() == b"" and dev.connected
            dev.write(b"hello", 2)
            assert client.recv(16) == b"hello"
            client.sendall(b"typed")
            assert read_until(dev, 5) == b"typed"
        finally:
            client.close()
        wait_readable(dev.fileno())
        assert dev.read_available() == b""         # hang-up: not EOF, back to listening
        assert not dev.connected and not dev.eof
        second = socket.create_connection(("127.0.0.1", dev.port), timeout=TIMEOUT)
        try:
            wait_readable(dev.fileno())
            dev.read_available()
            dev.write(b"again", 3)
            assert second.recv(16) == b"again"
        finally:
            second.close()
    finally:
        dev.close()


# -- pty -------------------------------------------------------------------------------------

def test_pty_char_round_trip_through_the_slave_path() -> None:
    dev = PtyChar()
    try:
        assert dev.path.startswith("/dev/")
        fd = os.open(dev.path, os.O_RDWR | os.O_NOCTTY)
        try:
            dev.write(b"guest\rout", 5)            # raw: no CR -> NL, no waiting for a line
            assert os_read_exactly(fd, 9) == b"guest\rout"
            os.write(fd, b"user\nin")              # raw: no NL -> CR NL; and no echo of
            assert read_until(dev, 7) == b"user\nin"     # "guest..." came back before it
            assert dev.read_available() == b""
        finally:
            os.close(fd)
    finally:
        dev.close()
    assert dev.fileno() is None and dev.read_available() == b""
