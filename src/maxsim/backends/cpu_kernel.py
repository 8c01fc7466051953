"""The AVX2 CPU kernel (``cpu_kernel.c``): MaxSim scores and argmax of float32, float16 and bfloat16
tokens (float32 arithmetic), for the torch backend.

The kernel is an optional compiled extension: where it was not built (no C compiler, not x86-64 Linux) or
the CPU lacks AVX2/FMA/F16C, ``available()`` is False and the torch backend keeps its matrix-product blocks.
``MAXSIM_CPU_KERNEL=0`` turns it off.
"""

from __future__ import annotations

import os

import torch

try:
    from maxsim.backends import _cpu_kernel
except ImportError:  # not built here
    _cpu_kernel = None

_SUPPORTED = _cpu_kernel is not None and _cpu_kernel.supported()
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # as cpu_kernel.c numbers them


def available() -> bool:
    """Whether the kernel is built, this CPU runs it and ``MAXSIM_CPU_KERNEL`` does not turn it off."""
    return _SUPPORTED and os.environ.get("MAXSIM_CPU_KERNEL", "1") != "0"


def status() -> str:
    """A line for ``maxsim info``: whether CPU calls take the kernel, and why not."""
    if _cpu_kernel is None:
        return "not built (no C compiler at install, or not x86-64 Linux): matrix products"
    if not _SUPPORTED:
        return "this CPU lacks AVX2/FMA/F16C: matrix products"
    if not available():
        return "off (MAXSIM_CPU_KERNEL=0): matrix products"
    return "on (float32, float16, bfloat16)"


def applies(q: torch.Tensor, d: torch.Tensor) -> bool:
    """Whether a call on ``q``, ``d`` can take the kernel: CPU tensors of one dtype it reads, ``d``'s
    tokens contiguous."""
    return (
        q.device.type == "cpu"
        and d.device.type == "cpu"
        and q.dtype in DTYPE_CODES
        and d.dtype == q.dtype
        and d.stride(-1) == 1
        and available()
    )


_NO_MASK = (0, (0, 0, 0))


def _mask(mask: torch.Tensor | None) -> tuple:
    """A bool ``[P, N, L]`` mask (or None) as the kernel takes it: its address and strides."""
    return _NO_MASK if mask is None else (mask.data_ptr(), mask.stride())


def _run(q, q_mask, d, d_view: tuple, d_mask, packed: tuple, *, documents: int, ld: int, normalize: bool,
         need_argmax: bool):
    """Scores ``[P, Qn, Dn]`` and int32 argmax ``[P, Qn, Dn, Lq]`` (or None) of ``q [P, Qn, Lq, D]`` (any
    strides) against the documents: ``d`` read through ``d_view`` (its strides as ``[P, Dn, Ld]``) and
    ``packed`` (``(0, 0)``, or int64 ``(starts [Dn], lengths [Dn])`` of packed documents)."""
    P, Qn, Lq, D = q.shape
    out = torch.empty(P, Qn, documents, dtype=torch.float32)
    argmax = torch.empty(P, Qn, documents, Lq, dtype=torch.int32) if need_argmax else None
    _cpu_kernel.score(
        (q.data_ptr(), q.stride()), _mask(q_mask), (d.data_ptr(), d_view), _mask(d_mask),
        tuple(0 if t is None else t.data_ptr() for t in packed), DTYPE_CODES[q.dtype], P, Qn, documents, Lq, ld,
        D, normalize,
        out.data_ptr(), 0 if argmax is None else argmax.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return out, argmax


def forward_padded(q, d, q_mask, d_mask, *, normalize: bool, need_argmax: bool):
    """``torch_backend.forward_padded`` for the kernel's dtypes (``applies``): scores ``[P, Qn, Dn]`` and int32 argmax
    ``[P, Qn, Dn, Lq]`` or None of ``q [P, Qn, Lq, D]`` against ``d [P, Dn, Ld, D]``, masks bool
    ``[P, Qn, Lq]`` / ``[P, Dn, Ld]`` or None; both are read in place, whatever their strides."""
    return _run(
        q, q_mask, d, d.stride()[:3], d_mask, (None, None),
        documents=d.shape[1], ld=d.shape[2], normalize=normalize, need_argmax=need_argmax,
    )  # fmt: skip


def forward_varlen_all_pairs(q_padded, q_mask, d, cu_d, *, max_ld: int, normalize: bool, need_argmax: bool):
    """Scores ``[Nq, Nd]`` and int32 argmax ``[Nq, Nd, Lq]`` or None of padded queries
    ``q_padded [Nq, Lq, D]`` (bool ``q_mask [Nq, Lq]``) against packed documents ``d [Td, D]`` cut by
    ``cu_d [Nd+1]`` (``applies``)."""
    starts = cu_d.to(torch.int64)
    scores, argmax = _run(
        q_padded[None], q_mask[None], d, (0, 0, d.stride(0)), None,
        ((starts[:-1] * d.stride(0)).contiguous(), (starts[1:] - starts[:-1]).contiguous()),
        documents=starts.shape[0] - 1, ld=max_ld, normalize=normalize, need_argmax=need_argmax,
    )  # fmt: skip
    return scores[0], None if argmax is None else argmax[0]
