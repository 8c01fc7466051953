"""Exact, memory-bounded torch backend (CPU, MPS, any torch device); forward and backward.

The similarity of a query token and a document token is only ever computed in blocks: every temporary
of one block (similarities, float32 copies of the tokens, the block's maxima) fits the memory budget
(``MAXSIM_MEMORY_BUDGET`` bytes, default 256 MiB). On the CPU the blocks are smaller still, sized for the
caches (L3). All arithmetic is float32 (float64 inputs stay float64).

Autograd keeps the inputs and the int32 argmax of each (query token, document) only; the backward
gathers the winning tokens from that argmax, block by block.

CPU calls (float32, float16, bfloat16) of the padded layouts and of varlen sequences take the AVX2 kernel
of ``cpu_kernel`` instead of the blocks of matrix products, where it is built and the CPU runs it (no
similarity block at all).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from maxsim.backends import cpu_kernel
from maxsim.reference import lengths_to_mask

DEFAULT_MEMORY_BUDGET = 256 * 2**20
CPU_BLOCK_BYTES = 16 * 2**20  # L3-sized: fewer parallel regions, which also keeps it fast on a busy machine
NORMALIZE_EPS = 1e-12


def memory_budget() -> int:
    """The largest number of bytes of temporaries one block may hold."""
    value = os.environ.get("MAXSIM_MEMORY_BUDGET")
    if value is None:
        return DEFAULT_MEMORY_BUDGET
    try:
        budget = int(value)
    except ValueError:
        raise ValueError(f"MAXSIM_MEMORY_BUDGET must be a number of bytes, got {value!r}") from None
    if budget < 1:
        raise ValueError(f"MAXSIM_MEMORY_BUDGET must be >= 1 byte, got {budget}")
    return budget


def _similarity_block_bytes(device: torch.device, budget: int) -> int:
    """The size of the similarity blocks: cache-sized on the CPU, the whole budget elsewhere."""
    return min(budget, CPU_BLOCK_BYTES) if device.type == "cpu" else budget


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prepare(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    """A block of tokens in the compute dtype, L2-normalized when asked."""
    x = x.to(_compute_dtype(x.dtype))
    return F.normalize(x, dim=-1, eps=NORMALIZE_EPS) if normalize else x


def inverse_norms(x: torch.Tensor) -> torch.Tensor:
    """float32 ``1 / max(|row|, eps)`` of every row of ``x [..., D]`` (``F.normalize``'s), contiguous."""
    norms = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)
    return norms.clamp_min_(NORMALIZE_EPS).reciprocal_().contiguous()


