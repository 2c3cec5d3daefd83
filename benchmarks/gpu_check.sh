#!/usr/bin/env bash
# One pass over a GPU machine: build, CUDA tests, benchmarks, summary.
#
#   benchmarks/gpu_check.sh [RESULTS_DIR]
#
# RESULTS_DIR defaults to $GUNN_RESULTS, else benchmarks/results/<date>. When
# $OUT is set (the device tool's output folder, which returns only a few
# files), the whole results folder is also packed into $OUT/gpu_check.tar.gz,
# with summary.md beside it.
# Everything runs under one time budget (GUNN_CHECK_BUDGET seconds, default
# 420, so a device session has room for a rerun), each step under `timeout`,
# in order of value: build, CUDA tests, the issues' targets, then the rest. A
# failing step is recorded and the next one runs. The summary table (also
# summary.md) is printed last.
# GUNN_SKIP_INSTALL=1 uses the gunn_ext already importable (dry runs).
# Without a CUDA GPU it says so and does a short CPU run instead.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STAMP="$(date -u +%Y-%m-%dT%H-%M-%SZ)"
RESULTS="${1:-${GUNN_RESULTS:-$ROOT/benchmarks/results/$STAMP}}"
BUDGET="${GUNN_CHECK_BUDGET:-420}"
PYTHON="${PYTHON:-python3}"
START=$SECONDS
mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"
STEPS="$RESULTS/steps.tsv"
: > "$STEPS"

log() { printf '[gpu_check %4ds] %s\n' "$((SECONDS - START))" "$*"; }

# run_step NAME MAX_SECONDS CMD...: runs CMD with output in NAME.log, bounded by
# MAX_SECONDS and by what is left of the budget; records its status.
run_step() {
  local name="$1" cap="$2"; shift 2
  local left=$((BUDGET - (SECONDS - START)))
  if (( left < 15 )); then
    log "$name: skipped (budget spent)"
    printf '%s\tskipped\t0\n' "$name" >> "$STEPS"
    return 0
  fi
  local limit=$(( cap < left ? cap : left ))
  log "$name (limit ${limit}s) ..."
  local t0=$SECONDS status
  timeout --kill-after=10 "$limit" "$@" > "$RESULTS/$name.log" 2>&1
  status=$?
  local took=$((SECONDS - t0))
  case $status in
    0) log "$name: ok (${took}s)" ;;
    124|137) log "$name: TIMED OUT after ${took}s" ;;
    *) log "$name: exit $status (${took}s), see $RESULTS/$name.log"; tail -n 5 "$RESULTS/$name.log" ;;
  esac
  printf '%s\t%s\t%s\n' "$name" "$status" "$took" >> "$STEPS"
  return 0
}

cd "$ROOT"
log "results in $RESULTS"

if [[ "${GUNN_SKIP_INSTALL:-0}" != "1" ]]; then
  # One architecture is enough on the machine that runs it, and halves the build.
  if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
    TORCH_CUDA_ARCH_LIST="$("$PYTHON" -c 'import torch; p = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0); print(f"{p[0]}.{p[1]}")' 2>/dev/null || echo 9.0)"
  fi
  export TORCH_CUDA_ARCH_LIST MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  run_step install 240 "$PYTHON" -m pip install --disable-pip-version-check --no-build-isolation --no-deps -v .
fi

# -P: import the installed gunn_ext, not the source tree (which has no _C).
"$PYTHON" -P - "$RESULTS/environment.json" <<'EOF' > "$RESULTS/environment.log" 2>&1
import datetime, json, os, subprocess, sys
import torch
info = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST")}
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
try:
    info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
except OSError:
    info["git_commit"] = None
try:
    import gunn_ext.ops as ops
    from gunn_ext import cuda_graphs
    info["gunn_ext_load_error"] = ops.load_error()
    info["gunn_ext_cuda_kernels"] = ops.has_cuda_kernels()
    info["cuda_graphs"] = cuda_graphs.enabled()
except Exception as exc:  # recorded, not fatal: the tests will say more
    info["gunn_ext_load_error"] = repr(exc)
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info, indent=1))
EOF
cat "$RESULTS/environment.log"

HAVE_CUDA="$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)"
PYTEST=("$PYTHON" -P -m pytest -q -rfE -p no:cacheprovider)
BENCH=("$PYTHON" "$ROOT/benchmarks/seq_update.py")

