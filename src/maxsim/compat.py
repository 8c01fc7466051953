"""Seed-compatible names: the API of the original kernels-hub ``maxsim`` package.

Code written for the Hugging Face kernels-hub kernel ``erikkaum/maxsim`` (source: the GitHub repository
ErikKaum/maxsim, ``torch-ext/maxsim/__init__.py`` and ``reference.py``) switches to this package by
changing one import::

    maxsim = get_kernel("erikkaum/maxsim", version=1)   # before
    import maxsim.compat as maxsim                       # after

Every function keeps the original's name, argument names and order, shapes, dtypes and conventions, and
is a thin wrapper over :func:`maxsim.maxsim` / :func:`maxsim.maxsim_varlen` (the ``*_reference``
functions wrap :mod:`maxsim.reference`):

| compat name | what it calls |
| --- | --- |
| `score_pairs_packed` | `maxsim_varlen(queries, query_offsets, documents, document_offsets,` |
| | `pairs=(pair_query_ids, pair_document_ids), max_seqlen_q=max_q_len)` |
| `score_pairs_packed_with_argmax` | the same, `return_argmax=True`; argmax `[P, max_q_len]` |
| `score_pairs_packed_train` | the same as `score_pairs_packed` |
| `score_candidates_padded` | `maxsim(queries[:, None], documents,` |
| | `q_lengths=query_lengths[:, None], d_lengths=doc_lengths)` |
| `score_candidates_padded_with_argmax` | the same, `return_argmax=True`; argmax `[B, C, Lq]` |
| `score_candidates_padded_train` | the same as `score_candidates_padded` |
| `score_contrastive` | `maxsim_varlen(queries.reshape(Nq * Lq, D), [0, Lq, 2 Lq, ..., Nq Lq],` |
| | `documents, document_offsets, max_seqlen_q=Lq)` (all pairs) |
| `score_contrastive_with_argmax` | the same, `return_argmax=True`; argmax `[Nq, Nb, Lq]` |
| `score_contrastive_train` | the same as `score_contrastive` |
| `maxsim_reference`, `maxsim_reference_with_argmax` | `reference.maxsim_reference(q, d)` (one pair) |
| `score_pairs_packed[_with_argmax]_reference` | `reference.maxsim_varlen_reference(..., pairs=...)` |
| `score_candidates_padded[_with_argmax]_reference` | `reference.maxsim_reference(..., q_lengths=, d_lengths=)` |
| `score_contrastive[_with_argmax]_reference` | `reference.maxsim_varlen_reference(...)` (all pairs) |

Conventions kept from the original: scores are float32; argmax is int32, the first winning document token
on ties, and **0** (not -1 as in :func:`maxsim.maxsim`) in the slots beyond a query's length; offsets,
lengths and pair ids may be int32 or int64; ``max_q_len``, when given, must be at least the longest query
segment (checked when validating) and sets the width of the packed argmax. The ``*_reference`` functions
do no validation, compute in float64 and return float32.

Two documented differences from the original:

1. Bad input raises this package's ``ValueError`` / ``TypeError`` naming the argument; the original raises
   ``RuntimeError`` for some cases (malformed offsets, pair ids out of range, tensors on two devices).
2. Gradients come back in the input dtype, accumulated in float32 (the original's backward kernels return
   float32 gradients).

Additions that do not break original code: every form, not only ``*_train``, is differentiable in
``queries`` and ``documents``; a keyword-only ``validate=True`` (``False`` skips the checks that read
tensor values, which need a device-to-host sync); float64 inputs are accepted where the backend accepts
them (the torch backend, for ``gradcheck``). The original's backward references
(``score_*_backward_reference``) are not provided: use autograd on the ``*_reference`` functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference as _ref
from . import validate as _v
from .api import maxsim as _maxsim
from .api import maxsim_varlen as _maxsim_varlen

__all__ = [
    "score_pairs_packed",
    "score_pairs_packed_with_argmax",
    "score_pairs_packed_train",
    "score_candidates_padded",
    "score_candidates_padded_with_argmax",
    "score_candidates_padded_train",
    "score_contrastive",
    "score_contrastive_with_argmax",
    "score_contrastive_train",
    "maxsim_reference",
    "maxsim_reference_with_argmax",
    "score_pairs_packed_reference",
    "score_pairs_packed_with_argmax_reference",
    "score_candidates_padded_reference",
    "score_candidates_padded_with_argmax_reference",
    "score_contrastive_reference",
    "score_contrastive_with_argmax_reference",
]


# ---------------------------------------------------------------------------------------------------------
# Checks of the compat arguments, named as the original names them. Generic checks come from validate.py.
# ---------------------------------------------------------------------------------------------------------


def _check_tokens(x, name: str, rank: int) -> None:
    _v.check_tokens(x, name, rank=rank, allow_float64=True)


def _check_index_tensor(x, name: str, device: torch.device, ref_name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be an int32 or int64 torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _v.INDEX_DTYPES:
        raise TypeError(f"{name} must have dtype int32 or int64, got {str(x.dtype).removeprefix('torch.')}")
    _v.check_device(x, name, device, ref_name)


def _check_offsets(
    offsets, name: str, tokens: torch.Tensor, tokens_name: str, *, check_values: bool
) -> int | None:
    return _v.check_cu_seqlens(
        offsets, name, tokens.shape[0], tokens_name,
        check_values=check_values, device=tokens.device, device_name=tokens_name,
    )  # fmt: skip


def _check_lengths(
    lengths, name: str, shape: tuple, max_len: int, x: torch.Tensor, x_name: str, *, check_values
):
    _check_index_tensor(lengths, name, x.device, x_name)
    if tuple(lengths.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(lengths.shape)}")
    if check_values:
        _v.check_in_range(lengths, name, 1, max_len, f" (the padded length of {x_name})")


def _check_pair_ids(
    pair_query_ids, pair_document_ids, num_queries: int, num_documents: int, queries, *, check_values
):
    for ids, name, count in (
        (pair_query_ids, "pair_query_ids", num_queries),
        (pair_document_ids, "pair_document_ids", num_documents),
    ):
        _check_index_tensor(ids, name, queries.device, "queries")
        if ids.dim() != 1:
            raise ValueError(f"{name} must have shape [num_pairs], got {tuple(ids.shape)}")
        if check_values:
            _v.check_in_range(ids, name, 0, count - 1)
    if pair_query_ids.shape != pair_document_ids.shape:
        raise ValueError(
            "pair_query_ids and pair_document_ids must have the same length, got "
            f"{pair_query_ids.shape[0]} and {pair_document_ids.shape[0]}"
        )


def _zero_beyond_length(argmax: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Our -1 (masked or beyond-length slots) to the original's 0, padded or cut to ``width`` columns."""
    argmax = argmax.clamp(min=0)
    if width is not None and argmax.shape[-1] != width:
        if argmax.shape[-1] < width:
            argmax = F.pad(argmax, (0, width - argmax.shape[-1]), value=0)
        else:
            argmax = argmax[..., :width].contiguous()
    return argmax


