#!/usr/bin/env bash
# The GPU validation as one prepared call on a lent device machine (15 minutes of device time: this call, its
# machine's start-up, and room for one rerun): build for sm_90, every op once against the CPU
# (.ci/gpu_ops_smoke.py: masks, forward and pass bits bit for bit, every activation), the CUDA cases of the
# op/module/autograd/activation/graph tests, the smoke workload under compute-sanitizer's memcheck with PyTorch's
# caching allocator off (PYTORCH_NO_CUDA_MEMORY_CACHING=1: an overrun inside a pooled block is otherwise unseen),
# then the quick benchmark. The most informative stages first; each runs under its own timeout inside one budget
# (the stage limits add up to it: 140 + 30 + 110 + 60 + 60 = 400 s; the benchmark, last, takes what the others
# leave), so a slow stage cannot eat the ones after it; the last lines printed are a summary table (the device tool
# returns the output's tail). The build needs ninja (torch's fallback compiles one file at a time: ~15 min); its
# longest file, backward_input_transcendental.cu, takes ~100 s of one core (sm_90) on the 2-core CPU machine. What
# the device machine may lack (ninja, pytest-xdist) comes from .gpu_tools/, which .ci/gpu_tools.sh fills here and
# the device tool carries:
#
#   .ci/gpu_tools.sh                                          # once, here
#   device run: command=".ci/gpu_check.sh", carry=[".gpu_tools"], timeout_s=430   # the default stages, <= 400 s
#   GPU_CHECK_STAGES="sanitize-more tests-compile" .ci/gpu_check.sh   # a second call (warm machine), if time is left
#
# Logs go to $OUT (the device tool brings back at most 8 files: build, smoke, sanitize, tests, bench logs, the
# summary and the benchmark's .md + .png), or .gpu_check/ where OUT is unset.
# Env: GPU_CHECK_STAGES (default "build smoke tests memcheck bench"; also "sanitize-more": racecheck, initcheck,
#      synccheck (3 x 75 s); "tests-compile" (300 s)), GPU_CHECK_BUDGET_S (default 400),
#      PYTHON (default python3: on the device machine the venv that holds torch), MAX_JOBS (default 16),
#      BNFUSED_CUDA_ARCHS (default 90), BENCH_ARGS (default --quick).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
STAGES=${GPU_CHECK_STAGES:-build smoke tests memcheck bench}
BUDGET=${GPU_CHECK_BUDGET_S:-400}
export MAX_JOBS=${MAX_JOBS:-16} BNFUSED_CUDA_ARCHS=${BNFUSED_CUDA_ARCHS:-90} PYTHONUNBUFFERED=1
if ! command -v ninja >/dev/null 2>&1 && [ -x .gpu_tools/ninja ]; then export PATH="$PWD/.gpu_tools:$PATH"; fi
if ! "$PY" -c "import xdist" >/dev/null 2>&1 && [ -d .gpu_tools/py ]; then
  export PYTHONPATH="$PWD/.gpu_tools/py${PYTHONPATH:+:$PYTHONPATH}"
fi
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"

# stage NAME LIMIT_S LOG CMD...: runs CMD with at most LIMIT_S (and what is left of the budget), appends to LOG.
stage() {
  local name=$1 limit=$2 log=$3 left t0 rc
  shift 3
  left=$((BUDGET - SECONDS))
  if [ "$left" -lt 20 ]; then
    printf '%-22s skipped (budget spent)\n' "$name" | tee -a "$SUMMARY"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  t0=$SECONDS
  echo "== $name (limit $limit s): $*" >>"$log"
  timeout --kill-after=5 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  local verdict=ok
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && verdict="TIMEOUT"
  [ $rc -ne 0 ] && [ "$verdict" = ok ] && verdict="FAIL rc=$rc"
  printf '%-22s %-12s %4d s  %s\n' "$name" "$verdict" $((SECONDS - t0)) "$(tail -n 1 "$log" | cut -c1-90)" \
    | tee -a "$SUMMARY"
  return 0
}

has() { [[ " $STAGES " == *" $1 "* ]]; }

