"""The AVX2 CPU kernel (``cpu_kernel.c``): float32 MaxSim scores and argmax, for the torch backend.

The kernel is an optional compiled extension: where it was not built (no C compiler, not x86-64) or the
CPU lacks AVX2/FMA, ``available()`` is False and the torch backend keeps its matrix-product blocks.
``MAXSIM_CPU_KERNEL=0`` turns it off.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    from maxsim.backends import _cpu_kernel
except ImportError:  # not built here
    _cpu_kernel = None

LANES = 16  # query tokens per column group of the kernel
NORMALIZE_EPS = 1e-12
_SUPPORTED = _cpu_kernel is not None and _cpu_kernel.supported()


def available() -> bool:
    """Whether the kernel is built, this CPU runs it and ``MAXSIM_CPU_KERNEL`` does not turn it off."""
    return _SUPPORTED and os.environ.get("MAXSIM_CPU_KERNEL", "1") != "0"


def status() -> str:
    """A line for ``maxsim info``: whether float32 CPU calls take the kernel, and why not."""
    if _cpu_kernel is None:
        return "not built (no C compiler at install, or not x86-64): matrix products"
    if not _SUPPORTED:
        return "this CPU lacks AVX2/FMA: matrix products"
    if not available():
        return "off (MAXSIM_CPU_KERNEL=0): matrix products"
    return "on for float32"


def applies(q: torch.Tensor, d: torch.Tensor) -> bool:
    """Whether a call on ``q``, ``d`` can take the kernel: float32 CPU tensors, ``d``'s tokens contiguous."""
    return (
        q.device.type == "cpu"
        and d.device.type == "cpu"
        and q.dtype == torch.float32
        and d.dtype == torch.float32
        and d.stride(-1) == 1
        and available()
    )


def _query_columns(q: torch.Tensor, q_real: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [n, Lq, D]`` and its bool ``q_real [n, Lq]`` as the kernel reads them: columns
    ``[n, G, D, LANES]`` (lane = query token, padded with zeros) and uint8 ``[n, G * LANES]``."""
    n, Lq, D = q.shape
    groups = -(-Lq // LANES)
    if normalize:
        q = F.normalize(q, dim=-1, eps=NORMALIZE_EPS)
    padded = F.pad(q, (0, 0, 0, groups * LANES - Lq))
    columns = padded.view(n, groups, LANES, D).transpose(-1, -2).contiguous()
    real = F.pad(q_real.to(torch.uint8), (0, groups * LANES - Lq)).contiguous()
    return columns, real


def _run(
    q: torch.Tensor,
    q_real: torch.Tensor,
    d: torch.Tensor,
    d_start: torch.Tensor,
    d_len: torch.Tensor,
    d_token_stride: int,
    d_mask: tuple[torch.Tensor, torch.Tensor, int] | None,
    *,
    groups: int,
    documents: int,
    max_len: int,
    normalize: bool,
    need_argmax: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scores ``[P, Qn, Dn]`` and int32 argmax ``[P, Qn, Dn, Lq]`` (or None) of ``q [P * Qn, Lq, D]``
    against documents at element offsets ``d_start`` (int64 ``[P * Dn]``, from ``d``'s first element) of
    ``d_len`` tokens each."""
    columns, real = _query_columns(q, q_real, normalize)
    queries, Lq = q.shape[0] // groups, q.shape[1]
    out = torch.empty(groups, queries, documents, dtype=torch.float32)
    argmax = torch.empty(groups, queries, documents, Lq, dtype=torch.int32) if need_argmax else None
    mask, mask_start, mask_stride = (None, None, 0) if d_mask is None else d_mask
    _cpu_kernel.score(
        columns.data_ptr(), real.data_ptr(), groups, queries, columns.shape[1], q.shape[-1], documents,
        d.data_ptr(), d_start.data_ptr(), d_len.data_ptr(), d_token_stride,
        0 if mask is None else mask.data_ptr(), 0 if mask_start is None else mask_start.data_ptr(), mask_stride,
        max_len, normalize, Lq, out.data_ptr(), 0 if argmax is None else argmax.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return out, argmax


def _item_offsets(x: torch.Tensor) -> torch.Tensor:
    """Element offsets ``[P * N]`` (int64) of the rows of a ``[P, N, ...]`` view from its first element."""
    P, N = x.shape[0], x.shape[1]
    offsets = torch.arange(P, dtype=torch.int64)[:, None] * x.stride(0) + torch.arange(N) * x.stride(1)
    return offsets.reshape(-1)


def forward_padded(q, d, q_mask, d_mask, *, normalize: bool, need_argmax: bool):
    """``torch_backend.forward_padded`` for float32 (``applies``): scores ``[P, Qn, Dn]`` and int32 argmax
    ``[P, Qn, Dn, Lq]`` or None of ``q [P, Qn, Lq, D]`` against ``d [P, Dn, Ld, D]``, masks bool
    ``[P, Qn, Lq]`` / ``[P, Dn, Ld]`` or None; ``d`` is read in place, whatever its batch strides."""
    P, Qn, Lq, D = q.shape
    Dn, Ld = d.shape[1], d.shape[2]
    q_real = torch.ones(P * Qn, Lq, dtype=torch.bool) if q_mask is None else q_mask.reshape(P * Qn, Lq)
    mask = None
    if d_mask is not None:
        mask = (d_mask, _item_offsets(d_mask), d_mask.stride(2))
    return _run(
        q.reshape(P * Qn, Lq, D), q_real, d, _item_offsets(d), torch.full((P * Dn,), Ld, dtype=torch.int64),
        d.stride(2), mask, groups=P, documents=Dn, max_len=Ld, normalize=normalize, need_argmax=need_argmax,
    )  # fmt: skip


def forward_varlen_all_pairs(q_padded, q_mask, d, cu_d, *, max_ld: int, normalize: bool, need_argmax: bool):
    """Scores ``[Nq, Nd]`` and int32 argmax ``[Nq, Nd, Lq]`` or None of padded queries
    ``q_padded [Nq, Lq, D]`` (bool ``q_mask [Nq, Lq]``) against packed documents ``d [Td, D]`` cut by
    ``cu_d [Nd+1]`` (float32, ``applies``)."""
    starts = cu_d.to(torch.int64)
    scores, argmax = _run(
        q_padded, q_mask, d, starts[:-1] * d.stride(0), starts[1:] - starts[:-1], d.stride(0), None,
        groups=1, documents=starts.shape[0] - 1, max_len=max_ld, normalize=normalize, need_argmax=need_argmax,
    )  # fmt: skip
    return scores[0], None if argmax is None else argmax[0]
