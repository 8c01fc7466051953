"""Training objectives built on MaxSim: the in-batch contrastive loss of ColBERT / ColPali training."""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from . import validate as check
from .api import maxsim

REDUCTIONS = ("mean", "sum", "none")


def check_loss_options(temperature, reduction, *, check_values: bool = True) -> None:
    """``temperature`` is a number > 0 or a 0-dim float tensor (> 0 when ``check_values``: one sync);
    ``reduction`` one of ``REDUCTIONS``."""
    if isinstance(temperature, torch.Tensor):
        if not temperature.is_floating_point():
            raise TypeError(f"temperature must be a float tensor, got dtype {temperature.dtype}")
        if temperature.dim() != 0:
            raise ValueError(f"temperature must be a 0-dim tensor, got shape {tuple(temperature.shape)}")
        if check_values and not bool(temperature > 0):
            raise ValueError(f"temperature must be > 0, got {temperature.item()}")
    elif isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(
            f"temperature must be a number > 0 or a 0-dim float tensor, got {type(temperature).__name__}"
        )
    elif not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}; got {reduction!r}")


def contrastive_loss(
    q: torch.Tensor,
    d: torch.Tensor,
    negatives: torch.Tensor | None = None,
    *,
    q_mask: torch.Tensor | None = None,
    d_mask: torch.Tensor | None = None,
    negatives_mask: torch.Tensor | None = None,
    q_lengths: torch.Tensor | None = None,
    d_lengths: torch.Tensor | None = None,
    negatives_lengths: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    normalize: bool = False,
    reduction: str = "mean",
    validate: bool = True,
) -> torch.Tensor:
    """In-batch contrastive (InfoNCE) loss on MaxSim scores: the positive of query ``i`` is document ``i``.

    The logits of query ``i`` are its scores against every document of ``d`` (its positive ``d[i]``, the
    other queries' positives and the extra documents ``d[Nq:]``, all shared by every query), then against its
    own hard negatives ``negatives[i]``, divided by ``temperature``; the loss is their cross-entropy with
    target ``i``. Differentiable in ``q``, ``d``, ``negatives`` (and a tensor ``temperature``); what autograd
    keeps is what :func:`maxsim.maxsim` keeps, plus the ``[Nq, Nd + K]`` logits.

    Args:
        q: ``[Nq, Lq, D]`` query tokens, float32/float16/bfloat16 (float64 on the torch backend).
        d: ``[Nd, Ld, D]`` document tokens of the same dtype, ``Nd >= Nq``: ``d[i]`` is the positive of ``q[i]``
            and ``d[Nq:]`` are extra negatives shared by all queries (e.g. ``torch.cat([positives, shared])``).
        negatives: ``[Nq, K, Ln, D]`` hard negatives of each query, same dtype, each scored against its own
            query only (a broadcast view such as ``n[None].expand(Nq, ...)`` is not copied); None for none.
        q_mask, d_mask, negatives_mask: bool ``[Nq, Lq]``, ``[Nd, Ld]``, ``[Nq, K, Ln]`` (or shapes that
            broadcast to them), True = real token. Masked query tokens add 0; masked document tokens never win.
        q_lengths, d_lengths, negatives_lengths: integer ``[Nq]``, ``[Nd]``, ``[Nq, K]``: the prefix form of the
            masks (a side takes a mask or lengths, not both).
        temperature: a number > 0, or a 0-dim float tensor (e.g. a learned ``nn.Parameter``).
        normalize: L2-normalize every token first (cosine token similarities, as ColBERT and ColPali train).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` over the queries, as torch losses.
        validate: run the checks that read tensor values (lengths in range, a real token in every document,
            a tensor temperature > 0): each a device->host sync. Shape and type checks always run.

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or ``[Nq]`` with ``reduction="none"``.

    Raises:
        TypeError: a non-tensor, an unsupported or mismatched dtype, a non-bool mask, non-integer lengths, a
            temperature that is not a number or a float tensor.
        ValueError: wrong rank, mismatched D or devices, fewer documents than queries, ``negatives`` whose first
            dim is not ``Nq``, a mask or lengths of the wrong shape, lengths outside ``[1, L]``, a document or
            negative without a real token, both a mask and lengths for one side, a negatives mask without
            ``negatives``, a temperature <= 0, an unknown reduction.
    """
    check.check_flag(normalize, "normalize")
    check.check_flag(validate, "validate")
    check_loss_options(temperature, reduction, check_values=validate)
    check.check_tokens(q, "q", rank=3, allow_float64=True)
    check.check_tokens(d, "d", rank=3, allow_float64=True)
    check.check_pair(q, d)
    nq = q.shape[0]
    if d.shape[0] < nq:
        raise ValueError(
            f"d must hold at least one document per query (d[i] is the positive of q[i]): got {d.shape[0]} "
            f"documents for {nq} queries"
        )
    q_mask = check.token_mask(q, q_mask, q_lengths, "q", check_values=validate, require_real=False)
    d_mask = check.token_mask(d, d_mask, d_lengths, "d", check_values=validate, require_real=True)
    if negatives is None:
        if negatives_mask is not None or negatives_lengths is not None:
            raise ValueError("negatives_mask and negatives_lengths need negatives")
    else:
        check.check_tokens(negatives, "negatives", rank=4, allow_float64=True)
        check.check_pair(q, negatives, d_name="negatives")
        if negatives.shape[0] != nq:
            raise ValueError(
                f"negatives must have shape [Nq={nq}, K, Ln, D] (K hard negatives per query), "
                f"got {tuple(negatives.shape)}"
            )
        negatives_mask = check.token_mask(
            negatives,
            negatives_mask,
            negatives_lengths,
            "negatives",
            check_values=validate,
            require_real=True,
        )
    # Every value check ran above, under the names the caller used: the scoring calls skip them.
    queries = q[:, None]  # [Nq, 1, Lq, D]
    query_mask = None if q_mask is None else q_mask[:, None]
    logits = maxsim(
        queries, d[None], q_mask=query_mask, d_mask=None if d_mask is None else d_mask[None],
        normalize=normalize, validate=False,
    )  # fmt: skip
    if negatives is not None:
        hard = maxsim(
            queries, negatives, q_mask=query_mask, d_mask=negatives_mask, normalize=normalize, validate=False
        )
        logits = torch.cat([logits, hard], dim=1)  # [Nq, Nd + K]
    target = torch.arange(nq, device=q.device)
    return F.cross_entropy(logits / temperature, target, reduction=reduction)
