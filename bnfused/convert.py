"""convert(): swap BatchNormXd -> activation (-> Dropout) sites for the fused module (SyncBatchNormActDropout /
SyncBatchNormAddAct with sync=True / convert_sync), wherever the data flows that way: in nn.Sequential chains
(torchvision's Conv2dNormActivation), in forward() code (found by torch.fx, see _graph_sites.py) and in timm's
BatchNormAct2d. The fused module shares the BN's Parameter and buffer objects; a report says what was fused and why
the other BatchNorm layers were not."""
from __future__ import annotations

import itertools
import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import _graph_sites, _rewritten_forward
from .activation import RELU, Activation, activation_of_module
from .modules import (BatchNormAddReLU1d, BatchNormAddReLU2d, BatchNormAddReLU3d, BatchNormReLUDropout1d,
                      BatchNormReLUDropout2d, BatchNormReLUDropout3d, _BatchNormReLUDropout)
from .sync import SyncBatchNormAddReLU, SyncBatchNormReLUDropout

logger = logging.getLogger(__name__)

_FUSED_FOR = {
    nn.BatchNorm1d: BatchNormReLUDropout1d,
    nn.BatchNorm2d: BatchNormReLUDropout2d,
    nn.BatchNorm3d: BatchNormReLUDropout3d,
}
# Hooks that see a module's output or its gradients: after fusion a BN's output includes the activation, and a
# removed activation/Dropout is not called at all, so a site with such hooks stays unfused.
_OUTPUT_HOOKS = ("_forward_hooks", "_backward_hooks", "_backward_pre_hooks")
# Hooks whose meaning survives on the fused module (same input, same state_dict): shared with it, so the user's
# handles still remove them.
_CARRIED_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks",
                  "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
# What unconvert() reads back: set on the fused modules convert() makes (their act / Dropout stay in the model, as
# calls in a rewritten forward or held by nn.Identity stand-ins), and on those stand-ins (the module they replace).
CONVERTED = "_bnfused_converted"
REPLACED = "_bnfused_replaced"
# On a fused module that took the place of a BatchNorm module with an activation of its own (timm's BatchNormAct2d):
# that module, which unconvert() puts back (in __dict__, not a submodule).
ORIGINAL = "_bnfused_original"

# timm's BatchNorm + activation modules (timm.layers.norm_act): nn.BatchNorm2d / nn.SyncBatchNorm subclasses with the
# same state_dict, whose forward is F.batch_norm -> self.drop -> self.act. Matched by module and class name, so that
# timm need not be importable.
_TIMM_NORM_ACT = {("timm.layers.norm_act", "BatchNormAct2d"): False, ("timm.models.layers.norm_act", "BatchNormAct2d"):
                  False, ("timm.layers.norm_act", "SyncBatchNormAct"): True,
                  ("timm.models.layers.norm_act", "SyncBatchNormAct"): True}


def _timm_norm_act(module: nn.Module, sync: bool) -> bool:
    """Whether module is exactly timm's BatchNormAct2d (or, with sync, timm's SyncBatchNormAct)."""
    cls = type(module)
    synced = _TIMM_NORM_ACT.get((cls.__module__, cls.__qualname__))
    return synced is not None and (sync or not synced)


def _bare_norm_act(module: nn.Module) -> bool:
    """Whether a timm BatchNormAct2d has neither an activation nor a drop layer (apply_act=False): a plain BN, fused
    with what follows it like one."""
    act, drop = getattr(module, "act", None), getattr(module, "drop", None)
    return (act is None or type(act) is nn.Identity) and (drop is None or _graph_sites.is_pass_through(drop))


@dataclass(frozen=True)
class FusedSite:
    """One fused chain: ``name`` is the BatchNorm's qualified name (the fused module's now), ``relu`` and
    ``dropout`` what applied the activation and the dropout ("layer1.0.relu", "F.silu", "Tensor.relu_",
    "blocks.0.bn1.act" for timm's BatchNormAct2d; dropout None when not fused), ``rewritten`` the qualified name of
    the module whose forward() was rewritten ("" for the model itself), or None when the swap was in place (the
    activation/Dropout modules became nn.Identity); ``residual`` the operand a BN + add -> activation site adds
    (None for BN -> activation sites); ``act`` the activation fused (``str(bnfused.Activation)``: "relu",
    "silu", "leaky_relu(0.1)", ...)."""
    name: str
    relu: str
    dropout: Optional[str] = None
    p: float = 0.0
    rewritten: Optional[str] = None
    residual: Optional[str] = None  # BN + residual -> activation sites: what the residual operand was
    act: str = "relu"


