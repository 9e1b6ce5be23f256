"""examples/train_digits.py: unfused and bnfused.convert()ed MLPs trained from the same seed follow the same loss
curve with p = 0 (float tolerance), and both learn with p > 0."""
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # `make test-fast` leaves these out (marker: pyproject.toml)

pytest.importorskip("sklearn")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_digits.py"
STEPS = 12  # about half an epoch of 64-image batches
HIDDEN = 32


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("train_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _train_pair(example, device, p, steps, seed=0):
    data = example.load_digits(seed, device=device)
    unfused, fused = example.make_pair(HIDDEN, p, seed, device)
    assert any(type(m).__name__ == "BatchNormActDropout1d" for m in fused.modules())
    assert not any(type(m) is torch.nn.BatchNorm1d for m in fused.modules())
    return (example.train(unfused, data, epochs=1, seed=seed, max_steps=steps),
            example.train(fused, data, epochs=1, seed=seed, max_steps=steps), unfused, fused)


def test_p0_same_loss_curve(example, device):
    u, f, unfused, fused = _train_pair(example, device, p=0.0, steps=STEPS)
    assert len(u.step_losses) == len(f.step_losses) == STEPS
    torch.testing.assert_close(torch.tensor(f.step_losses), torch.tensor(u.step_losses), rtol=1e-4, atol=1e-5)
    # Same weights and running statistics after the same steps (state_dict keys are unchanged by convert).
    fused_state = fused.state_dict()
    for name, value in unfused.state_dict().items():
        torch.testing.assert_close(fused_state[name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert u.test_accuracy == pytest.approx(f.test_accuracy, abs=2.0 / 359)  # at most a tie flips


def test_p_positive_both_learn(example, device):
    u, f, _, _ = _train_pair(example, device, p=0.5, steps=2 * STEPS)
    for history in (u, f):
        first, last = sum(history.step_losses[:4]) / 4, sum(history.step_losses[-4:]) / 4
        assert all(math.isfinite(v) for v in history.step_losses)
        assert last < 0.7 * first, history.step_losses
        assert history.test_accuracy[-1] > 0.6  # chance is 0.1
    # Different masks (Philox vs PyTorch's generator), so only "within noise" is claimed.
    assert abs(u.test_accuracy[-1] - f.test_accuracy[-1]) < 0.2


def test_main_prints_comparison(example, capsys):
    assert example.main(["--epochs", "1", "--p", "0", "--hidden", "16"]) == 0
    out = capsys.readouterr().out
    assert "final test accuracy: unfused" in out and "median time per epoch" in out
    assert "largest per-step loss difference" in out
