"""CUDA graphs: a whole training step (forward, backward, optimizer step) using the fused module is captured once
and replayed; every replay draws a fresh Philox key on the device (torch.randint inside the graph), so the
dropout masks differ across replays, and the running statistics update on every replay. GPU-only."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfused

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and bnfused.WITH_CUDA),
                                reason="CUDA graphs need a GPU and a CUDA build of bnfused")

P = 0.5
WARMUP_STEPS = 3
REPLAYS = 4


def _step(model, optimizer, x, target):
    """One training step; also returns relu(bn(h)) of the block's input, unfused and without dropout, so the
    dropped positions of the fused output can be read off (relu > 0 but output == 0)."""
    h = model[0](x)
    y = model[1](h)
    block = model[1]
    relu = F.relu(F.batch_norm(h.detach(), None, None, block.weight.detach(), block.bias.detach(), True, 0.0,
                               block.eps))
    loss = F.cross_entropy(model[3](model[2](y)), target)
    loss.backward()
    optimizer.step()
    return y.detach(), relu, loss.detach()


def test_cuda_graph_replays_redraw_masks_and_update_running_stats():
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), bnfused.BatchNormReLUDropout2d(8, p=P), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 4)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    static_x = torch.randn(16, 3, 6, 6, device=device)
    static_target = torch.randint(0, 4, (16,), device=device)

    # Warm up on a side stream, as torch.cuda.graphs' whole-network capture recipe does.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_STEPS):
            optimizer.zero_grad(set_to_none=True)
            _step(model, optimizer, static_x, static_target)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_y, static_relu, static_loss = _step(model, optimizer, static_x, static_target)

    block = model[1]
    dropped, running_means, running_vars, weights = [], [], [], []
    for _ in range(REPLAYS):
        graph.replay()
        torch.cuda.synchronize()
        positive = static_relu > 0
        dropped.append(positive & (static_y == 0))
        # Kept elements are relu / (1 - p); dropped ones are zero: nothing else.
        kept = positive & ~dropped[-1]
        torch.testing.assert_close(static_y[kept], static_relu[kept] / (1 - P), rtol=1e-4, atol=1e-5)
        assert torch.isfinite(static_loss)
        running_means.append(block.running_mean.clone())
        running_vars.append(block.running_var.clone())
        weights.append(model[0].weight.detach().clone())

    for i in range(REPLAYS):
        frac = dropped[i].sum().item() / (static_relu > 0).sum().item()
        assert abs(frac - P) < 0.1, f"replay {i}: dropped fraction {frac:.3f}, expected about {P}"
    for i in range(1, REPLAYS):
        assert not torch.equal(dropped[i], dropped[i - 1]), f"replays {i - 1} and {i} used the same dropout mask"
        assert not torch.equal(running_means[i], running_means[i - 1]), f"running_mean did not update on replay {i}"
        assert not torch.equal(running_vars[i], running_vars[i - 1]), f"running_var did not update on replay {i}"
        assert not torch.equal(weights[i], weights[i - 1]), f"optimizer step did not run on replay {i}"
    # Capture records without running; warm-up steps and replays each count one batch.
    assert int(block.num_batches_tracked) == WARMUP_STEPS + REPLAYS
