"""SyncBatchNormReLUDropout / SyncBatchNormAddReLU over torch.distributed (gloo on localhost) against
single-process BatchNorm -> ReLU and BatchNorm -> + residual -> ReLU.

Each spawned rank builds the same full batch, runs the synced module on its slice and checks, itself, the
outputs, input (and residual) gradients, weight/bias gradients, running statistics and num_batches_tracked
against an nn.BatchNormXd (+ residual) -> ReLU over the whole batch (p = 0), and the dropout masks against the
Philox key with the rank folded in. Process start and gloo init cost seconds, so one spawn runs many checks: one with 2 ranks, one with 3.
"""
import contextlib
import copy
import datetime
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import bnfused
import torchvision_like as tv
from bnfused import ops

pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
              pytest.mark.slow]  # `make test-fast` leaves these out (marker: pyproject.toml)

REF_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
FUSED = {2: bnfused.BatchNormReLUDropout1d, 3: bnfused.BatchNormReLUDropout1d, 4: bnfused.BatchNormReLUDropout2d,
         5: bnfused.BatchNormReLUDropout3d}
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-9, atol=1e-9)}


# ---------------------------------------------------------------- process plumbing

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, worker, device):
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))  # a mismatched collective fails, not hangs
    try:
        worker(rank, world_size, torch.device(device))
    finally:
        dist.destroy_process_group()
    # The checks passed. Leave without the interpreter's teardown: after DistributedDataParallel has run, torch
    # keeps the gloo group's worker threads alive past destroy_process_group (its reducer holds the group), and
    # one of them releasing a finished allreduce during the teardown needs the GIL, which aborts the rank
    # ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(worker, world_size, device):
    mp.spawn(_entry, args=(world_size, _free_port(), worker, str(device)), nprocs=world_size, join=True)


class CollectiveCounter:
    """Counts the torch.distributed collectives bnfused.sync issues (it looks them up at call time)."""

    NAMES = ("all_gather", "all_gather_into_tensor", "all_gather_single", "all_reduce")

    def __init__(self):
        self.calls = []

    @contextlib.contextmanager
    def __call__(self):
        originals = {name: getattr(dist, name) for name in self.NAMES if hasattr(dist, name)}

        def counting(name):
            def call(*args, **kwargs):
                self.calls.append(name)
                return originals[name](*args, **kwargs)
            return call

        for name in originals:
            setattr(dist, name, counting(name))
        try:
            yield self
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)


def gathered(t, group=None):
    size = dist.get_world_size(group)
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def assert_same_on_all_ranks(t, group=None):
    for other in gathered(t, group):
        assert torch.equal(other, t)


def bounds(split, index):
    lo = sum(split[:index])
    return lo, lo + split[index]


# ---------------------------------------------------------------- parity against single-process BN -> ReLU

