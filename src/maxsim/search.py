"""Search: exact top-k documents per query over a corpus streamed in chunks.

``topk`` never holds the ``[Nq, N]`` score matrix: it scores ``chunk`` documents at a time with the
backends' forward (the Triton kernels on GPU, the torch backend elsewhere) and keeps a running top-k per
query on the device, so the scores held are at most ``Nq * (chunk + k)``. The result is that of the full
score matrix sorted by descending score with equal scores ordered by lower id (NaN counts as the largest,
as ``torch.sort`` has it).
"""

from __future__ import annotations

import torch

from . import validate as check
from .api import maxsim, maxsim_varlen
from .backends import get_backend

# Default chunk: at most this many float32 scores per chunk (64 MiB), and never fewer than 1 document.
CHUNK_SCORES = 1 << 24


def check_k(k, n: int) -> None:
    """``k`` is a Python int in ``[1, n]``."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be a Python int, got {type(k).__name__}")
    if k < 1 or k > n:
        raise ValueError(f"k must lie in [1, {n}] (the number of documents), got {k}")


def _check_chunk(chunk) -> None:
    if chunk is None:
        return
    if isinstance(chunk, bool) or not isinstance(chunk, int):
        raise TypeError(
            f"chunk must be a Python int (documents per chunk) or None, got {type(chunk).__name__}"
        )
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")


def merge_topk(
    best_scores: torch.Tensor, best_ids: torch.Tensor, scores: torch.Tensor, ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge new candidates into a running top-k.

    Args:
        best_scores: float32 ``[Nq, m]`` (m <= k), best first, equal scores by lower id; best_ids: int64.
        scores: float32 ``[Nq, c]``; ids: int64 ``[Nq, c]`` or ``[c]``, all above those in ``best_ids`` and,
            among equal scores, in increasing order.

    Returns:
        ``(scores, ids)`` ``[Nq, min(k, m + c)]``, best first, equal scores by lower id.
    """
    # Among equal scores the concatenation is in id order (kept ones first, all with lower ids), and a
    # stable sort keeps that order. The first chunk (nothing kept) is used as it is: no copies.
    if best_scores.shape[1] == 0:
        all_scores, all_ids = scores, ids.expand_as(scores)
    else:
        all_scores = torch.cat([best_scores, scores], dim=1)
        all_ids = torch.cat([best_ids, ids.expand_as(scores)], dim=1)
    order = torch.sort(all_scores, dim=1, descending=True, stable=True).indices[:, :k]
    return all_scores.gather(1, order), all_ids.gather(1, order)


