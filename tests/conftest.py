"""Shared fixtures: every device test runs on the CPU and, when a CUDA build and GPU are present, on CUDA."""
import os
import tempfile

# A fresh inductor/AOT cache per test session: torch's on-disk caches are not keyed by a custom op's schema, so a
# graph compiled against an older bnfused op signature would otherwise be replayed against the rebuilt extension.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bnfused-inductor-")

import pytest  # noqa: E402
import torch  # noqa: E402

import bnfused

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and bnfused.WITH_CUDA else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
