"""The user-facing docstrings (what help() shows): each has PyTorch's sections (Args, Examples, and Shape for the
modules) and states the semantics a user needs, and every Examples block runs and prints what it shows."""
import doctest

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfused

DOCUMENTED = [bnfused.BatchNormActDropout1d, bnfused.BatchNormActDropout2d, bnfused.BatchNormActDropout3d,
              bnfused.SyncBatchNormActDropout, bnfused.bn_act_dropout, bnfused.fold_eval,
              bnfused.BNReLUDropoutFunction, bnfused.BatchNormAddAct1d, bnfused.BatchNormAddAct2d,
              bnfused.BatchNormAddAct3d, bnfused.bn_add_act_dropout, bnfused.SyncBatchNormAddAct,
              bnfused.unconvert]
MODULES = DOCUMENTED[:4]
# The ReLU functionals: short docstrings naming the general one, whose arguments they share.
RELU_FUNCTIONALS = {bnfused.bn_relu_dropout: "bn_act_dropout", bnfused.bn_add_relu_dropout: "bn_add_act_dropout"}


def _name(obj) -> str:
    return obj.__name__


@pytest.mark.parametrize("obj", DOCUMENTED, ids=_name)
def test_docstring_has_pytorch_sections(obj):
    doc = obj.__doc__
    assert doc and len(doc.splitlines()) > 20, f"{obj.__name__}: a one-line docstring tells a user nothing"
    for section in ("Args", "Examples::"):
        assert f"\n    {section}" in doc, (obj.__name__, section)
    if obj in MODULES:
        assert "\n    Shape:" in doc


@pytest.mark.parametrize("obj", MODULES + [bnfused.bn_act_dropout], ids=_name)
def test_docstring_states_the_differences_from_nn(obj):
    """What a user of nn.BatchNormXd -> ReLU -> Dropout must know before switching."""
    doc = " ".join(obj.__doc__.split())
    for needle in ("Philox", "2^{", "-0.0", "momentum", "eps"):
        assert needle in doc, (obj.__name__, needle)
    if obj in MODULES[:3]:
        assert "Double backward is not supported" in doc and "1/(1-p)" in doc


@pytest.mark.parametrize("obj", DOCUMENTED, ids=_name)
def test_examples_run(obj):
    """Runs the Examples block as a doctest (outputs compared), on the CPU, from a fixed seed."""
    torch.manual_seed(0)
    globs = {"torch": torch, "nn": nn, "F": F, "bnfused": bnfused}
    tests = doctest.DocTestFinder(recurse=False).find(obj, obj.__name__, globs=globs)
    assert tests and tests[0].examples, f"{obj.__name__} has no runnable example"
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{obj.__name__}: {result.failed} of {result.attempted} example lines failed"


@pytest.mark.parametrize("obj", list(RELU_FUNCTIONALS), ids=_name)
def test_relu_functionals_point_to_the_general_one(obj):
    assert f":func:`{RELU_FUNCTIONALS[obj]}`" in obj.__doc__ and "Examples::" in obj.__doc__
    test_examples_run(obj)