if [[ "$HAVE_CUDA" == "1" ]]; then
  run_step tests_cuda 120 "${PYTEST[@]}" "$ROOT/tests" -m cuda -k "not triton" -rP \
    --ignore="$ROOT/tests/test_triton.py" --junitxml="$RESULTS/tests_cuda.xml"
  SHAPES=("gunn15_a 20 240 32" "gunn15_b 25 300 16" "gunn15_c 30 360 8")
  # Triton compiles each kernel variant at its first call, one at a time: compile
  # every variant the benchmarks will launch in parallel processes first (batch
  # 16 specialises like batch 64), so the timed steps load them from the cache.
  WARM=""
  for spec in "${SHAPES[0]} float32 train" "${SHAPES[2]} float32 train" "${SHAPES[2]} float32 eval" \
              "${SHAPES[0]} bfloat16 train" "${SHAPES[1]} float32 train"; do
    read -r _ segments channels size dtype mode <<< "$spec"
    WARM+="\"$PYTHON\" \"$ROOT/benchmarks/seq_update.py\" --backends triton --no-compile --segments $segments"
    WARM+=" --channels $channels --size $size --batch 16 --dtype $dtype --mode $mode --device cuda"
    WARM+=" --repeats 1 --warmup 0 & "
  done
  run_step triton_warmup 150 bash -c "${WARM} wait"
  bench_shape() {  # dtype shape cap [extra args]
    local dtype="$1" shape="$2" cap="$3"; shift 3
    read -r name segments channels size <<< "$shape"
    run_step "bench_${name}_${dtype}$SUFFIX" "$cap" "$@" --segments "$segments" --channels "$channels" \
      --size "$size" --batch 64 --dtype "$dtype" --device cuda --repeats 20 --warmup 10 \
      --json "$RESULTS/bench_${name}_${dtype}$SUFFIX.json"
  }
  # The targets: fp32 at 240/20 32x32 and 360/30 8x8 (= --segments 30) on
  # every backend (the first run autotunes the Triton kernels), P = N, eval, a
  # GUNN-15 training step; torch.compile of the reference last, as it takes
  # minutes.
  SUFFIX=""
  bench_shape float32 "${SHAPES[0]}" 60 "${BENCH[@]}" --no-compile
  bench_shape float32 "${SHAPES[2]}" 40 "${BENCH[@]}" --no-compile
  run_step bench_PeqN_float32 50 "${BENCH[@]}" --no-compile --backends reference,native --segments 240 \
    --channels 240 --size 32 --batch 64 --dtype float32 --device cuda --repeats 10 --warmup 8 \
    --json "$RESULTS/bench_PeqN_float32.json"
  SUFFIX="_eval"
  bench_shape float32 "${SHAPES[2]}" 30 "${BENCH[@]}" --no-compile --mode eval
  run_step train_gunn15 60 "$PYTHON" "$ROOT/benchmarks/train_step.py" --model gunn15 --batch 64 \
    --backends reference,native --device cuda --json "$RESULTS/train_gunn15.json"
  SUFFIX="_compile"
  bench_shape float32 "${SHAPES[2]}" 150 "${BENCH[@]}" --backends reference,native,compile
  # Then: the Triton kernels' tests compiled for the GPU, bf16, graphs off.
  run_step tests_triton 120 "${PYTEST[@]}" "$ROOT/tests/test_triton.py" "$ROOT/tests/test_cuda.py" \
    -k "triton or not test_cuda" -rP --junitxml="$RESULTS/tests_triton.xml"
  SUFFIX=""
  bench_shape bfloat16 "${SHAPES[0]}" 40 "${BENCH[@]}" --no-compile
  bench_shape float32 "${SHAPES[1]}" 40 "${BENCH[@]}" --no-compile
  SUFFIX="_nographs"
  bench_shape float32 "${SHAPES[0]}" 30 env GUNN_EXT_CUDA_GRAPHS=0 "${BENCH[@]}" --no-compile --backends native
else
  log "NO CUDA GPU: torch.cuda.is_available() is False; doing a short CPU run instead (no GPU numbers)"
  run_step tests_cuda 60 "${PYTEST[@]}" "$ROOT/tests" -m cuda --junitxml="$RESULTS/tests_cuda.xml"
  run_step bench_cpu_small_float32 120 "${BENCH[@]}" --no-compile --segments 4 --size 8 --batch 4 \
    --device cpu --backends reference,native --repeats 3 --warmup 1 \
    --json "$RESULTS/bench_cpu_small_float32.json"
  run_step train_cpu_small 120 "$PYTHON" "$ROOT/benchmarks/train_step.py" --model gunn15 --width 0.1 \
    --batch 4 --steps 2 --warmup 1 --device cpu --json "$RESULTS/train_cpu_small.json"
