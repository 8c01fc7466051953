"""The AVX2 CPU kernel (``cpu_kernel.c``): MaxSim scores and argmax of float32, float16 and bfloat16
tokens, and of packed int8 / float8 e4m3 document codes with per-token scales (``Index`` storage), in float32
arithmetic, for the torch backend.

The kernel is an optional compiled extension: where it was not built (no C compiler, not x86-64 Linux) or
the CPU lacks AVX2/FMA/F16C, ``available()`` is False and the torch backend keeps its matrix-product blocks.
``MAXSIM_CPU_KERNEL=0`` turns it off.
"""

from __future__ import annotations

import os

import torch

try:
    from maxsim.backends import _cpu_kernel
except ImportError:  # not built here
    _cpu_kernel = None

_SUPPORTED = _cpu_kernel is not None and _cpu_kernel.supported()
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # as cpu_kernel.c numbers them
CODE_DTYPES = {torch.int8: 3, torch.float8_e4m3fn: 4}  # quantized documents (packed, with scales)


def available() -> bool:
    """Whether the kernel is built, this CPU runs it and ``MAXSIM_CPU_KERNEL`` does not turn it off."""
    return _SUPPORTED and os.environ.get("MAXSIM_CPU_KERNEL", "1") != "0"


def status() -> str:
    """A line for ``maxsim info``: whether CPU calls take the kernel, and why not."""
    if _cpu_kernel is None:
        return "not built (no C compiler at install, or not x86-64 Linux): matrix products"
    if not _SUPPORTED:
        return "this CPU lacks AVX2/FMA/F16C: matrix products"
    if not available():
        return "off (MAXSIM_CPU_KERNEL=0): matrix products"
    return "on (float32, float16, bfloat16; int8 / float8 e4m3 Index storage)"


def _reads(q: torch.Tensor, d: torch.Tensor) -> bool:
    """CPU tensors, ``q`` of a dtype the kernel reads, ``d``'s tokens contiguous, the kernel on."""
    return (
        q.device.type == "cpu"
        and d.device.type == "cpu"
        and q.dtype in DTYPE_CODES
        and d.stride(-1) == 1
        and available()
    )


def applies(q: torch.Tensor, d: torch.Tensor) -> bool:
    """Whether a call on ``q``, ``d`` can take the kernel: CPU tensors of one dtype it reads, ``d``'s
    tokens contiguous."""
    return d.dtype == q.dtype and _reads(q, d)


def applies_scaled(q: torch.Tensor, d: torch.Tensor) -> bool:
    """Whether packed quantized documents ``d`` (int8 / float8_e4m3fn codes, per-token scales) and queries
    ``q`` can take the kernel: CPU tensors, ``q`` of a dtype it reads, ``d``'s tokens contiguous."""
    return d.dtype in CODE_DTYPES and _reads(q, d)


_NO_MASK = (0, (0, 0, 0))
_NOT_PACKED = (None, None)
LANES = 16  # query tokens per column group of the kernel (cpu_kernel.c)
QUERY_BYTES = 64 * 2**20  # the most bytes of packed query columns one kernel call holds


def _mask(mask: torch.Tensor | None) -> tuple:
    """A bool ``[P, N, L]`` mask (or None) as the kernel takes it: its address and strides."""
    return _NO_MASK if mask is None else (mask.data_ptr(), mask.stride())


def _packed(starts_lengths: tuple, x: torch.Tensor) -> tuple:
    """Packed sequences ``(starts, lengths)`` of ``x [T, D]`` (or ``(None, None)``) as the kernel takes them."""
    return (*(0 if t is None else t.data_ptr() for t in starts_lengths), x.shape[0])


