"""Under torch.compile, a block without dropout (eval, p = 0) traces to F.batch_norm -> relu, what the unfused
model traces to (the block tail: F.batch_norm -> + residual -> relu), so inductor fuses it with its neighbours;
with dropout it keeps the fused custom ops (the mask for a seed unchanged). Checked: which ops each mode traces
to, results against the unfused reference to inductor's rounding (outputs, gradients, running statistics,
num_batches_tracked, momentum None), the parameter dtypes F.batch_norm cannot take (they keep the fused op), the
single-process SyncBatchNormReLUDropout, and torch.export (which keeps the fused op)."""
import copy

import pytest
import torch
from torch import nn
from torch._dynamo.testing import EagerAndRecordGraphs

import bnfused

pytestmark = pytest.mark.slow  # `make test-fast` leaves these out (marker: pyproject.toml)

FUSED_OPS = (torch.ops.bnfused.forward.default, torch.ops.bnfused.forward_keep_bits.default,
             torch.ops.bnfused.batch_stats_update.default)


def _traced_targets(module, x):
    """Every call target of the graph(s) dynamo traces for module(x) (fullgraph: a graph break raises)."""
    torch._dynamo.reset()
    backend = EagerAndRecordGraphs()
    out = torch.compile(module, backend=backend, fullgraph=True)(x)
    return out, {node.target for graph in backend.graphs for node in graph.graph.nodes if node.op == "call_function"}


def _traces_fused_op(targets):
    # dynamo records the overload packet or the overload depending on how it was called
    names = {str(t) for t in targets}
    return any(str(op) in names or str(op.overloadpacket) in names for op in FUSED_OPS)


@pytest.mark.parametrize("mode", ["eval", "train p=0", "eval stats (track_running_stats=False)"])
def test_without_dropout_traces_to_batch_norm(mode):
    block = bnfused.BatchNormReLUDropout2d(4, p=0.0 if mode == "train p=0" else 0.3,
                                           track_running_stats="track" not in mode)
    block.train(mode == "train p=0")
    x = torch.randn(3, 4, 5, 5)
    expected = block(x)  # eager first: the compiled call below updates the running stats again
    _, targets = _traced_targets(block, x)
    assert not _traces_fused_op(targets), targets
    assert torch.nn.functional.batch_norm in targets or torch.batch_norm in targets, targets
    assert expected.shape == x.shape


def test_with_dropout_keeps_the_fused_ops():
    block = bnfused.BatchNormReLUDropout2d(4, p=0.3).train()
    _, targets = _traced_targets(block, torch.randn(3, 4, 5, 5))
    assert _traces_fused_op(targets), targets


class _Net(nn.Module):
    """Conv -> block2d -> Linear -> block1d (no affine weight) -> Linear."""

    def __init__(self, p: float, momentum) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.block2d = bnfused.BatchNormReLUDropout2d(4, p=p, momentum=momentum)
        self.fc = nn.Linear(4 * 5 * 5, 8)
        self.block1d = bnfused.BatchNormReLUDropout1d(8, p=p, affine=False, momentum=momentum)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.block1d(self.fc(self.block2d(self.conv(x)).flatten(1))))


def _unfused(net: _Net) -> nn.Module:
    """The same network with nn.BatchNormXd -> nn.ReLU in place of each block (parameters and buffers copied)."""
    ref = copy.deepcopy(net)
    for name, dim in (("block2d", 2), ("block1d", 1)):
        block = getattr(net, name)
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dim](block.num_features, momentum=block.momentum,
                                                          affine=block.affine)
        bn.load_state_dict(block.state_dict())
        setattr(ref, name, nn.Sequential(bn, nn.ReLU()))
    return ref


# Float32 results of one graph against another: inductor reorders the reductions and fuses the rsqrt and
# affine math differently from eager (measured on this CPU within 1e-7 on the eval output, 7e-7 on the gradients);
# 1e-5 leaves room for other ISAs and GPUs, far below what a wrong formula (a missing gradient term, biased
# instead of unbiased running variance, a skipped ReLU) moves.
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.mark.parametrize("momentum", [0.2, None])
def test_compiled_without_dropout_trains_like_the_unfused_model(device, momentum):
    # momentum None: the factor 1 / num_batches_tracked is data-dependent, which neither F.batch_norm nor the
    # fused ops take in a graph (torch's own nn.BatchNorm2d(momentum=None) does not compile with fullgraph=True
    # either); dynamo breaks the graph there, and the results must still be the unfused model's.
    torch.manual_seed(0)
    net = _Net(p=0.0, momentum=momentum).to(device)
    with torch.no_grad():
        net.block1d.running_mean.uniform_(-0.5, 0.5)
        net.block1d.running_var.uniform_(0.5, 2.0)
    ref = _unfused(net).to(device)
    compiled = torch.compile(net, fullgraph=momentum is not None)
    x = torch.randn(6, 3, 5, 5, device=device) * 2 + 0.5
    target = torch.randint(0, 3, (6,), device=device)
    for step in range(3):  # with momentum None the factor changes every step
        for model, fn in ((ref, ref), (net, compiled)):
            model.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(fn(x + step), target).backward()
        for (name, p_ref), (_, p_net) in zip(ref.named_parameters(), net.named_parameters()):
            torch.testing.assert_close(p_net.grad, p_ref.grad, **TOL, msg=f"grad of {name}, step {step}")
        ref_buffers = dict(ref.named_buffers())
        for name, buf in net.named_buffers():
            ref_name = name.replace("block2d.", "block2d.0.").replace("block1d.", "block1d.0.")
            torch.testing.assert_close(buf, ref_buffers[ref_name], **TOL, msg=f"{name}, step {step}")
    assert int(net.block2d.num_batches_tracked) == 3 and int(net.block1d.num_batches_tracked) == 3

    net.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ref(x), **TOL)
    assert int(net.block2d.num_batches_tracked) == 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_eval_reduced_precision_within_rounding(dtype):
    # float32 parameters and running statistics with reduced-precision input (as nn.BatchNorm2d under autocast):
    # both sides compute in float32 and round once, so they differ by at most one unit in the last place.
    torch.manual_seed(0)
    block = bnfused.BatchNormReLUDropout2d(8, p=0.2).eval()
    with torch.no_grad():
        block.running_mean.uniform_(-0.5, 0.5)
        block.running_var.uniform_(0.5, 2.0)
        block.weight.uniform_(0.5, 1.5)
        block.bias.uniform_(-0.5, 0.5)
    x = (torch.randn(4, 8, 6, 6) * 2).to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        eager = block(x)
        compiled = torch.compile(block, fullgraph=True)(x)
    assert compiled.dtype == dtype
    torch.testing.assert_close(compiled, eager, rtol=torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps)


