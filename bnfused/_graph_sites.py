"""convert()'s internals: BN -> activation (-> Dropout) sites in one module's own forward code, found in its torch.fx
trace (its child modules are leaves), and that trace rewritten without the activation/Dropout calls that the fused
module now performs (_rewritten_forward.py installs it as the module's forward).

convert() uses this for the sites an nn.Sequential walk cannot see: attributes called in forward() code
(DenseNet's norm1/relu1), functional activations (F.relu, F.silu, F.leaky_relu(x, 0.2), Tensor.relu_, ...) and
F.dropout calls, an activation module called more than once (ResNet's self.relu), and a BN ending a child
nn.Sequential whose caller applies the activation.
"""
from __future__ import annotations

import inspect
import operator
import weakref
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ._rewritten_forward import bn_add_relu_site
from .activation import RELU, Activation, activation_of_module


def _functional(kind: str, *params: str):
    """Reads a call of a functional activation, f(input, *params, inplace) positionally or by keyword, as the
    Activation it computes (TypeError for arguments it does not take or that are not constants)."""
    def read(input, *args, **kwargs) -> Activation:
        if len(args) > len(params) + 1:  # + the trailing inplace flag
            raise TypeError("too many arguments")
        values = dict(zip(params, args))
        for name, value in kwargs.items():
            if name != "inplace":
                if name not in params or name in values:
                    raise TypeError(f"argument {name}")
                values[name] = value
        for value in values.values():
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise TypeError("a parameter that is not a constant")
        if kind == "hardtanh":
            return Activation("hardtanh", float(values.get("min_val", -1.0)), float(values.get("max_val", 1.0)))
        if kind == "leaky_relu":
            return Activation("leaky_relu", float(values.get("negative_slope", 0.01)))
        if kind == "elu":
            return Activation("elu", float(values.get("alpha", 1.0)))
        if kind == "gelu":
            approximate = values.get("approximate", "none")
            if approximate not in ("none", "tanh"):
                raise TypeError(f"approximate={approximate!r}")
            return Activation("gelu_tanh" if approximate == "tanh" else "gelu")
        if kind == "relu6":
            return Activation("hardtanh", 0.0, 6.0)
        return Activation(kind)
    return read


# Functional activations as torch.fx records them (the in-place forms included: F.relu_ is torch.relu_,
# F.hardtanh_ / F.leaky_relu_ / F.elu_ are torch._C._nn functions), each with how to read its parameters.
_ACT_FUNCTIONS = {
    F.relu: _functional("relu"), torch.relu: _functional("relu"), torch.relu_: _functional("relu"),
    F.relu6: _functional("relu6"),
    F.hardtanh: _functional("hardtanh", "min_val", "max_val"),
    F.hardtanh_: _functional("hardtanh", "min_val", "max_val"),
    F.leaky_relu: _functional("leaky_relu", "negative_slope"),
    F.leaky_relu_: _functional("leaky_relu", "negative_slope"),
    F.silu: _functional("silu"), F.hardswish: _functional("hardswish"), F.mish: _functional("mish"),
    F.gelu: _functional("gelu", "approximate"),
    F.elu: _functional("elu", "alpha"), F.elu_: _functional("elu", "alpha"),
}
_ACT_METHODS = {"relu": RELU, "relu_": RELU}
_DROPOUT_SIGNATURE = inspect.signature(F.dropout)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_OPERATOR_NAMES = {operator.add: "+", operator.iadd: "+=", operator.mul: "*", operator.getitem: "[]"}


# The check torch.fx inserts for a concrete None argument (a private torch.fx function: where a torch release
# renames it, the check stays in the trace and the None-argument traces fail to combine, so those modules are reported
# untraced rather than rewritten wrongly; tests/test_convert_graph.py checks it is found).
_FX_ASSERT_IS_NONE = getattr(getattr(fx, "_symbolic_trace", None), "_assert_is_none", None)


class _OwnCodeTracer(fx.Tracer):
    """Traces only the root's forward (and the methods it calls): every submodule call is one call_module node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True

    def call_module(self, m: nn.Module, forward, args, kwargs):
        try:
            self.path_of_module(m)
        except NameError:  # a module made in forward (`nn.ReLU(inplace=True)(out + shortcut)`): part of its code
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)


def is_plain_sequential(module: nn.Module) -> bool:
    """An nn.Sequential (or a subclass, as torchvision's Conv2dNormActivation) that runs nn.Sequential.forward."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


_chains: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Optional[list[str]]]]" = weakref.WeakKeyDictionary()


