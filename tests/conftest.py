"""Shared fixtures: every device test runs on the CPU and, when a CUDA build and GPU are present, on CUDA."""
import pytest
import torch

import bnfused

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and bnfused.WITH_CUDA else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
