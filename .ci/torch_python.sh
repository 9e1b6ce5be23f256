# Sourced by the CUDA check scripts: sets PYTHON to a Python that imports torch (its headers and build flags are
# needed; no torch library is linked): $PYTHON if set, else python3, else the checkout's .venv/bin/python.
# Returns non-zero with a message when there is none.
if [ -z "${PYTHON:-}" ]; then
  if python3 -c "import torch" >/dev/null 2>&1; then
    PYTHON=python3
  elif [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    PYTHON=.venv/bin/python
  else
    echo "no Python with torch (tried python3 and .venv/bin/python; set PYTHON)" >&2
    false
  fi
fi
