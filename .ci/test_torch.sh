#!/usr/bin/env bash
# The test suite against another torch release, e.g. the oldest one pyproject.toml admits (run before a release):
#   make test-torch TORCH=2.7.1            (or .ci/test_torch.sh 2.7.1 [pytest arguments, default tests])
# The package index's torch wheels are CUDA builds: about 3 GB with their nvidia-* libraries, downloaded once into
# TORCH_CACHE (default ~/.cache/bnfused-torch) and installed from there into .venv-torch-<version> with the test
# tools. The checkout's files (tracked and untracked, not ignored) are copied to build/torch-<version>/, where the
# extension is built against that torch (CPU kernels only) and the tests run: the checkout's own build stays as
# it is. Needs the package index the first time for a version; later runs install nothing.
set -euo pipefail
VERSION="${1:?usage: .ci/test_torch.sh TORCH_VERSION [pytest arguments]}"
shift
REPO="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${TORCH_CACHE:-$HOME/.cache/bnfused-torch}"
VENV="$REPO/.venv-torch-$VERSION"
DEST="$REPO/build/torch-$VERSION"
start=$SECONDS
step() { echo "test-torch $VERSION [$((SECONDS - start)) s]: $*"; }

if [ ! -f "$VENV/.installed" ]; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  if ! "$VENV/bin/pip" install -q --no-index --find-links "$CACHE" "torch==$VERSION" 2>/dev/null; then
    step "downloading torch $VERSION and its requirements into $CACHE"
    mkdir -p "$CACHE"
    "$VENV/bin/pip" download -q "torch==$VERSION" -d "$CACHE"
    "$VENV/bin/pip" install -q --no-index --find-links "$CACHE" "torch==$VERSION"
  fi
  "$VENV/bin/pip" install -q numpy pytest ninja "setuptools>=64" wheel expecttest scikit-learn onnx onnxscript \
    onnxruntime
  touch "$VENV/.installed"
fi
step "$("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)') in $VENV"

rm -rf "$DEST"
mkdir -p "$DEST"
(cd "$REPO" && git ls-files -z -co --exclude-standard | tar --null -T - -cf -) | tar -xf - -C "$DEST"
cd "$DEST"
step "building the extension in $DEST"
BNFUSED_NO_CUDA=1 MAX_JOBS="${MAX_JOBS:-2}" "$VENV/bin/python" setup.py -q build_ext --inplace >build.log 2>&1 ||
  { tail -40 build.log; exit 1; }
step "pytest"
"$VENV/bin/python" -m pytest -q "${@:-tests}"
step "done"
