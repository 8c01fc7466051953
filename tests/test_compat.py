"""maxsim.compat: the original kernels-hub names against their references and against maxsim.reference."""

from __future__ import annotations

import inspect

import pytest
import torch
from helpers import DTYPES, assert_scores_close, dtype_id, integer_tokens, random_tokens

from maxsim import compat
from maxsim.reference import maxsim_reference

# ---------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------

# (q_lens, d_lens, D, pairs as (q_ids, d_ids)): unit sizes, odd sizes, ragged segments, repeated pairs
PACKED_CASES = [
    ([1], [1], 1, ([0], [0])),
    ([31, 1, 33], [97, 1, 50, 13], 96, ([0, 1, 2, 2, 0, 1, 2], [0, 1, 3, 0, 0, 2, 2])),
    ([33, 7], [1, 97, 4, 60, 2], 130, ([1, 0, 0, 1, 1], [4, 1, 3, 0, 1])),
    ([5, 31], [97], 1, ([1, 0, 1], [0, 0, 0])),
]
# (B, C, Lq, Ld, D)
PADDED_CASES = [(1, 1, 1, 1, 1), (3, 2, 33, 97, 130), (2, 3, 31, 97, 96), (1, 4, 33, 1, 1), (4, 1, 1, 97, 96)]
# (Nq, Lq, d_lens, D)
CONTRASTIVE_CASES = [
    (1, 1, [1], 1),
    (3, 33, [97, 1, 40], 130),
    (2, 31, [5, 97, 1, 12], 96),
    (4, 1, [97, 3], 1),
]


def packed_id(case) -> str:
    q_lens, d_lens, dim, pairs = case
    return f"Nq{len(q_lens)}-Nd{len(d_lens)}-P{len(pairs[0])}-Lq{max(q_lens)}-Ld{max(d_lens)}-D{dim}"


def padded_id(case) -> str:
    B, C, Lq, Ld, D = case
    return f"B{B}-C{C}-Lq{Lq}-Ld{Ld}-D{D}"


def contrastive_id(case) -> str:
    Nq, Lq, d_lens, D = case
    return f"Nq{Nq}-Nb{len(d_lens)}-Lq{Lq}-Ld{max(d_lens)}-D{D}"


def tokens(shape, dtype, generator, kind):
    if kind == "integer":  # values in {-1, 0, 1}: every dot product is exact even in bfloat16
        return integer_tokens(shape, dtype, generator=generator, low=-1, high=2)
    return random_tokens(shape, dtype, generator=generator)


def offsets(lengths, index_dtype) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=index_dtype)


def make_packed(case, dtype, *, seed=0, kind="random", index_dtype=torch.int32):
    q_lens, d_lens, dim, (q_ids, d_ids) = case
    g = torch.Generator().manual_seed(seed)
    queries = tokens((sum(q_lens), dim), dtype, g, kind)
    documents = tokens((sum(d_lens), dim), dtype, g, kind)
    return (
        queries,
        offsets(q_lens, index_dtype),
        documents,
        offsets(d_lens, index_dtype),
        torch.tensor(q_ids, dtype=index_dtype),
        torch.tensor(d_ids, dtype=index_dtype),
    )


def make_padded(case, dtype, *, seed=0, kind="random", index_dtype=torch.int32):
    B, C, Lq, Ld, D = case
    g = torch.Generator().manual_seed(seed)
    queries = tokens((B, Lq, D), dtype, g, kind)
    documents = tokens((B, C, Ld, D), dtype, g, kind)
    query_lengths = torch.randint(1, Lq + 1, (B,), generator=g).to(index_dtype)
    doc_lengths = torch.randint(1, Ld + 1, (B, C), generator=g).to(index_dtype)
    query_lengths[0], doc_lengths[0, 0] = Lq, Ld  # one full-length query and document
    return queries, documents, query_lengths, doc_lengths


def make_contrastive(case, dtype, *, seed=0, kind="random", index_dtype=torch.int32):
    Nq, Lq, d_lens, D = case
    g = torch.Generator().manual_seed(seed)
    queries = tokens((Nq, Lq, D), dtype, g, kind)
    documents = tokens((sum(d_lens), D), dtype, g, kind)
    return queries, documents, offsets(d_lens, index_dtype)


