"""Build the bnfused extension (bnfused._C); the package metadata is in pyproject.toml.

Install with `pip install --no-build-isolation .` (or `-e .`) into an environment that already has torch: the
extension is compiled against that torch. CPU kernels always; CUDA kernels when the installed torch has CUDA and
nvcc is found (CUDA_HOME).
Environment knobs:
  BNFUSED_CPU_CAPABILITY=default|avx2   vector ISA of the CPU kernels (default: avx2 when this CPU has avx2+fma)
  BNFUSED_NO_CUDA=1                     build the CPU kernels only, even on a CUDA machine
  BNFUSED_CUDA_ARCHS="80;90"            compute capabilities to build for
"""
import glob
import os
import sys
import sysconfig

from setuptools import setup

try:
    from torch.utils import cpp_extension
except ImportError:  # one line for the user instead of a traceback (pip prints it as the build's error)
    sys.exit("bnfused: building needs PyTorch importable in this Python environment and none was found (pip's "
             "isolated build environment does not see it either). Install torch first, then build with: "
             "pip install --no-build-isolation .")

ROOT = os.path.dirname(os.path.abspath(__file__))


def cpu_has(*flags):
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read().split()
    except OSError:
        return False
    return all(flag in info for flag in flags)


def cpu_capability_flags():
    choice = os.environ.get("BNFUSED_CPU_CAPABILITY")
    if choice is None:
        choice = "avx2" if cpu_has("avx2", "fma", "f16c") else "default"
    if choice == "avx2":
        # at::vec picks its AVX2 implementation from these macros (its namespace at::vec::AVX2).
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    if choice == "default":
        return ["-DCPU_CAPABILITY=DEFAULT"]
    raise ValueError(f"BNFUSED_CPU_CAPABILITY must be 'default' or 'avx2', got {choice!r}")


def with_cuda():
    import torch

    if os.environ.get("BNFUSED_NO_CUDA") == "1":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def extension():
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is an inline template whose `#pragma omp parallel` is compiled into this
    # extension; without the flag every CPU kernel silently runs on one thread. The link resolves to the
    # libgomp.so.1 torch already loaded (same soname), so there is one OpenMP runtime.
    cxx = ["-O3", "-std=c++20", "-fno-math-errno", "-ffp-contract=off", "-Wno-unknown-pragmas",
           "-fopenmp"] + cpu_capability_flags()
    define_macros = []
    if with_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        archs = os.environ.get("BNFUSED_CUDA_ARCHS", "80;90").split(";")
        nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo", "-DBNFUSED_WITH_CUDA"]
        nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        define_macros.append(("BNFUSED_WITH_CUDA", None))
        return cpp_extension.CUDAExtension(
            "bnfused._C", sources, include_dirs=[os.path.join(ROOT, "csrc")], define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"])
    return cpp_extension.CppExtension(
        "bnfused._C", sources, include_dirs=[os.path.join(ROOT, "csrc")], extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"])


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, with its objects always in build/temp.<platform>-<python>: where `make build` and
    `pip install .` keep them anyway, and where pip's editable builds (`pip install -e .`), which otherwise compile
    everything again in a fresh temporary folder, find them too, so ninja recompiles only what changed."""

    def finalize_options(self):
        if self.build_temp is None:
            tag = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
            self.build_temp = os.path.join(ROOT, "build", f"temp.{tag}")
        super().finalize_options()


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension})
