#!/usr/bin/env bash
# `make ptx-check`: the CUDA kernels compiled by nvcc with the build's flags (.ci/nvcc_flags.py) to PTX for
# compute_86 and compute_90, driven by tests/ptx_sim/driver.cu (real CUDA runtime calls, no torch library) and run
# on GPGPU-Sim's functional PTX simulator against the reference the CPU emulation uses (kernel_cases.h). One binary
# per (dtype, arch): float32, float16, bfloat16 x compute_86, compute_90; two at a time (each run loads its PTX
# for ~10-30 s, then simulates). Builds, logs and the simulator's run directories go to .ptx_check/ (gitignored).
#
# The simulator: the folder in BNFUSED_SIM_DIR (default ../shared/gpgpu-sim, beside the checkout), whose run.sh
# runs a `-cudart shared` program on it. `--if-present` (the CI): exit 0 with one line saying so when it is absent.
# Env: NVCC (default nvcc), PYTHON (a Python with torch: headers and flags), PTX_CHECK_JOBS (default 2),
#      PTX_CHECK_DTYPES (default "float32 float16 bfloat16"), PTX_CHECK_ARCHS (default "86 90").
set -uo pipefail
cd "$(dirname "$0")/../.."
t_start=$SECONDS
OUT=.ptx_check
SIM=${BNFUSED_SIM_DIR:-../shared/gpgpu-sim}
if [ ! -x "$SIM/run.sh" ]; then
  if [ "${1:-}" = "--if-present" ]; then
    echo "ptx-check: skipped (no GPU simulator at $SIM; set BNFUSED_SIM_DIR to its folder)"
    exit 0
  fi
  echo "ptx-check: no GPU simulator at $SIM (a folder with run.sh; set BNFUSED_SIM_DIR)" >&2
  exit 1
fi
NVCC=${NVCC:-nvcc}
command -v "$NVCC" >/dev/null 2>&1 || { echo "ptx-check: nvcc not found (set NVCC)" >&2; exit 1; }
# shellcheck source=.ci/torch_python.sh
source .ci/torch_python.sh || exit 1
rm -rf "$OUT"
mkdir -p "$OUT"

# The simulator's lib/libcudart.so.13 must resolve to its libcudart.so; a copy of the folder that lost the link
# (a plain file holding the name) gets a private copy with the link restored.
if ! head -c 4 "$SIM/lib/libcudart.so.13" 2>/dev/null | grep -q ELF; then
  cp -r "$SIM" "$OUT/sim" && chmod -R u+w "$OUT/sim" && ln -sf libcudart.so "$OUT/sim/lib/libcudart.so.13" || exit 1
  SIM=$OUT/sim
fi

mapfile -t FLAGS < <("$PYTHON" .ci/nvcc_flags.py)
[ ${#FLAGS[@]} -gt 0 ] || { echo "ptx-check: could not get the build's nvcc flags" >&2; exit 1; }
# -lineinfo only adds debug lines, which the simulator's PTX parser rejects (`.loc ... inlined_at`): dropped.
KFLAGS=()
for f in "${FLAGS[@]}"; do [ "$f" = -lineinfo ] || KFLAGS+=("$f"); done
TORCH_INC=$("$PYTHON" -c "import torch.utils.cpp_extension as c; print(c.include_paths()[0])")
# The driver's own host code is compiled without contraction, as the CPU reference it computes.
BUILD=("${KFLAGS[@]}" -DBNFUSED_CUDA_STANDALONE -Xcompiler -ffp-contract=off -I csrc -I tests/cuda_emulation
       -isystem "$TORCH_INC" -cudart shared)

declare -A DTYPE_ID=([float32]=0 [float16]=1 [bfloat16]=2)
DTYPES=${PTX_CHECK_DTYPES:-float32 float16 bfloat16}
ARCHS=${PTX_CHECK_ARCHS:-86 90}
JOBS=${PTX_CHECK_JOBS:-2}
wait_slot() { while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 1; done; }

build() {
  local dt=$1 arch=$2 t0=$SECONDS name=driver_$1_$2
  if "$NVCC" "${BUILD[@]}" -DPTX_SIM_DTYPE="${DTYPE_ID[$dt]}" -gencode "arch=compute_$arch,code=compute_$arch" \
       tests/ptx_sim/driver.cu -o "$OUT/$name" >"$OUT/build_$name.log" 2>&1; then
    echo "built  $dt compute_$arch ($((SECONDS - t0)) s)"
  else
    echo "FAIL   building $dt compute_$arch:"; sed 's/^/       /' "$OUT/build_$name.log" | head -30; return 1
  fi
}

# A config whose -gpgpu_ptx_force_max_capability is the arch, so the simulator takes PTX up to it.
config_for() {
  local dir=$OUT/config_$1
  mkdir -p "$dir" && cp "$SIM"/configs/* "$dir/" &&
    sed -i "s/^-gpgpu_ptx_force_max_capability .*/-gpgpu_ptx_force_max_capability $1/" "$dir/gpgpusim.config"
  echo "$dir/gpgpusim.config"
}

run() {
  local dt=$1 arch=$2 t0=$SECONDS name=driver_$1_$2 log=$OUT/run_$1_$2.log rc=0
  SIM_CONFIG=$(config_for "$arch") TMPDIR=$PWD/$OUT "$SIM/run.sh" "$OUT/$name" >"$log" 2>&1 || rc=$?
  # The simulator's output and the driver's are mixed: the driver tags its lines (ptx_sim:, FAIL).
  local summary
  summary=$(grep -a '^ptx_sim:' "$log" | tail -1)
  if [ $rc -eq 0 ] && grep -aq "Extracting specific PTX file named $name.*sm_$arch.ptx" "$log" &&
     [[ "$summary" == *" passed "* ]]; then
    echo "ok     compute_$arch ${summary#ptx_sim: } ($((SECONDS - t0)) s)"
  else
    echo "FAIL   $dt compute_$arch (exit $rc, $((SECONDS - t0)) s; log $log):"
    grep -a -E '^(FAIL|ptx_sim:)|Assertion|error' "$log" | head -20 | sed 's/^/       /'
    return 1
  fi
}

status=0
pids=()
for dt in $DTYPES; do
  for arch in $ARCHS; do wait_slot; build "$dt" "$arch" & pids+=($!); done
done
for p in "${pids[@]}"; do wait "$p" || status=1; done
[ $status -eq 0 ] || { echo "ptx-check: FAILED (build)" >&2; exit 1; }

pids=()
for dt in $DTYPES; do
  for arch in $ARCHS; do wait_slot; run "$dt" "$arch" & pids+=($!); done
done
for p in "${pids[@]}"; do wait "$p" || status=1; done
if [ $status -eq 0 ]; then
  echo "ptx-check: passed ($((SECONDS - t_start)) s)"
else
  echo "ptx-check: FAILED ($((SECONDS - t_start)) s)" >&2
fi
exit $status