def layer_chain(module: nn.Module) -> Optional[list[str]]:
    """The submodules (paths) that module's forward calls one after the other, each once, on the previous one's
    output, when that is all it does: a plain nn.Sequential's layers, or a module whose forward traces (in train and
    in eval, its children leaves) to such a chain, as timm's ConvNormAct (conv -> bn). None otherwise. A site whose BN
    ends it fuses the activation into the BN (the module's output then includes it) or, at an add, calls the chain's
    layers in the rewritten caller."""
    if is_plain_sequential(module):
        return [name for name, m in module._modules.items() if m is not None] or None
    cls = type(module)
    if cls.forward is nn.Module.forward or cls.__module__.startswith("torch.") or not module._modules:
        return None
    key = (cls, tuple((name, id(m)) for name, m in module._modules.items()))
    cached = _chains.get(module)
    if cached is not None and cached[0] == key:
        return cached[1]
    chains, mode = [], module.training
    try:
        for training in (mode, not mode):
            module.training = training
            chains.append(_chain_of(trace(module)))
    except Exception:  # noqa: BLE001 -- a forward torch.fx cannot trace is no chain
        chains = [None]
    finally:
        module.training = mode
    chain = chains[0] if all(c == chains[0] for c in chains) else None
    _chains[module] = (key, chain)
    return chain


def _chain_of(graph: fx.Graph) -> Optional[list[str]]:
    nodes = list(graph.nodes)
    if len(nodes) < 3 or nodes[0].op != "placeholder" or nodes[-1].op != "output":
        return None
    previous, chain = nodes[0], []
    for node in nodes[1:-1]:
        if node.op != "call_module" or node.args != (previous,) or node.kwargs:
            return None
        chain.append(str(node.target))
        previous = node
    return chain if nodes[-1].args == (previous,) and len(set(chain)) == len(chain) else None


def ending_batchnorm(module: nn.Module, is_bn) -> Optional[tuple[str, list[nn.Module]]]:
    """(path of the BN below module, the containers on the way) when module's output is a BN's output: is_bn(module),
    or module's layer_chain ends in such a module (recursively): a plain nn.Sequential, timm's ConvNormAct."""
    if is_bn(module):
        return "", []
    if not any(is_bn(m) for m in module.modules()):
        return None  # nothing to find: no trace
    chain = layer_chain(module)
    if chain:
        last = chain[-1]
        inner = ending_batchnorm(module.get_submodule(last), is_bn)
        if inner is not None:
            return (f"{last}.{inner[0]}" if inner[0] else last), [module] + inner[1]
    return None


@dataclass(eq=False)
class Site:
    """One BN -> activation (-> Dropout) chain in a traced forward."""
    bn_node: fx.Node
    bn_path: str                 # relative to the traced module
    bn: nn.Module
    # modules whose output is the BN's output (nn.Sequentials, timm's ConvNormAct: layer_chain); they now output the
    # activation's
    containers: list[nn.Module]
    act_node: fx.Node
    act: Activation = RELU
    dropout_node: Optional[fx.Node] = None
    p: float = 0.0
    # the modules (relative path -> module) whose calls are removed or replaced: the activation / Dropout modules
    removed_modules: dict[str, nn.Module] = field(default_factory=dict)
    # BN + residual -> activation: the add node and the residual operand (the fused module takes it as a second
    # input)
    add_node: Optional[fx.Node] = None
    residual: Optional[fx.Node] = None
    # calls of modules that are the identity in both modes (nn.Identity, a drop path of rate 0) between the BN and
    # the activation or the add: kept in place before an activation, removed with the add
    passed: list[fx.Node] = field(default_factory=list)

    def chain(self) -> list[str]:
        """The paths from the called module down to the BN: [node target, inner containers..., BN path]."""
        paths = [str(self.bn_node.target)]
        for container in self.containers:
            paths.append(f"{paths[-1]}.{layer_chain(container)[-1]}")
        return paths

    def drop_dropout(self) -> None:
        """Fuse BN -> activation only, leaving the dropout call as it is."""
        if self.dropout_node is not None and self.dropout_node.op == "call_module":
            del self.removed_modules[str(self.dropout_node.target)]
        self.dropout_node, self.p = None, 0.0

    def act_name(self) -> str:
        return _describe(self.act_node)

    def residual_name(self) -> Optional[str]:
        return None if self.residual is None else _describe(self.residual)

    def dropout_name(self) -> Optional[str]:
        return None if self.dropout_node is None else _describe(self.dropout_node)


