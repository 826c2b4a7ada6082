"""Writing a recorded trace (machine/trace.py's Tracer) out: Perfetto and VCD.

Perfetto
--------
:func:`perfetto_bytes` encodes the recording as a Perfetto protobuf trace
(``perfetto/trace/perfetto_trace.proto``: a ``Trace`` is ``repeated
TracePacket packet = 1``), which ui.perfetto.dev and the trace processor
open.  The encoder is the few lines of protobuf wire format below (varints,
length-delimited fields, fixed64 flow ids), so vmk has no runtime
dependency for it; the tests parse the file with Perfetto's own
``perfetto_trace_pb2`` to check it.

* Every :class:`~vmk.machine.trace.Track` becomes a ``TrackDescriptor``
  (uuid = its index + 1, ``parent_uuid`` its group): "CPU 0" (the fiber on
  the CPU, interrupts, timer deadlines), "IRQ lines" (one counter track per
  line, 0/1), and one group per container ("pid 0 (kernel)" for pid 0's
  own fibers) with a track per fiber.
* Slices (``TYPE_SLICE_BEGIN``/``END``): fiber states, the fiber on the CPU.
  Instants (``TYPE_INSTANT``): syscalls, deliveries, EOIs, deadlines, each
  side of a rendezvous; the sender's carries ``flow_ids``, the receiver's
  ``terminating_flow_ids`` (the same id), so the viewer draws an arrow from
  sender to receiver.  Counters (``TYPE_COUNTER``): IRQ line levels.
* Timestamps are virtual ns (one packet sequence, no clock snapshots: the
  trace's clock is the virtual clock).  An event's args are debug
  annotations.

VCD
---
:func:`vcd_text` writes the IRQ lines' levels as one-bit wires (timescale
1 ns) for GTKWave.  A line raised and lowered at the same virtual time (an
ISA pulse, or the UART's line that the HAL's top half drains at the
delivery's own virtual ns) would be a glitch of width 0 that a waveform
viewer does not draw: the VCD stretches it to 1 ns (the Perfetto counter
keeps the exact times).
"""
from __future__ import annotations

import struct
from typing import Any

from vmk.machine.trace import Phase, Tracer

__all__ = ["perfetto_bytes", "vcd_text", "write_perfetto", "write_vcd"]

# perfetto_trace.proto field numbers
_TRACE_PACKET = 1
_P_TIMESTAMP, _P_SEQ_ID, _P_TRACK_EVENT, _P_SEQ_FLAGS, _P_TRACK_DESCRIPTOR = 8, 10, 11, 13, 60
_TD_UUID, _TD_NAME, _TD_PARENT, _TD_COUNTER = 1, 2, 5, 8
_TE_ANNOTATIONS, _TE_TYPE, _TE_TRACK, _TE_CATEGORIES, _TE_NAME = 4, 9, 11, 22, 23
_TE_COUNTER_VALUE, _TE_FLOW_IDS, _TE_TERMINATING_FLOW_IDS = 30, 47, 48
_DA_BOOL, _DA_UINT, _DA_INT, _DA_STRING, _DA_NAME = 2, 3, 4, 6, 10
SLICE_BEGIN, SLICE_END, INSTANT, COUNTER = 1, 2, 3, 4          # TrackEvent.Type
SEQ_INCREMENTAL_STATE_CLEARED = 1
SEQUENCE_ID = 1

_TYPE = {Phase.BEGIN: SLICE_BEGIN, Phase.END: SLICE_END, Phase.INSTANT: INSTANT, Phase.COUNTER: COUNTER}


# ---------------------------------------------------------------------- protobuf wire format
def _varint(n: int) -> bytes:
    n &= 0xFFFF_FFFF_FFFF_FFFF              # int64 negatives: ten bytes, two's complement
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _uint(field: int, n: int) -> bytes:
    return _key(field, 0) + _varint(n)


def _bytes(field: int, data: bytes) -> bytes:
    return _key(field, 2) + _varint(len(data)) + data


def _str(field: int, text: str) -> bytes:
    return _bytes(field, text.encode("utf-8"))


def _fixed64(field: int, n: int) -> bytes:
    return _key(field, 1) + struct.pack("<Q", n)


# ---------------------------------------------------------------------- Perfetto
def _annotation(name: str, value: Any) -> bytes:
    out = _str(_DA_NAME, name)
    if isinstance(value, bool):
        return out + _uint(_DA_BOOL, int(value))
    if isinstance(value, int):
        if -(1 << 63) <= value < 1 << 63:
            return out + _uint(_DA_INT, value)
        return out + _uint(_DA_UINT, value & 0xFFFF_FFFF_FFFF_FFFF)
    if isinstance(value, (list, tuple)):
        value = "[" + ", ".join(hex(v) if isinstance(v, int) else str(v) for v in value) + "]"
    return out + _str(_DA_STRING, "none" if value is None else str(value))


