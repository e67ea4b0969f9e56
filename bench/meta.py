"""Where a run happened: device, driver, versions, git commit, date; and the results' names."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from .providers import peer_versions

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_info() -> dict:
    """The commit measured. The GPU machine gets a copy of the tree without .git, so
    gpu_check.sh's caller passes it in BENCH_GIT_COMMIT."""
    commit = os.environ.get("BENCH_GIT_COMMIT") or _run(["git", "rev-parse", "HEAD"])
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return {"commit": commit or "unknown", "dirty": None if status is None else bool(status)}


def _driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0] if out else None


def device_info(device: str) -> dict:
    if device != "cuda":
        return {"type": "cpu", "name": platform.processor() or platform.machine() or "cpu",
                "threads": torch.get_num_threads()}
    props = torch.cuda.get_device_properties(0)
    return {
        "type": "cuda",
        "name": props.name,
        "driver": _driver(),
        "cuda": torch.version.cuda,
        "capability": f"{props.major}.{props.minor}",
        "memory_bytes": props.total_memory,
        "sm_count": props.multi_processor_count,
        "l2_bytes": getattr(props, "L2_cache_size", None),
    }


def versions() -> dict:
    import fused_losses

    found = {"python": platform.python_version(), "torch": torch.__version__,
             "fused_losses": getattr(fused_losses, "__version__", "?")}
    try:
        import triton

        found["triton"] = triton.__version__
    except ImportError:
        found["triton"] = None
    return {**found, **peer_versions()}


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def slug(device: dict) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3'; any CPU -> 'cpu'."""
    if device["type"] != "cuda":
        return "cpu"
    name = re.sub(r"^nvidia\s+", "", device["name"].strip().lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def stem(run: dict) -> str:
    """The results' file name without suffix: <gpu>-<date>, e.g. h100-80gb-hbm3-2026-11-22."""
    return f"{slug(run['device'])}-{run['date'][:10]}"


def command_line() -> str:
    return " ".join(["python -m bench", *sys.argv[1:]])
