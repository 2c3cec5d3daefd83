"""``summary.md`` of a ``gpu_check.sh`` results folder, also printed.

    python benchmarks/check_summary.py RESULTS_DIR

Reads what the steps left in the folder: ``environment.json``, ``steps.tsv``
(name, exit status, seconds), the tests' JUnit XML (``tests_*.xml``) and the
tests that lost the CUDA context (``cuda_faults.txt``), the
benchmark reports (``bench_*.json`` from ``seq_update.py``, ``train_*.json``
from ``train_step.py``, ``sweep_*.json`` from ``segment_sweep.py``), the
profile (``profile_ops.json``), the graph replay loop
(``replay_loop*.json``) and batch norm at offsets into flat tensors
(``batch_norm_alignment.json``). A missing or unreadable file leaves its section out
or says so; the summary is written whatever failed.
"""
from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path

STATUS = {"0": "ok", "7": "stopped: CUDA context lost", "124": "timed out", "137": "timed out",
          "skipped": "skipped"}
PROFILE_TOP = 3


def _ms(stats: dict | None) -> str:
    return f"{stats['median_ms']:.2f}" if stats else "-"


def _ratio(numerator: float | None, denominator: float | None) -> str:
    return f"{numerator / denominator:.2f}x" if numerator and denominator else "-"


def _median(stats: dict | None) -> float | None:
    return stats["median_ms"] if stats else None


def _read_json(path: Path) -> tuple[dict | None, str | None]:
    try:
        return json.loads(path.read_text()), None
    except (OSError, ValueError) as exc:
        return None, f"{path.name}: unreadable ({exc})"


def environment_section(results: Path) -> list[str]:
    env, problem = _read_json(results / "environment.json")
    if not isinstance(env, dict):
        return ["# gunn_ext GPU check", "", f"Environment unknown: {problem or 'environment.json holds no record'}"]
    return [f"# gunn_ext GPU check, {env.get('date_utc', '?')}", "",
            f"GPU: {env.get('gpu') or 'none (CPU run)'}; torch {env.get('torch')}, CUDA {env.get('cuda')}, "
            f"cuDNN {env.get('cudnn')}, triton {env.get('triton')}, Python {env.get('python')}; "
            f"commit {env.get('git_commit')}; gunn_ext: {env.get('gunn_ext_load_error') or 'loaded'}, "
            f"CUDA kernels {env.get('gunn_ext_cuda_kernels')}, CUDA graphs {env.get('cuda_graphs')}"]


def read_steps(results: Path) -> list[tuple[str, str, str]]:
    """(name, exit status, seconds) of every step, from ``steps.tsv``."""
    steps = results / "steps.tsv"
    rows = [row.split("\t") for row in (steps.read_text().splitlines() if steps.exists() else [])]
    return [tuple(row) for row in rows if len(row) == 3]


def steps_section(results: Path) -> list[str]:
    lines = ["## Steps", "", "| step | status | seconds |", "| --- | --- | --- |"]
    for name, status, took in read_steps(results):
        lines.append(f"| {name} | {STATUS.get(status, f'exit {status}')} | {took} |")
    return lines


def tests_section(results: Path) -> list[str]:
    lines = ["## Tests", ""]
    faults = results / "cuda_faults.txt"
    lost = faults.read_text().splitlines() if faults.exists() else []
    if lost:
        lines.append(f"- the CUDA context was lost in: {', '.join(lost)} (the tests after it ran again "
                     "without it; cuda_fault_*.log diagnose the first)")
    for xml in sorted(results.glob("tests_*.xml")):
        try:
            suite = ET.parse(xml).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        except (ET.ParseError, AttributeError) as exc:
            lines.append(f"- {xml.stem}: unreadable ({exc})")
            continue
        lines.append(f"- {xml.stem}: {counts['tests']} tests, {counts['failures']} failed, "
                     f"{counts['errors']} errors, {counts['skipped']} skipped")
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                lines.append(f"  - FAILED {case.get('classname')}::{case.get('name')}")
    return lines


