"""Triton backend: the GPU kernels (NVIDIA; ROCm untested), with the torch backend's signature.

Files: ``forward.py`` (the strided padded family), ``varlen.py`` (packed sequences), ``configs.py`` (launch
configurations by architecture and shape class), ``backward.py`` (the backward kernels, from the saved int32
argmax), ``ops.py`` (``torch.library`` custom ops, fake kernels, autograd). Listed pairs of packed (varlen)
inputs take the torch backend's backward.

Without a GPU the kernels run in the Triton interpreter: importing this package on a machine where torch
sees no CUDA device sets ``TRITON_INTERPRET=1`` (unless it is set already) before the kernels are defined.
The interpreter needs that variable set before ``triton`` is first imported in the process; where it was
imported earlier without it (or on a GPU machine), CPU tensors go to the torch backend, as float64 inputs
do everywhere.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton.language  # noqa: E402

from .. import torch_backend  # noqa: E402
from . import ops  # noqa: E402  (registers maxsim::fwd_padded, maxsim::fwd_varlen and their backward)
from .forward import maxsim_fwd, prepare_fwd  # noqa: E402
from .quantize import quantize_rows  # noqa: E402
from .varlen import maxsim_varlen_fwd  # noqa: E402

# True when the kernels run in the interpreter: Triton's own library functions must be interpreted too,
# which holds only when TRITON_INTERPRET was set before triton was first imported.
INTERPRETED = type(triton.language.standard.sum).__name__ == "InterpretedFunction"


def _kernels_run_on(x: torch.Tensor) -> bool:
    """The kernels take ``x``'s device and dtype (CUDA, or the CPU in the interpreter; not float64)."""
    return x.dtype is not torch.float64 and (x.is_cuda or (INTERPRETED and x.is_cpu))


def _needs_grad(q: torch.Tensor, d: torch.Tensor) -> bool:
    return (q.requires_grad or d.requires_grad) and torch.is_grad_enabled()


def maxsim_padded(q, d, q_mask, d_mask, *, d_lengths=None, normalize: bool, return_argmax: bool):
    """Backend entry point for padded groups (see ``torch_backend.forward_padded`` for shapes).

    Under ``torch.compile`` the call goes through the custom op ``maxsim::fwd_padded``; eager training through
    ``ops.PaddedFunction`` (the op's forward and autograd without its dispatch cost); eager inference calls
    the launcher directly.

    Args:
        q: ``[P, Qn, Lq, D]``; d: ``[P, Dn, Ld, D]`` (any strides); q_mask / d_mask: bool or None.
        d_lengths: integer ``[P, Dn]`` (any strides) or None: the prefix form of ``d_mask``, read by the
            kernels as lengths (no mask is built).

    Returns:
        scores float32 ``[P, Qn, Dn]`` and int32 argmax ``[P, Qn, Dn, Lq]`` or None.
    """
    if not _kernels_run_on(q):
        return torch_backend.maxsim_padded(
            q, d, q_mask, d_mask, d_lengths=d_lengths, normalize=normalize, return_argmax=return_argmax
        )
    grad = _needs_grad(q, d)
    if not grad and not torch.compiler.is_compiling():  # eager inference: the launcher, no op dispatch
        return maxsim_fwd(
            q, d, q_mask, d_mask, d_lengths=d_lengths, normalize=normalize, return_argmax=return_argmax
        )
    fwd = torch.ops.maxsim.fwd_padded if torch.compiler.is_compiling() else ops.PaddedFunction.apply
    scores, argmax = fwd(q, d, q_mask, d_mask, d_lengths, normalize, return_argmax or grad)
    return scores, (argmax if return_argmax else None)


def prepare_padded(q, d, *, normalize: bool, return_argmax: bool):
    """A call bound for repeat eager inference calls of ``maxsim_padded(q, d, None, None, ...)`` with this
    signature (``forward.PreparedForward``), or None where there is none (CPU tensors, the interpreter, a
    call of several launches). ``maxsim.maxsim`` keeps it per signature and checks grad mode itself."""
    if not _kernels_run_on(q) or INTERPRETED:
        return None
    return prepare_fwd(q, d, normalize=normalize, return_argmax=return_argmax)