def _describe(node: fx.Node) -> str:
    if node.op == "output":
        return "the forward's output"
    if node.op == "call_function" and node.target in _OPERATOR_NAMES:
        return _OPERATOR_NAMES[node.target]
    if node.op in ("call_module", "placeholder", "get_attr"):
        return str(node.target)
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    return f"{getattr(target, '__module__', '') or 'torch'}.{getattr(target, '__name__', str(target))}".replace(
        "torch.nn.functional.", "F.").replace("torch._C._VariableFunctions.", "torch.")


def trace(module: nn.Module, none_args: tuple[str, ...] = ()) -> fx.Graph:
    """module's own forward traced; the arguments in none_args are traced as None (torch.fx's concrete_args),
    without the check fx would add that they are (the rewritten forward picks the trace by checking it)."""
    graph = _OwnCodeTracer().trace(module, concrete_args={name: None for name in none_args} or None)
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is _FX_ASSERT_IS_NONE:
            graph.erase_node(node)
    return graph


def none_defaults(module: nn.Module) -> list[str]:
    """The forward's arguments that default to None. torch.fx traces each as a tensor, so `if skip is not None:`
    takes the same branch in every trace: convert() also traces module with them None."""
    return [name for name, param in inspect.signature(module.forward).parameters.items()
            if param.default is None and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)]


def callable_children(module: nn.Module):
    """module's children, looking into the containers that have no forward of their own (nn.ModuleList,
    nn.ModuleDict: an MLP's `for linear, norm in zip(self.linears, self.norms)`): what module's forward calls."""
    for child in module.children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)) and type(child).forward is nn.Module.forward:
            yield from callable_children(child)
        else:
            yield child