@dataclass(frozen=True)
class UnfusedBatchNorm:
    name: str
    reason: str


@dataclass
class ConvertReport:
    """What convert() did: the fused sites, every matched BatchNorm layer left unfused (and why), and the modules
    whose forward() torch.fx could not trace (their BN layers outside nn.Sequential chains stay unfused)."""
    fused: list[FusedSite] = field(default_factory=list)
    unfused: list[UnfusedBatchNorm] = field(default_factory=list)
    untraced: list[tuple[str, str]] = field(default_factory=list)

    @property
    def num_fused(self) -> int:
        return len(self.fused)

    def summary(self) -> str:
        rewritten = sorted({s.rewritten or "<model>" for s in self.fused if s.rewritten is not None})
        lines = [f"bnfused.convert: fused {len(self.fused)} site(s), {len(self.unfused)} BatchNorm layer(s) unfused"
                 + (f"; forward() rewritten in {len(rewritten)} module(s)" if rewritten else "")]
        lines += [f"  fused   {s.name}" + (f" + {s.residual}" if s.residual else "") + f" -> {s.relu}"
                  + ("" if s.act == "relu" else f" ({s.act})")
                  + (f" -> {s.dropout} (p={s.p:g})" if s.dropout else "")
                  + ("" if s.rewritten is None else f"  [forward of {s.rewritten or '<model>'} rewritten]")
                  for s in self.fused]
        lines += [f"  unfused {u.name}: {u.reason}" for u in self.unfused]
        lines += [f"  untraced {name or '<model>'}: {why}" for name, why in self.untraced]
        return "\n".join(lines)

    __str__ = summary


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


# nn.BatchNormXd -> the fused BN + add + activation module of its dimension.
_ADD_MODULES = {nn.BatchNorm1d: BatchNormAddReLU1d, nn.BatchNorm2d: BatchNormAddReLU2d,
                nn.BatchNorm3d: BatchNormAddReLU3d}


def _plain_type(bn: _BatchNorm) -> type:
    """The nn.BatchNormXd that bn is (timm's BatchNormAct2d: nn.BatchNorm2d)."""
    return next((t for t in _FUSED_FOR if isinstance(bn, t)), type(bn))


def _fused_for(bn: _BatchNorm, p: float, sync: bool, process_group, add: bool = False,
               act: Activation = RELU) -> nn.Module:
    """The fused module taking bn's place, sharing its Parameter and buffer objects and the hooks that keep
    their meaning."""
    if add and sync:
        fused = SyncBatchNormAddReLU.from_batchnorm(bn, p, process_group, act=act)
    elif add:
        fused = _ADD_MODULES[_plain_type(bn)].from_batchnorm(bn, p, act=act)
    elif sync:
        fused = SyncBatchNormReLUDropout.from_batchnorm(bn, p, process_group, act=act)
    else:
        fused = _FUSED_FOR[_plain_type(bn)].from_batchnorm(bn, p, act=act)
    for attr in _CARRIED_HOOKS:
        setattr(fused, attr, getattr(bn, attr))
    setattr(fused, CONVERTED, True)
    if type(bn) not in (*_FUSED_FOR, nn.SyncBatchNorm):
        fused.__dict__[ORIGINAL] = bn  # timm's BatchNormAct2d: unconvert() puts it back (not a submodule)
    return fused


def _output_hook_reason(module: nn.Module, what: str, all_hooks: bool = False) -> Optional[str]:
    kinds = _OUTPUT_HOOKS + (("_forward_pre_hooks",) if all_hooks else ())
    for kind in kinds:
        if getattr(module, kind, None):
            return f"{what} has a {kind[1:-1].replace('_', ' ')}"
    return None


# A forward with k arguments defaulting to None is traced 2 * 2**k times (each mode, each set of them None).
_MAX_NONE_ARGS = 3


