#!/usr/bin/env bash
# One pass over a GPU machine: build, CUDA tests, benchmarks, profile, summary.
#
#   benchmarks/gpu_check.sh [RESULTS_DIR]
#
# RESULTS_DIR defaults to $GUNN_RESULTS, else benchmarks/results/<date>. When
# $OUT is set (the device tool's output folder, which returns only a few
# files), the whole results folder is also packed into $OUT/gpu_check.tar.gz,
# with summary.md beside it.
# Everything runs under one time budget (GUNN_CHECK_BUDGET seconds, default
# 420), each step under `timeout`, most valuable first: build, batch norm at
# offsets into flat tensors, CUDA tests (the Triton warm-up compiling beside
# them; a test that loses the CUDA context is left out of a rerun and
# diagnosed after the profile), the GUNN-15 shapes on every backend, P = N,
# graph replay over a training loop and the profile, then the rest,
# torch.compile last. A failing step is recorded and the next one runs. The
# summary (benchmarks/check_summary.py, also summary.md) is printed last.
# GUNN_SKIP_INSTALL=1 uses the gunn_ext already importable (dry runs, or a
# second pass on the same machine). GUNN_CHECK_SKIP: space-separated glob
# patterns of steps to leave out, e.g. the steps a first pass completed
# (steps.tsv names them), so that a second pass runs only the rest.
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
  local skip pattern
  read -r -a skip <<< "${GUNN_CHECK_SKIP:-}"  # read -a: the patterns are not expanded as paths
  for pattern in ${skip[@]+"${skip[@]}"}; do  # bash < 4.4 rejects an empty "${skip[@]}" under set -u
    # shellcheck disable=SC2053  # the pattern is a glob on purpose
    if [[ "$name" == $pattern ]]; then
      log "$name: skipped (GUNN_CHECK_SKIP)"
      printf '%s\tskipped\t0\n' "$name" >> "$STEPS"
      return 0
    fi
  done
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
  # The built library, for a rerun on a fresh machine of the same image (GUNN_SKIP_INSTALL=1).
  if [[ -n "${OUT:-}" && -d "$OUT" ]]; then
    tar czf "$OUT/gunn_ext_build.tar.gz" gunn_ext/_C*.so gunn_ext/_build_info.py 2>/dev/null || true
  fi
fi

"$PYTHON" "$ROOT/benchmarks/environment.py" "$RESULTS/environment.json" > "$RESULTS/environment.log" 2>&1
cat "$RESULTS/environment.log"

HAVE_CUDA="$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)"
PYTEST=("$PYTHON" -P -m pytest -q -rfE -p no:cacheprovider)
BENCH=("$PYTHON" "$ROOT/benchmarks/seq_update.py")