def test_param_dtypes_batch_norm_cannot_take_keep_the_fused_op():
    # bfloat16 running statistics with a float32 weight: F.batch_norm refuses the mix, and narrowing the weight
    # would round it, so the block keeps the fused op, exact as in eager.
    block = bnfused.BatchNormReLUDropout2d(4, p=0.0, dtype=torch.bfloat16)
    block.weight = nn.Parameter(torch.rand(4) + 0.5)
    x = torch.randn(3, 4, 5, 5).to(torch.bfloat16)
    expected = copy.deepcopy(block)(x)
    out, targets = _traced_targets(block, x)
    assert _traces_fused_op(targets), targets
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_sync_module_without_process_group_compiles_to_batch_norm():
    # Without a process group SyncBatchNormReLUDropout is the single-process module: the same compiled path.
    block = bnfused.SyncBatchNormReLUDropout(4, p=0.0).train()
    ref = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU())
    x = torch.randn(3, 4, 5, 5)
    out, targets = _traced_targets(block, x)
    assert not _traces_fused_op(targets), targets
    torch.testing.assert_close(out, ref(x), **TOL)
    torch.testing.assert_close(block.running_var, ref[0].running_var, **TOL)
    assert int(block.num_batches_tracked) == 1


def test_export_keeps_the_fused_op_without_dropout():
    block = bnfused.BatchNormReLUDropout2d(4, p=0.0).eval()
    exported = torch.export.export(block, (torch.randn(2, 4, 3, 3),))
    targets = {n.target for n in exported.graph.nodes if n.op == "call_function"}
    assert torch.ops.bnfused.forward.default in targets, targets


# ---- the block tail: BN + residual add + ReLU ----

ADD_OPS = (torch.ops.bnfused.add_relu_forward.default, torch.ops.bnfused.add_relu_forward_bits.default)


class _Tail(nn.Module):
    """conv -> BatchNormAddReLU2d(conv(x), x) -> head: a ResNet block's tail with an identity shortcut."""

    def __init__(self, p: float, fused: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = bnfused.BatchNormAddReLU2d(4, p=p, momentum=0.2) if fused else nn.BatchNorm2d(4, momentum=0.2)
        self.fused = fused
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        y = self.bn(self.conv(x), x) if self.fused else torch.relu(self.bn(self.conv(x)) + x)
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize("mode", ["eval", "train p=0", "train p>0"])
def test_block_tail_traces_to_batch_norm_without_dropout(mode):
    tail = _Tail(p=0.3 if mode == "train p>0" else 0.0).train(mode != "eval")
    _, targets = _traced_targets(tail, torch.randn(3, 4, 5, 5))
    names = {str(t) for t in targets}
    traced_add_op = any(str(op) in names or str(op.overloadpacket) in names for op in ADD_OPS)
    assert traced_add_op == (mode == "train p>0"), targets


def test_compiled_block_tail_without_dropout_trains_like_the_unfused_tail(device):
    torch.manual_seed(0)
    tail = _Tail(p=0.0).to(device)
    ref = _Tail(p=0.0, fused=False).to(device)
    ref.load_state_dict(tail.state_dict())
    compiled = torch.compile(tail, fullgraph=True)
    x = torch.randn(6, 4, 5, 5, device=device) * 2 + 0.5
    target = torch.randint(0, 3, (6,), device=device)
    for step in range(2):
        for model, fn in ((ref, ref), (tail, compiled)):
            model.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(fn(x + step), target).backward()
        for (name, p_ref), (_, p_tail) in zip(ref.named_parameters(), tail.named_parameters()):
            torch.testing.assert_close(p_tail.grad, p_ref.grad, **TOL, msg=f"grad of {name}, step {step}")
        for (name, b_ref), (_, b_tail) in zip(ref.named_buffers(), tail.named_buffers()):
            torch.testing.assert_close(b_tail, b_ref, **TOL, msg=f"{name}, step {step}")
    tail.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ref(x), **TOL)
