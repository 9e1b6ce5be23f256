#!/usr/bin/env python
"""Train an MLP on scikit-learn's digits (8x8 images, shipped inside scikit-learn: no download), unfused and
fused from the same seed and initial weights, and compare accuracy and time per epoch.

    Linear(64, H, bias=False) -> BatchNorm1d -> ReLU -> Dropout(p)
    Linear(H, H, bias=False)  -> BatchNorm1d -> ReLU -> Dropout(p)
    Linear(H, 10)

The fused model is bnfused.convert() of a deep copy of the unfused one. With --p 0 both runs follow the same
loss curve up to float rounding; with p > 0 the dropout masks differ (bnfused draws them from Philox, PyTorch
from its own generator), so the accuracies agree within noise.

    python examples/train_digits.py [--p 0.5] [--epochs 30] [--seed 0] [--hidden 256]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bnfused from this checkout

import torch  # noqa: E402
from torch import nn  # noqa: E402

import bnfused  # noqa: E402


@dataclass
class Digits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass
class History:
    step_losses: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)


def load_digits(seed: int = 0, test_fraction: float = 0.2, device: str | torch.device = "cpu") -> Digits:
    """The 1797 digits, standardized with the training split's statistics, split by a seeded permutation."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x) * test_fraction)
    test, train_idx = order[:n_test], order[n_test:]
    mean, std = x[train_idx].mean(0), x[train_idx].std(0).clamp_min(1e-3)
    x = ((x - mean) / std).to(device)
    y = y.to(device)
    return Digits(x[train_idx.to(device)], y[train_idx.to(device)], x[test.to(device)], y[test.to(device)])


def make_mlp(hidden: int = 256, p: float = 0.5, seed: int = 0, classes: int = 10,
             device: str | torch.device = "cpu") -> nn.Sequential:
    torch.manual_seed(seed)  # initial weights
    return nn.Sequential(
        nn.Linear(64, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(p),
        nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(p),
        nn.Linear(hidden, classes)).to(device)


def make_pair(hidden: int = 256, p: float = 0.5, seed: int = 0,
              device: str | torch.device = "cpu") -> tuple[nn.Sequential, nn.Sequential]:
    """(unfused, fused): the fused model is bnfused.convert() of a deep copy, so both start from the same weights."""
    unfused = make_mlp(hidden, p, seed, device=device)
    return unfused, bnfused.convert(copy.deepcopy(unfused))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train(was_training)
    return acc


def train(model: nn.Module, data: Digits, epochs: int = 30, seed: int = 0, batch_size: int = 64, lr: float = 0.05,
          max_steps: int | None = None) -> History:
    """SGD with momentum over shuffled mini-batches; the shuffle order and the dropout generator both come from
    `seed`, so two models trained with the same seed see the same batches. Stops after max_steps if given."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    shuffle = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout masks (both PyTorch's and bnfused's keys come from the default generator)
    history = History()
    model.train()
    n = len(data.x_train)
    for _ in range(epochs):
        start = time.perf_counter()
        order = torch.randperm(n, generator=shuffle).to(data.x_train.device)
        total = 0.0
        batches = 0
        for i in range(0, n - 1, batch_size):
            idx = order[i:i + batch_size]
            if len(idx) < 2:  # BatchNorm needs more than one value per channel in training
                continue
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            loss.backward()
            opt.step()
            history.step_losses.append(loss.item())
            total += history.step_losses[-1]
            batches += 1
            if max_steps is not None and len(history.step_losses) >= max_steps:
                break
        history.epoch_seconds.append(time.perf_counter() - start)
        history.epoch_losses.append(total / max(batches, 1))
        history.test_accuracy.append(accuracy(model, data.x_test, data.y_test))
        if max_steps is not None and len(history.step_losses) >= max_steps:
            break
    return history


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="digits MLP: unfused vs bnfused, same seed")
    parser.add_argument("--p", type=float, default=0.5, help="dropout probability (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for data split, init, shuffle, dropout")
    parser.add_argument("--hidden", type=int, default=256, help="hidden width H (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.p < 1.0:
        parser.error("--p must be in [0, 1)")

    data = load_digits(args.seed, device=args.device)
    unfused, fused = make_pair(args.hidden, args.p, args.seed, args.device)
    print(f"digits: {len(data.x_train)} train / {len(data.x_test)} test images, MLP H={args.hidden}, p={args.p}, "
          f"seed={args.seed}, device={args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads",
          flush=True)
    runs = {}
    for name, model in (("unfused", unfused), ("bnfused", fused)):
        runs[name] = train(model, data, args.epochs, args.seed)
        print(f"trained {name}: final test accuracy {runs[name].test_accuracy[-1]:.4f}", flush=True)

    u, f = runs["unfused"], runs["bnfused"]
    print("\n| epoch | unfused loss | bnfused loss | unfused acc | bnfused acc | unfused ms | bnfused ms |")
    print("|---|---|---|---|---|---|---|")
    for e in range(len(u.epoch_losses)):
        print(f"| {e + 1} | {u.epoch_losses[e]:.4f} | {f.epoch_losses[e]:.4f} | {u.test_accuracy[e]:.4f} | "
              f"{f.test_accuracy[e]:.4f} | {u.epoch_seconds[e] * 1e3:.1f} | {f.epoch_seconds[e] * 1e3:.1f} |")
    # The first epoch includes warm-up (allocator, thread pool); the median of the rest is the steady state.
    per_epoch = {k: statistics.median(h.epoch_seconds[1:] or h.epoch_seconds) for k, h in runs.items()}
    print(f"\nfinal test accuracy: unfused {u.test_accuracy[-1]:.4f}, bnfused {f.test_accuracy[-1]:.4f}")
    print(f"median time per epoch: unfused {per_epoch['unfused'] * 1e3:.1f} ms, "
          f"bnfused {per_epoch['bnfused'] * 1e3:.1f} ms ({per_epoch['unfused'] / per_epoch['bnfused']:.2f}x)")
    if args.p == 0.0:
        gap = max(abs(a - b) for a, b in zip(u.step_losses, f.step_losses))
        print(f"p = 0: largest per-step loss difference {gap:.2e} (same curve up to float rounding)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
