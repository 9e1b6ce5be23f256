"""Prints, one per line, the flags the extension's CUDA sources are compiled with: setup.py's own nvcc list (read
from setup.py, the one place it is written) and the flags torch.utils.cpp_extension adds to every nvcc call
(COMMON_NVCC_FLAGS: -D__CUDA_NO_HALF_OPERATORS__ and its family). The archs (-gencode) are left to the caller.
Used by .ci/cuda_compile_check.sh and tests/ptx_sim/ptx_check.sh, so what they compile is what the build compiles."""
import ast
import os
import sys

from torch.utils import cpp_extension

SETUP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "setup.py")


def setup_nvcc_flags():
    with open(SETUP) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id == "nvcc" and isinstance(node.value, ast.List)):
            return [ast.literal_eval(e) for e in node.value.elts]
    sys.exit("nvcc_flags.py: no `nvcc = [...]` list of literal flags in setup.py")


flags = setup_nvcc_flags()
flags += [f for f in cpp_extension.COMMON_NVCC_FLAGS if f not in flags]
print("\n".join(flags))
