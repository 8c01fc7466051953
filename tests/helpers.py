"""Shared test helpers: the one tolerance rule of the project, input makers, readable ids.

Tolerance (DESIGN.md), stated once here: the reference computes in float64 on the same, already rounded
inputs. float32 (and float64) inputs: ``|ours - ref| <= 1e-4 * max(1, |ref|)``. float16/bfloat16 inputs:
``|ours - ref| <= 2 * |naive - ref| + 1e-3 * max(1, |ref|)`` where ``naive`` is torch computing in the input
dtype. float8_e4m3fn codes multiplied by codes (quantized queries against e4m3 storage; the reference scores
the same dequantized codes): the tensor cores keep about 14 bits of a sum between float32 promotions
(every 128 products on sm_90), so ``|ours - ref| <= 1e-3 * max(1, |ref|)``; int8 codes sum exactly in int32 (float32's
bound). NaN must match NaN and infinities must match exactly.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOW_PRECISION = (torch.float16, torch.bfloat16)


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def naive_scores(q, d, *, q_mask=None, d_mask=None, normalize=False) -> torch.Tensor:
    """Scores as a user would compute them in the input dtype: matmul, masked amax, sum."""
    if normalize:
        q, d = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(d, dim=-1)
    sim = q @ d.transpose(-1, -2)
    if d_mask is not None:
        sim = sim.masked_fill(~d_mask[..., None, :], float("-inf"))
    best = sim.amax(dim=-1)
    if q_mask is not None:
        best = torch.where(q_mask, best, 0)
    return best.sum(dim=-1, dtype=torch.float32)


def assert_scores_close(ours: torch.Tensor, ref: torch.Tensor, *, dtype: torch.dtype, naive=None) -> None:
    """Assert the project's tolerance rule (module docstring) element-wise."""
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    nan = ref.isnan()
    assert torch.equal(ours.isnan(), nan), "NaN positions differ from the reference"
    inf = ref.isinf()
    assert torch.equal(ours[inf], ref[inf]), "infinite scores differ from the reference"
    finite = ~nan & ~inf
    ours, ref = ours[finite], ref[finite]
    scale = ref.abs().clamp(min=1.0)
    if dtype in LOW_PRECISION:
        assert naive is not None, "low-precision checks need the naive in-dtype scores"
        naive_error = (naive.detach().double().cpu()[finite] - ref).abs()
        bound = 2 * naive_error + 1e-3 * scale
    elif dtype == torch.float8_e4m3fn:
        bound = 1e-3 * scale
    else:
        bound = 1e-4 * scale
    error = (ours - ref).abs()
    worst = (error - bound).argmax() if error.numel() else None
    assert bool((error <= bound).all()), (
        f"max error {error.max().item():.3g} exceeds bound at {worst.item()}: "
        f"ours {ours[worst].item():.6g} ref {ref[worst].item():.6g} bound {bound[worst].item():.3g}"
    )


def random_tokens(shape, dtype, *, generator, device="cpu") -> torch.Tensor:
    """Standard-normal tokens rounded to ``dtype``."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def integer_tokens(shape, dtype, *, generator, low=-2, high=3) -> torch.Tensor:
    """Small integer tokens: exact in every dtype, with many ties, so argmax is checkable exactly."""
    return torch.randint(low, high, shape, generator=generator).to(dtype)


# Gradients come back in the input dtype, computed in float32: the only error beyond float32 rounding is the
# final rounding to the input dtype (relative eps/2), so the bound is a few eps of that dtype.
GRAD_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


class NoGradient(torch.autograd.Function):
    """Identity whose backward gives no gradient (undefined): the node before it gets None."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return None


def record_argmax_gradients(monkeypatch, function) -> list:
    """Patch the autograd ``function``'s backward ``(ctx, grad_scores, grad_argmax)`` to append each
    ``grad_argmax`` it gets to the returned list."""
    backward, seen = function.backward, []

    def recording(ctx, grad_scores, grad_argmax):
        seen.append(grad_argmax)
        return backward(ctx, grad_scores, grad_argmax)

    monkeypatch.setattr(function, "backward", staticmethod(recording))
    return seen


def weighted_grads(fn, q, d, seed, *, exact=False):
    """Gradients of a random weighting of ``fn(q, d)``; ``exact``: on float64 copies of the same values."""
    q = (q.double() if exact else q).detach().requires_grad_()
    d = (d.double() if exact else d).detach().requires_grad_()
    scores = fn(q, d)
    weights = torch.randn(scores.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (scores.double() * weights).sum().backward()
    return q.grad, d.grad


def assert_grads_close(ours: torch.Tensor, ref: torch.Tensor, *, dtype: torch.dtype) -> None:
    """``|ours - ref| <= GRAD_TOLERANCE[dtype] * max(1, |ref|)`` element-wise, ``ours`` in ``dtype``."""
    assert ours.dtype == dtype, f"gradient dtype {ours.dtype}, expected {dtype}"
    assert ours.shape == ref.shape, f"gradient shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    error = (ours.double() - ref.double()).abs()
    bound = GRAD_TOLERANCE[dtype] * ref.double().abs().clamp(min=1.0)
    assert bool((error <= bound).all()), f"max gradient error {error.max().item():.3g}"


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def import_example(name: str):
    """The module ``examples/<name>.py`` (examples are scripts, not a package)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(EXAMPLES))
