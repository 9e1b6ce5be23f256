"""Real model code for the convert() tests: torchvision's and timm's own model definitions, built untrained.

torchvision's Python package imports its C extension (torchvision._C, for detection ops such as nms) and then
registers fake kernels for those ops; where that extension cannot load beside the installed torch (PyPI's
torchvision wheel beside a CPU-only torch), the registration raises "operator torchvision::nms does not exist" and
the import fails. The model definitions need none of those ops, so torchvision is imported here with the fake
registration of a missing torchvision:: op made a no-op (only during that import; a torchvision whose extension
loads is imported as it is). timm (installed without its dependencies: it imports torchvision, and huggingface_hub /
safetensors only to download weights) is imported after it. Each returns None when the package is absent, and the
tests skip.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
from typing import Optional

import torch
import torch.library


@contextlib.contextmanager
def _missing_torchvision_ops_ignored():
    real = torch.library.register_fake

    def register_fake(op, *args, **kwargs):
        if isinstance(op, str) and op.startswith("torchvision::"):
            name = op.split("::", 1)[1].split(".", 1)[0]
            if not hasattr(torch.ops.torchvision, name):  # torchvision._C did not load: nothing to register on
                return args[0] if args and callable(args[0]) else (lambda fn: fn)
        return real(op, *args, **kwargs)

    torch.library.register_fake = register_fake
    try:
        yield
    finally:
        torch.library.register_fake = real


def _import(name: str):
    if name in sys.modules:
        return sys.modules[name]
    if importlib.util.find_spec(name.split(".")[0]) is None:
        return None
    with _missing_torchvision_ops_ignored():
        return importlib.import_module(name)


def torchvision_models():
    """torchvision.models, or None without torchvision."""
    return _import("torchvision.models")


def timm():
    """timm, or None without timm or torchvision."""
    if torchvision_models() is None:
        return None
    return _import("timm")


# name -> (library, model name): the models the convert() tests run
MODELS = {
    "tv_mobilenet_v2": ("torchvision", "mobilenet_v2"),
    "tv_mobilenet_v3_small": ("torchvision", "mobilenet_v3_small"),
    "tv_mobilenet_v3_large": ("torchvision", "mobilenet_v3_large"),
    "tv_efficientnet_b0": ("torchvision", "efficientnet_b0"),
    "tv_regnet_y_400mf": ("torchvision", "regnet_y_400mf"),
    "timm_efficientnet_b0": ("timm", "efficientnet_b0"),
    "timm_mobilenetv3_large_100": ("timm", "mobilenetv3_large_100"),
    "timm_regnety_002": ("timm", "regnety_002"),
    "timm_cspdarknet53": ("timm", "cspdarknet53"),
    "timm_rexnet_100": ("timm", "rexnet_100"),
    "timm_resnet50d": ("timm", "resnet50d"),
}


def build(key: str, seed: int = 0) -> Optional[torch.nn.Module]:
    """The model MODELS[key] untrained (num_classes 10), or None when its library is absent."""
    library, name = MODELS[key]
    torch.manual_seed(seed)
    if library == "torchvision":
        models = torchvision_models()
        return None if models is None else getattr(models, name)(num_classes=10)
    lib = timm()
    return None if lib is None else lib.create_model(name, pretrained=False, num_classes=10)
