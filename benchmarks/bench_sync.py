"""Synced BatchNorm benchmark: per-step forward+backward time of bnfused.SyncBatchNormReLUDropout against
nn.SyncBatchNorm -> ReLU -> Dropout, and of the block tail bnfused.SyncBatchNormAddReLU against
nn.SyncBatchNorm -> + residual -> ReLU, two processes on the gloo backend (localhost), per-rank batch shapes below.

nn.SyncBatchNorm refuses CPU input, and five of the ATen ops its autograd Function calls (batch_norm_stats,
batch_norm_gather_stats_with_counts, batch_norm_elemt, batch_norm_backward_reduce, batch_norm_backward_elemt)
have CUDA kernels only. On the CPU the unfused peer is therefore nn.SyncBatchNorm's own autograd Function
(torch.nn.modules._functions.SyncBatchNorm: the same collectives, the same control flow) with composite CPU
kernels for those five ops registered below. On CUDA it is the real nn.SyncBatchNorm module (both ranks share
the one GPU through gloo; NCCL refuses two ranks on one device). Two more columns without synchronisation
(per-rank statistics: the fused module, and nn.BatchNorm2d -> ReLU -> Dropout on PyTorch's native kernels) show
what the communication costs and bound any unfused synced CPU implementation from below.

Each rank times its own steps with time.perf_counter around a fixed number of iterations (the one timing method
here that is not measure.time_interleaved: the ranks must run the same number of steps, or a collective would
wait forever). `python -m benchmarks --only sync` runs this part alone.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.modules._functions import SyncBatchNorm as SyncBatchNormFunction

import bnfused

WORLD_SIZE = 2
P = 0.1
# per-rank (N, C, H, W) batches, float32, contiguous
SHAPES = [(16, 32, 28, 28), (32, 64, 28, 28), (32, 256, 14, 14)]
QUICK_SHAPES = [(16, 32, 28, 28)]


# ---------------------------------------------------------------- the unfused peer on the CPU

def _reduce_dims(x):
    return [0] + list(range(2, x.dim()))


def _per_channel(t, x):
    return t.view((1, -1) + (1,) * (x.dim() - 2))


def _batch_norm_stats(x, eps):
    var, mean = torch.var_mean(x, dim=_reduce_dims(x), correction=0)
    return mean, torch.rsqrt(var + eps)


def _batch_norm_gather_stats_with_counts(x, mean_all, invstd_all, running_mean, running_var, momentum, eps, counts):
    counts = counts.to(mean_all.dtype).unsqueeze(1)
    total = counts.sum()
    mean = (counts * mean_all).sum(0) / total
    var_all = invstd_all.pow(-2) - eps
    var = (counts * (var_all + (mean_all - mean) ** 2)).sum(0) / total
    if running_mean is not None:
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_((var * total / (total - 1)).to(running_var.dtype), alpha=momentum)
    return mean, torch.rsqrt(var + eps)


def _batch_norm_elemt(x, weight, bias, mean, invstd, eps):
    scale = invstd if weight is None else invstd * weight
    shift = -mean * scale if bias is None else bias - mean * scale
    return x * _per_channel(scale, x) + _per_channel(shift, x)


def _batch_norm_backward_reduce(grad_out, x, mean, invstd, weight, input_g, weight_g, bias_g):
    dims = _reduce_dims(x)
    sum_dy = grad_out.sum(dims)
    sum_dy_xmu = (grad_out * (x - _per_channel(mean, x))).sum(dims)
    grad_weight = sum_dy_xmu * invstd if weight_g else x.new_empty(0)
    grad_bias = sum_dy if bias_g else x.new_empty(0)
    return sum_dy, sum_dy_xmu, grad_weight, grad_bias


def _batch_norm_backward_elemt(grad_out, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    total = count.sum()
    factor_1 = invstd * invstd * sum_dy_xmu / total
    factor_2 = invstd if weight is None else invstd * weight
    return (grad_out - _per_channel(sum_dy / total, x)
            - (x - _per_channel(mean, x)) * _per_channel(factor_1, x)) * _per_channel(factor_2, x)


_CPU_KERNELS = {
    "batch_norm_stats": _batch_norm_stats,
    "batch_norm_gather_stats_with_counts": _batch_norm_gather_stats_with_counts,
    "batch_norm_elemt": _batch_norm_elemt,
    "batch_norm_backward_reduce": _batch_norm_backward_reduce,
    "batch_norm_backward_elemt": _batch_norm_backward_elemt,
}
_cpu_library = None


def register_cpu_kernels() -> None:
    """CPU kernels for nn.SyncBatchNorm's CUDA-only ATen ops, in this process only."""
    global _cpu_library
    if _cpu_library is None:
        _cpu_library = torch.library.Library("aten", "IMPL")
        for name, fn in _CPU_KERNELS.items():
            _cpu_library.impl(name, fn, "CPU")


