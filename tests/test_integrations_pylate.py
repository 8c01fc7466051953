"""maxsim.integrations.pylate against the real ``pylate.scores`` functions: scores, dtypes and gradients.

The reference is PyLate's own function, run on float64 copies of the (already rounded) inputs; the
low-precision bound uses PyLate run in the input dtype as the naive error (tests/helpers.py).

The PyLate that installs beside torch 2.13 is 1.0 (later releases need fast-plaid, whose wheels pin older
torch): its ``colbert_scores`` / ``colbert_kd_scores`` take ``mask`` (the documents mask) where 1.3 and
later take ``queries_mask`` and ``documents_mask``. With a PyLate < 1.3 the queries-mask reference is
PyLate's function on query tokens multiplied by the mask, which is what 1.3+ computes (it multiplies the
mask into the similarities, and ``<q * m, d> = <q, d> * m``).
"""

from __future__ import annotations

import inspect
import sys
import types

import numpy as np
import pytest
import torch
from helpers import DTYPES, assert_grads_close, assert_scores_close, dtype_id, integer_tokens, random_tokens

import maxsim
from maxsim.integrations import pylate as mp

pylate_scores = pytest.importorskip("pylate.scores", reason="PyLate is not installed (the test extra has it)")
WITH_QUERIES_MASK = "queries_mask" in inspect.signature(pylate_scores.colbert_scores).parameters
NAMES = ("colbert_scores", "colbert_scores_pairwise", "colbert_kd_scores")


def pylate(name, q, d, queries_mask=None, documents_mask=None):
    """The installed PyLate's function, called with the masks as its version takes them."""
    fn = getattr(pylate_scores, name)
    if name == "colbert_scores_pairwise":
        return fn(q, d)
    if WITH_QUERIES_MASK:
        return fn(q, d, queries_mask=queries_mask, documents_mask=documents_mask)
    if queries_mask is not None:
        q = q * queries_mask.to(q.dtype)[..., None]
    return fn(q, d, mask=documents_mask)


def ours(name, q, d, queries_mask=None, documents_mask=None):
    if name == "colbert_scores_pairwise":
        return mp.colbert_scores_pairwise(q, d)
    return getattr(mp, name)(q, d, queries_mask=queries_mask, documents_mask=documents_mask)


def grads(fn, q, d, *, exact=False):
    """Gradients of ``(scores * w).sum()`` for fixed integer weights ``w`` (exact in every dtype)."""
    q = (q.double() if exact else q).detach().requires_grad_()
    d = (d.double() if exact else d).detach().requires_grad_()
    scores = fn(q, d)
    weights = torch.randint(-3, 4, scores.shape, generator=torch.Generator().manual_seed(7))
    (scores.double() * weights).sum().backward()
    return q.grad, d.grad


def make_masks(g, form, q_shape, d_shape):
    """(queries_mask bool, documents_mask float32 0/1, as PyLate's padding masks), some all-zero rows."""
    queries_mask = documents_mask = None
    if form in ("queries", "both"):
        queries_mask = torch.rand(q_shape, generator=g) < 0.7
        queries_mask.view(-1, q_shape[-1])[0] = False  # a query with no real token scores 0
    if form in ("documents", "both"):
        documents_mask = (torch.rand(d_shape, generator=g) < 0.6).float()
        documents_mask.view(-1, d_shape[-1])[-1] = 0  # a document with no real token scores 0
    return queries_mask, documents_mask


def check_against_pylate(name, q, d, queries_mask, documents_mask, dtype):
    out = ours(name, q, d, queries_mask, documents_mask)
    naive = pylate(name, q, d, queries_mask, documents_mask)
    assert out.dtype == naive.dtype, f"dtype {out.dtype}, PyLate gives {naive.dtype}"
    ref = pylate(name, q.double(), d.double(), queries_mask, documents_mask)
    assert_scores_close(out, ref, dtype=dtype, naive=naive)
    dq, dd = grads(lambda a, b: ours(name, a, b, queries_mask, documents_mask), q, d)
    rq, rd = grads(lambda a, b: pylate(name, a, b, queries_mask, documents_mask), q, d, exact=True)
    assert_grads_close(dq, rq, dtype=dtype)
    assert_grads_close(dd, rd, dtype=dtype)


MASK_FORMS = ["none", "documents", "queries", "both"]
# (Nq, Nd, Lq, Ld, D): unit sizes, odd sizes, sizes that are not multiples of 16
ALL_PAIRS_CASES = [
    (1, 1, 1, 1, 1),
    (2, 3, 1, 97, 16),
    (3, 2, 31, 1, 8),
    (2, 4, 33, 17, 130),
    (3, 3, 32, 48, 96),
]


