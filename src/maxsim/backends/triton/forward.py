"""Strided padded forward kernels: ``q [P, Qn, Lq, D]`` against ``d [P, Dn, Ld, D]``, any strides.

A program scores one block of ``BLOCK_Q`` query tokens of query ``(p, qi)`` (or, with ``QPACK > 1``, the
tokens of ``QPACK`` short queries of group ``p``, each in ``BLOCK_Q / QPACK`` rows) against ``DOCS``
documents of group ``p`` (or one split of their tokens), reading the views in place: a broadcast dim is a zero
stride, offsets are int64. It keeps a running maximum (and its first index) per query token over tiles
of ``BLOCK_L`` document tokens, each a ``tl.dot`` of ``[BLOCK_Q, BLOCK_D] x [BLOCK_D, BLOCK_L]`` summed
over the ``D`` axis in ``BLOCK_D`` chunks. Masked document tokens are neither loaded nor able to win.

Combining pieces is deterministic (no atomics): query blocks write partial sums that one torch sum adds;
document splits write per-token partial maxima that ``_maxsim_combine_kernel`` reduces in split order.

Semantics (as ``maxsim.reference``): the first maximal token wins; a NaN similarity wins (the first NaN);
when every real similarity is -inf the first real token wins; a document without a real token scores
-inf with argmax -1; masked query tokens add 0 and have argmax -1.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from ... import index as index_module
from .configs import FwdConfig, device_info, forward_config
from .launch import Launcher, launch_hooks_set

EPS = 1e-12
INTERPRETED: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))
BIG: tl.constexpr = tl.constexpr(2**30)  # "no index" inside a tile reduction
INT8_LOWEST_EXPONENT: tl.constexpr = tl.constexpr(index_module.INT8_LOWEST_EXPONENT)
POISON = False  # tests: fill every output and buffer with NaN / -7 before a launch, so a missed tile fails
MASKED_QUERY = -2  # partial argmax of a query token that takes no part (combined to -1, score 0)


@triton.jit
def _nanmax(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _load_query(
    q_rows, q_in, D, sq_k,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, NORMALIZE: tl.constexpr, SINGLE_D: tl.constexpr,
):  # fmt: skip
    """The query tile (when ``D <= BLOCK_D``) and the inverse norms of its rows (1 unless NORMALIZE)."""
    offs_k = tl.arange(0, BLOCK_D)
    q_tile = tl.load(q_rows + offs_k[None, :] * sq_k, mask=q_in[:, None] & (offs_k[None, :] < D), other=0.0)
    q_inv = tl.full([BLOCK_Q], 1.0, tl.float32)
    if NORMALIZE:
        if SINGLE_D:
            qf = q_tile.to(tl.float32)
            sq = tl.sum(qf * qf, 1)
        else:
            sq = tl.zeros([BLOCK_Q], tl.float32)
            for k0 in range(0, D, BLOCK_D):
                kk = k0 + offs_k
                qf = tl.load(q_rows + kk[None, :] * sq_k, mask=q_in[:, None] & (kk[None, :] < D), other=0.0)
                qf = qf.to(tl.float32)
                sq += tl.sum(qf * qf, 1)
        q_inv = 1.0 / tl.maximum(tl.sqrt(sq), 1e-12)
    return q_tile, q_inv


@triton.jit
def _row_nanmax(x):
    """Max of each row of a 2-D block, NaN winning."""
    if INTERPRETED:  # the interpreter runs a custom reduction element by element: built-ins instead
        return tl.where(tl.max((x != x).to(tl.int32), 1) > 0, float("nan"), tl.max(x, 1))
    else:
        return tl.reduce(x, 1, _nanmax)


@triton.jit
def _mask_end(dm_base, sdm_l, l_lo, l_hi, MASK_BLOCK: tl.constexpr):
    """One past the last real token of a document's mask in ``[l_lo, l_hi)`` (``l_lo`` if none): the
    tile loop stops there, so the padding of a length-masked document costs neither bytes nor tiles."""
    end = l_lo
    for m0 in range(l_lo, l_hi, MASK_BLOCK):
        offs = m0 + tl.arange(0, MASK_BLOCK)
        m = tl.load(dm_base + offs.to(tl.int64) * sdm_l, mask=offs < l_hi, other=0)
        end = tl.maximum(end, tl.max(tl.where(m != 0, offs + 1, 0), 0))
    return end


@triton.jit
def _scaled_small_ints(x, scale):
    """``x * scale[None, :]`` in float32 for int32 ``x`` with ``-2**22 <= x <= 2**22`` (sums of at most 256
    int8 products) and scales of at most 22 significant bits (``index.int8_scales`` gives at most 18),
    rounded once.

    ``x + 0x4B400000`` holds the bits of the float ``v = 1.5 * 2**23 + x`` (in ``[2**23, 2**24]``, where floats
    are the integers); ``1.5 * 2**23 * scale`` is exact for such scales, so ``fma(v, scale, -that)`` is
    ``x * scale`` rounded once. An integer add and a fused multiply-add on every similarity of an int8 tile,
    instead of a conversion (issued at an eighth of the float rate on sm_80 / sm_90) and a multiply.
    """
    return tl.fma((x + 0x4B400000).to(tl.float32, bitcast=True), scale[None, :], (scale * -12582912.0)[None, :])


@triton.jit
def _int8_grid_unit(largest, scale_bits):
    """float32 ``(unit, 1 / unit)`` of the int8 scale grid whose largest scale is ``largest`` (positive):
    ``unit = 2**(e - scale_bits)``, ``e`` as ``index.int8_grid_exponent`` gives it (from the bits)."""
    bits = largest.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    e = tl.maximum(e, INT8_LOWEST_EXPONENT) - scale_bits
    return ((e + 127) << 23).to(tl.float32, bitcast=True), ((127 - e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _fp8_dot(a, b, acc, BLOCK_D: tl.constexpr):
    """float32 ``a [BLOCK_Q, BLOCK_D] @ b [BLOCK_D, BLOCK_L]`` of float8 codes, plus ``acc`` (float32, or None).

    sm_90's float8 tensor cores keep about 14 bits of a sum until it is added into a float32 accumulator,
    which Triton's default never does: here every 128 products are. A single dot of at most 128 (D <= 128)
    is one such sum, added to nothing: no promotion and no extra add per similarity. (Promoting every 32,
    an add per similarity each time, made issue 6's 32-query e4m3 search kernel 14.53 ms, float16's 13.9;
    now 10.39: H100, 2026-12-06.)
    """
    if acc is None and BLOCK_D <= 128:
        return tl.dot(a, b)
    elif BLOCK_D <= 128:
        return tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_D)
    else:
        return tl.dot(a, b, acc, max_num_imprecise_acc=128)


@triton.jit
def _tile_scales(ds_ptrs, real, BLOCK_L: tl.constexpr, D_SCALED: tl.constexpr):
    """float32 ``[BLOCK_L]``: the scales of a tile's tokens (D_SCALED; 0 where not ``real``), else ones.

    Callers load them a tile ahead: this small load is not software-pipelined like the tiles, and waited
    for in the loop it was a tenth of the 32-query quantized search (issue 6's, kernel only, H100: int8
    13.35 -> 11.74 ms, e4m3 15.29 -> 14.49 ms loaded a tile ahead)."""
    if D_SCALED:
        return tl.load(ds_ptrs, mask=real, other=0.0)
    else:
        return tl.full([BLOCK_L], 1.0, tl.float32)


@triton.jit
def _tile_similarities(
    q_tile, q_rows, q_in, q_inv, d_cols, d_scale, real, D, sq_k, sd_k,
    BLOCK_Q: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, NORMALIZE: tl.constexpr,
    SINGLE_D: tl.constexpr, PREC: tl.constexpr, D_SCALED: tl.constexpr,
):  # fmt: skip
    """Float32 similarities ``[BLOCK_Q, BLOCK_L]`` of the query rows with one tile of document tokens.

    ``d_cols``: ``[1, BLOCK_L]`` pointers to the tokens' first columns, ``real`` which of them to load;
    ``d_scale``: their scales (D_SCALED, from ``_tile_scales``). See ``_doc_best`` for the scaled and
    normalized cases.
    """
    offs_k = tl.arange(0, BLOCK_D)
    if SINGLE_D:
        d_tile = tl.load(
            d_cols + offs_k[:, None] * sd_k, mask=real[None, :] & (offs_k[:, None] < D), other=0.0
        )
        if D_SCALED:
            d_tile = d_tile.to(q_tile.dtype)
        if q_tile.dtype.is_fp8():
            acc = _fp8_dot(q_tile, d_tile, None, BLOCK_D)
        else:
            acc = tl.dot(q_tile, d_tile, input_precision=PREC)
        if NORMALIZE:
            df = d_tile.to(tl.float32)
            d_sq = tl.sum(df * df, 0)
    else:
        if q_tile.dtype == tl.int8:  # int8 codes: exact int32 sums
            acc = tl.zeros([BLOCK_Q, BLOCK_L], tl.int32)
        else:
            acc = tl.zeros([BLOCK_Q, BLOCK_L], tl.float32)
        d_sq = tl.zeros([BLOCK_L], tl.float32)
        for k0 in range(0, D, BLOCK_D):
            kk = k0 + offs_k
            qt = tl.load(q_rows + kk[None, :] * sq_k, mask=q_in[:, None] & (kk[None, :] < D), other=0.0)
            dt = tl.load(d_cols + kk[:, None] * sd_k, mask=real[None, :] & (kk[:, None] < D), other=0.0)
            if D_SCALED:
                dt = dt.to(qt.dtype)
            if qt.dtype.is_fp8():
                acc = _fp8_dot(qt, dt, acc, BLOCK_D)
            else:
                acc = tl.dot(qt, dt, acc, input_precision=PREC, out_dtype=acc.dtype)
            if NORMALIZE:
                df = dt.to(tl.float32)
                d_sq += tl.sum(df * df, 0)
    if D_SCALED:
        if acc.dtype == tl.int32 and SINGLE_D and BLOCK_D <= 256:
            acc = _scaled_small_ints(acc, d_scale)
        else:
            acc = acc.to(tl.float32) * d_scale[None, :]
        if NORMALIZE:
            d_sq = d_sq * (d_scale * d_scale)
    if NORMALIZE:
        d_inv = 1.0 / tl.maximum(tl.sqrt(d_sq), 1e-12)
        acc = acc * q_inv[:, None] * d_inv[None, :]
    return acc


@triton.jit
def _doc_tile(
    q_tile, q_rows, q_in, q_inv, d_base, dm_base, d_scale, l0, l_hi, D, sq_k, sd_l, sd_k, sdm_l,
    BLOCK_Q: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DMASK: tl.constexpr,
    NORMALIZE: tl.constexpr, SINGLE_D: tl.constexpr, PREC: tl.constexpr, D_SCALED: tl.constexpr,
):  # fmt: skip
    """The similarities ``[BLOCK_Q, BLOCK_L]`` with document tokens ``l0 .. l0 + BLOCK_L - 1`` (``d_scale``
    their scales), which of them are real (below ``l_hi`` and in the mask) and their indices."""
    offs = l0 + tl.arange(0, BLOCK_L)
    real = offs < l_hi
    if HAS_DMASK:
        dm = tl.load(dm_base + offs.to(tl.int64) * sdm_l, mask=real, other=0)
        real = real & (dm != 0)
    acc = _tile_similarities(
        q_tile, q_rows, q_in, q_inv, d_base + offs.to(tl.int64)[None, :] * sd_l, d_scale,
        real, D, sq_k, sd_k, BLOCK_Q, BLOCK_L, BLOCK_D, NORMALIZE, SINGLE_D, PREC, D_SCALED,
    )  # fmt: skip
    return acc, real, offs


@triton.jit
def _doc_best(
    q_tile, q_rows, q_in, q_inv, d_base, dm_base, ds_base, l_lo, l_hi, D, sq_k, sd_l, sd_k, sdm_l,
    BLOCK_Q: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DMASK: tl.constexpr,
    NORMALIZE: tl.constexpr, ARGMAX: tl.constexpr, SINGLE_D: tl.constexpr, PREC: tl.constexpr,
    LANE_MAX: tl.constexpr, D_SCALED: tl.constexpr, Q_SCALED: tl.constexpr,
):  # fmt: skip
    """Max (NaN wins) and its first index per query row over document tokens ``[l_lo, l_hi)``.

    ``q_inv``: a factor per query row: its inverse norm with NORMALIZE, else its scale with Q_SCALED
    (positive or NaN: applied to the row's maximum).

    D_SCALED: the document tokens are int8 / float8 codes with a float32 scale per token at ``ds_base``
    (contiguous): each tile is widened in registers to the query's dtype (exact), and each similarity
    column multiplied by its token's scale after the dot (``<q, c * s> = <q, c> * s``).
    Q_SCALED (with D_SCALED): the query rows are codes of the documents' dtype too, so the tiles go to the
    int8 / float8 tensor cores as they are (int32 / float32 sums), each row's maximum multiplied by ``q_inv``.

    LANE_MAX: the running maximum is kept elementwise over a ``[BLOCK_Q, BLOCK_L]`` tile (each column lane
    sees the tiles in token order, a strict ``>`` keeps its first winner) and reduced across lanes once at
    the end: no cross-lane reduction per tile (the bytes-bound shapes). Otherwise each tile is reduced to
    its row maxima and merged into a running ``[BLOCK_Q]`` (fewer live registers: the FLOP-bound shapes);
    with ARGMAX, a row whose maximum is NaN learns where its first NaN is in a second pass over the tiles,
    taken only by a program that met one (NaN tests would cost the common case two operations per
    similarity).
    """
    if LANE_MAX:
        run = tl.full([BLOCK_Q, BLOCK_L], float("-inf"), tl.float32)
        run_idx = tl.full([BLOCK_Q, BLOCK_L], -1, tl.int32)
    best = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK_Q], -1, tl.int32)
    offs_l = tl.arange(0, BLOCK_L)
    next_scale = _tile_scales(ds_base + (l_lo + offs_l).to(tl.int64), l_lo + offs_l < l_hi, BLOCK_L, D_SCALED)
    for l0 in range(l_lo, l_hi, BLOCK_L):
        d_scale = next_scale
        ahead = l0 + BLOCK_L + offs_l
        next_scale = _tile_scales(ds_base + ahead.to(tl.int64), ahead < l_hi, BLOCK_L, D_SCALED)
        acc, real, offs = _doc_tile(
            q_tile, q_rows, q_in, q_inv, d_base, dm_base, d_scale, l0, l_hi, D, sq_k, sd_l, sd_k, sdm_l,
            BLOCK_Q, BLOCK_L, BLOCK_D, HAS_DMASK, NORMALIZE, SINGLE_D, PREC, D_SCALED,
        )  # fmt: skip
        if LANE_MAX:
            if ARGMAX:
                take = real[None, :] & ((run_idx < 0) | (acc > run) | ((acc != acc) & (run == run)))
                run = tl.where(take, acc, run)
                run_idx = tl.where(take, offs[None, :], run_idx)
            else:
                run = _nanmax(run, tl.where(real[None, :], acc, float("-inf")))
        else:  # one cross-lane reduction per tile: fewer live registers (the FLOP-bound tiles)
            sim = acc  # a whole tile of real tokens (all but a document's last) needs no mask
            if HAS_DMASK:
                sim = tl.where(real[None, :], acc, float("-inf"))
            elif l0 + BLOCK_L > l_hi:
                sim = tl.where(real[None, :], acc, float("-inf"))
            tile_max = _row_nanmax(sim)
            if ARGMAX:  # as few operations per similarity as can be: they cost as much as the dot
                real_offs = tl.where(real, offs, BIG)  # per column: a masked token never wins
                # sim >= tile_max holds exactly at the row's maximum (nowhere in a row with a NaN: tile_idx
                # stays BIG there, and the row's first NaN is found after the loop)
                tile_idx = tl.min(tl.where(sim >= tile_max[:, None], real_offs[None, :], BIG), 1)
                tile_nan = tile_max != tile_max
                take = ((tile_idx < BIG) | tile_nan) & (
                    (best_idx < 0) | (tile_max > best) | (tile_nan & (best == best))
                )
                best = tl.where(take, tile_max, best)
                best_idx = tl.where(take, tile_idx, best_idx)
            else:
                best = _nanmax(best, tile_max)
    if LANE_MAX:
        best = _row_nanmax(run)
        if ARGMAX:
            best_nan = best != best
            hit = (run_idx >= 0) & ((run == best[:, None]) | ((run != run) & best_nan[:, None]))
            first = tl.min(tl.where(hit, run_idx, BIG), 1)
            best_idx = tl.where(first < BIG, first, -1)
    elif ARGMAX:
        best_nan = best != best
        if tl.max(best_nan.to(tl.int32), 0) > 0:  # rare: a second pass finds each NaN row's first NaN
            first_nan = tl.full([BLOCK_Q], BIG, tl.int32)
            for l0 in range(l_lo, l_hi, BLOCK_L):
                d_scale = _tile_scales(ds_base + (l0 + offs_l).to(tl.int64), l0 + offs_l < l_hi, BLOCK_L, D_SCALED)
                acc, real, offs = _doc_tile(
                    q_tile, q_rows, q_in, q_inv, d_base, dm_base, d_scale, l0, l_hi, D, sq_k, sd_l, sd_k,
                    sdm_l, BLOCK_Q, BLOCK_L, BLOCK_D, HAS_DMASK, NORMALIZE, SINGLE_D, PREC, D_SCALED,
                )  # fmt: skip
                nan_offs = tl.where(real[None, :] & (acc != acc), offs[None, :], BIG)
                first_nan = tl.minimum(first_nan, tl.min(nan_offs, 1))
            best_idx = tl.where(best_nan, first_nan, best_idx)
    if Q_SCALED and not NORMALIZE:  # a positive (or NaN) scale per row: the max of the scaled is the scaled max
        best = best * q_inv
    return best, best_idx


@triton.jit
def _write_best(
    best, best_idx, q_real, offs_q, row, split, R, score_ptr, argmax_ptr, pmax_ptr, pidx_ptr, qb, LQ_OUT,
    ARGMAX: tl.constexpr, PARTIAL: tl.constexpr, QPACK: tl.constexpr, query_ok,
):  # fmt: skip
    """Store one query block's result: per-token partial maxima (PARTIAL) or its sum and argmax.

    ``row`` is the output row (``pair * Dn + doc``) of the block, or with ``QPACK`` queries packed in the
    block, one per query token (``BLOCK_Q / QPACK`` consecutive tokens per query); ``query_ok`` then says
    which of them belong to a real query."""
    store = offs_q < LQ_OUT
    if PARTIAL:
        off = (split.to(tl.int64) * R + row) * LQ_OUT + offs_q
        if QPACK > 1:
            store = store & query_ok
        tl.store(pmax_ptr + off, tl.where(q_real, best, 0.0), mask=store)
        if ARGMAX:
            tl.store(pidx_ptr + off, tl.where(q_real, best_idx, -2), mask=store)
    else:
        if QPACK > 1:
            slots: tl.constexpr = best.shape[0] // QPACK
            total = tl.sum(tl.reshape(tl.where(q_real, best, 0.0), [QPACK, slots]), 1)
            rows = tl.min(tl.reshape(row, [QPACK, slots]), 1)
            ok = tl.max(tl.reshape(query_ok.to(tl.int32), [QPACK, slots]), 1) > 0
            tl.store(score_ptr + qb.to(tl.int64) * R + rows, total, mask=ok)
            store = store & query_ok
        else:
            total = tl.sum(tl.where(q_real, best, 0.0), 0)
            tl.store(score_ptr + qb.to(tl.int64) * R + row, total)
        if ARGMAX:
            tl.store(argmax_ptr + row * LQ_OUT + offs_q, tl.where(q_real, best_idx, -1), mask=store)


@triton.jit
def _maxsim_fwd_kernel(
    q_ptr, d_ptr, qm_ptr, dm_ptr, dl_ptr, score_ptr, argmax_ptr, pmax_ptr, pidx_ptr,
    Qn, Dn, Lq, Ld, D, R,
    sq_p, sq_n, sq_l, sq_k, sd_p, sd_n, sd_l, sd_k, sqm_p, sqm_n, sqm_l, sdm_p, sdm_n, sdm_l, sdl_p, sdl_n,
    n_qb, n_split, n_doc_blocks, split_len,
    BLOCK_Q: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, DOCS: tl.constexpr,
    MASK_BLOCK: tl.constexpr, HAS_QMASK: tl.constexpr, HAS_DMASK: tl.constexpr, HAS_DLEN: tl.constexpr,
    NORMALIZE: tl.constexpr, ARGMAX: tl.constexpr,
    PARTIAL: tl.constexpr, SINGLE_D: tl.constexpr, PREC: tl.constexpr, LANE_MAX: tl.constexpr,
    QPACK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    qb = pid % n_qb
    rest = pid // n_qb
    split = rest % n_split
    rest = rest // n_split
    nb = rest % n_doc_blocks
    pg = rest // n_doc_blocks  # p * n_qgroups + query group
    n_qgroups = (Qn + QPACK - 1) // QPACK
    p = pg // n_qgroups
    p64 = p.to(tl.int64)

    # row r of the block: token r % SLOTS of query (group * QPACK + r // SLOTS); QPACK = 1: one query
    SLOTS: tl.constexpr = BLOCK_Q // QPACK
    r = tl.arange(0, BLOCK_Q)
    qi = (pg % n_qgroups) * QPACK + r // SLOTS
    query_ok = qi < Qn
    qi64 = qi.to(tl.int64)
    offs_q = qb * SLOTS + r % SLOTS
    q_in = (offs_q < Lq) & query_ok
    q_rows = q_ptr + p64 * sq_p + qi64[:, None] * sq_n + offs_q.to(tl.int64)[:, None] * sq_l
    q_real = q_in
    if HAS_QMASK:
        qm = tl.load(qm_ptr + p64 * sqm_p + qi64 * sqm_n + offs_q.to(tl.int64) * sqm_l, mask=q_in, other=0)
        q_real = q_in & (qm != 0)
    q_tile, q_inv = _load_query(q_rows, q_in, D, sq_k, BLOCK_Q, BLOCK_D, NORMALIZE, SINGLE_D)

    l_lo = split * split_len
    l_hi = tl.minimum(l_lo + split_len, Ld)
    for j in range(DOCS):
        n = nb * DOCS + j
        if n < Dn:
            n64 = n.to(tl.int64)
            dm_base = dm_ptr + p64 * sdm_p + n64 * sdm_n
            l_end = l_hi
            if HAS_DMASK:
                l_end = _mask_end(dm_base, sdm_l, l_lo, l_hi, MASK_BLOCK)
            if HAS_DLEN:  # the document's first tokens are real: no mask to read
                length = tl.load(dl_ptr + p64 * sdl_p + n64 * sdl_n)
                l_end = tl.maximum(tl.minimum(l_hi, length.to(tl.int64)).to(tl.int32), l_lo)
            best, best_idx = _doc_best(
                q_tile, q_rows, q_in, q_inv, d_ptr + p64 * sd_p + n64 * sd_n, dm_base, dm_base,
                l_lo, l_end, D, sq_k, sd_l, sd_k, sdm_l,
                BLOCK_Q, BLOCK_L, BLOCK_D, HAS_DMASK, NORMALIZE, ARGMAX, SINGLE_D, PREC, LANE_MAX, False, False,
            )  # fmt: skip
            if QPACK == 1:
                row = (p64 * Qn + (pg % n_qgroups)) * Dn + n64
            else:
                row = (p64 * Qn + qi64) * Dn + n64
            _write_best(
                best, best_idx, q_real, offs_q, row, split, R, score_ptr, argmax_ptr, pmax_ptr, pidx_ptr,
                qb, Lq, ARGMAX, PARTIAL, QPACK, query_ok,
            )  # fmt: skip


@triton.jit
def _maxsim_combine_kernel(
    pmax_ptr, pidx_ptr, score_ptr, argmax_ptr, R, LQ_OUT, n_split,
    BLOCK_Q: tl.constexpr, ARGMAX: tl.constexpr,
):  # fmt: skip
    """Reduce the per-split partial maxima of one row ``[n_split, R, LQ_OUT]`` in split order."""
    row = tl.program_id(0).to(tl.int64)
    total = tl.zeros([BLOCK_Q], tl.float32)
    for q0 in range(0, LQ_OUT, BLOCK_Q):
        offs_q = q0 + tl.arange(0, BLOCK_Q)
        q_in = offs_q < LQ_OUT
        best = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        best_idx = tl.full([BLOCK_Q], -1, tl.int32)
        masked = offs_q < 0
        for s in range(n_split):
            off = (s * R + row) * LQ_OUT + offs_q
            m = tl.load(pmax_ptr + off, mask=q_in, other=0.0)
            if ARGMAX:
                i = tl.load(pidx_ptr + off, mask=q_in, other=-1)
                masked = masked | (i == -2)
                nan = m != m
                take = (i >= 0) & ((best_idx < 0) | (m > best) | (nan & (best == best)))
                best = tl.where(take, m, best)
                best_idx = tl.where(take, i, best_idx)
            else:
                best = _nanmax(best, m)
        if ARGMAX:
            best = tl.where(masked, 0.0, best)
            tl.store(argmax_ptr + row * LQ_OUT + offs_q, tl.where(masked, -1, best_idx), mask=q_in)
        total += tl.where(q_in, best, 0.0)
    tl.store(score_ptr + row, tl.sum(total, 0))


_FWD = Launcher(_maxsim_fwd_kernel, INTERPRETED.value)
_COMBINE = Launcher(_maxsim_combine_kernel, INTERPRETED.value)


def cdiv(a: int, b: int) -> int:
    """Ceil division of Python ints (triton's own helper costs microseconds per call)."""
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def _pow2_at_least(n: int, low: int = 16) -> int:
    return max(low, _next_pow2(max(int(n), 1)))


def tf32_allowed() -> bool:
    """Whether the user allowed TF32 for float32 matmuls, by either of torch's APIs.

    torch >= 2.9 reports both the legacy ``matmul.allow_tf32 = True`` (or ``set_float32_matmul_precision``) and
    the new ``fp32_precision = "tf32"`` (of ``matmul`` or of ``torch.backends``) in ``matmul.fp32_precision``;
    reading ``allow_tf32`` there raises once the new API was used, so it is read only on older torch.
    """
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:
        return bool(matmul.allow_tf32)
    return precision == "tf32"


def dot_precision(dtype: torch.dtype) -> str:
    """``ieee`` for float32 unless TF32 is allowed (:func:`tf32_allowed`); tf32 (ignored) otherwise."""
    if dtype == torch.float32 and not tf32_allowed():
        return "ieee"
    return "tf32"


def blocks(cfg: FwdConfig, lq: int, ld: int, dim: int) -> tuple[int, int, int]:
    """(BLOCK_Q, BLOCK_L, BLOCK_D) of a config, cut to the problem."""
    return (
        min(cfg.block_q, _pow2_at_least(lq)),
        min(cfg.block_l, _pow2_at_least(ld)),
        min(cfg.block_d, _pow2_at_least(dim)),
    )


def pack_queries(cfg: FwdConfig, block_q: int, lq: int, queries: int) -> tuple[int, int]:
    """(QPACK, BLOCK_Q): how many whole queries of ``lq`` tokens share a program's rows (at most
    ``cfg.block_q`` rows, only when a query fits in ``block_q``), and the block's rows."""
    qpack = min(cfg.block_q // block_q, _next_pow2(queries)) if block_q == _pow2_at_least(lq) else 1
    return qpack, block_q * qpack


def plan_split(
    programs: int, ld: int, block_l: int, cfg: FwdConfig, sms: int, forced: int | None = None
) -> tuple[int, int]:
    """(n_split, split_len): split the document axis when ``programs`` would not fill the GPU, or into
    ``forced`` pieces (tests, autotuning); a split covers whole ``block_l`` tiles."""
    tiles = cdiv(ld, block_l)
    n_split = 1 if forced is None else forced
    target = int(cfg.split_waves * sms)
    if forced is None and programs < target and tiles >= 2 * cfg.min_split_tiles:
        n_split = min(cdiv(target, max(programs, 1)), tiles // cfg.min_split_tiles)
    split_len = cdiv(tiles, max(n_split, 1)) * block_l
    return cdiv(ld, split_len), split_len


def combine(pmax, pidx, scores, argmax, rows: int, lq_out: int, n_split: int) -> None:
    """Launch ``_maxsim_combine_kernel`` over ``rows`` rows of partial maxima."""
    _COMBINE(
        rows,
        (pmax, pmax if pidx is None else pidx, scores, scores if argmax is None else argmax),
        (rows, lq_out, n_split),
        dict(BLOCK_Q=min(128, _pow2_at_least(lq_out)), ARGMAX=argmax is not None),
        4,
        2,
    )


def partial_outputs(scores, argmax, rows: int, lq: int, n_split: int, n_qb: int):
    """What the kernel writes before the final ``scores``: per-split maxima (and argmax) ``[n_split, rows,
    lq]`` when the document axis is split, else per-query-block sums ``[n_qb, *scores.shape]`` when the
    query is, else ``scores`` itself. Returns ``(score_out, pmax, pidx)``."""
    pmax = pidx = None
    score_out = scores
    if n_split > 1:
        pmax = torch.empty(n_split, rows, lq, dtype=torch.float32, device=scores.device)
        if argmax is not None:
            pidx = torch.empty(n_split, rows, lq, dtype=torch.int32, device=scores.device)
    elif n_qb > 1:
        score_out = torch.empty(n_qb, *scores.shape, dtype=torch.float32, device=scores.device)
    if POISON:
        poison(scores, argmax, score_out, pmax, pidx)
    return score_out, pmax, pidx


def finish(score_out, pmax, pidx, scores, argmax, rows: int, lq: int, n_split: int) -> None:
    """Reduce what ``partial_outputs`` gave the kernel into ``scores`` (and ``argmax``), deterministically."""
    if n_split > 1:
        combine(pmax, pidx, scores, argmax, rows, lq, n_split)
    elif score_out is not scores:
        torch.sum(score_out, dim=0, out=scores)


def poison(*tensors: torch.Tensor | None) -> None:
    """Fill outputs with NaN (floats) or -7 (ints) so that anything the kernels do not write shows."""
    for t in tensors:
        if t is not None:
            t.fill_(float("nan") if t.is_floating_point() else -7)


_NO_SWITCH = contextlib.nullcontext()


def launch_device(device: torch.device):
    """``torch.cuda.device(device)`` when the tensors' GPU is not the current one; nothing otherwise."""
    index = device.index
    if index is None or device.type != "cuda" or index == torch.cuda.current_device():
        return _NO_SWITCH
    return torch.cuda.device(device)


_NO_MASK = (0, 0, 0)

_PLANS: dict = {}  # launch plans by (device, dtype, sizes, flags): table lookup, split plan, constexprs


def _padded_plan(device, dtype, P, Qn, Lq, D, Dn, Ld, flags, config, n_split):
    has_qmask, has_dmask, has_dlen, normalize, return_argmax, prec = flags
    cfg = config or forward_config(device, Lq, D, dtype, queries=Qn)
    block_q, block_l, block_d = blocks(cfg, Lq, Ld, D)
    qpack, block_q = pack_queries(cfg, block_q, Lq, Qn)
    docs = max(1, min(cfg.docs, Dn))
    n_qb = cdiv(Lq, block_q // qpack)
    n_doc_blocks = cdiv(Dn, docs)
    programs = P * cdiv(Qn, qpack) * n_doc_blocks * n_qb
    n_split, split_len = plan_split(programs, Ld, block_l, cfg, device_info(device)[1], forced=n_split)
    constexprs = dict(
        BLOCK_Q=block_q, BLOCK_L=block_l, BLOCK_D=block_d, DOCS=docs,
        MASK_BLOCK=min(1024, _pow2_at_least(split_len)), HAS_QMASK=has_qmask, HAS_DMASK=has_dmask,
        HAS_DLEN=has_dlen, NORMALIZE=normalize, ARGMAX=return_argmax, PARTIAL=n_split > 1,
        SINGLE_D=D <= block_d, PREC=prec, LANE_MAX=cfg.lane_max, QPACK=qpack,
    )  # fmt: skip
    return cfg, n_qb, n_doc_blocks, n_split, split_len, programs, constexprs


def maxsim_fwd(
    q: torch.Tensor,
    d: torch.Tensor,
    q_mask: torch.Tensor | None,
    d_mask: torch.Tensor | None,
    *,
    d_lengths: torch.Tensor | None = None,
    normalize: bool,
    return_argmax: bool,
    config: FwdConfig | None = None,
    n_split: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the padded forward.

    Args:
        q: ``[P, Qn, Lq, D]`` float32/float16/bfloat16, any strides (zero strides for broadcast dims).
        d: ``[P, Dn, Ld, D]``, same dtype and device, any strides.
        q_mask: bool ``[P, Qn, Lq]`` or None; d_mask: bool ``[P, Dn, Ld]`` or None (True = real token).
        d_lengths: integer ``[P, Dn]`` (any strides) or None, instead of ``d_mask``: the first
            ``d_lengths`` tokens of each document are real (values outside ``[0, Ld]`` are clamped to it).
        normalize: L2-normalize every token on the fly.
        return_argmax: also compute the argmax.
        config: a launch configuration (default: the table's for this device and shape).
        n_split: force this many splits of the document axis (tests); default: ``plan_split``.

    Returns:
        scores float32 ``[P, Qn, Dn]`` and int32 argmax ``[P, Qn, Dn, Lq]`` or None.
    """
    P, Qn, Lq, D = q.shape
    _, Dn, Ld, _ = d.shape
    device = q.device
    R = P * Qn * Dn
    scores = torch.empty(P, Qn, Dn, dtype=torch.float32, device=device)
    argmax = torch.empty(P, Qn, Dn, Lq, dtype=torch.int32, device=device) if return_argmax else None
    if R == 0:
        return scores, argmax
    has_masks = (q_mask is not None, d_mask is not None, d_lengths is not None)
    cfg, n_qb, n_doc_blocks, n_split, split_len, programs, constexprs = _plan_of(
        q, d, has_masks, normalize, return_argmax, config, n_split
    )
    score_out, pmax, pidx = partial_outputs(scores, argmax, R, Lq, n_split, n_qb)
    with launch_device(device):
        _FWD(
            programs * n_split,
            (
                q, d, scores if q_mask is None else q_mask.view(torch.uint8),
                scores if d_mask is None else d_mask.view(torch.uint8),
                scores if d_lengths is None else d_lengths, score_out,
                scores if argmax is None else argmax, scores if pmax is None else pmax,
                scores if pidx is None else pidx,
            ),
            _int_arguments(q, d, q_mask, d_mask, d_lengths, n_qb, n_split, n_doc_blocks, split_len),
            constexprs,
            cfg.num_warps,
            cfg.num_stages,
        )  # fmt: skip
        finish(score_out, pmax, pidx, scores, argmax, R, Lq, n_split)
    return scores, argmax


def _plan_of(q, d, has_masks: tuple, normalize: bool, return_argmax: bool, config, n_split):
    """The launch plan of ``maxsim_fwd`` (``_padded_plan``), remembered per shape and flags unless a
    configuration or split is forced."""
    P, Qn, Lq, D = q.shape
    _, Dn, Ld, _ = d.shape
    device, dtype = q.device, q.dtype
    flags = (*has_masks, normalize, return_argmax, dot_precision(dtype))
    key = (device, dtype, P, Qn, Lq, D, Dn, Ld, flags)
    plan = _PLANS.get(key) if config is None and n_split is None else None
    if plan is None:
        plan = _padded_plan(device, dtype, P, Qn, Lq, D, Dn, Ld, flags, config, n_split)
        if config is None and n_split is None:
            if len(_PLANS) > 4096:
                _PLANS.clear()
            _PLANS[key] = plan
    return plan


def _int_arguments(q, d, q_mask, d_mask, d_lengths, n_qb, n_split, n_doc_blocks, split_len) -> tuple:
    """The int arguments of ``_maxsim_fwd_kernel``, in parameter order."""
    P, Qn, Lq, D = q.shape
    _, Dn, Ld, _ = d.shape
    return (
        Qn, Dn, Lq, Ld, D, P * Qn * Dn, *q.stride(), *d.stride(),
        *(_NO_MASK if q_mask is None else q_mask.stride()),
        *(_NO_MASK if d_mask is None else d_mask.stride()),
        *((0, 0) if d_lengths is None else d_lengths.stride()),
        n_qb, n_split, n_doc_blocks, split_len,
    )  # fmt: skip


class PreparedForward:
    """``maxsim_fwd`` without masks for repeat calls of one signature (shapes, strides, dtype, device and
    flags) that take a single launch: its plan, compiled kernel and int arguments are bound once, so a call
    costs the outputs' allocation and the launch. Made by ``prepare_fwd``.

    Calling it with ``q``, ``d`` of that signature returns ``(scores, argmax or None)``, or None when this
    call cannot take the bound launch (another current device, an argument's 16-byte alignment other than
    the compiled kernel's, a Triton launch hook set): the caller then takes ``maxsim_fwd``.
    """

    def __init__(self, compiled, programs: int, ints: tuple, values: tuple, q, d, return_argmax: bool):
        self.compiled = compiled
        self.grid = (programs, 1, 1)
        self.ints, self.values = ints, values
        self.device = q.device
        self.device_index = q.device.index
        self.shape = (q.shape[0], q.shape[1], d.shape[1])
        self.lq = q.shape[2]
        self.aligned = ((q.data_ptr() & 15) == 0, (d.data_ptr() & 15) == 0)
        self.return_argmax = return_argmax

    def __call__(self, q: torch.Tensor, d: torch.Tensor):
        if (
            torch.cuda.current_device() != self.device_index
            or ((q.data_ptr() & 15) == 0, (d.data_ptr() & 15) == 0) != self.aligned
            or launch_hooks_set()
        ):
            return None
        scores = torch.empty(self.shape, dtype=torch.float32, device=self.device)
        argmax = (
            torch.empty(*self.shape, self.lq, dtype=torch.int32, device=self.device) if self.return_argmax else None
        )
        if POISON:
            poison(scores, argmax)
        compiled = self.compiled
        compiled.run(
            *self.grid, torch._C._cuda_getCurrentRawStream(self.device_index), compiled.function,
            compiled.packed_metadata, None, None, None,
            q, d, scores, scores, scores, scores, scores if argmax is None else argmax, scores, scores,
            *self.ints, *self.values,
        )  # fmt: skip
        return scores, argmax


def prepare_fwd(q: torch.Tensor, d: torch.Tensor, *, normalize: bool, return_argmax: bool):
    """A ``PreparedForward`` for calls like ``maxsim_fwd(q, d, None, None, ...)`` (``q [P, Qn, Lq, D]``,
    ``d [P, Dn, Ld, D]`` on the current CUDA device, after one such call ran), or None where a call needs
    more than the one launch (split documents, several query blocks) or nothing to launch."""
    P, Qn, Lq, _ = q.shape
    Dn = d.shape[1]
    if P * Qn * Dn == 0 or q.device.index != torch.cuda.current_device():
        return None
    cfg, n_qb, n_doc_blocks, n_split, split_len, programs, constexprs = _plan_of(
        q, d, (False, False, False), normalize, return_argmax, None, None
    )
    if n_split > 1 or n_qb > 1:
        return None
    scores = torch.empty(P, Qn, Dn, dtype=torch.float32, device=q.device)
    argmax = torch.empty(P, Qn, Dn, Lq, dtype=torch.int32, device=q.device) if return_argmax else scores
    ints = _int_arguments(q, d, None, None, None, n_qb, n_split, n_doc_blocks, split_len)
    tensors = (q, d, scores, scores, scores, scores, argmax, scores, scores)
    compiled = _FWD.compiled_for(tensors, ints, constexprs, cfg.num_warps, cfg.num_stages)
    if compiled is None:
        return None
    return PreparedForward(compiled, programs, ints, tuple(constexprs.values()), q, d, return_argmax)
