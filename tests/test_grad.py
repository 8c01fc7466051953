"""Gradients: float64 gradcheck of the reference and of our backend, ours against the reference's autograd."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    DTYPES,
    NoGradient,
    assert_grads_close,
    dtype_id,
    integer_tokens,
    random_tokens,
    record_argmax_gradients,
    weighted_grads,
)
from test_maxsim import LAYOUTS, layout_id, make_masks, reference_masks
from test_varlen import CORPORA, corpus_id, make

import maxsim
from maxsim.reference import maxsim_reference, maxsim_varlen_reference

SMALL_LAYOUTS = [
    ("query-vs-corpus", (), (3,), 4, 5, 6),
    ("pairs", (2,), (2,), 3, 7, 5),
    ("candidates", (2, 1), (2, 3), 3, 4, 5),
    ("all-pairs", (3, 1), (1, 2), 2, 6, 4),
]


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalize"])
@pytest.mark.parametrize("form", ["none", "mask"])
@pytest.mark.parametrize("layout", SMALL_LAYOUTS, ids=layout_id)
def test_gradcheck_float64(layout, form, normalize):
    _, qb, db, lq, ld, dim = layout
    g = torch.Generator().manual_seed(0)
    q = random_tokens((*qb, lq, dim), torch.float64, generator=g).requires_grad_()
    d = random_tokens((*db, ld, dim), torch.float64, generator=g).requires_grad_()
    masks = make_masks(g, (*qb, lq), (*db, ld), form)
    q_mask, d_mask = reference_masks(masks, lq, ld)
    assert torch.autograd.gradcheck(
        lambda a, b: maxsim_reference(a, b, q_mask=q_mask, d_mask=d_mask, normalize=normalize)[0], (q, d)
    )
    assert torch.autograd.gradcheck(lambda a, b: maxsim.maxsim(a, b, normalize=normalize, **masks), (q, d))


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalize"])
@pytest.mark.parametrize(
    "pairs", [None, (torch.tensor([0, 2, 1, 0]), torch.tensor([1, 0, 1, 1]))], ids=["all", "listed"]
)
def test_gradcheck_varlen_float64(pairs, normalize):
    corpus = ("small", [2, 3, 1], [4, 1], 5)
    q, cu_q, d, cu_d = make(corpus, torch.float64, seed=1)
    q.requires_grad_(), d.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b, pairs=pairs: maxsim.maxsim_varlen(a, cu_q, b, cu_d, pairs=pairs, normalize=normalize),
        (q, d),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalize"])
@pytest.mark.parametrize("form", ["none", "mask", "lengths"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_grads_match_reference(layout, form, normalize, dtype):
    _, qb, db, lq, ld, dim = layout
    g = torch.Generator().manual_seed(2)
    q = random_tokens((*qb, lq, dim), dtype, generator=g)
    d = random_tokens((*db, ld, dim), dtype, generator=g)
    masks = make_masks(g, (*qb, lq), (*db, ld), form)
    q_mask, d_mask = reference_masks(masks, lq, ld)
    dq, dd = weighted_grads(lambda a, b: maxsim.maxsim(a, b, normalize=normalize, **masks), q, d, seed=3)
    rq, rd = weighted_grads(
        lambda a, b: maxsim_reference(a, b, q_mask=q_mask, d_mask=d_mask, normalize=normalize)[0],
        q,
        d,
        seed=3,
        exact=True,
    )
    assert_grads_close(dq, rq, dtype=dtype)
    assert_grads_close(dd, rd, dtype=dtype)
    if d_mask is not None:
        assert bool((dd[~d_mask.expand(dd.shape[:-1])] == 0).all()), "masked document tokens got a gradient"
    if q_mask is not None:
        assert bool((dq[~q_mask.expand(dq.shape[:-1])] == 0).all()), "masked query tokens got a gradient"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_ties_route_to_first_winner(dtype):
    """Integer tokens tie often: the whole gradient goes to the first winner, as torch.max routes it."""
    g = torch.Generator().manual_seed(4)
    q = integer_tokens((4, 1, 6, 8), dtype, generator=g, low=-1, high=2)
    d = integer_tokens((1, 5, 9, 8), dtype, generator=g, low=-1, high=2)
    dq, dd = weighted_grads(maxsim.maxsim, q, d, seed=5)
    rq, rd = weighted_grads(lambda a, b: maxsim_reference(a, b)[0], q, d, seed=5, exact=True)
    assert_grads_close(dq, rq, dtype=dtype)
    assert_grads_close(dd, rd, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalize"])
@pytest.mark.parametrize("corpus", CORPORA, ids=corpus_id)
def test_varlen_grads_match_reference(corpus, normalize, dtype):
    q, cu_q, d, cu_d = make(corpus, dtype, seed=6)
    for pairs in (None, (torch.tensor([0, 0]), torch.tensor([0, len(corpus[2]) - 1]))):
        dq, dd = weighted_grads(
            lambda a, b, pairs=pairs: maxsim.maxsim_varlen(
                a, cu_q, b, cu_d, pairs=pairs, normalize=normalize
            ),
            q,
            d,
            7,
        )
        rq, rd = weighted_grads(
            lambda a, b, pairs=pairs: maxsim_varlen_reference(
                a, cu_q, b, cu_d, pairs=pairs, normalize=normalize
            )[0],
            q,
            d,
            7,
            exact=True,
        )
        assert_grads_close(dq, rq, dtype=dtype)
        assert_grads_close(dd, rd, dtype=dtype)


def test_autograd_keeps_inputs_and_int32_argmax_only():
    """Nothing of size batch * Lq * Ld is saved for the backward."""
    g = torch.Generator().manual_seed(8)
    q = random_tokens((6, 1, 16, 8), torch.float32, generator=g).requires_grad_()
    d = random_tokens((1, 7, 40, 8), torch.float32, generator=g).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        scores = maxsim.maxsim(q, d, normalize=True)
    bound = 6 * 7 * 16  # O(batch * Lq) int32 argmax
    for tensor in saved:
        if tensor.dtype == torch.int32:
            assert tensor.numel() <= bound
        else:
            assert tensor.numel() <= max(q.numel(), d.numel()), f"saved {tuple(tensor.shape)} {tensor.dtype}"
    scores.sum().backward()
    assert q.grad.shape == q.shape and d.grad.shape == d.shape



@pytest.mark.parametrize("layout", ["padded", "varlen"])
def test_argmax_gradient_is_not_materialized(layout, monkeypatch):
    """The argmax output is not differentiable: the backward gets None for it, not a zeros tensor the size
    of the argmax built on every training step."""
    from maxsim.backends import torch_backend

    function = torch_backend.PaddedMaxSim if layout == "padded" else torch_backend.VarlenMaxSim
    seen = record_argmax_gradients(monkeypatch, function)
    monkeypatch.setenv("MAXSIM_BACKEND", "torch")
    g = torch.Generator().manual_seed(9)
    q = random_tokens((6, 16, 8), torch.float32, generator=g).requires_grad_()
    d = random_tokens((7, 40, 8), torch.float32, generator=g).requires_grad_()
    if layout == "padded":
        maxsim.maxsim(q[:, None], d[None]).sum().backward()
    else:
        cu_q, cu_d = torch.arange(0, 97, 16), torch.arange(0, 281, 40)
        maxsim.maxsim_varlen(q.view(-1, 8), cu_q, d.view(-1, 8), cu_d).sum().backward()
    assert seen == [None]
    assert q.grad is not None and d.grad is not None


def test_grad_only_for_requested_inputs():
    q = torch.randn(3, 5, 8, requires_grad=True)
    d = torch.randn(3, 7, 8)
    maxsim.maxsim(q, d).sum().backward()
    assert q.grad is not None and d.grad is None


def test_small_budget_backward(monkeypatch):
    monkeypatch.setenv("MAXSIM_MEMORY_BUDGET", "3000")
    g = torch.Generator().manual_seed(9)
    q = random_tokens((5, 1, 7, 8), torch.float32, generator=g)
    d = random_tokens((1, 6, 33, 8), torch.float32, generator=g)
    dq, dd = weighted_grads(lambda a, b: maxsim.maxsim(a, b, normalize=True), q, d, seed=10)
    rq, rd = weighted_grads(lambda a, b: maxsim_reference(a, b, normalize=True)[0], q, d, seed=10, exact=True)
    assert_grads_close(dq, rq, dtype=torch.float32)
    assert_grads_close(dd, rd, dtype=torch.float32)


def test_undefined_score_gradient_gives_none():
    """The torch backend's autograd reached with no gradient for the scores (not materialized)."""
    q = torch.randn(3, 4, 8, requires_grad=True)
    d = torch.randn(3, 5, 8, requires_grad=True)
    cu = torch.tensor([0, 4, 12])
    for scores in (maxsim.maxsim(q, d), maxsim.maxsim_varlen(q.view(-1, 8), cu, d.view(-1, 8)[:12], cu)):
        q.grad = d.grad = None
        (NoGradient.apply(scores).sum() + q.sum()).backward()
        assert torch.equal(q.grad, torch.ones_like(q)) and d.grad is None