def full_batch(shape, dtype, device, seed, offset=0.5):
    """The same (x, grad_out) on every rank and device."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + offset
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    return x.to(device, dtype), grad.to(device, dtype)


def make_pair(channels, dims, kwargs, dtype, device, add=False):
    """A synced module (p = 0; the block tail SyncBatchNormAddReLU with add) and the nn.BatchNormXd it must
    match, with the same non-trivial state."""
    ref = REF_BN[dims](channels, **kwargs).to(device, dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if ref.weight is not None:
            ref.weight.copy_(torch.rand(channels, generator=g) + 0.5)
            ref.bias.copy_(torch.randn(channels, generator=g) * 0.3)
        if ref.running_mean is not None:
            ref.running_mean.copy_(torch.randn(channels, generator=g) * 0.2)
            ref.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
    synced = bnfused.SyncBatchNormAddReLU if add else bnfused.SyncBatchNormReLUDropout
    sync = synced(channels, p=0.0, **kwargs).to(device, dtype)
    sync.load_state_dict(ref.state_dict())
    return sync, ref


def unfused(bn, x, residual=None):
    """The layers the synced module replaces: relu(bn(x)), or relu(bn(x) + residual) for the block tail."""
    return torch.relu(bn(x) if residual is None else bn(x) + residual)


def residual_like(x, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.device, x.dtype)


def check_parity(rank, device, shape, split, kwargs=None, dtype=torch.float32, memory_format=None,
                 offset=0.5, members=None, steps=2, add=False):
    """Train steps of the synced module on this rank's slice vs nn.BatchNormXd -> ReLU on the whole batch
    (SyncBatchNormAddReLU vs nn.BatchNormXd -> + residual -> ReLU with add).

    members: the global ranks of the module's process group (all ranks when None); split is over them.
    """
    kwargs = kwargs or {}
    members = members if members is not None else list(range(dist.get_world_size()))
    group = None if len(members) == dist.get_world_size() else dist.new_group(members)  # every rank calls
    if rank not in members:
        return
    index = members.index(rank)
    lo, hi = bounds(split, index)
    sync, ref = make_pair(shape[1], len(shape), kwargs, dtype, device, add)
    sync.process_group = group
    tol = TOL[dtype]
    counter = CollectiveCounter()
    for step in range(steps):
        x, grad = full_batch(shape, dtype, device, seed=100 * step + len(shape), offset=offset)
        x_local = x[lo:hi].clone()
        if memory_format is not None:
            x_local = x_local.contiguous(memory_format=memory_format)
        x_local.requires_grad_()
        residual = residual_like(x, seed=step) if add else None
        r_local = residual[lo:hi].clone().requires_grad_() if add else None
        sync.zero_grad()
        ref.zero_grad()
        with counter():
            y = sync(x_local, r_local) if add else sync(x_local)
            y.backward(grad[lo:hi])
        # one all_gather in forward, one all_reduce in backward, on every rank, an empty one included
        assert counter.calls == ["all_gather", "all_reduce"] * (step + 1), counter.calls

        ref_before = copy.deepcopy(ref)
        x_ref = x.clone().requires_grad_()
        r_ref = residual.clone().requires_grad_() if add else None
        y_ref = unfused(ref, x_ref, r_ref)
        y_ref.backward(grad)
        torch.testing.assert_close(y, y_ref[lo:hi], **tol)
        if memory_format is not None and x_local.numel():
            assert y.is_contiguous(memory_format=memory_format)
        torch.testing.assert_close(x_local.grad, x_ref.grad[lo:hi], **tol)
        if add:
            torch.testing.assert_close(r_local.grad, r_ref.grad[lo:hi], **tol)

        if ref.weight is not None:
            # nn.SyncBatchNorm's convention: this rank's own sums (DDP averages them), i.e. the single-process
            # gradient of the loss restricted to this rank's slice; their sum over ranks is the whole gradient.
            masked = torch.zeros_like(grad)
            masked[lo:hi] = grad[lo:hi]
            unfused(ref_before, x, residual).backward(masked)
            torch.testing.assert_close(sync.weight.grad, ref_before.weight.grad, **tol)
            torch.testing.assert_close(sync.bias.grad, ref_before.bias.grad, **tol)
            for name in ("weight", "bias"):
                total = sum(gathered(getattr(sync, name).grad, group))
                torch.testing.assert_close(total, getattr(ref, name).grad, **tol)

        if ref.running_mean is not None:
            torch.testing.assert_close(sync.running_mean, ref.running_mean, **tol)
            torch.testing.assert_close(sync.running_var, ref.running_var, **tol)
            assert int(sync.num_batches_tracked) == int(ref.num_batches_tracked) == step + 1
            for buf in (sync.running_mean, sync.running_var, sync.num_batches_tracked):
                assert_same_on_all_ranks(buf, group)
        else:
            assert sync.running_mean is None and sync.running_var is None

    # eval: running statistics (or, without them, this rank's own batch statistics), no communication
    sync.eval()
    ref.eval()
    x, _ = full_batch(shape, dtype, device, seed=7)
    r_local = residual_like(x, seed=8)[lo:hi] if add else None
    with counter():
        y = sync(x[lo:hi], r_local) if add else sync(x[lo:hi])
    assert counter.calls.count("all_gather") == steps
    if x[lo:hi].numel():
        expected = unfused(ref, x[lo:hi], r_local) if ref.running_mean is not None else unfused(
            lambda t: F.batch_norm(t, None, None, ref.weight, ref.bias, True, 0.0, ref.eps), x[lo:hi], r_local)
        torch.testing.assert_close(y, expected, **tol)


def check_reduced_precision(rank, device):
    """float16/bfloat16 input with float32 parameters and statistics (as cuDNN BN) vs float32 BN of the same input."""
    shape, split = (5, 3, 6), [2, 3]
    lo, hi = bounds(split, rank)
    for dtype, tol in ((torch.float16, dict(rtol=2e-3, atol=2e-3)), (torch.bfloat16, dict(rtol=1.6e-2, atol=1.6e-2))):
        sync, ref = make_pair(3, 3, {}, torch.float32, device)
        x, grad = full_batch(shape, dtype, device, seed=8)
        x_local = x[lo:hi].clone().requires_grad_()
        y = sync(x_local)
        y.backward(grad[lo:hi])
        x_ref = x.float().requires_grad_()
        y_ref = torch.relu(ref(x_ref))
        y_ref.backward(grad.float())
        assert y.dtype == dtype and x_local.grad.dtype == dtype
        torch.testing.assert_close(y.float(), y_ref[lo:hi], **tol)
        torch.testing.assert_close(x_local.grad.float(), x_ref.grad[lo:hi], rtol=2 * tol["rtol"], atol=2 * tol["atol"])
        torch.testing.assert_close(sync.running_var, ref.running_var, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------- dropout across ranks

def check_dropout(rank, world_size, device, p=0.3, add=False):
    shape, split = (4, 3, 4, 5), [2, 2]
    sync, ref = make_pair(3, 4, {}, torch.float32, device, add)
    sync.p = p
    lo, hi = bounds(split, rank)
    x, grad = full_batch(shape, torch.float32, device, seed=5)
    x_local = x[lo:hi].clone().requires_grad_()
    residual = residual_like(x, seed=6) if add else None
    inputs = (x_local, residual[lo:hi]) if add else (x_local,)

    torch.manual_seed(11)  # the same seed on every rank, as a DDP job would set it
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        y = sync(*inputs)
    # the CPU backward reads the 1-bit mask; the block tail saves its 1-bit pass mask on every device
    assert (torch.uint8 in saved) == (add or device.type == "cpu")
    y.backward(grad[lo:hi])
    torch.manual_seed(11)
    key = ops.philox_key(device)  # the key the module drew, before the rank was folded in
    masks = [ops.dropout_mask(key + torch.tensor([0, r], device=device), (hi - lo,) + shape[1:], p)
             for r in range(world_size)]
    assert not torch.equal(masks[0], masks[1])  # the rank changes the mask...
    # ...and this rank's output used its own: the full batch's mask is the ranks' masks stacked
    full_mask = torch.cat(masks)
    x_ref = x.clone().requires_grad_()
    y_ref = unfused(ref, x_ref, residual) * full_mask / (1 - p)
    y_ref.backward(grad)
    torch.testing.assert_close(y, y_ref[lo:hi], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x_local.grad, x_ref.grad[lo:hi], rtol=1e-4, atol=1e-5)
    total = sum(gathered(sync.weight.grad))
    torch.testing.assert_close(total, ref.weight.grad, rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(other, y.detach()) for other in gathered(y.detach()))

    torch.manual_seed(11)
    assert torch.equal(sync(*inputs), y)  # reproducible from the seed
    assert not torch.equal(sync(*inputs), y)  # and a fresh mask per call


# ---------------------------------------------------------------- DDP training vs single-process training

class ResidualNet(nn.Module):
    """conv -> bn1 -> relu, then conv -> bn2 -> + (that ReLU's output) -> relu, then a head: a BN -> ReLU site
    and a BN + residual -> ReLU site, as in a ResNet block."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return self.head(torch.relu(self.bn2(self.conv2(h)) + h))


def make_net(device, bn=nn.BatchNorm2d, residual=False):
    torch.manual_seed(3)
    if residual:
        return ResidualNet().to(device)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), bn(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).to(device)


