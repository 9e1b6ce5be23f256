"""Loads the compiled extension (bnfused._C), which registers the torch.ops.bnfused.* operators, and exposes what it
reports about the build and its CPU output cache."""

try:
    from . import _C  # noqa: F401  (import registers TORCH_LIBRARY(bnfused))
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "bnfused's compiled extension (bnfused._C) is not built or does not match the installed torch. "
        "In a checkout, build it with `make build` or `pip install --no-build-isolation -e .`; to install, run "
        "`pip install --no-build-isolation .` (then import bnfused from outside the source tree, whose bnfused/ "
        "folder would shadow the installed package). Rebuild after changing torch. Original error: " + str(exc)
    ) from exc

WITH_CUDA: bool = bool(_C.with_cuda)
CPU_CAPABILITY: str = str(_C.cpu_capability)


def empty_cache() -> int:
    """Free the CPU output blocks (8 MiB and larger) bnfused keeps for reuse, as ``torch.cuda.empty_cache()`` does
    for CUDA's caching allocator; returns the bytes released. The cache holds at most ``BNFUSED_CPU_CACHE_MB``
    (default 256; 0 disables it)."""
    return int(_C.empty_cache())
