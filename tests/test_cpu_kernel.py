"""The AVX2 CPU kernel (``maxsim/backends/cpu_kernel.c``) against the reference, and against the torch
backend's matrix-product path (``MAXSIM_CPU_KERNEL=0``): layouts, odd sizes, masks, NaN/inf, ties, threads."""

from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path

import pytest
import torch
from helpers import (
    DTYPES,
    assert_grads_close,
    assert_scores_close,
    dtype_id,
    naive_scores,
    random_tokens,
    weighted_grads,
)

import maxsim
from maxsim.backends import cpu_kernel, torch_backend
from maxsim.reference import maxsim_reference, maxsim_varlen_reference


def _cpu_has_avx2_fma() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return False
    flags = set(cpuinfo.read_text().split())
    return {"avx2", "fma"} <= flags


def test_kernel_is_built_where_it_can_run():
    """On x86-64 Linux with AVX2 (CI) the install must have built the kernel: a silent build failure would
    leave every float32 CPU call on the slower path and every test below skipped."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not _cpu_has_avx2_fma():
        pytest.skip("the kernel needs x86-64 with AVX2 and FMA")
    try:
        importlib.metadata.distribution("maxsim")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("maxsim runs from the source tree (PYTHONPATH), not installed: no install built the kernel")
    assert cpu_kernel._cpu_kernel is not None, "maxsim.backends._cpu_kernel was not built (pip install -e .)"
    assert cpu_kernel.available()


needs_kernel = pytest.mark.skipif(not cpu_kernel.available(), reason="the AVX2 CPU kernel is not available here")


@pytest.fixture(params=["kernel", "matmul"])
def cpu_path(request, monkeypatch):
    """Every test below runs on the kernel and on the torch backend's matrix products."""
    if request.param == "kernel" and not cpu_kernel.available():
        pytest.skip("the AVX2 CPU kernel is not available here")
    monkeypatch.setenv("MAXSIM_CPU_KERNEL", "1" if request.param == "kernel" else "0")
    monkeypatch.setenv("MAXSIM_BACKEND", "torch")
    return request.param