if [[ "$HAVE_CUDA" == "1" ]]; then
  SHAPES=("gunn15_a 20 240 32" "gunn15_b 25 300 16" "gunn15_c 30 360 8")
  SWEEP_SEGMENTS="20,40,60,80,120,240"
  # Triton compiles each kernel variant at its first call, one at a time: compile
  # every variant the benchmarks will launch in parallel processes first (batch
  # 16 specialises like batch 64), so the timed steps load them from the cache.
  WARM=""
  SPECS=("${SHAPES[0]} float32 train" "${SHAPES[2]} float32 train" "${SHAPES[0]} float32 train --tf32"
         "${SHAPES[2]} float32 eval" "${SHAPES[0]} bfloat16 train" "${SHAPES[1]} float32 train")
  for segments in ${SWEEP_SEGMENTS//,/ }; do
    (( segments != 20 )) && SPECS+=("sweep $segments 240 32 float32 train")
  done
  for spec in "${SPECS[@]}"; do
    read -r _ segments channels size dtype mode extra <<< "$spec"
    WARM+="\"$PYTHON\" \"$ROOT/benchmarks/seq_update.py\" --backends triton --no-compile --segments $segments"
    WARM+=" --channels $channels --size $size --batch 16 --dtype $dtype --mode $mode --device cuda ${extra:-}"
    WARM+=" --repeats 1 --warmup 0 & "
  done
  # The replay loop's own calls: GUNN-15's layers at its training and evaluation batches.
  WARM+="\"$PYTHON\" \"$ROOT/benchmarks/replay_loop.py\" --backends triton --epochs 2 --steps-per-epoch 2 & "
  # The warm-up compiles on the CPU while the CUDA tests run (their times are not measured).
  run_step triton_warmup 150 bash -c "${WARM} wait" &
  # A device-side fault loses the process's CUDA context; the tests then stop
  # at the test that caused it (tests/conftest.py), and run again without it.
  export GUNN_CUDA_FAULT_FILE="$RESULTS/cuda_faults.txt"
  : > "$GUNN_CUDA_FAULT_FILE"
  cuda_tests() {  # NAME CAP PYTEST-ARGS...: runs again without each test that lost the context (3 runs at most)
    local name="$1" cap="$2"; shift 2
    local run=1 step="$name" before
    while :; do
      local deselect=()
      while read -r id; do [[ -n "$id" ]] && deselect+=(--deselect "$id"); done < "$GUNN_CUDA_FAULT_FILE"
      before=$(wc -l < "$GUNN_CUDA_FAULT_FILE")
      run_step "$step" "$cap" "${PYTEST[@]}" "$@" "${deselect[@]}" --junitxml="$RESULTS/$step.xml"
      (( $(wc -l < "$GUNN_CUDA_FAULT_FILE") > before && run < 3 )) || break
      run=$((run + 1)); step="${name}_rerun$((run - 1))"
    done
  }
  # The first test that lost the context, again alone: with blocking launches
  # (the failing call is the one in the traceback), then under compute-sanitizer
  # (the kernel and source line of the bad access).
  diagnose_fault() {
    local id
    id="$(head -n 1 "$GUNN_CUDA_FAULT_FILE")"
    [[ -z "$id" ]] && return 0
    log "diagnosing $id"
    run_step cuda_fault_blocking 60 env CUDA_LAUNCH_BLOCKING=1 GUNN_CUDA_FAULT_FILE= "${PYTEST[@]}" "$id"
    local sanitizer
    sanitizer="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
    run_step cuda_fault_sanitizer 120 env GUNN_CUDA_FAULT_FILE= "$sanitizer" --tool memcheck \
      --print-limit 20 "${PYTEST[@]}" "$id"
  }
  # PyTorch's batch norm with its tensors 4, 8 and 12 bytes past 16-byte boundaries, as a
  # layer's flat tensors place them: each case that faults in a worker of its own.
  run_step batch_norm_alignment 90 "$PYTHON" "$ROOT/benchmarks/batch_norm_alignment.py" \
    --json "$RESULTS/batch_norm_alignment.json"
  cuda_tests tests_cuda 150 "$ROOT/tests" -m cuda -k "not triton" -rP --ignore="$ROOT/tests/test_triton.py"
  wait
  bench_shape() {  # dtype shape cap [extra args]
    local dtype="$1" shape="$2" cap="$3"; shift 3
    read -r name segments channels size <<< "$shape"
    run_step "bench_${name}_${dtype}$SUFFIX" "$cap" "$@" --segments "$segments" --channels "$channels" \
      --size "$size" --batch 64 --dtype "$dtype" --device cuda --repeats 20 --warmup 10 \
      --json "$RESULTS/bench_${name}_${dtype}$SUFFIX.json"
  }
  # fp32 at 240/20 32x32 and 360/30 8x8 on every backend (the first run
  # autotunes the Triton kernels), P = N, graph replay over a training loop,
  # the kernel profile (also at P = 40 and P = N), the diagnosis of a test
  # that lost the CUDA context, 240/20 in TF32 and in channels_last, eval, a
  # GUNN-15 training step (also at P = N), the segment sweep, the Triton
  # tests, bf16, the 300/25 shape, graph replay off; torch.compile of the
  # reference last, as it takes minutes.
  SUFFIX=""
  bench_shape float32 "${SHAPES[0]}" 60 "${BENCH[@]}" --no-compile
  bench_shape float32 "${SHAPES[2]}" 40 "${BENCH[@]}" --no-compile
  run_step bench_PeqN_float32 50 "${BENCH[@]}" --no-compile --backends reference,native --segments 240 \
    --channels 240 --size 32 --batch 64 --dtype float32 --device cuda --repeats 10 --warmup 8 \
    --json "$RESULTS/bench_PeqN_float32.json"
  for backend in native triton; do
    run_step "replay_loop_$backend" 90 "$PYTHON" "$ROOT/benchmarks/replay_loop.py" --backends "$backend" \
      --json "$RESULTS/replay_loop_$backend.json"
  done
  run_step profile_ops 90 "$PYTHON" "$ROOT/benchmarks/profile_ops.py" --device cuda --batch 64 \
    --shapes 240/20/32 360/30/8 240/40/32 240/240/32 --json "$RESULTS/profile_ops.json"
  diagnose_fault
  # The same 240/20 with every float32 product in TF32, as the reference's convolutions already are.
  SUFFIX="_tf32"
  bench_shape float32 "${SHAPES[0]}" 40 "${BENCH[@]}" --no-compile --tf32
  # The same in channels_last, the native op's layout (the others' inputs are NCHW).
  SUFFIX="_channels_last"
  bench_shape float32 "${SHAPES[0]}" 30 "${BENCH[@]}" --no-compile --backends reference,native --channels-last
  SUFFIX="_eval"
  bench_shape float32 "${SHAPES[2]}" 30 "${BENCH[@]}" --no-compile --mode eval
  run_step train_gunn15 60 "$PYTHON" "$ROOT/benchmarks/train_step.py" --model gunn15 --batch 64 \
    --backends reference,native --device cuda --json "$RESULTS/train_gunn15.json"
  # The same network with one channel per segment (P = N in every layer).
  run_step train_gunn15_PeqN 60 "$PYTHON" "$ROOT/benchmarks/train_step.py" --model gunn15 --batch 64 \
    --segment-channels 1 --backends reference,native --device cuda --steps 5 \
    --json "$RESULTS/train_gunn15_PeqN.json"
  run_step sweep_240_32x32 120 "$PYTHON" "$ROOT/benchmarks/segment_sweep.py" --channels 240 \
    --segments "$SWEEP_SEGMENTS" --size 32 --batch 64 --device cuda --repeats 10 --warmup 3 \
    --json "$RESULTS/sweep_240_32x32.json" --plot "$RESULTS/sweep_240_32x32.png"
  # The Triton kernels' tests compiled for the GPU, bf16, the 300/25 shape, graphs off.
  cuda_tests tests_triton 120 "$ROOT/tests/test_triton.py" "$ROOT/tests/test_cuda.py" \
    -k "triton or not test_cuda" -rP
  SUFFIX=""
  bench_shape bfloat16 "${SHAPES[0]}" 40 "${BENCH[@]}" --no-compile
  bench_shape float32 "${SHAPES[1]}" 40 "${BENCH[@]}" --no-compile
  SUFFIX="_nographs"
  bench_shape float32 "${SHAPES[0]}" 30 env GUNN_EXT_CUDA_GRAPHS=0 "${BENCH[@]}" --no-compile --backends native
  SUFFIX="_compile"
  bench_shape float32 "${SHAPES[2]}" 150 "${BENCH[@]}" --backends reference,native,compile
else
  log "NO CUDA GPU: torch.cuda.is_available() is False; doing a short CPU run instead (no GPU numbers)"
  run_step tests_cuda 60 "${PYTEST[@]}" "$ROOT/tests" -m cuda --junitxml="$RESULTS/tests_cuda.xml"
  run_step batch_norm_alignment 30 "$PYTHON" "$ROOT/benchmarks/batch_norm_alignment.py" --device cpu \
    --json "$RESULTS/batch_norm_alignment.json"
  run_step bench_cpu_small_float32 120 "${BENCH[@]}" --no-compile --segments 4 --size 8 --batch 4 \
    --device cpu --backends reference,native --repeats 3 --warmup 1 \
    --json "$RESULTS/bench_cpu_small_float32.json"
  run_step train_cpu_small 120 "$PYTHON" "$ROOT/benchmarks/train_step.py" --model gunn15 --width 0.1 \
    --batch 4 --steps 2 --warmup 1 --device cpu --json "$RESULTS/train_cpu_small.json"
  run_step train_cpu_small_PeqN 120 "$PYTHON" "$ROOT/benchmarks/train_step.py" --model gunn15 --width 0.1 \
    --segment-channels 1 --batch 4 --steps 2 --warmup 1 --device cpu --json "$RESULTS/train_cpu_small_PeqN.json"
  run_step profile_ops 60 "$PYTHON" "$ROOT/benchmarks/profile_ops.py" --device cpu --shapes 24/2/8 12/12/4 \
    --batch 2 --calls 2 --warmup 1 --json "$RESULTS/profile_ops.json"
  run_step replay_loop 60 "$PYTHON" "$ROOT/benchmarks/replay_loop.py" --json "$RESULTS/replay_loop.json"
  run_step sweep_cpu_small 120 "$PYTHON" "$ROOT/benchmarks/segment_sweep.py" --channels 24 \
    --segments 2,24 --size 4 --batch 2 --device cpu --repeats 2 --warmup 1 \
    --json "$RESULTS/sweep_cpu_small.json" --plot "$RESULTS/sweep_cpu_small.png"
fi

"$PYTHON" "$ROOT/benchmarks/check_summary.py" "$RESULTS"
if [[ -n "${OUT:-}" && -d "$OUT" && "$RESULTS" != "$OUT" ]]; then
  tar czf "$OUT/gpu_check.tar.gz" -C "$RESULTS" . && cp "$RESULTS/summary.md" "$OUT/summary.md"
  log "packed the results into $OUT/gpu_check.tar.gz"
fi
log "done in $((SECONDS - START))s; results in $RESULTS"
