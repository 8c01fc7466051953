"""Alignment pictures: which document token each query token picks, as a similarity heatmap.

:func:`alignment` computes the data (the similarities and MaxSim's own argmax); :func:`alignment_figure`
draws it with matplotlib (``pip install 'maxsim[plot]'``): query tokens are rows, document tokens columns,
and the winning cell of every query token is outlined and labelled with its similarity.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import validate as check
from .api import maxsim


class PlotUnavailable(ImportError):
    """matplotlib is not installed."""


@dataclass(frozen=True)
class Alignment:
    """The argmax alignment of one query/document pair.

    Attributes:
        similarity: float32 ``[Lq, Ld]``, ``<q_i, d_j>`` (cosines with ``normalize``); NaN where the query
            or the document token is masked.
        argmax: int32 ``[Lq]``, MaxSim's winning document token (the first on ties), -1 for masked query tokens.
        best: float32 ``[Lq]``, the similarity of each winner, 0 for masked query tokens.
        score: the MaxSim score, ``best.sum()``.
    """

    similarity: torch.Tensor
    argmax: torch.Tensor
    best: torch.Tensor
    score: float


def alignment(q, d, *, q_mask=None, d_mask=None, normalize: bool = False) -> Alignment:
    """The similarities of one pair and the winner of each query token, as :func:`maxsim.maxsim` finds it.

    Args:
        q: ``[Lq, D]`` query tokens, float32/float16/bfloat16.
        d: ``[Ld, D]`` document tokens, same dtype.
        q_mask, d_mask: optional bool ``[Lq]`` / ``[Ld]``, True = real token.
        normalize: cosine similarities (L2-normalize every token), as ``maxsim(..., normalize=True)``.

    Raises:
        TypeError / ValueError: as :func:`maxsim.maxsim`, and for ``q`` or ``d`` that are not 2-D.
    """
    check.check_tokens(q, "q", rank=2, allow_float64=True)
    check.check_tokens(d, "d", rank=2, allow_float64=True)
    score, argmax = maxsim(q, d, q_mask=q_mask, d_mask=d_mask, normalize=normalize, return_argmax=True)
    q32, d32 = q.detach().float().cpu(), d.detach().float().cpu()
    if normalize:
        q32, d32 = F.normalize(q32, dim=-1), F.normalize(d32, dim=-1)
    similarity = q32 @ d32.T
    real_q = torch.ones(q.shape[0], dtype=torch.bool) if q_mask is None else q_mask.cpu()
    real_d = torch.ones(d.shape[0], dtype=torch.bool) if d_mask is None else d_mask.cpu()
    similarity = similarity.masked_fill(~(real_q[:, None] & real_d[None, :]), float("nan"))
    argmax = argmax.cpu()
    best = similarity.gather(1, argmax.clamp(min=0).long()[:, None])[:, 0]
    best = torch.where(real_q, best, 0.0)
    return Alignment(similarity, argmax, best, float(score))


def _check_labels(labels, name: str, count: int, side: str) -> list[str] | None:
    if labels is None:
        return None
    if isinstance(labels, str) or not isinstance(labels, (list, tuple)):
        raise TypeError(f"{name} must be a list of strings, got {type(labels).__name__}")
    if not all(isinstance(t, str) for t in labels):
        raise TypeError(f"{name} must hold strings only")
    if len(labels) != count:
        raise ValueError(f"{name} must hold one string per {side} token ({count}), got {len(labels)}")
    return list(labels)


def alignment_figure(
    q,
    d,
    *,
    q_tokens: list[str] | None = None,
    d_tokens: list[str] | None = None,
    q_mask=None,
    d_mask=None,
    normalize: bool = False,
    title: str | None = None,
    path: str | Path | None = None,
    dpi: int = 150,
):
    """Draw the argmax alignment of one pair: a heatmap of query tokens (rows) against document tokens.

    Args:
        q, d, q_mask, d_mask, normalize: as in :func:`alignment` (masked tokens are left blank).
        q_tokens, d_tokens: optional token strings, one per row / column, used as tick labels.
        title: a first title line; the second gives the MaxSim score.
        path: also write the figure there as PNG.
        dpi: resolution of the PNG.

    Returns:
        ``(figure, alignment)``: a ``matplotlib.figure.Figure`` (not attached to pyplot) and the
        :class:`Alignment` it shows.

    Raises:
        PlotUnavailable: matplotlib is not installed.
        TypeError / ValueError: as :func:`alignment`, and token lists of the wrong type or length.
    """
    try:
        import matplotlib
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle
    except ImportError as e:
        raise PlotUnavailable(
            "alignment pictures need matplotlib: pip install 'maxsim[plot]' (or pip install matplotlib)"
        ) from e
    data = alignment(q, d, q_mask=q_mask, d_mask=d_mask, normalize=normalize)
    Lq, Ld = data.similarity.shape
    rows = _check_labels(q_tokens, "q_tokens", Lq, "query") or [str(i) for i in range(Lq)]
    cols = _check_labels(d_tokens, "d_tokens", Ld, "document") or [str(j) for j in range(Ld)]

    figure = Figure(figsize=(min(2.5 + 0.32 * Ld, 40), min(1.8 + 0.32 * Lq, 30)), layout="constrained")
    ax = figure.subplots()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#e6e6e6")  # masked tokens: light grey
    image = ax.imshow(data.similarity.numpy(), cmap=cmap, aspect="auto", interpolation="nearest")
    figure.colorbar(image, ax=ax, label="cosine similarity" if normalize else "dot product", shrink=0.8)
    for i, j in enumerate(data.argmax.tolist()):
        if j < 0:
            continue
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#ff3b30", linewidth=1.6))
        value = data.best[i].item()
        dark_text = image.norm(value) > 0.6  # on the bright (yellow) end of viridis
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6.5,
                color="black" if dark_text else "white")  # fmt: skip
    ax.set_xticks(range(Ld), cols, rotation=90, fontsize=8)
    ax.set_yticks(range(Lq), rows, fontsize=8)
    ax.set_xlabel("document tokens")
    ax.set_ylabel("query tokens")
    heading = f"MaxSim = {data.score:.3f} (sum of the {int((data.argmax >= 0).sum())} marked cells)"
    ax.set_title(heading if title is None else f"{title}\n{heading}", fontsize=10)
    if path is not None:
        figure.savefig(path, format="png", dpi=dpi)
    return figure, data