{
  echo "date: $(date -u '+%F %T UTC')  commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader 2>&1
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', \
torch.cuda.is_available())" 2>&1
  nvcc --version 2>&1 | tail -1
  compute-sanitizer --version 2>&1 | head -1
  echo "ninja $(ninja --version 2>/dev/null || echo 'NOT FOUND: the build compiles one file at a time')"
  "$PY" -c "import xdist; print('pytest-xdist', xdist.__version__)" 2>/dev/null || echo "pytest-xdist NOT FOUND: \
the CUDA tests run on one worker"
} | tee -a "$SUMMARY"

if has build; then
  stage build 140 "$OUT/build.log" "$PY" setup.py -q build_ext --inplace
  "$PY" -c "import bnfused; print('bnfused', bnfused.__version__, 'WITH_CUDA', bnfused.WITH_CUDA)" 2>&1 | tee -a "$SUMMARY"
fi
if has smoke; then
  stage smoke 30 "$OUT/smoke.log" "$PY" .ci/gpu_ops_smoke.py
fi
# compute-sanitizer on the quick smoke run (3 shapes with ReLU, 4 activation cases, float32, p = 0.3);
# --error-exitcode: a report fails the stage.
# On a gVisor device machine compute-sanitizer refuses the device ("Device not supported"): after the first tool
# says so, the others would only fail the same way, so they are skipped.
sanitize() {
  local tool=$1 limit=$2
  if grep -q "Device not supported" "$OUT/sanitize.log" 2>/dev/null; then
    printf '%-22s skipped (compute-sanitizer: device not supported on this runtime)\n' "sanitize $tool" \
      | tee -a "$SUMMARY"
    return 0
  fi
  stage "sanitize $tool" "$limit" "$OUT/sanitize.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer \
    --tool "$tool" --error-exitcode 9 --print-limit 20 "$PY" .ci/gpu_ops_smoke.py --quick
}
if has tests; then
  # The CUDA parametrisations of the op, functional, module, autograd, activation, mask and CUDA-graph tests
  # (compile tests are the slowest on a GPU: run them with GPU_CHECK_STAGES="tests-compile" when there is time;
  # test_activations' 972 CUDA cases have none: small tensors against the float64 reference, 48 gradchecks).
  # -v: a line per test as it ends, so a stage cut by its timeout still shows which tests ran and failed.
  xdist=()
  "$PY" -c "import xdist" >/dev/null 2>&1 && xdist=(-n 8)
  # OMP_NUM_THREADS: 8 workers share the machine's 16 cores (CPU twins of the checks run on them too).
  stage tests 110 "$OUT/tests.log" env OMP_NUM_THREADS=2 "$PY" -m pytest -v --tb=short -p no:cacheprovider \
    "${xdist[@]}" --maxfail=30 -k cuda \
    tests/test_ops.py tests/test_functional.py tests/test_modules.py tests/test_add_relu.py tests/test_autograd.py \
    tests/test_activations.py tests/test_dropout_mask.py tests/test_keep_bits.py tests/test_bad_inputs.py \
    tests/test_saved_memory.py tests/test_cuda_graphs.py tests/test_sync.py
fi
if has memcheck; then
  sanitize memcheck 60
fi
if has tests-compile; then
  stage tests-compile 300 "$OUT/tests.log" "$PY" -m pytest -q -p no:cacheprovider --maxfail=10 -k cuda \
    tests/test_compile.py tests/test_compile_pointwise.py tests/test_export.py tests/test_opcheck.py
fi
if has sanitize-more; then
  for tool in racecheck initcheck synccheck; do sanitize "$tool" 75; done
fi
if has bench; then
  # shellcheck disable=SC2086
  # What the stages before it left of the budget (at least its own 60 s): torch.compile's peers make the quick
  # suite's time on a GPU unknown, and its results file is written at the end.
  stage bench "$BUDGET" "$OUT/bench.log" "$PY" -m benchmarks --device cuda --out "$OUT" ${BENCH_ARGS:---quick}
fi
echo "---- summary ($SECONDS s) ----"
cat "$SUMMARY"
