"""maxsim.maxsim against the reference: every layout, dtype, mask form and edge case."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    DTYPES,
    assert_scores_close,
    dtype_id,
    integer_tokens,
    naive_scores,
    random_tokens,
)

import maxsim
from maxsim.reference import lengths_to_mask, maxsim_reference

# (name, q batch, d batch, Lq, Ld, D): every layout of DESIGN.md, with odd and unit sizes
LAYOUTS = [
    ("query-vs-corpus", (), (7,), 33, 97, 130),
    ("query-vs-corpus", (), (1,), 1, 1, 1),
    ("pairs", (5,), (5,), 31, 180, 96),
    ("candidates", (4, 1), (4, 10), 32, 97, 128),
    ("all-pairs", (6, 1), (1, 9), 33, 1, 16),
    ("all-pairs", (3, 1), (1, 5), 1, 513, 128),
    ("nested", (2, 1, 3), (2, 4, 1), 5, 17, 24),
    ("mixed-broadcast", (3, 1, 2), (4, 1), 7, 9, 8),
]


def layout_id(layout) -> str:
    name, qb, db, lq, ld, dim = layout
    return f"{name}-q{list(qb)}-d{list(db)}-Lq{lq}-Ld{ld}-D{dim}".replace(" ", "")


def make_masks(generator, q_shape, d_shape, form):
    """Masks or lengths of the requested ``form`` for tokens ``q_shape``/``d_shape`` (no D)."""
    if form == "none":
        return {}
    lq, ld = q_shape[-1], d_shape[-1]
    q_len = torch.randint(1, lq + 1, q_shape[:-1], generator=generator)
    d_len = torch.randint(1, ld + 1, d_shape[:-1], generator=generator)
    if form == "lengths":
        return {"q_lengths": q_len, "d_lengths": d_len}
    q_mask = torch.rand(q_shape, generator=generator) < 0.7
    d_mask = torch.rand(d_shape, generator=generator) < 0.6
    d_mask[..., torch.randint(0, ld, (), generator=generator)] = True  # every document has a real token
    return {"q_mask": q_mask, "d_mask": d_mask}


def reference_masks(masks, lq, ld):
    q_mask = masks.get(
        "q_mask", None if "q_lengths" not in masks else lengths_to_mask(masks["q_lengths"], lq)
    )
    d_mask = masks.get(
        "d_mask", None if "d_lengths" not in masks else lengths_to_mask(masks["d_lengths"], ld)
    )
    return q_mask, d_mask


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("form", ["none", "mask", "lengths"])
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalize"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_matches_reference(layout, normalize, form, dtype):
    _, qb, db, lq, ld, dim = layout
    g = torch.Generator().manual_seed(hash((layout, form)) % 2**31)
    q = random_tokens((*qb, lq, dim), dtype, generator=g)
    d = random_tokens((*db, ld, dim), dtype, generator=g)
    masks = make_masks(g, (*qb, lq), (*db, ld), form)
    scores, argmax = maxsim.maxsim(q, d, normalize=normalize, return_argmax=True, **masks)
    q_mask, d_mask = reference_masks(masks, lq, ld)
    ref, ref_argmax = maxsim_reference(q, d, q_mask=q_mask, d_mask=d_mask, normalize=normalize)
    naive = naive_scores(q, d, q_mask=q_mask, d_mask=d_mask, normalize=normalize)
    assert scores.dtype == torch.float32 and argmax.dtype == torch.int32
    assert argmax.shape == (*scores.shape, lq)
    assert_scores_close(scores, ref, dtype=dtype, naive=naive)
    if dtype == torch.float32:  # random float32: no near-ties to flip, the argmax must be identical
        assert torch.equal(argmax, ref_argmax)
    scores_only = maxsim.maxsim(q, d, normalize=normalize, **masks)
    assert torch.equal(scores_only, scores)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_argmax_first_on_ties(layout, dtype):
    """Integer tokens are exact in every dtype and tie often: the first winner must be reported."""
    _, qb, db, lq, ld, dim = layout
    g = torch.Generator().manual_seed(7)
    q = integer_tokens((*qb, lq, dim), dtype, generator=g)
    d = integer_tokens((*db, ld, dim), dtype, generator=g)
    masks = make_masks(g, (*qb, lq), (*db, ld), "mask")
    scores, argmax = maxsim.maxsim(q, d, return_argmax=True, **masks)
    ref, ref_argmax = maxsim_reference(q, d, **masks)
    assert torch.equal(scores.double(), ref)
    assert torch.equal(argmax, ref_argmax)
    assert bool((argmax[~masks["q_mask"].expand_as(argmax)] == -1).all())


def test_broadcast_shapes_of_design():
    g = torch.Generator().manual_seed(0)
    q = random_tokens((4, 8, 16), torch.float32, generator=g)
    d = random_tokens((4, 6, 10, 16), torch.float32, generator=g)
    assert maxsim.maxsim(q[0], d[0]).shape == (6,)
    assert maxsim.maxsim(q, d[:, 0]).shape == (4,)
    assert maxsim.maxsim(q[:, None], d).shape == (4, 6)
    assert maxsim.maxsim(q[:, None], d[0][None]).shape == (4, 6)


@pytest.mark.parametrize("q_batch, d_batch", [((2, 2), (2,)), ((3, 3), (3, 1)), ((2, 3), (3,))])
def test_batch_dims_out_of_canonical_order(q_batch, d_batch):
    """Query-only dims before paired ones (``q [A, B]`` against ``d [B]``): each score is its own pair's,
    even where the batch sizes happen to equal the canonical ``[P, Qn]``."""
    g = torch.Generator().manual_seed(2)
    q = integer_tokens((*q_batch, 5, 4), torch.float32, generator=g)
    d = integer_tokens((*d_batch, 3, 4), torch.float32, generator=g)
    ref, _ = maxsim_reference(q, d)
    assert torch.equal(maxsim.maxsim(q, d).double(), ref)


def test_mask_broadcast_within_side():
    """A mask shared by all queries ([Lq]) broadcasts over that side's own batch dims."""
    g = torch.Generator().manual_seed(1)
    q = random_tokens((3, 5, 8), torch.float32, generator=g)
    d = random_tokens((3, 7, 8), torch.float32, generator=g)
    q_mask = torch.tensor([True, True, False, True, False])
    ours = maxsim.maxsim(q, d, q_mask=q_mask)
    ref, _ = maxsim_reference(q, d, q_mask=q_mask.expand(3, 5))
    assert_scores_close(ours, ref, dtype=torch.float32)