class _Modes:
    """Whether modules keep the same train/eval mode as each other under model.train() / model.eval(): when some
    module overrides train() (frozen BatchNorm layers: `for m in self.modules(): if isinstance(m, nn.BatchNorm2d):
    m.eval()`), each module's mode is read now, after model.train(True) and after model.train(False) (every mode
    is then restored), and once more with every BN replaced by its fused module, which such an override may
    not recognise. Without an override every module takes the model's mode, so only the current modes count."""

    def __init__(self, model: nn.Module, is_bn, stand_in) -> None:
        self.flags: Optional[dict[int, tuple[bool, ...]]] = None
        self.stand_in_flags: dict[int, tuple[bool, ...]] = {}
        if all(type(m).train is nn.Module.train for m in model.modules()):
            return
        modules = list(model.modules())
        saved = [(m, m.training) for m in modules]
        places = [(parent, name, child) for parent in modules for name, child in parent._modules.items()
                  if is_bn(child)]
        stand_ins = {id(bn): stand_in(bn) for _, _, bn in places}
        flags = {id(m): [m.training] for m in modules}
        try:
            for mode in (True, False):
                model.train(mode)
                for m in modules:
                    flags[id(m)].append(m.training)
            for parent, name, bn in places:
                parent._modules[name] = stand_ins[id(bn)]
            for mode in (True, False):
                model.train(mode)
                for key, fused in stand_ins.items():
                    self.stand_in_flags.setdefault(key, ())
                    self.stand_in_flags[key] += (fused.training,)
        finally:
            for parent, name, bn in places:
                parent._modules[name] = bn
            for m, training in saved:
                m.training = training
        self.flags = {key: tuple(v) for key, v in flags.items()}

    def follows(self, a: nn.Module, b: nn.Module) -> bool:
        """Whether a and b are in the same mode now and after model.train() and model.eval()."""
        if self.flags is None:
            return a.training == b.training
        return self.flags[id(a)] == self.flags[id(b)]

    def unfollowed(self, bn: nn.Module) -> Optional[str]:
        """Why bn's fused module would not be in bn's mode after model.train() / model.eval() (None: it would)."""
        if self.flags is None or self.stand_in_flags[id(bn)] == self.flags[id(bn)][1:]:
            return None
        return ("model.train() / model.eval() set its mode by a train() override that does not set the fused "
                "module's the same way (it selects layers by type, e.g. isinstance(m, nn.BatchNorm2d))")


def _identity_for(module: nn.Module) -> nn.Module:
    identity = nn.Identity().train(module.training)
    identity.__dict__[REPLACED] = module  # not a submodule (no state, not traversed): unconvert() puts it back
    return identity


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    parent._modules[name] = new