def normalize_backward(x: torch.Tensor, grad_normalized: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. ``x`` of ``F.normalize(x, dim=-1)`` given the gradient w.r.t. its output."""
    x = x.to(grad_normalized.dtype)
    norm = x.norm(dim=-1, keepdim=True)
    unit = x / norm.clamp_min(NORMALIZE_EPS)
    radial = (unit * grad_normalized).sum(dim=-1, keepdim=True)
    return torch.where(
        norm > NORMALIZE_EPS, (grad_normalized - unit * radial) / norm, grad_normalized / NORMALIZE_EPS
    )


def _fit(sizes: dict[str, int], fits) -> dict[str, int]:
    """Chunk sizes with ``fits(**chunks)``: each axis, in the order of ``sizes``, is cut to the largest
    size that fits while the axes after it are whole (or to 1 when even 1 does not fit)."""
    chunks = {name: max(size, 1) for name, size in sizes.items()}
    for name in sizes:
        if fits(**chunks):
            break
        low, high = 1, chunks[name]  # the largest size in [1, high] that fits, else 1
        while low < high:
            middle = (low + high + 1) // 2
            if fits(**{**chunks, name: middle}):
                low = middle
            else:
                high = middle - 1
        chunks[name] = low
    return chunks


def _ranges(total: int, step: int):
    for start in range(0, total, step):
        yield start, min(start + step, total)


def _add_rows(out: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    """``out[rows] += values`` for ``out [R, D]``, ``rows`` int64 ``[n]`` (repeats allowed), ``values [n, D]``.

    On the CPU and CUDA repeated rows are summed in one fixed order (bitwise the same every run): the CPU's
    ``index_add_`` adds the values one after another (its ``index_put_`` uses threaded atomic adds for large
    float32 inputs); CUDA's (and XPU's) ``index_put_`` with ``accumulate`` sorts the rows, then adds each row's
    values in order (its ``index_add_`` uses atomics). MPS uses atomics for both: not deterministic there."""
    if out.device.type == "cpu":
        out.index_add_(0, rows, values)
    else:
        out.index_put_((rows,), values, accumulate=True)


def _similarities(d_block: torch.Tensor, q_columns: torch.Tensor) -> torch.Tensor:
    """``d_block [p, M, D]`` times ``q_columns [p, D, N]`` (contiguous): ``[p, M, N]``.

    One group goes through ``mm``: on the CPU a batched ``bmm`` of one matrix is several times slower.
    """
    if d_block.shape[0] == 1:
        return torch.mm(d_block[0], q_columns[0])[None]
    return torch.bmm(d_block, q_columns)


def _first_real_token(d_mask: torch.Tensor) -> torch.Tensor:
    """Index of the first True of each row of ``d_mask [..., Ld]``; -1 for a row without one."""
    return torch.where(d_mask.any(dim=-1), d_mask.int().argmax(dim=-1), -1)


def forward_padded(
    q: torch.Tensor,
    d: torch.Tensor,
    q_mask: torch.Tensor | None,
    d_mask: torch.Tensor | None,
    *,
    normalize: bool,
    need_argmax: bool,
    budget: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """MaxSim of every query of a group against every document of the same group (no autograd).

    Args:
        q: ``[P, Qn, Lq, D]``; d: ``[P, Dn, Ld, D]``, one float dtype (any strides).
        q_mask: bool ``[P, Qn, Lq]`` or None; d_mask: bool ``[P, Dn, Ld]`` or None (True = real).
        need_argmax: also return the argmax (slower than a plain max).
        budget: the most bytes of temporaries a block may hold (default: ``memory_budget()``); on the CPU
            the similarities of a block are further kept cache-sized.

    Returns:
        scores float32 (float64 for float64 inputs) ``[P, Qn, Dn]`` and int32 argmax ``[P, Qn, Dn, Lq]``
        (-1 for masked query tokens) or None.
    """
    if cpu_kernel.applies(q, d):
        return cpu_kernel.forward_padded(q, d, q_mask, d_mask, normalize=normalize, need_argmax=need_argmax)
    P, Qn, Lq, D = q.shape
    Dn, Ld = d.shape[1], d.shape[2]
    dtype = _compute_dtype(q.dtype)
    item = torch.finfo(dtype).bits // 8
    budget = memory_budget() if budget is None else budget
    similarity_limit = _similarity_block_bytes(q.device, budget)

    copies_d = normalize or d.dtype != dtype  # else a document block is a view, not a copy

    def fits(p, d, q, l):  # noqa: E741 - chunk sizes named after the axes they cut
        sim = p * q * Lq * d * l * item
        copies = (d * l * copies_d + 2 * q * Lq) * D * item
        maxima = d * q * Lq * (item + 8)
        return sim <= similarity_limit and sim + p * (copies + maxima + d * l) <= budget

    chunk = _fit({"p": P, "d": Dn, "q": Qn, "l": Ld}, fits)
    if chunk["l"] < Ld:
        chunk["d"] = 1  # a block cuts one document's tokens, or holds whole documents
    scores = torch.empty(P, Qn, Dn, dtype=dtype, device=q.device)
    argmax = torch.empty(P, Qn, Dn, Lq, dtype=torch.int32, device=q.device) if need_argmax else None
    for p0, p1 in _ranges(P, chunk["p"]):
        for q0, q1 in _ranges(Qn, chunk["q"]):
            q_block = _prepare(q[p0:p1, q0:q1], normalize).reshape(p1 - p0, (q1 - q0) * Lq, D)
            q_columns = q_block.transpose(1, 2).contiguous()
            for d0, d1 in _ranges(Dn, chunk["d"]):
                best, best_index = None, None
                for l0, l1 in _ranges(Ld, chunk["l"]):
                    d_block = _prepare(d[p0:p1, d0:d1, l0:l1], normalize)
                    sim = _similarities(d_block.reshape(p1 - p0, -1, D), q_columns)
                    sim = sim.view(p1 - p0, d1 - d0, l1 - l0, (q1 - q0) * Lq)
                    if d_mask is not None:
                        sim.masked_fill_(~d_mask[p0:p1, d0:d1, l0:l1, None], float("-inf"))
                    if not need_argmax:
                        value = sim.amax(dim=2)
                        best = value if best is None else torch.maximum(best, value)
                        continue
                    value, index = sim.max(dim=2)
                    if best is None:
                        best, best_index = value, index
                        continue
                    better = (value > best) | (value.isnan() & ~best.isnan())
                    best = torch.where(better, value, best)
                    best_index = torch.where(better, index + l0, best_index)
                # best: [p, d, q * Lq] -> [p, q, d, Lq]
                best = best.view(p1 - p0, d1 - d0, q1 - q0, Lq).transpose(1, 2)
                real_query = None if q_mask is None else q_mask[p0:p1, q0:q1, None, :]
                kept = best if real_query is None else torch.where(real_query, best, 0.0)
                scores[p0:p1, q0:q1, d0:d1] = kept.sum(dim=-1)
                if not need_argmax:
                    continue
                best_index = best_index.view(p1 - p0, d1 - d0, q1 - q0, Lq).transpose(1, 2)
                if d_mask is not None:  # all-(-inf) maxima: the first real token wins, never a masked one
                    first = _first_real_token(d_mask[p0:p1, d0:d1])[:, None, :, None]
                    best_index = torch.where(best == float("-inf"), first, best_index)
                if real_query is not None:
                    best_index = torch.where(real_query, best_index, -1)
                argmax[p0:p1, q0:q1, d0:d1] = best_index
    return scores, argmax


def backward_padded(
    q: torch.Tensor,
    d: torch.Tensor,
    argmax: torch.Tensor,
    grad_scores: torch.Tensor,
    *,
    normalize: bool,
    need_dq: bool = True,
    need_dd: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``forward_padded``'s scores from its argmax.

    Args:
        q: ``[P, Qn, Lq, D]``; d: ``[P, Dn, Ld, D]``; argmax: int32 ``[P, Qn, Dn, Lq]`` (-1: no gradient).
        grad_scores: ``[P, Qn, Dn]``.

    Returns:
        ``(dq, dd)`` in the input dtype, shaped like ``q`` and ``d`` (None where not needed).
    """
    if cpu_kernel.applies(q, d):
        return _kernel_gradients(
            q, d, normalize,
            lambda *norms: cpu_kernel.backward_padded(q, d, argmax, grad_scores, *norms, need_dq=need_dq, need_dd=need_dd),
        )  # fmt: skip
    P, Qn, Lq, D = q.shape
    Dn, Ld = d.shape[1], d.shape[2]
    dtype = _compute_dtype(q.dtype)
    item = torch.finfo(dtype).bits // 8

    def fits(p, d, q):
        gathered = 2 * q * d * Lq * D * item  # winning tokens and their weighted copies
        return p * (gathered + 2 * d * Ld * D * item + q * Lq * D * item) <= memory_budget()

    chunk = _fit({"p": P, "d": Dn, "q": Qn}, fits)
    grad_scores = grad_scores.to(dtype)
    dq_normalized = torch.zeros(P, Qn, Lq, D, dtype=dtype, device=q.device) if need_dq else None
    dd = torch.empty_like(d, memory_format=torch.contiguous_format) if need_dd else None
    for p0, p1 in _ranges(P, chunk["p"]):
        groups = torch.arange(p1 - p0, device=q.device)[:, None, None, None]
        for d0, d1 in _ranges(Dn, chunk["d"]):
            d_block = _prepare(d[p0:p1, d0:d1], normalize)  # [p, d, Ld, D]
            dd_block = torch.zeros(d_block.shape, dtype=dtype, device=q.device) if need_dd else None
            docs = torch.arange(d1 - d0, device=q.device)[None, None, :, None]
            for q0, q1 in _ranges(Qn, chunk["q"]):
                winner = argmax[p0:p1, q0:q1, d0:d1].long()  # [p, q, d, Lq]
                real = (winner >= 0)[..., None]
                winner = winner.clamp(min=0)
                weight = grad_scores[p0:p1, q0:q1, d0:d1, None, None]  # [p, q, d, 1, 1]
                if need_dq:
                    won = d_block[groups, docs, winner]  # [p, q, d, Lq, D]
                    dq_normalized[p0:p1, q0:q1] += torch.where(real, weight * won, 0.0).sum(dim=2)
                if need_dd:
                    q_block = _prepare(q[p0:p1, q0:q1], normalize)[:, :, None]  # [p, q, 1, Lq, D]
                    rows = ((groups * (d1 - d0) + docs) * Ld + winner).reshape(-1)
                    _add_rows(dd_block.view(-1, D), rows, torch.where(real, weight * q_block, 0.0).reshape(-1, D))
            if need_dd:
                if normalize:
                    dd_block = normalize_backward(d[p0:p1, d0:d1], dd_block)
                dd[p0:p1, d0:d1] = dd_block
    return _from_normalized(q, dq_normalized, normalize), dd


