"""``torch.nn`` building blocks."""

from __future__ import annotations

import torch

from .api import maxsim

__all__ = ["MaxSim"]


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