# ---------------------------------------------------------------------------------------------------------
# The same scores, pair by pair, straight from maxsim.reference and from torch in the input dtype
# ---------------------------------------------------------------------------------------------------------


def naive_pair(q, d) -> torch.Tensor:
    return (q @ d.T).amax(dim=-1).sum(dtype=torch.float32)


def direct(pairs):
    """float64 reference scores, int32 argmax (-1 nowhere: every query token here is real), naive scores."""
    ref, argmax, naive = [], [], []
    for q, d in pairs:
        s, a = maxsim_reference(q, d)
        ref.append(s)
        argmax.append(a)
        naive.append(naive_pair(q, d))
    return torch.stack(ref), argmax, torch.stack(naive)


def packed_pairs(queries, query_offsets, documents, document_offsets, q_ids, d_ids):
    qo, do = query_offsets.tolist(), document_offsets.tolist()
    return [
        (queries[qo[i] : qo[i + 1]], documents[do[j] : do[j + 1]])
        for i, j in zip(q_ids.tolist(), d_ids.tolist(), strict=True)
    ]


def padded_pairs(queries, documents, query_lengths, doc_lengths):
    B, C = doc_lengths.shape
    return [
        (queries[b, : int(query_lengths[b])], documents[b, c, : int(doc_lengths[b, c])])
        for b in range(B)
        for c in range(C)
    ]


def contrastive_pairs(queries, documents, document_offsets):
    do = document_offsets.tolist()
    return [(q, documents[do[j] : do[j + 1]]) for q in queries for j in range(len(do) - 1)]


def padded_argmax(argmaxes, shape) -> torch.Tensor:
    """The per-pair argmaxes ``[L_i]`` as the original's ``[..., width]`` buffer, 0 beyond each length."""
    out = torch.zeros(shape, dtype=torch.int32).reshape(-1, shape[-1])
    for row, a in zip(out, argmaxes, strict=True):
        row[: a.numel()] = a
    return out.reshape(shape)


# ---------------------------------------------------------------------------------------------------------
# Names and signatures: code written for the original switches by one import
# ---------------------------------------------------------------------------------------------------------

PACKED_ARGS = [
    "queries",
    "query_offsets",
    "documents",
    "document_offsets",
    "pair_query_ids",
    "pair_document_ids",
]
ORIGINAL_SIGNATURES = {
    "score_pairs_packed": PACKED_ARGS + ["max_q_len"],
    "score_pairs_packed_with_argmax": PACKED_ARGS + ["max_q_len"],
    "score_pairs_packed_train": PACKED_ARGS + ["max_q_len"],
    "score_candidates_padded": ["queries", "documents", "query_lengths", "doc_lengths"],
    "score_candidates_padded_with_argmax": ["queries", "documents", "query_lengths", "doc_lengths"],
    "score_candidates_padded_train": ["queries", "documents", "query_lengths", "doc_lengths"],
    "score_contrastive": ["queries", "documents", "document_offsets"],
    "score_contrastive_with_argmax": ["queries", "documents", "document_offsets"],
    "score_contrastive_train": ["queries", "documents", "document_offsets"],
    "maxsim_reference": ["q", "d"],
    "maxsim_reference_with_argmax": ["q", "d"],
    "score_pairs_packed_reference": PACKED_ARGS,
    "score_pairs_packed_with_argmax_reference": PACKED_ARGS + ["max_q_len"],
    "score_candidates_padded_reference": ["queries", "documents", "query_lengths", "doc_lengths"],
    "score_candidates_padded_with_argmax_reference": ["queries", "documents", "query_lengths", "doc_lengths"],
    "score_contrastive_reference": ["queries", "documents", "document_offsets"],
    "score_contrastive_with_argmax_reference": ["queries", "documents", "document_offsets"],
}


@pytest.mark.parametrize("name", sorted(ORIGINAL_SIGNATURES))
def test_original_name_and_arguments(name):
    assert name in compat.__all__
    params = inspect.signature(getattr(compat, name)).parameters
    assert list(params)[: len(ORIGINAL_SIGNATURES[name])] == ORIGINAL_SIGNATURES[name]
    for extra in list(params)[len(ORIGINAL_SIGNATURES[name]) :]:
        assert params[extra].kind is inspect.Parameter.KEYWORD_ONLY and extra == "validate"
    if "max_q_len" in params and not name.endswith("_reference"):
        assert params["max_q_len"].kind is inspect.Parameter.KEYWORD_ONLY
        assert params["max_q_len"].default is None