def batch_norms(net):
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def check_ddp_training(rank, device, split, steps=3, residual=False):
    """SGD steps under DistributedDataParallel on slices == single-process steps on the whole batch.

    Each rank's loss is its share of the whole batch's mean loss times the world size, so DDP's gradient
    average is the whole batch's gradient even for uneven (or empty) slices.
    """
    world_size = len(split)
    single = make_net(device, residual=residual)
    # the unfused nn.SyncBatchNorm model, converted: its sites must become the fused synced modules
    net = bnfused.convert_sync(nn.SyncBatchNorm.convert_sync_batchnorm(make_net(device, residual=residual)))
    expected = ([bnfused.SyncBatchNormReLUDropout, bnfused.SyncBatchNormAddReLU] if residual
                else [bnfused.SyncBatchNormReLUDropout])
    assert [type(m) for m in batch_norms(net)] == expected and all(m.p == 0.0 for m in batch_norms(net))
    ddp = nn.parallel.DistributedDataParallel(net)
    lr = 0.01 if residual else 0.1  # the residual net's sum-of-squares loss diverges at 0.1
    opt_single = torch.optim.SGD(single.parameters(), lr=lr, momentum=0.9)
    opt_ddp = torch.optim.SGD(ddp.parameters(), lr=lr, momentum=0.9)
    lo, hi = bounds(split, rank)
    total = sum(split)
    for step in range(steps):
        g = torch.Generator().manual_seed(50 + step)
        x = torch.randn(total, 2, 5, 5, generator=g).to(device)
        target = torch.randn(total, 2, 5, 5, generator=g).to(device)
        opt_single.zero_grad()
        ((single(x) - target) ** 2).sum().div(total).backward()
        opt_single.step()
        opt_ddp.zero_grad()
        ((ddp(x[lo:hi]) - target[lo:hi]) ** 2).sum().mul(world_size / total).backward()
        opt_ddp.step()
    for (name, a), b in zip(single.named_parameters(), net.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    for fused, bn in zip(batch_norms(net), batch_norms(single)):
        torch.testing.assert_close(fused.running_mean, bn.running_mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fused.running_var, bn.running_var, rtol=1e-4, atol=1e-5)
        assert int(fused.num_batches_tracked) == steps


# ---------------------------------------------------------------- the spawned workers

def check_bad_inputs_before_communication(device):
    """Checks run before any collective (a rank that raised would leave its peers waiting) and state change."""
    sync, _ = make_pair(3, 4, {}, torch.float32, device)
    counter = CollectiveCounter()
    for bad, error in ((torch.randn(4, device=device), ValueError),
                       (torch.randn(2, 0, 2, device=device), ValueError),
                       (torch.randn(2, 2, 3, device=device), RuntimeError),
                       (torch.randint(0, 3, (2, 3, 2), device=device), NotImplementedError)):
        with counter(), pytest.raises(error):
            sync(bad)
    assert counter.calls == [] and int(sync.num_batches_tracked) == 0
    tail, _ = make_pair(3, 4, {}, torch.float32, device, add=True)
    x = torch.randn(2, 3, 4, 4, device=device)
    for residual, match in ((torch.randn(2, 3, 4, 5, device=device), "residual of shape"),
                            (x.double(), "in synchronised training the residual must have the input's dtype"),
                            (x[:, :2], "residual of shape")):
        with counter(), pytest.raises(RuntimeError, match=match):
            tail(x, residual)
    assert counter.calls == [] and int(tail.num_batches_tracked) == 0


def check_residual_only_gradient(rank, device):
    """Only the residual needs a gradient: it reads no global sums, so the backward issues no all_reduce."""
    shape, split = (5, 3, 4), [2, 3]
    lo, hi = bounds(split, rank)
    tail, ref = make_pair(3, 3, {}, torch.float32, device, add=True)
    tail.requires_grad_(False)
    x, grad = full_batch(shape, torch.float32, device, seed=12)
    residual = residual_like(x, seed=13)
    r_local = residual[lo:hi].clone().requires_grad_()
    counter = CollectiveCounter()
    with counter():
        tail(x[lo:hi], r_local).backward(grad[lo:hi])
    assert counter.calls == ["all_gather"], counter.calls
    r_ref = residual.clone().requires_grad_()
    unfused(ref, x, r_ref).backward(grad)
    torch.testing.assert_close(r_local.grad, r_ref.grad[lo:hi], rtol=1e-4, atol=1e-5)


def two_ranks(rank, world_size, device):
    check_bad_inputs_before_communication(device)
    check_parity(rank, device, (6, 3), [5, 1])  # 2-d input; one value per channel on rank 1 is fine
    check_parity(rank, device, (5, 3, 4), [2, 3], dict(momentum=None))
    check_parity(rank, device, (4, 3, 3, 5), [1, 3], memory_format=torch.channels_last)
    check_parity(rank, device, (5, 2, 2, 3, 2), [3, 2], dict(affine=False))
    check_parity(rank, device, (4, 3, 5), [2, 2], dict(track_running_stats=False, eps=1e-3))
    check_parity(rank, device, (6, 3, 4, 4), [3, 3], dict(momentum=0.3), dtype=torch.float64, offset=1e4,
                 steps=1)  # Chan merge under a large offset
    check_reduced_precision(rank, device)
    check_dropout(rank, world_size, device)
    check_ddp_training(rank, device, [3, 3])
    # the block tail: the same statistics, plus the residual and its gradient
    check_parity(rank, device, (6, 3), [5, 1], add=True)
    check_parity(rank, device, (5, 3, 4), [2, 3], dict(momentum=None), add=True)
    check_parity(rank, device, (4, 3, 3, 5), [1, 3], memory_format=torch.channels_last, add=True)
    check_parity(rank, device, (5, 2, 2, 3, 2), [3, 2], dict(affine=False), add=True)
    check_parity(rank, device, (4, 3, 5), [2, 2], dict(track_running_stats=False, eps=1e-3), add=True)
    check_parity(rank, device, (6, 3, 4, 4), [3, 3], dict(momentum=0.3), dtype=torch.float64, offset=1e4,
                 steps=1, add=True)
    check_residual_only_gradient(rank, device)
    check_dropout(rank, world_size, device, add=True)
    check_ddp_training(rank, device, [3, 3], residual=True)


def three_ranks(rank, world_size, device):
    # uneven slices with an empty one: it contributes nothing but joins every collective
    check_parity(rank, device, (7, 3, 4), [4, 0, 3])
    check_parity(rank, device, (5, 2, 2, 3), [0, 1, 4], dict(momentum=None), memory_format=torch.channels_last)
    check_parity(rank, device, (4, 3), [1, 0, 3], dict(affine=False))
    # process_group: ranks 0 and 2 synchronise; rank 1 runs nothing
    check_parity(rank, device, (6, 3, 2, 2), [2, 4], members=[0, 2])
    check_ddp_training(rank, device, [3, 0, 2])
    check_parity(rank, device, (7, 3, 4), [4, 0, 3], add=True)
    check_parity(rank, device, (5, 2, 2, 3), [0, 1, 4], dict(momentum=None), memory_format=torch.channels_last,
                 add=True)
    check_parity(rank, device, (6, 3, 2, 2), [2, 4], members=[0, 2], add=True)
    check_ddp_training(rank, device, [3, 0, 2], residual=True)

    # every rank empty: an empty output, running statistics unchanged, num_batches_tracked counts the step
    sync, _ = make_pair(3, 3, {}, torch.float32, device)
    before = sync.running_mean.clone()
    x = torch.randn(0, 3, 4, device=device, requires_grad=True)
    y = sync(x)
    y.sum().backward()
    assert y.shape == x.shape and torch.equal(sync.running_mean, before) and int(sync.num_batches_tracked) == 1
    tail, _ = make_pair(3, 3, {}, torch.float32, device, add=True)
    residual = torch.randn(0, 3, 4, device=device, requires_grad=True)
    y = tail(x, residual)
    y.sum().backward()
    assert y.shape == x.shape and residual.grad.shape == x.shape
    assert torch.equal(tail.running_mean, before) and int(tail.num_batches_tracked) == 1

    # one value per channel over the whole group: every rank raises (no collective left waiting), no state change
    sync, _ = make_pair(3, 2, {}, torch.float32, device)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        sync(torch.randn(1 if rank == 0 else 0, 3, device=device))
    assert int(sync.num_batches_tracked) == 0

    # a group of one process: exactly the single-process module, dropout included
    own = [dist.new_group([r]) for r in range(world_size)][rank]
    sync = bnfused.SyncBatchNormReLUDropout(3, p=0.4, process_group=own).to(device)
    single = bnfused.BatchNormReLUDropout2d(3, p=0.4).to(device)
    x, _ = full_batch((2, 3, 4, 4), torch.float32, device, seed=rank)
    counter = CollectiveCounter()
    torch.manual_seed(4)
    with counter():
        y = sync(x)
    torch.manual_seed(4)
    assert counter.calls == [] and torch.equal(y, single(x))
    assert torch.equal(sync.running_var, single.running_var)
    tail = bnfused.SyncBatchNormAddReLU(3, p=0.4, process_group=own).to(device)
    single = bnfused.BatchNormAddReLU2d(3, p=0.4).to(device)
    residual = residual_like(x, seed=rank)
    torch.manual_seed(4)
    with counter():
        y = tail(x, residual)
    torch.manual_seed(4)
    assert counter.calls == [] and torch.equal(y, single(x, residual))


@pytest.mark.parametrize("world_size", [2, 3])
def test_synced_training_matches_whole_batch(device, world_size):
    spawn(two_ranks if world_size == 2 else three_ranks, world_size, device)


# ---------------------------------------------------------------- without a process group (in this process)

@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (2, 3, 4, 5), (2, 3, 2, 3, 4)], ids=["2d", "3d", "4d", "5d"])
def test_falls_back_to_single_process_module(device, shape):
    """No process group: bit-for-bit the single-process module (outputs, masks, gradients, buffers)."""
    assert not (dist.is_available() and dist.is_initialized())
    sync = bnfused.SyncBatchNormReLUDropout(3, momentum=None, p=0.3).to(device)
    single = FUSED[len(shape)](3, momentum=None, p=0.3).to(device)
    for training in (True, True, False):
        sync.train(training)
        single.train(training)
        x = torch.randn(shape, device=device)
        results = []
        for m in (sync, single):
            xi = x.clone().requires_grad_()
            torch.manual_seed(9)
            y = m(xi)
            y.backward(torch.ones_like(y))
            results.append((y, xi.grad))
        for a, b in zip(*results):
            assert torch.equal(a, b)
    for (name, a), b in zip(sync.named_parameters(), single.parameters()):
        assert torch.equal(a.grad, b.grad), name
    for a, b in zip(sync.state_dict().values(), single.state_dict().values()):
        assert torch.equal(a, b)


