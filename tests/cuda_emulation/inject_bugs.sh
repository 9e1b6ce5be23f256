#!/usr/bin/env bash
# The emulation harness must be able to fail: each known kernel bug below is applied to a copy of csrc/ (never
# to the sources), the float32 driver is built against the copy with the build that should catch it, run on the
# op it breaks, and must fail with the expected report. Prints what caught each bug; exits non-zero if any bug
# went unnoticed. Called by emu_check.sh; `inject_bugs.sh TEXT` applies only the bugs whose name contains TEXT.
set -uo pipefail
cd "$(dirname "$0")/../.."
CXX=${CXX:-g++}
OUT=.emu_check/inject
rm -rf "$OUT"
mkdir -p "$OUT"
# EMU_RELU_ONLY: the planted bugs are in the kernels' indexing, which the ReLU cases reach (no activation compiled).
COMMON=(-std=c++20 -O0 -g -ffp-contract=off -w -DBNFUSED_CUDA_EMULATION -DEMU_FLOAT32_ONLY -DEMU_RELU_ONLY
        -Itests/cuda_emulation -pthread)
declare -A SAN=([plain]="" [tsan]="-fsanitize=thread" [asan]="-fsanitize=address,undefined -fno-sanitize-recover=all")

# name | file | exact text | replacement | build | driver arguments | expected report (grep -E)
BUGS=(
  "missing __syncthreads in block_reduce|cuda/reduce.cuh|  if ((tid & 31) == 0) partial[tid >> 5] = a;
  __syncthreads();|  if ((tid & 31) == 0) partial[tid >> 5] = a;|tsan|--quick --only stats|ThreadSanitizer: data race"
  "shuffle in a divergent branch|cuda/reduce.cuh|  a = warp_reduce(a);
  if ((tid & 31) == 0)|  if ((tid & 31) < 16) a = warp_reduce(a);
  if ((tid & 31) == 0)|plain|--quick --only stats|divergent warp"
  "partial shuffle mask|cuda/reduce.cuh|__shfl_down_sync(0xffffffffu, a.g, delta)|__shfl_down_sync(0x0000ffffu, a.g, delta)|plain|--quick --only backward_reduce|with mask 0x0000ffff, but the live lanes"
  "out-of-bounds shared read|cuda/reduce.cuh|a = tid < nwarps ? partial[tid] : identity;|a = tid <= nwarps ? partial[tid] : identity;|asan|--quick --only stats|heap-buffer-overflow"
  "skipped shared write|cuda/reduce.cuh|  if ((tid & 31) == 0) partial[tid >> 5] = a;|  if ((tid & 31) == 0 && (tid >> 5) < nwarps - 1) partial[tid >> 5] = a;|plain|--quick --only stats|FAIL stats"
  "gridDim.y > 65535|cuda/reduce.cuh|    plan.splits = std::clamp<int64_t>(plan.splits, 1, 65535);
    plan.grid = dim3(static_cast<unsigned>(g.C)|    plan.splits = 65536;
    plan.grid = dim3(static_cast<unsigned>(g.C)|plain|--quick --only stats|CUDA error 9 .*cudaGetLastError"
  "vector loads on a misaligned pointer (no head peel)|cuda/apply.cuh|             sh, k >= 0, d);|             0, true, d);|asan|--quick --only forward|misaligned address"
  "arrival counter not reset by the last block|cuda/reduce.cuh|    if (last[0]) *counter = 0;||plain|--quick --only stats|the last block must reset it"
  "arrival counted before the block's partials are stored|cuda/reduce.cuh|  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    const unsigned before|  if (threadIdx.x == 0 && threadIdx.y == 0) {
    const unsigned before|tsan|--quick --only backward_reduce|ThreadSanitizer: data race"
  "add forward: pass bits written to the wrong byte|cuda/add_relu.cuh|pass_bits[(base + j * C) >> 3] = |pass_bits[base >> 3] = |plain|--quick --only add_relu_forward|FAIL add_relu_forward \(bits\)"
  "add forward: tile rows past S|cuda/add_relu.cuh|        if (j < rows) {
          const int64_t off = base + j * C;|        if (true) {
          const int64_t off = base + j * C;|asan|--quick --only add_relu_forward|heap-buffer-overflow"
  "add forward, peeled: the last byte not written|cuda/add_relu.cuh|    if (b == units - 1 && b * kUnit < numel) pass_bits[b]|    if (false) pass_bits[b]|plain|--quick --only add_relu_forward|FAIL add_relu_forward \(bits\)"
  "add forward, peeled: the lead lane stores its unit too|cuda/add_relu.cuh|      if (!ws.supplier()) u.store(out, yv);|      u.store(out, yv);|tsan|--quick --only add_relu_forward|ThreadSanitizer: data race"
  "add backward: pass bits of a column at the wrong stride|cuda/common.cuh|      const int64_t m = off + j * stride;|      const int64_t m = off + j;|plain|--quick --only add_relu_backward_reduce|FAIL add_relu_backward_reduce"
  "mixed misalignments: the forward vectorises anyway|cuda/apply.cuh|             sh, k >= 0, d);|             sh, true, d);|plain|--quick --mixed --only forward|FAIL forward .*not the scalar path"
  "mixed misalignments: a reduction vectorises anyway|cuda/reduce.cuh|             plan.shift, plan.vec, d, ws_ptr, counters);|             plan.shift, true, d, ws_ptr, counters);|plain|--quick --mixed --only backward_reduce|FAIL backward_reduce .*not the scalar path"
  "mixed misalignments: the add backward vectorises anyway|cuda/add_relu.cuh|sh, k >= 0, scale);|sh, true, scale);|asan|--quick --mixed --only add_relu_backward_input|misaligned address"
)

status=0
i=0
for spec in "${BUGS[@]}"; do
  i=$((i + 1))
  IFS='|' read -r -d '' name file old new build args expect <<<"$spec" || true
  [[ -z "${1:-}" || "$name" == *"$1"* ]] || continue
  expect=${expect%$'\n'}
  dir=$OUT/bug$i
  mkdir -p "$dir"
  cp -r csrc "$dir/csrc"
  if ! OLD="$old" NEW="$new" python3 - "$dir/csrc/$file" <<'PY'
import os, sys
path = sys.argv[1]
src = open(path).read()
old, new = os.environ["OLD"], os.environ["NEW"]
if src.count(old) < 1:
    sys.exit(f"pattern not found in {path}: {old!r}")
open(path, "w").write(src.replace(old, new, 1))
PY
  then
    echo "FAIL   bug $i ($name): could not apply the patch (the kernel changed?)"; status=1; continue
  fi
  t0=$SECONDS
  # shellcheck disable=SC2086
  if ! "$CXX" "${COMMON[@]}" -I "$dir/csrc" ${SAN[$build]} tests/cuda_emulation/driver.cpp -o "$dir/driver" \
       >"$dir/build.log" 2>&1; then
    echo "FAIL   bug $i ($name): the patched kernels do not build"; sed 's/^/       /' "$dir/build.log" | head; status=1
    continue
  fi
  # shellcheck disable=SC2086
  CUDA_EMU_TIMEOUT_S=20 TSAN_OPTIONS="halt_on_error=1 exitcode=66" ASAN_OPTIONS="detect_leaks=0" \
    UBSAN_OPTIONS="halt_on_error=1" timeout 300 "$dir/driver" $args >"$dir/run.log" 2>&1
  rc=$?
  if [ $rc -ne 0 ] && grep -Eq "$expect" "$dir/run.log"; then
    echo "caught bug $i ($name): $build build, exit $rc, \"$(grep -Em1 "$expect" "$dir/run.log" | cut -c1-150)\" ($((SECONDS - t0)) s)"
  else
    echo "MISSED bug $i ($name): $build build, exit $rc, no /$expect/ in $dir/run.log"; tail -5 "$dir/run.log"
    status=1
  fi
done
exit $status
