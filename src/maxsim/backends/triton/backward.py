"""Backward kernels of the padded family: ``dq`` and ``dd`` from the forward's int32 argmax.

With ``w = grad_scores[p, qi, n]`` and ``a = argmax[p, qi, n, i]`` (-1: the token takes no part):

- ``dq[p, qi, i] = Σ_n w · d[p, n, a]``: a gather. A program owns ``BLOCK_I`` query tokens and ``BLOCK_D``
  columns and walks the documents ``BLOCK_N`` at a time, in order.
- ``dd[p, n, j] = Σ_qi w · Σ_{i: a = j} q[p, qi, i]``: a scatter, written as a gather so that no two
  programs touch one row: a program owns ``BLOCK_J`` document tokens and, for every query in order, adds
  ``onehot(a == j) @ q`` (a ``tl.dot`` of the 0/1 matrix with the query tile, exact in float32
  accumulation); a query tile that no token of the block won is skipped.

Each output element is summed in one fixed order by one program: the gradients are bitwise deterministic
(no atomics). With ``normalize`` the kernels return the gradient with respect to the normalized tokens in
float32 (gathered rows scaled by their inverse norms), and ``torch_backend.normalize_backward`` maps it
back through ``F.normalize``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..torch_backend import NORMALIZE_EPS, normalize_backward
from .forward import INTERPRETED, _pow2_at_least, cdiv, launch_device
from .launch import Launcher

DQ_BLOCKS = (4, 16, 128)  # BLOCK_N documents, BLOCK_I query tokens, BLOCK_D columns (at most)
DD_BLOCKS = (64, 32, 128)  # BLOCK_J document tokens, BLOCK_I query tokens, BLOCK_D columns (at most)


@triton.jit
def _dq_kernel(
    d_ptr, am_ptr, g_ptr, dinv_ptr, dq_ptr,
    Qn, Dn, Lq, Ld, D, sd_p, sd_n, sd_l, sd_k, n_ib,
    BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr, NORMALIZE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    ib = pid % n_ib
    pq = (pid // n_ib).to(tl.int64)  # p * Qn + qi
    p = pq // Qn
    offs_i = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_k = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    i_in = offs_i < Lq
    k_in = offs_k < D
    acc = tl.zeros([BLOCK_I, BLOCK_D], tl.float32)
    for n0 in range(0, Dn, BLOCK_N):
        nn = n0 + tl.arange(0, BLOCK_N)
        n_in = nn < Dn
        row = pq * Dn + nn  # [BLOCK_N] rows of argmax / grad_scores
        w = tl.load(g_ptr + row, mask=n_in, other=0.0)
        won = tl.load(
            am_ptr + row[:, None] * Lq + offs_i[None, :], mask=n_in[:, None] & i_in[None, :], other=-1
        )
        real = won >= 0
        doc = p * Dn + nn
        weight = tl.where(real, w[:, None], 0.0)
        if NORMALIZE:
            weight *= tl.load(dinv_ptr + doc[:, None] * Ld + won, mask=real, other=0.0)
        rows = tl.load(
            d_ptr + p * sd_p + (nn.to(tl.int64) * sd_n)[:, None, None] + (won.to(tl.int64) * sd_l)[:, :, None]
            + (offs_k * sd_k)[None, None, :],
            mask=real[:, :, None] & k_in[None, None, :],
            other=0.0,
        )  # fmt: skip
        acc += tl.sum(weight[:, :, None] * rows.to(tl.float32), 0)
    out = dq_ptr + (pq * Lq + offs_i)[:, None] * D + offs_k[None, :]
    tl.store(out, acc.to(dq_ptr.dtype.element_ty), mask=i_in[:, None] & k_in[None, :])


@triton.jit
def _dd_kernel(
    q_ptr, am_ptr, g_ptr, qinv_ptr, dd_ptr,
    Qn, Dn, Lq, Ld, D, sq_p, sq_n, sq_l, sq_k, n_jb,
    BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr, NORMALIZE: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    jb = pid % n_jb
    pn = (pid // n_jb).to(tl.int64)  # p * Dn + n
    p = pn // Dn
    n = pn % Dn
    offs_j = jb * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_k = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    k_in = offs_k < D
    acc = tl.zeros([BLOCK_J, BLOCK_D], tl.float32)
    for qi in range(Qn):
        pq = p * Qn + qi  # int64, as p
        row = pq * Dn + n
        q_base = q_ptr + p * sq_p + (pq - p * Qn) * sq_n
        w = tl.load(g_ptr + row)
        for i0 in range(0, Lq, BLOCK_I):
            offs_i = i0 + tl.arange(0, BLOCK_I)
            i_in = offs_i < Lq
            won = tl.load(am_ptr + row * Lq + offs_i, mask=i_in, other=-1)
            hit = won[None, :] == offs_j[:, None]  # [BLOCK_J, BLOCK_I]
            if tl.max(hit.to(tl.int32)) > 0:
                q_tile = tl.load(
                    q_base + (offs_i.to(tl.int64) * sq_l)[:, None]
                    + (offs_k * sq_k)[None, :],
                    mask=i_in[:, None] & k_in[None, :],
                    other=0.0,
                )  # fmt: skip
                if NORMALIZE:
                    inv = tl.load(qinv_ptr + pq * Lq + offs_i, mask=i_in, other=0.0)
                    onehot = tl.where(hit, inv[None, :], 0.0)
                    part = tl.dot(onehot, q_tile.to(tl.float32), input_precision=PREC)
                else:
                    part = tl.dot(hit.to(q_tile.dtype), q_tile, input_precision=PREC)
                acc += w * part
    out = dd_ptr + (pn * Ld + offs_j)[:, None] * D + offs_k[None, :]
    tl.store(out, acc.to(dd_ptr.dtype.element_ty), mask=(offs_j < Ld)[:, None] & k_in[None, :])


_DQ = Launcher(_dq_kernel, INTERPRETED.value)
_DD = Launcher(_dd_kernel, INTERPRETED.value)


def _inverse_norms(x: torch.Tensor) -> torch.Tensor:
    """float32 ``1 / max(|x_row|, eps)`` over the last dim, contiguous."""
    norms = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)
    return norms.clamp_min_(NORMALIZE_EPS).reciprocal_().contiguous()


def _dot_precision(dtype: torch.dtype, normalize: bool) -> str:
    """The one-hot products are exact for 16-bit inputs; float32 ones (and normalized float32 weights)
    need IEEE (or three-pass TF32 for 16-bit inputs, exact well beyond their output precision)."""
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32x3" if normalize else "tf32"  # tf32 is ignored for 16-bit operands


def maxsim_bwd(
    q: torch.Tensor,
    d: torch.Tensor,
    argmax: torch.Tensor,
    grad_scores: torch.Tensor,
    *,
    normalize: bool,
    need_dq: bool,
    need_dd: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of the padded forward from its argmax, deterministic.

    Args:
        q: ``[P, Qn, Lq, D]``; d: ``[P, Dn, Ld, D]`` (any strides, float32/float16/bfloat16).
        argmax: int32 ``[P, Qn, Dn, Lq]`` (-1: no gradient); grad_scores: ``[P, Qn, Dn]``.
        normalize: the forward normalized the tokens.
        need_dq, need_dd: which gradients to compute.

    Returns:
        ``(dq, dd)`` contiguous, shaped like ``q`` and ``d`` in their dtype (None where not needed).
    """
    P, Qn, Lq, D = q.shape
    _, Dn, Ld, _ = d.shape
    argmax = argmax.contiguous()
    grad_scores = grad_scores.to(torch.float32).contiguous()
    out_dtype = torch.float32 if normalize else q.dtype
    dq = dd = None
    with launch_device(q.device):
        if need_dq:
            dq = torch.empty(P, Qn, Lq, D, dtype=out_dtype, device=q.device)
            block_n, block_i, block_d = DQ_BLOCKS
            block_i, block_d = min(block_i, _pow2_at_least(Lq)), min(block_d, _pow2_at_least(D))
            n_ib = cdiv(Lq, block_i)
            d_inv = _inverse_norms(d) if normalize else grad_scores
            if dq.numel():
                _DQ(
                    (P * Qn * n_ib, cdiv(D, block_d)),
                    (d, argmax, grad_scores, d_inv, dq),
                    (Qn, Dn, Lq, Ld, D, *d.stride(), n_ib),
                    dict(BLOCK_N=block_n, BLOCK_I=block_i, BLOCK_D=block_d, NORMALIZE=normalize),
                    4,
                    2,
                )
            if normalize:
                dq = normalize_backward(q, dq).to(q.dtype)
        if need_dd:
            dd = torch.empty(P, Dn, Ld, D, dtype=out_dtype, device=q.device)
            block_j, block_i, block_d = DD_BLOCKS
            block_j, block_i, block_d = (
                min(block_j, _pow2_at_least(Ld)),
                min(block_i, _pow2_at_least(Lq)),
                min(block_d, _pow2_at_least(D)),
            )
            n_jb = cdiv(Ld, block_j)
            q_inv = _inverse_norms(q) if normalize else grad_scores
            if dd.numel():
                _DD(
                    (P * Dn * n_jb, cdiv(D, block_d)),
                    (q, argmax, grad_scores, q_inv, dd),
                    (Qn, Dn, Lq, Ld, D, *q.stride(), n_jb),
                    dict(
                        BLOCK_J=block_j, BLOCK_I=block_i, BLOCK_D=block_d, NORMALIZE=normalize,
                        PREC=_dot_precision(q.dtype, normalize),
                    ),
                    4,
                    2,
                )  # fmt: skip
            if normalize:
                dd = normalize_backward(d, dd).to(d.dtype)
    return dq, dd
