"""``torch.library`` custom ops around the Triton launchers: fake (meta) kernels and autograd.

``maxsim::fwd_padded`` / ``maxsim::fwd_varlen`` run the forward kernels; they are opaque to
``torch.compile`` (no graph break, nothing traced inside) and allocate only with ``torch.empty``, so a call
with ``validate=False`` can be captured in a CUDA graph. An argmax that was not asked for comes back as an
empty int32 tensor (a custom op cannot return None).

Autograd keeps the inputs and the int32 argmax only; the backward is ``maxsim::bwd_padded`` /
``maxsim::bwd_varlen`` (the Triton kernels of ``backward.py``; listed varlen pairs take the torch backend's
``backward_varlen``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import torch_backend
from .backward import maxsim_bwd, maxsim_varlen_bwd
from .forward import maxsim_fwd
from .varlen import maxsim_varlen_fwd


def _no_argmax(like: Tensor) -> Tensor:
    return torch.empty(0, dtype=torch.int32, device=like.device)


# --- padded ---------------------------------------------------------------------------------------------


def padded_forward(
    q: Tensor,
    d: Tensor,
    q_mask: Tensor | None,
    d_mask: Tensor | None,
    d_lengths: Tensor | None,
    normalize: bool,
    return_argmax: bool,
) -> tuple[Tensor, Tensor]:
    """Scores float32 ``[P, Qn, Dn]`` and int32 argmax ``[P, Qn, Dn, Lq]`` (``[0]`` when not asked for)."""
    scores, argmax = maxsim_fwd(
        q, d, q_mask, d_mask, d_lengths=d_lengths, normalize=normalize, return_argmax=return_argmax
    )
    return scores, (argmax if argmax is not None else _no_argmax(q))


fwd_padded = torch.library.custom_op("maxsim::fwd_padded", padded_forward, mutates_args=())


@fwd_padded.register_fake
def _(q, d, q_mask, d_mask, d_lengths, normalize, return_argmax):
    P, Qn, Lq = q.shape[0], q.shape[1], q.shape[2]
    Dn = d.shape[1]
    scores = q.new_empty((P, Qn, Dn), dtype=torch.float32)
    argmax = q.new_empty((P, Qn, Dn, Lq) if return_argmax else (0,), dtype=torch.int32)
    return scores, argmax


def padded_backward(
    q: Tensor, d: Tensor, argmax: Tensor, grad_scores: Tensor, normalize: bool, need_dq: bool, need_dd: bool
) -> tuple[Tensor, Tensor]:
    """``(dq, dd)`` contiguous, shaped like ``q`` and ``d`` in their dtype (``[0]`` where not needed)."""
    dq, dd = maxsim_bwd(q, d, argmax, grad_scores, normalize=normalize, need_dq=need_dq, need_dd=need_dd)
    return (dq if need_dq else q.new_empty(0)), (dd if need_dd else d.new_empty(0))


bwd_padded = torch.library.custom_op("maxsim::bwd_padded", padded_backward, mutates_args=())


@bwd_padded.register_fake
def _(q, d, argmax, grad_scores, normalize, need_dq, need_dd):
    dq = q.new_empty(q.shape if need_dq else (0,))
    dd = d.new_empty(d.shape if need_dd else (0,))
    return dq, dd


def _padded_setup(ctx, inputs, output):
    q, d, q_mask, d_mask, d_lengths, normalize, _ = inputs
    # an argmax not asked for (empty) is recomputed in the backward, with the masks it needs
    ctx.save_for_backward(q, d, output[1], q_mask, d_mask, d_lengths)
    ctx.normalize = normalize
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zeros the size of the argmax for its (never used) gradient


def _padded_autograd_backward(fwd, bwd):
    """The autograd backward of the padded forward, running the forward ``fwd`` (for an argmax not kept)
    and the backward ``bwd``: the custom ops (``torch.compile``) or the launchers themselves (eager)."""

    def backward(ctx, grad_scores, grad_argmax):
        if grad_scores is None:  # undefined (not materialized): no gradient flows (gradcheck checks this)
            return (None,) * 7
        q, d, argmax, q_mask, d_mask, d_lengths = ctx.saved_tensors
        if argmax.numel() == 0 and grad_scores.numel() != 0:
            argmax = fwd(q, d, q_mask, d_mask, d_lengths, ctx.normalize, True)[1]
        need_dq, need_dd = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dq, dd = bwd(q, d, argmax, grad_scores, ctx.normalize, need_dq, need_dd)
        return (dq if need_dq else None), (dd if need_dd else None), None, None, None, None, None

    return backward


torch.library.register_autograd(
    "maxsim::fwd_padded",
    _padded_autograd_backward(torch.ops.maxsim.fwd_padded, torch.ops.maxsim.bwd_padded),
    setup_context=_padded_setup,
)


# --- varlen ---------------------------------------------------------------------------------------------


def varlen_forward(
    q: Tensor,
    cu_q: Tensor,
    d: Tensor,
    cu_d: Tensor,
    q_ids: Tensor | None,
    d_ids: Tensor | None,
    max_lq: int,
    max_ld: int,
    normalize: bool,
    return_argmax: bool,
) -> tuple[Tensor, Tensor]:
    """Scores float32 ``[Nq, Nd]`` / ``[P]`` and int32 argmax ``[..., max_lq]`` (``[0]`` when not asked)."""
    scores, argmax = maxsim_varlen_fwd(
        q, cu_q, d, cu_d, q_ids, d_ids,
        max_lq=max_lq, max_ld=max_ld, normalize=normalize, return_argmax=return_argmax,
    )  # fmt: skip
    return scores, (argmax if argmax is not None else _no_argmax(q))


fwd_varlen = torch.library.custom_op("maxsim::fwd_varlen", varlen_forward, mutates_args=())


@fwd_varlen.register_fake
def _(q, cu_q, d, cu_d, q_ids, d_ids, max_lq, max_ld, normalize, return_argmax):
    shape = (q_ids.shape[0],) if q_ids is not None else (cu_q.shape[0] - 1, cu_d.shape[0] - 1)
    scores = q.new_empty(shape, dtype=torch.float32)
    argmax = q.new_empty((*shape, max_lq) if return_argmax else (0,), dtype=torch.int32)
    return scores, argmax


def varlen_backward(
    q: Tensor,
    cu_q: Tensor,
    d: Tensor,
    cu_d: Tensor,
    q_ids: Tensor | None,
    d_ids: Tensor | None,
    argmax: Tensor,
    grad_scores: Tensor,
    max_ld: int,
    normalize: bool,
    need_dq: bool,
    need_dd: bool,
) -> tuple[Tensor, Tensor]:
    """``(dq, dd)`` like ``q`` / ``d`` (``[0]`` where not needed): the Triton kernels for all pairs, the torch
    backend's ``backward_varlen`` for listed pairs."""
    if q_ids is None:
        dq, dd = maxsim_varlen_bwd(
            q, cu_q, d, cu_d, argmax, grad_scores,
            max_ld=max_ld, normalize=normalize, need_dq=need_dq, need_dd=need_dd,
        )  # fmt: skip
    else:
        dq, dd = torch_backend.backward_varlen(
            q, cu_q, d, cu_d, q_ids, d_ids, argmax, grad_scores,
            normalize=normalize, need_dq=need_dq, need_dd=need_dd,
        )  # fmt: skip
    dq = dq.contiguous() if need_dq else q.new_empty(0)
    dd = dd.contiguous() if need_dd else d.new_empty(0)
    return dq, dd


