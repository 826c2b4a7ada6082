"""Every CPU's translation buffer lies more than 2 GiB from the libraries its
translated code calls (libunicorn's helpers, our C hooks), so that TCG calls
them through a constant instead of a ``call rel32`` (machine/cpu.py,
``new_unicorn``: on this project's host the direct calls made the same
translated loop run 3x slower in most processes)."""
from __future__ import annotations

import gc

from vmk.machine.pc import Machine, MachineConfig

REL32_REACH = 2 << 30


def _mappings() -> list[tuple[int, int, str, str]]:
    rows = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            rows.append((lo, hi, fields[1], fields[5] if len(fields) > 5 else ""))
    return rows


def test_translation_buffers_are_out_of_rel32_reach_of_the_called_libraries():
    # Earlier tests' machines are freed first (and not while this one is made),
    # so that no buffer is unmapped and mapped again at the same place meanwhile.
    gc.collect()
    gc.disable()
    try:
        before = {(lo, hi) for lo, hi, perms, _ in _mappings() if perms == "rwxp"}
        m = Machine(MachineConfig(cpus=2))
        after = _mappings()
    finally:
        gc.enable()
    buffers = [(lo, hi) for lo, hi, perms, _ in after if perms == "rwxp" and (lo, hi) not in before]
    assert len(buffers) == len(m.cpus) == 2        # one translation buffer per CPU
    # Each CPU knows its own (its block counter tells translations apart by it).
    assert sorted(cpu._code_buffer for cpu in m.cpus) == sorted(buffers)
    libraries = [(lo, hi, path) for lo, hi, perms, path in after
                 if perms == "r-xp" and ("libunicorn" in path or "_fasthooks" in path)]
    assert {path.rsplit("/", 1)[-1].split(".")[0] for _, _, path in libraries} >= {"libunicorn", "_fasthooks"}
    for blo, bhi in buffers:
        for llo, lhi, path in libraries:
            distance = llo - bhi if llo >= bhi else blo - lhi
            assert distance > REL32_REACH, (hex(blo), path, distance)