def _sole_user(node: fx.Node) -> Optional[fx.Node]:
    """The one node that uses node, if it uses it once, as its first argument, and is its only user."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if not user.args or user.args[0] is not node or _flat_nodes(user).count(node) != 1:
        return None
    return user


def _flat_nodes(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), found.append)
    return found


def activation_of(node: fx.Node, modules: dict[str, nn.Module]) -> Optional[Activation]:
    """The activation node applies to its first argument (None: not one bnfused fuses, or parameters that are not
    constants): a module (activation_of_module), a functional with its arguments, or Tensor.relu(_)."""
    if node.op == "call_module":
        return activation_of_module(modules.get(node.target))
    if node.op == "call_function":
        read = _ACT_FUNCTIONS.get(node.target) if isinstance(node.target, Hashable) else None
        if read is None or not node.args:
            return None
        try:
            return read(*node.args, **node.kwargs)
        except (TypeError, ValueError):
            return None
    if node.op == "call_method" and len(node.args) == 1 and not node.kwargs:
        return _ACT_METHODS.get(node.target)
    return None


# timm's stochastic-depth layers: the identity in both modes at rate 0 (timm.layers.drop).
_TIMM_DROPS = {("timm.layers.drop", "DropPath"), ("timm.layers.drop", "DropBlock2d"),
               ("timm.models.layers.drop", "DropPath"), ("timm.models.layers.drop", "DropBlock2d")}


def is_pass_through(module: nn.Module) -> bool:
    """Whether module returns its input in train and in eval mode: nn.Identity, timm's DropPath / DropBlock2d with
    drop_prob 0, an nn.Dropout with p 0 (the same values)."""
    cls = type(module)
    if cls is nn.Identity:
        return True
    if cls is nn.Dropout:
        return module.p == 0
    return (cls.__module__, cls.__qualname__) in _TIMM_DROPS and getattr(module, "drop_prob", None) == 0


def _dropout_p(node: fx.Node, modules: dict[str, nn.Module], bn: nn.Module, training: bool) -> Optional[float]:
    """p when node is an element-wise dropout whose training flag is the BN's mode (the fused module drops exactly
    when it is training); None when it is not such a dropout."""
    if node.op == "call_module":
        drop = modules.get(node.target)
        return drop.p if type(drop) is nn.Dropout and drop.training == bn.training else None
    if node.op == "call_function" and node.target is F.dropout:
        try:
            bound = _DROPOUT_SIGNATURE.bind(*node.args, **node.kwargs)
        except TypeError:
            return None
        bound.apply_defaults()
        p, drop_training = bound.arguments["p"], bound.arguments["training"]
        # The forward was traced with the module in `training` mode: a dropout following the mode reads it back.
        if isinstance(p, (int, float)) and not isinstance(p, bool) and drop_training is training:
            return float(p)
    return None


def _residual_add(bn_node: fx.Node) -> Optional[tuple[fx.Node, fx.Node]]:
    """(add node, residual node) when bn_node's only user adds it to another tensor, on either side, out of place
    or in place on the BN's output (`out += identity`, `out.add_(identity)`), without alpha or broadcasting
    arguments; None otherwise."""
    if len(bn_node.users) != 1:
        return None
    add = next(iter(bn_node.users))
    if add.kwargs or len(add.args) != 2 or _flat_nodes(add).count(bn_node) != 1:
        return None
    if add.op == "call_function" and add.target in _ADD_FUNCTIONS:
        residual = add.args[1] if add.args[0] is bn_node else add.args[0]
    elif add.op == "call_method" and add.target in ("add", "add_") and add.args[0] is bn_node:
        residual = add.args[1]  # not residual.add_(bn): that would also write the residual
    else:
        return None
    return (add, residual) if isinstance(residual, fx.Node) else None


_IN_PLACE_FUNCTIONS = (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem)


def _may_write(node: fx.Node, value: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether node may write to value in place: an in-place method or function on it, an `inplace=True` call, a
    module with an inplace layer, or a module with its own forward (it may do anything with its input)."""
    if value not in _flat_nodes(node):
        return False
    if node.op == "call_method":
        return node.target.endswith("_") and node.args[0] is value
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return (node.target in _IN_PLACE_FUNCTIONS or node.kwargs.get("inplace") is True
                or (name.endswith("_") and not name.endswith("__")))
    if node.op == "call_module":
        module = modules[node.target]
        return any(getattr(m, "inplace", False) is True or not type(m).__module__.startswith("torch.nn")
                   and not is_plain_sequential(m) for m in module.modules())
    return False


# ops whose result may share the input's memory (then writing it writes the input)
_VIEW_NAMES = frozenset(("view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "transpose", "permute",
                         "t", "squeeze", "unsqueeze", "expand", "expand_as", "narrow", "select", "chunk", "split",
                         "unbind", "contiguous", "detach", "as_strided", "movedim", "getitem", "diagonal"))


def _may_alias(node: fx.Node) -> bool:
    name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
    return node.op in ("call_method", "call_function") and name in _VIEW_NAMES


