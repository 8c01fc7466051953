"""``torch.nn`` building blocks."""

from __future__ import annotations

import torch

from .api import maxsim
from .losses import check_loss_options, contrastive_loss

__all__ = ["MaxSim", "ContrastiveLoss"]


class MaxSim(torch.nn.Module):
    """MaxSim late-interaction scoring as a parameter-free module, for training loops.

    ``MaxSim()(q, d, ...)`` is :func:`maxsim.maxsim` (exact, differentiable, memory-bounded), with
    ``normalize`` fixed at construction.

    Args:
        normalize: L2-normalize every token before scoring (as ``F.normalize``, eps 1e-12).

    Shapes:
        - ``q``: ``[..., Lq, D]`` float32/float16/bfloat16 query tokens.
        - ``d``: ``[..., Ld, D]`` document tokens, same dtype; batch dims broadcast with ``q``'s
          like ``torch.matmul`` (``q[:, None]`` ``[Nq, 1, Lq, D]`` with ``d[None]`` ``[1, Nd, Ld, D]``
          gives all pairs ``[Nq, Nd]``).
        - output: float32 ``[...]``, the broadcast batch shape.

    Example::

        score = MaxSim(normalize=True)
        scores = score(q[:, None], d[None], q_mask=q_mask[:, None], d_mask=d_mask[None])  # [Nq, Nd]

    For the in-batch contrastive loss on these scores, see :class:`ContrastiveLoss`.
    """

    def __init__(self, normalize: bool = False) -> None:
        super().__init__()
        self.normalize = normalize

    def forward(
        self,
        q: torch.Tensor,
        d: torch.Tensor,
        q_mask: torch.Tensor | None = None,
        d_mask: torch.Tensor | None = None,
        q_lengths: torch.Tensor | None = None,
        d_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Score ``q`` against ``d``.

        Args:
            q: ``[..., Lq, D]`` query tokens.
            d: ``[..., Ld, D]`` document tokens, same dtype as ``q``.
            q_mask: bool ``[..., Lq]``, True = real token; masked query tokens add 0.
            d_mask: bool ``[..., Ld]``, True = real token; masked document tokens never win.
            q_lengths: integer ``[...]``, the prefix form of ``q_mask`` (give one of the two).
            d_lengths: integer ``[...]``, the prefix form of ``d_mask`` (give one of the two).

        Returns:
            float32 ``[...]``, the broadcast batch dims of ``q`` and ``d``.
        """
        return maxsim(
            q,
            d,
            q_mask=q_mask,
            d_mask=d_mask,
            q_lengths=q_lengths,
            d_lengths=d_lengths,
            normalize=self.normalize,
        )

    def extra_repr(self) -> str:
        return f"normalize={self.normalize}"


class ContrastiveLoss(torch.nn.Module):
    """The in-batch contrastive loss on MaxSim scores as a module: :func:`maxsim.contrastive_loss`.

    The positive of query ``i`` is document ``i``; every other document of the batch, the extra documents
    ``d[Nq:]`` and the query's own hard negatives are its negatives.

    Args:
        temperature: a number > 0, or a 0-dim float tensor; an ``nn.Parameter`` is registered and learned.
        normalize: L2-normalize every token before scoring (as ``F.normalize``, eps 1e-12).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` over the queries.

    Shapes:
        - ``q``: ``[Nq, Lq, D]`` float32/float16/bfloat16 query tokens.
        - ``d``: ``[Nd, Ld, D]`` document tokens, same dtype, ``Nd >= Nq``.
        - ``negatives``: ``[Nq, K, Ln, D]`` hard negatives per query, or None.
        - masks ``[Nq, Lq]``, ``[Nd, Ld]``, ``[Nq, K, Ln]`` bool; lengths ``[Nq]``, ``[Nd]``, ``[Nq, K]``.
        - output: float32 scalar, or ``[Nq]`` with ``reduction="none"``.

    Example::

        loss_fn = ContrastiveLoss(temperature=0.05, normalize=True)
        loss = loss_fn(encode(queries), encode(positives), encode(hard_negatives), d_mask=positives_mask)
        loss.backward()
    """

    def __init__(
        self, temperature: float | torch.Tensor = 1.0, normalize: bool = False, reduction: str = "mean"
    ) -> None:
        super().__init__()
        check_loss_options(temperature, reduction)
        self.temperature = temperature
        self.normalize = normalize
        self.reduction = reduction

    def forward(
        self,
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
    ) -> torch.Tensor:
        """The loss of ``q`` against ``d`` (and ``negatives``); arguments as :func:`maxsim.contrastive_loss`."""
        return contrastive_loss(
            q, d, negatives, q_mask=q_mask, d_mask=d_mask, negatives_mask=negatives_mask, q_lengths=q_lengths,
            d_lengths=d_lengths, negatives_lengths=negatives_lengths, temperature=self.temperature,
            normalize=self.normalize, reduction=self.reduction,
        )  # fmt: skip

    def extra_repr(self) -> str:
        temperature = self.temperature
        if isinstance(temperature, torch.Tensor):
            temperature = f"tensor({temperature.item():g})"
        return f"temperature={temperature}, normalize={self.normalize}, reduction={self.reduction!r}"
