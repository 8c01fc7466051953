"""Backends: each offers ``maxsim_padded`` and ``maxsim_varlen`` with one signature (see torch_backend).

``MAXSIM_BACKEND=torch|triton|reference`` forces one; otherwise the tensors' device decides.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

NAMES = ("torch", "triton", "reference")


def backend_name(device: torch.device) -> str:
    """The backend a device gets by default: the torch backend everywhere until the GPU kernels land."""
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
        raise NotImplementedError("MAXSIM_BACKEND=triton: the Triton kernels are not part of this build yet")
    raise ValueError(f"MAXSIM_BACKEND must be one of {', '.join(NAMES)}, got {name!r}")