SHAPES = [  # q batch, d batch, Lq, Ld, D
    ((), (5,), 1, 1, 1),
    ((), (7,), 17, 13, 3),
    ((), (3,), 33, 97, 130),
    ((4,), (4,), 16, 6, 128),
    ((2, 1), (2, 5), 7, 7, 64),
    ((3, 1), (1, 4), 40, 25, 96),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalize"])
@pytest.mark.parametrize("masks", ["none", "d_mask", "both"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"q{list(s[0])}-d{list(s[1])}-Lq{s[2]}-Ld{s[3]}-D{s[4]}")
def test_matches_reference(cpu_path, shape, masks, normalize, dtype):
    qb, db, lq, ld, dim = shape
    g = torch.Generator().manual_seed(lq * 1000 + ld)
    q = random_tokens((*qb, lq, dim), dtype, generator=g)
    d = random_tokens((*db, ld, dim), dtype, generator=g)
    kwargs = {}
    if masks != "none":
        kwargs["d_mask"] = torch.rand((*db, ld), generator=g) < 0.7
        kwargs["d_mask"][..., ld // 2] = True
    if masks == "both":
        kwargs["q_mask"] = torch.rand((*qb, lq), generator=g) < 0.7
        kwargs["q_mask"][..., 0] = True
    scores, argmax = maxsim.maxsim(q, d, normalize=normalize, return_argmax=True, **kwargs)
    ref, ref_argmax = maxsim_reference(q, d, normalize=normalize, **kwargs)
    naive = naive_scores(q, d, normalize=normalize, **kwargs)
    assert_scores_close(scores, ref, dtype=dtype, naive=naive)
    if dtype == torch.float32 or not normalize:  # widened exactly: only normalizing rounds differently
        assert torch.equal(argmax, ref_argmax)
    assert torch.equal(maxsim.maxsim(q, d, normalize=normalize, **kwargs), scores)


def test_broadcast_corpus_is_read_in_place(cpu_path):
    """A query against an expanded corpus view (zero batch stride) and a strided token axis."""
    g = torch.Generator().manual_seed(1)
    q = random_tokens((3, 1, 20, 64), torch.float32, generator=g)
    base = random_tokens((1, 6, 40, 64), torch.float32, generator=g)
    d = base[:, :, ::2].expand(3, 6, 20, 64)  # token stride 128, batch stride 0
    before = base.clone()
    scores, argmax = maxsim.maxsim(q, d, return_argmax=True)
    ref, ref_argmax = maxsim_reference(q, d)
    assert_scores_close(scores, ref, dtype=torch.float32)
    assert torch.equal(argmax, ref_argmax)
    assert torch.equal(base, before)


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalize"])
def test_strided_queries_and_broadcast_masks(cpu_path, normalize):
    """Queries whose embedding axis is strided, and masks expanded over a batch dim (zero strides)."""
    g = torch.Generator().manual_seed(8)
    q = random_tokens((2, 40, 19), torch.float32, generator=g).transpose(-1, -2)  # [2, 19, 40], D stride 19
    d = random_tokens((2, 5, 23, 40), torch.float32, generator=g)
    q_mask = torch.rand(19, generator=g) < 0.6
    q_mask[3] = True
    d_mask = torch.rand(23, generator=g) < 0.6
    d_mask[0] = True
    q_mask, d_mask = q_mask.expand(2, 1, 19), d_mask.expand(2, 5, 23)
    kwargs = dict(q_mask=q_mask, d_mask=d_mask, normalize=normalize)
    scores, argmax = maxsim.maxsim(q[:, None], d, return_argmax=True, **kwargs)
    ref, ref_argmax = maxsim_reference(q[:, None], d, **kwargs)
    assert_scores_close(scores, ref, dtype=torch.float32)
    assert torch.equal(argmax, ref_argmax)


def test_non_contiguous_embedding_axis_falls_back(cpu_path):
    g = torch.Generator().manual_seed(2)
    q = random_tokens((9, 32), torch.float32, generator=g)
    d = random_tokens((4, 32, 11), torch.float32, generator=g).transpose(-1, -2)  # D stride 11
    assert not cpu_kernel.applies(q, d)
    assert_scores_close(maxsim.maxsim(q, d), maxsim_reference(q, d)[0], dtype=torch.float32)


def test_nan_and_inf(cpu_path):
    g = torch.Generator().manual_seed(3)
    q = random_tokens((5, 8), torch.float32, generator=g)
    d = random_tokens((4, 9, 8), torch.float32, generator=g)
    d_mask = torch.ones(4, 9, dtype=torch.bool)
    d[0, 3, 2] = float("nan")  # a real NaN token: NaN score, the first NaN is the argmax
    d[0, 7, 1] = float("nan")
    d[1, 4] = float("nan")  # masked out: takes no part
    d_mask[1, 4] = False
    d[2, 5, 0] = float("inf")  # +-inf similarities, no NaN
    q[1, 0] = 0.0
    scores, argmax = maxsim.maxsim(q, d, d_mask=d_mask, return_argmax=True)
    ref, ref_argmax = maxsim_reference(q, d, d_mask=d_mask)
    assert_scores_close(scores, ref, dtype=torch.float32)
    assert torch.equal(argmax, ref_argmax)
    assert scores[0].isnan() and not scores[1].isnan()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_ties_take_the_first_token(cpu_path, dtype):
    """Small integers are exact in every dtype and tie often."""
    g = torch.Generator().manual_seed(4)
    q = torch.randint(-2, 3, (3, 19, 10), generator=g).to(dtype)
    d = torch.randint(-2, 3, (3, 23, 10), generator=g).to(dtype)
    scores, argmax = maxsim.maxsim(q, d, return_argmax=True)
    ref, ref_argmax = maxsim_reference(q, d)
    assert torch.equal(scores, ref.float())
    assert torch.equal(argmax, ref_argmax)


def test_document_without_real_token(cpu_path):
    """validate=False: a document with no real token scores -inf, its argmax is -1 (the reference's rule)."""
    g = torch.Generator().manual_seed(5)
    q = random_tokens((2, 4, 16), torch.float32, generator=g)
    d = random_tokens((2, 7, 16), torch.float32, generator=g)
    d_mask = torch.ones(2, 7, dtype=torch.bool)
    d_mask[1] = False
    q_mask = torch.tensor([[True, False, True, True], [True, True, False, False]])
    scores, argmax = maxsim.maxsim(q, d, q_mask=q_mask, d_mask=d_mask, return_argmax=True, validate=False)
    ref, ref_argmax = maxsim_reference(q, d, q_mask=q_mask, d_mask=d_mask)
    assert scores[1] == float("-inf") and torch.equal(argmax[1], ref_argmax[1])
    assert torch.equal(argmax, ref_argmax)


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalize"])
def test_varlen_all_pairs(cpu_path, normalize):
    g = torch.Generator().manual_seed(6)
    q_len = torch.tensor([1, 17, 40])
    d_len = torch.tensor([5, 1, 64, 13, 7])
    cu_q = torch.cat([torch.zeros(1), q_len.cumsum(0)]).int()
    cu_d = torch.cat([torch.zeros(1), d_len.cumsum(0)]).int()
    q = random_tokens((int(q_len.sum()), 33), torch.float32, generator=g)
    d = random_tokens((int(d_len.sum()), 33), torch.float32, generator=g)
    scores, argmax = maxsim.maxsim_varlen(q, cu_q, d, cu_d, normalize=normalize, return_argmax=True)
    ref, ref_argmax = maxsim_varlen_reference(q, cu_q, d, cu_d, normalize=normalize)
    assert_scores_close(scores, ref, dtype=torch.float32)
    assert torch.equal(argmax, ref_argmax)


@pytest.mark.parametrize("chunked", [False, True], ids=["one-call", "chunked"])
def test_varlen_listed_pairs(cpu_path, chunked, monkeypatch):
    """Listed pairs of packed sequences (a group per pair), and every layout with the queries packed a few
    at a time (``QUERY_BYTES`` forced down: the groups, or one group's queries, split over calls)."""
    if chunked:
        monkeypatch.setattr(cpu_kernel, "QUERY_BYTES", 1)
    g = torch.Generator().manual_seed(9)
    q_len, d_len = torch.tensor([3, 17, 1, 40]), torch.tensor([5, 1, 64, 13, 7])
    cu_q = torch.cat([torch.zeros(1), q_len.cumsum(0)]).int()
    cu_d = torch.cat([torch.zeros(1), d_len.cumsum(0)]).int()
    q = random_tokens((int(q_len.sum()), 24), torch.float32, generator=g)
    d = random_tokens((int(d_len.sum()), 24), torch.float32, generator=g)
    pairs = (torch.tensor([0, 3, 3, 1, 2, 0]), torch.tensor([4, 0, 2, 2, 1, 4]))
    for kwargs in ({"pairs": pairs}, {}):
        scores, argmax = maxsim.maxsim_varlen(q, cu_q, d, cu_d, return_argmax=True, **kwargs)
        ref, ref_argmax = maxsim_varlen_reference(q, cu_q, d, cu_d, **kwargs)
        assert_scores_close(scores, ref, dtype=torch.float32)
        assert torch.equal(argmax, ref_argmax)
    qp, dp = random_tokens((3, 2, 20, 24), torch.float32, generator=g), random_tokens((3, 4, 9, 24), torch.float32, generator=g)
    for qq, dd in ((qp[:, :, None], dp[:, None]), (qp[0][:, None], dp[0][None])):
        scores, argmax = maxsim.maxsim(qq, dd, return_argmax=True)
        ref, ref_argmax = maxsim_reference(qq, dd)
        assert_scores_close(scores, ref, dtype=torch.float32)
        assert torch.equal(argmax, ref_argmax)


@needs_kernel
def test_malformed_offsets_read_nothing_outside(monkeypatch):
    """validate=False with offsets that point outside the tokens, decrease, or exceed max_seqlen: the result
    is undefined (DESIGN.md), but the kernel reads (and its backward writes) no memory outside q and d (a
    torch index error may come first); an AddressSanitizer build of the extension checks the "no read" part.
    (The matrix-product path is not run here: its torch ops are not bounded against such offsets.)"""
    monkeypatch.setenv("MAXSIM_BACKEND", "torch")
    monkeypatch.delenv("MAXSIM_CPU_KERNEL", raising=False)
    g = torch.Generator().manual_seed(10)
    q, d = random_tokens((9, 16), torch.float32, generator=g), random_tokens((30, 16), torch.float32, generator=g)
    good_q, good_d = torch.tensor([0, 4, 9]), torch.tensor([0, 10, 25, 30])
    cases = [
        (torch.tensor([0, 4, 90]), good_d, {}),  # past the last query token
        (good_q, torch.tensor([0, 25, 10, 30]), {}),  # decreasing
        (good_q, torch.tensor([-40, 10, 25, 300]), {}),  # negative start, past the end
        (good_q, good_d, {"max_seqlen_q": 2, "max_seqlen_d": 3}),  # shorter than the sequences
        (good_q, good_d, {"pairs": (torch.tensor([0, -1]), torch.tensor([-1, -3]))}),  # negative ids
    ]
    q.requires_grad_()
    d.requires_grad_()
    for cu_q, cu_d, kwargs in cases:
        try:
            scores = maxsim.maxsim_varlen(q, cu_q.int(), d, cu_d.int(), validate=False, **kwargs)
            scores.sum().backward()
        except (IndexError, RuntimeError):
            continue
        assert scores.dtype == torch.float32


@needs_kernel
def test_threads_give_the_same_bits(monkeypatch):
    """Work is split over documents, each scored whole by one thread, and each gradient row is summed in one
    fixed order by one thread: any thread count, the same bits (scores, argmax, dq, dd; listed pairs with
    repeated queries and documents too)."""
    monkeypatch.setenv("MAXSIM_BACKEND", "torch")
    g = torch.Generator().manual_seed(7)
    q = random_tokens((3, 21, 48), torch.float32, generator=g)
    d = random_tokens((3, 11, 50, 48), torch.float32, generator=g)
    cu_q, cu_d = torch.arange(0, 3 * 21 + 1, 21), torch.arange(0, 11 * 50 + 1, 50)
    pairs = (torch.randint(0, 3, (40,), generator=g), torch.randint(0, 11, (40,), generator=g))  # repeats
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3, 16):
            torch.set_num_threads(n)
            scores, argmax = maxsim.maxsim(q[:, None], d, return_argmax=True)
            grads = weighted_grads(lambda a, b: maxsim.maxsim(a[:, None], b[None]), q, d[0], 3)
            listed = weighted_grads(
                lambda a, b: maxsim.maxsim_varlen(a.view(-1, 48), cu_q, b.view(-1, 48), cu_d, pairs=pairs), q, d[0], 4
            )
            results.append((scores, argmax, *grads, *listed))
    finally:
        torch.set_num_threads(threads)
    for result in results[1:]:
        assert all(torch.equal(ours, first) for ours, first in zip(result, results[0], strict=True))


@needs_kernel
def test_cpu_calls_take_the_kernel(monkeypatch):
    """Forward calls of every dtype, and the backward of padded and all-pairs packed calls."""
    calls = []
    for name in ("_run", "_gradients"):
        original = getattr(cpu_kernel, name)
        monkeypatch.setattr(cpu_kernel, name, lambda *a, o=original, n=name, **k: calls.append(n) or o(*a, **k))
    monkeypatch.delenv("MAXSIM_CPU_KERNEL", raising=False)
    monkeypatch.setenv("MAXSIM_BACKEND", "torch")
    q, d = torch.randn(8, 16), torch.randn(3, 10, 16)
    for dtype in DTYPES:
        maxsim.maxsim(q.to(dtype), d.to(dtype))
    maxsim.maxsim(q.double(), d.double())  # float64 keeps the matrix products
    assert calls == ["_run"] * len(DTYPES)
    calls.clear()
    q4, d5 = torch.randn(4, 8, 16, requires_grad=True), torch.randn(5, 10, 16, requires_grad=True)
    maxsim.maxsim(q4[:, None], d5[None]).sum().backward()
    cu_q, cu_d = torch.arange(0, 33, 8), torch.arange(0, 51, 10)
    maxsim.maxsim_varlen(q4.view(-1, 16), cu_q, d5.view(-1, 16), cu_d).sum().backward()
    pairs = (torch.tensor([3, 0, 3]), torch.tensor([1, 4, 1]))
    maxsim.maxsim_varlen(q4.view(-1, 16), cu_q, d5.view(-1, 16), cu_d, pairs=pairs).sum().backward()
    assert calls == ["_run", "_gradients"] * 3


QUANTIZED = (torch.int8, torch.float8_e4m3fn)


@needs_kernel
def test_every_e4m3_code_reads_as_torch_converts_it():
    """All 256 float8 e4m3fn codes (zeros, subnormals, the largest 448, NaN) against torch's conversion, on
    the vector path (8 columns) and the element path (D = 1); a scale multiplies each token."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    for dim in (8, 1):
        d = codes.reshape(-1, dim)  # one token per document
        scales = torch.linspace(0.5, 2.0, d.shape[0])
        cu = torch.arange(d.shape[0] + 1)
        q = torch.eye(dim)  # query token k picks column k
        scores = torch_backend.maxsim_varlen_scaled(
            q, torch.arange(dim + 1), d, cu, scales, max_lq=1, max_ld=1, normalize=False
        )  # [dim queries, documents]
        expected = (q.double() @ (d.double() * scales.double()[:, None]).T).float()  # a NaN code: NaN row
        assert torch.equal(scores.isnan(), expected.isnan())
        assert torch.equal(scores.nan_to_num(), expected.nan_to_num())


@needs_kernel
@pytest.mark.parametrize("code_dtype", QUANTIZED, ids=dtype_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalize"])
@pytest.mark.parametrize("dim", [3, 64, 130])
def test_quantized_documents(dim, normalize, dtype, code_dtype):
    """Packed int8 / e4m3 codes with per-token scales read in place, against the reference on the
    dequantized tokens: odd D (the element tail), a document longer than a block (512 tokens), one-token
    documents, queries of every dtype."""
    from maxsim.index import quantize

    g = torch.Generator().manual_seed(dim)
    d_len = torch.tensor([5, 1, 600, 13, 1])
    q_len = torch.tensor([1, 17, 32])
    cu_d = torch.cat([torch.zeros(1, dtype=torch.int64), d_len.cumsum(0)])
    cu_q = torch.cat([torch.zeros(1, dtype=torch.int64), q_len.cumsum(0)])
    codes, scales = quantize(random_tokens((int(d_len.sum()), dim), torch.float32, generator=g) * 3, code_dtype)
    q = random_tokens((int(q_len.sum()), dim), dtype, generator=g)
    scores = torch_backend.maxsim_varlen_scaled(
        q, cu_q, codes, cu_d, scales, max_lq=32, max_ld=600, normalize=normalize
    )
    tokens = codes.double() * scales.double()[:, None]
    ref, _ = maxsim_varlen_reference(q.double(), cu_q, tokens, cu_d, normalize=normalize)
    assert_scores_close(scores, ref, dtype=torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalize"])
@pytest.mark.parametrize("masks", ["none", "both"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"q{list(s[0])}-d{list(s[1])}-Lq{s[2]}-Ld{s[3]}-D{s[4]}")
def test_gradients_match_reference(cpu_path, shape, masks, normalize, dtype):
    """The backward (the kernel's ``gradients``, or the matrix-product path's gathers) against the float64
    reference's autograd: every layout, broadcasts, masks (no gradient to masked tokens), normalize."""
    qb, db, lq, ld, dim = shape
    g = torch.Generator().manual_seed(lq * 100 + ld + dim)
    q = random_tokens((*qb, lq, dim), dtype, generator=g)
    d = random_tokens((*db, ld, dim), dtype, generator=g)
    kwargs = {}
    if masks == "both":
        kwargs["d_mask"] = torch.rand((*db, ld), generator=g) < 0.7
        kwargs["d_mask"][..., ld // 2] = True
        kwargs["q_mask"] = torch.rand((*qb, lq), generator=g) < 0.7
    dq, dd = weighted_grads(lambda a, b: maxsim.maxsim(a, b, normalize=normalize, **kwargs), q, d, 1)
    rq, rd = weighted_grads(
        lambda a, b: maxsim_reference(a, b, normalize=normalize, **kwargs)[0], q, d, 1, exact=True
    )
    assert_grads_close(dq, rq, dtype=dtype)
    assert_grads_close(dd, rd, dtype=dtype)
    if masks == "both":
        assert bool((dd[~kwargs["d_mask"].expand(dd.shape[:-1])] == 0).all())
        assert bool((dq[~kwargs["q_mask"].expand(dq.shape[:-1])] == 0).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalize"])
def test_varlen_gradients_match_reference(cpu_path, normalize, dtype):
    """Packed sequences, all pairs (the kernel) and listed pairs (gathers on either path)."""
    g = torch.Generator().manual_seed(12)
    q_len, d_len = torch.tensor([1, 17, 40]), torch.tensor([5, 1, 64, 13, 7])
    cu_q = torch.cat([torch.zeros(1), q_len.cumsum(0)]).int()
    cu_d = torch.cat([torch.zeros(1), d_len.cumsum(0)]).long()
    q = random_tokens((int(q_len.sum()), 33), dtype, generator=g)
    d = random_tokens((int(d_len.sum()), 33), dtype, generator=g)
    for pairs in (None, (torch.tensor([0, 2, 2, 1]), torch.tensor([4, 0, 2, 2]))):
        dq, dd = weighted_grads(
            lambda a, b, pairs=pairs: maxsim.maxsim_varlen(a, cu_q, b, cu_d, pairs=pairs, normalize=normalize),
            q, d, 2,
        )  # fmt: skip
        rq, rd = weighted_grads(
            lambda a, b, pairs=pairs: maxsim_varlen_reference(a, cu_q, b, cu_d, pairs=pairs, normalize=normalize)[0],
            q, d, 2, exact=True,
        )  # fmt: skip
        assert_grads_close(dq, rq, dtype=dtype)
        assert_grads_close(dd, rd, dtype=dtype)
