"""Plain-torch MaxSim: slow, obvious, float64. The oracle of every test.

Nothing here is optimised or chunked; it materialises the full similarity tensor. It does no input
validation either: give it what the public API would accept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lengths_to_mask(lengths: torch.Tensor, length: int) -> torch.Tensor:
    """Prefix lengths ``[...]`` to a bool mask ``[..., length]`` (True = real token)."""
    return torch.arange(length, device=lengths.device) < lengths[..., None]


def maxsim_reference(
    q: torch.Tensor,
    d: torch.Tensor,
    *,
    q_mask: torch.Tensor | None = None,
    d_mask: torch.Tensor | None = None,
    q_lengths: torch.Tensor | None = None,
    d_lengths: torch.Tensor | None = None,
    normalize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference MaxSim with broadcast batch dims.

    Args:
        q: ``[..., Lq, D]`` query tokens, any float dtype.
        d: ``[..., Ld, D]`` document tokens; batch dims broadcast with ``q``'s.
        q_mask, d_mask: bool ``[..., Lq]`` / ``[..., Ld]``, True = real token.
        q_lengths, d_lengths: int ``[...]``, the prefix form of the masks.
        normalize: L2-normalize every token first (``F.normalize``, eps 1e-12).

    Returns:
        ``(scores, argmax)``: float64 ``[...]`` (differentiable in ``q`` and ``d``, the gradient of each
        max routed to its argmax) and int32 ``[..., Lq]``: the first winning document token, -1 for masked
        query tokens (and for documents without a real token, whose score is -inf).
    """
    Lq, Ld = q.shape[-2], d.shape[-2]
    q, d = q.double(), d.double()
    if normalize:
        q, d = F.normalize(q, dim=-1), F.normalize(d, dim=-1)
    if q_lengths is not None:
        q_mask = lengths_to_mask(q_lengths, Lq)
    if d_lengths is not None:
        d_mask = lengths_to_mask(d_lengths, Ld)
    sim = q @ d.transpose(-1, -2)  # [..., Lq, Ld]
    real_doc = torch.ones(Ld, dtype=torch.bool, device=d.device) if d_mask is None else d_mask[..., None, :]
    real_doc = real_doc.expand(sim.shape)
    best = sim.masked_fill(~real_doc, float("-inf")).amax(dim=-1)  # NaN wins, as in torch.max
    is_best = real_doc & ((sim == best[..., None]) | (sim.isnan() & best.isnan()[..., None]))
    found = is_best.any(dim=-1)
    argmax = torch.where(found, is_best.int().argmax(dim=-1), -1)
    picked = sim.gather(-1, argmax.clamp(min=0)[..., None])[..., 0]
    picked = torch.where(found, picked, float("-inf"))
    real_query = torch.ones(Lq, dtype=torch.bool, device=q.device) if q_mask is None else q_mask
    real_query = real_query.expand(picked.shape)
    scores = torch.where(real_query, picked, 0.0).sum(dim=-1)
    argmax = torch.where(real_query, argmax, -1)
    return scores, argmax.to(torch.int32)


def maxsim_varlen_reference(
    q: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    d: torch.Tensor,
    cu_seqlens_d: torch.Tensor,
    *,
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
    normalize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference MaxSim on packed tokens, one pair at a time.

    Args:
        q: ``[Tq, D]`` packed query tokens; ``cu_seqlens_q`` ``[Nq+1]`` their offsets.
        d: ``[Td, D]`` packed document tokens; ``cu_seqlens_d`` ``[Nd+1]``.
        pairs: ``None`` for all pairs, or ``(q_ids [P], d_ids [P])``.

    Returns:
        ``(scores, argmax)``: float64 ``[Nq, Nd]`` or ``[P]``, and int32 argmax padded to the longest query
        (``[Nq, Nd, max_Lq]`` or ``[P, max_Lq]``), -1 beyond a query's length.
    """
    cq, cd = cu_seqlens_q.tolist(), cu_seqlens_d.tolist()
    nq, nd = len(cq) - 1, len(cd) - 1
    max_lq = max(cq[i + 1] - cq[i] for i in range(nq))
    if pairs is None:
        q_ids = torch.arange(nq).repeat_interleave(nd).tolist()
        d_ids = torch.arange(nd).repeat(nq).tolist()
    else:
        q_ids, d_ids = pairs[0].tolist(), pairs[1].tolist()
    scores, argmaxes = [], []
    for qi, di in zip(q_ids, d_ids, strict=True):
        s, a = maxsim_reference(q[cq[qi] : cq[qi + 1]], d[cd[di] : cd[di + 1]], normalize=normalize)
        scores.append(s)
        argmaxes.append(F.pad(a, (0, max_lq - a.shape[0]), value=-1))
    scores = torch.stack(scores) if scores else q.new_zeros(0, dtype=torch.float64)
    argmax = torch.stack(argmaxes) if argmaxes else torch.zeros(0, max_lq, dtype=torch.int32)
    if pairs is None:
        return scores.reshape(nq, nd), argmax.reshape(nq, nd, max_lq)
    return scores, argmax
