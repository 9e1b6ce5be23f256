"""torch.onnx.export of fused blocks and converted models, with both exporters (dynamo=True: torch.export
underneath; dynamo=False: the TorchScript tracer). ONNX has no fused op: in eval a block exports as the unfused
layers do (BatchNormalization -> Relu; the block tail BatchNormalization -> Add -> Relu), and onnxruntime computes
what PyTorch does. A training-mode export gives the unconverted model's graph. Skipped where onnx, onnxscript or
onnxruntime is not installed (`make test` installs them)."""
import copy
import io
import warnings

import pytest
import torch
from torch import nn

import bnfused
import torchvision_like as tv

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.slow  # exports trace whole models; `make test-fast` leaves these out (pyproject.toml)

EXPORTERS = [pytest.param(True, id="dynamo"), pytest.param(False, id="torchscript")]
# Nodes an exporter adds around the computation (initializer copies, shape constants): not part of the comparison.
PLUMBING = {"Identity", "Constant"}


def export(model, args, dynamo, **kwargs):
    """The ONNX model of model(*args) from one exporter, as an onnx.ModelProto."""
    if dynamo:
        pytest.importorskip("onnxscript")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracer warnings
        if dynamo:
            return torch.onnx.export(model, args, dynamo=True, verbose=False, **kwargs).model_proto
        f = io.BytesIO()
        torch.onnx.export(model, args, f, dynamo=False, **kwargs)
    return onnx.load_from_string(f.getvalue())


def node_types(proto):
    return [n.op_type for n in proto.graph.node if n.op_type not in PLUMBING]


def run_onnx(proto, args):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    outs = session.run(None, {name: a.contiguous().numpy() for name, a in zip(names, args)})
    return [torch.from_numpy(o) for o in outs]


class Tail(nn.Module):
    """A user's module calling a block tail: forward(x, residual)."""

    def __init__(self, tail):
        super().__init__()
        self.tail = tail

    def forward(self, x, residual):
        return self.tail(x, residual)


# name -> (module builder, input shape, memory format)
BLOCKS = {
    "relu1d_2d_input": (lambda: bnfused.BatchNormReLUDropout1d(5, p=0.3), (8, 5), None),
    "relu1d_3d_input": (lambda: bnfused.BatchNormReLUDropout1d(5, p=0.3), (4, 5, 7), None),
    "relu2d": (lambda: bnfused.BatchNormReLUDropout2d(5, p=0.3), (2, 5, 6, 7), None),
    "relu2d_channels_last": (lambda: bnfused.BatchNormReLUDropout2d(5, p=0.3), (2, 5, 6, 7), torch.channels_last),
    "relu3d": (lambda: bnfused.BatchNormReLUDropout3d(5, p=0.3), (2, 5, 3, 4, 5), None),
    "relu3d_channels_last_3d": (lambda: bnfused.BatchNormReLUDropout3d(5, p=0.3), (2, 5, 3, 4, 5),
                                torch.channels_last_3d),
    "relu_no_affine": (lambda: bnfused.BatchNormReLUDropout2d(5, affine=False), (2, 5, 6, 7), None),
    "sync_relu": (lambda: bnfused.SyncBatchNormReLUDropout(5, p=0.3), (2, 5, 6, 7), None),
    "tail1d": (lambda: Tail(bnfused.BatchNormAddReLU1d(5, p=0.3)), (8, 5), None),
    "tail2d": (lambda: Tail(bnfused.BatchNormAddReLU2d(5)), (2, 5, 6, 7), None),
    "tail2d_channels_last": (lambda: Tail(bnfused.BatchNormAddReLU2d(5)), (2, 5, 6, 7), torch.channels_last),
    "tail3d": (lambda: Tail(bnfused.BatchNormAddReLU3d(5)), (2, 5, 3, 4, 5), None),
    "sync_tail": (lambda: Tail(bnfused.SyncBatchNormAddReLU(5, p=0.3)), (2, 5, 6, 7), None),
}


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("name", list(BLOCKS))
def test_eval_block_exports_as_batch_normalization_and_relu(name, dynamo):
    build, shape, memory_format = BLOCKS[name]
    torch.manual_seed(0)
    model = tv.randomize_batchnorm(build()).eval()
    args = [torch.randn(shape)]
    if isinstance(model, Tail):
        args.append(torch.randn(shape))
    if memory_format is not None:
        args = [a.contiguous(memory_format=memory_format) for a in args]
    proto = export(model, tuple(args), dynamo)
    tail = isinstance(model, Tail)
    assert node_types(proto) == (["BatchNormalization", "Add", "Relu"] if tail else ["BatchNormalization", "Relu"])
    with torch.no_grad():
        expected = model(*args)
        bn = model.tail if tail else model  # the unfused layers on the same state
        unfused = torch.relu(nn.functional.batch_norm(args[0], bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                                      False, 0.0, bn.eps) + (args[1] if tail else 0))
    torch.testing.assert_close(expected, unfused, rtol=1e-5, atol=1e-5)
    (out,) = run_onnx(proto, args)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def conv_chain():
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.2), nn.MaxPool2d(2),
                         nn.BatchNorm2d(6), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(6 * 3 * 3, 8),
                         nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 4))


