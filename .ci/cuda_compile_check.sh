#!/usr/bin/env bash
# Compile-only check of the CUDA sources (csrc/cuda/*.cu), for machines without a GPU: `nvcc -c` of every file with
# torch's headers and the flags the build gives nvcc (.ci/nvcc_flags.py: setup.py's list and torch's
# -D__CUDA_NO_HALF_OPERATORS__ family; -I csrc; sm_80 + sm_90), then the per-kernel resource table from ptxas
# (.ci/ptxas_table.py: registers, blocks of 256 threads per SM, stack, spills, static shared memory), which fails
# on a kernel that spills more than CUDA_CHECK_MAX_SPILL_BYTES (default 64; the most today: 52 bytes of spill
# loads, reduce_cl_kernel<double, StatsOp, V = 2> on sm_80). Objects, logs and the table (resources.txt) go to
# .cuda_check/ (gitignored); then the op layer's CUDA branch (csrc/ops.cpp, csrc/eager_function.cpp with
# BNFUSED_WITH_CUDA) through the C++ compiler, syntax only. Exits non-zero if any file fails.
#
# A CPU-only torch wheel ships the c10/cuda and ATen/cuda headers but not the generated
# c10/cuda/impl/cuda_cmake_macros.h; an empty stand-in is created under .cuda_check/shim when it is missing.
#
# Env: NVCC (default nvcc); PYTHON (default python3 if it imports torch, else .venv/bin/python);
#      CUDA_CHECK_JOBS (parallel nvcc processes, default 2); NVCC_EXTRA_FLAGS (appended, e.g. "-Xptxas -v");
#      CUDA_CHECK_CSRC_FLAGS (how csrc is put on the include path, default "-I csrc" as in setup.py; e.g.
#      "-Xcompiler=-iquote,csrc" checks the kernels alone when a csrc header shadows a system one).
set -uo pipefail
cd "$(dirname "$0")/.."

NVCC=${NVCC:-nvcc}
if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "cuda_compile_check: nvcc not found (set NVCC or put it on PATH)" >&2
  exit 1
fi

# shellcheck source=.ci/torch_python.sh
source .ci/torch_python.sh || exit 1