class _Converter:
    def __init__(self, model: nn.Module, sync: bool, process_group) -> None:
        self.model, self.sync, self.process_group = model, sync, process_group
        self.bn_types = (*_FUSED_FOR, nn.SyncBatchNorm) if sync else tuple(_FUSED_FOR)
        self.report = ConvertReport()
        self.reasons: dict[str, str] = {}  # BN name -> why it is not fused
        # How many places of the module tree hold each module object: a shared activation cannot become nn.Identity.
        self.places = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
        self.modes = _Modes(model, lambda m: type(m) in self.bn_types or _timm_norm_act(m, sync),
                            lambda bn: _fused_for(bn, 0.0, sync, process_group))

    def is_bn(self, module: nn.Module) -> bool:
        """A BatchNorm layer fused with the activation after it: exactly nn.BatchNorm1d/2d/3d (nn.SyncBatchNorm with
        sync), or timm's BatchNormAct2d without activation and drop layer (apply_act=False)."""
        return type(module) in self.bn_types or (_timm_norm_act(module, self.sync) and _bare_norm_act(module))

    # ------------------------------------------------------------ timm's BatchNormAct2d (in place)
    def norm_act(self, bn: nn.Module, name: str) -> None:
        """timm's BatchNormAct2d (F.batch_norm -> self.drop -> self.act, the state_dict of nn.BatchNorm2d) becomes the
        fused module with its activation, when its drop layer is the identity (it runs before the activation)."""
        act_module, drop = getattr(bn, "act", None), getattr(bn, "drop", None)  # SyncBatchNormAct: maybe absent
        if _bare_norm_act(bn):
            return  # a plain BN: the other passes fuse it with the activation after it, if any
        act = None if act_module is None else activation_of_module(act_module)
        if act is None:
            self.reasons[name] = (f"timm {type(bn).__name__} without an activation, and with a drop layer "
                                  f"({type(drop).__name__})" if act_module is None or type(act_module) is nn.Identity
                                  else
                                  f"timm {type(bn).__name__} with activation {type(act_module).__name__}, which "
                                  "bnfused does not fuse")
            return
        reason = (None if drop is None or _graph_sites.is_pass_through(drop) else
                  f"timm {type(bn).__name__}'s drop layer ({type(drop).__name__}) runs before its activation; "
                  "fused only when it is the identity")
        if self.places[id(bn)] != 1 or self.places[id(act_module)] != 1:
            reason = reason or "it is at more than one place in the model"
        reason = (reason or self.modes.unfollowed(bn)
                  or _output_hook_reason(bn, f"the {type(bn).__name__}")
                  or _output_hook_reason(act_module, "its activation", all_hooks=True)
                  or (drop is not None and _output_hook_reason(drop, "its drop layer", all_hooks=True)) or None)
        if reason or not name:
            self.reasons[name] = reason or "it is the model itself"
            return
        _set_submodule(self.model, name, _fused_for(bn, 0.0, self.sync, self.process_group, act=act))
        self.report.fused.append(FusedSite(name, _join(name, "act"), act=str(act)))

    # ------------------------------------------------------------ nn.Sequential chains (in place, no tracing)
    def sequential(self, seq: nn.Sequential, prefix: str) -> None:
        names = list(seq._modules.keys())
        i = 0
        while i < len(names):
            bn = seq._modules[names[i]]
            nxt = seq._modules[names[i + 1]] if i + 1 < len(names) else None
            if not self.is_bn(bn):
                i += 1
                continue
            bn_name = _join(prefix, names[i])
            act = None if nxt is None else activation_of_module(nxt)
            if act is None:
                if nxt is not None:
                    self.reasons[bn_name] = (f"followed by {type(nxt).__name__} in the nn.Sequential, not an "
                                             "activation bnfused fuses")
                i += 1
                continue
            drop = seq._modules[names[i + 2]] if i + 2 < len(names) else None
            # element-wise only (Dropout2d/3d drop whole channels), dropping exactly when the BN trains
            has_dropout = type(drop) is nn.Dropout and self.modes.follows(drop, bn)
            reason = (self.modes.unfollowed(bn)
                      or _output_hook_reason(bn, "the BatchNorm")
                      or _output_hook_reason(nxt, f"the {type(nxt).__name__}", all_hooks=True)
                      or (_output_hook_reason(drop, "the Dropout", all_hooks=True) if has_dropout else None))
            if reason:
                self.reasons[bn_name] = reason
                i += 1
                continue
            p = drop.p if has_dropout else 0.0
            # Keep indices (and so state_dict keys) stable: the fused block takes BN's slot, the rest become Identity.
            seq._modules[names[i]] = _fused_for(bn, p, self.sync, self.process_group, act=act)
            seq._modules[names[i + 1]] = _identity_for(nxt)
            if has_dropout:
                seq._modules[names[i + 2]] = _identity_for(drop)
            self.report.fused.append(FusedSite(bn_name, _join(prefix, names[i + 1]),
                                               _join(prefix, names[i + 2]) if has_dropout else None, p,
                                               act=str(act)))
            i += 3 if has_dropout else 2

    # ------------------------------------------------------------ forward() code (torch.fx)
    def has_candidates(self, module: nn.Module) -> bool:
        """Whether module's own forward could hold a site: it calls a BN child, or a Sequential ending in one."""
        if _graph_sites.is_plain_sequential(module) or type(module).forward is nn.Module.forward:
            return False
        return any(_graph_sites.ending_batchnorm(c, self.is_bn) is not None
                   for c in _graph_sites.callable_children(module))

    def traced(self, module: nn.Module, prefix: str) -> Optional[dict[tuple[bool, frozenset], "fx.Graph"]]:
        """module's forward traced in its mode and in the other one (forward code may read self.training), and
        so again with each set of its None-default arguments None (`if skip is not None:`); keyed by
        (training, the arguments traced as None)."""
        mode = module.training
        none_args = _graph_sites.none_defaults(module)
        graphs = {}
        try:
            if len(none_args) > _MAX_NONE_ARGS:
                raise ValueError(f"forward has {len(none_args)} arguments defaulting to None (convert() traces each "
                                 f"combination of at most {_MAX_NONE_ARGS})")
            for r in range(len(none_args) + 1):
                for nones in itertools.combinations(none_args, r):
                    for training in (mode, not mode):
                        module.training = training  # this module only: its children are leaves of the trace
                        graphs[training, frozenset(nones)] = _graph_sites.trace(module, nones)
        except Exception as exc:  # noqa: BLE001 -- any tracing failure: keep the module as it is, say why
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            self.report.untraced.append((prefix, reason))
            warnings.warn(f"bnfused.convert: torch.fx could not trace {prefix or 'the model'} "
                          f"({type(module).__name__}.forward): {reason}; its BatchNorm layers outside nn.Sequential "
                          "chains stay unfused", stacklevel=4)
            return None
        finally:
            module.training = mode
        return graphs

    def forward_code(self, module: nn.Module, prefix: str) -> None:
        graphs = self.traced(module, prefix)
        if graphs is None:
            return
        mode, main = module.training, (module.training, frozenset())
        found = {key: _graph_sites.find_sites(g, module, self.is_bn, key[0], self.is_bn)
                 for key, g in graphs.items()}
        sites, reasons = found[main]
        for path, why in reasons.items():
            self.reasons.setdefault(_join(prefix, path), why)
        others = {key: {s.bn_path: s for s in found[key][0]} for key in graphs if key != main}
        calls: dict[str, int] = {}
        for g in graphs.values():  # the most calls in any trace
            for path, n in _graph_sites.calls_of(g).items():
                calls[path] = max(n, calls.get(path, 0))
        in_place, rewrite = [], []
        for site in sites:
            name = _join(prefix, site.bn_path)
            twins = {key: sites_of.get(site.bn_path) for key, sites_of in others.items()}
            in_every_trace = [site] + [t for t in twins.values() if t is not None]
            if len({s.dropout_node is None for s in in_every_trace}) > 1 or (
                    site.dropout_node is not None and not self.modes.follows(self._dropout_owner(site, module),
                                                                            site.bn)):
                # a dropout on in some traces only, or one whose mode may differ from the BN's (the fused
                # module drops when it trains): it stays as it is
                for s in in_every_trace:
                    s.drop_dropout()
            reason = self._site_reason(module, site, twins, calls)
            if reason:
                self.reasons[name] = reason
                continue
            # In place when the act/Dropout are modules called only here: they become nn.Identity, forward stays.
            swappable = all(calls.get(path) == 1 and self.places[id(m)] == 1 for path, m in site.removed_modules.items())
            n_removed = 1 + (site.dropout_node is not None)
            in_place_ok = swappable and len(site.removed_modules) == n_removed and site.add_node is None
            (in_place if in_place_ok else rewrite).append((site, twins))
        if rewrite:
            for key, g in graphs.items():
                _graph_sites.remove_calls(g, [s if key == main else twins[key] for s, twins in rewrite])
            # one forward for both modes: where the traces differ only by self.training's value, it reads it
            same = all(_graph_sites.read_training(graphs[mode, nones], graphs[not mode, nones], mode)
                       for training, nones in graphs if training == mode)
            sources = {key: _graph_sites.source_of(g) for key, g in graphs.items() if key[0] == mode}
            why = None
            if not same:
                why = f"{type(module).__name__}.forward depends on self.training elsewhere; it is not rewritten"
            else:
                try:
                    src, globals_ = _graph_sites.dispatch_source({nones: v for (_, nones), v in sources.items()},
                                                                _graph_sites.none_defaults(module), graphs[main])
                    imports = _rewritten_forward.import_block(globals_)
                except ValueError as exc:
                    why = f"{type(module).__name__}.forward is not rewritten: {exc}"
            if why:
                for site, _ in rewrite:
                    self.reasons[_join(prefix, site.bn_path)] = why
                rewrite = []
            else:
                _rewritten_forward.install_forward(module, src, imports)
        for site, rewritten in [(s, False) for s, _ in in_place] + [(s, True) for s, _ in rewrite]:
            _set_submodule(module, site.bn_path, _fused_for(site.bn, site.p, self.sync, self.process_group,
                                                            add=site.add_node is not None, act=site.act))
            if not rewritten:
                for path, removed in site.removed_modules.items():
                    _set_submodule(module, path, _identity_for(removed))
            act, dropout = site.act_name(), site.dropout_name()
            if site.act_node.op == "call_module":
                act = _join(prefix, act)
            if site.dropout_node is not None and site.dropout_node.op == "call_module":
                dropout = _join(prefix, dropout)
            self.report.fused.append(FusedSite(_join(prefix, site.bn_path), act, dropout, site.p,
                                               prefix if rewritten else None, site.residual_name(), str(site.act)))

    def _site_reason(self, module: nn.Module, site, twins: dict, calls: dict[str, int]) -> Optional[str]:
        """Why a site found in module's forward cannot be fused (None: it can)."""
        differs = next((key for key, t in twins.items() if t is None or (
            t.act_name(), t.act, t.dropout_name(), t.p, t.residual_name()) != (
            site.act_name(), site.act, site.dropout_name(), site.p, site.residual_name())), None)
        if differs is not None:
            return (f"{type(module).__name__}.forward applies a different chain " + (
                f"when {', '.join(sorted(differs[1]))} is None" if differs[1] else "in train and in eval"))
        # called once, by this node only: neither the Sequentials it ends nor the BN are called elsewhere
        chain = site.chain()
        if calls.get(chain[0], 0) != 1 or any(calls.get(p, 0) for p in chain[1:]) or (
                self.places[id(site.bn)] != 1 or any(self.places[id(c)] != 1 for c in site.containers)):
            return "it is called from more than one place"
        # a BN + add site's fused module also takes the residual: the BN's pre-hooks would see it, and the
        # Sequentials it ends are no longer called (their layers are)
        add = site.add_node is not None
        return (self.modes.unfollowed(site.bn)
                or _output_hook_reason(site.bn, "the BatchNorm", all_hooks=add)
                or next((r for c in site.containers
                         if (r := _output_hook_reason(c, "the nn.Sequential it ends", add))), None)
                or next((r for m in site.removed_modules.values()
                         if (r := _output_hook_reason(m, f"the {type(m).__name__}", True))), None)
                or next((r for n in site.passed if (r := _output_hook_reason(
                    m := module.get_submodule(str(n.target)), f"the {type(m).__name__} after it", True))), None))

    @staticmethod
    def _dropout_owner(site, module: nn.Module) -> nn.Module:
        """The module whose mode turns the site's dropout on: the nn.Dropout, or the module whose forward calls
        F.dropout(training=self.training)."""
        node = site.dropout_node
        return site.removed_modules[str(node.target)] if node.op == "call_module" else module

    def run(self) -> ConvertReport:
        named = list(self.model.named_modules())
        for name, child in named:
            if _timm_norm_act(child, self.sync):
                self.norm_act(child, name)
        for name, child in named:
            if _graph_sites.is_plain_sequential(child):
                self.sequential(child, name)
        for name, child in named:
            if self.has_candidates(child):
                self.forward_code(child, name)
        fused = {s.name for s in self.report.fused}
        for name, m in self.model.named_modules():
            if not isinstance(m, _BatchNorm) or isinstance(m, _BatchNormReLUDropout) or name in fused:
                continue
            reason = self.reasons.get(name)
            if reason is None and (self.is_bn(m) or _timm_norm_act(m, self.sync)):
                reason = "no activation follows it (in an nn.Sequential or in a forward())"
            elif reason is None and type(m) is nn.SyncBatchNorm:
                reason = "nn.SyncBatchNorm is fused by convert_sync (sync=True)"
            elif reason is None:
                also = ", nn.SyncBatchNorm" if self.sync else ""
                reason = f"{type(m).__name__} is not nn.BatchNorm1d/2d/3d{also} (a subclass may compute something else)"
            self.report.unfused.append(UnfusedBatchNorm(name, reason))
        return self.report


