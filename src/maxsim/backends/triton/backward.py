"""Backward kernels: ``dq`` and ``dd`` from the forward's int32 argmax, padded groups or all pairs of packed
(varlen) sequences (``VARLEN``: rows found through ``cu_seqlens``, the argmax padded to the longest).

With ``w = grad_scores[p, qi, n]`` and ``a = argmax[p, qi, n, i]`` (-1: the token takes no part):

- ``dq[p, qi, i] = Σ_n w · d[p, n, a]``: a gather. A program owns ``BLOCK_I`` query tokens and ``BLOCK_D``
  columns and walks the documents ``BLOCK_N`` at a time, in order.
- ``dd[p, n, j] = Σ_qi w · Σ_{i: a = j} q[p, qi, i]``: a scatter, written as a gather so that no two
  programs touch one row. The argmax is first inverted by a deterministic counting sort
  (``_entries_by_token``: for every document token, the query tokens that won it, in order); then a
  program owns ``BLOCK_R`` document tokens and sums their entries' weighted query rows, ``BLOCK_T`` at a
  time. The work is proportional to the entries (``P·Qn·Dn·Lq`` rows of ``D``), not to ``Lq·Ld``.

Each output element is summed in one fixed order by one program: the gradients are bitwise deterministic
(no atomics). A document token won by many query tokens makes its program walk them all, in order. With ``normalize`` the kernels return the gradient with respect to the normalized tokens in
float32 (gathered rows scaled by their inverse norms), and ``torch_backend.normalize_backward`` maps it
back through ``F.normalize``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..torch_backend import inverse_norms, normalize_backward
from .configs import device_info
from .forward import INTERPRETED, _next_pow2, _pow2_at_least, cdiv, launch_device
from .launch import Launcher

# Blocks (H100, bfloat16, D = 128; scripts/profile_train.py). The summed axis (BLOCK_N / BLOCK_T) is kept in
# per-lane accumulators and reduced once at the end, not every step.
DQ_BLOCKS = (2, 16, 128, 2)  # BLOCK_N documents, BLOCK_I query tokens, BLOCK_D columns (at most), warps
DQ_BLOCKS_FEW_ROWS = (8, 4, 128, 2)  # the same where DQ_BLOCKS gives under DQ_MIN_PROGRAMS programs per SM
DQ_MIN_PROGRAMS = 4
DD_BLOCKS = (1, 8, 128, 1)  # BLOCK_R document tokens, BLOCK_T entries per step, BLOCK_D columns (at most), warps
MAX_CHUNK = 1024  # entries per chunk of the counting sort (sorted in registers)
SORT_WARPS = (4, 4)  # warps of the counting sort's two kernels (counts, places)


@triton.jit
def _weighted_rows(
    x_ptr, inv_ptr, cu_ptr, p, owner, tok, weight, take, offs_k, k_in, n_owners, L, s_p, s_o, s_l, s_k,
    NORMALIZE: tl.constexpr, VARLEN: tl.constexpr,
):  # fmt: skip
    """``weight * x[row]`` (float32, ``[A, B, BLOCK_D]``) for a 2-D block of entries, each naming token ``tok``
    of sequence ``owner`` of group ``p`` (int64, broadcast to ``[A, B]``; entries where ``take`` is False give
    zeros). Padded: the row of ``x [P, n_owners, L, D]`` through its strides; VARLEN: row ``cu[owner] + tok``
    of packed ``x``. With NORMALIZE the weight is scaled by the row's inverse norm (``inv_ptr``)."""
    if VARLEN:
        row = tl.load(cu_ptr + owner, mask=take, other=0).to(tl.int64) + tok
        off = row * s_l
    else:
        row = (p * n_owners + owner) * L + tok
        off = p * s_p + owner * s_o + tok * s_l
    if NORMALIZE:
        weight *= tl.load(inv_ptr + row, mask=take, other=0.0)
    rows = tl.load(
        x_ptr + off[:, :, None] + (offs_k * s_k)[None, None, :], mask=take[:, :, None] & k_in[None, None, :], other=0.0
    )
    return weight[:, :, None] * rows.to(tl.float32)


