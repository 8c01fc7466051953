"""Public entry points: validate, canonicalize the layout, dispatch to a backend.

Every backend sees one canonical padded problem: ``q [P, Qn, Lq, D]`` against ``d [P, Dn, Ld, D]``,
scoring each of the ``Qn`` queries of a group ``p`` against each of its ``Dn`` documents. The batch dims of
the call are sorted into those classes with views only (no copy of a broadcast operand):

- paired dims (q and d both vary) become ``P``;
- dims where only q varies (d is broadcast) become ``Qn``;
- dims where only d varies (q is broadcast) become ``Dn``;
- dims of size 1 are dropped.

So one query against a corpus is ``P=1, Qn=1, Dn=N``, pairs are ``P=B``, candidates ``P=B, Dn=C`` and all
pairs ``Qn=Nq, Dn=Nd``: each a few large matrix products rather than many small ones.
"""

from __future__ import annotations

import functools
import os

import torch

from . import validate as check
from .backends import get_backend


class _Layout:
    """How the broadcast batch dims of a call map to the canonical ``[P, Qn, Dn]`` and back."""

    def __init__(self, q_batch: torch.Size, d_batch: torch.Size, batch: torch.Size):
        self.batch = batch
        rank = len(batch)
        self.q_batch = (1,) * (rank - len(q_batch)) + tuple(q_batch)
        self.d_batch = (1,) * (rank - len(d_batch)) + tuple(d_batch)
        self.paired, self.query_only, self.doc_only = [], [], []
        for dim, size in enumerate(batch):
            if size == 1:
                continue
            if self.q_batch[dim] == self.d_batch[dim]:
                self.paired.append(dim)
            elif self.d_batch[dim] == 1:
                self.query_only.append(dim)
            else:
                self.doc_only.append(dim)
        self.sizes = [self._numel(self.paired), self._numel(self.query_only), self._numel(self.doc_only)]
        # Where the kept dims already stand in canonical order, one reshape is the whole view (the common case).
        self.query_in_order = self.paired + self.query_only == sorted(self.paired + self.query_only)
        self.doc_in_order = self.paired + self.doc_only == sorted(self.paired + self.doc_only)
        kept = self.paired + self.query_only + self.doc_only
        self.result_in_order = kept == sorted(kept)
        # Batch dims that already are [P, Qn] / [P, Dn] in that order (pairs, candidates, q[:, None] with
        # d[None]): no view at all.
        self.query_as_is = self.query_in_order and tuple(q_batch) == (self.sizes[0], self.sizes[1])
        self.doc_as_is = self.doc_in_order and tuple(d_batch) == (self.sizes[0], self.sizes[2])

    def _numel(self, dims) -> int:
        size = 1
        for dim in dims:
            size *= self.batch[dim]
        return size

    def _canonical(
        self, x: torch.Tensor, own_batch: tuple, inner: list[int], tail: int, in_order: bool
    ) -> torch.Tensor:
        """``x [*own_batch, *trailing]`` as ``[P, n, *trailing]`` keeping dims ``paired + inner``."""
        trailing = x.shape[x.dim() - tail :]
        if in_order:
            return x.reshape(self.sizes[0], self._numel(inner), *trailing)
        x = x.reshape(own_batch + tuple(trailing))
        kept = self.paired + inner
        dropped = [dim for dim in range(len(own_batch)) if dim not in kept]
        x = x.squeeze(tuple(dropped)) if dropped else x
        order = sorted(kept)
        x = x.permute([order.index(dim) for dim in kept] + list(range(len(kept), x.dim())))
        return x.reshape(self.sizes[0], self._numel(inner), *trailing)

    def query(self, x: torch.Tensor, tail: int) -> torch.Tensor:
        """q ``[..., Lq, D]`` (tail=2) or its mask ``[..., Lq]`` (tail=1) as ``[P, Qn, ...]``."""
        if self.query_as_is:
            return x
        return self._canonical(x, self.q_batch, self.query_only, tail, self.query_in_order)

    def document(self, x: torch.Tensor, tail: int) -> torch.Tensor:
        """d ``[..., Ld, D]`` (tail=2), its mask ``[..., Ld]`` (tail=1) or lengths ``[...]`` (tail=0) as
        ``[P, Dn, ...]``."""
        if self.doc_as_is:
            return x
        return self._canonical(x, self.d_batch, self.doc_only, tail, self.doc_in_order)

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """``[P, Qn, Dn, *trailing]`` back to ``[*batch, *trailing]``."""
        trailing = tuple(x.shape[3:])
        if self.result_in_order:
            return x.reshape(tuple(self.batch) + trailing)
        kept = self.paired + self.query_only + self.doc_only
        x = x.reshape([self.batch[dim] for dim in kept] + list(trailing))
        order = sorted(kept)
        x = x.permute([kept.index(dim) for dim in order] + list(range(len(kept), x.dim())))
        return x.reshape(tuple(self.batch) + trailing)


