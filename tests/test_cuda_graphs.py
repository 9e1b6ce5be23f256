"""CUDA graphs: a whole training step (forward, backward, optimizer step) using the fused module is captured once
and replayed; every replay draws a fresh Philox key on the device (torch.randint inside the graph), so the
dropout masks differ across replays, and the running statistics update on every replay. The shapes split each
channel's reduction over several blocks, so the arrival counters of the last-block merge are in play: captured
ones in the graph, per-stream ones on two streams and from two host threads. GPU-only."""
import threading

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
    # 256 x 8 x 16 x 16: each channel's 65536 elements are split over several blocks (the captured counters).
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), bnfused.BatchNormReLUDropout2d(8, p=P), nn.Flatten(),
                          nn.Linear(8 * 16 * 16, 4)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    static_x = torch.randn(256, 3, 16, 16, device=device)
    static_target = torch.randint(0, 4, (256,), device=device)

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


def _split_inputs(channels, seed):
    """A (256, C, 16, 16) input and gradient whose reductions split every channel over several blocks."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(256, channels, 16, 16, device="cuda", generator=g) + 1.0
    return x, torch.randn(x.shape, device="cuda", generator=g)


def _check_stats(x, mean, var):
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-5, atol=1e-5)


def test_split_reductions_on_two_streams_at_once():
    """Two streams run split statistics and gradient sums concurrently: each stream has its own counters."""
    inputs = [_split_inputs(16, seed) for seed in (1, 2)]
    key = torch.tensor([5, 0], dtype=torch.int64, device="cuda")
    want = []
    for x, dy in inputs:
        mean, var = bnfused.ops.batch_stats(x)
        rstd = (var + 1e-5).rsqrt()
        want.append((mean, var, bnfused.ops.backward_reduce(dy, x, mean, rstd, None, None, key, 0.3)))
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    got = [[], []]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    for _ in range(20):
        for i, (s, (x, dy)) in enumerate(zip(streams, inputs)):
            with torch.cuda.stream(s):
                mean, var = bnfused.ops.batch_stats(x)
                rstd = (var + 1e-5).rsqrt()
                got[i].append((mean, var, bnfused.ops.backward_reduce(dy, x, mean, rstd, None, None, key, 0.3)))
    torch.cuda.synchronize()
    for i, (x, _) in enumerate(inputs):
        _check_stats(x, want[i][0], want[i][1])
        for mean, var, sums in got[i]:  # deterministic: the same bits every time
            assert torch.equal(mean, want[i][0]) and torch.equal(var, want[i][1])
            assert all(torch.equal(a, b) for a, b in zip(sums, want[i][2]))


def test_split_reductions_from_two_threads_on_one_stream():
    """Two host threads share the current stream's counters; one keeps growing them (more channels each call) while
    the other launches: a launch must keep the buffer it was given alive until it is enqueued."""
    errors = []
    start = threading.Barrier(2)

    def work(channel_counts, seed):
        try:
            start.wait()
            for _ in range(5):
                for c in channel_counts:
                    x, _ = _split_inputs(c, seed + c)
                    mean, var = bnfused.ops.batch_stats(x)
                    _check_stats(x, mean, var)
        except Exception as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=([4, 8, 16, 32, 64, 128], 0)),
               threading.Thread(target=work, args=([4] * 6, 100))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