ADD = {2: bnfused.BatchNormAddReLU1d, 3: bnfused.BatchNormAddReLU1d, 4: bnfused.BatchNormAddReLU2d,
       5: bnfused.BatchNormAddReLU3d}


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (2, 3, 4, 5), (2, 3, 2, 3, 4)], ids=["2d", "3d", "4d", "5d"])
def test_add_falls_back_to_single_process_module(device, shape):
    """SyncBatchNormAddReLU without a process group: bit-for-bit BatchNormAddReLUXd, the residual's gradient too."""
    tail = bnfused.SyncBatchNormAddReLU(3, momentum=None, p=0.3).to(device)
    single = ADD[len(shape)](3, momentum=None, p=0.3).to(device)
    for training in (True, True, False):
        tail.train(training)
        single.train(training)
        x, residual = torch.randn(shape, device=device), torch.randn(shape, device=device)
        results = []
        for m in (tail, single):
            xi, ri = x.clone().requires_grad_(), residual.clone().requires_grad_()
            torch.manual_seed(9)
            y = m(xi, ri)
            y.backward(torch.ones_like(y))
            results.append((y, xi.grad, ri.grad))
        for a, b in zip(*results):
            assert torch.equal(a, b)
    for (name, a), b in zip(tail.named_parameters(), single.parameters()):
        assert torch.equal(a.grad, b.grad), name
    for a, b in zip(tail.state_dict().values(), single.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad, error, match", [
    (torch.randn(4), ValueError, "expected at least 2D input"),
    (torch.randn(4, 0, 2), ValueError, "number of input channels should be non-zero"),
    (torch.randn(4, 2, 2), RuntimeError, "should contain 2 elements not 3"),
    (torch.randn(1, 3), ValueError, "Expected more than 1 value per channel"),
    (torch.randint(0, 3, (4, 3)), NotImplementedError, "not implemented for 'int64'"),
], ids=["1d", "no_channels", "wrong_channels", "one_value", "int"])
def test_bad_inputs_raise_without_state_change(bad, error, match):
    sync = bnfused.SyncBatchNormReLUDropout(3)
    with pytest.raises(error, match=match):
        sync(bad)
    assert int(sync.num_batches_tracked) == 0
    assert torch.equal(sync.running_mean, torch.zeros(3)) and torch.equal(sync.running_var, torch.ones(3))


