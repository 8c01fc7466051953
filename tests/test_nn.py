"""maxsim.nn.MaxSim: a parameter-free module that is maxsim.maxsim."""

from __future__ import annotations

import pytest
import torch
from helpers import DTYPES, assert_scores_close, dtype_id, naive_scores, random_tokens

import maxsim
from maxsim.nn import MaxSim
from maxsim.reference import lengths_to_mask, maxsim_reference

# (name, q shape, d shape): pairs, reranking candidates, all pairs, one query against a corpus
LAYOUTS = [
    ("pairs", (3, 33, 130), (3, 97, 130)),
    ("candidates", (2, 1, 31, 96), (2, 4, 97, 96)),
    ("all-pairs", (4, 1, 1, 1), (1, 5, 1, 1)),
    ("query-vs-corpus", (33, 96), (6, 97, 96)),
]


def layout_id(layout) -> str:
    name, q_shape, d_shape = layout
    return f"{name}-Lq{q_shape[-2]}-Ld{d_shape[-2]}-D{q_shape[-1]}"


def test_module_has_no_parameters_and_a_readable_repr():
    module = MaxSim()
    assert list(module.parameters()) == [] and list(module.buffers()) == []
    assert module.state_dict() == {}
    assert repr(module) == "MaxSim(normalize=False)"
    assert repr(MaxSim(normalize=True)) == "MaxSim(normalize=True)"
    assert "MaxSim(normalize=True)" in repr(torch.nn.Sequential(MaxSim(normalize=True)))


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalize"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_forward_matches_reference(layout, dtype, normalize):
    _, q_shape, d_shape = layout
    g = torch.Generator().manual_seed(0)
    q, d = random_tokens(q_shape, dtype, generator=g), random_tokens(d_shape, dtype, generator=g)
    scores = MaxSim(normalize=normalize)(q, d)
    ref, _ = maxsim_reference(q, d, normalize=normalize)
    assert scores.dtype == torch.float32 and scores.shape == ref.shape
    assert_scores_close(scores, ref, dtype=dtype, naive=naive_scores(q, d, normalize=normalize))
    expected = maxsim.maxsim(q, d, normalize=normalize)
    assert torch.equal(scores, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_forward_passes_masks_and_lengths(dtype):
    g = torch.Generator().manual_seed(1)
    B, C, Lq, Ld, D = 3, 4, 33, 97, 130
    q, d = random_tokens((B, 1, Lq, D), dtype, generator=g), random_tokens((B, C, Ld, D), dtype, generator=g)
    q_lengths = torch.randint(1, Lq + 1, (B, 1), generator=g)
    d_lengths = torch.randint(1, Ld + 1, (B, C), generator=g)
    q_mask, d_mask = lengths_to_mask(q_lengths, Lq), lengths_to_mask(d_lengths, Ld)
    module = MaxSim()
    ref, _ = maxsim_reference(q, d, q_mask=q_mask, d_mask=d_mask)
    naive = naive_scores(q, d, q_mask=q_mask, d_mask=d_mask)
    by_mask = module(q, d, q_mask=q_mask, d_mask=d_mask)
    by_lengths = module(q, d, q_lengths=q_lengths, d_lengths=d_lengths)
    positional = module(q, d, q_mask, d_mask)
    for scores in (by_mask, by_lengths, positional):
        assert scores.shape == (B, C)
        assert_scores_close(scores, ref, dtype=dtype, naive=naive)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_gradients_match_reference_autograd(dtype):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(4, 1, 31, 96, generator=g, dtype=dtype, requires_grad=True)
    d = torch.randn(1, 5, 97, 96, generator=g, dtype=dtype, requires_grad=True)
    d_mask = torch.rand(1, 5, 97, generator=g) < 0.7
    weights = torch.randn(4, 5, generator=g, dtype=torch.float64)
    (MaxSim(normalize=True)(q, d, d_mask=d_mask) * weights).sum().backward()
    q_ref, d_ref = q.detach().double().requires_grad_(), d.detach().double().requires_grad_()
    ref, _ = maxsim_reference(q_ref, d_ref, d_mask=d_mask, normalize=True)
    (ref * weights).sum().backward()
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for ours, expected in ((q.grad, q_ref.grad), (d.grad, d_ref.grad)):
        assert ours.dtype == dtype
        torch.testing.assert_close(
            ours.double(), expected, rtol=0, atol=tol * max(1.0, expected.abs().max().item())
        )


def test_bad_input_names_the_argument():
    module = MaxSim()
    q, d = torch.randn(2, 8, 16), torch.randn(2, 10, 16)
    with pytest.raises(ValueError, match="q_lengths"):
        module(q, d, q_lengths=torch.tensor([0, 3]))
    with pytest.raises(TypeError, match="d_mask"):
        module(q, d, d_mask=torch.ones(2, 10))
    with pytest.raises(TypeError, match="normalize"):
        MaxSim(normalize="yes")(q, d)
