"""torch.export.export of an eval-mode model holding fused blocks: the program keeps bnfused.forward as one node,
runs for other batch sizes (dynamic batch dim), survives run_decompositions() and a save/load round trip."""
import io

import torch
from torch import nn
from torch.export import Dim

import bnfused


def _eval_model(device):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), bnfused.BatchNormReLUDropout2d(4, p=0.3),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 6), bnfused.BatchNormReLUDropout1d(6, p=0.5, affine=False),
        nn.Linear(6, 2),
    ).to(device)
    with torch.no_grad():  # running stats away from (0, 1) so eval really uses them
        for block in (model[1], model[4]):
            block.running_mean.uniform_(-0.3, 0.3)
            block.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _fused_nodes(exported):
    fused_forward = torch.ops.bnfused.forward.default
    return [n for n in exported.graph.nodes if n.op == "call_function" and n.target is fused_forward]


def test_export_eval_model_runs_and_matches(device):
    model = _eval_model(device)
    x = torch.randn(3, 3, 6, 6, device=device)
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: Dim("batch")},))
    assert len(_fused_nodes(exported)) == 2
    program = exported.module()
    with torch.no_grad():
        for batch in (3, 5, 8):
            xb = torch.randn(batch, 3, 6, 6, device=device).contiguous(
                memory_format=torch.channels_last if batch == 5 else torch.contiguous_format)
            torch.testing.assert_close(program(xb), model(xb), rtol=1e-5, atol=1e-6)


def test_export_decompositions_and_save_load(device):
    model = _eval_model(device)
    x = torch.randn(2, 3, 6, 6, device=device)
    exported = torch.export.export(model, (x,)).run_decompositions()
    assert len(_fused_nodes(exported)) == 2, "the custom op must survive the default decompositions"
    buffer = io.BytesIO()
    torch.export.save(exported, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    assert len(_fused_nodes(loaded)) == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(x), model(x), rtol=1e-5, atol=1e-6)