# ---------------------------------------------------------------------------------------------------------
# Scores: every form against its *_reference and against maxsim.reference directly
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", PACKED_CASES, ids=packed_id)
def test_packed_scores(case, dtype):
    index_dtype = torch.int64 if dtype == torch.float16 else torch.int32
    args = make_packed(case, dtype, seed=1, index_dtype=index_dtype)
    ref64, _, naive = direct(packed_pairs(*args))
    compat_ref = compat.score_pairs_packed_reference(*args)
    assert compat_ref.dtype == torch.float32
    assert_scores_close(compat_ref, ref64, dtype=torch.float32)
    for fn in (compat.score_pairs_packed, compat.score_pairs_packed_train):
        scores = fn(*args)
        assert scores.dtype == torch.float32 and scores.shape == (len(case[3][0]),)
        assert_scores_close(scores, ref64, dtype=dtype, naive=naive)
        assert_scores_close(scores, compat_ref.double(), dtype=dtype, naive=naive)
    scores, argmax = compat.score_pairs_packed_with_argmax(*args)
    assert_scores_close(scores, ref64, dtype=dtype, naive=naive)
    assert argmax.dtype == torch.int32 and argmax.shape == (len(case[3][0]), max(case[0]))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", PADDED_CASES, ids=padded_id)
