"""Backends: each offers ``maxsim_padded`` and ``maxsim_varlen`` with one signature (see torch_backend).

``MAXSIM_BACKEND=torch|triton|reference`` forces one; otherwise the tensors' device decides.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

NAMES = ("torch", "triton", "reference")


_TRITON: dict[str, bool] = {}  # a plain cache: torch.compile traces through functools caches with a warning


def _triton_available() -> bool:
    if "ok" not in _TRITON:
        try:
            import triton  # noqa: F401

            _TRITON["ok"] = True
        except Exception:  # not installed, or broken: the torch backend serves
            _TRITON["ok"] = False
    return _TRITON["ok"]


def backend_name(device: torch.device) -> str:
    """The backend a device gets by default: Triton on CUDA/ROCm devices when triton is installed, else torch."""
    if device.type == "cuda" and _triton_available():
        return "triton"
    return "torch"


_MODULES: dict[str, ModuleType] = {}


def _module(name: str) -> ModuleType:
    if name == "torch":
        from . import torch_backend as module
    elif name == "reference":
        from . import reference_backend as module
    elif name == "triton":
        from . import triton as module
    else:
        raise ValueError(f"MAXSIM_BACKEND must be one of {', '.join(NAMES)}, got {name!r}")
    return module


def get_backend(device: torch.device) -> ModuleType:
    """The backend module for tensors on ``device``, honouring ``MAXSIM_BACKEND``."""
    name = os.environ.get("MAXSIM_BACKEND") or backend_name(device)
    module = _MODULES.get(name)
    if module is None:
        module = _MODULES[name] = _module(name)
    return module
