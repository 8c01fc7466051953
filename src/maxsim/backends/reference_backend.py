"""The plain-torch reference behind the backend signature (``MAXSIM_BACKEND=reference``): slow, exact."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference import lengths_to_mask, maxsim_reference, maxsim_varlen_reference


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def maxsim_padded(q, d, q_mask, d_mask, *, d_lengths=None, normalize: bool, return_argmax: bool):
    """``q [P, Qn, Lq, D]`` against ``d [P, Dn, Ld, D]``: scores ``[P, Qn, Dn]``, argmax ``[P, Qn, Dn, Lq]``;
    ``d_lengths [P, Dn]`` or None: the prefix form of ``d_mask``."""
    if d_lengths is not None:
        d_mask = lengths_to_mask(d_lengths, d.shape[2])
    scores, argmax = maxsim_reference(
        q[:, :, None],
        d[:, None],
        q_mask=None if q_mask is None else q_mask[:, :, None],
        d_mask=None if d_mask is None else d_mask[:, None],
        normalize=normalize,
    )
    return scores.to(_score_dtype(q.dtype)), argmax


def maxsim_varlen(q, cu_q, d, cu_d, q_ids, d_ids, *, max_lq, max_ld, normalize, return_argmax):
    """Packed sequences: scores ``[Nq, Nd]`` or ``[P]``, argmax padded to ``max_lq``."""
    pairs = None if q_ids is None else (q_ids, d_ids)
    scores, argmax = maxsim_varlen_reference(q, cu_q, d, cu_d, pairs=pairs, normalize=normalize)
    argmax = F.pad(argmax, (0, max_lq - argmax.shape[-1]), value=-1)
    return scores.to(_score_dtype(q.dtype)), argmax


def dots_quantized(q: torch.Tensor, d: torch.Tensor) -> bool:
    """Whether ``maxsim_varlen_scaled`` takes queries quantized to ``d``'s dtype: never (the reference takes 16-bit queries only)."""
    return False


def reads_quantized(q: torch.Tensor, d: torch.Tensor) -> bool:
    """The reference scores quantized documents of any device (dequantized in float64)."""
    return True


def maxsim_varlen_scaled(q, cu_q, d, cu_d, d_scales, *, max_lq, max_ld, normalize):
    """All-pairs scores ``[Nq, Nd]`` against packed codes ``d [Td, D]`` times ``d_scales [Td]``: the
    reference on the dequantized float64 tokens."""
    tokens = d.double() * d_scales.double()[:, None]
    return maxsim_varlen_reference(q.double(), cu_q, tokens, cu_d, normalize=normalize)[0].float()
