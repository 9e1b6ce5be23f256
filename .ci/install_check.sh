#!/usr/bin/env bash
# CI: bnfused installs the way the README tells a user to. From a clean clone of the committed tree:
#   1. `python -m build --sdist --no-isolation` makes an sdist, which must hold every tracked file the build
#      reads (setup.py, pyproject.toml, README.md, bnfused/, csrc/), so it builds wherever the clone builds;
#   2. `pip install --no-build-isolation .` into a fresh virtual environment (--system-site-packages) that has
#      torch; bnfused is then imported from another directory and runs a forward and backward against nn;
#   3. `pip install --no-build-isolation -e .` into the same environment: the import now resolves to the clone.
# Step 2 compiles the extension from scratch; step 3 reuses its objects in build/ (setup.py keeps them there for
# editable builds too). INSTALL_CHECK_SDIST_BUILD=1 also builds and uses the sdist (a second full compile).
# The environment gets torch from the interpreter when it has one, else torch==2.13.0 (the CPU wheel of the
# Makefile); the build tools from the package index. Needs network access to it, so it runs in the CPU CI only.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d /tmp/bnfused-install-check.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
export MAX_JOBS="${MAX_JOBS:-2}" BNFUSED_NO_CUDA="${BNFUSED_NO_CUDA:-1}"
start=$SECONDS
step() { echo "install check [$((SECONDS - start)) s]: $*"; }

git clone -q --no-local "$REPO" "$WORK/src"  # committed files only: no build/ objects, no .venv
SYSTEM_PY=python3
"$SYSTEM_PY" -m venv --system-site-packages "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -c "import torch" 2>/dev/null || "$VPY" -m pip install -q torch==2.13.0
"$VPY" -m pip install -q "setuptools>=64" wheel build

step "sdist"
(cd "$WORK/src" && "$VPY" -m build --sdist --no-isolation --outdir "$WORK/dist" >"$WORK/sdist.log" 2>&1) ||
  { cat "$WORK/sdist.log"; exit 1; }
SDIST="$(ls "$WORK"/dist/bnfused-*.tar.gz)"
git -C "$WORK/src" ls-files setup.py pyproject.toml README.md MANIFEST.in bnfused csrc docs > "$WORK/needed.txt"
"$VPY" - "$SDIST" "$WORK/needed.txt" <<'EOF'
import sys, tarfile
names = {n.split("/", 1)[1] for n in tarfile.open(sys.argv[1]).getnames() if "/" in n}
needed = set(open(sys.argv[2]).read().split())
missing = sorted(needed - names)
assert not missing, f"the sdist lacks {missing}"
print(f"sdist {sys.argv[1].rsplit('/', 1)[1]}: {len(names)} files, every tracked build input included")
EOF

# Used from a directory that is not the source tree, so `import bnfused` can only find the installed package.
cat > "$WORK/use_bnfused.py" <<'EOF'
import sys
import torch
import bnfused
from torch import nn
where = sys.argv[1]
assert bnfused.__file__.startswith(where), f"bnfused imported from {bnfused.__file__}, expected under {where}"
block = bnfused.BatchNormReLUDropout2d(8, p=0.0)
ref = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU())
x = torch.randn(4, 8, 5, 5, requires_grad=True)
x_ref = x.detach().clone().requires_grad_()
y, y_ref = block(x), ref(x_ref)
y.square().sum().backward()
y_ref.square().sum().backward()
torch.testing.assert_close(y, y_ref)
torch.testing.assert_close(x.grad, x_ref.grad)
torch.testing.assert_close(block.running_var, ref[0].running_var)
print(f"bnfused {bnfused.__version__} from {bnfused.__file__}: forward/backward match nn")
EOF

step "pip install --no-build-isolation ."
(cd "$WORK/src" && "$VPY" -m pip install -q --no-build-isolation .)
(cd "$WORK" && "$VPY" use_bnfused.py "$WORK/venv/")

step "pip install --no-build-isolation -e ."
(cd "$WORK/src" && "$VPY" -m pip install -q --no-build-isolation -e .)
(cd "$WORK" && "$VPY" use_bnfused.py "$WORK/src/")

if [ "${INSTALL_CHECK_SDIST_BUILD:-0}" = 1 ]; then
  step "pip install --no-build-isolation <sdist>"
  "$VPY" -m pip uninstall -q -y bnfused
  (cd "$WORK" && "$VPY" -m pip install -q --no-build-isolation "$SDIST")
  (cd "$WORK" && "$VPY" use_bnfused.py "$WORK/venv/")
fi
step "passed"
