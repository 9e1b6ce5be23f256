#!/usr/bin/env bash
# CI: bnfused installs the way the README tells a user to, in a new virtual environment that has only torch.
# From a clean clone of the committed tree, the README's install lines (the `pip install` lines of the first code
# block under "## Install", read from the README itself, so the check follows the text) run in order:
#   0. before them (and before torch, whose own requirements may bring setuptools), a build in the new environment
#      (Python 3.11's venv has setuptools 65 and no wheel, 3.12+ no setuptools) must stop with build_backend.py's
#      one-line message, and so must one in a Python 3.12+ venv when a python3.12 or newer runs here;
#   1. the build tools line;
#   2. `pip install --no-build-isolation .`: bnfused is then imported from another directory and runs a forward
#      and backward against nn;
#   3. `pip install --no-build-isolation -e .`: the import now resolves to the clone;
#   4. `python -m build --sdist --no-isolation` (with the `build` package, as the README says): the sdist must hold
#      every tracked file the build reads, so it builds wherever the clone builds.
# Step 2 compiles the extension from scratch; step 3 reuses its objects in build/ (setup.py keeps them there for
# editable builds too). INSTALL_CHECK_SDIST_BUILD=1 also builds and uses the sdist (a second full compile).
# The environment is a plain `python3 -m venv` (no system site packages) given torch==2.13.0 (the CPU wheel of the
# Makefile); torch's dependencies and the build tools come from the package index, so it runs in the CPU CI only.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d /tmp/bnfused-install-check.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
export MAX_JOBS="${MAX_JOBS:-2}" BNFUSED_NO_CUDA="${BNFUSED_NO_CUDA:-1}"
start=$SECONDS
step() { echo "install check [$((SECONDS - start)) s]: $*"; }

# The README's install lines, comments stripped: the build tools, the install, the editable install.
mapfile -t LINES < <(awk '/^## Install/ {inside = 1; next} inside && /^## / {exit}
  inside && /^```/ {block++; next} inside && block == 1 && /^pip install/ {sub(/[ \t]*#.*/, ""); print}' \
  "$REPO/README.md")
[ "${#LINES[@]}" = 3 ] && [[ ${LINES[0]} == *setuptools* && ${LINES[0]} == *wheel* ]] &&
  [ "${LINES[1]}" = "pip install --no-build-isolation ." ] && [ "${LINES[2]}" = "pip install --no-build-isolation -e ." ] ||
  { echo "install check: the README's install block is not (build tools, install, editable install):"; printf '  %s\n' "${LINES[@]}"; exit 1; }

git clone -q --no-local "$REPO" "$WORK/src"  # committed files only: no build/ objects, no .venv
python3 -m venv "$WORK/venv"
export PATH="$WORK/venv/bin:$PATH"  # as after `source venv/bin/activate`: the README's `pip` is the venv's
packages() { python -m pip list 2>/dev/null | awk 'NR > 2 {printf "%s%s %s", sep, $1, $2; sep = ", "}'; }
step "a new venv: $(python --version), $(packages)"

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

# A build that stops at build_backend.py: exactly one line of pip's subprocess output, the message.
expect_tools_message() {
  local log="$1"
  grep -q "^ *bnfused: building needs setuptools >= 64 and wheel" "$log" && grep -q "\[1 lines of output\]" "$log" ||
    { cat "$log"; echo "install check: expected the one-line build tools message"; exit 1; }
}
# The backend's own test of the tools (a Python 3.11 venv: setuptools 65 without wheel), before torch, which may
# bring a setuptools of its own (torch 2.13 requires setuptools >= 77, which makes wheels without wheel).
if ! (cd "$WORK/src" && python -c "import build_backend; build_backend._require_wheel_tools()") 2>/dev/null; then
  step "${LINES[1]} without the build tools: must stop with one line"
  if (cd "$WORK/src" && eval "${LINES[1]}") >"$WORK/no_tools.log" 2>&1; then
    echo "install check: the build succeeded without the build tools"; exit 1
  fi
  expect_tools_message "$WORK/no_tools.log"
fi
NEWER=""
for candidate in python3.14 python3.13 python3.12; do  # one that runs (a pyenv shim of another version does not)
  if "$candidate" -c "" 2>/dev/null; then NEWER="$candidate"; break; fi
done
if [ -z "$NEWER" ] && command -v pyenv >/dev/null; then  # or one that pyenv has installed
  version="$(pyenv versions --bare | grep -E '^3\.(1[2-9]|[2-9][0-9])\.[0-9]+$' | tail -1 || true)"
  [ -z "$version" ] || NEWER="$(pyenv root)/versions/$version/bin/python3"
fi
if [ -n "$NEWER" ]; then
  "$NEWER" -m venv "$WORK/venv-new"
  step "$("$WORK/venv-new/bin/python" --version) venv, no setuptools: ${LINES[1]} must stop with one line"
  if (cd "$WORK/src" && "$WORK/venv-new/bin/python" -m pip install --no-build-isolation .) >"$WORK/new.log" 2>&1; then
    echo "install check: the build succeeded without setuptools"; exit 1
  fi
  expect_tools_message "$WORK/new.log"
fi

python -m pip install -q torch==2.13.0
step "torch installed: $(packages)"
step "${LINES[0]}"
(cd "$WORK/src" && eval "${LINES[0]}")
step "${LINES[1]}"
(cd "$WORK/src" && eval "${LINES[1]}")
(cd "$WORK" && python use_bnfused.py "$WORK/venv/")

step "${LINES[2]}"
(cd "$WORK/src" && eval "${LINES[2]}")
(cd "$WORK" && python use_bnfused.py "$WORK/src/")

step "python -m build --sdist --no-isolation"
python -m pip install -q build
(cd "$WORK/src" && python -m build --sdist --no-isolation >"$WORK/sdist.log" 2>&1) || { cat "$WORK/sdist.log"; exit 1; }
SDIST="$(ls "$WORK"/src/dist/bnfused-*.tar.gz)"
git -C "$WORK/src" ls-files setup.py build_backend.py pyproject.toml README.md MANIFEST.in bnfused csrc docs \
  > "$WORK/needed.txt"
python - "$SDIST" "$WORK/needed.txt" <<'EOF'
import sys, tarfile
names = {n.split("/", 1)[1] for n in tarfile.open(sys.argv[1]).getnames() if "/" in n}
needed = set(open(sys.argv[2]).read().split())
missing = sorted(needed - names)
assert not missing, f"the sdist lacks {missing}"
print(f"sdist {sys.argv[1].rsplit('/', 1)[1]}: {len(names)} files, every tracked build input included")
EOF

if [ "${INSTALL_CHECK_SDIST_BUILD:-0}" = 1 ]; then
  step "pip install --no-build-isolation <sdist>"
  python -m pip uninstall -q -y bnfused
  (cd "$WORK" && python -m pip install -q --no-build-isolation "$SDIST")
  (cd "$WORK" && python use_bnfused.py "$WORK/venv/")
fi
step "passed"