def _input_written_before(bn_node: fx.Node, add: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether a node between the BN call and the add may write to the BN's input (or a view of it) in place: the
    fused call runs at the add (the residual may be computed after the BN), so that would change what it
    normalises."""
    if not isinstance(bn_node.args[0], fx.Node):
        return False
    aliases, node = {bn_node.args[0]}, bn_node.next
    while node is not add:
        if any(_may_write(node, a, modules) for a in aliases):
            return True
        if _may_alias(node) and any(a in _flat_nodes(node) for a in aliases):
            aliases.add(node)
        node = node.next
    return False


def find_sites(graph: fx.Graph, root: nn.Module, is_bn, training: bool,
               is_add_bn=lambda m: False) -> tuple[list[Site], dict]:
    """The BN -> activation (-> Dropout) sites of a traced forward (and BN + residual -> identity/ReLU/Hardtanh ones
    for the BNs is_add_bn accepts), and, per BN path, why a BN is not a site (for the
    report)."""
    modules = dict(root.named_modules())
    sites, reasons = [], {}
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        ending = ending_batchnorm(modules[node.target], is_bn)
        if ending is None:
            continue
        bn_path = f"{node.target}.{ending[0]}" if ending[0] else str(node.target)
        # identity layers on the way (timm's drop_block / drop_path at rate 0) are passed through
        passed, out = [], node
        while ((nxt := _sole_user(out)) is not None and nxt.op == "call_module" and len(nxt.args) == 1
               and not nxt.kwargs and is_pass_through(modules[nxt.target])):
            passed.append(nxt)
            out = nxt
        act_node = _sole_user(out)
        # A BN ending nn.Sequentials (RegNet's f, a CIFAR ResNet's residual_function) takes the add too: the rewrite
        # then calls the Sequentials' layers one by one, so that the fused module gets the residual.
        add = _residual_add(out) if is_add_bn(modules[bn_path]) and len(node.args) == 1 and not node.kwargs else None
        if add is not None and _input_written_before(node, add[0], modules):
            add = None
        if add is not None and any(s.add_node is add[0] for s in sites):
            add = None  # both operands are BN outputs: the first BN took the add
        if add is not None:
            act_node = _sole_user(add[0])
        act = None if act_node is None else activation_of(act_node, modules)
        if act is not None and add is not None and not act.has_gate_bits:
            reasons[bn_path] = (f"BN + residual -> {act} ({_describe(act_node)}): the block tail is fused for "
                                "identity, ReLU and Hardtanh/ReLU6 only")
            continue
        if act is None:
            taker = next((s for s in sites if s.add_node is not None and s.add_node in out.users), None)
            users = ", ".join(_describe(u) for u in out.users) or "nothing"
            reasons[bn_path] = (f"it is the residual that the fused {taker.bn_path} adds" if taker else
                                f"its output goes to {users}, not (only) to an activation bnfused fuses")
            continue
        site = Site(node, bn_path, modules[bn_path], ending[1], act_node, act, passed=passed)
        if add is not None:
            site.add_node, site.residual = add
        drop = _sole_user(act_node)
        if drop is not None:
            p = _dropout_p(drop, modules, site.bn, training)
            if p is not None:
                site.dropout_node, site.p = drop, p
        for n in (site.act_node, site.dropout_node):
            if n is not None and n.op == "call_module":
                site.removed_modules[str(n.target)] = modules[n.target]
        sites.append(site)
    for site in sites:  # a residual BN found before the BN that takes its add: say so
        if site.residual is not None and site.residual.op == "call_module":
            ending = ending_batchnorm(modules[site.residual.target], is_bn)
            path = None if ending is None else ".".join(p for p in (str(site.residual.target), ending[0]) if p)
            if path in reasons:
                reasons[path] = f"it is the residual that the fused {site.bn_path} adds"
    return sites, reasons


def calls_of(graph: fx.Graph) -> dict[str, int]:
    """How many times the traced forward calls each submodule (by path)."""
    counts: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            counts[str(node.target)] = counts.get(str(node.target), 0) + 1
    return counts


def remove_calls(graph: fx.Graph, sites: list[Site]) -> None:
    """Drops each site's activation and Dropout nodes: their users take the BN (now fused) node's output. A BN + add
    site's BN call moves to the add, taking the residual as its second input, and the add goes too."""
    # The residual may be an earlier site's output (h = relu(bn1(..)); relu(bn2(..) + h)): its node is gone
    # once that site is rewritten, so residuals are looked up here, by the node that replaced them.
    replaced: dict[fx.Node, fx.Node] = {}
    for site in sites:
        fused = site.passed[-1] if site.passed else site.bn_node
        if site.add_node is not None:
            residual = replaced.get(site.residual, site.residual)
            x, chain = site.bn_node.args[0], site.chain()
            with graph.inserting_before(site.add_node):
                for path, container in zip(chain, site.containers):  # the Sequentials' layers up to the BN
                    for name in layer_chain(container)[:-1]:
                        x = graph.call_module(f"{path}.{name}", (x,))
                fused = graph.call_function(bn_add_relu_site, (graph.get_attr(chain[-1]), x, residual))
            fused.meta = dict(site.bn_node.meta)
        last = site.dropout_node or site.act_node
        last.replace_all_uses_with(fused)
        replaced[last] = fused
        for node in (site.dropout_node, site.act_node, site.add_node):
            if node is not None:
                graph.erase_node(node)
        if site.add_node is not None:  # the BN call and the identity layers after it moved into the fused call
            for node in reversed(site.passed):
                graph.erase_node(node)
            graph.erase_node(site.bn_node)
    graph.lint()


def source_of(graph: fx.Graph) -> tuple[str, dict[str, Any]]:
    code = graph.python_code(root_module="self")
    return code.src, code.globals


def read_training(graph: fx.Graph, other: fx.Graph, training: bool) -> bool:
    """Makes graph (traced with the module training == `training`) read self.training where the two traces differ
    only by that flag (F.dropout(x, p, self.training) traces to a constant), so that one forward serves both
    modes. False, graph unchanged, when they differ otherwise (`if self.training:` choosing other code)."""
    nodes, other_nodes = list(graph.nodes), list(other.nodes)
    if len(nodes) != len(other_nodes):
        return False
    index = {n: i for i, n in enumerate(nodes)}
    other_index = {n: i for i, n in enumerate(other_nodes)}
    flags: list[tuple[fx.Node, list]] = []  # (node, path to each flag in its (args, kwargs))

    def compare(a, b, path, found) -> bool:
        if isinstance(a, fx.Node) or isinstance(b, fx.Node):
            return isinstance(a, fx.Node) and isinstance(b, fx.Node) and index[a] == other_index[b]
        if isinstance(a, bool) and isinstance(b, bool) and a is training and b is (not training):
            found.append(path)
            return True
        if type(a) is not type(b):
            return False
        if isinstance(a, (tuple, list)):
            return len(a) == len(b) and all(compare(x, y, path + (i,), found) for i, (x, y) in enumerate(zip(a, b)))
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(compare(a[k], b[k], path + (k,), found) for k in a)
        return a == b

    for node, twin in zip(nodes, other_nodes):
        found: list = []
        if (node.op, node.target) != (twin.op, twin.target) or not compare((node.args, node.kwargs),
                                                                           (twin.args, twin.kwargs), (), found):
            return False
        if found:
            flags.append((node, found))
    if not flags:
        return True
    with graph.inserting_after(next(n for n in reversed(nodes) if n.op == "placeholder")):
        flag = graph.get_attr("training")

    def replaced(value, path):
        if not path:
            return flag
        head, rest = path[0], path[1:]
        if isinstance(value, dict):
            return {k: replaced(v, rest) if k == head else v for k, v in value.items()}
        return type(value)(replaced(v, rest) if i == head else v for i, v in enumerate(value))

    for node, paths in flags:
        args_kwargs = (node.args, node.kwargs)
        for path in paths:
            args_kwargs = replaced(args_kwargs, path)
        node.args, node.kwargs = args_kwargs
    graph.lint()
    return True


def dispatch_source(variants: dict[frozenset, tuple[str, dict[str, Any]]], none_args: list[str],
                    graph: fx.Graph) -> tuple[str, dict[str, Any]]:
    """One forward from the rewritten traces of each set of None arguments (variants[frozenset()]: none of
    them None): that trace's source when all have the same body, else a forward that calls the trace matching
    which arguments are None. ValueError when they cannot be combined (*args, clashing globals)."""
    src, globals_ = variants[frozenset()]
    body = _body(src)
    distinct = {sub: v for sub, v in variants.items() if sub and _body(v[0]) != body}
    if not distinct:
        return src, globals_
    params = [str(n.target) for n in graph.nodes if n.op == "placeholder"]
    if any(p.startswith("*") for p in params):
        raise ValueError("its forward takes *args or **kwargs")
    merged = dict(globals_)
    functions, lines = [_renamed(src, "_bnfused_forward_0")], [src.strip().splitlines()[0]]
    for i, (sub, (other, other_globals)) in enumerate(distinct.items(), start=1):
        for name, obj in other_globals.items():
            if merged.setdefault(name, obj) is not obj:
                raise ValueError(f"its traces name {name!r} differently")
        functions.append(_renamed(other, f"_bnfused_forward_{i}"))
        test = " and ".join(f"{a} is None" if a in sub else f"{a} is not None" for a in none_args)
        lines.append(f"    if {test}:\n        return _bnfused_forward_{i}(self, {', '.join(params)})")
    lines.append(f"    return _bnfused_forward_0(self, {', '.join(params)})")
    return "\n".join(functions + ["\n".join(lines)]) + "\n", merged


def _body(src: str) -> str:
    return src.strip().split("\n", 1)[1] if "\n" in src.strip() else ""


def _renamed(src: str, name: str) -> str:
    return src.replace("def forward(", f"def {name}(", 1)
