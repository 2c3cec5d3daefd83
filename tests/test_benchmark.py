"""Smoke tests of the benchmark programs and the GPU check's summary, on tiny sizes on the CPU."""
import json
import sys
from pathlib import Path

import pytest
import torch

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


def test_seq_update_channels_last_inputs(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import seq_update

    for flag, layout in (([], torch.contiguous_format), (["--channels-last"], torch.channels_last)):
        args = seq_update.parse_args(["--channels", "4", "--segments", "2", "--size", "3", "--batch", "2",
                                      "--device", "cpu"] + flag)
        work = seq_update.make_workload(seq_update.make_layer(args), args)
        for t in work.inputs + work.grads:
            assert t.is_contiguous(memory_format=layout) and not t.is_contiguous(memory_format=(
                torch.contiguous_format if layout == torch.channels_last else torch.channels_last))


def test_seq_update_tf32_is_scoped_to_the_run(monkeypatch):
    """--tf32 puts every backend's float32 products in TF32 for the run and
    restores PyTorch's settings afterwards (main() is also called in-process)."""
    import torch
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import seq_update

    seen = []
    real_run = seq_update._run
    monkeypatch.setattr(seq_update, "_run", lambda args: seen.append(
        (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)) or real_run(args))
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = False
        report = seq_update.main(["--segments", "2", "--channels", "4", "--size", "3", "--batch", "2",
                                  "--repeats", "1", "--warmup", "0", "--device", "cpu",
                                  "--backends", "reference,native", "--no-compile", "--tf32"])
        assert seen == [("high", True)]
        assert report["args"]["tf32"] is True
        assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == (before[0], False)
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


def run_gpu_check_programs(results: Path, backends: list[str]) -> tuple[dict, dict]:
    """The sweep and the profile at tiny sizes, written where gpu_check.sh puts them."""
    import profile_ops
    import segment_sweep

    sweep = segment_sweep.main([
        "--channels", "6", "--segments", "6,3", "--size", "4", "--batch", "2", "--repeats", "2",
        "--warmup", "0", "--device", "cpu", "--backends", ",".join(backends),
        "--json", str(results / "sweep_tiny.json"), "--plot", str(results / "sweep_tiny.png")])
    status = profile_ops.main([
        "--device", "cpu", "--shapes", "6/3/4", "--batch", "2", "--calls", "2", "--warmup", "1",
        "--top", "3", "--backends", ",".join(backends[1:] + ["triton"]),
        "--json", str(results / "profile_ops.json")])
    assert status == 0
    return sweep, json.loads((results / "profile_ops.json").read_text())


def test_sweep_profile_and_summary_of_the_gpu_check(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # so triton is skipped on the CPU
    import check_summary
    import segment_sweep

    backends = gunn_ext.available_backends("cpu")
    sweep, profile = run_gpu_check_programs(tmp_path, backends)

    # The sweep: every (P, backend), P sorted, the measurements of seq_update.py.
    assert sweep["segments"] == [3, 6] and sweep["backends"] == backends
    assert [(r["segments"], r["backend"]) for r in sweep["rows"]] == [(p, b) for p in (3, 6) for b in backends]
    assert json.loads((tmp_path / "sweep_tiny.json").read_text()) == json.loads(json.dumps(sweep))
    assert (tmp_path / "sweep_tiny.png").stat().st_size > 0
    for row in sweep["rows"]:
        assert row["error"] is None and not row["mismatch"], row["traceback"]
        assert row["channels_per_segment"] == 6 // row["segments"]
        assert len(row["forward_backward"]["samples_ms"]) == 2
    assert segment_sweep.exit_status(sweep) == 0

    # The profile: per-call operator counts and times on the CPU; triton skipped with its reason.
    assert "not available on cpu" in profile["skipped"]["triton"]
    profiled = backends[1:]
    assert [(p["backend"], p["pass"]) for p in profile["profiles"]] == \
        [(b, stage) for b in profiled for stage in ("forward", "forward+backward")]
    for p in profile["profiles"]:
        assert p["error"] is None and p["launched"] == "operators"
        assert p["launches_per_call"] >= 1 and 1 <= len(p["top"]) <= 3
        assert sum(entry["share"] for entry in p["top"]) <= 1 + 1e-9
    if profiled:
        forward, both = profile["profiles"][:2]
        assert both["launches_per_call"] > forward["launches_per_call"]

    # The summary reads both, the step list and a replay loop report.
    (tmp_path / "steps.tsv").write_text("install\t0\t12\nsweep_tiny\t124\t30\n")
    (tmp_path / "replay_loop.json").write_text(json.dumps(
        {"results": [{"op": "native forward", "captures": 1, "replays": 28, "eager": 1}]}))
    assert check_summary.main([str(tmp_path)]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "| install | ok | 12 |" in summary and "| sweep_tiny | timed out | 30 |" in summary
    assert "| op | captures | replays | eager |" in summary and "| native forward | 1 | 28 | 1 |" in summary
    assert summary.count("| 3 | reference |") == 1 and "## Segment sweep: sweep_tiny" in summary
    assert "skipped triton" in summary
    for b in profiled:
        assert f"| {b} | 6/3/4 | forward+backward |" in summary


def test_batch_norm_alignment_goes_on_after_a_fault(monkeypatch, tmp_path, capsys):
    """A case that kills its worker (as a CUDA fault does) is reported, and the
    next case runs in a new worker; the summary lists the case."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import batch_norm_alignment as probe
    import check_summary

    args = probe.parse_args(["--device", "cpu", "--offsets", "0,1,2", "--channels", "3,6"])
    faulty = tmp_path / "faulty_worker.py"
    faulty.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(BENCHMARKS)!r})\n"
        "import batch_norm_alignment as probe\n"
        "run_case = probe.run_case\n"
        "def dies_at_offset_1(case, device):\n"
        "    if case['offset'] == 1:\n"
        "        print('RuntimeError: CUDA error: misaligned address', file=sys.stderr, flush=True)\n"
        "        os._exit(1)\n"
        "    return run_case(case, device)\n"
        "probe.run_case = dies_at_offset_1\n"
        "probe.worker(probe.parse_args(sys.argv[1:]))\n")
    command = [sys.executable, str(faulty)] + probe.worker_command(args)[2:]
    saved = []
    results = probe.run_all(args, command, on_results=lambda so_far: saved.append(len(so_far)))
    assert saved == [2, 5, 8, 11, 12]  # after each of the five workers (four faults)

    expected = probe.cases(args)
    assert [(r["channels"], r["layout"], r["offset"]) for r in results] == \
        [(c["channels"], c["layout"], c["offset"]) for c in expected]
    for r in results:
        if r["offset"] == 1:
            assert r["status"] == "FAULT" and "misaligned address" in r["error"], r
        else:
            assert r["status"] == "ok" and r["max_relative_difference"] == 0, r
            assert r["bytes_past_16"] == [4 * r["offset"] % 16] * 4
    assert capsys.readouterr().out.count("FAULT") == 4

    (tmp_path / "batch_norm_alignment.json").write_text(json.dumps({"results": results}))
    assert check_summary.main([str(tmp_path)]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "8 of 12 cases equal the aligned call." in summary
    assert summary.count("| FAULT | worker exit status 1: RuntimeError: CUDA error: misaligned address |") == 4


def test_host_overhead_runs(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import host_overhead

    threads = torch.get_num_threads()
    try:
        assert host_overhead.main(["--channels", "6", "--segments", "2,6", "--repeats", "2", "--warmup", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["6 channels, P = 2", "6 channels, P = 6"]
    assert all("outside the op" in line for line in lines)


def test_bad_options_are_usage_errors(monkeypatch, capsys):
    """Checked by argparse, naming the option, before anything is measured."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import host_overhead
    import replay_loop
    import train_step
    for main, argv, message in (
            (train_step.parse_args, ["--batch", "0"], "--batch: expected an int >= 1, got 0"),
            (train_step.parse_args, ["--backends", "reference,tritn"], "--backends: unknown 'tritn'"),
            (train_step.parse_args, ["--width", "0"], "--width: expected a finite number > 0"),
            (host_overhead.main, ["--channels", "24", "--segments", "7"], "7 does not divide --channels 24"),
            (host_overhead.main, ["--repeats", "0"], "--repeats: expected an int >= 1"),
            (replay_loop.parse_args, ["--eval-batches", "a", "--device", "cpu"], "--eval-batches: expected an int")):
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err


def test_reports_hold_json_without_nan(monkeypatch, tmp_path):
    """A backend whose output holds NaN leaves null in the report, which strict
    JSON parsers read, and its MISMATCH line prints without a reference error."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import seq_update
    out = tmp_path / "new" / "report.json"
    args = type("Args", (), {"json": out, "plot": None})()
    seq_update.save_report({"error_y": float("nan"), "rows": [{"x": float("inf")}, 1.5]}, args, None,
                           type("Quiet", (), {"print": staticmethod(lambda *a: None)})())
    assert json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(c)) == {
        "error_y": None, "rows": [{"x": None}, 1.5]}
    assert seq_update._sci(None) == "-" and seq_update._sci(1.5e-3) == "1.50e-03"


def test_summary_of_files_that_do_not_hold_what_they_should(monkeypatch, tmp_path):
    """The summary is written whatever the files hold: a section that cannot
    read its files says so, and a skipped step is not called silent."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import check_summary
    (tmp_path / "steps.tsv").write_text("install\t0\t12\n\nreplay_loop_native\tskipped\t0\n")
    for name in ("bench_a.json", "train_a.json", "sweep_a.json", "profile_ops.json"):
        (tmp_path / name).write_text("{}")
    assert check_summary.main([str(tmp_path)]) == 0
    text = (tmp_path / "summary.md").read_text()
    assert "Environment unknown" in text and "| install | ok | 12 |" in text
    for name in ("benchmarks", "training", "profile", "sweep"):
        assert f"## {name}: not summarised" in text
    assert "no report" not in text
