"""A rewritten forward() as the module's own: the module's class becomes a same-named subclass whose forward runs the
source convert() generated from the trace (isinstance holds; pickling and deepcopy store the user's class and that
source), and the helper that source calls at block-tail sites. Compiled with the standard library only (exec of
import statements written here), so no private torch.fx API is needed at run time or when loading a checkpoint."""
from __future__ import annotations

import hashlib
import importlib
import linecache
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def bn_add_relu_site(fused: nn.Module, input: torch.Tensor, residual: Any) -> torch.Tensor:
    """A BN + residual -> activation (-> Dropout) site of a rewritten forward: ``fused(input, residual)`` for a
    residual of the input's shape and device (as in residual blocks; the fused modules promote another dtype).
    The forward computed ``act(bn(input) + residual)`` for any residual the add accepts, which convert() cannot
    tell from the code: one that broadcasts (a bias, an embedding of shape (N, C, 1, 1), a scalar) is computed
    unfused instead, nn.BatchNormXd's forward on the fused module's state (a synchronised module in synchronised
    training: its fused call with the residual broadcast to the input). The fused modules check the residual
    before anything moves (statistics, collectives), so the common case pays for no check of its own here."""
    try:
        return fused(input, residual)
    except (RuntimeError, TypeError):
        if _fits(input, residual):
            raise
    from .sync import _SyncedBatchNorm  # noqa: PLC0415 -- sync imports torch.distributed
    if isinstance(fused, _SyncedBatchNorm) and fused._sync() is not None:  # statistics over the process group
        if (isinstance(residual, torch.Tensor) and torch.result_type(input, residual) == input.dtype
                and torch.broadcast_shapes(input.shape, residual.shape) == input.shape):
            return fused(input, residual.to(input.device, input.dtype).expand(input.shape).contiguous())
        raise RuntimeError(f"bnfused.convert_sync fused a BatchNorm + residual -> ReLU site whose residual "
                           f"({_what(residual)}) does not broadcast to the BatchNorm's output ({tuple(input.shape)}, "
                           f"{input.dtype}) keeping its dtype; SyncBatchNormAddReLU cannot compute it in "
                           "synchronised training")
    out = fused.activation(_BatchNorm.forward(fused, input) + residual)  # nn.BatchNormXd's forward, shared state
    return F.dropout(out, fused.p, fused.training) if fused.p > 0 else out


def _fits(input: torch.Tensor, residual: Any) -> bool:
    """A residual the fused modules take (what functional.check_residual accepts)."""
    return isinstance(residual, torch.Tensor) and residual.shape == input.shape and residual.device == input.device


def _what(value: Any) -> str:
    return f"shape {tuple(value.shape)}, {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__


# Globals torch.fx's generated code may name without a module of their own to import them from.
_CODEGEN_BUILTINS = {"inf": "from math import inf", "nan": "from math import nan", "NoneType": "NoneType = type(None)",
                     "torch": "import torch", "device": "from torch import device"}


def _import_statement(name: str, obj: Any) -> str:
    """A statement binding `name` to `obj` in a fresh namespace: an import of what the object is defined as (its
    module and qualified name, checked to give this very object back), so that the source can be stored in a
    pickle and compiled again in another process."""
    if isinstance(obj, str):  # a string annotation (a forward written under `from __future__ import annotations`)
        return f"{name} = {obj!r}"
    if name in _CODEGEN_BUILTINS:
        return _CODEGEN_BUILTINS[name]
    if isinstance(obj, types.ModuleType):
        return f"import {obj.__name__} as {name}"
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if module and qualname and "<" not in qualname:
        found = importlib.import_module(module)
        for part in qualname.split("."):
            found = getattr(found, part, None)
        if found is obj:
            if "." not in qualname:
                return f"from {module} import {qualname} as {name}"
            return f"import {module}\n{name} = {module}.{qualname}"
    raise ValueError(f"the traced forward uses {name!r} ({type(obj).__name__}), which cannot be imported by name")


def import_block(globals_: dict[str, Any]) -> str:
    """Statements defining the generated code's globals (ValueError for one that cannot be imported by name)."""
    return "\n".join(sorted({_import_statement(name, obj) for name, obj in globals_.items()}))


def _compile_forward(src: str, imports: str) -> Any:
    """The `forward` function that src defines, its globals from imports. Registered with linecache under a
    name of its own, so tracebacks through a rewritten forward show its lines."""
    code = imports + "\n" + src
    filename = f"<bnfused rewritten forward {hashlib.sha1(code.encode()).hexdigest()[:12]}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(keepends=True), filename)
    namespace: dict[str, Any] = {}
    exec(compile(code, filename, "exec"), namespace)  # noqa: S102 -- source generated by torch.fx from the trace
    return namespace["forward"]


_rewritten_classes: dict[tuple[type, str], type] = {}


def rewritten_class(base: type, src: str, imports: str) -> type:
    """A subclass of base (same name, isinstance still holds) whose forward is src; one per (base, src)."""
    key = (base, src)
    cls = _rewritten_classes.get(key)
    if cls is None:
        forward = _compile_forward(src, imports)
        cls = type(base.__name__, (base,), {
            "forward": forward, "__module__": base.__module__, "__qualname__": base.__qualname__,
            "_bnfused_rewritten": (base, src, imports),
            "__reduce_ex__": _reduce_rewritten,
            "__doc__": base.__doc__,
        })
        _rewritten_classes[key] = cls
    return cls


def _reduce_rewritten(self, protocol):
    # Pickled (torch.save(model), copy.deepcopy) as the user's class plus the rewritten forward's source.
    base, src, imports = type(self)._bnfused_rewritten
    return _restore_rewritten, (base, src, imports), self.__dict__.copy()


def _restore_rewritten(base: type, src: str, imports: str) -> nn.Module:
    cls = rewritten_class(base, src, imports)
    return cls.__new__(cls)


def install_forward(module: nn.Module, src: str, imports: str) -> None:
    """module's class becomes a same-named subclass whose forward runs src (module keeps its attributes)."""
    base = type(module)
    while "_bnfused_rewritten" in base.__dict__:  # rewritten twice: build on the user's class
        base = base.__bases__[0]
    module.__class__ = rewritten_class(base, src, imports)
