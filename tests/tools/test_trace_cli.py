"""vmk boot --trace FILE --vcd FILE: the pipeline demo's trace opens with Perfetto's
protobuf classes and holds fiber, syscall, channel and IRQ events; the VCD has the lines."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from perfetto.protos.perfetto.trace import perfetto_trace_pb2 as pb

from vmk.tools.build import build
from vmk.tools.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("gcc") is None, reason="the demo programs are C (gcc needed)")
def test_boot_writes_a_perfetto_trace_and_a_vcd(tmp_path: Path) -> None:
    img = tmp_path / "pipeline.img"
    build(ROOT / "demo" / "pipeline" / "pipeline.toml", img)
    out, vcd = tmp_path / "run.perfetto-trace", tmp_path / "irq.vcd"
    assert main(["boot", str(img), "--serial", "null", "--idle", "skip", "--trace", str(out),
                 "--vcd", str(vcd)]) == 0
    trace = pb.Trace()
    trace.ParseFromString(out.read_bytes())
    cats = {p.track_event.categories[0] for p in trace.packet
            if p.HasField("track_event") and p.track_event.categories}
    assert {"fiber", "syscall", "channel", "irq", "timer"} <= cats
    assert any(p.track_event.flow_ids for p in trace.packet if p.HasField("track_event"))
    text = vcd.read_text()
    assert "$var wire 1" in text and " irq4 $end" in text and text.count("\n#") > 2


def test_an_unwritable_trace_file_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "no-such-dir" / "x.perfetto-trace"
    assert main(["boot", str(tmp_path / "whatever.img"), "--trace", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--trace" in err and str(bad) in err