class PaddedMaxSim(torch.autograd.Function):
    """``forward_padded`` with autograd; saves the inputs and the int32 argmax only."""

    @staticmethod
    def forward(ctx, q, d, q_mask, d_mask, normalize):
        scores, argmax = forward_padded(q, d, q_mask, d_mask, normalize=normalize, need_argmax=True)
        ctx.save_for_backward(q, d, argmax)
        ctx.normalize = normalize
        ctx.mark_non_differentiable(argmax)
        ctx.set_materialize_grads(False)  # no zeros the size of the argmax for its (never used) gradient
        return scores, argmax

    @staticmethod
    def backward(ctx, grad_scores, grad_argmax):
        if grad_scores is None:  # undefined (not materialized): no gradient flows (gradcheck checks this)
            return None, None, None, None, None
        q, d, argmax = ctx.saved_tensors
        dq, dd = backward_padded(
            q,
            d,
            argmax,
            grad_scores,
            normalize=ctx.normalize,
            need_dq=ctx.needs_input_grad[0],
            need_dd=ctx.needs_input_grad[1],
        )
        return dq, dd, None, None, None


def maxsim_padded(q, d, q_mask, d_mask, *, d_lengths=None, normalize: bool, return_argmax: bool):
    """Backend entry point for padded groups: see ``forward_padded`` for shapes; ``d_lengths`` (integer
    ``[P, Dn]``, any strides, or None) is the prefix form of ``d_mask`` (a call gives one or neither)."""
    if d_lengths is not None:
        d_mask = lengths_to_mask(d_lengths, d.shape[2])
    if torch.is_grad_enabled() and (q.requires_grad or d.requires_grad):
        return PaddedMaxSim.apply(q, d, q_mask, d_mask, normalize)
    return forward_padded(q, d, q_mask, d_mask, normalize=normalize, need_argmax=return_argmax)