@functools.lru_cache(maxsize=512)
def _layout(q_batch: tuple, d_batch: tuple, batch: tuple) -> _Layout:
    return _Layout(q_batch, d_batch, batch)


# Repeat calls without masks: per signature (shapes, strides, dtypes, devices, flags, forced backend), the
# layout and the backend's prepared launch (``prepare_padded``), or False where the backend has none. A
# signature gets here only after a call of it passed every check; such calls read no tensor values.
_PREPARED: dict = {}
MAX_PREPARED = 1024


def _signature(q, d, normalize, return_argmax) -> tuple | None:
    """The key of ``_PREPARED`` for a call without masks, or None where it cannot take one (compiling, a
    training call)."""
    if (
        type(q) is not torch.Tensor
        or type(d) is not torch.Tensor
        or type(normalize) is not bool
        or type(return_argmax) is not bool
        or torch.compiler.is_compiling()
        or (torch.is_grad_enabled() and (q.requires_grad or d.requires_grad))
    ):
        return None
    return (
        q.shape, q.stride(), q.dtype, q.device, d.shape, d.stride(), d.dtype, d.device,
        normalize, return_argmax, os.environ.get("MAXSIM_BACKEND"),
    )  # fmt: skip


def _results(layout: _Layout, scores, argmax, return_argmax: bool):
    scores = layout.restore(scores)
    return (scores, layout.restore(argmax)) if return_argmax else scores


def maxsim(
    q: torch.Tensor,
    d: torch.Tensor,
    *,
    q_mask: torch.Tensor | None = None,
    d_mask: torch.Tensor | None = None,
    q_lengths: torch.Tensor | None = None,
    d_lengths: torch.Tensor | None = None,
    normalize: bool = False,
    return_argmax: bool = False,
    validate: bool = True,
):
    """Late-interaction score ``Σ_i max_j <q_i, d_j>`` with broadcast batch dims.

    Args:
        q: ``[..., Lq, D]`` query tokens, float32/float16/bfloat16 (float64 on the torch backend).
        d: ``[..., Ld, D]`` document tokens of the same dtype; batch dims broadcast like ``torch.matmul``:
            ``q [Lq, D]`` with ``d [N, Ld, D]`` gives ``[N]``; ``q[:, None]`` with ``d [B, C, Ld, D]`` gives
            ``[B, C]``; ``q[:, None]`` with ``d[None]`` gives all pairs ``[Nq, Nd]``.
        q_mask, d_mask: bool ``[..., Lq]`` / ``[..., Ld]``, True = real token; each broadcasts to its own
            side's token dims without enlarging them. Masked query tokens add 0; masked document tokens
            never win.
        q_lengths, d_lengths: integer ``[...]``, the prefix form of the masks (a side takes one or the other).
        normalize: L2-normalize every token on the fly (``F.normalize``, eps 1e-12).
        return_argmax: also return the argmax.
        validate: run the checks that read tensor values (a GPU sync); shape and type checks always run.

    Returns:
        float32 scores ``[...]`` (float64 for float64 inputs), and with ``return_argmax`` int32 ``[..., Lq]``:
        the first winning document token, -1 for masked query tokens.

    Raises:
        TypeError: a non-tensor, an unsupported or mismatched dtype, a non-bool mask, non-integer lengths.
        ValueError: wrong rank, mismatched D, an empty token axis, batch dims that do not broadcast, mixed
            devices, a mask or lengths of the wrong shape, lengths outside ``[1, L]``, a document without a
            real token, both a mask and lengths for one side.
    """
    signature = None  # an eager inference call without masks: it may take (or prepare) a bound launch
    if q_mask is None and d_mask is None and q_lengths is None and d_lengths is None:
        signature = _signature(q, d, normalize, return_argmax)
        prepared = _PREPARED.get(signature) if signature is not None else None
        if prepared:
            layout, launch = prepared
            result = launch(layout.query(q, 2), layout.document(d, 2))
            if result is not None:
                return _results(layout, *result, return_argmax)
    check.check_flag(normalize, "normalize")
    check.check_flag(return_argmax, "return_argmax")
    check.check_flag(validate, "validate")
    check.check_tokens(q, "q", allow_float64=True)
    check.check_tokens(d, "d", allow_float64=True)
    check.check_pair(q, d)
    batch = check.broadcast_batch(q, d)
    q_mask = check.token_mask(q, q_mask, q_lengths, "q", check_values=validate, require_real=False)
    if d_mask is None and d_lengths is not None:  # the kernels read lengths as such: no mask is built
        d_lengths = check.token_lengths(d, d_lengths, "d", check_values=validate)
    else:
        d_mask = check.token_mask(d, d_mask, d_lengths, "d", check_values=validate, require_real=True)
    layout = _layout(tuple(q.shape[:-2]), tuple(d.shape[:-2]), batch)
    backend = get_backend(q.device)
    q_canonical, d_canonical = layout.query(q, 2), layout.document(d, 2)
    scores, argmax = backend.maxsim_padded(
        q_canonical,
        d_canonical,
        None if q_mask is None else layout.query(q_mask, 1),
        None if d_mask is None else layout.document(d_mask, 1),
        d_lengths=None if d_lengths is None else layout.document(d_lengths, 0),
        normalize=normalize,
        return_argmax=return_argmax,
    )
    if signature is not None and signature not in _PREPARED:
        prepare = getattr(backend, "prepare_padded", None)
        launch = prepare and prepare(q_canonical, d_canonical, normalize=normalize, return_argmax=return_argmax)
        if len(_PREPARED) >= MAX_PREPARED:
            _PREPARED.clear()
        _PREPARED[signature] = (layout, launch) if launch else False
    return _results(layout, scores, argmax, return_argmax)