def test_constructor_and_state_dict_like_sync_batchnorm():
    with pytest.raises(ValueError, match="dropout probability"):
        bnfused.SyncBatchNormReLUDropout(3, p=1.5)
    sync = bnfused.SyncBatchNormReLUDropout(3, 1e-3, 0.2, True, True, "group", p=0.1)
    assert (sync.eps, sync.momentum, sync.process_group, sync.p) == (1e-3, 0.2, "group", 0.1)
    assert sync.state_dict().keys() == nn.SyncBatchNorm(3).state_dict().keys()
    assert "p=0.1" in repr(sync)
    tail = bnfused.SyncBatchNormAddReLU(3, 1e-3, 0.2, True, True, "group")
    assert (tail.eps, tail.momentum, tail.process_group, tail.p) == (1e-3, 0.2, "group", 0.0)
    assert tail.state_dict().keys() == nn.SyncBatchNorm(3).state_dict().keys()


def test_add_bad_inputs_raise_without_state_change():
    tail = bnfused.SyncBatchNormAddReLU(3)
    x = torch.randn(4, 3, 2)
    for bad, residual, error, match in (
            (torch.randn(4), torch.randn(4), ValueError, "expected at least 2D input"),
            (x, torch.randn(4, 3, 3), RuntimeError, "residual of shape"),
            (x, 1.0, TypeError, "residual must be a Tensor"),
            (torch.randn(1, 3), torch.randn(1, 3), ValueError, "Expected more than 1 value per channel"),
            (torch.randn(4, 2, 2), torch.randn(4, 2, 2), RuntimeError, "should contain 2 elements not 3")):
        with pytest.raises(error, match=match):
            tail(bad, residual)
    assert int(tail.num_batches_tracked) == 0
    assert torch.equal(tail.running_mean, torch.zeros(3)) and torch.equal(tail.running_var, torch.ones(3))