# converted models: name -> (builder, input shape); resnet18 has rewritten forwards (BN + add -> ReLU sites)
MODELS = {
    "conv_chain": (conv_chain, (2, 3, 8, 8)),
    "resnet18": (tv.SMALL["resnet18"], (2, 3, 32, 32)),
    "densenet121": (tv.SMALL["densenet121"], (2, 3, 32, 32)),
    "mlp": tv.ZOO["mlp"],
}


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("name", list(MODELS))
def test_converted_eval_model_exports_as_the_unconverted_one(name, dynamo):
    builder, shape = MODELS[name]
    torch.manual_seed(0)
    model = tv.randomize_batchnorm(builder()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused_model, report = bnfused.convert_with_report(copy.deepcopy(model))
    assert report.num_fused > 0
    x = torch.randn(shape)
    proto, proto_ref = export(fused_model, (x,), dynamo), export(model, (x,), dynamo)
    assert node_types(proto) == node_types(proto_ref)
    assert not [n for n in proto.graph.node if n.domain not in ("", "ai.onnx")], "no custom op may remain"
    with torch.no_grad():
        expected = model(x)
    (out,) = run_onnx(proto, [x])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_training_mode_export_gives_the_unconverted_graph(dynamo):
    """In training a block drops: the export is the unfused layers' (F.batch_norm, relu, F.dropout), as the
    unconverted model exports; the fused kernels' mask has no ONNX counterpart."""
    torch.manual_seed(0)
    model = conv_chain().train()
    fused_model = bnfused.convert(copy.deepcopy(model))
    x = torch.randn(2, 3, 8, 8)
    kwargs = {} if dynamo else {"training": torch.onnx.TrainingMode.TRAINING}
    proto, proto_ref = export(fused_model, (x,), dynamo, **kwargs), export(model, (x,), dynamo, **kwargs)
    types = node_types(proto)
    assert types == node_types(proto_ref)
    assert types.count("Dropout") == 2
    assert fused_model.training


def test_eager_calls_do_not_take_the_export_route(monkeypatch):
    """Outside an export the fused kernels run, even where torch.onnx says an export is under way (another
    thread's): the route needs a trace too."""
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    block = bnfused.BatchNormReLUDropout2d(3).eval()
    y = block(torch.randn(2, 3, 4, 4, requires_grad=True))
    assert "BNReLUDropoutFunction" in y.grad_fn.name()  # not ReluBackward0


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("act", ["silu", "hardswish", "relu6", "leaky_relu", "gelu"])
def test_activation_blocks_export_as_the_unfused_layers(dynamo, act):
    """A block with another activation exports as BatchNormalization -> that activation's ONNX ops, and
    onnxruntime computes what the fused block does."""
    block = bnfused.BatchNormActDropout2d(4, p=0.2, act=act).eval()
    with torch.no_grad():
        block.running_mean.uniform_(-0.5, 0.5)
        block.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 4, 5, 5)
    proto = export(block, (x,), dynamo)
    assert "BatchNormalization" in node_types(proto)
    torch.testing.assert_close(run_onnx(proto, (x,))[0], block(x), rtol=1e-4, atol=1e-5)