def _compat_output(out, return_argmax: bool, width: int | None = None):
    """An API result as the original returns it: scores, or ``(scores, argmax)`` with 0 beyond lengths."""
    if not return_argmax:
        return out
    scores, argmax = out
    return scores, _zero_beyond_length(argmax, width)


# ---------------------------------------------------------------------------------------------------------
# Packed (ragged) pairs
# ---------------------------------------------------------------------------------------------------------


def _packed(
    queries,
    query_offsets,
    documents,
    document_offsets,
    pair_query_ids,
    pair_document_ids,
    max_q_len,
    validate: bool,
    return_argmax: bool,
):
    _v.check_flag(validate, "validate")
    _check_tokens(queries, "queries", 2)
    _check_tokens(documents, "documents", 2)
    _v.check_pair(queries, documents, q_name="queries", d_name="documents")
    longest_q = _check_offsets(query_offsets, "query_offsets", queries, "queries", check_values=validate)
    _check_offsets(document_offsets, "document_offsets", documents, "documents", check_values=validate)
    _check_pair_ids(
        pair_query_ids,
        pair_document_ids,
        query_offsets.shape[0] - 1,
        document_offsets.shape[0] - 1,
        queries,
        check_values=validate,
    )
    mql = _v.check_max_seqlen(max_q_len, query_offsets, "max_q_len", check_values=validate, longest=longest_q)
    out = _maxsim_varlen(
        queries,
        query_offsets,
        documents,
        document_offsets,
        pairs=(pair_query_ids, pair_document_ids),
        max_seqlen_q=mql,
        return_argmax=return_argmax,
        validate=False,  # every value check ran above, under the original's argument names
    )
    return _compat_output(out, return_argmax, mql)