fi

"$PYTHON" - "$RESULTS" <<'EOF'
"""Summary of this run: environment, steps, test counts, benchmark medians."""
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

results = Path(sys.argv[1])
env = json.loads((results / "environment.json").read_text()) if (results / "environment.json").exists() else {}
lines = [f"# gunn_ext GPU check, {env.get('date_utc', '?')}", "",
         f"GPU: {env.get('gpu') or 'none (CPU run)'}; torch {env.get('torch')}, CUDA {env.get('cuda')}, "
         f"cuDNN {env.get('cudnn')}, triton {env.get('triton')}, Python {env.get('python')}; "
         f"commit {env.get('git_commit')}; gunn_ext: {env.get('gunn_ext_load_error') or 'loaded'}, "
         f"CUDA kernels {env.get('gunn_ext_cuda_kernels')}, CUDA graphs {env.get('cuda_graphs')}", "",
         "## Steps", "", "| step | status | seconds |", "| --- | --- | --- |"]
for row in (results / "steps.tsv").read_text().splitlines():
    name, status, took = row.split("\t")
    label = {"0": "ok", "124": "timed out", "137": "timed out", "skipped": "skipped"}.get(status, f"exit {status}")
    lines.append(f"| {name} | {label} | {took} |")
lines += ["", "## Tests", ""]
for xml in sorted(results.glob("tests_*.xml")):
    try:
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        a = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        lines.append(f"- {xml.stem}: {a['tests']} tests, {a['failures']} failed, {a['errors']} errors, "
                     f"{a['skipped']} skipped")
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                lines.append(f"  - FAILED {case.get('classname')}::{case.get('name')}")
    except (ET.ParseError, AttributeError) as exc:
        lines.append(f"- {xml.stem}: unreadable ({exc})")


def ms(stats):
    return f"{stats['median_ms']:.2f}" if stats else "-"


table = ["| run | backend | forward ms | fwd+bwd ms | fwd+bwd speedup | peak MiB | note |",
         "| --- | --- | --- | --- | --- | --- | --- |"]
for path in sorted(results.glob("bench_*.json")):
    report = json.loads(path.read_text())
    rows = report["results"]
    ref = next((r for r in rows if r["backend"] == "reference" and r["forward_backward"]), None)
    for r in rows:
        fb = r["forward_backward"]
        speedup = (f"{ref['forward_backward']['median_ms'] / fb['median_ms']:.2f}x"
                   if ref and fb and fb["median_ms"] else "-")
        peak = r["memory"].get("peak_bytes")
        peak = f"{peak / 2**20:.1f}" if peak is not None else "-"
        note = "FAILED" if r["error"] else ("MISMATCH" if r["mismatch"] else "")
        table.append(f"| {path.stem.removeprefix('bench_')} | {r['backend']} | {ms(r['forward'])} "
                     f"| {ms(fb)} | {speedup} | {peak} | {note} |")
lines += ["", "## Benchmarks (median of the timed calls; *_nographs: GUNN_EXT_CUDA_GRAPHS=0)", ""] + table
for path in sorted(results.glob("train_*.json")):
    report = json.loads(path.read_text())
    lines += ["", f"## Training step: {path.stem} (batch {report['args']['batch']})", "",
              "| backend | step ms | images/s | peak GB |", "| --- | --- | --- | --- |"]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['backend']} | FAILED: {r['error'][:80]} | | |")
        else:
            peak = r.get("peak_allocated_bytes")
            lines.append(f"| {r['backend']} | {r['step_ms']:.1f} | {r['images_per_s']:.0f} | "
                         f"{peak / 1e9:.3f} |" if peak else f"| {r['backend']} | {r['step_ms']:.1f} | "
                         f"{r['images_per_s']:.0f} | - |")
text = "\n".join(lines) + "\n"
(results / "summary.md").write_text(text)
print(text)
EOF
if [[ -n "${OUT:-}" && -d "$OUT" && "$RESULTS" != "$OUT" ]]; then
  tar czf "$OUT/gpu_check.tar.gz" -C "$RESULTS" . && cp "$RESULTS/summary.md" "$OUT/summary.md"
  log "packed the results into $OUT/gpu_check.tar.gz"
fi
log "done in $((SECONDS - START))s; results in $RESULTS"