def _packet(body: bytes) -> bytes:
    return _bytes(_TRACE_PACKET, body)


def perfetto_bytes(tracer: Tracer) -> bytes:
    """The recording as a Perfetto ``Trace`` (protobuf bytes)."""
    uuids = {key: i + 1 for i, key in enumerate(tracer.tracks)}
    out = bytearray()
    first = True
    for key, track in tracer.tracks.items():
        desc = _uint(_TD_UUID, uuids[key]) + _str(_TD_NAME, track.name)
        if track.parent is not None:
            desc += _uint(_TD_PARENT, uuids[track.parent])
        if track.counter:
            desc += _bytes(_TD_COUNTER, b"")
        body = _uint(_P_SEQ_ID, SEQUENCE_ID) + _bytes(_P_TRACK_DESCRIPTOR, desc)
        if first:
            body += _uint(_P_SEQ_FLAGS, SEQ_INCREMENTAL_STATE_CLEARED)
            first = False
        out += _packet(body)
    for e in tracer.events:
        te = _uint(_TE_TYPE, _TYPE[e.phase]) + _uint(_TE_TRACK, uuids[e.track])
        if e.phase == Phase.COUNTER:
            te += _uint(_TE_COUNTER_VALUE, int(e.args.get("level", 0)))
        elif e.phase != Phase.END:
            te += _str(_TE_CATEGORIES, e.kind) + _str(_TE_NAME, e.name)
            for name, value in e.args.items():
                te += _bytes(_TE_ANNOTATIONS, _annotation(name, value))
        if e.flow_out is not None:
            te += _fixed64(_TE_FLOW_IDS, e.flow_out)
        if e.flow_in is not None:
            te += _fixed64(_TE_TERMINATING_FLOW_IDS, e.flow_in)
        out += _packet(_uint(_P_TIMESTAMP, e.ts) + _uint(_P_SEQ_ID, SEQUENCE_ID) + _bytes(_P_TRACK_EVENT, te))
    return bytes(out)


def write_perfetto(tracer: Tracer, path: str) -> None:
    with open(path, "wb") as f:
        f.write(perfetto_bytes(tracer))


# ---------------------------------------------------------------------- VCD
def _vcd_id(i: int) -> str:
    """VCD identifier codes: printable ASCII 33..126, base 94."""
    s = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 94)
        s = chr(33 + r) + s
    return s


def vcd_text(tracer: Tracer) -> str:
    """The IRQ lines' levels as a VCD (IEEE 1364 value change dump), 1 ns timescale."""
    ids = {name: _vcd_id(i) for i, name in enumerate(tracer.lines)}
    lines = ["$comment vmk IRQ lines, virtual time $end", "$timescale 1ns $end", "$scope module irq $end"]
    lines += [f"$var wire 1 {ids[name]} {name} $end" for name in tracer.lines]
    lines += ["$upscope $end", "$enddefinitions $end"]
    level = {name: "x" for name in tracer.lines}
    changes: list[tuple[int, str, str]] = []
    for e in tracer.events:
        if e.kind == "irq" and e.phase == Phase.COUNTER:
            name = e.track[1]
            v = "1" if e.args.get("level") else "0"
            if level.get(name) != v:
                level[name] = v
                changes.append((e.ts, name, v))
    # The value at time 0 is the first one seen at 0 (or x until the line's first change).
    # A pulse of width 0 (raised and lowered at one virtual time) is drawn 1 ns wide.
    initial = {name: "x" for name in tracer.lines}
    last: dict[str, int] = {}
    rest = []
    for ts, name, v in changes:
        if ts == 0 and initial[name] == "x":
            initial[name] = v
            last[name] = 0
            continue
        if name in last and ts <= last[name]:
            ts = last[name] + 1
        last[name] = ts
        rest.append((ts, name, v))
    rest.sort(key=lambda c: c[0])
    lines.append("#0")
    lines.append("$dumpvars")
    lines += [f"{initial[name]}{ids[name]}" for name in tracer.lines]
    lines.append("$end")
    now = 0
    for ts, name, v in rest:
        if ts != now:
            lines.append(f"#{ts}")
            now = ts
        lines.append(f"{v}{ids[name]}")
    end = tracer.now
    if end > now:
        lines.append(f"#{end}")
    return "\n".join(lines) + "\n"


def write_vcd(tracer: Tracer, path: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(vcd_text(tracer))
