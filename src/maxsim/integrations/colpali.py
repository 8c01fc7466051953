"""colpali-engine drop-in: ``score_multi_vector`` computed with maxsim.

:func:`score_multi_vector` takes the arguments of colpali-engine's
``BaseVisualRetrieverProcessor.score_multi_vector`` and returns its results::

    scores = processor.score_multi_vector(qs, ps)                     # before
    scores = maxsim.integrations.colpali.score_multi_vector(qs, ps)   # after

Conventions kept from colpali-engine: queries and passages are taken in batches of ``batch_size``; each batch
is zero-padded to its longest item (no mask) and moved to ``device`` (by default ``cuda:0`` when CUDA is
available, else ``mps``, else ``cpu``); the scores come back float32 on the CPU. Zero padding is not
masking: a padding token has similarity 0 with every query token, so in a passage shorter than the longest
of its batch of ``batch_size`` it wins wherever all of a query token's real similarities are negative.
That is colpali-engine's result and is reproduced here (padded query tokens add 0). The similarities
are accumulated in float32 (colpali-engine computes them in the input dtype, then converts the scores).
"""

from __future__ import annotations

import torch

from .. import validate as _v
from ..api import maxsim as _maxsim

__all__ = ["score_multi_vector"]


def _auto_device() -> str:
    """colpali-engine's default device: ``cuda:0``, else ``mps``, else ``cpu``."""
    if torch.cuda.is_available():
        return "cuda:0"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _check_items(x, name: str, what: str) -> None:
    """``x`` is a padded ``[N, L, D]`` tensor or a non-empty list of ``[L_i, D]`` tensors of one dtype."""
    if isinstance(x, torch.Tensor):
        _v.check_tokens(x, name, rank=3, allow_float64=True)
    elif isinstance(x, (list, tuple)):
        for i, item in enumerate(x):
            _v.check_tokens(item, f"{name}[{i}]", rank=2, allow_float64=True)
            _v.check_pair(x[0], item, q_name=f"{name}[0]", d_name=f"{name}[{i}]")
    else:
        raise TypeError(f"{name} must be a torch.Tensor or a list of torch.Tensor, got {type(x).__name__}")
    if len(x) == 0:
        raise ValueError(f"{name} is empty: no {what} provided")


def _padded_batch(items, device) -> torch.Tensor:
    """A slice of the items as ``[n, L_max, D]`` on ``device``, zero-padded."""
    if not isinstance(items, torch.Tensor):
        items = torch.nn.utils.rnn.pad_sequence(list(items), batch_first=True, padding_value=0)
    return items.to(device)


def score_multi_vector(
    qs, ps, batch_size: int = 128, device: str | torch.device | None = None
) -> torch.Tensor:
    """MaxSim scores of every query against every passage, as colpali-engine's ``score_multi_vector``.

    Args:
        qs: queries, a list of ``[Lq_i, D]`` tensors or a padded ``[Nq, Lq, D]`` tensor; float32, float16 or
            bfloat16 (float64 on the CPU).
        ps: passages (pages), a list of ``[Lp_j, D]`` tensors or a padded ``[Np, Lp, D]`` tensor, same dtype.
        batch_size: queries and passages per batch (each batch is zero-padded to its longest item).
        device: where to score; None picks ``cuda:0``, else ``mps``, else ``cpu``.

    Returns:
        float32 ``[Nq, Np]`` on the CPU.

    Raises:
        TypeError: inputs that are not tensors or lists of tensors, mixed dtypes, a non-int ``batch_size``.
        ValueError: no query or no passage, a wrong rank, an item without a token, mismatched D,
            ``batch_size`` < 1.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if device is not None and not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be None, a str or a torch.device, got {type(device).__name__}")
    _check_items(qs, "qs", "queries")
    _check_items(ps, "ps", "passages")
    device = device or _auto_device()
    query_batches = [_padded_batch(qs[i : i + batch_size], device) for i in range(0, len(qs), batch_size)]
    columns = []
    for j in range(0, len(ps), batch_size):
        passages = _padded_batch(ps[j : j + batch_size], device)
        _v.check_pair(query_batches[0], passages, q_name="qs", d_name="ps")  # on one device now
        columns.append(torch.cat([_maxsim(q[:, None], passages[None]) for q in query_batches]).cpu())
    return torch.cat(columns, dim=1)