bwd_varlen = torch.library.custom_op("maxsim::bwd_varlen", varlen_backward, mutates_args=())


@bwd_varlen.register_fake
def _(q, cu_q, d, cu_d, q_ids, d_ids, argmax, grad_scores, max_ld, normalize, need_dq, need_dd):
    return q.new_empty(q.shape if need_dq else (0,)), d.new_empty(d.shape if need_dd else (0,))


def _varlen_setup(ctx, inputs, output):
    q, cu_q, d, cu_d, q_ids, d_ids, max_lq, max_ld, normalize, _ = inputs
    ctx.save_for_backward(q, cu_q, d, cu_d, q_ids, d_ids, output[1])
    ctx.normalize = normalize
    ctx.max_seqlens = (max_lq, max_ld)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _varlen_autograd_backward(fwd, bwd):
    """The autograd backward of the varlen forward (see ``_padded_autograd_backward``)."""

    def backward(ctx, grad_scores, grad_argmax):
        if grad_scores is None:  # undefined (not materialized): no gradient flows
            return (None,) * 10
        q, cu_q, d, cu_d, q_ids, d_ids, argmax = ctx.saved_tensors
        if argmax.numel() == 0 and grad_scores.numel() != 0:
            argmax = fwd(q, cu_q, d, cu_d, q_ids, d_ids, *ctx.max_seqlens, ctx.normalize, True)[1]
        need_dq, need_dd = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        dq, dd = bwd(
            q, cu_q, d, cu_d, q_ids, d_ids, argmax, grad_scores, ctx.max_seqlens[1], ctx.normalize, need_dq, need_dd
        )
        return (dq if need_dq else None), None, (dd if need_dd else None), *(None,) * 7

    return backward


torch.library.register_autograd(
    "maxsim::fwd_varlen",
    _varlen_autograd_backward(torch.ops.maxsim.fwd_varlen, torch.ops.maxsim.bwd_varlen),
    setup_context=_varlen_setup,
)


# --- eager autograd -------------------------------------------------------------------------------------
# Outside ``torch.compile`` a training call takes these plain autograd functions: the same forward, setup
# and backward as the ops above, without the custom-op dispatch (~0.2 ms of host time per op and call).
# The forward takes ``ctx`` itself: a separate ``setup_context`` makes ``Function.apply`` bind the
# arguments through ``inspect.signature`` on every call.


def _eager_forward(forward, setup):
    def forward_with_ctx(ctx, *inputs):
        output = forward(*inputs)
        setup(ctx, inputs, output)
        return output

    return staticmethod(forward_with_ctx)


class PaddedFunction(torch.autograd.Function):
    """``maxsim::fwd_padded`` with its autograd, for eager calls: ``apply(q, d, q_mask, d_mask, d_lengths,
    normalize, return_argmax)`` returns ``(scores, argmax)`` as the op does."""

    forward = _eager_forward(padded_forward, _padded_setup)
    backward = staticmethod(_padded_autograd_backward(padded_forward, padded_backward))


class VarlenFunction(torch.autograd.Function):
    """``maxsim::fwd_varlen`` with its autograd, for eager calls (arguments and results as the op)."""

    forward = _eager_forward(varlen_forward, _varlen_setup)
    backward = staticmethod(_varlen_autograd_backward(varlen_forward, varlen_backward))
