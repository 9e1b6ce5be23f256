#!/usr/bin/env bash
# `make emu-check`: builds the CUDA kernels' emulated test driver with g++ and runs it -- plain (full matrix), under
# ThreadSanitizer (racecheck stand-in) and AddressSanitizer + UBSan (memcheck stand-in) on a trimmed matrix -- then
# shows that the harness catches injected kernel bugs (inject_bugs.sh). Needs only g++ (no torch, no GPU).
# Env: CXX (default g++); EMU_STAGES (default "plain tsan asan inject"); EMU_JOBS (parallel builds, default 2).
set -uo pipefail
cd "$(dirname "$0")/../.."
CXX=${CXX:-g++}
OUT=.emu_check
mkdir -p "$OUT"
STAGES=${EMU_STAGES:-plain tsan asan inject}
COMMON=(-std=c++20 -g -ffp-contract=off -Wall -Wno-sign-compare -Wno-unknown-pragmas -DBNFUSED_CUDA_EMULATION
        -Itests/cuda_emulation -Icsrc -pthread)
# The sanitizer builds: float32 and float16 kernels only (EMU_TWO_DTYPES), a trimmed matrix (--quick).
# and of the activations one piecewise-linear and one transcendental kind (EMU_FEW_ACTIVATIONS).
declare -A FLAGS=([plain]="-O2" [tsan]="-O1 -DEMU_TWO_DTYPES -DEMU_FEW_ACTIVATIONS -fsanitize=thread"
                  [asan]="-O1 -DEMU_TWO_DTYPES -DEMU_FEW_ACTIVATIONS -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer")
declare -A ARGS=([plain]="" [tsan]="--quick" [asan]="--quick")

build() {
  local v=$1 t0=$SECONDS
  # shellcheck disable=SC2086
  if "$CXX" "${COMMON[@]}" ${FLAGS[$v]} tests/cuda_emulation/driver.cpp -o "$OUT/driver_$v" >"$OUT/build_$v.log" 2>&1; then
    echo "built  $v ($((SECONDS - t0)) s)"
  else
    echo "FAIL   building $v:"; sed 's/^/       /' "$OUT/build_$v.log" | head -40; return 1
  fi
}

status=0
variants=()
for v in plain tsan asan; do [[ " $STAGES " == *" $v "* ]] && variants+=("$v"); done
pids=()
for v in "${variants[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "${EMU_JOBS:-2}" ]; do sleep 1; done
  build "$v" & pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || status=1; done
[ $status -eq 0 ] || { echo "emu-check: FAILED (build)" >&2; exit 1; }

for v in "${variants[@]}"; do
  t0=$SECONDS
  # halt_on_error: a sanitizer report fails the run.
  # shellcheck disable=SC2086
  if TSAN_OPTIONS="halt_on_error=1 exitcode=66 ${TSAN_OPTIONS:-}" ASAN_OPTIONS="detect_leaks=0 ${ASAN_OPTIONS:-}" \
     UBSAN_OPTIONS="halt_on_error=1 print_stacktrace=1 ${UBSAN_OPTIONS:-}" \
     "$OUT/driver_$v" ${ARGS[$v]} >"$OUT/run_$v.log" 2>&1; then
    echo "ok     $v: $(tail -1 "$OUT/run_$v.log") ($((SECONDS - t0)) s)"
  else
    echo "FAIL   $v ($((SECONDS - t0)) s):"; tail -40 "$OUT/run_$v.log" | sed 's/^/       /'; status=1
  fi
done

if [[ " $STAGES " == *" inject "* ]]; then
  t0=$SECONDS
  if tests/cuda_emulation/inject_bugs.sh; then
    echo "ok     injected bugs all caught ($((SECONDS - t0)) s)"
  else
    echo "FAIL   an injected bug went unnoticed ($((SECONDS - t0)) s)"; status=1
  fi
fi
[ $status -eq 0 ] && echo "emu-check: passed" || echo "emu-check: FAILED" >&2
exit $status