class CPUSyncBatchNorm(nn.SyncBatchNorm):
    """nn.SyncBatchNorm's training path (its autograd Function) without its GPU-only input check."""

    def forward(self, input):
        if not self.training:
            return super().forward(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        group = self.process_group or dist.group.WORLD
        return SyncBatchNormFunction.apply(input, self.weight, self.bias, self.running_mean, self.running_var,
                                           self.eps, factor, group, dist.get_world_size(group))


# ---------------------------------------------------------------- timing (inside each rank)

def _unfused_sync_bn(channels: int, device: torch.device) -> nn.Module:
    return (nn.SyncBatchNorm if device.type == "cuda" else CPUSyncBatchNorm)(channels)


class _Tail(nn.Module):
    """module(x) -> relu(bn(x) + residual) (the fused tail, or the unfused layers), the residual held fixed."""

    def __init__(self, bn: nn.Module, residual: torch.Tensor, fused: bool) -> None:
        super().__init__()
        self.bn, self.residual, self.fused = bn, residual, fused

    def forward(self, x):
        return self.bn(x, self.residual) if self.fused else torch.relu(self.bn(x) + self.residual)


def _peers(channels: int, device: torch.device, residual: torch.Tensor) -> dict[str, nn.Module]:
    return {
        "bnfused_sync": bnfused.SyncBatchNormReLUDropout(channels, p=P),
        "nn_sync": nn.Sequential(_unfused_sync_bn(channels, device), nn.ReLU(), nn.Dropout(P)),
        "bnfused_nosync": bnfused.BatchNormReLUDropout2d(channels, p=P),
        "nn_nosync": nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(), nn.Dropout(P)),
        # the ResNet block tail (no dropout, as in ResNets)
        "bnfused_sync_tail": _Tail(bnfused.SyncBatchNormAddReLU(channels), residual, fused=True),
        "nn_sync_tail": _Tail(_unfused_sync_bn(channels, device), residual, fused=False),
    }


def _check_peers_agree(device: torch.device) -> None:
    """With p = 0 the two synced peers compute the same outputs, input gradients and running statistics
    (guards the CPU kernels above: a wrong baseline would make any speedup meaningless)."""
    torch.manual_seed(dist.get_rank())
    x = torch.randn(3 + dist.get_rank(), 8, 5, 5, device=device) * 2 + 1
    grad = torch.randn_like(x)
    residual = torch.randn_like(x)
    pairs = ((bnfused.SyncBatchNormReLUDropout(8, p=0.0), nn.Sequential(_unfused_sync_bn(8, device), nn.ReLU())),
             (_Tail(bnfused.SyncBatchNormAddReLU(8), residual, True),
              _Tail(_unfused_sync_bn(8, device), residual, False)))
    for fused, unfused in pairs:
        results = []
        for m in (fused.to(device), unfused.to(device)):
            xi = x.clone().requires_grad_()
            y = m(xi)
            y.backward(grad)
            results.append((y, xi.grad, next(b for n, b in m.named_buffers() if n.endswith("running_var"))))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _step_seconds(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, iters: int) -> list[float]:
    """Per-step seconds of forward + backward; every rank runs the same count (the collectives pair up)."""
    times = []
    for _ in range(iters):
        x.grad = None
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        module(x).backward(grad)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        times.append(time.perf_counter() - start)
    return times