def maxsim_varlen(
    q: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    d: torch.Tensor,
    cu_seqlens_d: torch.Tensor,
    *,
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_d: int | None = None,
    normalize: bool = False,
    return_argmax: bool = False,
    validate: bool = True,
):
    """MaxSim on packed token sequences (the flash-attention varlen convention).

    Args:
        q: ``[Tq, D]`` packed query tokens; ``cu_seqlens_q`` int32/int64 ``[Nq+1]`` their offsets.
        d: ``[Td, D]`` packed document tokens (same dtype); ``cu_seqlens_d`` ``[Nd+1]``.
        pairs: None to score all pairs, or ``(q_ids [P], d_ids [P])`` integer tensors.
        max_seqlen_q, max_seqlen_d: Python ints >= the longest sequence; None costs a device->host sync.
        normalize, return_argmax, validate: as in ``maxsim``.

    Returns:
        float32 scores ``[Nq, Nd]`` (all pairs) or ``[P]``; with ``return_argmax`` int32 argmax
        ``[Nq, Nd, max_seqlen_q]`` or ``[P, max_seqlen_q]``, -1 beyond a query's length.

    Raises:
        TypeError / ValueError: as ``maxsim``, plus ``cu_seqlens`` that do not start at 0, decrease, do not
        end at the token count or hold an empty segment, ``max_seqlen`` below the longest sequence, and
        pair ids out of range.
    """
    check.check_flag(normalize, "normalize")
    check.check_flag(return_argmax, "return_argmax")
    check.check_flag(validate, "validate")
    check.check_tokens(q, "q", rank=2, allow_float64=True)
    check.check_tokens(d, "d", rank=2, allow_float64=True)
    check.check_pair(q, d)
    # the device check runs inside, before any value of cu_seqlens is read
    longest_q = check.check_cu_seqlens(
        cu_seqlens_q, "cu_seqlens_q", q.shape[0], "q", check_values=validate, device=q.device
    )
    longest_d = check.check_cu_seqlens(
        cu_seqlens_d, "cu_seqlens_d", d.shape[0], "d", check_values=validate, device=q.device
    )
    max_lq = check.check_max_seqlen(
        max_seqlen_q, cu_seqlens_q, "max_seqlen_q", check_values=validate, longest=longest_q
    )
    max_ld = check.check_max_seqlen(
        max_seqlen_d, cu_seqlens_d, "max_seqlen_d", check_values=validate, longest=longest_d
    )
    q_ids = d_ids = None
    if pairs is not None:
        nq, nd = cu_seqlens_q.shape[0] - 1, cu_seqlens_d.shape[0] - 1
        q_ids, d_ids = check.check_pairs(pairs, nq, nd, q.device, check_values=validate)
    scores, argmax = get_backend(q.device).maxsim_varlen(
        q, cu_seqlens_q, d, cu_seqlens_d, q_ids, d_ids,
        max_lq=max_lq, max_ld=max_ld, normalize=normalize, return_argmax=return_argmax,
    )  # fmt: skip
    return (scores, argmax) if return_argmax else scores