def shape_id(case) -> str:
    return "-".join(f"{k}{v}" for k, v in zip(("Nq", "Nd", "Lq", "Ld", "D"), case, strict=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("form", MASK_FORMS)
@pytest.mark.parametrize("case", ALL_PAIRS_CASES, ids=shape_id)
def test_colbert_scores_match_pylate(case, form, dtype):
    nq, nd, lq, ld, dim = case
    g = torch.Generator().manual_seed(0)
    q = random_tokens((nq, lq, dim), dtype, generator=g)
    d = random_tokens((nd, ld, dim), dtype, generator=g)
    check_against_pylate("colbert_scores", q, d, *make_masks(g, form, (nq, lq), (nd, ld)), dtype)


# (Nq, C, Lq, Ld, D)
KD_CASES = [(1, 1, 1, 1, 1), (2, 3, 31, 97, 16), (3, 2, 1, 33, 130), (2, 4, 32, 17, 96)]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("form", MASK_FORMS)
@pytest.mark.parametrize("case", KD_CASES, ids=shape_id)
def test_colbert_kd_scores_match_pylate(case, form, dtype):
    nq, c, lq, ld, dim = case
    g = torch.Generator().manual_seed(1)
    q = random_tokens((nq, lq, dim), dtype, generator=g)
    d = random_tokens((nq, c, ld, dim), dtype, generator=g)
    check_against_pylate("colbert_kd_scores", q, d, *make_masks(g, form, (nq, lq), (nq, c, ld)), dtype)


# (per-pair query lengths, per-pair document lengths, D)
PAIRWISE_CASES = [([1], [1], 1), ([31, 1, 33], [97, 5, 1], 16), ([16, 7], [48, 130], 130)]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("form", ["padded", "lists"])
@pytest.mark.parametrize(
    "case", PAIRWISE_CASES, ids=lambda c: f"B{len(c[0])}-Lq{max(c[0])}-Ld{max(c[1])}-D{c[2]}"
)
def test_colbert_scores_pairwise_match_pylate(case, form, dtype):
    q_lens, d_lens, dim = case
    g = torch.Generator().manual_seed(2)
    if form == "padded":
        q = random_tokens((len(q_lens), max(q_lens), dim), dtype, generator=g)
        d = random_tokens((len(d_lens), max(d_lens), dim), dtype, generator=g)
        check_against_pylate("colbert_scores_pairwise", q, d, None, None, dtype)
        return
    qs = [random_tokens((n, dim), dtype, generator=g) for n in q_lens]
    ds = [random_tokens((n, dim), dtype, generator=g) for n in d_lens]
    out = mp.colbert_scores_pairwise(qs, ds)
    naive = pylate_scores.colbert_scores_pairwise(qs, ds)
    assert out.dtype == naive.dtype
    ref = pylate_scores.colbert_scores_pairwise([x.double() for x in qs], [x.double() for x in ds])
    assert_scores_close(out, ref, dtype=dtype, naive=naive)
    qs = [x.requires_grad_() for x in qs]
    ds = [x.requires_grad_() for x in ds]
    refs_q = [x.detach().double().requires_grad_() for x in qs]
    refs_d = [x.detach().double().requires_grad_() for x in ds]
    weights = torch.randint(-3, 4, (len(qs),), generator=g).double()
    (mp.colbert_scores_pairwise(qs, ds).double() * weights).sum().backward()
    (pylate_scores.colbert_scores_pairwise(refs_q, refs_d) * weights).sum().backward()
    for mine, theirs in zip(qs + ds, refs_q + refs_d, strict=True):
        assert_grads_close(mine.grad, theirs.grad, dtype=dtype)


@pytest.mark.parametrize("name", ["colbert_scores", "colbert_kd_scores"])
def test_ties_and_masked_zeros_exactly(name):
    """Small integer tokens: many exact ties between real tokens and masked tokens' 0; scores and gradients
    equal PyLate's exactly (the first winner takes the gradient, a masked winner passes none)."""
    g = torch.Generator().manual_seed(3)
    q = integer_tokens((4, 9, 3), torch.float32, generator=g)
    d_shape = (5, 11) if name == "colbert_scores" else (4, 5, 11)
    d = integer_tokens((*d_shape, 3), torch.float32, generator=g)
    queries_mask, documents_mask = make_masks(g, "both", (4, 9), d_shape)
    assert torch.equal(
        ours(name, q, d, queries_mask, documents_mask), pylate(name, q, d, queries_mask, documents_mask)
    )
    for mine, theirs in zip(
        grads(lambda a, b: ours(name, a, b, queries_mask, documents_mask), q, d),
        grads(lambda a, b: pylate(name, a, b, queries_mask, documents_mask), q, d),
        strict=True,
    ):
        assert torch.equal(mine, theirs)


def test_a_masked_document_token_scores_zero():
    """PyLate multiplies the mask in (a masked token scores 0); maxsim.maxsim's masks exclude."""
    q = torch.tensor([[[1.0, 0.0]]])  # [1, 1, 2]
    d = torch.tensor([[[-1.0, 0.0], [5.0, 0.0]], [[7.0, 0.0], [9.0, 0.0]]])  # [2, 2, 2]
    documents_mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    expected = torch.tensor([[0.0, 0.0]])  # doc 0: max(-1, masked 0) = 0; doc 1 has no real token: 0
    assert torch.equal(mp.colbert_scores(q, d, documents_mask=documents_mask), expected)
    assert torch.equal(pylate("colbert_scores", q, d, documents_mask=documents_mask), expected)
    assert maxsim.maxsim(q[0], d[:1], d_mask=documents_mask[:1].bool()).item() == -1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_result_dtype_follows_pylate_promotion(dtype):
    """The embeddings' dtype promoted with each mask's: a float32 mask lifts half inputs to float32."""
    g = torch.Generator().manual_seed(4)
    q, d = random_tokens((2, 3, 8), dtype, generator=g), random_tokens((3, 4, 8), dtype, generator=g)
    assert mp.colbert_scores(q, d).dtype == dtype
    assert mp.colbert_scores(q, d, documents_mask=torch.ones(3, 4, dtype=torch.bool)).dtype == dtype
    assert mp.colbert_scores(q, d, documents_mask=torch.ones(3, 4, dtype=torch.int64)).dtype == dtype
    assert mp.colbert_scores(q, d, queries_mask=torch.ones(2, 3)).dtype == torch.float32
    assert mp.colbert_scores(q, d, documents_mask=torch.ones(3, 4)).dtype == torch.float32
    assert mp.colbert_scores_pairwise(q, d[:2]).dtype == dtype


def test_input_forms_as_pylate():
    """numpy arrays (kept in their dtype), lists of tensors (stacked), nested lists (float32), list masks."""
    g = torch.Generator().manual_seed(5)
    q, d = torch.randn(2, 3, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    documents_mask = (torch.rand(3, 5, generator=g) < 0.7).float()
    expected = pylate("colbert_scores", q, d, documents_mask=documents_mask)
    forms = [
        (q.numpy(), d.numpy(), documents_mask.numpy()),
        (list(q), list(d), documents_mask.tolist()),
        (q.tolist(), d.tolist(), documents_mask.int()),
        ([x.numpy() for x in q], [x.numpy() for x in d], documents_mask.bool()),
    ]
    for qf, df, mf in forms:
        torch.testing.assert_close(mp.colbert_scores(qf, df, documents_mask=mf), expected)
    double = mp.colbert_scores(q.double().numpy(), d.double().numpy())
    assert double.dtype == torch.float64
    torch.testing.assert_close(double, pylate("colbert_scores", q.double().numpy(), d.double().numpy()))
    lists = mp.colbert_scores_pairwise([x.tolist() for x in q], [x[:2].numpy() for x in d[:2]])
    torch.testing.assert_close(lists, pylate_scores.colbert_scores_pairwise(q, d[:2, :2]))


def test_empty_batch_gives_empty_scores():
    q, d = torch.randn(0, 3, 4), torch.randn(2, 5, 4)
    assert mp.colbert_scores(q, d).shape == pylate("colbert_scores", q, d).shape == (0, 2)


@pytest.mark.parametrize("backend", [None, "auto", "torch", "flash", "lik", "TORCH"])
def test_backend_is_accepted_and_ignored(backend):
    q, d = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    expected = mp.colbert_scores(q, d)
    torch.testing.assert_close(mp.colbert_scores(q, d, backend=backend), expected)
    torch.testing.assert_close(
        mp.colbert_kd_scores(q, d[:, None], backend=backend), expected.diagonal()[:, None]
    )
    torch.testing.assert_close(mp.colbert_scores_pairwise(q, d, backend=backend), expected.diagonal())


Q, D3, D4 = torch.randn(2, 3, 4), torch.randn(3, 5, 4), torch.randn(2, 3, 5, 4)
BAD_INPUT = [
    (lambda: mp.colbert_scores(Q, D3, backend="cuda"), ValueError, "backend"),
    (lambda: mp.colbert_scores("q", D3), TypeError, "queries_embeddings"),
    (lambda: mp.colbert_scores(Q[0], D3), ValueError, "queries_embeddings must have 3 dims"),
    (lambda: mp.colbert_scores(Q, D4), ValueError, "documents_embeddings must have 3 dims"),
    (lambda: mp.colbert_scores(Q, D3[..., :3]), ValueError, "embedding dim"),
    (lambda: mp.colbert_scores(Q, D3.half()), TypeError, "one dtype"),
    (lambda: mp.colbert_scores(Q.int(), D3.int()), TypeError, "queries_embeddings must have dtype"),
    (lambda: mp.colbert_scores(Q, D3[:, :0]), ValueError, "documents_embeddings has an empty token axis"),
    (lambda: mp.colbert_scores([], D3), ValueError, "queries_embeddings is empty"),
    (
        lambda: mp.colbert_scores([Q[0], Q[1, :2]], D3),
        ValueError,
        "queries_embeddings must hold items of one shape",
    ),
    (
        lambda: mp.colbert_scores(Q, D3, queries_mask=torch.ones(2, 4)),
        ValueError,
        r"queries_mask must have shape \[2, 3\]",
    ),
    (
        lambda: mp.colbert_scores(Q, D3, documents_mask=torch.ones(5)),
        ValueError,
        "documents_mask must have shape",
    ),
    (
        lambda: mp.colbert_scores(Q, D3, documents_mask=torch.ones(3, 5, dtype=torch.cfloat)),
        TypeError,
        "documents_mask",
    ),
    (lambda: mp.colbert_scores(Q, D3, documents_mask="mask"), TypeError, "documents_mask"),
    (lambda: mp.colbert_kd_scores(Q, D3), ValueError, "documents_embeddings must have 4 dims"),
    (lambda: mp.colbert_kd_scores(Q, D4[:1]), ValueError, "one candidate list per query"),
    (lambda: mp.colbert_kd_scores(Q, D4, documents_mask=torch.ones(2, 5)), ValueError, "documents_mask"),
    (lambda: mp.colbert_scores_pairwise(Q, D3), ValueError, "as many items, got 2 and 3"),
    (lambda: mp.colbert_scores_pairwise(list(Q), list(D3)), ValueError, "as many items, got 2 and 3"),
    (lambda: mp.colbert_scores_pairwise([], []), ValueError, "queries_embeddings is empty"),
    (
        lambda: mp.colbert_scores_pairwise([Q[0], Q[1].half()], list(D3[:2])),
        TypeError,
        r"queries_embeddings\[1\]",
    ),
    (
        lambda: mp.colbert_scores_pairwise(list(Q), [D3[0], D3[1, :0]]),
        ValueError,
        r"documents_embeddings\[1\]",
    ),
    (lambda: mp.colbert_scores_pairwise(Q, 3), TypeError, "documents_embeddings"),
]


@pytest.mark.parametrize("call, error, match", BAD_INPUT, ids=[m for _, _, m in BAD_INPUT])
def test_bad_input_names_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ---------------------------------------------------------------------------------------------------------
# patch() / unpatch()
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def originals():
    """PyLate's own functions; whatever a test does, PyLate is unpatched after it."""
    import pylate.rank.rank  # noqa: F401 - a module that did `from ..scores import colbert_scores`

    saved = {name: getattr(pylate_scores, name) for name in NAMES}
    yield saved
    mp.unpatch()
    assert all(getattr(pylate_scores, name) is saved[name] for name in NAMES)


def holders():
    """Every pylate module attribute that holds one of the scoring functions, as (module, name, value)."""
    return [
        (module_name, attr, value)
        for module_name, module in list(sys.modules.items())
        if module_name.startswith("pylate")
        for attr, value in list(vars(module).items())
        if attr in NAMES
    ]


def test_patch_swaps_pylate_functions_everywhere_and_unpatch_restores(originals):
    before = holders()
    assert {module for module, _, _ in before} >= {"pylate.scores", "pylate.rank.rank"}
    mp.patch()
    mp.patch()  # a second call does nothing
    after = holders()
    assert [(m, a) for m, a, _ in after] == [(m, a) for m, a, _ in before]
    for (_, _, old), (_, _, new) in zip(before, after, strict=True):
        assert new is not old and new.__module__ == "maxsim.integrations.pylate"
    import pylate.rank.rank

    assert pylate.rank.rank.colbert_scores is pylate_scores.colbert_scores
    mp.unpatch()
    mp.unpatch()  # a second call does nothing
    assert [value for _, _, value in holders()] == [value for _, _, value in before]


def test_patched_pylate_takes_its_own_signature(originals):
    """PyLate's callers pass masks positionally as their version defines them; the replacement agrees."""
    g = torch.Generator().manual_seed(6)
    q, d, dk = (
        torch.randn(2, 3, 4, generator=g),
        torch.randn(3, 5, 4, generator=g),
        torch.randn(2, 3, 5, 4, generator=g),
    )
    qm = torch.rand(2, 3, generator=g) < 0.7
    dm, dkm = (torch.rand(3, 5, generator=g) < 0.6).float(), (torch.rand(2, 3, 5, generator=g) < 0.6).float()
    masks, kd_masks = ((qm, dm), (qm, dkm)) if WITH_QUERIES_MASK else ((dm,), (dkm,))
    expected = [
        pylate_scores.colbert_scores(q, d, *masks),
        pylate_scores.colbert_kd_scores(q, dk, *kd_masks),
        pylate_scores.colbert_scores_pairwise(q, d[:2]),
    ]
    mp.patch()
    patched = [
        pylate_scores.colbert_scores(q, d, *masks),
        pylate_scores.colbert_kd_scores(q, dk, *kd_masks),
        pylate_scores.colbert_scores_pairwise(q, d[:2]),
    ]
    for mine, theirs in zip(patched, expected, strict=True):
        torch.testing.assert_close(mine, theirs)


def test_patched_pylate_reranks_with_maxsim(originals, monkeypatch):
    """pylate.rank.rerank (the reranking step of PyLate's retriever) scores through the replacement."""
    import pylate.rank

    g = torch.Generator().manual_seed(8)
    queries = [torch.randn(4, 8, generator=g) for _ in range(2)]
    documents = [[torch.randn(n, 8, generator=g) for n in lens] for lens in ([3, 9], [1, 5, 7])]
    ids = [["a", "b"], ["c", "d", "e"]]
    expected = pylate.rank.rerank(
        documents_ids=ids, queries_embeddings=queries, documents_embeddings=documents
    )
    calls = []
    mp.patch()
    patched = pylate_scores.colbert_scores
    monkeypatch.setattr(
        pylate.rank.rank, "colbert_scores", lambda *a, **k: calls.append(1) or patched(*a, **k)
    )
    reranked = pylate.rank.rerank(
        documents_ids=ids, queries_embeddings=queries, documents_embeddings=documents
    )
    assert len(calls) == 2
    for mine, theirs in zip(reranked, expected, strict=True):
        assert [r["id"] for r in mine] == [r["id"] for r in theirs]
        np.testing.assert_allclose([r["score"] for r in mine], [r["score"] for r in theirs], rtol=1e-5)


def test_patch_swaps_default_arguments_and_later_imports(originals, monkeypatch):
    """A PyLate loss taking ``score_metric=colbert_kd_scores`` as a default gets the replacement; a module
    imported while patched gets it too, and unpatch() restores both."""
    module = types.ModuleType("pylate._maxsim_test_losses")

    class Distillation:
        def __init__(
            self,
            score_metric=originals["colbert_kd_scores"],
            *,
            pairwise=originals["colbert_scores_pairwise"],
        ):
            self.score_metric, self.pairwise = score_metric, pairwise

    Distillation.__module__ = module.__name__
    module.Distillation = Distillation
    monkeypatch.setitem(sys.modules, module.__name__, module)
    mp.patch()
    loss = Distillation()
    assert loss.score_metric is pylate_scores.colbert_kd_scores is not originals["colbert_kd_scores"]
    assert loss.pairwise is mp.colbert_scores_pairwise
    late = types.ModuleType("pylate._maxsim_test_late")
    exec("from pylate.scores import colbert_scores", vars(late))  # noqa: S102 - a module imported while patched
    monkeypatch.setitem(sys.modules, late.__name__, late)
    assert late.colbert_scores is not originals["colbert_scores"]
    mp.unpatch()
    assert Distillation().score_metric is originals["colbert_kd_scores"]
    assert Distillation().pairwise is originals["colbert_scores_pairwise"]
    assert late.colbert_scores is originals["colbert_scores"]


def test_patch_reaches_pylate_losses(originals):
    """Where PyLate's losses import (they need a sentence-transformers that fits the PyLate installed), the
    distillation loss's default ``score_metric`` is the replacement."""
    losses = pytest.importorskip(
        "pylate.losses",
        reason="pylate.losses does not import (PyLate 1.0 imports names this sentence-transformers moved)",
        exc_type=ImportError,
    )
    mp.patch()
    default = inspect.signature(losses.Distillation).parameters["score_metric"].default
    assert default is pylate_scores.colbert_kd_scores is not originals["colbert_kd_scores"]