# ---------------------------------------------------------------------------------------------------
# Packed (varlen) sequences: blocks of whole sequences are padded into bounded buffers on the fly.


def _padded_sequences(
    x, cu: torch.Tensor, ids: torch.Tensor, max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences ``ids`` of packed ``x [T, D]`` padded to ``[n, max_len, D]`` (a copy), and their mask."""
    start, end = cu[ids].long(), cu[ids + 1].long()
    position = start[:, None] + torch.arange(max_len, device=cu.device)
    mask = position < end[:, None]
    position = torch.where(mask, position, 0)
    return x.index_select(0, position.reshape(-1)).view(*position.shape, x.shape[-1]), mask


def _pairs_grid(nq: int, nd: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    q_ids = torch.arange(nq, device=device).repeat_interleave(nd)
    return q_ids, torch.arange(nd, device=device).repeat(nq)


def _all_pairs_scores_packed(q, cu_q, d, cu_d, *, normalize: bool, rows: int) -> torch.Tensor:
    """All-pairs scores of packed CPU sequences without padding: blocks of whole documents (at most
    ``rows`` tokens, or one longer document) times every query token, then a max per document segment and
    a sum per query segment. Returns ``[Nq, Nd]``."""
    q_owner = torch.repeat_interleave(torch.arange(cu_q.shape[0] - 1), (cu_q[1:] - cu_q[:-1]).long())
    q_columns = _prepare(q, normalize).T.contiguous()  # [D, Tq]
    scores = torch.zeros(cu_d.shape[0] - 1, cu_q.shape[0] - 1, dtype=q_columns.dtype)
    offsets = cu_d.tolist()
    d0 = 0
    while d0 < len(offsets) - 1:
        d1 = d0 + 1
        while d1 < len(offsets) - 1 and offsets[d1 + 1] - offsets[d0] <= rows:
            d1 += 1
        t0, t1 = offsets[d0], offsets[d1]
        sim = torch.mm(_prepare(d[t0:t1], normalize), q_columns)  # [tokens, Tq]
        lengths = torch.tensor(offsets[d0 + 1 : d1 + 1]) - torch.tensor(offsets[d0:d1])
        best = torch.segment_reduce(sim, "max", lengths=lengths, axis=0)  # [docs, Tq]; NaN propagates
        scores[d0:d1].index_add_(1, q_owner, best)
        d0 = d1
    return scores.T


def forward_varlen(q, cu_q, d, cu_d, q_ids, d_ids, *, max_lq, max_ld, normalize, need_argmax):
    """MaxSim of packed sequences (no autograd).

    Args:
        q: ``[Tq, D]``, ``cu_q`` ``[Nq+1]``; d: ``[Td, D]``, ``cu_d`` ``[Nd+1]``.
        q_ids, d_ids: int64 ``[P]`` listed pairs, or both None for all pairs.
        max_lq, max_ld: Python ints >= the longest query / document.

    Returns:
        scores ``[Nq, Nd]`` or ``[P]`` and int32 argmax ``[..., max_lq]`` (-1 beyond a query) or None.
    """
    if cpu_kernel.applies(q, d):
        return cpu_kernel.forward_varlen(
            q, cu_q, d, cu_d, q_ids, d_ids, max_lq=max_lq, max_ld=max_ld, normalize=normalize,
            need_argmax=need_argmax,
        )  # fmt: skip
    D = q.shape[-1]
    item = torch.finfo(_compute_dtype(q.dtype)).bits // 8
    # Padded copies are made a few MiB at a time on the CPU (cache-sized gathers run several times faster)
    # and half the budget at a time elsewhere; the blocks scored from them get the other half.
    budget = max(memory_budget() // 2, 1)
    gather_limit = _similarity_block_bytes(q.device, budget) // (4 if q.device.type == "cpu" else 1)
    copies_d = normalize or d.dtype != _compute_dtype(d.dtype)  # a packed block is then copied too
    similarity_rows = _similarity_block_bytes(q.device, budget) // ((q.shape[0] + copies_d * D) * item)
    if q_ids is None and not need_argmax and q.device.type == "cpu" and max_ld <= similarity_rows:
        return _all_pairs_scores_packed(q, cu_q, d, cu_d, normalize=normalize, rows=similarity_rows), None
    if q_ids is None:  # all pairs: every query against blocks of padded documents
        nq, nd = cu_q.shape[0] - 1, cu_d.shape[0] - 1
        q_padded, q_mask = _padded_sequences(q, cu_q, torch.arange(nq, device=q.device), max_lq)
        scores = torch.empty(nq, nd, dtype=_compute_dtype(q.dtype), device=q.device)
        argmax = torch.empty(nq, nd, max_lq, dtype=torch.int32, device=q.device) if need_argmax else None
        step = max(1, gather_limit // (max_ld * D * item))
        for d0, d1 in _ranges(nd, step):
            d_padded, d_mask = _padded_sequences(d, cu_d, torch.arange(d0, d1, device=q.device), max_ld)
            s, a = forward_padded(
                q_padded[None], d_padded[None], q_mask[None], d_mask[None],
                normalize=normalize, need_argmax=need_argmax, budget=budget,
            )  # fmt: skip
            scores[:, d0:d1] = s[0]
            if need_argmax:
                argmax[:, d0:d1] = a[0]
        return scores, argmax
    n = q_ids.shape[0]
    scores = torch.empty(n, dtype=_compute_dtype(q.dtype), device=q.device)
    argmax = torch.empty(n, max_lq, dtype=torch.int32, device=q.device) if need_argmax else None
    step = max(1, gather_limit // ((max_ld + max_lq) * D * item))
    for p0, p1 in _ranges(n, step):
        q_padded, q_mask = _padded_sequences(q, cu_q, q_ids[p0:p1], max_lq)
        d_padded, d_mask = _padded_sequences(d, cu_d, d_ids[p0:p1], max_ld)
        s, a = forward_padded(
            q_padded[:, None], d_padded[:, None], q_mask[:, None], d_mask[:, None],
            normalize=normalize, need_argmax=need_argmax, budget=budget,
        )  # fmt: skip
        scores[p0:p1] = s[:, 0, 0]
        if need_argmax:
            argmax[p0:p1] = a[:, 0, 0]
    return scores, argmax


def _from_normalized(x: torch.Tensor, grad: torch.Tensor | None, normalize: bool) -> torch.Tensor | None:
    """A float32 gradient with respect to the (normalized, with ``normalize``) tokens as ``x``'s gradient, in
    ``x``'s dtype."""
    if grad is None:
        return None
    return (normalize_backward(x, grad) if normalize else grad).to(x.dtype)


def _kernel_gradients(q: torch.Tensor, d: torch.Tensor, normalize: bool, kernel_backward) -> tuple:
    """``(dq, dd)`` in ``q``'s / ``d``'s dtype (None where not needed) from the CPU kernel's float32 gradients
    ``kernel_backward(q_inv, d_inv)``, given the inverse norms of normalized tokens (None: raw tokens)."""
    norms = (inverse_norms(q), inverse_norms(d)) if normalize else (None, None)
    dq, dd = kernel_backward(*norms)
    return _from_normalized(q, dq, normalize), _from_normalized(d, dd, normalize)


def backward_varlen(q, cu_q, d, cu_d, q_ids, d_ids, argmax, grad_scores, *, normalize, need_dq, need_dd):
    """Gradients of ``forward_varlen``'s scores from its argmax, deterministic: each row's sum in pair order,
    on the CPU kernel where it applies (one thread per row), else over blocks of pairs by ``_add_rows``."""
    if cpu_kernel.applies(q, d):
        return _kernel_gradients(
            q, d, normalize,
            lambda *norms: cpu_kernel.backward_varlen(
                q, cu_q, d, cu_d, q_ids, d_ids, argmax, grad_scores, *norms, need_dq=need_dq, need_dd=need_dd
            ),
        )  # fmt: skip
    if q_ids is None:
        q_ids, d_ids = _pairs_grid(cu_q.shape[0] - 1, cu_d.shape[0] - 1, q.device)
        argmax = argmax.reshape(-1, argmax.shape[-1])
        grad_scores = grad_scores.reshape(-1)
    D, max_lq = q.shape[-1], argmax.shape[-1]
    dtype = _compute_dtype(q.dtype)
    item = torch.finfo(dtype).bits // 8
    step = max(1, memory_budget() // (6 * max_lq * D * item))
    grad_scores = grad_scores.to(dtype)
    dq = torch.zeros(q.shape, dtype=dtype, device=q.device) if need_dq else None
    dd = torch.zeros(d.shape, dtype=dtype, device=q.device) if need_dd else None
    for p0, p1 in _ranges(q_ids.shape[0], step):
        winner = argmax[p0:p1].long()  # [p, max_lq]
        real = winner >= 0
        q_token = (cu_q[q_ids[p0:p1]].long()[:, None] + torch.arange(max_lq, device=q.device))[real]
        d_token = (cu_d[d_ids[p0:p1]].long()[:, None] + winner)[real]
        weight = grad_scores[p0:p1, None].expand_as(winner)[real][:, None]
        if need_dq:
            _add_rows(dq, q_token, weight * _prepare(d[d_token], normalize))
        if need_dd:
            _add_rows(dd, d_token, weight * _prepare(q[q_token], normalize))
    return _from_normalized(q, dq, normalize), _from_normalized(d, dd, normalize)


class VarlenMaxSim(torch.autograd.Function):
    """``forward_varlen`` with autograd; saves the inputs and the int32 argmax only."""

    @staticmethod
    def forward(ctx, q, cu_q, d, cu_d, q_ids, d_ids, max_lq, max_ld, normalize):
        scores, argmax = forward_varlen(
            q, cu_q, d, cu_d, q_ids, d_ids,
            max_lq=max_lq, max_ld=max_ld, normalize=normalize, need_argmax=True,
        )  # fmt: skip
        ctx.save_for_backward(q, cu_q, d, cu_d, q_ids, d_ids, argmax)
        ctx.normalize = normalize
        ctx.mark_non_differentiable(argmax)
        ctx.set_materialize_grads(False)
        return scores, argmax

    @staticmethod
    def backward(ctx, grad_scores, grad_argmax):
        if grad_scores is None:  # undefined (not materialized): no gradient flows
            return (None,) * 9
        q, cu_q, d, cu_d, q_ids, d_ids, argmax = ctx.saved_tensors
        dq, dd = backward_varlen(
            q, cu_q, d, cu_d, q_ids, d_ids, argmax, grad_scores, normalize=ctx.normalize,
            need_dq=ctx.needs_input_grad[0], need_dd=ctx.needs_input_grad[2],
        )  # fmt: skip
        return dq, None, dd, None, None, None, None, None, None


def maxsim_varlen(q, cu_q, d, cu_d, q_ids, d_ids, *, max_lq, max_ld, normalize, return_argmax):
    """Backend entry point for packed sequences: see ``forward_varlen`` for shapes."""
    if torch.is_grad_enabled() and (q.requires_grad or d.requires_grad):
        return VarlenMaxSim.apply(q, cu_q, d, cu_d, q_ids, d_ids, max_lq, max_ld, normalize)
    return forward_varlen(
        q, cu_q, d, cu_d, q_ids, d_ids,
        max_lq=max_lq, max_ld=max_ld, normalize=normalize, need_argmax=return_argmax,
    )  # fmt: skip


def dots_quantized(q: torch.Tensor, d: torch.Tensor) -> bool:
    """Whether ``maxsim_varlen_scaled`` takes queries quantized to ``d``'s dtype: never (the torch backend multiplies 16-bit queries only)."""
    return False


def reads_quantized(q: torch.Tensor, d: torch.Tensor) -> bool:
    """Whether ``maxsim_varlen_scaled`` takes queries ``q`` and quantized documents ``d`` here: the CPU
    kernel's (``cpu_kernel.applies_scaled``); elsewhere callers widen the codes themselves."""
    return cpu_kernel.applies_scaled(q, d)


def maxsim_varlen_scaled(q, cu_q, d, cu_d, d_scales, *, max_lq: int, max_ld: int, normalize: bool):
    """All-pairs scores float32 ``[Nq, Nd]`` of packed queries ``q [Tq, D]`` against packed int8 /
    float8_e4m3fn codes ``d [Td, D]`` (token ``t`` is ``d[t] * d_scales[t]``, ``d_scales`` float32 ``[Td]``),
    read in place by the CPU kernel (where ``reads_quantized``): nothing is dequantized into memory."""
    return cpu_kernel.forward_varlen(
        q, cu_q, d, cu_d, None, None,
        max_lq=max_lq, max_ld=max_ld, normalize=normalize, need_argmax=False, d_scales=d_scales,
    )[0]  # fmt: skip