@pytest.mark.parametrize(
    "q_batch, d_batch, lengths_shape",
    [((), (7,), (7,)), ((4, 1), (4, 10), (4, 10)), ((4, 1), (1, 10), (10,)), ((2, 1, 3), (2, 4, 1), (4, 1))],
)
def test_document_lengths_reach_the_backend_as_lengths(q_batch, d_batch, lengths_shape, monkeypatch):
    """``d_lengths`` go to the backend as canonical ``[P, Dn]`` lengths, no mask built (the GPU kernels read
    one length per document), broadcast like the tokens; the scores are the reference's."""
    from maxsim import api
    from maxsim.backends import torch_backend

    seen = []

    def record(q, d, q_mask, d_mask, *, d_lengths=None, **kwargs):
        seen.append((d_mask, d_lengths))
        assert d_lengths.shape == d.shape[:2]
        return torch_backend.maxsim_padded(q, d, q_mask, d_mask, d_lengths=d_lengths, **kwargs)

    monkeypatch.setattr(api, "get_backend", lambda device: type("Recording", (), {"maxsim_padded": record}))
    g = torch.Generator().manual_seed(3)
    q = random_tokens((*q_batch, 6, 8), torch.float32, generator=g)
    d = random_tokens((*d_batch, 9, 8), torch.float32, generator=g)
    lengths = torch.randint(1, 10, lengths_shape, generator=g)
    ours = maxsim.maxsim(q, d, d_lengths=lengths)
    assert len(seen) == 1 and seen[0][0] is None
    d_mask = lengths_to_mask(lengths, 9).expand(*d.shape[:-1])
    ref, _ = maxsim_reference(q, d, d_mask=d_mask)
    assert_scores_close(ours, ref, dtype=torch.float32)


def test_non_contiguous_views():
    g = torch.Generator().manual_seed(2)
    q_big = random_tokens((6, 40, 64), torch.float32, generator=g)
    d_big = random_tokens((9, 50, 64), torch.float32, generator=g)
    q = q_big[::2, 1::3, ::2]  # [3, 13, 32] strided on every axis
    d = d_big.transpose(0, 1)[::3, :, ::2].transpose(0, 1)  # [9, 17, 32]
    ours, argmax = maxsim.maxsim(q[:, None], d[None], return_argmax=True)
    ref, ref_argmax = maxsim_reference(q[:, None], d[None])
    assert_scores_close(ours, ref, dtype=torch.float32)
    assert torch.equal(argmax, ref_argmax)


def test_inputs_are_not_written():
    g = torch.Generator().manual_seed(3)
    q = random_tokens((2, 5, 8), torch.float16, generator=g)
    d = random_tokens((2, 9, 8), torch.float16, generator=g)
    d_mask = torch.rand(2, 9, generator=g) < 0.5
    d_mask[:, 0] = True
    copies = [t.clone() for t in (q, d, d_mask)]
    maxsim.maxsim(q, d, d_mask=d_mask, normalize=True, return_argmax=True)
    for before, after in zip(copies, (q, d, d_mask), strict=True):
        assert torch.equal(before, after)


