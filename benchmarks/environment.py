"""Describes where a run happened: device name and slug, torch/bnfused versions, date, git commit, threads."""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

import bnfused


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model_name()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def load_average() -> str:
    """The 1/5/15-minute load averages: a busy machine explains noisy timings."""
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def git_commit(repo: Path) -> str:
    """Short commit, "-dirty" when tracked files differ from it; "unknown" outside a git checkout."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=repo,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def run_meta(device: torch.device, threads: int, suite: str, p: float, repo: Path) -> dict[str, str]:
    meta = {
        "device": device_name(device),
        "device type": device.type,
        "torch": torch.__version__,
        "bnfused": f"{bnfused.__version__} (CPU kernels: {bnfused.CPU_CAPABILITY}, CUDA kernels: {bnfused.WITH_CUDA})",
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "git commit": git_commit(repo),
        "threads": f"{threads} (of {os.cpu_count()} logical CPUs)",
        "suite": suite,
        "dropout p": f"{p}",
    }
    if device.type == "cuda":
        meta["cuDNN"] = f"{torch.backends.cudnn.version()} (eager BatchNorm's default on CUDA; "\
                        "the 'eager no-cuDNN' peer disables it)"
        meta["CUDA"] = str(torch.version.cuda)
    return meta