OUT=.cuda_check
SHIM=$OUT/shim
mkdir -p "$OUT"
mapfile -t TORCH_INC < <("$PYTHON" -c "import torch.utils.cpp_extension as c; print('\n'.join(c.include_paths()))")
PY_INC=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
if [ ${#TORCH_INC[@]} -eq 0 ]; then
  echo "cuda_compile_check: could not get torch's include paths from $PYTHON" >&2
  exit 1
fi
# The stand-in only when torch lacks the real header (a stale one must never shadow it: -I comes first).
rm -rf "$SHIM"
if [ ! -f "${TORCH_INC[0]}/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  mkdir -p "$SHIM/c10/cuda/impl"
  : >"$SHIM/c10/cuda/impl/cuda_cmake_macros.h"
fi

read -r -a CSRC_FLAGS <<<"${CUDA_CHECK_CSRC_FLAGS:--I csrc}"
INCS=("${CSRC_FLAGS[@]}")
[ -d "$SHIM" ] && INCS+=(-I "$SHIM")
for d in "${TORCH_INC[@]}"; do INCS+=(-isystem "$d"); done
INCS+=(-isystem "$PY_INC")

mapfile -t FLAGS < <("$PYTHON" .ci/nvcc_flags.py)  # setup.py's and torch's: what the build compiles with
if [ ${#FLAGS[@]} -eq 0 ]; then
  echo "cuda_compile_check: could not get the build's nvcc flags (.ci/nvcc_flags.py)" >&2
  exit 1
fi
FLAGS+=(-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 -Xptxas -v)
read -r -a EXTRA <<<"${NVCC_EXTRA_FLAGS:-}"
FLAGS+=("${EXTRA[@]}")

shopt -s nullglob
SOURCES=(csrc/cuda/*.cu)
if [ ${#SOURCES[@]} -eq 0 ]; then
  echo "cuda_compile_check: no csrc/cuda/*.cu sources" >&2
  exit 1
fi

# Preflight (seconds): a tiny translation unit using <math.h> with the same include path. nvcc force-includes cuda_runtime.h,
# whose <math.h> must be the C library's: a project header named like a system header on -I breaks every file.
printf '#include <math.h>\n#include <cuda/std/cmath>\nint bnfused_preflight(double x) { return ::fpclassify(x); }\n' \
  >"$OUT/preflight.cu"
if ! "$NVCC" "${FLAGS[@]}" "${INCS[@]}" -c "$OUT/preflight.cu" -o "$OUT/preflight.o" >"$OUT/preflight.log" 2>&1; then
  echo "FAIL  a translation unit that only uses <math.h> does not compile with this include path:"
  sed 's/^/      /' "$OUT/preflight.log" | head -20
  for h in math.h stdlib.h string.h assert.h limits.h float.h stdint.h time.h; do
    if [ -f "csrc/$h" ]; then
      echo "      -> csrc/$h shadows the system <$h> for every #include <$h> (setup.py puts csrc on -I; nvcc's" \
           "cuda_runtime.h includes <math.h>). Rename the project header (e.g. csrc/bn_$h)."
    fi
  done
  echo "cuda_compile_check: FAILED (include path)" >&2
  exit 1
fi

JOBS=${CUDA_CHECK_JOBS:-2}
rm -f "$OUT"/*.status
compile() {
  local src=$1 name
  name=$(basename "${1%.cu}")
  local obj=$OUT/$name.o log=$OUT/$name.log t0=$SECONDS rc=0
  rm -f "$obj"
  "$NVCC" "${FLAGS[@]}" "${INCS[@]}" -c "$src" -o "$obj" >"$log" 2>&1 || rc=$?
  if [ $rc -eq 0 ]; then
    echo "ok    $src ($((SECONDS - t0)) s)"
  else
    echo "FAIL  $src ($((SECONDS - t0)) s, nvcc exit $rc)"
  fi
  # ptxas's resource lines go to the table below; anything else (warnings, errors) is shown.
  grep -v -E "^ptxas info|bytes stack frame|^ *$" "$log" | sed 's/^/      /'
  echo $rc >"$OUT/$name.status"
}

for src in "${SOURCES[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 1; done
  compile "$src" &
done
wait

status=0
for src in "${SOURCES[@]}"; do
  name=$(basename "${src%.cu}")
  rc=$(cat "$OUT/$name.status" 2>/dev/null || echo missing)
  [ "$rc" = 0 ] || status=1
done
if [ $status -eq 0 ]; then
  logs=()
  for src in "${SOURCES[@]}"; do logs+=("$OUT/$(basename "${src%.cu}").log"); done
  if "$PYTHON" .ci/ptxas_table.py --max-spill "${CUDA_CHECK_MAX_SPILL_BYTES:-64}" "${logs[@]}" \
       >"$OUT/resources.txt" 2>"$OUT/resources.err"; then
    echo "kernels by registers (ptxas; the full table in $OUT/resources.txt):"
    head -9 "$OUT/resources.txt" | sed 's/^/      /'
  else
    status=1
    sed 's/^/      /' "$OUT/resources.err"
  fi
fi
# The host side of a CUDA build: the op layer's CUDA backend (ops.cpp's CudaBackend, eager_function.cpp) compiled by
# the C++ compiler with BNFUSED_WITH_CUDA, as setup.py compiles it when torch has CUDA (syntax and types only).
HOST_SOURCES=(csrc/ops.cpp csrc/eager_function.cpp)
HOST_INCS=(-I csrc)
[ -d "$SHIM" ] && HOST_INCS+=(-I "$SHIM")
for d in "${TORCH_INC[@]}"; do HOST_INCS+=(-isystem "$d"); done
HOST_INCS+=(-isystem "$PY_INC")
for src in "${HOST_SOURCES[@]}"; do
  t0=$SECONDS
  if "${CXX:-g++}" -std=c++20 -fsyntax-only -DBNFUSED_WITH_CUDA -DTORCH_API_INCLUDE_EXTENSION_H \
       -DTORCH_EXTENSION_NAME=_C "${HOST_INCS[@]}" "$src" >"$OUT/host_$(basename "$src").log" 2>&1; then
    echo "ok    $src with BNFUSED_WITH_CUDA ($((SECONDS - t0)) s)"
  else
    echo "FAIL  $src with BNFUSED_WITH_CUDA:"; head -30 "$OUT/host_$(basename "$src").log" | sed 's/^/      /'
    status=1
  fi
done
if [ $status -ne 0 ]; then
  echo "cuda_compile_check: FAILED" >&2
else
  echo "cuda_compile_check: all ${#SOURCES[@]} CUDA sources compile (sm_80, sm_90)"
fi
exit $status