def convert(module: nn.Module, sync: bool = False, process_group=None, *, report: bool = False) -> nn.Module:
    """Swap every nn.BatchNormXd -> activation (-> element-wise Dropout) site of ``module`` for the fused module
    (:class:`BatchNormActDropout2d` with that activation), in place, and return ``module`` (``(module,
    ConvertReport)`` with ``report=True``).

    The activations are those bnfused fuses: modules of exactly nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU,
    nn.SiLU, nn.Hardswish, nn.GELU (``approximate`` "none" or "tanh"), nn.ELU, nn.Mish (inplace or not), timm's
    Swish, Mish, HardSwish, GELU and GELUTanh; in forward() code also F.relu(_), torch.relu(_), Tensor.relu(_),
    F.relu6, F.hardtanh(_), F.leaky_relu(_), F.silu, F.hardswish, F.gelu, F.elu(_) and F.mish with constant
    parameters (``F.leaky_relu(x, 0.2)``, ``F.gelu(x, approximate="tanh")``). A BN followed by no activation, or by
    another one (Sigmoid, PReLU, ...), stays as it is. Sites are found wherever the data flows that way, when the
    BN's output has no other user:

    * in nn.Sequential chains (BN, activation, optional nn.Dropout adjacent: torchvision's Conv2dNormActivation),
      without tracing;
    * in timm's BatchNormAct2d (an nn.BatchNorm2d subclass applying ``self.drop`` then ``self.act``): the module
      itself, when its drop layer is the identity (nn.Identity, p = 0), since it runs before the activation;
      unconvert() puts the very module back. One without activation (apply_act=False) is a plain BN;
    * in forward() code, by torch.fx tracing of each module that calls a BN child (children are leaves, so only that
      module's own code is traced; BNs kept in an nn.ModuleList / nn.ModuleDict count as children, a module made
      in forward, as ``nn.ReLU(inplace=True)(x)``, is part of that code): the activation as a module or a
      functional call; dropout as nn.Dropout or F.dropout(training=self.training); BN + residual -> activation
      for identity, ReLU and Hardtanh/ReLU6 (the block tail's kernels save their 0/1 gradient as one bit per
      element; a tail with another activation is left, with the reason); the BN may end a child nn.Sequential, or
      a child whose forward only chains its layers (timm's ConvNormAct: conv -> bn), whose caller applies the add
      or the activation (the child's own output then includes the activation; for an add, the rewritten forward
      calls its layers). Layers that are the identity in both modes
      (nn.Identity, nn.Dropout(0), timm's DropPath / DropBlock2d at rate 0: timm's ResNet blocks' drop_block and
      drop_path) may stand between the BN and its activation or add.

    The fused module takes the BN's place (same name, so state_dict keys stay and old checkpoints load) and shares
    its Parameter and buffer objects (an optimizer built before convert() keeps training them), its mode and its
    forward pre-hooks and state_dict hooks. An activation/Dropout module called only at the site becomes
    nn.Identity. Otherwise (functional calls, a ReLU module called more than once as in ResNet blocks) the calls
    are dropped
    from that module's forward: its class becomes a same-named subclass whose forward is the rewritten trace
    (isinstance holds; attributes, hooks, pickling and deepcopy are kept). A rewritten forward is the trace at
    convert() time: Python control flow on attributes (``if self.downsample is not None``) is fixed then; it reads
    ``self.training`` where the traces of both modes differ only by that flag (``F.dropout(x, p, self.training)``),
    and a forward with (up to 3) arguments defaulting to None is traced with each set of them None, the rewritten
    forward picking the trace by which are None (``if skip is not None:``). Modules whose forward reads
    ``self.training`` to choose other code are not rewritten, nor are those torch.fx cannot trace (a warning names
    the module and the reason; their nn.Sequential chains are still fused). A BN + add site computes an add that
    broadcasts or promotes (a bias, an (N, C, 1, 1) embedding, another dtype) unfused, as the forward did.

    A site stays unfused, with its reason in the report, when a forward hook or backward hook is registered on
    the BN (it would see the activation's output), on the activation/Dropout or on a Sequential the BN ends, when
    the BN is
    called from more than one place, or when a train() override sets the BN's mode in a way it would not set the
    fused module's (``isinstance(m, nn.BatchNorm2d)``: the fused modules are _BatchNorm subclasses; convert() calls
    ``model.train()`` and ``model.eval()`` once to see it, then restores every mode). A dropout is fused only when
    its mode is the BN's now and after model.train() / model.eval() (the fused module drops when it trains).
    convert() logs the report's summary (logger ``bnfused.convert``, INFO) and warns when it fused nothing.

    Only exact nn.BatchNorm1d/2d/3d and timm's BatchNormAct2d (and nn.SyncBatchNorm and timm's SyncBatchNormAct
    with ``sync=True``) and nn.Dropout are matched (not Dropout2d); the report names every other BatchNorm module
    (a subclass may compute something else). With ``sync=True`` every site becomes a SyncBatchNormActDropout
    (a SyncBatchNormAddAct for BN + residual -> activation) with the site's activation over ``process_group`` (an
    nn.SyncBatchNorm's own group when None; the world when that is None too), as
    nn.SyncBatchNorm.convert_sync_batchnorm does for the unfused layer (which turns timm's BatchNormAct2d into a
    plain nn.SyncBatchNorm without its activation: timm.layers.convert_sync_batchnorm keeps it). BatchNorm layers
    left unfused stay as they are, so with ``sync=True`` a warning names the plain nn.BatchNormXd among them: run
    ``nn.SyncBatchNorm.convert_sync_batchnorm(model)`` first to synchronise them too. Not after: the fused modules
    are BatchNorm modules, and convert_sync_batchnorm would turn each back into a plain nn.SyncBatchNorm, dropping
    its activation and dropout.
    """
    if report:
        warnings.warn("convert(..., report=True) is deprecated: use bnfused.convert_with_report(model, ...), which "
                      "returns (model, report)", FutureWarning, stacklevel=2)
        return _convert(module, sync, process_group)
    return _convert(module, sync, process_group)[0]


