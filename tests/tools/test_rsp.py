"""RSP framing (tools/rsp.py): pure bytes in, events out."""
from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from vmk.tools import rsp
from vmk.tools.rsp import Ack, BadPacket, Decoder, Interrupt, Nack, Packet


def test_frame_known_checksums() -> None:
    # Checksums from the protocol documentation's examples and by hand.
    assert rsp.frame(b"OK") == b"$OK#9a"
    assert rsp.frame("g") == b"$g#67"
    assert rsp.frame(b"") == b"$#00"
    assert rsp.checksum(b"qSupported") == sum(b"qSupported") & 0xFF


def test_escape_round_trip_and_special_bytes() -> None:
    data = b"a$b#c}d*e\x00\xff"
    esc = rsp.escape(data)
    assert b"$" not in esc and b"#" not in esc and b"*" not in esc
    assert esc == b"a}\x04b}\x03c}]d}\x0ae\x00\xff"
    assert rsp.unescape(esc) == data
    with pytest.raises(ValueError):
        rsp.unescape(b"abc}")


@given(st.binary(max_size=200))
def test_escape_unescape_property(data: bytes) -> None:
    assert rsp.unescape(rsp.escape(data)) == data


def test_rle_decode() -> None:
    # '0* ' = '0' and ' ' (32) - 29 = 3 more repeats.
    assert rsp.rle_decode(b"0* ") == b"0000"
    assert rsp.rle_decode(b"ab*\"c") == b"abbbbbbc"         # '"' = 34 -> 5 more
    assert rsp.rle_decode(b"plain") == b"plain"


def test_hex_helpers() -> None:
    assert rsp.hexlify(b"\x01\xab") == b"01ab"
    assert rsp.unhexlify(b"01AB") == b"\x01\xab"
    for bad in (b"0", b"zz", b"0g"):
        with pytest.raises(ValueError):
            rsp.unhexlify(bad)


def test_decoder_events() -> None:
    d = Decoder()
    events = d.feed(b"+$g#67-\x03$m0,4#fd")
    assert events == [Ack(), Packet(b"g"), Nack(), Interrupt(), Packet(b"m0,4")]


def test_decoder_bad_checksum_and_noise() -> None:
    d = Decoder()
    events = d.feed(b"noise$g#00junk$OK#zz$OK#9a")
    assert isinstance(events[0], BadPacket) and "bad checksum" in events[0].reason
    assert isinstance(events[1], BadPacket) and "not hex" in events[1].reason
    assert events[2] == Packet(b"OK")


def test_decoder_truncated_packet_resyncs() -> None:
    d = Decoder()
    events = d.feed(b"$m1234,$g#67")
    assert isinstance(events[0], BadPacket) and "truncated" in events[0].reason
    assert events[1] == Packet(b"g")


def test_decoder_overlong_packet_is_dropped() -> None:
    d = Decoder(max_packet=16)
    events = d.feed(b"$" + b"a" * 40 + b"#00" + rsp.frame(b"g"))
    assert isinstance(events[0], BadPacket) and "longer" in events[0].reason
    assert events[-1] == Packet(b"g")


def test_decoder_byte_by_byte_equals_whole() -> None:
    stream = (b"+" + rsp.frame(b"qSupported:xmlRegisters=i386") + b"\x03"
              + rsp.frame(b"X100,3:" + rsp.escape(b"$#}")))
    whole = Decoder().feed(stream)
    d = Decoder()
    pieces = [e for i in range(len(stream)) for e in d.feed(stream[i:i + 1])]
    assert pieces == whole
    assert rsp.unescape(whole[-1].payload.split(b":", 1)[1]) == b"$#}"


@given(st.lists(st.binary(max_size=60), max_size=8), st.integers(0, 2**32 - 1))
def test_decoder_finds_every_frame_in_noise(payloads: list[bytes], seed: int) -> None:
    rnd = random.Random(seed)
    stream = b""
    for p in payloads:
        stream += bytes(rnd.choice(b"xyz \r\n") for _ in range(rnd.randrange(4))) + rsp.frame(rsp.escape(p))
    d = Decoder()
    events: list = []
    pos = 0
    while pos < len(stream):
        n = rnd.randrange(1, 9)
        events += d.feed(stream[pos:pos + n])
        pos += n
    got = [rsp.unescape(e.payload) for e in events if isinstance(e, Packet)]
    assert got == payloads


def test_whole_buffers_and_byte_by_byte_give_the_same_events() -> None:
    """feed() cuts whole packets with find() (the fast path); fed one byte at a
    time it takes the byte-by-byte path: both must give the same events, for
    good packets, bad checksums, noise, acks, ^C, a '$' inside a packet and a
    packet split across calls."""
    import random

    from vmk.tools.rsp import Decoder, frame
    rng = random.Random(7)
    pieces = [frame(b"g"), frame(b"m1002fe,1"), b"+", b"-", b"\x03", b"noise", b"$m10#00",
              b"$abc$" + frame(b"qSupported")[1:], frame(b"vCont;s:p1.1;c:p1.-1"), b"$X10,2:" + bytes(range(20, 30)) + b"#zz"]
    for _ in range(200):
        stream = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        whole = Decoder(max_packet=64).feed(stream)
        one = Decoder(max_packet=64)
        singly = [e for b in stream for e in one.feed(bytes([b]))]
        cut = rng.randint(0, len(stream))
        two = Decoder(max_packet=64)
        split = two.feed(stream[:cut]) + two.feed(stream[cut:])
        assert repr(whole) == repr(singly) == repr(split), stream
