"""PyTorch's own BatchNorm1d/2d/3d test samples (torch.testing._internal.common_modules.module_db) run through the
fused modules with p = 0, built from the same constructor arguments, against nn.BatchNormXd -> ReLU; and their
error inputs, which must raise the same error type and message."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfused

FUSED = {nn.BatchNorm1d: bnfused.BatchNormReLUDropout1d, nn.BatchNorm2d: bnfused.BatchNormReLUDropout2d,
         nn.BatchNorm3d: bnfused.BatchNormReLUDropout3d}
BN_NAMES = ["nn.BatchNorm1d", "nn.BatchNorm2d", "nn.BatchNorm3d"]


@pytest.fixture(scope="module")
def module_infos():
    """module_db's BatchNorm entries by name. Imported here, not at collection: the import needs expecttest
    (absent on the GPU machine) and freezes torch.backends flags for the whole process (PyTorch's own test-suite
    rule), which would break later tests that set them; the flags are given back."""
    was_frozen = torch.backends.flags_frozen()
    common_modules = pytest.importorskip("torch.testing._internal.common_modules")
    if not was_frozen:  # the flag lives in the globals of torch.backends' functions (the module object is wrapped)
        torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
        assert not torch.backends.flags_frozen()
    infos = {info.name: info for info in common_modules.module_db if info.module_cls in FUSED}
    assert sorted(infos) == BN_NAMES
    return infos


TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}
GRAD_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-9, atol=1e-9)}


def build_pair(info, sample, device, dtype, training):
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    ref = info.module_cls(*args, **kwargs).to(device=device, dtype=dtype).train(training)
    fused = FUSED[info.module_cls](*args, **kwargs, p=0.0).to(device=device, dtype=dtype).train(training)
    with torch.no_grad():  # non-default state so every term matters, then the same state in both
        if ref.weight is not None:
            ref.weight.uniform_(0.5, 1.5)
        if ref.bias is not None:
            ref.bias.normal_(0, 0.3)
        if ref.running_mean is not None:
            ref.running_mean.normal_(0, 0.2)
            ref.running_var.uniform_(0.5, 1.5)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


@pytest.mark.parametrize("name", BN_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_db_samples(device, module_infos, name, dtype, training):
    info = module_infos[name]
    samples = info.module_inputs_func(info, device=device, dtype=dtype, requires_grad=True, training=training)
    assert samples
    for sample in samples:
        desc = getattr(sample, "desc", "")
        ref, fused = build_pair(info, sample, device, dtype, training)
        (x,) = sample.forward_input.args
        x_ref, x_fused = (x.detach().clone().requires_grad_() for _ in range(2))
        for step in range(2):  # twice: running statistics (and momentum=None averages) evolve
            y_ref = F.relu(ref(x_ref))
            y = fused(x_fused)
            torch.testing.assert_close(y, y_ref, **TOL[dtype], msg=lambda m: f"{desc}: {m}")
        assert y.shape == y_ref.shape
        for name, t in ref.state_dict().items():
            torch.testing.assert_close(fused.state_dict()[name], t, **TOL[dtype], msg=lambda m: f"{desc} {name}: {m}")
        if y.numel():
            dy = torch.randn_like(y)
            y.backward(dy)
            y_ref.backward(dy)
            torch.testing.assert_close(x_fused.grad, x_ref.grad, **GRAD_TOL[dtype], msg=lambda m: f"{desc}: {m}")
            for (name, a), (_, b) in zip(fused.named_parameters(), ref.named_parameters()):
                torch.testing.assert_close(a.grad, b.grad, **GRAD_TOL[dtype], msg=lambda m: f"{desc} {name}: {m}")


@pytest.mark.parametrize("name", BN_NAMES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_db_error_inputs(device, module_infos, name, training):
    info = module_infos[name]
    errors = info.module_error_inputs_func(info, device=device, dtype=torch.float32, requires_grad=False,
                                           training=training)
    assert errors
    for error in errors:
        sample = error.module_error_input
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        (x,) = sample.forward_input.args
        if training:  # the expectation is PyTorch's own (eval BatchNorm accepts eps = 0)
            with pytest.raises(error.error_type, match=error.error_regex):
                info.module_cls(*args, **kwargs).to(device)(x)
        # the fused module rejects the bad argument already at construction, with the same type and message
        with pytest.raises(error.error_type, match=error.error_regex):
            FUSED[info.module_cls](*args, **kwargs, p=0.0).to(device).train(training)(x)
