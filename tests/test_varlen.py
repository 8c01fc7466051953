"""maxsim.maxsim_varlen against the reference: all pairs, listed pairs, argmax padding, gradients."""

from __future__ import annotations

import pytest
import torch
from helpers import DTYPES, assert_scores_close, dtype_id, integer_tokens, random_tokens

import maxsim
from maxsim.reference import maxsim_varlen_reference

# (name, query lengths, document lengths, D)
CORPORA = [
    ("one-one", [1], [1], 1),
    ("ragged", [3, 33, 1], [97, 1, 180, 31, 2], 130),
    ("long-doc", [32], [513, 7], 96),
    ("many", [5] * 9, [13, 75, 300, 1, 64, 2, 17], 16),
]


def corpus_id(corpus) -> str:
    name, ql, dl, dim = corpus
    return f"{name}-Nq{len(ql)}-Nd{len(dl)}-D{dim}"


def cu(lengths, dtype=torch.int32):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=dtype)


def make(corpus, dtype, seed, tokens=random_tokens):
    _, ql, dl, dim = corpus
    g = torch.Generator().manual_seed(seed)
    q = tokens((sum(ql), dim), dtype, generator=g)
    d = tokens((sum(dl), dim), dtype, generator=g)
    return q, cu(ql), d, cu(dl, torch.int64)


def naive_varlen(q, cu_q, d, cu_d, pairs, normalize):
    """Torch in the input dtype, one pair at a time (for the low-precision tolerance)."""
    if normalize:
        q, d = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(d, dim=-1)
    cq, cd = cu_q.tolist(), cu_d.tolist()
    q_ids, d_ids = pairs
    out = [
        (q[cq[i] : cq[i + 1]] @ d[cd[j] : cd[j + 1]].T).amax(-1).sum(dtype=torch.float32)
        for i, j in zip(q_ids.tolist(), d_ids.tolist(), strict=True)
    ]
    return torch.stack(out)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalize"])
@pytest.mark.parametrize("mode", ["all-pairs", "listed"])
@pytest.mark.parametrize("corpus", CORPORA, ids=corpus_id)
def test_matches_reference(corpus, mode, normalize, dtype):
    q, cu_q, d, cu_d = make(corpus, dtype, seed=len(corpus[1]))
    nq, nd = len(corpus[1]), len(corpus[2])
    g = torch.Generator().manual_seed(1)
    pairs = (
        None
        if mode == "all-pairs"
        else (torch.randint(0, nq, (11,), generator=g), torch.randint(0, nd, (11,), generator=g))
    )
    scores, argmax = maxsim.maxsim_varlen(
        q, cu_q, d, cu_d, pairs=pairs, normalize=normalize, return_argmax=True
    )
    ref, ref_argmax = maxsim_varlen_reference(q, cu_q, d, cu_d, pairs=pairs, normalize=normalize)
    grid = pairs or (torch.arange(nq).repeat_interleave(nd), torch.arange(nd).repeat(nq))
    naive = naive_varlen(q, cu_q, d, cu_d, grid, normalize).reshape(ref.shape)
    assert_scores_close(scores, ref, dtype=dtype, naive=naive)
    max_lq = max(corpus[1])
    assert argmax.shape == (*scores.shape, max_lq) and argmax.dtype == torch.int32
    if dtype == torch.float32:
        assert torch.equal(argmax, ref_argmax)
    scores_only = maxsim.maxsim_varlen(q, cu_q, d, cu_d, pairs=pairs, normalize=normalize)  # no-argmax paths
    assert_scores_close(scores_only, ref, dtype=dtype, naive=naive)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_argmax_ties_and_padding(dtype):
    corpus = CORPORA[1]
    q, cu_q, d, cu_d = make(corpus, dtype, seed=3, tokens=integer_tokens)
    scores, argmax = maxsim.maxsim_varlen(
        q, cu_q, d, cu_d, return_argmax=True, max_seqlen_q=40, max_seqlen_d=200
    )
    ref, ref_argmax = maxsim_varlen_reference(q, cu_q, d, cu_d)
    assert torch.equal(scores.double(), ref)
    assert argmax.shape == (3, 5, 40)
    assert torch.equal(argmax[..., :33], ref_argmax)
    assert bool((argmax[..., 33:] == -1).all())


@pytest.mark.parametrize("budget", [2048, 200_000, 10**9])
def test_budgets(budget, monkeypatch):
    """Tiny budgets pad a few sequences at a time; large ones score packed blocks of many documents."""
    monkeypatch.setenv("MAXSIM_MEMORY_BUDGET", str(budget))
    q, cu_q, d, cu_d = make(CORPORA[1], torch.float32, seed=4)
    for pairs in (None, (torch.tensor([0, 2, 1]), torch.tensor([4, 4, 0]))):
        scores, argmax = maxsim.maxsim_varlen(q, cu_q, d, cu_d, pairs=pairs, return_argmax=True)
        ref, ref_argmax = maxsim_varlen_reference(q, cu_q, d, cu_d, pairs=pairs)
        assert_scores_close(scores, ref, dtype=torch.float32)
        assert torch.equal(argmax, ref_argmax)
        assert_scores_close(maxsim.maxsim_varlen(q, cu_q, d, cu_d, pairs=pairs), ref, dtype=torch.float32)


def test_nan_in_packed_documents():
    q, cu_q, d, cu_d = make(CORPORA[1], torch.float32, seed=9)
    d[cu_d[2] + 5, 3] = float("nan")
    ref, _ = maxsim_varlen_reference(q, cu_q, d, cu_d)
    assert_scores_close(maxsim.maxsim_varlen(q, cu_q, d, cu_d), ref, dtype=torch.float32)


def test_matches_padded_api():
    """The packed and padded forms of one corpus give the same scores."""
    q, cu_q, d, cu_d = make(CORPORA[1], torch.float32, seed=5)
    ql, dl = CORPORA[1][1], CORPORA[1][2]
    q_pad = torch.zeros(len(ql), max(ql), q.shape[1])
    d_pad = torch.zeros(len(dl), max(dl), d.shape[1])
    for i, n in enumerate(ql):
        q_pad[i, :n] = q[cu_q[i] : cu_q[i + 1]]
    for j, n in enumerate(dl):
        d_pad[j, :n] = d[cu_d[j] : cu_d[j + 1]]
    padded = maxsim.maxsim(
        q_pad[:, None], d_pad[None], q_lengths=torch.tensor(ql)[:, None], d_lengths=torch.tensor(dl)[None]
    )
    packed = maxsim.maxsim_varlen(q, cu_q, d, cu_d)
    assert torch.allclose(padded, packed, rtol=1e-5, atol=1e-5)
