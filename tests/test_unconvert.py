"""bnfused.unconvert(): converted models (the zoo of tests/torchvision_like.py, convert_sync) and fused modules built
directly turn back into torch.nn modules with the same Parameter and buffer objects, computing what the original
computes (float64, train and eval); convert -> unconvert -> convert fuses the same sites."""
import copy
import warnings

import pytest
import torch
from torch import nn

import bnfused
import torchvision_like as tv

MODELS = {**{name: (builder, (2, 3, 32, 32)) for name, builder in tv.SMALL.items()}, **tv.ZOO}


def build(name):
    torch.manual_seed(0)
    builder, shape = MODELS[name]
    return tv.randomize_batchnorm(builder().double()), torch.randn(*shape, dtype=torch.float64)


def convert(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MobileNetV2 has nothing to fuse; convert_sync names the BNs it leaves
        return bnfused.convert_with_report(model, **kwargs)


def structure(model):
    return [(name, type(m)) for name, m in model.named_modules()]


def tensors(model):
    return [*model.parameters(), *model.buffers()]


def run(model, x, training):
    """Outputs, input gradient and parameter gradients of one step (dropouts draw from torch's generator)."""
    model.train(training)
    model.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    torch.manual_seed(7)
    ys = model(xi)
    ys = list(ys) if isinstance(ys, tuple) else [ys]
    sum((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum() for y in ys).backward()
    return ys, xi.grad, [p.grad for p in model.parameters()]


def assert_same_run(a, b):
    (ys_a, gx_a, gp_a), (ys_b, gx_b, gp_b) = a, b
    for y, y_ref in zip(ys_a, ys_b, strict=True):
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(gx_a, gx_b, rtol=0, atol=0)
    for g, g_ref in zip(gp_a, gp_b, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=0)


@pytest.mark.slow  # the model zoo
@pytest.mark.parametrize("name", list(MODELS))
def test_zoo_round_trip(name):
    model, x = build(name)
    reference = copy.deepcopy(model)
    state = tensors(model)
    fused_model, report = convert(model)
    fused_structure = structure(fused_model)
    back = bnfused.unconvert(fused_model)
    assert back is model
    # the original modules and classes (rewritten forwards restored), the original Parameter and buffer objects
    assert structure(back) == structure(reference)
    assert not [m for m in back.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                and type(m).__module__.startswith("bnfused")]
    assert all(a is b for a, b in zip(tensors(back), state, strict=True))
    assert list(back.state_dict()) == list(reference.state_dict())
    for training in (True, False):  # the same computation, bit for bit: it is the original code again
        assert_same_run(run(back, x, training), run(reference, x, training))
    tv.assert_same_grads_and_state(back, reference, rtol=0, atol=0)
    # and again: the same sites, the same fused structure
    again, report_again = convert(back)
    assert report_again.fused == report.fused
    assert structure(again) == fused_structure


@pytest.mark.slow  # the model zoo
def test_round_trip_through_deepcopy_and_pickle(tmp_path):
    """What unconvert() reads back travels with the model (copy.deepcopy, torch.save of the whole model)."""
    model, x = build("resnet18")
    fused_model, _ = convert(copy.deepcopy(model))
    torch.save(fused_model, tmp_path / "model.pt")
    for restored in (copy.deepcopy(fused_model), torch.load(tmp_path / "model.pt", weights_only=False)):
        back = bnfused.unconvert(restored)
        assert structure(back) == structure(model)
        assert_same_run(run(back, x, False), run(model, x, False))


@pytest.mark.slow  # the model zoo
def test_convert_sync_round_trip():
    """convert_sync's modules become nn.SyncBatchNorm (the model keeps synchronising; without a process group it
    computes nn.BatchNorm2d's results), over the same process group, with the same tensors."""
    model, x = build("resnet18")
    fused_model, report = convert(copy.deepcopy(model), sync=True)
    assert report.num_fused > 0
    state = tensors(fused_model)
    back = bnfused.unconvert(fused_model)
    synced = [n for n, m in back.named_modules() if type(m) is nn.SyncBatchNorm]
    assert sorted(synced) == sorted(s.name for s in report.fused)
    assert all(a is b for a, b in zip(tensors(back), state, strict=True))
    assert list(back.state_dict()) == list(model.state_dict())
    for training in (True, False):
        assert_same_run(run(back, x, training), run(model, x, training))
    direct = bnfused.unconvert(bnfused.SyncBatchNormReLUDropout(4, p=0.2, process_group="group"))
    assert [type(m) for m in direct] == [nn.SyncBatchNorm, nn.ReLU, nn.Dropout]
    assert direct[0].process_group == "group" and direct[2].p == 0.2


@pytest.mark.slow  # the model zoo
def test_unconverted_model_goes_where_fused_modules_cannot():
    """TorchScript and nn.SyncBatchNorm.convert_sync_batchnorm, the reasons to turn back."""
    model, x = build("resnet18")
    back = bnfused.unconvert(convert(copy.deepcopy(model))[0]).eval()
    scripted = torch.jit.script(back)
    torch.testing.assert_close(scripted(x), model.eval()(x), rtol=0, atol=0)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(back)
    assert sum(type(m) is nn.SyncBatchNorm for m in synced.modules()) == sum(
        type(m) is nn.BatchNorm2d for m in model.modules())


DIRECT = [
    (bnfused.BatchNormReLUDropout1d, dict(p=0.3), nn.BatchNorm1d, (16, 5)),
    (bnfused.BatchNormReLUDropout2d, dict(p=0.0, momentum=None), nn.BatchNorm2d, (4, 5, 3, 3)),
    (bnfused.BatchNormReLUDropout2d, dict(p=0.5, affine=False), nn.BatchNorm2d, (4, 5, 3, 3)),
    (bnfused.BatchNormReLUDropout3d, dict(p=0.1, track_running_stats=False, eps=1e-3), nn.BatchNorm3d,
     (2, 5, 2, 3, 3)),
    (bnfused.SyncBatchNormReLUDropout, dict(p=0.2), nn.SyncBatchNorm, (4, 5, 3, 3)),
]


@pytest.mark.parametrize("cls, kwargs, bn_type, shape", DIRECT, ids=lambda v: getattr(v, "__name__", None))
def test_module_built_directly_becomes_a_sequential(cls, kwargs, bn_type, shape):
    torch.manual_seed(0)
    block = cls(5, **kwargs).double()
    model = nn.Sequential(nn.Identity(), block)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5) if block.affine else None
    model[1].register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    x = torch.randn(*shape, dtype=torch.float64)
    model.train()(x)  # move the running statistics
    back = bnfused.unconvert(model)
    seq = back[1]
    p = kwargs["p"]
    assert [type(m) for m in seq] == [bn_type, nn.ReLU] + ([nn.Dropout] if p > 0 else [])
    bn = seq[0]
    assert all(a is b for a, b in zip(tensors(bn), tensors(block), strict=True))
    assert (bn.eps, bn.momentum, bn.affine, bn.track_running_stats) == (
        block.eps, block.momentum, block.affine, block.track_running_stats)
    assert p == 0 or seq[2].p == p
    assert bn._forward_pre_hooks is block._forward_pre_hooks
    assert list(back.state_dict()) == [f"1.0.{k}" for k in block.state_dict()]
    for training in (False, True):
        back.train(training), block.train(training)
        if training and p > 0:
            continue  # dropout masks: Philox against torch's generator
        torch.testing.assert_close(back(x), block(x), rtol=1e-12, atol=1e-12)  # both with the pre-hook
    if block.affine:  # an optimizer built on the fused module trains the nn modules
        before = bn.weight.detach().clone()
        back.train()(x).sum().backward()
        optimizer.step()
        assert not torch.equal(bn.weight, before)


def test_block_as_the_model_and_its_mode():
    block = bnfused.BatchNormReLUDropout2d(3, p=0.25).eval()
    back = bnfused.unconvert(block)
    assert isinstance(back, nn.Sequential) and not back.training and not any(m.training for m in back)
    assert bnfused.unconvert(nn.Linear(2, 2)).__class__ is nn.Linear  # nothing to do


def test_what_cannot_be_turned_back_raises_before_any_change():
    model = nn.Sequential(bnfused.BatchNormReLUDropout2d(3), nn.Sequential(bnfused.BatchNormAddReLU2d(3)))
    before = structure(model)
    with pytest.raises(RuntimeError, match=r"BatchNormAddAct2d 1\.0 was built directly"):
        bnfused.unconvert(model)
    assert structure(model) == before
    hooked = nn.Sequential(bnfused.BatchNormReLUDropout2d(3), bnfused.BatchNormReLUDropout2d(3))
    hooked[1].register_forward_hook(lambda *args: None)
    with pytest.raises(RuntimeError, match="1 has a forward hook"):
        bnfused.unconvert(hooked)
    assert [type(m) for m in hooked] == [bnfused.BatchNormReLUDropout2d] * 2