def benchmarks_section(results: Path) -> list[str]:
    lines = ["## Benchmarks (median of the timed calls; *_nographs: GUNN_EXT_CUDA_GRAPHS=0)", "",
             "| run | backend | forward ms | fwd+bwd ms | fwd+bwd speedup | peak MiB | note |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for path in sorted(results.glob("bench_*.json")):
        report, problem = _read_json(path)
        if report is None:
            lines.append(f"| {path.stem} | {problem} | | | | | |")
            continue
        rows = report["results"]
        reference = next((r for r in rows if r["backend"] == "reference" and r["forward_backward"]), None)
        for r in rows:
            peak = r["memory"].get("peak_bytes")
            note = "FAILED" if r["error"] else ("MISMATCH" if r["mismatch"] else "")
            lines.append(f"| {path.stem.removeprefix('bench_')} | {r['backend']} | {_ms(r['forward'])} "
                         f"| {_ms(r['forward_backward'])} "
                         f"| {_ratio(_median(reference and reference['forward_backward']), _median(r['forward_backward']))} "
                         f"| {'-' if peak is None else f'{peak / 2**20:.1f}'} | {note} |")
    return lines


def training_sections(results: Path) -> list[str]:
    lines = []
    for path in sorted(results.glob("train_*.json")):
        report, problem = _read_json(path)
        if report is None:
            lines += ["", f"## Training step: {problem}"]
            continue
        segments = report["args"].get("segment_channels")
        lines += ["", f"## Training step: {path.stem} (batch {report['args']['batch']}"
                  f"{'' if segments is None else f', {segments}-channel segments'})", "",
                  "| backend | step ms | images/s | peak GB |", "| --- | --- | --- | --- |"]
        for r in report["results"]:
            if "error" in r:
                lines.append(f"| {r['backend']} | FAILED: {r['error'][:80]} | | |")
                continue
            peak = r.get("peak_allocated_bytes")
            lines.append(f"| {r['backend']} | {r['step_ms']:.1f} | {r['images_per_s']:.0f} | "
                         f"{'-' if not peak else f'{peak / 1e9:.3f}'} |")
    return lines


def profile_section(results: Path) -> list[str]:
    path = results / "profile_ops.json"
    if not path.exists():
        return []
    report, problem = _read_json(path)
    if report is None:
        return ["", "## Profile", "", problem]
    lines = ["", f"## Profile (batch {report['args']['batch']}, {report['args']['dtype']}; per call; "
                 "launches: kernels on a GPU, operators on the CPU)", "",
             f"| backend | shape | pass | ms | launches | copies | host launch calls | top {PROFILE_TOP} |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in report["profiles"]:
        head = f"| {row['backend']} | {row['shape']} | {row['pass']} |"
        if row["error"]:
            lines.append(f"{head} FAILED: {row['error'][:80]} | | | | |")
            continue
        host = sum(row["host_launch_calls_per_call"].values())
        top = "; ".join(f"{entry['name'][:48]} {100 * entry['share']:.0f}%" for entry in row["top"][:PROFILE_TOP])
        lines.append(f"{head} {row['time_ms_per_call']:.3f} | {row['launches_per_call']:g} "
                     f"| {row['copies_per_call']:g} | {host:g} | {top} |")
    for name, reason in report.get("skipped", {}).items():
        lines.append(f"- skipped {name}: {reason}")
    return lines


def sweep_sections(results: Path) -> list[str]:
    lines = []
    for path in sorted(results.glob("sweep_*.json")):
        report, problem = _read_json(path)
        if report is None:
            lines += ["", f"## Segment sweep: {problem}"]
            continue
        args, first = report["args"], report["segments"][0]
        lines += ["", f"## Segment sweep: {path.stem} ({args['channels']} channels, batch {args['batch']}, "
                      f"{args['size']}x{args['size']}, {args['dtype']} {args['mode']})", "",
                  f"| P | backend | forward ms | fwd+bwd ms | fwd+bwd vs P={first} | fwd+bwd speedup | note |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        by_key = {(row["segments"], row["backend"]): row for row in report["rows"]}
        for row in report["rows"]:
            base = by_key.get((first, row["backend"]))
            reference = by_key.get((row["segments"], "reference"))
            note = "FAILED" if row["error"] else ("MISMATCH" if row["mismatch"] else "")
            lines.append(
                f"| {row['segments']} | {row['backend']} | {_ms(row['forward'])} | {_ms(row['forward_backward'])} "
                f"| {_ratio(_median(row['forward_backward']), _median(base and base['forward_backward']))} "
                f"| {_ratio(_median(reference and reference['forward_backward']), _median(row['forward_backward']))} "
                f"| {note} |")
    return lines


def record_table(records: list[dict]) -> list[str]:
    """A markdown table of flat records, one column per scalar field."""
    columns = list(dict.fromkeys(k for r in records for k, v in r.items()
                                 if isinstance(v, (str, int, float, bool)) or v is None))
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for r in records:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in columns) + " |")
    return lines


def replay_section(results: Path) -> list[str]:
    paths = sorted(results.glob("replay_loop*.json"))
    silent = [(name, status, took) for name, status, took in read_steps(results)
              if name.startswith("replay_loop") and status != "skipped"
              and not (results / f"{name}.json").exists()]
    if not paths and not silent:
        return []
    lines = ["", "## Graph replay over a training loop (captures, replays and eager runs per op)", ""]
    lines += [f"- {name}: {STATUS.get(status, f'exit {status}')} after {took} s, no report "
              f"(its log shows how far it got)" for name, status, took in silent]
    records = []
    for path in paths:
        report, problem = _read_json(path)
        found = report.get("results") if isinstance(report, dict) else None
        if report is None or not isinstance(found, list) or not all(isinstance(r, dict) for r in found):
            lines.append(problem or f"{path.name} holds no `results` list of records")
            continue
        if not report.get("complete", True):
            lines.append(f"- {path.name}: incomplete (the run stopped before its last backend)")
        records += found
    if not records:
        return lines
    lines += [""] + record_table(records) + ["", "| op | captures | replays | eager | captures from epoch 2 "
                                             "| eager from epoch 2 |", "| --- | --- | --- | --- | --- | --- |"]
    for record in records:
        for name, c in (record.get("ops") or {}).items():
            every, steady = c.get("all", {}), c.get("from_epoch_2", {})
            lines.append(f"| {name} | {every.get('captures', 0)} | {every.get('replays', 0)} | "
                         f"{every.get('eager', 0)} | {steady.get('captures', 0)} | {steady.get('eager', 0)} |")
    return lines


def alignment_section(results: Path) -> list[str]:
    path = results / "batch_norm_alignment.json"
    if not path.exists():
        return []
    report, problem = _read_json(path)
    cases = report.get("results") if isinstance(report, dict) else None
    lines = ["", "## Batch norm with its tensors at offsets into flat tensors (batch_norm_alignment.py)", ""]
    if not isinstance(cases, list):
        return lines + [problem or f"{path.name} holds no `results` list"]
    failed = [c for c in cases if c.get("status") != "ok"]
    lines.append(f"{len(cases) - len(failed)} of {len(cases)} cases equal the aligned call.")
    if failed:
        lines += ["", "| batch | C | layout | offset | status | detail |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {c.get('batch')} | {c.get('channels')} | {c.get('layout')} | {c.get('offset')} | "
                  f"{c.get('status')} | {c.get('error') or c.get('max_relative_difference')} |" for c in failed]
    return lines


SECTIONS = ("environment", "steps", "tests", "benchmarks", "training", "profile", "alignment", "replay",
            "sweep")


def summarize(results: Path) -> str:
    """Every section; one whose files do not hold what it expects says so in a line."""
    lines = []
    for name in SECTIONS:
        build = globals()[f"{name}_section" if f"{name}_section" in globals() else f"{name}_sections"]
        try:
            section = build(results)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            section = ["", f"## {name}: not summarised, a file does not hold what it should "
                           f"({type(exc).__name__}: {exc})"]
        lines += ([""] if name in ("steps", "tests", "benchmarks") else []) + section
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="the results folder of gpu_check.sh")
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        parser.error(f"results: expected a folder written by gpu_check.sh, got {str(args.results)!r}")
    text = summarize(args.results)
    (args.results / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
