"""Parsing of the sizes, durations and addresses users type on the command line.

Conventions follow QEMU where users know them: ``--mem 128`` is MiB (as
``-m 128``), suffixes K/M/G (and KiB/MiB/GiB) are binary; durations take
ns/us/ms/s suffixes and a bare number is nanoseconds.  Every parser raises
``ValueError`` with a message that names the bad text and the accepted forms.
"""
from __future__ import annotations

import re

__all__ = ["parse_size", "parse_duration", "parse_hostport", "format_ns"]

_SIZE_UNITS = {"": 1 << 20, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
               "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}
_TIME_UNITS = {"": 1, "ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 1_000_000_000}


def parse_size(text: str) -> int:
    """'128' (MiB), '128M', '1G', '65536K', '4096B' -> bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"bad size {text!r}: use a number of MiB, or a number with K, M or G (e.g. 128M)")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


def parse_duration(text: str) -> int:
    """'10ms', '1.5s', '250us', '100' (ns) -> integer nanoseconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ns|us|µs|ms|s)?\s*", text)
    if not m:
        raise ValueError(f"bad duration {text!r}: use a number with ns, us, ms or s (e.g. 10ms)")
    unit = _TIME_UNITS[m.group(2) or ""]
    value = float(m.group(1)) * unit if "." in m.group(1) else int(m.group(1)) * unit
    return int(round(value))


def parse_hostport(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """'[HOST]:PORT' or 'PORT' -> (host, port); an empty host means loopback."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad address {text!r}: use [HOST]:PORT with a port from 1 to 65535 (e.g. :1234)")
    return host or default_host, int(port)


def format_ns(ns: int) -> str:
    if ns >= 1_000_000_000:
        return f"{ns / 1e9:.6f} s"
    if ns >= 1_000_000:
        return f"{ns / 1e6:.3f} ms"
    if ns >= 1_000:
        return f"{ns / 1e3:.3f} us"
    return f"{ns} ns"
