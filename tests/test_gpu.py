"""The Triton backend on a CUDA GPU (skipped without one): bfloat16, large shapes, the document split,
D = 1024, float32 exactness, torch.compile(fullgraph=True), CUDA-graph capture, opcheck, gradients.

Run on the GPU machine: ``PYTHONPATH=src python -m pytest tests/test_gpu.py -q`` (or scripts/gpu_suite.sh).
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")

from helpers import assert_scores_close, dtype_id, integer_tokens, naive_scores  # noqa: E402

import maxsim  # noqa: E402
from maxsim.backends import get_backend  # noqa: E402
from maxsim.backends import triton as triton_backend  # noqa: E402
from maxsim.backends.triton import forward  # noqa: E402
from maxsim.reference import maxsim_reference, maxsim_varlen_reference  # noqa: E402

CUDA = torch.device("cuda")
LOW = (torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def _default_backend(monkeypatch):
    monkeypatch.delenv("MAXSIM_BACKEND", raising=False)
    monkeypatch.setattr(forward, "POISON", True)


def tokens(shape, dtype, seed):
    g = torch.Generator(device=CUDA).manual_seed(seed)
    return torch.randn(shape, generator=g, device=CUDA, dtype=torch.float32).to(dtype)


def check(scores, q, d, *, argmax=None, q_mask=None, d_mask=None, normalize=False, exact_argmax=False):
    ref, ref_argmax = maxsim_reference(q, d, q_mask=q_mask, d_mask=d_mask, normalize=normalize)
    naive = naive_scores(q, d, q_mask=q_mask, d_mask=d_mask, normalize=normalize)
    assert_scores_close(scores, ref, dtype=q.dtype, naive=naive)
    if argmax is None:
        return
    assert argmax.shape == ref_argmax.shape and argmax.dtype == torch.int32
    if exact_argmax:
        assert torch.equal(argmax, ref_argmax)
        return
    assert torch.equal(argmax < 0, ref_argmax < 0)
    qq, dd = q.double(), d.double()
    if normalize:
        qq, dd = torch.nn.functional.normalize(qq, dim=-1), torch.nn.functional.normalize(dd, dim=-1)
    sim = (qq @ dd.transpose(-1, -2)).expand(*argmax.shape, d.shape[-2])
    picked = sim.gather(-1, argmax.clamp(min=0).long()[..., None])[..., 0]
    best = sim.gather(-1, ref_argmax.clamp(min=0).long()[..., None])[..., 0]
    real = ref_argmax >= 0
    tol = 2e-2 if q.dtype in LOW else 1e-4
    assert bool(((best - picked)[real] <= tol * best[real].abs().clamp(min=1)).all())


def test_default_backend_is_triton():
    assert get_backend(CUDA) is triton_backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalize"])
def test_layouts_bf16_and_masks(dtype, normalize):
    q = tokens((6, 33, 96), dtype, 1)
    d = tokens((6, 11, 97, 96), dtype, 2)
    q_mask = tokens((6, 33), torch.float32, 3) > -0.5
    d_mask = tokens((6, 11, 97), torch.float32, 4) > -0.3
    d_mask[..., 5] = True
    scores, argmax = maxsim.maxsim(
        q[:, None], d, q_mask=q_mask[:, None], d_mask=d_mask, normalize=normalize, return_argmax=True
    )
    check(scores, q[:, None], d, argmax=argmax, q_mask=q_mask[:, None], d_mask=d_mask, normalize=normalize)
    # all pairs and one query against a corpus
    scores = maxsim.maxsim(q[:, None], d[0][None], normalize=normalize)
    check(scores, q[:, None], d[0][None], normalize=normalize)
    scores = maxsim.maxsim(q[0], d[1], normalize=normalize)
    check(scores, q[0], d[1], normalize=normalize)


@pytest.mark.parametrize("dtype", LOW, ids=dtype_id)
def test_colpali_shape(dtype):
    """Lq = Ld = 1024: many query blocks per document (the FLOP-bound configuration)."""
    q = tokens((1024, 128), dtype, 5)
    d = tokens((24, 1024, 128), dtype, 6)
    scores, argmax = maxsim.maxsim(q, d, return_argmax=True)
    check(scores, q, d, argmax=argmax)
    assert torch.equal(maxsim.maxsim(q, d), scores)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_long_documents_split(dtype):
    """Ld = 4096 with two documents: the document axis is split across programs and combined in order."""
    q = tokens((2, 32, 128), dtype, 7)
    d = tokens((2, 1, 4096, 128), dtype, 8)
    d_mask = tokens((2, 1, 4096), torch.float32, 9) > -1.0
    scores, argmax = maxsim.maxsim(q[:, None], d, d_mask=d_mask, return_argmax=True)
    check(scores, q[:, None], d, argmax=argmax, d_mask=d_mask, exact_argmax=dtype == torch.float32)
    # integer tokens: the split path keeps the first index on ties
    qi = integer_tokens((2, 32, 64), dtype, generator=torch.Generator().manual_seed(0)).to(CUDA)
    di = integer_tokens((2, 1, 4096, 64), dtype, generator=torch.Generator().manual_seed(1)).to(CUDA)
    scores, argmax = maxsim.maxsim(qi[:, None], di, return_argmax=True)
    check(scores, qi[:, None], di, argmax=argmax, exact_argmax=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_wide_d(dtype):
    q = tokens((3, 32, 1024), dtype, 10)
    d = tokens((3, 5, 300, 1024), dtype, 11)
    scores, argmax = maxsim.maxsim(q[:, None], d, normalize=True, return_argmax=True)
    check(scores, q[:, None], d, argmax=argmax, normalize=True)


def test_launch_cache_follows_alignment_and_strides():
    """The launcher's compiled-kernel cache: one shape seen with aligned, misaligned (an element offset)
    and transposed storage, in either order, gives the right scores every time."""
    base_q = tokens((9, 33, 130), torch.bfloat16, 40)
    base_d = tokens((9 * 5 * 70 * 130 + 1,), torch.bfloat16, 41)
    aligned = base_d[: 9 * 5 * 70 * 130].view(9, 5, 70, 130)
    shifted = base_d[1:].view(9, 5, 70, 130)  # 2-byte offset: not 16-byte aligned
    strided = tokens((9, 5, 130, 70), torch.bfloat16, 42).transpose(-1, -2)  # token stride 1
    q = base_q[:, :32, :128]
    for d in (aligned, shifted, strided, aligned, shifted, strided):
        d = d[..., :128]
        check(maxsim.maxsim(q[:, None], d), q[:, None], d)


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalize"])
def test_prepared_launch_repeats_the_full_path(normalize, monkeypatch):
    """Repeat unmasked calls take ``forward.PreparedForward`` (bound once per signature): bitwise the
    results of the full path, for each layout, with and without argmax."""
    from maxsim import api

    monkeypatch.setattr(api, "_PREPARED", {})
    q = tokens((8, 32, 128), torch.bfloat16, 60)
    d = tokens((8, 10, 180, 128), torch.bfloat16, 61)
    calls = [
        lambda a: maxsim.maxsim(q[:, None], d, normalize=normalize, return_argmax=a),  # candidates
        lambda a: maxsim.maxsim(q[0], d[0], normalize=normalize, return_argmax=a),  # one query, a corpus
        lambda a: maxsim.maxsim(q[:, None], d[None, :, 0], normalize=normalize, return_argmax=a),  # all pairs
        lambda a: maxsim.maxsim(q, d[:, 0], normalize=normalize, return_argmax=a),  # pairs
    ]
    for call in calls:
        for with_argmax in (False, True):
            first = call(with_argmax)
            prepared = [v for v in api._PREPARED.values() if v]
            again = call(with_argmax)
            first, again = (first, again) if with_argmax else ((first, None), (again, None))
            assert torch.equal(again[0], first[0])
            if with_argmax:
                assert torch.equal(again[1], first[1])
            assert prepared, "the first call prepared no launch"
    scores, argmax = calls[0](True)
    check(scores, q[:, None], d, argmax=argmax, normalize=normalize)
    assert any(isinstance(v[1], forward.PreparedForward) for v in api._PREPARED.values() if v)


def test_prepared_launch_falls_back(monkeypatch):
    """A prepared signature called with another alignment, needing gradients, or inside a CUDA graph."""
    from maxsim import api

    monkeypatch.setattr(api, "_PREPARED", {})
    q = tokens((4, 32, 128), torch.float16, 62)
    base = tokens((4 * 6 * 100 * 128 + 1,), torch.float16, 63)
    aligned, shifted = base[:-1].view(4, 6, 100, 128), base[1:].view(4, 6, 100, 128)
    for d in (aligned, aligned, shifted, aligned, shifted):
        check(maxsim.maxsim(q[:, None], d), q[:, None], d)
    d = aligned.clone().requires_grad_(True)
    maxsim.maxsim(q[:, None], d).sum().backward()
    assert d.grad is not None and d.grad.abs().sum() > 0
    static = aligned.clone()
    maxsim.maxsim(q[:, None], static)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        maxsim.maxsim(q[:, None], static)
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        out = maxsim.maxsim(q[:, None], static)
    static.copy_(shifted)
    graph.replay()
    torch.cuda.synchronize()
    check(out, q[:, None], shifted)


def test_float32_is_exact_unless_tf32_is_allowed():
    q = tokens((64, 128), torch.float32, 12) * 10
    d = tokens((50, 300, 128), torch.float32, 13) * 10
    ref, _ = maxsim_reference(q, d)
    exact = maxsim.maxsim(q, d)
    assert ((exact.double() - ref).abs() <= 1e-4 * ref.abs().clamp(min=1)).all()
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # (the API both old and new torch read; monkeypatch cannot undo it)
    try:
        fast = maxsim.maxsim(q, d)
    finally:
        torch.set_float32_matmul_precision(before)
    assert ((fast.double() - ref).abs() <= 2e-2 * ref.abs().clamp(min=1)).all()


def test_varlen_ragged_corpus_bf16():
    g = torch.Generator().manual_seed(14)
    lengths = torch.randint(1, 300, (300,), generator=g)
    d = tokens((int(lengths.sum()), 128), torch.bfloat16, 15)
    q = tokens((2 * 32, 128), torch.bfloat16, 16)
    cu_d = torch.zeros(301, dtype=torch.int32)
    cu_d[1:] = lengths.cumsum(0)
    cu_q = torch.tensor([0, 32, 64], dtype=torch.int32)
    scores, argmax = maxsim.maxsim_varlen(q, cu_q.to(CUDA), d, cu_d.to(CUDA), return_argmax=True)
    ref, ref_argmax = maxsim_varlen_reference(q.cpu(), cu_q, d.cpu(), cu_d)
    naive = torch.stack(
        [
            naive_scores(q[32 * i : 32 * i + 32], d[cu_d[j] : cu_d[j + 1]])
            for i in range(2)
            for j in range(300)
        ]
    ).view(2, 300)
    assert_scores_close(scores, ref, dtype=torch.bfloat16, naive=naive)
    assert torch.equal(argmax.cpu() < 0, ref_argmax < 0)
    pairs = (torch.tensor([1, 0, 1], device=CUDA), torch.tensor([299, 0, 7], device=CUDA))
    listed = maxsim.maxsim_varlen(q, cu_q.to(CUDA), d, cu_d.to(CUDA), pairs=pairs)
    # (a few pairs split the documents across programs: the same maxima, summed in another order)
    torch.testing.assert_close(listed, scores[pairs], rtol=1e-6, atol=1e-4)


def test_compile_fullgraph_padded_and_changing_cu_seqlens():
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def padded(q, d, d_lengths):
        return maxsim.maxsim(q[:, None], d, d_lengths=d_lengths, validate=False, return_argmax=True)

    q = tokens((4, 32, 128), torch.bfloat16, 17)
    d = tokens((4, 6, 100, 128), torch.bfloat16, 18)
    lengths = torch.randint(1, 101, (4, 6), device=CUDA)
    scores, argmax = padded(q, d, lengths)
    mask = torch.arange(100, device=CUDA) < lengths[..., None]
    check(scores, q[:, None], d, argmax=argmax, d_mask=mask)

    @torch.compile(fullgraph=True)
    def varlen(q, cu_q, d, cu_d):
        return maxsim.maxsim_varlen(q, cu_q, d, cu_d, max_seqlen_q=44, max_seqlen_d=200, validate=False)

    q = tokens((64, 128), torch.float16, 19)
    d = tokens((400, 128), torch.float16, 20)
    cu_q = torch.tensor([0, 20, 64], dtype=torch.int32, device=CUDA)
    for cuts in ([0, 100, 220, 300, 400], [0, 1, 120, 280, 400], [0, 80, 90, 200, 400]):
        cu_d = torch.tensor(cuts, dtype=torch.int32, device=CUDA)
        scores = varlen(q, cu_q, d, cu_d)
        ref, _ = maxsim_varlen_reference(q.cpu(), cu_q.cpu(), d.cpu(), cu_d.cpu())
        torch.testing.assert_close(scores.double().cpu(), ref, rtol=2e-3, atol=2e-2)


def test_compile_training_step():
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def step(q, d):
        return maxsim.maxsim(q[:, None], d[None], normalize=True, validate=False).sum()

    q = tokens((4, 16, 64), torch.float32, 21).requires_grad_(True)
    d = tokens((5, 30, 64), torch.float32, 22).requires_grad_(True)
    step(q, d).backward()
    q2, d2 = q.detach().clone().requires_grad_(True), d.detach().clone().requires_grad_(True)
    ref, _ = maxsim_reference(q2[:, None], d2[None], normalize=True)
    ref.sum().backward()
    torch.testing.assert_close(q.grad, q2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d.grad, d2.grad, rtol=1e-4, atol=1e-5)


def test_cuda_graph_capture():
    q = tokens((8, 32, 128), torch.bfloat16, 23)
    d = tokens((8, 20, 180, 128), torch.bfloat16, 24)
    lengths = torch.randint(1, 181, (8, 20), device=CUDA)
    cu_q = torch.tensor([0, 32], dtype=torch.int32, device=CUDA)
    cu_d = torch.tensor([0, 50, 300, 310], dtype=torch.int32, device=CUDA)
    packed = tokens((310, 128), torch.bfloat16, 25)

    def run():
        padded = maxsim.maxsim(q[:, None], d, d_lengths=lengths, validate=False)
        ragged = maxsim.maxsim_varlen(
            q[0], cu_q, packed, cu_d, max_seqlen_q=32, max_seqlen_d=250, validate=False, return_argmax=True
        )
        return padded, ragged

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # warm-up (compiles the kernels) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for seed in (26, 27):
        q.copy_(tokens(q.shape, q.dtype, seed))
        packed.copy_(tokens(packed.shape, packed.dtype, seed + 10))
        graph.replay()
        torch.cuda.synchronize()
        mask = torch.arange(180, device=CUDA) < lengths[..., None]
        check(out[0], q[:, None], d, d_mask=mask)
        ref, ref_argmax = maxsim_varlen_reference(q[0].cpu(), cu_q.cpu(), packed.cpu(), cu_d.cpu())
        torch.testing.assert_close(out[1][0].double().cpu(), ref, rtol=2e-3, atol=5e-2)
        assert torch.equal(out[1][1].cpu() < 0, ref_argmax < 0)


def _opcheck_cases():
    q = tokens((2, 1, 33, 96), torch.bfloat16, 28)
    d = tokens((2, 5, 70, 96), torch.bfloat16, 29)
    q_mask = tokens((2, 1, 33), torch.float32, 30) > -0.5
    d_mask = tokens((2, 5, 70), torch.float32, 31) > -0.5
    d_mask[..., 0] = True
    d_lengths = torch.tensor([[70, 1, 33, 64, 5], [2, 69, 70, 17, 40]], device=CUDA)
    qv, dv = tokens((40, 64), torch.float16, 32), tokens((90, 64), torch.float16, 33)
    cu_q = torch.tensor([0, 7, 40], dtype=torch.int32, device=CUDA)
    cu_d = torch.tensor([0, 30, 31, 90], dtype=torch.int64, device=CUDA)
    ids = (torch.tensor([1, 0, 1], device=CUDA), torch.tensor([2, 2, 0], device=CUDA))
    argmax = torch.randint(-1, 70, (2, 1, 5, 33), dtype=torch.int32, device=CUDA)
    grad = tokens((2, 1, 5), torch.float32, 34)
    return [
        ("fwd_padded", (q, d, None, None, None, False, False)),
        ("fwd_padded", (q, d, q_mask, d_mask, None, True, True)),
        ("fwd_padded", (q.float().requires_grad_(), d.float().requires_grad_(), q_mask, d_mask, None, False, True)),
        ("fwd_padded", (q.float().requires_grad_(), d.float().requires_grad_(), q_mask, None, d_lengths, True, False)),
        ("fwd_varlen", (qv, cu_q, dv, cu_d, None, None, 33, 60, False, True)),
        ("fwd_varlen", (qv.float().requires_grad_(), cu_q, dv.float().requires_grad_(), cu_d, *ids, 33, 60, True, False)),
        ("bwd_padded", (q, d, argmax, grad, False, True, True)),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(7))
def test_opcheck(case):
    name, args = _opcheck_cases()[case]
    torch.library.opcheck(getattr(torch.ops.maxsim, name).default, args)


@pytest.mark.parametrize("dtype", LOW, ids=dtype_id)
def test_gradients_match_torch_backend(dtype, monkeypatch):
    q = tokens((4, 32, 128), dtype, 35)
    d = tokens((4, 8, 200, 128), dtype, 36)
    grads = []
    for backend in ("triton", "torch"):
        monkeypatch.setenv("MAXSIM_BACKEND", backend)
        qq, dd = q.clone().requires_grad_(True), d.clone().requires_grad_(True)
        maxsim.maxsim(qq[:, None], dd).sum().backward()
        grads.append((qq.grad, dd.grad))
    # the argmax can differ on near-ties between the two backends; compare where the rows agree
    torch.testing.assert_close(grads[0][0].float(), grads[1][0].float(), rtol=0.05, atol=0.1)


def _assert_grads_match(ours: tuple, refs: tuple, dtype: torch.dtype) -> None:
    """Our gradients in ``dtype`` within its tolerance (relative, at least absolute) of the float64 ones."""
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for grad, ref in zip(ours, refs, strict=True):
        assert grad.dtype == dtype
        err = (grad.double() - ref).abs()
        assert bool((err <= tol * ref.abs().clamp(min=1.0)).all()), f"max error {err.max().item():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, *LOW], ids=dtype_id)
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalize"])
def test_backward_kernels_against_reference(dtype, normalize):
    """In-batch all pairs with masks: Triton gradients against the reference's float64 autograd, routed by
    our own argmax (so near-ties cannot differ), bitwise equal over two runs."""
    q = tokens((6, 40, 136), dtype, 43)
    d = tokens((7, 300, 136), dtype, 44)
    q_mask = torch.rand(6, 40, device=CUDA, generator=torch.Generator(CUDA).manual_seed(45)) > 0.2
    d_lengths = torch.randint(1, 301, (7,), device=CUDA, generator=torch.Generator(CUDA).manual_seed(46))
    weights = torch.rand(6, 7, device=CUDA, generator=torch.Generator(CUDA).manual_seed(47))
    kw = dict(q_mask=q_mask[:, None], d_lengths=d_lengths[None], normalize=normalize)
    runs = []
    for _ in range(2):
        qq, dd = q.clone().requires_grad_(True), d.clone().requires_grad_(True)
        scores, argmax = maxsim.maxsim(qq[:, None], dd[None], return_argmax=True, **kw)
        (scores * weights).sum().backward()
        runs.append((qq.grad, dd.grad, argmax))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1]), "not deterministic"
    # the reference's gradient through our argmax: gather the winners in float64
    qr, dr = q.double().requires_grad_(True), d.double().requires_grad_(True)
    if normalize:
        qn, dn = torch.nn.functional.normalize(qr, dim=-1), torch.nn.functional.normalize(dr, dim=-1)
    else:
        qn, dn = qr, dr
    argmax = runs[0][2].long()
    won = dn[torch.arange(7, device=CUDA)[None, :, None], argmax.clamp(min=0)]  # [6, 7, 40, D]
    sims = (qn[:, None] * won).sum(-1) * (argmax >= 0)
    ((sims.sum(-1)) * weights.double()).sum().backward()
    _assert_grads_match(runs[0][:2], (qr.grad, dr.grad), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, *LOW], ids=dtype_id)
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalize"])
@pytest.mark.parametrize("listed", [False, True], ids=["all-pairs", "listed-pairs"])
def test_varlen_backward_against_reference(dtype, normalize, listed):
    """Packed sequences (1 to 40 query tokens, 1 to 300 document tokens), all pairs (Triton kernels) or 60
    listed pairs with repeats (the torch backend's sorted accumulation): gradients against the reference's
    float64 autograd routed by our argmax, bitwise equal over two runs."""
    gen = torch.Generator(CUDA).manual_seed(61)
    q_len = torch.randint(1, 41, (6,), device=CUDA, generator=gen)
    d_len = torch.randint(1, 301, (7,), device=CUDA, generator=gen)
    cu_q = torch.cat([q_len.new_zeros(1), q_len.cumsum(0)])
    cu_d = torch.cat([d_len.new_zeros(1), d_len.cumsum(0)])
    q = tokens((int(cu_q[-1]), 136), dtype, 62)
    d = tokens((int(cu_d[-1]), 136), dtype, 63)
    if listed:
        q_ids = torch.randint(0, 6, (60,), device=CUDA, generator=gen)
        d_ids = torch.randint(0, 7, (60,), device=CUDA, generator=gen)
        weights = torch.rand(60, device=CUDA, generator=gen)
    else:
        q_ids, d_ids = (
            i.reshape(-1)
            for i in torch.meshgrid(torch.arange(6, device=CUDA), torch.arange(7, device=CUDA), indexing="ij")
        )
        weights = torch.rand(6, 7, device=CUDA, generator=gen)
    runs = []
    for _ in range(2):
        qq, dd = q.clone().requires_grad_(True), d.clone().requires_grad_(True)
        scores, argmax = maxsim.maxsim_varlen(
            qq,
            cu_q,
            dd,
            cu_d,
            pairs=(q_ids, d_ids) if listed else None,
            normalize=normalize,
            return_argmax=True,
        )
        (scores * weights).sum().backward()
        runs.append((qq.grad, dd.grad, argmax.reshape(60 if listed else 42, -1)))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1]), "not deterministic"
    qr, dr = q.double().requires_grad_(True), d.double().requires_grad_(True)
    qn, dn = (torch.nn.functional.normalize(t, dim=-1) for t in (qr, dr)) if normalize else (qr, dr)
    argmax = runs[0][2].long()  # [pairs, max_lq], -1 past a query
    real = argmax >= 0
    i = torch.arange(argmax.shape[-1], device=CUDA)
    q_rows = (cu_q[q_ids][:, None] + i).expand_as(argmax)[real]
    d_rows = (cu_d[d_ids][:, None] + argmax)[real]
    weight = weights.double().reshape(-1, 1).expand(argmax.shape)[real]
    ((qn[q_rows] * dn[d_rows]).sum(-1) * weight).sum().backward()
    _assert_grads_match(runs[0][:2], (qr.grad, dr.grad), dtype)


def test_topk_beyond_2_31_elements():
    """A packed corpus of more than 2^31 elements (int64 offsets everywhere): documents planted past the
    2^31-th element are found with their exact scores, in padded-free varlen and through an Index."""
    dim, length = 128, 256
    n_docs = (2**31 // (dim * length)) + 64  # 65,600 documents, 2^31 + 2 Mi elements
    d = torch.empty(n_docs * length, dim, dtype=torch.float16, device=CUDA).uniform_(-0.01, 0.01)
    q = tokens((2, 32, dim), torch.float16, 48)
    planted = [n_docs - 1, n_docs - 40]  # both start beyond element 2^31
    assert min(planted) * length * dim > 2**31
    for i, doc in enumerate(planted):
        d[doc * length : doc * length + 32] = q[i]  # query i matches document `doc` exactly
    cu = torch.arange(0, n_docs + 1, device=CUDA, dtype=torch.int64) * length
    scores, ids = maxsim.topk(q, d, 3, cu_seqlens_d=cu)
    assert ids[:, 0].tolist() == planted
    for i, doc in enumerate(planted):
        want = maxsim.maxsim(q[i], d[doc * length : (doc + 1) * length])
        assert torch.equal(scores[i, 0], want)
    index = maxsim.Index(dim, torch.float16, device=CUDA)
    index.add((d, cu))
    del d
    assert index.search(q, 3)[1][:, 0].tolist() == planted


def test_topk_in_one_chunk_never_waits_on_the_device():
    """Once a packed corpus' offsets are checked (remembered for that tensor), a ``topk`` whose corpus fits one
    chunk reads nothing back from the GPU: torch's sync debug mode raises on any device-to-host wait."""
    lengths = torch.randint(1, 300, (500,), generator=torch.Generator().manual_seed(5))
    cu = torch.zeros(501, dtype=torch.int64)
    cu[1:] = lengths.cumsum(0)
    cu = cu.to(CUDA)
    d = tokens((int(lengths.sum()), 128), torch.float16, 6)
    q = tokens((4, 32, 128), torch.float16, 7)
    want = maxsim.topk(q, d, 5, cu_seqlens_d=cu)  # checks the offsets: one sync
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = maxsim.topk(q, d, 5, cu_seqlens_d=cu)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("quantize_queries", [False, True], ids=["wide-queries", "quantized-queries"])
@pytest.mark.parametrize("qdtype", [torch.int8, torch.float8_e4m3fn], ids=dtype_id)
@pytest.mark.parametrize("dtype", LOW, ids=dtype_id)
def test_quantized_index_fused(dtype, qdtype, quantize_queries):
    """Index.search on int8 / e4m3 storage runs the fused varlen kernel (codes widened in registers, or
    with quantized queries multiplied as codes on the int8 / float8 tensor cores): the reference's top-k over
    the dequantized tokens; exact scores and first-winner argmax on integer codes with power-of-two scales;
    a NaN e4m3 code wins as the first NaN (the interpreter cannot show it)."""
    from maxsim.backends.triton.varlen import maxsim_varlen_fwd
    from maxsim.index import dequantize, quantize

    g = torch.Generator(device=CUDA).manual_seed(71)
    lengths = torch.randint(100, 300, (200,), generator=g, device=CUDA)
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    index = maxsim.Index(128, qdtype, device=CUDA)
    index.add((tokens((int(cu[-1]), 128), torch.float32, 72), cu))
    q = tokens((32, 32, 128), dtype, 73)
    scores, ids = index.search(q, 10, quantize_queries=quantize_queries)
    q_scored = q.double()
    if quantize_queries:
        q_scored = dequantize(*quantize(q.reshape(-1, 128), qdtype, scale_tries=1), torch.float64).view(q.shape)
    wide = dequantize(index.tokens, index.scales, torch.float64)
    padded = torch.nn.utils.rnn.pad_sequence(list(wide.split(lengths.tolist())), batch_first=True)
    d_mask = torch.arange(padded.shape[1], device=CUDA) < lengths[:, None]
    full = maxsim_reference(q_scored[:, None], padded[None], d_mask=d_mask[None])[0]  # [32, 200]
    order = torch.sort(full, dim=1, descending=True, stable=True)
    tolerance = qdtype if quantize_queries else torch.float32
    if tolerance == torch.float8_e4m3fn:  # near-ties may swap within its bound: the reference's scores of ours
        assert_scores_close(full.gather(1, ids), order.values[:, :10], dtype=tolerance)
    else:
        assert torch.equal(ids, index.ids[order.indices[:, :10]])
    assert_scores_close(scores, order.values[:, :10], dtype=tolerance)
    codes = torch.randint(-3, 4, (104, 24), device=CUDA).float()
    codes[60, 3] = float("nan") if qdtype == torch.float8_e4m3fn else 0
    codes = codes.to(qdtype)
    scales = 2.0 ** torch.randint(-3, 2, (104,), device=CUDA).float()
    qi = torch.randint(-2, 3, (22, 24), device=CUDA).to(dtype)
    q_kw, qi_scored = {}, qi.double()
    if quantize_queries:
        q_scales = 2.0 ** torch.randint(-2, 3, (22,), device=CUDA).float()
        qi = qi.to(qdtype)
        q_kw, qi_scored = dict(q_scales=q_scales), qi.double() * q_scales.double()[:, None]
    cu_q = torch.tensor([0, 2, 22], dtype=torch.int32, device=CUDA)
    cu_d = torch.tensor([0, 1, 71, 104], dtype=torch.int32, device=CUDA)
    for n_split in (None, 3):
        s, a = maxsim_varlen_fwd(
            qi, cu_q, codes, cu_d, None, None, max_lq=20, max_ld=70, normalize=False, return_argmax=True,
            n_split=n_split, d_scales=scales, **q_kw,
        )  # fmt: skip
        ref, ref_a = maxsim_varlen_reference(qi_scored, cu_q, codes.double() * scales.double()[:, None], cu_d)
        assert torch.equal(s.double().nan_to_num(7.5), ref.nan_to_num(7.5)) and torch.equal(a, ref_a)
        if qdtype == torch.float8_e4m3fn:
            assert bool(s[:, 1].isnan().all()) and bool((a[:, 1, :2] == 59).all())