def score_pairs_packed(
    queries: torch.Tensor,
    query_offsets: torch.Tensor,
    documents: torch.Tensor,
    document_offsets: torch.Tensor,
    pair_query_ids: torch.Tensor,
    pair_document_ids: torch.Tensor,
    *,
    max_q_len: int | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """MaxSim of listed ``(query, document)`` pairs of packed ragged sequences.

    Args:
        queries: ``[total_q_tokens, D]`` float32/float16/bfloat16, the queries concatenated.
        query_offsets: int32/int64 ``[num_queries + 1]``: query ``i`` is
            ``queries[query_offsets[i]:query_offsets[i + 1]]``; starts at 0, ends at ``total_q_tokens``,
            no empty segment.
        documents: ``[total_d_tokens, D]``, same dtype as ``queries``.
        document_offsets: int32/int64 ``[num_documents + 1]``, the same rules for ``documents``.
        pair_query_ids: int32/int64 ``[num_pairs]``, query ids in ``[0, num_queries)``.
        pair_document_ids: int32/int64 ``[num_pairs]``, document ids in ``[0, num_documents)``.
        max_q_len: optional Python int >= the longest query segment (checked when validating).
        validate: run the checks that read tensor values (a device-to-host sync).

    Returns:
        float32 ``[num_pairs]``, differentiable in ``queries`` and ``documents``.
    """
    return _packed(
        queries,
        query_offsets,
        documents,
        document_offsets,
        pair_query_ids,
        pair_document_ids,
        max_q_len,
        validate,
        False,
    )


def score_pairs_packed_with_argmax(
    queries: torch.Tensor,
    query_offsets: torch.Tensor,
    documents: torch.Tensor,
    document_offsets: torch.Tensor,
    pair_query_ids: torch.Tensor,
    pair_document_ids: torch.Tensor,
    *,
    max_q_len: int | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`score_pairs_packed` that also returns the winning document token of each query token.

    Args:
        queries, query_offsets, documents, document_offsets, pair_query_ids, pair_document_ids, validate:
            as in :func:`score_pairs_packed`.
        max_q_len: the argmax width; defaults to the longest query segment (one device-to-host sync).

    Returns:
        ``(scores, argmax)``: float32 ``[num_pairs]`` and int32 ``[num_pairs, max_q_len]``, the index of the
        winning token within its document (the first on ties), 0 beyond the pair's query length.
    """
    return _packed(
        queries,
        query_offsets,
        documents,
        document_offsets,
        pair_query_ids,
        pair_document_ids,
        max_q_len,
        validate,
        True,
    )


# ---------------------------------------------------------------------------------------------------------
# Padded reranking candidates
# ---------------------------------------------------------------------------------------------------------


def _padded(queries, documents, query_lengths, doc_lengths, validate: bool, return_argmax: bool):
    _v.check_flag(validate, "validate")
    _check_tokens(queries, "queries", 3)
    _check_tokens(documents, "documents", 4)
    _v.check_pair(queries, documents, q_name="queries", d_name="documents")
    B, Lq, _ = queries.shape
    Bd, C, Ld, _ = documents.shape
    if Bd != B:
        raise ValueError(
            f"documents must have shape [B, C, Ld, D] with B = {B} (queries' batch), got {tuple(documents.shape)}"
        )
    _check_lengths(query_lengths, "query_lengths", (B,), Lq, queries, "queries", check_values=validate)
    _check_lengths(doc_lengths, "doc_lengths", (B, C), Ld, documents, "documents", check_values=validate)
    out = _maxsim(
        queries[:, None],
        documents,
        q_lengths=query_lengths[:, None],
        d_lengths=doc_lengths,
        return_argmax=return_argmax,
        validate=False,  # every value check ran above, under the original's argument names
    )
    return _compat_output(out, return_argmax)


def score_candidates_padded(
    queries: torch.Tensor,
    documents: torch.Tensor,
    query_lengths: torch.Tensor,
    doc_lengths: torch.Tensor,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """MaxSim of each query against its own ``C`` padded candidate documents (reranking).

    Args:
        queries: ``[B, Lq, D]`` float32/float16/bfloat16, padded.
        documents: ``[B, C, Ld, D]``, same dtype, padded.
        query_lengths: int32/int64 ``[B]``, real tokens per query, each in ``[1, Lq]``.
        doc_lengths: int32/int64 ``[B, C]``, real tokens per document, each in ``[1, Ld]``.
        validate: run the checks that read tensor values (a device-to-host sync).

    Returns:
        float32 ``[B, C]``, differentiable in ``queries`` and ``documents``.
    """
    return _padded(queries, documents, query_lengths, doc_lengths, validate, False)


def score_candidates_padded_with_argmax(
    queries: torch.Tensor,
    documents: torch.Tensor,
    query_lengths: torch.Tensor,
    doc_lengths: torch.Tensor,
    *,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`score_candidates_padded` that also returns the winning document token of each query token.

    Args:
        queries, documents, query_lengths, doc_lengths, validate: as in :func:`score_candidates_padded`.

    Returns:
        ``(scores, argmax)``: float32 ``[B, C]`` and int32 ``[B, C, Lq]``, the index of the winning token
        within its document (the first on ties), 0 beyond ``query_lengths[b]``.
    """
    return _padded(queries, documents, query_lengths, doc_lengths, validate, True)


# ---------------------------------------------------------------------------------------------------------
# Contrastive: every query against every packed document
# ---------------------------------------------------------------------------------------------------------


def _contrastive(queries, documents, document_offsets, validate: bool, return_argmax: bool):
    _v.check_flag(validate, "validate")
    _check_tokens(queries, "queries", 3)
    _check_tokens(documents, "documents", 2)
    _v.check_pair(queries, documents, q_name="queries", d_name="documents")
    _check_offsets(document_offsets, "document_offsets", documents, "documents", check_values=validate)
    Nq, Lq, D = queries.shape
    if Nq == 0:
        raise ValueError(f"queries must hold at least one query, got shape {tuple(queries.shape)}")
    index_dtype = torch.int32 if (Nq + 1) * Lq < 2**31 else torch.int64
    query_offsets = torch.arange(0, (Nq + 1) * Lq, Lq, dtype=index_dtype, device=queries.device)
    out = _maxsim_varlen(
        queries.reshape(Nq * Lq, D),
        query_offsets,
        documents,
        document_offsets,
        max_seqlen_q=Lq,
        return_argmax=return_argmax,
        validate=False,  # every value check ran above, under the original's argument names
    )
    return _compat_output(out, return_argmax, Lq)


def score_contrastive(
    queries: torch.Tensor,
    documents: torch.Tensor,
    document_offsets: torch.Tensor,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """MaxSim of every query against every packed document (in-batch contrastive scores).

    Args:
        queries: ``[Nq, Lq, D]`` float32/float16/bfloat16; every token is real.
        documents: ``[total_d_tokens, D]``, same dtype, the documents concatenated.
        document_offsets: int32/int64 ``[Nb + 1]``: document ``j`` is
            ``documents[document_offsets[j]:document_offsets[j + 1]]``; starts at 0, ends at
            ``total_d_tokens``, no empty segment.
        validate: run the checks that read tensor values (a device-to-host sync).

    Returns:
        float32 ``[Nq, Nb]``, differentiable in ``queries`` and ``documents``.
    """
    return _contrastive(queries, documents, document_offsets, validate, False)


def score_contrastive_with_argmax(
    queries: torch.Tensor,
    documents: torch.Tensor,
    document_offsets: torch.Tensor,
    *,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`score_contrastive` that also returns the winning document token of each query token.

    Args:
        queries, documents, document_offsets, validate: as in :func:`score_contrastive`.

    Returns:
        ``(scores, argmax)``: float32 ``[Nq, Nb]`` and int32 ``[Nq, Nb, Lq]``, the index of the winning
        token within its document (the first on ties).
    """
    return _contrastive(queries, documents, document_offsets, validate, True)


# The training entry points of the original are the same functions here: every form is differentiable in
# ``queries`` and ``documents`` (the gradient of each max flows to its argmax, in the input dtype).
score_pairs_packed_train = score_pairs_packed
score_candidates_padded_train = score_candidates_padded
score_contrastive_train = score_contrastive


# ---------------------------------------------------------------------------------------------------------
# References: plain torch, float64 inside, float32 out, no validation
# ---------------------------------------------------------------------------------------------------------


def maxsim_reference(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Reference MaxSim of one pair.

    Args:
        q: ``[Lq, D]`` query tokens.
        d: ``[Ld, D]`` document tokens.

    Returns:
        float32 scalar tensor, differentiable.
    """
    return _ref.maxsim_reference(q, d)[0].float()


def maxsim_reference_with_argmax(q: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference MaxSim of one pair with its argmax.

    Args:
        q: ``[Lq, D]`` query tokens.
        d: ``[Ld, D]`` document tokens.

    Returns:
        ``(score, argmax)``: float32 scalar and int32 ``[Lq]`` (the first winner on ties).
    """
    score, argmax = _ref.maxsim_reference(q, d)
    return score.float(), argmax


def score_pairs_packed_reference(
    queries: torch.Tensor,
    query_offsets: torch.Tensor,
    documents: torch.Tensor,
    document_offsets: torch.Tensor,
    pair_query_ids: torch.Tensor,
    pair_document_ids: torch.Tensor,
) -> torch.Tensor:
    """Reference :func:`score_pairs_packed`: float32 ``[num_pairs]``."""
    scores, _ = _ref.maxsim_varlen_reference(
        queries, query_offsets, documents, document_offsets, pairs=(pair_query_ids, pair_document_ids)
    )
    return scores.float()


def score_pairs_packed_with_argmax_reference(
    queries: torch.Tensor,
    query_offsets: torch.Tensor,
    documents: torch.Tensor,
    document_offsets: torch.Tensor,
    pair_query_ids: torch.Tensor,
    pair_document_ids: torch.Tensor,
    max_q_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference :func:`score_pairs_packed_with_argmax`.

    Args:
        queries, query_offsets, documents, document_offsets, pair_query_ids, pair_document_ids: as in
            :func:`score_pairs_packed`.
        max_q_len: the argmax width, at least the longest query segment (required here, as in the
            original).

    Returns:
        ``(scores, argmax)``: float32 ``[num_pairs]`` and int32 ``[num_pairs, max_q_len]``, 0 beyond a pair's
        query length.
    """
    scores, argmax = _ref.maxsim_varlen_reference(
        queries, query_offsets, documents, document_offsets, pairs=(pair_query_ids, pair_document_ids)
    )
    if max_q_len < argmax.shape[-1]:
        raise ValueError(
            f"max_q_len={max_q_len} is smaller than the longest query segment ({argmax.shape[-1]})"
        )
    return scores.float(), _zero_beyond_length(argmax, max_q_len)


def score_candidates_padded_reference(
    queries: torch.Tensor,
    documents: torch.Tensor,
    query_lengths: torch.Tensor,
    doc_lengths: torch.Tensor,
) -> torch.Tensor:
    """Reference :func:`score_candidates_padded`: float32 ``[B, C]``."""
    scores, _ = _ref.maxsim_reference(
        queries[:, None], documents, q_lengths=query_lengths[:, None], d_lengths=doc_lengths
    )
    return scores.float()


def score_candidates_padded_with_argmax_reference(
    queries: torch.Tensor,
    documents: torch.Tensor,
    query_lengths: torch.Tensor,
    doc_lengths: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference :func:`score_candidates_padded_with_argmax`.

    Returns:
        ``(scores, argmax)``: float32 ``[B, C]`` and int32 ``[B, C, Lq]``, 0 beyond ``query_lengths[b]``.
    """
    scores, argmax = _ref.maxsim_reference(
        queries[:, None], documents, q_lengths=query_lengths[:, None], d_lengths=doc_lengths
    )
    return scores.float(), _zero_beyond_length(argmax)


def _contrastive_reference(queries, documents, document_offsets):
    Nq, Lq, D = queries.shape
    query_offsets = torch.arange(0, (Nq + 1) * Lq, Lq, device=queries.device)
    return _ref.maxsim_varlen_reference(
        queries.reshape(Nq * Lq, D), query_offsets, documents, document_offsets
    )


def score_contrastive_reference(
    queries: torch.Tensor,
    documents: torch.Tensor,
    document_offsets: torch.Tensor,
) -> torch.Tensor:
    """Reference :func:`score_contrastive`: float32 ``[Nq, Nb]``."""
    return _contrastive_reference(queries, documents, document_offsets)[0].float()


def score_contrastive_with_argmax_reference(
    queries: torch.Tensor,
    documents: torch.Tensor,
    document_offsets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference :func:`score_contrastive_with_argmax`.

    Returns:
        ``(scores, argmax)``: float32 ``[Nq, Nb]`` and int32 ``[Nq, Nb, Lq]``.
    """
    scores, argmax = _contrastive_reference(queries, documents, document_offsets)
    return scores.float(), _zero_beyond_length(argmax, queries.shape[1])