def convert_with_report(module: nn.Module, sync: bool = False,
                        process_group=None) -> tuple[nn.Module, ConvertReport]:
    """:func:`convert`, returning ``(module, ConvertReport)``: the fused sites, every matched BatchNorm layer left
    unfused with its reason, and the modules torch.fx could not trace. ``print(report)`` shows its summary.

    Examples::

        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.1))
        >>> model, report = bnfused.convert_with_report(model)
        >>> report.num_fused, type(model[1]).__name__
        (1, 'BatchNormActDropout2d')
    """
    return _convert(module, sync, process_group)


def _convert(module: nn.Module, sync: bool, process_group) -> tuple[nn.Module, ConvertReport]:
    if process_group is not None and not sync:
        raise ValueError("convert(): process_group is only used with sync=True")
    result = _Converter(module, sync, process_group).run()
    logger.info("%s", result.summary())
    if not result.fused:
        why = (f"{len(result.unfused)} BatchNorm layer(s) left unfused, e.g. {result.unfused[0].name}: "
               f"{result.unfused[0].reason}" if result.unfused else "the model has no matching BatchNorm layer")
        warnings.warn(f"bnfused.convert fused no BatchNorm -> activation site: {why} "
                      "(bnfused.convert_with_report lists them all)", stacklevel=3)
    if sync:
        plain = [u.name for u in result.unfused if type(module.get_submodule(u.name)) in _FUSED_FOR]
        if plain:
            warnings.warn(f"bnfused.convert_sync left {len(plain)} nn.BatchNorm layer(s) unfused and not "
                          f"synchronised, e.g. {plain[0]}: run nn.SyncBatchNorm.convert_sync_batchnorm(model) before "
                          "convert_sync to synchronise them (after it, convert_sync_batchnorm would turn the fused "
                          "modules back into plain SyncBatchNorm layers without their activation)", stacklevel=3)
    return module, result


def convert_sync(module: nn.Module, process_group=None, *, report: bool = False) -> nn.Module:
    """convert(module, sync=True, process_group=process_group): sites of nn.BatchNormXd or nn.SyncBatchNorm ->
    activation (-> Dropout) become SyncBatchNormActDropout with that activation (timm's BatchNormAct2d and
    SyncBatchNormAct too), BN + residual -> ReLU/ReLU6/Hardtanh sites SyncBatchNormAddAct. Run
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` before it (never after) to synchronise the BN layers it leaves.
    ``convert_with_report(module, sync=True, process_group=...)`` also returns the report."""
    if report:
        warnings.warn("convert_sync(..., report=True) is deprecated: use bnfused.convert_with_report(model, "
                      "sync=True, ...), which returns (model, report)", FutureWarning, stacklevel=2)
        return _convert(module, True, process_group)
    return _convert(module, True, process_group)[0]