def test_nan_and_inf_follow_the_reference():
    g = torch.Generator().manual_seed(4)
    q = random_tokens((4, 6, 8), torch.float32, generator=g)
    d = random_tokens((5, 7, 8), torch.float32, generator=g)
    d[1, 3, 2] = float("nan")  # a real NaN token: its pairs become NaN and it is the argmax
    d[2, :, :] = float("-inf")  # a document of -inf tokens
    q[3, 2, :] = float("inf")
    d_mask = torch.ones(5, 7, dtype=torch.bool)
    d[4, 5] = float("nan")  # masked out: must not take part
    d_mask[4, 5] = False
    q_mask = torch.ones(4, 6, dtype=torch.bool)
    q[0, 1] = float("nan")  # masked query token: adds 0 whatever it holds
    q_mask[0, 1] = False
    args = dict(q_mask=q_mask[:, None], d_mask=d_mask[None])
    ours, argmax = maxsim.maxsim(q[:, None], d[None], return_argmax=True, **args)
    ref, ref_argmax = maxsim_reference(q[:, None], d[None], **args)
    assert_scores_close(ours, ref, dtype=torch.float32)
    assert torch.equal(argmax, ref_argmax)
    assert ours[:, 1].isnan().all() and not ours[0, 4].isnan()


def test_all_minus_inf_picks_first_real_token():
    """When every real similarity is -inf the argmax is the first real token, never a masked one."""
    q = torch.ones(1, 2, 4)
    d = torch.full((1, 5, 4), float("-inf"))
    d_mask = torch.tensor([[False, False, True, True, False]])
    scores, argmax = maxsim.maxsim(q, d, d_mask=d_mask, return_argmax=True)
    assert scores.item() == float("-inf")
    assert argmax.tolist() == [[2, 2]]


def test_document_without_real_token_is_minus_inf_without_validation():
    q = torch.randn(3, 8)
    d = torch.randn(2, 4, 8)
    d_mask = torch.tensor([[True, False, False, False], [False] * 4])
    scores = maxsim.maxsim(q, d, d_mask=d_mask, validate=False)
    assert scores[1].item() == float("-inf") and scores[0].isfinite()


@pytest.mark.parametrize("budget", [1, 4096, 70_000])
def test_tiny_memory_budget_splits_every_axis(budget, monkeypatch):
    """A small budget forces blocks over groups, queries, documents and document tokens."""
    monkeypatch.setenv("MAXSIM_MEMORY_BUDGET", str(budget))
    g = torch.Generator().manual_seed(5)
    q = random_tokens((3, 4, 1, 9, 16), torch.float32, generator=g)
    d = random_tokens((3, 1, 5, 101, 16), torch.float32, generator=g)
    masks = make_masks(g, (3, 4, 1, 9), (3, 1, 5, 101), "mask")
    ours, argmax = maxsim.maxsim(q, d, return_argmax=True, **masks)
    ref, ref_argmax = maxsim_reference(q, d, **masks)
    assert_scores_close(ours, ref, dtype=torch.float32)
    assert torch.equal(argmax, ref_argmax)


def test_float64_is_accepted_for_gradcheck():
    g = torch.Generator().manual_seed(6)
    q = random_tokens((3, 8), torch.float64, generator=g)
    d = random_tokens((4, 5, 8), torch.float64, generator=g)
    scores = maxsim.maxsim(q, d)
    assert scores.dtype == torch.float64
    ref, _ = maxsim_reference(q, d)
    assert torch.allclose(scores, ref, rtol=1e-12, atol=1e-12)


def test_empty_batch():
    q = torch.randn(0, 1, 3, 8)
    d = torch.randn(1, 4, 5, 8)
    scores, argmax = maxsim.maxsim(q, d, return_argmax=True)
    assert scores.shape == (0, 4) and argmax.shape == (0, 4, 3)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_forced_backend(backend, monkeypatch):
    monkeypatch.setenv("MAXSIM_BACKEND", backend)
    g = torch.Generator().manual_seed(8)
    q = random_tokens((2, 5, 8), torch.float32, generator=g)
    d = random_tokens((2, 6, 8), torch.float32, generator=g)
    ref, _ = maxsim_reference(q, d)
    assert_scores_close(maxsim.maxsim(q, d), ref, dtype=torch.float32)


def test_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("MAXSIM_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="MAXSIM_BACKEND"):
        maxsim.maxsim(torch.randn(2, 4), torch.randn(3, 4))
