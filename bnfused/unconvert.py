"""unconvert(): every bnfused module back to the torch.nn modules it stands for, for tools that know only
nn.BatchNormXd (quantization, pruning, nn.SyncBatchNorm.convert_sync_batchnorm, TorchScript, a machine without
bnfused). The nn modules share the fused modules' Parameter and buffer objects; what convert() changed (its
nn.Identity stand-ins, rewritten forwards) is put back as it was."""
from __future__ import annotations

import sys
from typing import Optional

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from .convert import _CARRIED_HOOKS, _OUTPUT_HOOKS, CONVERTED, ORIGINAL, REPLACED
from .modules import _BatchNormAddReLU, _BatchNormReLUDropout
from .sync import _SyncedBatchNorm


def _batchnorm_for(fused: _BatchNormReLUDropout) -> _BatchNorm:
    """The nn.BatchNormXd (nn.SyncBatchNorm for the synced modules) with fused's configuration, mode, Parameter
    and buffer objects, and the hooks that keep their meaning on it (forward pre-hooks, state_dict hooks); for a
    module convert() made from a BatchNorm module with its own activation (timm's BatchNormAct2d), that module."""
    extra = {"bias": False} if fused.affine and fused._parameters.get("bias") is None else {}
    args = (fused.num_features, fused.eps, fused.momentum, fused.affine, fused.track_running_stats)
    if ORIGINAL in fused.__dict__:
        bn = fused.__dict__[ORIGINAL]
        if isinstance(fused, _SyncedBatchNorm) and not isinstance(bn, nn.SyncBatchNorm):
            # convert_sync replaced timm's BatchNormAct2d: the model keeps synchronising, as timm's SyncBatchNormAct
            # (what timm.layers.convert_sync_batchnorm makes of it, with its act and drop layers)
            bn = sys.modules[type(bn).__module__].convert_sync_batchnorm(bn, fused.process_group)
        bn.eps, bn.momentum = fused.eps, fused.momentum
    elif isinstance(fused, _SyncedBatchNorm):
        bn = nn.SyncBatchNorm(*args, process_group=fused.process_group, device="meta", **extra)
    else:
        bn = type(fused)._replaces(*args, device="meta", **extra)
    for name in ("weight", "bias"):
        bn._parameters[name] = fused._parameters.get(name)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        bn._buffers[name] = fused._buffers.get(name)
    for attr in _CARRIED_HOOKS:
        setattr(bn, attr, getattr(fused, attr))
    return bn


def _replacement(module: nn.Module, name: str) -> Optional[nn.Module]:
    """What takes module's place (None: it stays); raises, naming it, for a module that cannot be turned back."""
    if REPLACED in module.__dict__:  # convert()'s nn.Identity: the ReLU / Dropout module it stood for
        return module.__dict__[REPLACED]
    if not isinstance(module, _BatchNormReLUDropout):
        return None
    what = f"bnfused.unconvert: {type(module).__name__} {name or '(the model)'}"
    hook = next((kind for kind in _OUTPUT_HOOKS if getattr(module, kind)), None)
    if hook is not None:
        raise RuntimeError(f"{what} has a {hook[1:-1].replace('_', ' ')}, which sees the activation's output: the "
                           "BatchNorm layer taking its place would give it another tensor; remove the hook first")
    if parametrize.is_parametrized(module):
        raise RuntimeError(f"{what} has parametrizations (torch.nn.utils.parametrize); remove them first")
    bn = _batchnorm_for(module)
    if module.__dict__.get(CONVERTED):
        return bn  # its activation and Dropout are in the model as they were
    if isinstance(module, _BatchNormAddReLU):
        raise RuntimeError(f"{what} was built directly, not by bnfused.convert(): torch.nn has no module that adds "
                           "a residual, and the code calling it passes one; replace it in that code by "
                           "nn.BatchNorm, + and the activation (or build the model unfused and convert() it)")
    act = [] if module.activation.kind == "identity" else [module.activation.module()]
    layers = [bn, *act] + ([nn.Dropout(module.p)] if module.p > 0 else [])
    return nn.Sequential(*layers)