# ---------------------------------------------------------------- convert(sync=True) / convert_sync

@pytest.mark.parametrize("bn", [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm])
def test_convert_sync_turns_chains_into_the_synced_module(bn):
    source = bn(4, momentum=None)
    with torch.no_grad():
        source.weight.uniform_(0.5, 1.5)
        source.running_mean.normal_()
        source.num_batches_tracked.fill_(3)
    model = nn.Sequential(source, nn.ReLU(), nn.Dropout(0.2), nn.Sequential(bn(4), nn.ReLU()))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    keys = list(model.state_dict())
    assert bnfused.convert(model, sync=True) is model
    for block, p in ((model[0], 0.2), (model[3][0], 0.0)):
        assert type(block) is bnfused.SyncBatchNormReLUDropout and block.p == pytest.approx(p)
        assert block.process_group is None
    assert model[0].momentum is None and type(model[1]) is nn.Identity and type(model[2]) is nn.Identity
    assert list(model.state_dict()) == keys
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_convert_sync_process_group():
    kept = nn.Sequential(nn.SyncBatchNorm(2, process_group="own"), nn.ReLU(), nn.BatchNorm2d(2), nn.ReLU())
    bnfused.convert_sync(kept)
    assert kept[0].process_group == "own" and kept[2].process_group is None  # SyncBN keeps its group
    named = bnfused.convert_sync(nn.Sequential(nn.SyncBatchNorm(2, process_group="own"), nn.ReLU()), "named")
    assert named[0].process_group == "named"
    plain = bnfused.convert(nn.Sequential(nn.SyncBatchNorm(2), nn.ReLU(), nn.BatchNorm2d(2), nn.ReLU()))
    assert type(plain[0]) is nn.SyncBatchNorm and type(plain[2]) is bnfused.BatchNormReLUDropout2d
    with pytest.raises(ValueError, match="only used with sync=True"):
        bnfused.convert(nn.Sequential(), process_group="named")


