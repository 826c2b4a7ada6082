"""GDB Remote Serial Protocol framing: pure bytes in, bytes out.

A packet is ``$payload#cc`` where ``cc`` is the modulo-256 sum of the payload
bytes in two lowercase hex digits.  ``}`` escapes ``$``, ``#``, ``}`` and
``*`` in binary data (the byte XOR 0x20); ``*`` run-length encodes repeats in
replies (``X*n`` = X repeated ``ord(n) - 29`` more times).  Outside a packet,
``+`` acknowledges, ``-`` asks for a retransmission, and a lone 0x03 is the
client's interrupt request (Ctrl-C).  After ``QStartNoAckMode`` both sides
stop sending ``+``/``-``.

:class:`Decoder` is an incremental parser used by both ends (the stub in
``gdbstub.py`` and the client in ``debugshell.py``): feed it whatever the
socket gave, get events back.  It never raises on malformed input: bytes
outside packets are skipped, a bad checksum becomes :class:`BadPacket` (the
receiver answers ``-``), an over-long packet is dropped and reported as
:class:`BadPacket` too.  No I/O and no state beyond the partial packet.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Packet", "BadPacket", "Ack", "Nack", "Interrupt", "Event", "Decoder", "checksum", "frame",
           "escape", "unescape", "rle_decode", "hexlify", "unhexlify", "MAX_PACKET", "INTERRUPT"]

MAX_PACKET = 0x4000 * 4             # generous: our PacketSize is 0x4000; anything longer is garbage
INTERRUPT = b"\x03"
_START = ord("$")
_END = ord("#")
_ESC = ord("}")
_RLE = ord("*")
_ESCAPED = frozenset(b"$#}*")
_HEX = frozenset(b"0123456789abcdefABCDEF")
# Two checksum digits (either case) -> their value: one dict look-up checks and converts them.
_SUM_DIGITS = {bytes((a, b)): int(bytes((a, b)), 16) for a in _HEX for b in _HEX}


@dataclass(frozen=True, slots=True)
class Packet:
    payload: bytes                  # still escaped; binary packets (X, vFile) call unescape()


@dataclass(frozen=True, slots=True)
class BadPacket:
    payload: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class Ack:
    pass


@dataclass(frozen=True, slots=True)
class Nack:
    pass


@dataclass(frozen=True, slots=True)
class Interrupt:
    pass


Event = Packet | BadPacket | Ack | Nack | Interrupt


def checksum(payload: bytes) -> int:
    return sum(payload) & 0xFF


def frame(payload: bytes | str) -> bytes:
    """``$payload#cc``.  The payload must already be escaped if it is binary."""
    if isinstance(payload, str):
        payload = payload.encode("latin-1")
    return b"$%b#%02x" % (payload, sum(payload) & 0xFF)


def escape(data: bytes) -> bytes:
    """Binary data for a packet payload (``}`` + byte ^ 0x20 for ``$#}*``)."""
    out = bytearray()
    for b in data:
        if b in _ESCAPED:
            out += bytes((_ESC, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    """Inverse of :func:`escape`; a trailing lone ``}`` raises ValueError."""
    out = bytearray()
    it = iter(data)
    for b in it:
        if b == _ESC:
            try:
                out.append(next(it) ^ 0x20)
            except StopIteration:
                raise ValueError("binary data ends with an escape character") from None
        else:
            out.append(b)
    return bytes(out)


def rle_decode(payload: bytes) -> bytes:
    """Expand ``X*n`` run-length encoding (replies only; ``n`` is ``count + 29``)."""
    if b"*" not in payload:
        return payload
    out = bytearray()
    i = 0
    n = len(payload)
    while i < n:
        b = payload[i]
        if b == _RLE and out and i + 1 < n:
            out += bytes((out[-1],)) * (payload[i + 1] - 29)
            i += 2
            continue
        out.append(b)
        i += 1
    return bytes(out)


def hexlify(data: bytes) -> bytes:
    return data.hex().encode()


def unhexlify(text: bytes | str) -> bytes:
    """Hex digits -> bytes; raises ValueError on odd length or a non-hex digit."""
    if isinstance(text, str):
        text = text.encode("latin-1")
    if len(text) % 2 or not _HEX.issuperset(text):
        raise ValueError(f"bad hex data {text[:40]!r}")
    return bytes.fromhex(text.decode())


class Decoder:
    """Incremental packet parser: ``feed(bytes) -> list[Event]``."""

    def __init__(self, max_packet: int = MAX_PACKET) -> None:
        self.max_packet = max_packet
        self._buf = bytearray()
        self._in_packet = False
        self._sum_digits: bytearray | None = None    # after '#': the checksum digits so far

    def reset(self) -> None:
        self._buf.clear()
        self._in_packet = False
        self._sum_digits = None

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        if not self._in_packet:
            # Fast path: whole packets and single bytes between them, cut with
            # find() instead of a Python step per byte (gdb sends about 11
            # packets per stepi; this was ~14 us of each); a packet that is
            # not complete in ``data`` goes on byte by byte below.
            i, n = 0, len(data)
            while i < n:
                b = data[i]
                if b != _START:
                    if b == 0x2B:
                        events.append(Ack())
                    elif b == 0x2D:
                        events.append(Nack())
                    elif b == 0x03:
                        events.append(Interrupt())
                    i += 1
                    continue
                j = data.find(b"#", i + 1)
                if j < 0 or j + 3 > n or j - i - 1 > self.max_packet or data.find(b"$", i + 1, j) >= 0:
                    break
                payload = data[i + 1:j]
                if _SUM_DIGITS.get(data[j + 1:j + 3]) == sum(payload) & 0xFF:
                    events.append(Packet(payload))
                else:
                    events.append(self._check(payload, data[j + 1:j + 3]))
                i = j + 3
            data = data[i:]
        for b in data:
            if not self._in_packet:
                if b == _START:
                    self._in_packet = True
                    self._buf.clear()
                    self._sum_digits = None
                elif b == 0x2B:                     # '+'
                    events.append(Ack())
                elif b == 0x2D:                     # '-'
                    events.append(Nack())
                elif b == 0x03:
                    events.append(Interrupt())
                # anything else between packets is noise: skip it
                continue
            if self._sum_digits is not None:
                self._sum_digits.append(b)
                if len(self._sum_digits) == 2:
                    events.append(self._finish())
                continue
            if b == _END:
                self._sum_digits = bytearray()
            elif b == _START:
                # A new packet starts before this one ended: the old one was truncated.
                events.append(BadPacket(bytes(self._buf), "truncated packet (new '$' before '#')"))
                self._buf.clear()
            else:
                self._buf.append(b)
                if len(self._buf) > self.max_packet:
                    reason = f"packet longer than {self.max_packet} bytes"
                    events.append(BadPacket(bytes(self._buf[:64]), reason))
                    self.reset()
        return events

    def _finish(self) -> Event:
        payload = bytes(self._buf)
        digits = bytes(self._sum_digits or b"")
        self.reset()
        return self._check(payload, digits)

    @staticmethod
    def _check(payload: bytes, digits: bytes) -> Event:
        if not _HEX.issuperset(digits):
            return BadPacket(payload, f"checksum {digits!r} is not hex")
        if int(digits, 16) != checksum(payload):
            return BadPacket(payload, f"bad checksum {digits.decode()} (computed {checksum(payload):02x})")
        return Packet(payload)
