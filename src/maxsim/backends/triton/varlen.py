"""Varlen forward kernels: packed ``q [Tq, D]`` / ``d [Td, D]`` with ``cu_seqlens``, all or listed pairs.

A program scores one block of ``BLOCK_Q`` tokens of one query (all pairs of short queries: ``QPACK`` whole
queries, as in ``forward.py``) against one document (or one split of its tokens) of a pair (all pairs:
``DOCS`` consecutive documents, the query tile loaded once); it reads only the real tokens of both (the tile loop stops at the document's own
length). The tile loop, the tie and NaN rules and the deterministic combination of splits are those of
``forward.py``. Documents may be quantized (``D_SCALED``): int8 or float8 e4m3 codes with a float32 scale
per token, widened to the query's 16-bit dtype in registers (nothing dequantized into memory). Queries may be
quantized too (``Q_SCALED``: codes of the documents' dtype with a scale per token), and then the tiles are
multiplied on the int8 / float8 tensor cores as they are.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import validate as check
from .configs import FwdConfig, device_info, forward_config
from .forward import (
    INTERPRETED,
    _doc_best,
    _load_query,
    _write_best,
    blocks,
    cdiv,
    dot_precision,
    finish,
    launch_device,
    pack_queries,
    partial_outputs,
    plan_split,
)
from .launch import Launcher


@triton.jit
def _maxsim_varlen_kernel(
    q_ptr, qs_ptr, d_ptr, ds_ptr, cu_q_ptr, cu_d_ptr, qid_ptr, did_ptr, score_ptr, argmax_ptr, pmax_ptr, pidx_ptr,
    Nd, D, R, MAX_LQ, sq_l, sq_k, sd_l, sd_k, n_qb, n_split, split_len,
    BLOCK_Q: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, LISTED: tl.constexpr,
    NORMALIZE: tl.constexpr, ARGMAX: tl.constexpr, PARTIAL: tl.constexpr, SINGLE_D: tl.constexpr,
    PREC: tl.constexpr, LANE_MAX: tl.constexpr, D_SCALED: tl.constexpr, Q_SCALED: tl.constexpr,
    QPACK: tl.constexpr, DOCS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    qb = pid % n_qb
    rest = pid // n_qb
    split = rest % n_split
    pair = rest // n_split  # all pairs: query (group) * document blocks + block of DOCS documents
    SLOTS: tl.constexpr = BLOCK_Q // QPACK
    r = tl.arange(0, BLOCK_Q)
    if LISTED:  # DOCS == 1
        qi = tl.load(qid_ptr + pair).to(tl.int64)
        first_doc = tl.load(did_ptr + pair).to(tl.int64)
    else:
        n_doc_blocks = (Nd + DOCS - 1) // DOCS
        qi = (pair // n_doc_blocks).to(tl.int64) * QPACK
        first_doc = (pair % n_doc_blocks).to(tl.int64) * DOCS
    query_ok = None
    if QPACK > 1:  # all pairs only: row r holds token r % SLOTS of query qi + r // SLOTS
        qi = qi + r // SLOTS
        query_ok = qi < R // Nd
        q_start = tl.load(cu_q_ptr + qi, mask=query_ok, other=0).to(tl.int64)
        lq = (tl.load(cu_q_ptr + qi + 1, mask=query_ok, other=0).to(tl.int64) - q_start).to(tl.int32)
    else:
        q_start = tl.load(cu_q_ptr + qi).to(tl.int64)
        lq = (tl.load(cu_q_ptr + qi + 1).to(tl.int64) - q_start).to(tl.int32)
    offs_q = qb * SLOTS + r % SLOTS
    q_in = offs_q < lq
    q_rows = q_ptr + (q_start + offs_q.to(tl.int64))[:, None] * sq_l
    q_tile, q_inv = _load_query(q_rows, q_in, D, sq_k, BLOCK_Q, BLOCK_D, NORMALIZE, SINGLE_D)
    if Q_SCALED and not NORMALIZE:  # the rows' scales (with NORMALIZE they cancel: the codes' norms serve)
        q_inv = tl.load(qs_ptr + q_start + offs_q.to(tl.int64), mask=q_in, other=1.0)

    for j in range(DOCS):  # the query tile stays in registers for DOCS documents
        di = first_doc + j
        if di < Nd:
            d_start = tl.load(cu_d_ptr + di).to(tl.int64)
            ld = (tl.load(cu_d_ptr + di + 1).to(tl.int64) - d_start).to(tl.int32)
            l_lo = split * split_len
            l_hi = tl.minimum(l_lo + split_len, ld)
            if QPACK == 1:
                l_hi = tl.where(qb * BLOCK_Q < lq, l_hi, l_lo)  # a query block past the query reads nothing
            best, best_idx = _doc_best(
                q_tile, q_rows, q_in, q_inv, d_ptr + d_start * sd_l, d_ptr, ds_ptr + d_start, l_lo, l_hi, D,
                sq_k, sd_l, sd_k, 0, BLOCK_Q, BLOCK_L, BLOCK_D, False, NORMALIZE, ARGMAX, SINGLE_D, PREC,
                LANE_MAX, D_SCALED, Q_SCALED,
            )  # fmt: skip
            if LISTED:
                row = pair.to(tl.int64)
            else:
                row = qi * Nd + di
            _write_best(
                best, best_idx, q_in, offs_q, row, split, R, score_ptr, argmax_ptr, pmax_ptr, pidx_ptr,
                qb, MAX_LQ, ARGMAX, PARTIAL, QPACK, query_ok,
            )  # fmt: skip


_VARLEN = Launcher(_maxsim_varlen_kernel, INTERPRETED.value)


def maxsim_varlen_fwd(
    q: torch.Tensor,
    cu_q: torch.Tensor,
    d: torch.Tensor,
    cu_d: torch.Tensor,
    q_ids: torch.Tensor | None,
    d_ids: torch.Tensor | None,
    *,
    max_lq: int,
    max_ld: int,
    normalize: bool,
    return_argmax: bool,
    config: FwdConfig | None = None,
    n_split: int | None = None,
    d_scales: torch.Tensor | None = None,
    q_scales: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the varlen forward.

    Args:
        q: ``[Tq, D]`` packed query tokens (any strides); ``cu_q`` int32/int64 ``[Nq+1]``.
        d: ``[Td, D]`` packed document tokens (any strides), ``q``'s dtype, or int8 / float8_e4m3fn codes
            with ``d_scales`` (then ``q`` is float16/bfloat16); ``cu_d`` int32/int64 ``[Nd+1]``.
        q_ids, d_ids: int64 ``[P]`` listed pairs, or both None for all pairs.
        max_lq, max_ld: Python ints >= the longest query / document.
        normalize, return_argmax: as ``maxsim_fwd``.
        config, n_split: launch overrides (tests, autotuning).
        d_scales: float32 ``[Td]``, token ``t`` being ``d[t] * d_scales[t]``; only with quantized ``d``.
        q_scales: float32 ``[Tq]`` with ``q`` codes of ``d``'s dtype (query token ``t`` is
            ``q[t] * q_scales[t]``): the dots run on the int8 / float8 tensor cores.

    Returns:
        scores float32 ``[Nq, Nd]`` or ``[P]``; int32 argmax ``[..., max_lq]`` (-1 past a query) or None.
    """
    check.check_scaled_tokens(q, d, d_scales, q_scales=q_scales)
    D = q.shape[1]
    nq, nd = cu_q.shape[0] - 1, cu_d.shape[0] - 1
    listed = q_ids is not None
    shape = (q_ids.shape[0],) if listed else (nq, nd)
    scores = torch.empty(shape, dtype=torch.float32, device=q.device)
    argmax = torch.empty(*shape, max_lq, dtype=torch.int32, device=q.device) if return_argmax else None
    R = scores.numel()
    if R == 0:
        return scores, argmax
    queries = 1 if listed else nq
    cfg = config or forward_config(q.device, max_lq, D, q.dtype, queries=queries)
    block_q, block_l, block_d = blocks(cfg, max_lq, max_ld, D)
    qpack, block_q = pack_queries(cfg, block_q, max_lq, queries)
    if q_scales is not None:  # the int8 / float8 tensor cores multiply 32 columns at a time
        block_d = max(block_d, 32)
    n_qb = cdiv(max_lq, block_q // qpack)
    docs = 1 if listed else cfg.docs
    programs = R * n_qb if listed else cdiv(nq, qpack) * cdiv(nd, docs) * n_qb
    n_split, split_len = plan_split(programs, max_ld, block_l, cfg, device_info(q.device)[1], forced=n_split)
    partial = n_split > 1
    score_out, pmax, pidx = partial_outputs(scores, argmax, R, max_lq, n_split, n_qb)
    with launch_device(q.device):
        _VARLEN(
            programs * n_split,
            (
                q, q if q_scales is None else q_scales.contiguous(), d,
                d if d_scales is None else d_scales.contiguous(), cu_q, cu_d,
                q_ids if listed else cu_q, d_ids if listed else cu_d, score_out,
                scores if argmax is None else argmax, scores if pmax is None else pmax,
                scores if pidx is None else pidx,
            ),
            (nd, D, R, max_lq, *q.stride(), *d.stride(), n_qb, n_split, split_len),
            dict(
                BLOCK_Q=block_q, BLOCK_L=block_l, BLOCK_D=block_d, LISTED=listed, NORMALIZE=normalize,
                ARGMAX=return_argmax, PARTIAL=partial, SINGLE_D=D <= block_d, PREC=dot_precision(q.dtype),
                LANE_MAX=cfg.lane_max, D_SCALED=d_scales is not None,
                Q_SCALED=q_scales is not None, QPACK=qpack, DOCS=docs,
            ),
            cfg.num_warps,
            cfg.num_stages,
        )  # fmt: skip
        finish(score_out, pmax, pidx, scores, argmax, R, max_lq, n_split)
    return scores, argmax