def test_padded_scores(case, dtype):
    index_dtype = torch.int64 if dtype == torch.bfloat16 else torch.int32
    args = make_padded(case, dtype, seed=2, index_dtype=index_dtype)
    B, C = case[:2]
    ref64, _, naive = direct(padded_pairs(*args))
    ref64, naive = ref64.reshape(B, C), naive.reshape(B, C)
    compat_ref = compat.score_candidates_padded_reference(*args)
    assert compat_ref.dtype == torch.float32
    assert_scores_close(compat_ref, ref64, dtype=torch.float32)
    for fn in (compat.score_candidates_padded, compat.score_candidates_padded_train):
        scores = fn(*args)
        assert scores.dtype == torch.float32 and scores.shape == (B, C)
        assert_scores_close(scores, ref64, dtype=dtype, naive=naive)
        assert_scores_close(scores, compat_ref.double(), dtype=dtype, naive=naive)
    scores, argmax = compat.score_candidates_padded_with_argmax(*args)
    assert_scores_close(scores, ref64, dtype=dtype, naive=naive)
    assert argmax.dtype == torch.int32 and argmax.shape == (B, C, case[2])


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CONTRASTIVE_CASES, ids=contrastive_id)
def test_contrastive_scores(case, dtype):
    index_dtype = torch.int64 if dtype == torch.float32 else torch.int32
    args = make_contrastive(case, dtype, seed=3, index_dtype=index_dtype)
    Nq, Lq, d_lens, _ = case
    ref64, _, naive = direct(contrastive_pairs(*args))
    ref64, naive = ref64.reshape(Nq, len(d_lens)), naive.reshape(Nq, len(d_lens))
    compat_ref = compat.score_contrastive_reference(*args)
    assert compat_ref.dtype == torch.float32
    assert_scores_close(compat_ref, ref64, dtype=torch.float32)
    for fn in (compat.score_contrastive, compat.score_contrastive_train):
        scores = fn(*args)
        assert scores.dtype == torch.float32 and scores.shape == (Nq, len(d_lens))
        assert_scores_close(scores, ref64, dtype=dtype, naive=naive)
        assert_scores_close(scores, compat_ref.double(), dtype=dtype, naive=naive)
    scores, argmax = compat.score_contrastive_with_argmax(*args)
    assert_scores_close(scores, ref64, dtype=dtype, naive=naive)
    assert argmax.dtype == torch.int32 and argmax.shape == (Nq, len(d_lens), Lq)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_single_pair_references(dtype):
    g = torch.Generator().manual_seed(4)
    q, d = random_tokens((33, 130), dtype, generator=g), random_tokens((97, 130), dtype, generator=g)
    ref64, argmax = maxsim_reference(q, d)
    score = compat.maxsim_reference(q, d)
    assert score.dtype == torch.float32 and score.shape == ()
    assert_scores_close(score, ref64, dtype=torch.float32)
    score, ours_argmax = compat.maxsim_reference_with_argmax(q, d)
    assert_scores_close(score, ref64, dtype=torch.float32)
    assert ours_argmax.dtype == torch.int32 and torch.equal(ours_argmax, argmax)


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(5)
    big_q, big_d = (
        random_tokens((7, 3, 64), torch.float32, generator=g),
        random_tokens((9, 3, 64), torch.float32, generator=g),
    )
    queries, documents = big_q[::2, 1], big_d[:, 2, ::2]  # strided views [4, 64] and [9, 32]
    queries = queries[:, ::2]
    assert not queries.is_contiguous() and not documents.is_contiguous()
    qoff, doff = offsets([1, 3], torch.int32), offsets([4, 5], torch.int64)
    ids = (torch.tensor([0, 1, 1]), torch.tensor([1, 0, 1]))
    scores = compat.score_pairs_packed(queries, qoff, documents, doff, *ids)
    expected = compat.score_pairs_packed(queries.contiguous(), qoff, documents.contiguous(), doff, *ids)
    assert_scores_close(scores, expected.double(), dtype=torch.float32)
    contrastive = compat.score_contrastive(big_q[:, ::2, ::2], documents, doff)  # queries [7, 2, 32]
    expected = compat.score_contrastive(big_q[:, ::2, ::2].contiguous(), documents.contiguous(), doff)
    assert_scores_close(contrastive, expected.double(), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------
# Argmax: exact on integer tokens (many ties: the first winner), 0 beyond a query's length
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", PACKED_CASES, ids=packed_id)
def test_packed_argmax(case, dtype):
    args = make_packed(case, dtype, seed=6, kind="integer", index_dtype=torch.int64)
    ref64, argmaxes, _ = direct(packed_pairs(*args))
    P, max_q_len = len(case[3][0]), max(case[0])
    for width in (None, max_q_len, max_q_len + 3):
        expected = padded_argmax(argmaxes, (P, width or max_q_len))
        scores, argmax = compat.score_pairs_packed_with_argmax(*args, max_q_len=width)
        assert torch.equal(scores.double(), ref64)  # integer tokens: exact in every dtype
        assert argmax.dtype == torch.int32 and torch.equal(argmax, expected)
        ref_scores, ref_argmax = compat.score_pairs_packed_with_argmax_reference(
            *args, max_q_len=width or max_q_len
        )
        assert torch.equal(ref_scores.double(), ref64) and torch.equal(ref_argmax, expected)
    q_lens = [case[0][i] for i in case[3][0]]
    beyond = torch.arange(max_q_len + 3) >= torch.tensor(q_lens)[:, None]
    assert bool((argmax[beyond] == 0).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", PADDED_CASES, ids=padded_id)
def test_padded_argmax(case, dtype):
    args = make_padded(case, dtype, seed=7, kind="integer")
    B, C, Lq = case[:3]
    ref64, argmaxes, _ = direct(padded_pairs(*args))
    expected = padded_argmax(argmaxes, (B, C, Lq))
    scores, argmax = compat.score_candidates_padded_with_argmax(*args)
    assert torch.equal(scores.double(), ref64.reshape(B, C))
    assert argmax.dtype == torch.int32 and torch.equal(argmax, expected)
    ref_scores, ref_argmax = compat.score_candidates_padded_with_argmax_reference(*args)
    assert torch.equal(ref_scores.double(), ref64.reshape(B, C)) and torch.equal(ref_argmax, expected)
    beyond = torch.arange(Lq) >= args[2][:, None, None]  # [B, 1, Lq]
    assert bool((argmax[beyond.expand(B, C, Lq)] == 0).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CONTRASTIVE_CASES, ids=contrastive_id)
def test_contrastive_argmax(case, dtype):
    args = make_contrastive(case, dtype, seed=8, kind="integer")
    Nq, Lq, d_lens, _ = case
    ref64, argmaxes, _ = direct(contrastive_pairs(*args))
    expected = padded_argmax(argmaxes, (Nq, len(d_lens), Lq))
    scores, argmax = compat.score_contrastive_with_argmax(*args)
    assert torch.equal(scores.double(), ref64.reshape(Nq, len(d_lens)))
    assert argmax.dtype == torch.int32 and torch.equal(argmax, expected)
    ref_scores, ref_argmax = compat.score_contrastive_with_argmax_reference(*args)
    assert torch.equal(ref_scores.double(), ref64.reshape(Nq, len(d_lens))) and torch.equal(
        ref_argmax, expected
    )


def test_argmax_takes_the_first_winner_on_ties():
    queries = torch.ones(2, 4)
    documents = torch.ones(5, 4)  # every document token ties
    args = (queries, offsets([2], torch.int32), documents, offsets([2, 3], torch.int32))
    _, argmax = compat.score_pairs_packed_with_argmax(*args, torch.tensor([0, 0]), torch.tensor([0, 1]))
    assert argmax.tolist() == [[0, 0], [0, 0]]
    _, argmax = compat.score_contrastive_with_argmax(queries[None], documents, args[3])
    assert argmax.tolist() == [[[0, 0], [0, 0]]]


# ---------------------------------------------------------------------------------------------------------
# Gradients of the _train forms against autograd through maxsim.reference
# ---------------------------------------------------------------------------------------------------------


def reference_grads(pairs_of, leaves, weights):
    """Autograd through maxsim.reference (float64) of ``sum(weights * scores)``."""
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    ref, _, _ = direct(pairs_of(ref_leaves))
    (ref * weights.double().reshape(-1)).sum().backward()
    return [x.grad for x in ref_leaves]


def check_grads(ours, expected, dtype):
    for g, e in zip(ours, expected, strict=True):
        assert g.dtype == dtype and g.shape == e.shape
        if dtype in (torch.float16, torch.bfloat16):  # integer tokens and weights: exact
            assert torch.equal(g.double(), e)
        else:
            tol = (1e-4 if dtype == torch.float32 else 1e-10) * max(1.0, e.abs().max().item())
            torch.testing.assert_close(g.double(), e, rtol=0, atol=tol)


GRAD_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", PACKED_CASES[1:3], ids=packed_id)
def test_packed_train_gradients(case, dtype):
    kind = "integer" if dtype in (torch.float16, torch.bfloat16) else "random"
    queries, qoff, documents, doff, q_ids, d_ids = make_packed(case, dtype, seed=9, kind=kind)
    weights = torch.randint(1, 4, (q_ids.numel(),), generator=torch.Generator().manual_seed(0))
    q, d = queries.clone().requires_grad_(), documents.clone().requires_grad_()
    scores = compat.score_pairs_packed_train(q, qoff, d, doff, q_ids, d_ids)
    (scores * weights).sum().backward()
    expected = reference_grads(
        lambda xs: packed_pairs(xs[0], qoff, xs[1], doff, q_ids, d_ids), [q, d], weights
    )
    check_grads([q.grad, d.grad], expected, dtype)


@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", PADDED_CASES[1:3], ids=padded_id)
def test_padded_train_gradients(case, dtype):
    kind = "integer" if dtype in (torch.float16, torch.bfloat16) else "random"
    queries, documents, qlen, dlen = make_padded(case, dtype, seed=10, kind=kind)
    weights = torch.randint(1, 4, dlen.shape, generator=torch.Generator().manual_seed(0))
    q, d = queries.clone().requires_grad_(), documents.clone().requires_grad_()
    scores = compat.score_candidates_padded_train(q, d, qlen, dlen)
    (scores * weights).sum().backward()
    expected = reference_grads(lambda xs: padded_pairs(xs[0], xs[1], qlen, dlen), [q, d], weights)
    check_grads([q.grad, d.grad], expected, dtype)
    Lq, Ld = case[2], case[3]
    assert bool((q.grad[torch.arange(Lq) >= qlen[:, None]] == 0).all())  # padding gets no gradient
    assert bool((d.grad[torch.arange(Ld) >= dlen[..., None]] == 0).all())


@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CONTRASTIVE_CASES[1:3], ids=contrastive_id)
def test_contrastive_train_gradients(case, dtype):
    kind = "integer" if dtype in (torch.float16, torch.bfloat16) else "random"
    queries, documents, doff = make_contrastive(case, dtype, seed=11, kind=kind)
    weights = torch.randint(1, 4, (case[0], len(case[2])), generator=torch.Generator().manual_seed(0))
    q, d = queries.clone().requires_grad_(), documents.clone().requires_grad_()
    scores = compat.score_contrastive_train(q, d, doff)
    (scores * weights).sum().backward()
    expected = reference_grads(lambda xs: contrastive_pairs(xs[0], xs[1], doff), [q, d], weights)
    check_grads([q.grad, d.grad], expected, dtype)


def test_train_forms_pass_gradcheck():
    g = torch.Generator().manual_seed(12)
    q = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    d = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    qoff, doff = offsets([3, 4], torch.int32), offsets([2, 6, 1], torch.int64)
    ids = (torch.tensor([0, 1, 1, 0]), torch.tensor([2, 0, 1, 1]))
    assert torch.autograd.gradcheck(
        lambda q, d: compat.score_pairs_packed_train(q, qoff, d, doff, *ids), (q, d)
    )
    qp = torch.randn(2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    dp = torch.randn(2, 3, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    qlen, dlen = torch.tensor([4, 2]), torch.tensor([[6, 1, 3], [2, 5, 6]])
    assert torch.autograd.gradcheck(
        lambda q, d: compat.score_candidates_padded_train(q, d, qlen, dlen), (qp, dp)
    )
    qc = torch.randn(3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, d: compat.score_contrastive_train(q, d, doff), (qc, d))


# ---------------------------------------------------------------------------------------------------------
# validate=False skips only the value checks and changes no result
# ---------------------------------------------------------------------------------------------------------


def test_validate_false_gives_the_same_results():
    args = make_packed(PACKED_CASES[1], torch.float32, seed=13)
    for a, b in zip(
        compat.score_pairs_packed_with_argmax(*args, max_q_len=40),
        compat.score_pairs_packed_with_argmax(*args, max_q_len=40, validate=False),
        strict=True,
    ):
        assert torch.equal(a, b)
    args = make_padded(PADDED_CASES[1], torch.float32, seed=13)
    assert torch.equal(
        compat.score_candidates_padded(*args), compat.score_candidates_padded(*args, validate=False)
    )
    args = make_contrastive(CONTRASTIVE_CASES[1], torch.float32, seed=13)
    assert torch.equal(compat.score_contrastive(*args), compat.score_contrastive(*args, validate=False))


# ---------------------------------------------------------------------------------------------------------
# Bad input: our ValueError / TypeError, naming the argument
# ---------------------------------------------------------------------------------------------------------

PACKED_FORMS = [
    compat.score_pairs_packed,
    compat.score_pairs_packed_with_argmax,
    compat.score_pairs_packed_train,
]
PADDED_FORMS = [
    compat.score_candidates_padded,
    compat.score_candidates_padded_with_argmax,
    compat.score_candidates_padded_train,
]
CONTRASTIVE_FORMS = [
    compat.score_contrastive,
    compat.score_contrastive_with_argmax,
    compat.score_contrastive_train,
]


def form_id(fn) -> str:
    return fn.__name__


def good_packed():
    # queries 5 + 8 tokens, documents 20 + 4 tokens, D = 16
    return dict(
        queries=torch.randn(13, 16),
        query_offsets=torch.tensor([0, 5, 13], dtype=torch.int32),
        documents=torch.randn(24, 16),
        document_offsets=torch.tensor([0, 20, 24], dtype=torch.int64),
        pair_query_ids=torch.tensor([0, 1, 1], dtype=torch.int32),
        pair_document_ids=torch.tensor([1, 0, 1], dtype=torch.int32),
    )


PACKED_BAD = [
    ("queries-3d", dict(queries=torch.randn(13, 16, 1)), ValueError, "queries"),
    ("queries-int", dict(queries=torch.ones(13, 16, dtype=torch.int32)), TypeError, "queries"),
    ("documents-float16", dict(documents=torch.randn(24, 16).half()), TypeError, "documents"),
    ("documents-D8", dict(documents=torch.randn(24, 8)), ValueError, "documents"),
    ("documents-D0", dict(queries=torch.randn(13, 0), documents=torch.randn(24, 0)), ValueError, "queries"),
    ("query_offsets-float", dict(query_offsets=torch.tensor([0.0, 5.0, 13.0])), TypeError, "query_offsets"),
    (
        "query_offsets-int16",
        dict(query_offsets=torch.tensor([0, 5, 13], dtype=torch.int16)),
        TypeError,
        "query_offsets",
    ),
    ("query_offsets-list", dict(query_offsets=[0, 5, 13]), TypeError, "query_offsets"),
    ("query_offsets-start1", dict(query_offsets=torch.tensor([1, 5, 13])), ValueError, "query_offsets"),
    ("query_offsets-end12", dict(query_offsets=torch.tensor([0, 5, 12])), ValueError, "query_offsets"),
    ("query_offsets-2d", dict(query_offsets=torch.tensor([[0, 5, 13]])), ValueError, "query_offsets"),
    (
        "document_offsets-decreasing",
        dict(document_offsets=torch.tensor([0, 25, 24])),
        ValueError,
        "document_offsets",
    ),
    (
        "document_offsets-empty-seg",
        dict(document_offsets=torch.tensor([0, 0, 24])),
        ValueError,
        "document_offsets",
    ),
    ("document_offsets-one", dict(document_offsets=torch.tensor([0])), ValueError, "document_offsets"),
    ("pair_query_ids-negative", dict(pair_query_ids=torch.tensor([-1, 1, 1])), ValueError, "pair_query_ids"),
    ("pair_query_ids-too-big", dict(pair_query_ids=torch.tensor([0, 2, 1])), ValueError, "pair_query_ids"),
    (
        "pair_document_ids-too-big",
        dict(pair_document_ids=torch.tensor([0, 2, 1])),
        ValueError,
        "pair_document_ids",
    ),
    ("pair_query_ids-float", dict(pair_query_ids=torch.tensor([0.0, 1.0, 1.0])), TypeError, "pair_query_ids"),
    (
        "pair_document_ids-2d",
        dict(pair_document_ids=torch.tensor([[1, 0, 1]])),
        ValueError,
        "pair_document_ids",
    ),
    (
        "pair-ids-lengths-differ",
        dict(pair_document_ids=torch.tensor([1, 0])),
        ValueError,
        "pair_document_ids",
    ),
    ("max_q_len-too-small", dict(max_q_len=5), ValueError, "max_q_len"),
    ("max_q_len-zero", dict(max_q_len=0), ValueError, "max_q_len"),
    ("max_q_len-float", dict(max_q_len=8.0), TypeError, "max_q_len"),
    ("validate-not-bool", dict(validate=1), TypeError, "validate"),
]


@pytest.mark.parametrize("fn", PACKED_FORMS, ids=form_id)
@pytest.mark.parametrize("change, error, name", [c[1:] for c in PACKED_BAD], ids=[c[0] for c in PACKED_BAD])
def test_packed_bad_input(fn, change, error, name):
    kwargs = {**good_packed(), **change}
    with pytest.raises(error, match=name):
        fn(**kwargs)


def test_packed_reference_checks_max_q_len():
    with pytest.raises(ValueError, match="max_q_len"):
        compat.score_pairs_packed_with_argmax_reference(**good_packed(), max_q_len=5)


def good_padded():
    return dict(
        queries=torch.randn(2, 8, 16),
        documents=torch.randn(2, 3, 10, 16),
        query_lengths=torch.tensor([8, 3], dtype=torch.int32),
        doc_lengths=torch.tensor([[10, 1, 4], [2, 10, 7]], dtype=torch.int64),
    )


PADDED_BAD = [
    ("queries-2d", dict(queries=torch.randn(8, 16)), ValueError, "queries"),
    ("queries-Lq0", dict(queries=torch.randn(2, 0, 16)), ValueError, "queries"),
    ("documents-3d", dict(documents=torch.randn(2, 10, 16)), ValueError, "documents"),
    ("documents-B3", dict(documents=torch.randn(3, 3, 10, 16)), ValueError, "documents"),
    ("documents-D8", dict(documents=torch.randn(2, 3, 10, 8)), ValueError, "documents"),
    ("documents-bfloat16", dict(documents=torch.randn(2, 3, 10, 16).bfloat16()), TypeError, "documents"),
    ("query_lengths-zero", dict(query_lengths=torch.tensor([0, 3])), ValueError, "query_lengths"),
    ("query_lengths-too-long", dict(query_lengths=torch.tensor([9, 3])), ValueError, "query_lengths"),
    ("query_lengths-float", dict(query_lengths=torch.tensor([8.0, 3.0])), TypeError, "query_lengths"),
    ("query_lengths-B1", dict(query_lengths=torch.tensor([[8], [3]])), ValueError, "query_lengths"),
    ("doc_lengths-zero", dict(doc_lengths=torch.tensor([[10, 0, 4], [2, 10, 7]])), ValueError, "doc_lengths"),
    (
        "doc_lengths-too-long",
        dict(doc_lengths=torch.tensor([[10, 1, 4], [2, 11, 7]])),
        ValueError,
        "doc_lengths",
    ),
    ("doc_lengths-C2", dict(doc_lengths=torch.tensor([[10, 1], [2, 10]])), ValueError, "doc_lengths"),
    ("doc_lengths-bool", dict(doc_lengths=torch.ones(2, 3, dtype=torch.bool)), TypeError, "doc_lengths"),
]


@pytest.mark.parametrize("fn", PADDED_FORMS, ids=form_id)
@pytest.mark.parametrize("change, error, name", [c[1:] for c in PADDED_BAD], ids=[c[0] for c in PADDED_BAD])
def test_padded_bad_input(fn, change, error, name):
    kwargs = {**good_padded(), **change}
    with pytest.raises(error, match=name):
        fn(**kwargs)


def good_contrastive():
    return dict(
        queries=torch.randn(2, 8, 16),
        documents=torch.randn(24, 16),
        document_offsets=torch.tensor([0, 5, 20, 24], dtype=torch.int32),
    )


CONTRASTIVE_BAD = [
    ("queries-4d", dict(queries=torch.randn(2, 8, 16, 1)), ValueError, "queries"),
    ("queries-Lq0", dict(queries=torch.randn(2, 0, 16)), ValueError, "queries"),
    ("queries-Nq0", dict(queries=torch.randn(0, 8, 16)), ValueError, "queries"),
    ("queries-D0", dict(queries=torch.randn(2, 8, 0), documents=torch.randn(24, 0)), ValueError, "queries"),
    ("queries-float64-vs-float32", dict(queries=torch.randn(2, 8, 16).double()), TypeError, "documents"),
    ("documents-3d", dict(documents=torch.randn(24, 16, 1)), ValueError, "documents"),
    ("documents-D8", dict(documents=torch.randn(24, 8)), ValueError, "documents"),
    (
        "document_offsets-start1",
        dict(document_offsets=torch.tensor([1, 5, 20, 24])),
        ValueError,
        "document_offsets",
    ),
    (
        "document_offsets-decreasing",
        dict(document_offsets=torch.tensor([0, 20, 5, 24])),
        ValueError,
        "document_offsets",
    ),
    (
        "document_offsets-empty-seg",
        dict(document_offsets=torch.tensor([0, 5, 5, 24])),
        ValueError,
        "document_offsets",
    ),
    (
        "document_offsets-total",
        dict(document_offsets=torch.tensor([0, 5, 20, 23])),
        ValueError,
        "document_offsets",
    ),
    (
        "document_offsets-float",
        dict(document_offsets=torch.tensor([0.0, 24.0])),
        TypeError,
        "document_offsets",
    ),
]


@pytest.mark.parametrize("fn", CONTRASTIVE_FORMS, ids=form_id)
@pytest.mark.parametrize(
    "change, error, name", [c[1:] for c in CONTRASTIVE_BAD], ids=[c[0] for c in CONTRASTIVE_BAD]
)
def test_contrastive_bad_input(fn, change, error, name):
    kwargs = {**good_contrastive(), **change}
    with pytest.raises(error, match=name):
        fn(**kwargs)


@pytest.mark.skipif(
    not torch.backends.mps.is_available() and not torch.cuda.is_available(), reason="needs 2 devices"
)
def test_tensors_on_two_devices():
    device = "cuda" if torch.cuda.is_available() else "mps"
    kwargs = {**good_contrastive(), "document_offsets": good_contrastive()["document_offsets"].to(device)}
    with pytest.raises(ValueError, match="document_offsets"):
        compat.score_contrastive(**kwargs)
