"""What machine and software a run is on: versions, devices, backends, git commit."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from ..backends import cpu_kernel
from .baselines import default_backend, device_backend, package_version, peer_versions


def versions() -> dict:
    """Versions of maxsim, torch, triton (None when not importable), numpy, python and the peers."""
    import maxsim

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - triton missing or broken: report None
        triton_version = None
    try:
        import numpy

        numpy_version = numpy.__version__
    except ImportError:
        numpy_version = None
    return {
        "maxsim": getattr(maxsim, "__version__", None),
        "torch": torch.__version__,
        "triton": triton_version,
        "numpy": numpy_version,
        "python": platform.python_version(),
        "peers": peer_versions(),
        "tqdm": package_version("tqdm"),
        "matplotlib": package_version("matplotlib"),
    }


def devices() -> list[dict]:
    """Every device torch sees, with the backend each gets by default and with ``MAXSIM_BACKEND``."""
    out = [
        {
            "device": "cpu",
            "name": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "backend": device_backend(torch.device("cpu")),
            "avx2_kernel": cpu_kernel.status(),
            "backend_now": default_backend(torch.device("cpu")),
        }
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            dev = torch.device("cuda", i)
            out.append(
                {
                    "device": f"cuda:{i}",
                    "name": props.name,
                    "capability": list(torch.cuda.get_device_capability(i)),
                    "memory_gib": round(props.total_memory / 2**30, 1),
                    "multiprocessors": props.multi_processor_count,
                    "hip": torch.version.hip,
                    "backend": device_backend(dev),
                    "backend_now": default_backend(dev),
                }
            )
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        dev = torch.device("mps")
        out.append(
            {
                "device": "mps",
                "name": "Apple MPS",
                "backend": device_backend(dev),
                "backend_now": default_backend(dev),
            }
        )
    return out


def device_info(device: torch.device) -> dict:
    """Name and details of the benchmark device."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return {
            "type": "cuda",
            "index": index,
            "name": props.name,
            "capability": list(torch.cuda.get_device_capability(index)),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "driver_cuda": torch.version.cuda,
            "hip": torch.version.hip,
        }
    if device.type == "cpu":
        return {
            "type": "cpu",
            "name": _cpu_name(),
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
        }
    return {"type": device.type, "name": str(device)}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> dict:
    """The commit of the source tree maxsim is imported from: ``{"commit", "dirty"}``.

    ``MAXSIM_GIT_COMMIT``, when set, wins: a working tree copied to a GPU machine may sit beside a stale
    ``.git`` (seen on the device machines), so the caller's word is the reliable one there. Otherwise the
    commit comes from ``git``, and is None outside a checkout.
    """
    import maxsim

    given = os.environ.get("MAXSIM_GIT_COMMIT")
    if given:
        return {"commit": given, "dirty": None, "source": "MAXSIM_GIT_COMMIT"}
    where = Path(maxsim.__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where, capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
        return {"commit": commit, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def info_text() -> str:
    """The text ``maxsim info`` prints."""
    v = versions()
    lines = ["maxsim " + str(v["maxsim"])]
    lines.append("versions:")
    for key in ("torch", "triton", "numpy", "python"):
        lines.append(f"  {key:<10} {v[key] if v[key] is not None else 'not importable'}")
    for key, val in v["peers"].items():
        lines.append(f"  {key:<10} {val if val is not None else 'not installed'}")
    for key in ("tqdm", "matplotlib"):
        lines.append(f"  {key:<10} {v[key] if v[key] is not None else 'not installed (optional)'}")
    forced = os.environ.get("MAXSIM_BACKEND")
    lines.append(
        "devices (default backend" + (f"; MAXSIM_BACKEND={forced} forces one" if forced else "") + "):"
    )
    for dev in devices():
        if dev["device"] == "cpu":
            desc = f"{_cpu_name()}, {dev['threads']} torch threads of {dev['cpu_count']} cores, AVX2 kernel {dev['avx2_kernel']}"
        elif dev["device"].startswith("cuda"):
            kind = "ROCm" if dev.get("hip") else "sm_{}{}".format(*dev["capability"])
            desc = f"{dev['name']}, {kind}, {dev['memory_gib']} GiB, {dev['multiprocessors']} SMs"
        else:
            desc = dev["name"]
        backend = dev["backend"]
        if dev["backend_now"] != backend:
            backend = f"{backend} (now {dev['backend_now']})"
        lines.append(f"  {dev['device']:<8} {desc}  ->  backend {backend}")
    if not torch.cuda.is_available():
        lines.append("  cuda     not available")
    lines.append(f"  executable {sys.executable}")
    return "\n".join(lines)
