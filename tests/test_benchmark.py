"""Smoke test of benchmarks/seq_update.py on a tiny layer (CPU, a few seconds)."""
import json
from pathlib import Path

import gunn_ext

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_seq_update_measures_every_backend_and_reports_failures(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # so triton cannot run on the CPU
    import seq_update

    working = gunn_ext.available_backends("cpu")
    out, chart = tmp_path / "result.json", tmp_path / "chart.png"
    report = seq_update.main([
        "--segments", "3", "--channels", "6", "--size", "4", "--batch", "2",
        "--repeats", "2", "--warmup", "1", "--device", "cpu",
        "--backends", ",".join(working + ["triton"]), "--no-compile",
        "--json", str(out), "--plot", str(chart)])

    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert chart.stat().st_size > 0
    assert report["args"]["segments"] == 3 and report["machine"]["torch_threads"] >= 1
    results = {r["backend"]: r for r in report["results"]}
    assert list(results) == working + ["triton"]
    assert "not available on cpu" in results.pop("triton")["error"]
    assert seq_update.exit_status(report) == 1

    input_bytes = report["input_bytes"]
    assert input_bytes == 2 * 6 * 4 * 4 * 4
    for r in results.values():
        assert r["error"] is None, r["traceback"]
        assert not r["mismatch"] and r["error_y"] < 1e-5 and r["error_dx"] < 1e-5
        for stage in ("forward", "forward_backward"):
            assert len(r[stage]["samples_ms"]) == 2
            assert 0 < r[stage]["p20_ms"] <= r[stage]["median_ms"] <= r[stage]["p80_ms"]
    assert results["reference"]["memory"]["saved_bytes"] > 5 * input_bytes
    if "native" in results:
        # Algorithm 1 keeps x, y and the BatchNorm statistics only.
        assert 2 * input_bytes <= results["native"]["memory"]["saved_bytes"] < 3 * input_bytes