def reads_quantized(q: torch.Tensor, d: torch.Tensor) -> bool:
    """Whether ``maxsim_varlen_scaled`` takes ``q`` and quantized ``d`` here: where the kernels run."""
    return _kernels_run_on(q)


# the first (major, minor) CUDA capability whose tensor cores Triton drives for codes of each dtype
_CODE_DOTS = {torch.int8: (8, 0), torch.float8_e4m3fn: (8, 9)}


def dots_quantized(q: torch.Tensor, d: torch.Tensor) -> bool:
    """Whether ``maxsim_varlen_scaled`` takes queries quantized to ``d``'s dtype here (``q_scales``) and
    multiplies the codes as they are: the kernels run on ``q``, on an NVIDIA GPU with int8 / float8 tensor
    cores (``Index.search``'s default then quantizes the queries, with ``quantize_queries``), or in the
    interpreter."""
    if not _kernels_run_on(q) or d.dtype not in _CODE_DOTS:
        return False
    if not q.is_cuda:
        return True  # the interpreter
    return not getattr(torch.version, "hip", None) and torch.cuda.get_device_capability(q.device) >= _CODE_DOTS[d.dtype]


def quantize_queries(q: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Query tokens ``q [T, D]`` as int8 / float8_e4m3fn codes and float32 scales ``[T]`` for
    ``maxsim_varlen_scaled``'s ``q_scales`` (where ``dots_quantized``): ``index.quantize(q, dtype,
    scale_tries=1)`` in one launch (``quantize.quantize_rows``)."""
    return quantize_rows(q, dtype)


def maxsim_varlen_scaled(
    q, cu_q, d, cu_d, d_scales, *, max_lq: int, max_ld: int, normalize: bool, q_scales=None
):
    """All-pairs scores float32 ``[Nq, Nd]`` of packed queries against packed int8 / float8_e4m3fn codes
    ``d`` with float32 scales ``d_scales [Td]``. 16-bit queries: the varlen kernel widens the codes in
    registers; queries quantized to ``d``'s dtype with float32 ``q_scales [Tq]`` (where ``dots_quantized``):
    the codes are multiplied as they are."""
    return maxsim_varlen_fwd(
        q, cu_q, d, cu_d, None, None, max_lq=max_lq, max_ld=max_ld, normalize=normalize,
        return_argmax=False, d_scales=d_scales, q_scales=q_scales,
    )[0]  # fmt: skip


def maxsim_varlen(
    q, cu_q, d, cu_d, q_ids, d_ids, *, max_lq: int, max_ld: int, normalize: bool, return_argmax: bool
):
    """Backend entry point for packed sequences (see ``torch_backend.forward_varlen`` for shapes)."""
    if not _kernels_run_on(q):
        return torch_backend.maxsim_varlen(
            q, cu_q, d, cu_d, q_ids, d_ids,
            max_lq=max_lq, max_ld=max_ld, normalize=normalize, return_argmax=return_argmax,
        )  # fmt: skip
    grad = _needs_grad(q, d)
    if not grad and not torch.compiler.is_compiling():  # eager inference: the launcher, no op dispatch
        return maxsim_varlen_fwd(
            q, cu_q, d, cu_d, q_ids, d_ids,
            max_lq=max_lq, max_ld=max_ld, normalize=normalize, return_argmax=return_argmax,
        )  # fmt: skip
    fwd = torch.ops.maxsim.fwd_varlen if torch.compiler.is_compiling() else ops.VarlenFunction.apply
    scores, argmax = fwd(q, cu_q, d, cu_d, q_ids, d_ids, max_lq, max_ld, normalize, return_argmax or grad)
    return scores, (argmax if return_argmax else None)