def _worker(rank: int, port: int, device_type: str, quick: bool, out_path: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or WORLD_SIZE) // WORLD_SIZE))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=300))
    try:
        device = torch.device(device_type)
        if device.type == "cpu":
            register_cpu_kernels()
        _check_peers_agree(device)
        rows = []
        warmup, reps, iters = (2, 3, 5) if quick else (3, 5, 10)
        for shape in QUICK_SHAPES if quick else SHAPES:
            torch.manual_seed(rank)
            x = torch.randn(shape, device=device).requires_grad_()
            grad = torch.randn(shape, device=device)
            residual = torch.randn(shape, device=device)
            peers = {name: m.to(device).train() for name, m in _peers(shape[1], device, residual).items()}
            samples = {name: [] for name in peers}
            for name, m in peers.items():
                _step_seconds(m, x, grad, warmup)
            for _ in range(reps):  # interleaved blocks, so a slow spell hits every peer alike
                for name, m in peers.items():
                    samples[name] += _step_seconds(m, x, grad, iters)
            ms = {name: 1e3 * statistics.median(t) for name, t in samples.items()}
            rows.append({"device": device.type, "world_size": WORLD_SIZE, "shape_per_rank": list(shape),
                         "dtype": "float32", "p": P, **{f"{name}_ms": v for name, v in ms.items()},
                         "speedup_vs_nn_sync": ms["nn_sync"] / ms["bnfused_sync"],
                         "tail_speedup_vs_nn_sync": ms["nn_sync_tail"] / ms["bnfused_sync_tail"],
                         "threads_per_rank": torch.get_num_threads()})
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(rows, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(quick: bool = False) -> list[dict]:
    """Rows of per-step medians (ms) for every device here: CPU, and CUDA when a GPU and bnfused's CUDA kernels are."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and bnfused.WITH_CUDA else [])
    rows = []
    for device_type in devices:
        with tempfile.TemporaryDirectory() as tmp:
            out_path = os.path.join(tmp, "rows.json")
            mp.spawn(_worker, args=(_free_port(), device_type, quick, out_path), nprocs=WORLD_SIZE, join=True)
            with open(out_path) as f:
                rows += json.load(f)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [f"Synced BN -> ReLU -> Dropout(p={P}), and the block tail BN -> + residual -> ReLU (p=0), {WORLD_SIZE} "
             "gloo processes, per-step forward+backward (median ms)", "",
             "| device | shape per rank | bnfused sync | nn.SyncBatchNorm chain | speedup | bnfused, no sync "
             "| nn.BatchNorm2d chain, no sync | bnfused sync tail | nn.SyncBatchNorm + residual -> ReLU | speedup |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['device']} | {'x'.join(map(str, r['shape_per_rank']))} | {r['bnfused_sync_ms']:.2f} | "
                     f"{r['nn_sync_ms']:.2f} | {r['speedup_vs_nn_sync']:.2f}x | {r['bnfused_nosync_ms']:.2f} | "
                     f"{r['nn_nosync_ms']:.2f} | {r['bnfused_sync_tail_ms']:.2f} | {r['nn_sync_tail_ms']:.2f} | "
                     f"{r['tail_speedup_vs_nn_sync']:.2f}x |")
    if any(r["device"] == "cpu" for r in rows):
        lines += ["", "cpu: nn.SyncBatchNorm rejects CPU input; its autograd Function runs with composite CPU kernels "
                  "for its five CUDA-only ATen ops (see benchmarks/bench_sync.py)."]
    return "\n".join(lines)
