"""maxsim.topk against the full score matrix of the reference, sorted (score desc, id asc)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_scores_close, dtype_id, integer_tokens, naive_scores, random_tokens

import maxsim
from maxsim import search
from maxsim.reference import lengths_to_mask, maxsim_reference


def reference_topk(q, d, k, *, q_mask=None, d_mask=None, normalize=False):
    """Top-k of the float64 reference's full ``[Nq, N]`` matrix: score desc, equal scores by lower id."""
    full, _ = maxsim_reference(
        q[:, None], d[None], q_mask=None if q_mask is None else q_mask[:, None],
        d_mask=None if d_mask is None else d_mask[None], normalize=normalize,
    )  # fmt: skip
    order = torch.sort(full, dim=1, descending=True, stable=True)
    return order.values[:, :k], order.indices[:, :k], full


def pack(d, lengths):
    """A padded corpus ``[N, Ld, D]`` with ``lengths`` as packed tokens and int32 offsets."""
    tokens = torch.cat([d[i, :n] for i, n in enumerate(lengths.tolist())])
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    return tokens, cu


@pytest.mark.parametrize("chunk", [1, 3, 7, None, 1000])
@pytest.mark.parametrize("corpus", ["padded", "packed"])
def test_exact_ids_and_scores_with_ties(corpus, chunk):
    """Integer tokens and duplicated documents: many equal scores, ordered by lower id, exactly."""
    g = torch.Generator().manual_seed(0)
    q = integer_tokens((4, 6, 8), torch.float32, generator=g)
    d = integer_tokens((9, 11, 8), torch.float32, generator=g)
    d = torch.cat([d, d[:5], d[2:4]])  # 16 documents, 7 of them copies: equal scores
    lengths = torch.randint(1, 12, (9,), generator=g)
    lengths = torch.cat([lengths, lengths[:5], lengths[2:4]])
    d_mask = lengths_to_mask(lengths, 11)
    ref_scores, ref_ids, _ = reference_topk(q, d, 10, d_mask=d_mask)
    if corpus == "padded":
        scores, ids = maxsim.topk(q, d, 10, d_lengths=lengths, chunk=chunk)
    else:
        tokens, cu = pack(d, lengths)
        # validate=False: the longest document is found on the device, not by the checks
        scores, ids = maxsim.topk(q, tokens, 10, cu_seqlens_d=cu, chunk=chunk, validate=chunk != 3)
    assert scores.dtype == torch.float32 and ids.dtype == torch.int64 and ids.shape == (4, 10)
    assert torch.equal(scores.double(), ref_scores)
    assert torch.equal(ids, ref_ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalize"])
@pytest.mark.parametrize("corpus", ["padded", "packed"])
def test_random_tokens_every_dtype(corpus, normalize, dtype):
    """Random tokens, query masks (one query without a real token), ragged documents, odd sizes."""
    g = torch.Generator().manual_seed(1)
    q = random_tokens((5, 13, 33), dtype, generator=g)
    d = random_tokens((23, 19, 33), dtype, generator=g)
    q_mask = torch.rand(5, 13, generator=g) > 0.3
    q_mask[2] = False  # scores 0 against every document
    lengths = torch.randint(1, 20, (23,), generator=g)
    d_mask = lengths_to_mask(lengths, 19)
    _, _, full = reference_topk(q, d, 23, q_mask=q_mask, d_mask=d_mask, normalize=normalize)
    if corpus == "padded":
        scores, ids = maxsim.topk(q, d, 6, q_mask=q_mask, d_mask=d_mask, chunk=4, normalize=normalize)
    else:
        tokens, cu = pack(d, lengths)
        scores, ids = maxsim.topk(q, tokens, 6, q_mask=q_mask, cu_seqlens_d=cu, chunk=4, normalize=normalize)
    naive = naive_scores(
        q[:, None], d[None], q_mask=q_mask[:, None], d_mask=d_mask[None], normalize=normalize
    ).double()
    # each returned score is its document's score ...
    assert_scores_close(scores, full.gather(1, ids), dtype=dtype, naive=naive.gather(1, ids))
    # ... and no document left out beats the k-th by more than the two scores' tolerances (near-ties
    # between our float32 and the float64 reference may swap ids, never more)
    allowed = (1e-4 if dtype == torch.float32 else 1e-3) * full.abs().clamp(min=1.0)
    if dtype != torch.float32:
        allowed = allowed + 2 * (naive - full).abs()
    best_out = full.scatter(1, ids, float("-inf")).argmax(dim=1, keepdim=True)
    kth = ids[:, -1:]
    slack = allowed.gather(1, best_out) + allowed.gather(1, kth)
    assert bool((full.gather(1, best_out) <= full.gather(1, kth) + slack).all()), (
        "a better document was left out"
    )
    assert bool((scores[:, :-1] >= scores[:, 1:]).all()), "not sorted best first"
    assert torch.equal(ids[2], torch.arange(6)), "a query without real tokens ties everywhere: lowest ids"


def test_one_query_lengths_and_k_bounds():
    g = torch.Generator().manual_seed(2)
    q = integer_tokens((7, 8), torch.float32, generator=g)
    d = integer_tokens((12, 5, 8), torch.float32, generator=g)
    ref_scores, ref_ids, _ = reference_topk(q[None], d, 12, q_mask=lengths_to_mask(torch.tensor([4]), 7))
    scores, ids = maxsim.topk(q, d, 12, q_lengths=torch.tensor(4), chunk=5)
    assert scores.shape == ids.shape == (12,)
    assert torch.equal(scores.double(), ref_scores[0]) and torch.equal(ids, ref_ids[0])
    scores, ids = maxsim.topk(q, d, 1)
    assert ids.shape == (1,) and scores.shape == (1,)


def test_streams_in_chunks(monkeypatch):
    """The corpus is scored ``chunk`` documents at a time: never the whole ``[Nq, N]`` matrix."""
    seen = []
    real = search.maxsim

    def spy(q, d, **kw):
        seen.append(d.shape[1])
        return real(q, d, **kw)

    monkeypatch.setattr(search, "maxsim", spy)
    q = torch.randn(3, 4, 8)
    d = torch.randn(50, 6, 8)
    maxsim.topk(q, d, 5, chunk=8)
    assert seen == [8] * 6 + [2]


def test_inference_only():
    q = torch.randn(2, 4, 8, requires_grad=True)
    d = torch.randn(9, 6, 8, requires_grad=True)
    scores, ids = maxsim.topk(q, d, 3)
    assert not scores.requires_grad and not ids.requires_grad


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(k=0), ValueError, "k must lie in"),
        (dict(k=10), ValueError, r"k must lie in \[1, 9\]"),
        (dict(k=2.0), TypeError, "k must be a Python int"),
        (dict(k=True), TypeError, "k must be a Python int"),
        (dict(k=2, chunk=0), ValueError, "chunk must be >= 1"),
        (dict(k=2, chunk=2.5), TypeError, "chunk must be a Python int"),
        (dict(k=2, normalize=1), TypeError, "normalize must be a bool"),
        (dict(k=2, d_lengths=torch.tensor([0] * 9)), ValueError, "d_lengths must lie in"),
    ],
)
def test_bad_input(kwargs, error, match):
    q = torch.randn(2, 4, 8)
    d = torch.randn(9, 6, 8)
    k = kwargs.pop("k")
    with pytest.raises(error, match=match):
        maxsim.topk(q, d, k, **kwargs)


def test_bad_shapes_and_packed_corpus_errors():
    q = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="q must have shape"):
        maxsim.topk(torch.randn(1, 2, 4, 8), torch.randn(9, 6, 8), 2)
    with pytest.raises(ValueError, match="d must have 3 dims"):
        maxsim.topk(q, torch.randn(9, 8), 2)
    cu = torch.tensor([0, 3, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match="takes no d_mask or d_lengths"):
        maxsim.topk(q, torch.randn(9, 8), 2, cu_seqlens_d=cu, d_lengths=torch.tensor([3, 6]))
    with pytest.raises(ValueError, match="d must have 2 dims"):
        maxsim.topk(q, torch.randn(9, 6, 8), 2, cu_seqlens_d=cu)
    with pytest.raises(ValueError, match="cu_seqlens_d must end at"):
        maxsim.topk(q, torch.randn(10, 8), 2, cu_seqlens_d=cu)
    with pytest.raises(ValueError, match=r"k must lie in \[1, 2\]"):
        maxsim.topk(q, torch.randn(9, 8), 3, cu_seqlens_d=cu)
    with pytest.raises(TypeError, match="same dtype|one dtype"):
        maxsim.topk(q.half(), torch.randn(9, 6, 8), 2)