def test_convert_sync_fuses_residual_sites():
    """ResNet's BN + residual -> ReLU tails become SyncBatchNormAddReLU: every BN that convert() fuses is fused
    by convert_sync too; what is left unsynchronised (the downsample BNs) is named in a warning."""
    torch.manual_seed(0)
    model, report = bnfused.convert_with_report(nn.SyncBatchNorm.convert_sync_batchnorm(tv.SMALL["resnet18"]()),
                                                sync=True, process_group="group")
    _, single = bnfused.convert_with_report(tv.SMALL["resnet18"]())
    assert [(f.name, f.residual) for f in report.fused] == [(f.name, f.residual) for f in single.fused]
    tails = [m for n, m in model.named_modules() if n.endswith("bn2")]
    assert len(tails) == 8 and all(type(m) is bnfused.SyncBatchNormAddReLU and m.process_group == "group"
                                   for m in tails)
    left = {n: type(m) for n, m in model.named_modules() if "downsample" in n and n.endswith(".1")}
    assert left and set(left.values()) == {nn.SyncBatchNorm}
    with pytest.warns(UserWarning, match=r"left 3 nn.BatchNorm layer\(s\) unfused and not synchronised"):
        bnfused.convert_sync(tv.SMALL["resnet18"]())
    model.eval()
    torch.manual_seed(0)
    reference = tv.SMALL["resnet18"]().eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-5)