def topk(
    q: torch.Tensor,
    d: torch.Tensor,
    k: int,
    *,
    q_mask: torch.Tensor | None = None,
    q_lengths: torch.Tensor | None = None,
    d_mask: torch.Tensor | None = None,
    d_lengths: torch.Tensor | None = None,
    cu_seqlens_d: torch.Tensor | None = None,
    chunk: int | None = None,
    normalize: bool = False,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best documents of a corpus for each query, exact, streaming the corpus in chunks.

    Args:
        q: ``[Nq, Lq, D]`` queries (or one query ``[Lq, D]``), float32/float16/bfloat16.
        d: the corpus, padded ``[N, Ld, D]`` or packed ``[T, D]`` with ``cu_seqlens_d`` int32/int64 ``[N+1]``;
            the same dtype and device as ``q``.
        k: how many documents per query, ``1 <= k <= N``.
        q_mask, q_lengths: the queries' real tokens (``[Nq, Lq]`` / ``[Nq]``), as in ``maxsim.maxsim``.
        d_mask, d_lengths: the padded corpus' real tokens (``[N, Ld]`` / ``[N]``); not with ``cu_seqlens_d``.
        chunk: documents scored per step (default: ``CHUNK_SCORES // Nq``); bounds the scores held to
            ``Nq * (chunk + k)`` float32.
        normalize, validate: as in ``maxsim.maxsim``.

    Returns:
        float32 scores ``[Nq, k]`` and int64 document ids ``[Nq, k]`` (``[k]`` each for a 2-D ``q``), best
        first, equal scores ordered by lower id.

    Raises:
        TypeError / ValueError: as ``maxsim.maxsim`` and ``maxsim.maxsim_varlen``, plus ``k`` outside
        ``[1, N]``, a ``chunk`` below 1, masks or lengths for a packed corpus.
    """
    check.check_tokens(q, "q")
    single = q.dim() == 2
    if q.dim() not in (2, 3):
        raise ValueError(f"q must have shape [Nq, Lq, D] or [Lq, D], got {tuple(q.shape)}")
    check.check_flag(normalize, "normalize")
    check.check_flag(validate, "validate")
    _check_chunk(chunk)
    packed = cu_seqlens_d is not None
    if packed:
        if d_mask is not None or d_lengths is not None:
            raise ValueError(
                "a packed corpus (cu_seqlens_d) takes no d_mask or d_lengths: its lengths are its offsets"
            )
        check.check_tokens(d, "d", rank=2)
        check.check_pair(q, d)
        longest = check.check_cu_seqlens(
            cu_seqlens_d, "cu_seqlens_d", d.shape[0], "d", check_values=validate, device=q.device
        )
        n = cu_seqlens_d.shape[0] - 1
    else:
        check.check_tokens(d, "d", rank=3)
        check.check_pair(q, d)
        n = d.shape[0]
    check_k(k, n)
    queries, q_mask = query_batch(q, q_mask, q_lengths, validate)
    if not packed and d_mask is None and d_lengths is not None:  # read by the kernels as lengths: no mask
        d_lengths = check.token_lengths(d, d_lengths, "d", check_values=validate)
    elif not packed:
        d_mask = check.token_mask(d, d_mask, d_lengths, "d", check_values=validate, require_real=True)
    with torch.no_grad():
        if packed:
            step = chunk_step(queries.shape[0], chunk)
            score_chunk = packed_scorer(queries, q_mask, d, cu_seqlens_d, longest, normalize, step)
        else:
            score_chunk = _padded_scorer(queries, q_mask, d, d_mask, d_lengths, normalize)
        best_scores, best_ids = stream_topk(score_chunk, n, queries.shape[0], k, chunk, q.device)
    if single:
        return best_scores[0], best_ids[0]
    return best_scores, best_ids


def query_batch(q, q_mask, q_lengths, validate: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Queries as a batch ``[Nq, Lq, D]`` (a 2-D ``q`` gets a batch of one) and their bool mask or None."""
    if q.dim() == 3:
        return q, check.token_mask(q, q_mask, q_lengths, "q", check_values=validate, require_real=False)
    q_mask = None if q_mask is None else q_mask[None]
    q_lengths = None if q_lengths is None else q_lengths[None]
    return q[None], check.token_mask(
        q[None], q_mask, q_lengths, "q", check_values=validate, require_real=False
    )


def chunk_step(nq: int, chunk: int | None) -> int:
    """Documents per chunk for ``nq`` queries: ``chunk``, or as many as ``CHUNK_SCORES`` scores allow."""
    return chunk if chunk is not None else max(1, CHUNK_SCORES // max(nq, 1))


def stream_topk(score_chunk, n: int, nq: int, k: int, chunk: int | None, device: torch.device):
    """Running top-k over documents ``[0, n)`` scored ``chunk_step(nq, chunk)`` at a time by
    ``score_chunk(start, stop)`` (float32 ``[Nq, stop - start]``): float32 scores and int64 positions
    ``[Nq, k]``."""
    step = chunk_step(nq, chunk)
    best_scores = torch.empty(nq, 0, dtype=torch.float32, device=device)
    best_ids = torch.empty(nq, 0, dtype=torch.int64, device=device)
    for start in range(0, n, step):
        stop = min(n, start + step)
        ids = torch.arange(start, stop, device=device)
        best_scores, best_ids = merge_topk(best_scores, best_ids, score_chunk(start, stop), ids, k)
    return best_scores, best_ids


def _padded_scorer(queries, q_mask, d, d_mask, d_lengths, normalize):
    """``score(start, stop)``: float32 ``[Nq, stop - start]`` for documents ``[start, stop)`` of a padded corpus
    (``d_mask [N, Ld]`` or ``d_lengths [N]``, checked, or neither)."""

    def score(start: int, stop: int) -> torch.Tensor:
        return maxsim(
            queries[:, None], d[None, start:stop],
            q_mask=None if q_mask is None else q_mask[:, None],
            d_mask=None if d_mask is None else d_mask[None, start:stop],
            d_lengths=None if d_lengths is None else d_lengths[None, start:stop],
            normalize=normalize, validate=False,
        )  # fmt: skip

    return score


def packed_scorer(
    queries, q_mask, d, cu_d, longest, normalize, step, d_scales=None, starts=None, q_scales=None
):
    """``score(start, stop)`` for a packed corpus, for the chunks of ``stream_topk`` (``step`` documents
    each): the queries packed once (masked tokens dropped, which is what a mask means), each chunk of
    documents a slice of ``d`` with its own offsets.

    ``longest``: the longest document, or None (found on the device here).
    ``d_scales``: float32 ``[T]`` for int8/float8_e4m3fn ``d`` (``Index`` storage): the chunks go straight
    to the backend's ``maxsim_varlen_scaled`` (only where its ``reads_quantized``), which reads the codes in
    place (the Triton varlen kernel, the CPU kernel).
    ``q_scales``: float32 ``[Nq, Lq]`` with ``queries`` quantized to ``d``'s dtype (only where the backend's
    ``dots_quantized``): packed with the queries and passed on.
    ``starts``: ``cu_d`` as a host list when the caller keeps one; else only the chunks' inner boundaries are
    copied from the device (one small copy, not the whole ``cu_d``; none for a single chunk).
    """
    nq, lq = queries.shape[0], queries.shape[1]
    device = queries.device
    if q_mask is None:  # every token real: the queries as they are, nothing read back from the device
        q_packed = queries.reshape(nq * lq, queries.shape[2])
        qs_packed = None if q_scales is None else q_scales.reshape(nq * lq)
        cu_q_nonempty = torch.arange(0, (nq + 1) * lq, lq, dtype=torch.int64, device=device)
        kept = None  # every query
    else:
        counts = q_mask.sum(dim=1)
        has_tokens = counts > 0  # a query without a real token scores 0 everywhere
        cu_q = torch.zeros(nq + 1, dtype=torch.int64, device=device)
        cu_q[1:] = counts.cumsum(0)
        q_packed = queries[q_mask]
        qs_packed = None if q_scales is None else q_scales[q_mask]
        cu_q_nonempty = torch.cat([cu_q[:1], cu_q[1:][has_tokens]])
        kept = has_tokens.nonzero()[:, 0]
    offsets = cu_d.to(torch.int64)
    if starts is None:  # the token offsets of the chunks' boundaries: the first and the last are known (the
        # offsets run from 0 to d's token count), those between come in one copy to the host (none when one
        # chunk holds the corpus: repeated searches then never wait on the device)
        n = offsets.shape[0] - 1
        inner = list(range(step, n, step))
        starts = {0: 0, n: d.shape[0]}
        if inner:
            starts |= dict(zip(inner, offsets[inner].tolist(), strict=True))
    if longest is None:
        longest = int((offsets[1:] - offsets[:-1]).max())
    code_dots = {} if q_scales is None else {"q_scales": qs_packed}  # only backends that dots_quantized

    def score_kept(start: int, stop: int) -> torch.Tensor:  # [queries with a real token, stop - start]
        t0, t1 = starts[start], starts[stop]
        if d_scales is None:
            return maxsim_varlen(
                q_packed, cu_q_nonempty, d[t0:t1], offsets[start : stop + 1] - t0,
                max_seqlen_q=lq, max_seqlen_d=longest, normalize=normalize, validate=False,
            )  # fmt: skip
        return get_backend(device).maxsim_varlen_scaled(
            q_packed, cu_q_nonempty, d[t0:t1], offsets[start : stop + 1] - t0, d_scales[t0:t1],
            max_lq=lq, max_ld=longest, normalize=normalize, **code_dots,
        )  # fmt: skip

    def score(start: int, stop: int) -> torch.Tensor:
        if kept is None:
            return score_kept(start, stop)
        out = torch.zeros(nq, stop - start, dtype=torch.float32, device=device)
        if kept.numel():
            out[kept] = score_kept(start, stop)
        return out

    return score