def _sum_in_order(rows: torch.Tensor, values: torch.Tensor, n_rows: int) -> torch.Tensor:
    """``out[rows[k]] += values[k]`` for k = 0, 1, ... one after another in float32: the order the torch
    backend's backward promises for each gradient row."""
    out = torch.zeros(n_rows, values.shape[-1])
    for row, value in zip(rows.tolist(), values, strict=True):
        out[row] = out[row] + value
    return out


def test_torch_backward_adds_each_row_in_order(monkeypatch):
    """The torch backend's backward (no CPU kernel) sums a token's many contributions one after another in
    entry order: bitwise a sequential float32 sum on any thread count. The padded shape (256 x 4 x 32 x 128
    values onto 16 document tokens) is large enough for ``index_put_``'s threaded atomic add, which the
    backend used before and which fails this on two threads."""
    monkeypatch.setenv("MAXSIM_CPU_KERNEL", "0")
    from maxsim.backends import torch_backend

    g = torch.Generator().manual_seed(71)
    P, Qn, Dn, Lq, Ld, D = 1, 256, 4, 32, 4, 128
    q, d = torch.randn(P, Qn, Lq, D, generator=g), torch.randn(P, Dn, Ld, D, generator=g)
    argmax = torch.randint(-1, Ld, (P, Qn, Dn, Lq), generator=g, dtype=torch.int32)
    weights = torch.rand(P, Qn, Dn, generator=g)
    _, dd = torch_backend.backward_padded(q, d, argmax, weights, normalize=False)
    real = argmax >= 0
    rows = ((torch.arange(P)[:, None, None, None] * Dn + torch.arange(Dn)[:, None]) * Ld + argmax)[real]
    values = (weights[..., None, None] * q[:, :, None])[real]  # entries in [P, Qn, Dn, Lq] order
    assert torch.equal(dd.reshape(-1, D), _sum_in_order(rows, values, P * Dn * Ld))

    # listed pairs of packed sequences, pairs repeated: rows of q and d in (pair, query token) order
    cu_q, cu_d = torch.arange(0, 6 * Lq + 1, Lq), torch.arange(0, 5 * Ld + 1, Ld)
    q, d = torch.randn(6 * Lq, D, generator=g), torch.randn(5 * Ld, D, generator=g)
    q_ids, d_ids = torch.randint(0, 6, (400,), generator=g), torch.randint(0, 5, (400,), generator=g)
    argmax = torch.randint(0, Ld, (400, Lq), generator=g, dtype=torch.int32)
    weights = torch.rand(400, generator=g)
    dq, dd = torch_backend.backward_varlen(
        q, cu_q, d, cu_d, q_ids, d_ids, argmax, weights, normalize=False, need_dq=True, need_dd=True
    )
    q_rows = (cu_q[q_ids][:, None] + torch.arange(Lq)).reshape(-1)
    d_rows = (cu_d[d_ids][:, None] + argmax).reshape(-1)
    w = weights[:, None].expand(-1, Lq).reshape(-1, 1)
    assert torch.equal(dq, _sum_in_order(q_rows, w * d[d_rows], q.shape[0]))
    assert torch.equal(dd, _sum_in_order(d_rows, w * q[q_rows], d.shape[0]))
