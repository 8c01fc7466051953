"""Backends: each offers ``maxsim_padded`` and ``maxsim_varlen`` with one signature (see torch_backend).

``MAXSIM_BACKEND=torch|triton|reference`` forces one; otherwise the tensors' device decides.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

NAMES = ("torch", "triton", "reference")


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # not installed, or broken: the torch backend serves
        return False
    return True


def backend_name(device: torch.device) -> str:
    """The backend a device gets by default: Triton on CUDA/ROCm devices when triton is installed, else torch."""
    if device.type == "cuda" and _triton_available():
        return "triton"
    return "torch"


def get_backend(device: torch.device) -> ModuleType:
    """The backend module for tensors on ``device``, honouring ``MAXSIM_BACKEND``."""
    name = os.environ.get("MAXSIM_BACKEND") or backend_name(device)
    if name == "torch":
        from . import torch_backend

        return torch_backend
    if name == "reference":
        from . import reference_backend

        return reference_backend
    if name == "triton":
        from . import triton as triton_backend

        return triton_backend
    raise ValueError(f"MAXSIM_BACKEND must be one of {', '.join(NAMES)}, got {name!r}")