def unconvert(module: nn.Module) -> nn.Module:
    """Turn every bnfused module of ``module`` back into the torch.nn modules it stands for, in place, and return
    ``module`` (the replacement when ``module`` itself is a fused block).

    * Sites made by :func:`convert`: the fused module becomes the ``nn.BatchNorm1d/2d/3d`` it replaced (timm's
      ``BatchNormAct2d``: that very module, with its activation), and the activation / Dropout modules that became
      ``nn.Identity`` are put back, so each site is again the original BN -> activation (-> Dropout); a module
      whose forward convert() rewrote gets its own class back (the original forward, whose activation /
      F.dropout calls and residual adds now run again).
    * Fused modules built directly (``BatchNormActDropout2d(64, p=0.1, act="silu")``): an
      ``nn.Sequential(nn.BatchNorm2d, nn.SiLU(), nn.Dropout(0.1))`` (the torch.nn module of its activation,
      ``Activation.module()``: none for identity; no Dropout when ``p=0``) takes their place, so their
      state_dict keys gain the ``0.`` of the Sequential. A ``BatchNormAddActXd`` built directly has no such
      counterpart (the code calling it passes the residual): ``RuntimeError``.
    * ``SyncBatchNormReLUDropout`` / ``SyncBatchNormAddReLU`` become ``nn.SyncBatchNorm`` over the same process
      group (also where :func:`convert_sync` replaced an ``nn.BatchNormXd``: the model keeps synchronising).

    Every BatchNorm layer shares the fused module's Parameter and buffer objects (an optimizer built before keeps
    training them), mode, eps, momentum, affine, track_running_stats, forward pre-hooks and state_dict hooks, so
    the model computes what it computed, and ``state_dict`` keys of converted sites are unchanged.
    ``convert(unconvert(convert(model)))`` fuses the same sites again. Raises ``RuntimeError``, before anything
    changes, for a fused module with a forward or backward hook (it sees the ReLU's output; the BN would give it
    another tensor), with parametrizations, or a ``BatchNormAddReLUXd`` built directly.

    Args:
        module: a model converted by :func:`convert` / :func:`convert_sync`, holding fused modules built
            directly, or a fused module itself

    Returns:
        ``module``, changed in place; for a fused module given directly, the ``nn.Sequential`` replacing it.

    Examples::

        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.1))
        >>> fused = bnfused.convert(model)
        >>> [type(m).__name__ for m in fused]
        ['Conv2d', 'BatchNormActDropout2d', 'Identity', 'Identity']
        >>> [type(m).__name__ for m in bnfused.unconvert(fused)]
        ['Conv2d', 'BatchNorm2d', 'ReLU', 'Dropout']
        >>> # a block built directly becomes the layers it fuses, sharing its parameters
        >>> block = bnfused.BatchNormReLUDropout2d(8, p=0.1)
        >>> seq = bnfused.unconvert(block)
        >>> [type(m).__name__ for m in seq], seq[2].p
        (['BatchNorm2d', 'ReLU', 'Dropout'], 0.1)
        >>> seq[0].weight is block.weight
        True
    """
    root = _replacement(module, "")
    places = [(parent, name, child, _replacement(child, f"{prefix}.{name}" if prefix else name))
              for prefix, parent in module.named_modules()
              for name, child in parent._modules.items() if child is not None]
    # every check has run: now change the model (a module at several places gets one replacement), in the mode
    # of what it replaces
    made: dict[int, nn.Module] = {}
    for parent, name, child, new in places:
        if new is not None:
            parent._modules[name] = made.setdefault(id(child), new.train(child.training))
    for m in module.modules():
        rewritten = type(m).__dict__.get("_bnfused_rewritten")  # _rewritten_forward.install_forward's class
        if rewritten is not None:
            m.__class__ = rewritten[0]
    return module if root is None else root.train(module.training)