def _run(
    q, q_view, q_mask, q_packed, d, d_view, d_mask, d_packed, *, P, Qn, Dn, Lq, Ld, normalize, need_argmax,
    d_scales=None,
):  # fmt: skip
    """Scores ``[P, Qn, Dn]`` and int32 argmax ``[P, Qn, Dn, Lq]`` (or None): query ``(p, i)`` against the
    documents ``(p, n)``. ``q`` is read through ``q_view`` (its strides as ``[P, Qn, Lq, D]``) and
    ``q_packed`` (``(None, None)``, or int64 ``(starts [P*Qn], lengths [P*Qn])`` of packed tokens, rows of
    ``q``; sequences outside ``q`` count as empty); ``d``
    likewise through ``d_view`` (``[P, Dn, Ld]``) and ``d_packed`` (``[P*Dn]``). Masks: bool ``[P, Qn, Lq]`` /
    ``[P, Dn, Ld]`` or None. ``d_scales``: float32 ``[T]`` (contiguous) for packed int8 / float8_e4m3fn
    codes ``d [T, D]``, token ``t`` being ``d[t] * d_scales[t]``. The queries are packed ``QUERY_BYTES`` at a
    time (groups, or the queries of one group)."""
    D = q.shape[-1]
    out = torch.empty(P, Qn, Dn, dtype=torch.float32)
    argmax = torch.empty(P, Qn, Dn, Lq, dtype=torch.int32) if need_argmax else None
    if out.numel() == 0:
        return out, argmax
    step = max(1, QUERY_BYTES // (-(-Lq // LANES) * LANES * D * 4))  # queries per call
    q_step, p_step = (min(Qn, step), P) if P == 1 else (Qn, max(1, step // Qn))
    for p0 in range(0, P, p_step):
        for q0 in range(0, Qn, q_step):
            p1, q1 = min(P, p0 + p_step), min(Qn, q0 + q_step)
            queries = slice(p0 * Qn + q0, p0 * Qn + q0 + (p1 - p0) * (q1 - q0))  # of q_packed (q0 = 0 if P > 1)
            documents = slice(p0 * Dn, p1 * Dn)
            q_at = q_view[0] * p0 + q_view[1] * q0
            _cpu_kernel.score(
                (q.data_ptr() + q.element_size() * q_at, q_view),
                _mask(None if q_mask is None else q_mask[p0:p1, q0:q1]),
                _packed(tuple(None if t is None else t[queries] for t in q_packed), q),
                (d.data_ptr() + d.element_size() * d_view[0] * p0, d_view),
                _mask(None if d_mask is None else d_mask[p0:p1]),
                (*_packed(tuple(None if t is None else t[documents] for t in d_packed), d),
                 0 if d_scales is None else d_scales.data_ptr()),
                DTYPE_CODES[q.dtype], CODE_DTYPES.get(d.dtype) or DTYPE_CODES[d.dtype], p1 - p0, q1 - q0, Dn, Lq,
                Ld, D, normalize,
                out[p0:p1, q0:q1].data_ptr(), 0 if argmax is None else argmax[p0:p1, q0:q1].data_ptr(),
                torch.get_num_threads(),
            )  # fmt: skip
    return out, argmax


def forward_padded(q, d, q_mask, d_mask, *, normalize: bool, need_argmax: bool):
    """``torch_backend.forward_padded`` for the kernel's dtypes (``applies``): scores ``[P, Qn, Dn]`` and int32
    argmax ``[P, Qn, Dn, Lq]`` or None of ``q [P, Qn, Lq, D]`` against ``d [P, Dn, Ld, D]``, masks bool
    ``[P, Qn, Lq]`` / ``[P, Dn, Ld]`` or None; both are read in place, whatever their strides."""
    P, Qn, Lq, _ = q.shape
    return _run(
        q, q.stride(), q_mask, _NOT_PACKED, d, d.stride()[:3], d_mask, _NOT_PACKED,
        P=P, Qn=Qn, Dn=d.shape[1], Lq=Lq, Ld=d.shape[2], normalize=normalize, need_argmax=need_argmax,
    )  # fmt: skip


def _sequences(cu: torch.Tensor, ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 ``(starts, lengths)`` of the packed sequences ``ids`` (all of them when None) of ``cu``."""
    cu = cu.to(torch.int64)
    starts, ends = (cu[:-1], cu[1:]) if ids is None else (cu[ids], cu[ids + 1])
    return starts.contiguous(), (ends - starts).contiguous()


def forward_varlen(
    q, cu_q, d, cu_d, q_ids, d_ids, *, max_lq: int, max_ld: int, normalize: bool, need_argmax: bool,
    d_scales=None,
):  # fmt: skip
    """``torch_backend.forward_varlen`` for the kernel's dtypes (``applies``, or ``applies_scaled`` with
    ``d_scales`` float32 ``[Td]``): packed ``q [Tq, D]`` and ``d [Td, D]`` read in place; all pairs (``q_ids``
    None): scores ``[Nq, Nd]``, argmax ``[Nq, Nd, max_lq]``; listed pairs: ``[P]`` and ``[P, max_lq]``
    (argmax -1 beyond a query's tokens)."""
    q_seq, d_seq = _sequences(cu_q, q_ids), _sequences(cu_d, d_ids)
    q_view, d_view = (0, 0, q.stride(0), q.stride(1)), (0, 0, d.stride(0))
    if q_ids is None:  # one group: every query against every document
        P, Qn, Dn = 1, q_seq[0].shape[0], d_seq[0].shape[0]
    else:  # a group per pair
        P, Qn, Dn = q_ids.shape[0], 1, 1
    scores, argmax = _run(
        q, q_view, None, q_seq, d, d_view, None, d_seq,
        P=P, Qn=Qn, Dn=Dn, Lq=max_lq, Ld=max_ld, normalize=normalize, need_argmax=need_argmax,
        d_scales=None if d_scales is None else d_scales.to(torch.float32).contiguous(),
    )  # fmt: skip
    if q_ids is None:
        return scores[0], None if argmax is None else argmax[0]
    return scores.view(P), None if argmax is None else argmax.view(P, max_lq)


_EVERY_PAIR = (0,) * 6


def _listed_pairs(q_ids: torch.Tensor, d_ids: torch.Tensor, nq: int, nd: int) -> tuple:
    """int64 ``(q_ids, d_ids, q_order, q_first, d_order, d_first)``: the pairs of each query (document) in
    pair order are ``q_order[q_first[i]:q_first[i + 1]]`` (a stable sort by id)."""
    arrays = [q_ids.long().contiguous(), d_ids.long().contiguous()]
    for ids, count in ((arrays[0], nq), (arrays[1], nd)):
        order = torch.argsort(ids, stable=True)
        arrays += [order, torch.searchsorted(ids[order], torch.arange(count + 1))]
    return arrays[0], arrays[1], arrays[2], arrays[3], arrays[4], arrays[5]


def _gradients(
    q, q_view, q_starts, d, d_view, d_starts, argmax, grad_scores, q_inv, d_inv, *, sizes, rows, pairs=None
):  # fmt: skip
    """Float32 ``(dq [q rows, D], dd [d rows, D])`` (None where ``rows`` gives None) of the scores from their
    argmax, by the kernel's ``gradients``; rows as it reads them: padded ``[P, N, L]`` or packed (``starts``:
    int64 first token per sequence, one group). ``q_inv``, ``d_inv``: float32 inverse norms per row
    (contiguous, rows in that order) of normalized tokens, or None. ``pairs``: ``_listed_pairs`` (argmax
    ``[pairs, Lq]``, grad_scores ``[pairs]``) or None for every pair of every group."""
    P, Qn, Dn, Lq, Ld = sizes
    D = q.shape[-1]
    outputs = [None if n is None else torch.zeros(n, D, dtype=torch.float32) for n in rows]
    argmax = argmax.contiguous()
    grad = grad_scores.to(torch.float32).contiguous()

    def side(x, view, starts, inverse):
        return (
            x.data_ptr(), view, 0 if starts is None else starts.data_ptr(), x.shape[0],
            0 if inverse is None else inverse.data_ptr(),
        )  # fmt: skip

    _cpu_kernel.gradients(
        side(q, q_view, q_starts, q_inv), side(d, d_view, d_starts, d_inv), DTYPE_CODES[q.dtype],
        argmax.data_ptr(), grad.data_ptr(), _EVERY_PAIR if pairs is None else tuple(t.data_ptr() for t in pairs),
        P, Qn, Dn, Lq, Ld, D,
        *(0 if t is None else t.data_ptr() for t in outputs), torch.get_num_threads(),
    )  # fmt: skip
    return outputs


def backward_padded(q, d, argmax, grad_scores, q_inv, d_inv, *, need_dq: bool, need_dd: bool):
    """Float32 gradients with respect to the tokens (normalized ones, given their inverse norms ``q_inv``
    ``[P, Qn, Lq]``, ``d_inv`` ``[P, Dn, Ld]``; None: raw): ``dq [P, Qn, Lq, D]``, ``dd [P, Dn, Ld, D]`` (None
    where not needed) of ``torch_backend.backward_padded``'s problem, for the kernel's dtypes (``applies``);
    ``q``, ``d`` read in place, argmax int32 ``[P, Qn, Dn, Lq]``."""
    P, Qn, Lq, D = q.shape
    Dn, Ld = d.shape[1], d.shape[2]
    dq, dd = _gradients(
        q, q.stride(), None, d, d.stride(), None, argmax, grad_scores, q_inv, d_inv, sizes=(P, Qn, Dn, Lq, Ld),
        rows=(P * Qn * Lq if need_dq else None, P * Dn * Ld if need_dd else None),
    )  # fmt: skip
    return (None if dq is None else dq.view(q.shape)), (None if dd is None else dd.view(d.shape))


def backward_varlen(
    q, cu_q, d, cu_d, q_ids, d_ids, argmax, grad_scores, q_inv, d_inv, *, need_dq: bool, need_dd: bool
):  # fmt: skip
    """Float32 gradients (as ``backward_padded``; inverse norms ``[Tq]``, ``[Td]`` or None) ``dq [Tq, D]``,
    ``dd [Td, D]`` of packed sequences: all pairs (``q_ids`` None; argmax int32 ``[Nq, Nd, max_lq]``,
    grad_scores ``[Nq, Nd]``) or the listed pairs ``(q_ids, d_ids)`` (``[P, max_lq]``, ``[P]``)."""
    q_starts, _ = _sequences(cu_q, None)
    d_starts, _ = _sequences(cu_d, None)
    Nq, Nd, Lq = cu_q.shape[0] - 1, cu_d.shape[0] - 1, argmax.shape[-1]
    return _gradients(
        q, (0, 0, *q.stride()), q_starts, d, (0, 0, *d.stride()), d_starts, argmax, grad_scores, q_inv, d_inv,
        sizes=(1, Nq, Nd, Lq, d.shape[0]),  # a winner's bound: the tokens of d
        rows=(q.shape[0] if need_dq else None, d.shape[0] if need_dd else None),
        pairs=None if q_ids is None else _listed_pairs(q_ids, d_ids, Nq, Nd),
    )  # fmt: skip
