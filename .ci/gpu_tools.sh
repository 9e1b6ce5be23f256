#!/usr/bin/env bash
# Fills .gpu_tools/ (gitignored), which .ci/gpu_check.sh uses on a device machine that lacks them and the device
# tool carries there (carry=[".gpu_tools"]; the device machine has no network): ninja (torch's build without it
# compiles one file at a time) and pytest-xdist with execnet, pure-Python wheels unpacked into .gpu_tools/py
# (the CUDA test cases on 8 workers). Run here, once; needs the package index.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/torch_python.sh  # PYTHON: the Python that holds torch here
DEST=.gpu_tools
rm -rf "$DEST"
mkdir -p "$DEST/py"
NINJA=$(command -v ninja || true)
[ -n "$NINJA" ] || NINJA=$(dirname "$PYTHON")/ninja
cp "$NINJA" "$DEST/ninja"
WHEELS=$(mktemp -d)
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --dest "$WHEELS" pytest-xdist execnet
for w in "$WHEELS"/*.whl; do "$PYTHON" -m zipfile -e "$w" "$DEST/py"; done
rm -rf "$WHEELS"
echo "gpu_tools: $("$DEST/ninja" --version) ninja, $(ls "$DEST/py" | grep -c dist-info) wheels in $DEST/py"
