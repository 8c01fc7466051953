"""Varlen forward kernels: packed ``q [Tq, D]`` / ``d [Td, D]`` with ``cu_seqlens``, all or listed pairs.

A program scores one block of ``BLOCK_Q`` tokens of one query (all pairs of short queries: ``QPACK`` whole
queries, as in ``forward.py``) against one document (or one split of its tokens) of a pair; it reads only
the real tokens of both (the tile loop stops at the document's own length). The tile loop, the tie and NaN
rules and the deterministic combination of splits are those of ``forward.py``. All pairs without argmax
take a run of ``DOCS`` consecutive documents per program instead, in one tile loop across them
(``_score_run_of_docs``). Documents may be quantized (``D_SCALED``): int8 or float8 e4m3 codes with a
float32 scale per token, widened to the query's 16-bit dtype in registers (nothing dequantized into
memory). Queries may be quantized too (``Q_SCALED``: codes of the documents' dtype with a scale per
token), and then the tiles are multiplied on the int8 / float8 tensor cores as they are.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import validate as check
from ...index import int8_scale_bits
from .configs import FwdConfig, device_info, forward_config
from .forward import (
    INTERPRETED,
    _doc_best,
    _int8_grid_unit,
    _load_query,
    _nanmax,
    _row_nanmax,
    _tile_scales,
    _tile_similarities,
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

ROW_GROUP = tl.constexpr(16)  # rows of one warp in a block of sm_80 / sm_90 tensor-core results


@triton.jit
def _score_run_of_docs(
    q_tile, q_rows, q_in, q_inv, first_query, first_doc, d_ptr, ds_ptr, cu_d_ptr, score_ptr, Nd, R, D, qb,
    sq_k, sd_l, sd_k, scale_bits,
    BLOCK_Q: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, NORMALIZE: tl.constexpr,
    SINGLE_D: tl.constexpr, PREC: tl.constexpr, D_SCALED: tl.constexpr, Q_SCALED: tl.constexpr,
    QPACK: tl.constexpr, DOCS: tl.constexpr,
):  # fmt: skip
    """Score the ``QPACK`` queries of the rows against documents ``first_doc .. first_doc + DOCS - 1`` in
    one tile loop over all their tiles (the software pipeline runs on from one document into the next).

    Each tile's place (first token, tokens left in its document, the document's lane) is stepped from the
    last one's, a tile ahead (one warp reduction finds the next document's length); each tile's row maxima
    merge into a running maximum, written out (summed per query) and reset on a document's last
    tile. A query's rows sit in one warp (``GROUP`` rows each turn), so its sum is a reduction inside that
    warp. With several queries in the rows the sums are taken on that tile only
    (float16, 32 queries of issue 6: 12.73 ms against 13.11), with one on every tile (issue 6's e4m3 search of
    one query: 1.05 ms against 1.13, H100, 2026-12-06). Every document has a token
    (``cu_seqlens`` are validated so): one without would not be written. No argmax, no split.

    int8 codes by int8 codes (Q_SCALED, not NORMALIZE): a tile's maxima are taken on integers. Its scales are
    ``m * unit`` (``index.int8_scales``: ``unit`` that of the tile's largest scale, ``scale_bits`` its ``b``),
    so each int32 dot times its ``m`` stays an int32 and orders as the scaled similarity; each row's maximum
    is then converted and times ``unit``: a multiply and a maximum per similarity.
    """
    SLOTS: tl.constexpr = BLOCK_Q // QPACK
    GROUP: tl.constexpr = min(SLOTS, ROW_GROUP)
    lane = tl.arange(0, DOCS)
    doc = first_doc + lane
    doc_ok = doc < Nd
    starts = tl.load(cu_d_ptr + doc, mask=doc_ok, other=0).to(tl.int64)
    lens = (tl.load(cu_d_ptr + doc + 1, mask=doc_ok, other=0).to(tl.int64) - starts).to(tl.int32)
    tiles = (lens + BLOCK_L - 1) // BLOCK_L

    query = first_query + tl.arange(0, QPACK)
    query_ok = query < R // Nd
    out = score_ptr + qb.to(tl.int64) * R + query * Nd + first_doc  # [QPACK] rows, at the run's first doc
    no_sums = tl.zeros([QPACK], tl.float32)

    offs_l = tl.arange(0, BLOCK_L)
    every = offs_l >= 0
    col_offs = offs_l * sd_l  # a tile's token rows from its first (int32: the launcher sees them fit)
    best = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    # a tile: its first token, the tokens left in its document from there, its document's lane
    next_tok0 = tl.load(cu_d_ptr + first_doc).to(tl.int64)
    next_left = tl.sum(tl.where(lane == 0, lens, 0), 0)
    next_j = 0
    next_scale = _tile_scales(ds_ptr + next_tok0 + tl.minimum(offs_l, next_left - 1), every, BLOCK_L, D_SCALED)
    for _ in range(0, tl.sum(tiles, 0)):
        tok0, left, j, d_scale = next_tok0, next_left, next_j, next_scale  # scales loaded a tile ahead
        # the next tile: the document's next BLOCK_L tokens, or the next document's first (none past the run)
        goes_on = left > BLOCK_L
        following = tl.sum(tl.where(lane == j + 1, lens, 0), 0)
        next_tok0 = tl.where(goes_on, tok0 + BLOCK_L, tok0 + left)
        next_left = tl.where(goes_on, left - BLOCK_L, following)
        next_j = tl.where(goes_on, j, j + 1)
        next_cols = tl.minimum(offs_l, next_left - 1)  # (past the run's last tile nothing is read)
        next_any = offs_l < tl.where(next_left > 0, BLOCK_L, 0)
        next_scale = _tile_scales(ds_ptr + next_tok0 + next_cols, next_any, BLOCK_L, D_SCALED)
        # a document's last tile reads its last token again past its end: no mask on any similarity
        d_cols = d_ptr + tok0 * sd_l + tl.minimum(col_offs, (tl.minimum(left, BLOCK_L) - 1) * sd_l)[None, :]
        if Q_SCALED and not NORMALIZE and d_ptr.dtype.element_ty == tl.int8:  # int32 dots of the codes
            dots = _tile_similarities(
                q_tile, q_rows, q_in, q_inv, d_cols, d_scale, every, D, sq_k, sd_k,
                BLOCK_Q, BLOCK_L, BLOCK_D, NORMALIZE, SINGLE_D, PREC, False,
            )  # fmt: skip
            # the largest scale of a [1, BLOCK_L] row: taken inside each warp, in the dots' layout (as a vector,
            # a reduction across the warps: two barriers on every tile)
            unit, inv_unit = _int8_grid_unit(tl.max(d_scale[None, :], 1, keep_dims=True), scale_bits)
            # m = scale / unit (an integer in [1, 2**scale_bits]) from the bits of m + 2**23
            m = (d_scale[None, :] * inv_unit + 8388608.0).to(tl.int32, bitcast=True) - 0x4B000000
            tile_best = tl.reshape(tl.max(dots * m, 1, keep_dims=True).to(tl.float32) * unit, [BLOCK_Q])
        else:
            sim = _tile_similarities(
                q_tile, q_rows, q_in, q_inv, d_cols, d_scale, every, D, sq_k, sd_k,
                BLOCK_Q, BLOCK_L, BLOCK_D, NORMALIZE, SINGLE_D, PREC, D_SCALED,
            )  # fmt: skip
            tile_best = _row_nanmax(sim)
        best = _nanmax(best, tile_best)
        last = left <= BLOCK_L
        if QPACK == 1 or last:  # (a dot result first read inside a branch broke Triton 3.6's sm_90 pipeliner)
            row_best = best
            if Q_SCALED and not NORMALIZE:
                row_best = best * q_inv
            rows = tl.reshape(tl.where(q_in, row_best, 0.0), [SLOTS // GROUP, QPACK, GROUP])
            sums = tl.sum(tl.sum(rows, 2), 0)
        else:
            sums = no_sums
        # (a vector mask: the interpreter's masks need one)
        tl.store(out + j, sums, mask=query_ok & (no_sums + last.to(tl.float32) > 0))
        best = tl.where(last, float("-inf"), best)


@triton.jit
def _maxsim_varlen_kernel(
    q_ptr, qs_ptr, d_ptr, ds_ptr, cu_q_ptr, cu_d_ptr, qid_ptr, did_ptr, score_ptr, argmax_ptr, pmax_ptr, pidx_ptr,
    Nd, D, R, MAX_LQ, sq_l, sq_k, sd_l, sd_k, n_qb, n_split, split_len, scale_bits,
    BLOCK_Q: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, LISTED: tl.constexpr,
    NORMALIZE: tl.constexpr, ARGMAX: tl.constexpr, PARTIAL: tl.constexpr, SINGLE_D: tl.constexpr,
    PREC: tl.constexpr, LANE_MAX: tl.constexpr, D_SCALED: tl.constexpr, Q_SCALED: tl.constexpr,
    QPACK: tl.constexpr, DOCS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    qb = pid % n_qb
    rest = pid // n_qb
    split = rest % n_split
    pair = rest // n_split  # all pairs: query (group) * document runs + run of DOCS documents
    SLOTS: tl.constexpr = BLOCK_Q // QPACK
    GROUP: tl.constexpr = min(SLOTS, ROW_GROUP) if DOCS > 1 else SLOTS
    r = tl.arange(0, BLOCK_Q)
    if LISTED:  # DOCS == 1
        qi = tl.load(qid_ptr + pair).to(tl.int64)
        di = tl.load(did_ptr + pair).to(tl.int64)
    else:
        # the query groups of a document (run) are neighbours in launch order, so they run together and all
        # but the first read its tiles from the L2
        n_groups = (R // Nd + QPACK - 1) // QPACK
        qi = (pair % n_groups).to(tl.int64) * QPACK
        di = (pair // n_groups).to(tl.int64) * DOCS
    first_query = qi
    query_ok = None
    # all pairs with QPACK > 1: row r holds a token of query qi + (r // GROUP) % QPACK, the queries taking
    # GROUP rows in turn (with runs of documents, GROUP is the rows of a warp in the tensor cores' layout: a
    # query's rows then sit in one warp, and its sum is a reduction inside it)
    slot = (r // (GROUP * QPACK)) * GROUP + r % GROUP
    if QPACK > 1:
        qi = qi + (r // GROUP) % QPACK
        query_ok = qi < R // Nd
        q_start = tl.load(cu_q_ptr + qi, mask=query_ok, other=0).to(tl.int64)
        lq = (tl.load(cu_q_ptr + qi + 1, mask=query_ok, other=0).to(tl.int64) - q_start).to(tl.int32)
    else:
        q_start = tl.load(cu_q_ptr + qi).to(tl.int64)
        lq = (tl.load(cu_q_ptr + qi + 1).to(tl.int64) - q_start).to(tl.int32)
    offs_q = qb * SLOTS + slot
    q_in = offs_q < lq
    q_rows = q_ptr + (q_start + offs_q.to(tl.int64))[:, None] * sq_l
    q_tile, q_inv = _load_query(q_rows, q_in, D, sq_k, BLOCK_Q, BLOCK_D, NORMALIZE, SINGLE_D)
    if Q_SCALED and not NORMALIZE:  # the rows' scales (with NORMALIZE they cancel: the codes' norms serve)
        q_inv = tl.load(qs_ptr + q_start + offs_q.to(tl.int64), mask=q_in, other=1.0)

    if DOCS > 1:  # all pairs, one launch, no argmax
        _score_run_of_docs(
            q_tile, q_rows, q_in, q_inv, first_query, di, d_ptr, ds_ptr, cu_d_ptr, score_ptr, Nd, R, D, qb,
            sq_k, sd_l, sd_k, scale_bits, BLOCK_Q, BLOCK_L, BLOCK_D, NORMALIZE, SINGLE_D, PREC, D_SCALED, Q_SCALED,
            QPACK, DOCS,
        )  # fmt: skip
    else:
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

RUN_WAVES = 8  # runs of documents keep at least this many programs per multiprocessor
REGISTER_FILE = 65536  # 32-bit registers of an NVIDIA multiprocessor (sm_70 to sm_90)
RUN_PROGRAMS = 2  # programs of a runs-of-documents launch that share a multiprocessor


def run_max_registers(arch: str, num_warps: int) -> int | None:
    """The register cap per thread of a runs-of-documents launch on NVIDIA (None elsewhere, or when no cap
    is needed): ``RUN_PROGRAMS`` programs per multiprocessor, so one's tile loop runs while another waits on
    its tensor cores. Without it the float16 packed kernel of 8 warps took 128 registers with runs of 32 and
    132 with runs of 8: one program per multiprocessor, 14.4 ms against 10.8 (issue 6's 32-query search,
    kernel only, H100, 2026-12-06); capped at 128 it compiles without spills, and runs of 8 took 12.1 ms."""
    cap = REGISTER_FILE // (RUN_PROGRAMS * 32 * num_warps)
    return cap if arch.startswith("sm_") and cap < 255 else None


def run_length(docs: int, groups: int, nd: int, sms: int) -> int:
    """Documents per program of an all-pairs launch: the config's ``doc_run`` (down to a power of two), halved
    while ``groups`` query groups times the runs of ``nd`` documents would give fewer than ``RUN_WAVES``
    programs per multiprocessor (a long run saves loads of the query tile; many programs balance the GPU)."""
    docs = 1 << (max(docs, 1).bit_length() - 1)
    while docs > 1 and groups * cdiv(nd, docs) < RUN_WAVES * sms:
        docs //= 2
    return docs


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
            ``q[t] * q_scales[t]``): the dots run on the int8 / float8 tensor cores. With int8 codes,
            ``d_scales`` must be on their documents' grids (``index.int8_scales``, as ``Index`` keeps them).

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
    if q.dtype == torch.float8_e4m3fn:  # sm_90's float8 dots (wgmma) take 64 rows; fewer widen the codes
        block_q = max(block_q, 64)  # to float16 for mma.sync: one e4m3 query measured 1.30 ms against int8's 1.04
    n_qb = cdiv(max_lq, block_q // qpack)
    arch, sms = device_info(q.device)
    docs = 1
    runs_fit = d.stride(0) * block_l < 2**31  # (a run's tile offsets are int32)
    if runs_fit and not (listed or return_argmax or n_split is not None or (d_scales is not None and q_scales is None)):
        # (codes widened to 16 bits measured 2-3x slower in a run: 42 against 15-20 ms, H100)
        docs = run_length(cfg.doc_run, cdiv(nq, qpack) * n_qb, nd, sms)
    programs = R * n_qb if listed else cdiv(nq, qpack) * cdiv(nd, docs) * n_qb
    n_split, split_len = plan_split(programs, max_ld, block_l, cfg, sms, forced=n_split if docs == 1 else 1)
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
            (nd, D, R, max_lq, *q.stride(), *d.stride(), n_qb, n_split, split_len, int8_scale_bits(D)),
            dict(
                BLOCK_Q=block_q, BLOCK_L=block_l, BLOCK_D=block_d, LISTED=listed, NORMALIZE=normalize,
                ARGMAX=return_argmax, PARTIAL=partial, SINGLE_D=D <= block_d, PREC=dot_precision(q.dtype),
                LANE_MAX=cfg.lane_max, D_SCALED=d_scales is not None,
                Q_SCALED=q_scales is not None, QPACK=qpack, DOCS=docs,
            ),
            cfg.num_warps,
            cfg.num_stages,
            run_max_registers(arch, cfg.num_warps) if docs > 1 else None,
        )  # fmt: skip
        finish(score_out, pmax, pidx, scores, argmax, R, max_lq, n_split)
    return scores, argmax