@triton.jit
def _dq_kernel(
    d_ptr, am_ptr, g_ptr, dinv_ptr, dq_ptr, cu_q_ptr, cu_d_ptr,
    Qn, Dn, Lq, Ld, D, sd_p, sd_n, sd_l, sd_k, sg_p, sg_q, sg_n, n_ib,
    BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr, NORMALIZE: tl.constexpr,
    VARLEN: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    ib = pid % n_ib
    pq = (pid // n_ib).to(tl.int64)  # p * Qn + qi
    p = pq // Qn
    offs_i = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_k = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    i_in = offs_i < Lq
    k_in = offs_k < D
    acc = tl.zeros([BLOCK_N, BLOCK_I, BLOCK_D], tl.float32)  # per document lane: summed once, at the end
    for n0 in range(0, Dn, BLOCK_N):
        nn = n0 + tl.arange(0, BLOCK_N)
        n_in = nn < Dn
        row = pq * Dn + nn  # [BLOCK_N] rows of argmax
        w = tl.load(g_ptr + p * sg_p + (pq - p * Qn) * sg_q + nn * sg_n, mask=n_in, other=0.0)
        won = tl.load(
            am_ptr + row[:, None] * Lq + offs_i[None, :], mask=n_in[:, None] & i_in[None, :], other=-1
        )
        real = won >= 0
        weight = tl.where(real, w[:, None], 0.0)
        acc += _weighted_rows(
            d_ptr, dinv_ptr, cu_d_ptr, p, nn.to(tl.int64)[:, None], won.to(tl.int64), weight, real, offs_k,
            k_in, Dn, Ld, sd_p, sd_n, sd_l, sd_k, NORMALIZE, VARLEN,
        )  # fmt: skip
    if VARLEN:  # packed queries: row cu_q[qi] + i, for the query's own tokens only
        q_start = tl.load(cu_q_ptr + pq).to(tl.int64)
        out_rows = q_start + offs_i
        i_in = offs_i < tl.load(cu_q_ptr + pq + 1).to(tl.int64) - q_start
    else:
        out_rows = pq * Lq + offs_i
    out = dq_ptr + out_rows[:, None] * D + offs_k[None, :]
    tl.store(out, tl.sum(acc, 0).to(dq_ptr.dtype.element_ty), mask=i_in[:, None] & k_in[None, :])


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _sorted_chunk(am_ptr, pn, c, Qn, Dn, Lq, Ld, BLOCK_U: tl.constexpr, SHIFT: tl.constexpr):
    """Chunk ``c`` (``BLOCK_U`` consecutive ``u = qi * Lq + i``) of the entries of document ``pn = p * Dn + n``,
    sorted by (token won, ``u``). Returns per sorted entry: the token won (``Ld`` for none), ``u``, its rank
    among the chunk's entries that won the same token, and whether it won a token."""
    p = pn // Dn
    n = pn % Dn
    offs = tl.arange(0, BLOCK_U)
    u = c * BLOCK_U + offs
    u_in = u < Qn * Lq
    qi = u // Lq
    won = tl.load(am_ptr + ((p * Qn + qi) * Dn + n) * Lq + (u - qi * Lq), mask=u_in, other=-1)
    key = tl.sort(tl.where(won >= 0, won, Ld) * BLOCK_U + offs)  # unique keys: the sort is stable
    won = key >> SHIFT
    prev = tl.gather(won, tl.maximum(offs - 1, 0), 0)
    first = tl.associative_scan(tl.where((offs == 0) | (won != prev), offs, 0), 0, _max_combine)
    return won, c * BLOCK_U + (key & (BLOCK_U - 1)), offs - first, won < Ld


@triton.jit
def _dd_count_kernel(
    am_ptr, counts_ptr, Qn, Dn, Lq, Ld, n_chunks, BLOCK_U: tl.constexpr, BINS: tl.constexpr
):  # fmt: skip
    """``counts[pn, c, j]`` (``j < Ld``): how many entries of chunk ``c`` of document ``pn`` won its token ``j``."""
    pn = (tl.program_id(0) // n_chunks).to(tl.int64)
    c = tl.program_id(0) % n_chunks
    p = pn // Dn
    n = pn % Dn
    u = c * BLOCK_U + tl.arange(0, BLOCK_U)
    qi = u // Lq
    won = tl.load(am_ptr + ((p * Qn + qi) * Dn + n) * Lq + (u - qi * Lq), mask=u < Qn * Lq, other=-1)
    j = tl.arange(0, BINS)
    hist = tl.histogram(tl.maximum(won, 0), BINS)  # entries that won no token (-1) counted in bin 0, then taken out
    hist -= tl.where(j == 0, tl.sum((won < 0).to(tl.int32), 0), 0)
    tl.store(counts_ptr + (pn * n_chunks + c) * Ld + j, hist.to(counts_ptr.dtype.element_ty), mask=j < Ld)


@triton.jit
def _dd_place_kernel(
    am_ptr, counts_ptr, rows_ptr, order_ptr, Qn, Dn, Lq, Ld, n_chunks, R,
    BLOCK_U: tl.constexpr, SHIFT: tl.constexpr, BINS: tl.constexpr,
):  # fmt: skip
    """Each entry's place: ``order[pn * Qn * Lq + start_j + before + rank] = u``, where ``start_j`` counts the
    document's entries that won an earlier token, ``before`` those of earlier chunks that won ``j``, ``rank``
    those of this chunk before it. Chunk 0 also writes each token's ``start`` (``rows[0, pn * Ld + j]``,
    absolute) and entry count (``rows[1, pn * Ld + j]``)."""
    pn = (tl.program_id(0) // n_chunks).to(tl.int64)
    c = tl.program_id(0) % n_chunks
    j = tl.arange(0, BINS)
    j_in = j < Ld
    total = tl.zeros([BINS], tl.int32)
    before = tl.zeros([BINS], tl.int32)
    for c2 in range(0, n_chunks):
        k = tl.load(counts_ptr + (pn * n_chunks + c2) * Ld + j, mask=j_in, other=0).to(tl.int32)
        total += k
        before += tl.where(c2 < c, k, 0)
    start = tl.cumsum(total, 0) - total
    base = pn * Qn * Lq
    if c == 0:
        tl.store(rows_ptr + pn * Ld + j, base + start, mask=j_in)
        tl.store(rows_ptr + R + pn * Ld + j, total, mask=j_in)
    won, u, rank, real = _sorted_chunk(am_ptr, pn, c, Qn, Dn, Lq, Ld, BLOCK_U, SHIFT)
    pos = base + tl.gather(start + before, tl.where(real, won, 0), 0) + rank
    tl.store(order_ptr + pos, u, mask=real)


@triton.jit
def _dd_gather_kernel(
    q_ptr, order_ptr, rows_ptr, g_ptr, qinv_ptr, dd_ptr, cu_q_ptr, cu_d_ptr,
    Qn, Dn, Lq, Ld, D, R, sq_p, sq_n, sq_l, sq_k, sg_p, sg_q, sg_n,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, NORMALIZE: tl.constexpr,
    VARLEN: tl.constexpr,
):  # fmt: skip
    """``dd[r] = Σ_k w · q[u_k]`` over the entries of row ``r = pn * Ld + j`` in ``order``, ``BLOCK_T`` at a time,
    in order (``w = grad_scores[p, qi, n]``, times the query token's inverse norm with NORMALIZE). VARLEN:
    ``q``/``d``/``dd`` are packed by ``cu_q``/``cu_d`` (one group), the argmax padded to ``Lq``/``Ld``."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_in = rows < R
    rows = rows.to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    k_in = offs_k < D
    start = tl.load(rows_ptr + rows, mask=r_in, other=0).to(tl.int64)
    count = tl.load(rows_ptr + R + rows, mask=r_in, other=0)
    pn = rows // Ld
    p = pn // Dn
    n = pn - p * Dn
    acc = tl.zeros([BLOCK_R, BLOCK_T, BLOCK_D], tl.float32)  # per entry lane: summed once, at the end
    for t0 in range(0, tl.max(count, 0), BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        has = t[None, :] < count[:, None]  # [BLOCK_R, BLOCK_T]
        u = tl.load(order_ptr + start[:, None] + t[None, :], mask=has, other=0).to(tl.int64)
        qi = u // Lq
        i = u - qi * Lq
        w = tl.load(g_ptr + p[:, None] * sg_p + qi * sg_q + n[:, None] * sg_n, mask=has, other=0.0)
        acc += _weighted_rows(
            q_ptr, qinv_ptr, cu_q_ptr, p[:, None], qi, i, w, has, offs_k, k_in, Qn, Lq, sq_p, sq_n, sq_l, sq_k,
            NORMALIZE, VARLEN,
        )  # fmt: skip
    if VARLEN:  # packed documents: token j of document pn is row cu_d[pn] + j, for its own tokens only
        d_start = tl.load(cu_d_ptr + pn, mask=r_in, other=0).to(tl.int64)
        j = rows - pn * Ld
        r_in = r_in & (j < tl.load(cu_d_ptr + pn + 1, mask=r_in, other=0).to(tl.int64) - d_start)
        rows = d_start + j
    out = dd_ptr + rows[:, None] * D + offs_k[None, :]
    tl.store(out, tl.sum(acc, 1).to(dd_ptr.dtype.element_ty), mask=r_in[:, None] & k_in[None, :])


_DQ = Launcher(_dq_kernel, INTERPRETED.value)
_DD_COUNT = Launcher(_dd_count_kernel, INTERPRETED.value)
_DD_PLACE = Launcher(_dd_place_kernel, INTERPRETED.value)
_DD_GATHER = Launcher(_dd_gather_kernel, INTERPRETED.value)


def _entries_by_token(argmax: torch.Tensor, Qn: int, Dn: int, Lq: int, Ld: int):
    """The argmax inverted, per document token: ``(order, rows)`` such that the query tokens that won token
    ``j`` of document ``pn = p * Dn + n`` are ``u = qi * Lq + i`` for ``u`` in
    ``order[rows[0, r] : rows[0, r] + rows[1, r]]``, ascending (``r = pn * Ld + j``).

    A deterministic counting sort in two kernels over chunks of ``BLOCK_U`` entries per document: per-chunk
    histograms, then each entry's place (the chunk sorted in registers gives ranks). Memory: ``order`` (one
    int32 per entry), the int16 counts ``[P * Dn, chunks, Ld]`` and ``rows``.
    """
    P = argmax.shape[0]
    docs, per_doc = P * Dn, Qn * Lq
    block_u = min(MAX_CHUNK, _pow2_at_least(per_doc))
    if (Ld + 1) * block_u >= 2**31:
        raise ValueError(f"d: documents of {Ld} tokens are too long for the Triton backward")
    if argmax.numel() >= 2**31:
        raise ValueError(f"argmax: {argmax.numel()} entries are too many for the Triton backward")
    n_chunks = cdiv(per_doc, block_u)
    device = argmax.device
    order = torch.empty(argmax.numel(), dtype=torch.int32, device=device)
    if n_chunks == 0:  # no query tokens: no entries
        return order, torch.zeros(2, docs * Ld, dtype=torch.int32, device=device)
    rows = torch.empty(2, docs * Ld, dtype=torch.int32, device=device)  # chunk 0 of each document fills it
    counts = torch.empty(docs, n_chunks, Ld, dtype=torch.int16, device=device)
    bins = _next_pow2(Ld)
    sizes = (Qn, Dn, Lq, Ld, n_chunks)
    _DD_COUNT(docs * n_chunks, (argmax, counts), sizes, dict(BLOCK_U=block_u, BINS=bins), SORT_WARPS[0], 2)
    _DD_PLACE(
        docs * n_chunks,
        (argmax, counts, rows, order),
        (*sizes, docs * Ld),
        dict(BLOCK_U=block_u, SHIFT=block_u.bit_length() - 1, BINS=bins),
        SORT_WARPS[1],
        2,
    )
    return order, rows


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
    return _backward(
        q, d, argmax, grad_scores, d.shape[2], q.stride(), d.stride(), None, None,
        normalize=normalize, need_dq=need_dq, need_dd=need_dd,
    )  # fmt: skip


def maxsim_varlen_bwd(
    q: torch.Tensor,
    cu_q: torch.Tensor,
    d: torch.Tensor,
    cu_d: torch.Tensor,
    argmax: torch.Tensor,
    grad_scores: torch.Tensor,
    *,
    max_ld: int,
    normalize: bool,
    need_dq: bool,
    need_dd: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of the varlen forward over all pairs from its argmax, deterministic.

    Args:
        q: ``[Tq, D]`` packed by ``cu_q`` ``[Nq+1]``; d: ``[Td, D]`` packed by ``cu_d`` ``[Nd+1]`` (any strides).
        argmax: int32 ``[Nq, Nd, max_lq]`` (-1 past a query); grad_scores: ``[Nq, Nd]``.
        max_ld: the longest document; normalize, need_dq, need_dd: as ``maxsim_bwd``.

    Returns:
        ``(dq, dd)`` contiguous, shaped like ``q`` and ``d`` in their dtype (None where not needed).
    """
    return _backward(
        q, d, argmax[None], grad_scores[None], max_ld, (0, 0, *q.stride()), (0, 0, *d.stride()), cu_q, cu_d,
        normalize=normalize, need_dq=need_dq, need_dd=need_dd,
    )  # fmt: skip


def _backward(q, d, argmax, grad_scores, Ld, q_strides, d_strides, cu_q, cu_d, *, normalize, need_dq, need_dd):
    """Launch the kernels: padded ``q``/``d`` (``cu_q`` None) or packed by ``cu_q``/``cu_d`` (one group), with
    ``argmax`` ``[P, Qn, Dn, Lq]``, ``grad_scores`` ``[P, Qn, Dn]`` and ``q``/``d`` strides as four dims."""
    P, Qn, Dn, Lq = argmax.shape
    D = q.shape[-1]
    varlen = cu_q is not None
    argmax = argmax.contiguous()
    grad_scores = grad_scores.to(torch.float32)  # read through its strides: often an expanded scalar
    out_dtype = torch.float32 if normalize else q.dtype
    # packed gradients are written token by token of each sequence: rows outside every sequence stay zero
    alloc = torch.zeros if varlen else torch.empty
    cu = (cu_q, cu_d) if varlen else (grad_scores, grad_scores)
    dq = dd = None
    with launch_device(q.device):
        if need_dq:
            dq = alloc(q.shape, dtype=out_dtype, device=q.device)
            _, sms = device_info(q.device)
            few = P * Qn * cdiv(Lq, DQ_BLOCKS[1]) < DQ_MIN_PROGRAMS * sms
            block_n, block_i, block_d, dq_warps = DQ_BLOCKS_FEW_ROWS if few else DQ_BLOCKS
            block_i, block_d = min(block_i, _pow2_at_least(Lq)), min(block_d, _pow2_at_least(D))
            n_ib = cdiv(Lq, block_i)
            d_inv = inverse_norms(d) if normalize else grad_scores
            if dq.numel():
                _DQ(
                    (P * Qn * n_ib, cdiv(D, block_d)),
                    (d, argmax, grad_scores, d_inv, dq, *cu),
                    (Qn, Dn, Lq, Ld, D, *d_strides, *grad_scores.stride(), n_ib),
                    dict(BLOCK_N=block_n, BLOCK_I=block_i, BLOCK_D=block_d, NORMALIZE=normalize, VARLEN=varlen),
                    dq_warps,
                    2,
                )
            if normalize:
                dq = normalize_backward(q, dq).to(q.dtype)
        if need_dd:
            dd = alloc(d.shape, dtype=out_dtype, device=q.device)
            rows = P * Dn * Ld
            if dd.numel() and rows:
                q_inv = inverse_norms(q) if normalize else grad_scores
                order, token_rows = _entries_by_token(argmax, Qn, Dn, Lq, Ld)
                block_r, block_t, block_d, dd_warps = DD_BLOCKS
                block_d = min(block_d, _pow2_at_least(D))
                _DD_GATHER(
                    (cdiv(rows, block_r), cdiv(D, block_d)),
                    (q, order, token_rows, grad_scores, q_inv, dd, *cu),
                    (Qn, Dn, Lq, Ld, D, rows, *q_strides, *grad_scores.stride()),
                    dict(BLOCK_R=block_r, BLOCK_T=block_t, BLOCK_D=block_d, NORMALIZE=normalize, VARLEN=varlen),
                    dd_warps,
                    2,
                )
            if normalize:
                dd = normalize_backward(d, dd).to(d.dtype)
    return dq, dd
