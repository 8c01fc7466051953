"""maxsim.Index: storage dtypes, ids, add/remove, search against maxsim.topk, save/load and its checks."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import dtype_id, integer_tokens

import maxsim
from maxsim.backends import torch_backend
from maxsim.index import (
    INT8_DIM_MAX,
    INT8_LOWEST_EXPONENT,
    QUANT_MAX,
    dequantize,
    int8_scale_bits,
    int8_scales_on_grid,
    quantize,
)

STORAGE = (torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.int8)


def documents(n: int, dim: int, seed: int, max_len: int = 12) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (n,), generator=g).tolist()
    return [integer_tokens((length, dim), torch.float32, generator=g) for length in lengths]


def clustered_corpus(n_docs: int, n_queries: int, dim: int = 128, centroids: int = 4096, seed: int = 0):
    """Unit tokens around random unit centroids (noise of norm 0.5); each query is 32 noisy tokens of a
    random document, so its top-10 is meaningful (issue 6's recall corpus, with fewer documents)."""
    g = torch.Generator().manual_seed(seed)

    def unit(x):
        return torch.nn.functional.normalize(x, dim=-1)

    def noisy(x):
        return unit(x + 0.5 * unit(torch.randn(x.shape, generator=g)))

    centers = unit(torch.randn(centroids, dim, generator=g))
    docs = []
    for _ in range(n_docs):
        length = int(torch.randint(16, 49, (1,), generator=g))
        docs.append(noisy(centers[torch.randint(0, centroids, (length,), generator=g)]))
    picks = torch.randint(0, n_docs, (n_queries,), generator=g).tolist()
    queries = torch.stack(
        [noisy(docs[i][torch.randint(0, docs[i].shape[0], (32,), generator=g)]) for i in picks]
    )
    return docs, queries


@pytest.mark.parametrize("cpu_kernel", ["kernel", "widened"])
@pytest.mark.parametrize("dtype", STORAGE, ids=dtype_id)
def test_search_equals_topk_over_the_stored_tokens(dtype, cpu_kernel, monkeypatch):
    """Bitwise the scores of ``topk`` over the stored tokens as the search reads them: quantized codes times
    their scales in float32 by the CPU kernel, or widened to the queries' 16-bit dtype without it."""
    if cpu_kernel == "widened":
        monkeypatch.setenv("MAXSIM_CPU_KERNEL", "0")
    elif not torch_backend.reads_quantized(torch.ones(1, 1).half(), torch.ones(1, 1, dtype=torch.int8)):
        pytest.skip("the CPU kernel does not run here")
    docs = documents(30, 16, 0)
    ids = torch.arange(100, 130) * 7  # the caller's ids, increasing
    index = maxsim.Index(16, dtype)
    assert index.add(docs, ids=ids).tolist() == ids.tolist()
    q = integer_tokens((3, 5, 16), torch.float32, generator=torch.Generator().manual_seed(1)).half()
    scores, got = index.search(q, 7, chunk=4)
    quantized = dtype in QUANT_MAX and cpu_kernel == "kernel"
    stored = dequantize(*quantize(torch.cat(docs), dtype), torch.float32 if quantized else torch.float16)
    cu = torch.tensor([0] + [d.shape[0] for d in docs]).cumsum(0)
    ref_scores, ref_pos = maxsim.topk(q.float() if quantized else q, stored, 7, cu_seqlens_d=cu)
    assert torch.equal(got, ids[ref_pos]) and torch.equal(scores, ref_scores)
    one_scores, one_ids = index.search(q[0], 7)
    assert torch.equal(one_ids, got[0]) and torch.equal(one_scores, scores[0])


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8], ids=dtype_id)
def test_quantized_search_on_the_cpu_widens_nothing(dtype, monkeypatch):
    """With the CPU kernel, quantized storage is read in place: no chunk is dequantized into memory."""
    if not torch_backend.reads_quantized(torch.ones(1, 1).half(), torch.ones(1, 1, dtype=dtype)):
        pytest.skip("the CPU kernel does not run here")
    index = maxsim.Index(16, dtype)
    index.add(documents(40, 16, 3))
    q = integer_tokens((2, 5, 16), torch.float32, generator=torch.Generator().manual_seed(4))
    expected = index.search(q, 5)
    monkeypatch.setattr(maxsim.index, "dequantize", lambda *a: pytest.fail("a chunk was dequantized"))
    scores, ids = index.search(q, 5)
    assert torch.equal(scores, expected[0]) and torch.equal(ids, expected[1])


@pytest.mark.parametrize("cpu_kernel", ["kernel", "widened"])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8], ids=dtype_id)
def test_quantized_queries_where_codes_are_not_multiplied(dtype, cpu_kernel, monkeypatch):
    """On the CPU (no code-by-code dots) ``quantize_queries=True`` widens the query codes back: the search
    equals one with those widened queries (``quantize(..., scale_tries=1)`` per token, a NaN token's scale
    NaN); the default leaves the queries as they are here."""
    if cpu_kernel == "widened":
        monkeypatch.setenv("MAXSIM_CPU_KERNEL", "0")
    index = maxsim.Index(16, dtype)
    index.add(documents(30, 16, 5))
    q = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(6)).half()
    assert not torch_backend.dots_quantized(q, index.tokens)
    widened = dequantize(*quantize(q.reshape(-1, 16), dtype, scale_tries=1), torch.float16).view(q.shape)
    for got, want in (
        (index.search(q, 7, quantize_queries=True), index.search(widened, 7, quantize_queries=False)),
        (index.search(q, 7), index.search(q, 7, quantize_queries=False)),
    ):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(101))
    x[1, 3], x[2, 0], x[3] = float("nan"), float("inf"), 0.0
    codes, scales = quantize(x, dtype, scale_tries=1)
    zero_scale = 2.0 ** -int8_scale_bits(16) if dtype == torch.int8 else 1.0  # int8: its own grid's unit
    assert scales[1].isnan() and scales[2].isnan() and scales[3] == zero_scale
    assert bool((codes[3].float() == 0).all())


def test_equal_scores_come_out_by_lower_id_whatever_the_insertion_order():
    """Duplicated documents added with ids out of order (in two calls): ties by lower id, as topk's."""
    base = documents(6, 8, 7)
    index = maxsim.Index(8, torch.bfloat16)
    index.add([base[i] for i in (0, 1, 2)], ids=[50, 10, 30])
    index.add([base[i] for i in (2, 0, 1, 3, 4, 5)], ids=[20, 40, 5, 60, 1, 70])
    assert index.ids.tolist() == sorted(index.ids.tolist())
    order = sorted([(50, 0), (10, 1), (30, 2), (20, 2), (40, 0), (5, 1), (60, 3), (1, 4), (70, 5)])
    q = integer_tokens((2, 3, 8), torch.float32, generator=torch.Generator().manual_seed(8)).bfloat16()
    tokens = torch.cat([base[j] for _, j in order])
    cu = torch.tensor([0] + [base[j].shape[0] for _, j in order]).cumsum(0)
    ref_scores, ref_pos = maxsim.topk(q, tokens.bfloat16(), 9, cu_seqlens_d=cu)
    scores, ids = index.search(q, 9)
    assert torch.equal(ids, torch.tensor([i for i, _ in order])[ref_pos]) and torch.equal(scores, ref_scores)
    index.remove([30, 1])
    assert index.search(q, 7)[1].tolist() == [[i for i in row if i not in (30, 1)] for row in ids.tolist()]


def test_add_forms_ids_and_remove():
    docs = documents(10, 8, 2)
    index = maxsim.Index(8)
    first = index.add(docs[:6])
    tokens = torch.cat(docs[6:])
    cu = torch.tensor([0] + [d.shape[0] for d in docs[6:]]).cumsum(0)
    second = index.add((tokens, cu))
    assert first.tolist() == list(range(6)) and second.tolist() == list(range(6, 10))
    index.remove([1, 7])
    rebuilt = maxsim.Index(8)
    keep = [i for i in range(10) if i not in (1, 7)]
    rebuilt.add([docs[i] for i in keep], ids=keep)
    q = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(137)).half()
    assert torch.equal(index.search(q, 8)[1], rebuilt.search(q, 8)[1])
    assert len(index) == 8 and index.add(docs[:1]).tolist() == [10]


@pytest.mark.parametrize("dtype", [torch.float16, torch.int8], ids=dtype_id)
def test_many_small_adds_grow_storage_ahead(dtype):
    """Adding one document at a time grows the storage by a quarter at a time (spare room, reported), and
    the index holds and finds exactly what one add of every document gives; the callers' tensors are
    copied, never written."""
    docs = documents(40, 8, 5)
    one_by_one, at_once = maxsim.Index(8, dtype), maxsim.Index(8, dtype)
    kept = [doc.clone() for doc in docs]
    grown = set()
    for doc in docs:
        one_by_one.add([doc])
        grown.add(one_by_one._token_buf.shape[0])  # the capacity after this add
    at_once.add(docs)
    assert len(grown) < 20  # not a new buffer per add
    assert all(torch.equal(a, b) for a, b in zip(docs, kept, strict=True))
    assert torch.equal(one_by_one.tokens, at_once.tokens) and torch.equal(one_by_one.offsets, at_once.offsets)
    if dtype in QUANT_MAX:
        assert torch.equal(one_by_one.scales, at_once.scales)
    memory, exact = one_by_one.memory(), at_once.memory()
    assert memory["tokens"] == exact["tokens"] and exact["spare"] == 0 and memory["spare"] >= 0
    assert memory["total"] == exact["total"] + memory["spare"]
    q = integer_tokens((3, 4, 8), torch.float32, generator=torch.Generator().manual_seed(1)).half()
    for got, want in zip(one_by_one.search(q, 7), at_once.search(q, 7), strict=True):
        assert torch.equal(got, want)
    one_by_one.remove([3])
    at_once.remove([3])
    assert torch.equal(one_by_one.tokens, at_once.tokens) and one_by_one.memory()["spare"] == 0


@pytest.mark.parametrize("dtype", STORAGE, ids=dtype_id)
@pytest.mark.parametrize("source", [torch.float32, torch.float16], ids=dtype_id)
def test_quantize_into_out(dtype, source, monkeypatch):
    """``quantize(..., out=)`` writes into the given tensors what it returns without them, over several
    chunks (whole documents: one of 33 tokens alone), and leaves ``tokens`` as it was; ``Index.add`` quantizes into its own storage (one add of a
    float16 corpus to a float16 index copies it once, never aliases it)."""

    def bits(t: torch.Tensor) -> torch.Tensor:  # float8 compared as bytes
        return t.view(torch.uint8) if t.dtype.itemsize == 1 else t

    monkeypatch.setattr(maxsim.index, "CHUNK_TOKENS", 16)
    x = torch.randn(53, 12, generator=torch.Generator().manual_seed(3)).to(source)
    kept = x.clone()
    want_stored, want_scales = quantize(x, dtype, lengths=[20, 33])
    out = (torch.empty(53, 12, dtype=dtype), torch.empty(53) if dtype in QUANT_MAX else None)
    got_stored, got_scales = quantize(x, dtype, out=out, lengths=[20, 33])
    assert got_stored is out[0] and got_scales is out[1] and torch.equal(x, kept)
    assert torch.equal(bits(got_stored), bits(want_stored))
    if dtype in QUANT_MAX:
        assert torch.equal(got_scales, want_scales)
    index = maxsim.Index(12, dtype)
    index.add((x, torch.tensor([0, 20, 53])))
    assert index.tokens.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    assert index.memory()["spare"] == 0 and torch.equal(x, kept)
    assert torch.equal(bits(index.tokens), bits(want_stored))


@pytest.mark.parametrize("dtype", [torch.float16, torch.int8], ids=dtype_id)
def test_reserve_then_add_in_batches_copies_nothing(dtype):
    """After ``reserve``, adds up to that many tokens write into the same storage (nothing stored is
    copied), ``memory()`` reports the room left, and the index equals one built in one add; ``remove`` and
    a move to another device drop the room, a move to the same device keeps it."""
    docs = documents(30, 8, 5)
    total = sum(doc.shape[0] for doc in docs)
    index, at_once = maxsim.Index(8, dtype), maxsim.Index(8, dtype)
    per_token = 8 * dtype.itemsize + (4 if dtype in QUANT_MAX else 0)  # bytes of a stored token and its scale
    index.reserve(total + 7)
    assert index.memory()["spare"] == (total + 7) * per_token
    storage = index._token_buf.data_ptr()
    for b0 in range(0, len(docs), 4):
        index.add(docs[b0 : b0 + 4])
        assert index._token_buf.data_ptr() == storage
    at_once.add(docs)
    assert torch.equal(index.tokens, at_once.tokens) and torch.equal(index.offsets, at_once.offsets)
    assert index.memory()["spare"] == 7 * per_token and at_once.memory()["spare"] == 0
    index.reserve(3)  # less than held: nothing changes
    assert index._token_buf.data_ptr() == storage
    assert index.to("cpu") is index and index._token_buf.data_ptr() == storage
    q = integer_tokens((3, 4, 8), torch.float32, generator=torch.Generator().manual_seed(2)).half()
    for got, want in zip(index.search(q, 5), at_once.search(q, 5), strict=True):
        assert torch.equal(got, want)
    index.remove([0])
    assert index.memory()["spare"] == 0


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (2.0, TypeError), (True, TypeError), ("8", TypeError)])
def test_reserve_rejects_bad_counts(bad, error):
    with pytest.raises(error, match="tokens"):
        maxsim.Index(8).reserve(bad)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8], ids=dtype_id)
def test_quantized_recall_on_clustered_tokens(dtype):
    """recall@10 of a quantized index against the exact float16 one. Issue 6's bar (>= 0.99) is for its
    100k-document corpus; on this 1,500-document sample with 160 queries (1,600 answers) e4m3 measured 0.981
    and int8 0.996, so the check here is a regression floor, not the bar."""
    docs, queries = clustered_corpus(1500, 160)
    exact, quant = maxsim.Index(128, torch.float16), maxsim.Index(128, dtype)
    exact.add(docs)
    quant.add(docs)
    _, want = exact.search(queries.half(), 10)
    _, got = quant.search(queries.half(), 10)
    recall = (
        sum(len(set(a) & set(b)) for a, b in zip(want.tolist(), got.tolist(), strict=True)) / want.numel()
    )
    assert recall >= 0.975, f"recall@10 {recall:.3f}"
    memory = quant.memory()
    assert memory["tokens"] == quant.tokens.shape[0] * 128 and memory["scales"] == quant.tokens.shape[0] * 4


def test_e4m3_scale_search():
    """e4m3: each token's codes are those of one of the 8 scales within an octave above absmax, the best
    of them, refit so that <x, codes * scale> = |x|^2 (to float32 rounding); least error of all 8 tries, to
    the resolution of the float32 fit it is chosen by (a few float32 ulps of |x|^2: two tries can be closer)."""
    x = torch.nn.functional.normalize(torch.randn(512, 128, generator=torch.Generator().manual_seed(30)), dim=-1)
    stored, scales = quantize(x, torch.float8_e4m3fn)
    err = dequantize(stored, scales, torch.float32) - x
    assert bool(((err * x).sum(1).abs() <= 1e-6).all())
    absmax = x.abs().amax(dim=1, keepdim=True) / 448
    tries = [(x / (absmax * 2.0 ** (k / 8))).to(torch.float8_e4m3fn) for k in range(8)]
    bits = torch.stack([t.view(torch.uint8) for t in tries])  # [8, T, D]
    chosen = (bits == stored.view(torch.uint8)).all(dim=2)  # [8, T]: which tries gave the stored codes
    assert bool(chosen.any(dim=0).all())
    errors = []
    for t in tries:
        c = t.float()
        refit = (x * x).sum(1, keepdim=True) / (x * c).sum(1, keepdim=True)
        errors.append((c * refit - x).square().sum(1))
    resolution = 4 * torch.finfo(torch.float32).eps * x.square().sum(1)
    assert bool((err.square().sum(1) <= torch.stack(errors).amin(0) + resolution).all())
    assert err.square().sum(1).mean() < 0.95 * errors[0].mean()  # better than the absmax codes alone
    zero_stored, zero_scales = quantize(torch.zeros(2, 8), torch.float8_e4m3fn)
    assert bool((zero_stored.float() == 0).all()) and zero_scales.tolist() == [1.0, 1.0]


def test_quantize_round_trip_error():
    x = torch.randn(50, 32, generator=torch.Generator().manual_seed(216))
    for dtype, bound in ((torch.int8, 0.5 / 127), (torch.float8_e4m3fn, 2.0**-4)):
        stored, scales = quantize(x, dtype)
        assert stored.dtype == dtype and scales.shape == (50,)
        err = (dequantize(stored, scales, torch.float32) - x).abs().amax(dim=1)
        assert bool((err <= bound * x.abs().amax(dim=1) + 1e-7).all())
    assert QUANT_MAX[torch.int8] == 127.0


def int8_grid_parts(scales: torch.Tensor, dim: int, lengths: list[int]) -> torch.Tensor:
    """Each scale over its document's grid unit (float64), the unit found here by a float log2."""
    bits = int8_scale_bits(dim)
    m = []
    for doc in scales.split(lengths):
        e = max(math.ceil(math.log2(float(doc.max()))), INT8_LOWEST_EXPONENT)
        m.append(doc.double() / 2.0 ** (e - bits))
    return torch.cat(m)


@pytest.mark.parametrize("dim", [1, 16, 128, 300])
def test_int8_scales_share_a_grid_per_document(dim):
    """int8 scales: each at most one grid unit above ``max|token| / 127``, and per document integers
    ``1 <= m <= 2**b`` times the unit of its largest scale (what the GPU kernel's integer maxima need), from
    subnormal to huge tokens and for documents whose tokens differ by many octaves; codes stay within 127;
    ``int8_scales_on_grid`` says so, and not of scales moved off it."""
    g = torch.Generator().manual_seed(71)
    lengths = [1, 5, 40, 3, 70, 1, 9]
    x = torch.randn(sum(lengths), dim, generator=g) * torch.logspace(-40, 30, sum(lengths))[:, None]
    x[12] = 0.0  # a zero token inside a document
    x[-9:] = 0.0  # a document of zeros
    stored, scales = quantize(x, torch.int8, lengths=lengths)
    assert bool((scales.isfinite() & (scales > 0)).all())
    m = int8_grid_parts(scales, dim, lengths)
    assert bool(((m == m.round()) & (m >= 1) & (m <= 2 ** int8_scale_bits(dim))).all())
    absmax = (x.abs().amax(1) / 127).double()
    units = scales.double() / m
    assert bool((scales.double() >= absmax).all())
    assert bool(((scales.double() <= absmax + units) | (absmax == 0)).all())  # zeros: their grid's unit
    assert int(stored.abs().max()) <= 127 and bool((stored[12] == 0).all())
    assert int8_scales_on_grid(scales, dim, lengths)
    odd = scales.clone()
    odd[3] = odd[3] * (1 + 2.0**-20)
    assert not int8_scales_on_grid(odd, dim, lengths)
    # without lengths each token is a document of its own: rounded up to b significant bits
    alone, alone_scales = quantize(x, torch.int8)
    assert int8_scales_on_grid(alone_scales, dim, [1] * x.shape[0])
    relative = alone_scales.double() <= absmax * (1 + 2.0 ** (1 - int8_scale_bits(dim)))
    assert bool((relative | (absmax < 2.0**-90)).all())  # below the lowest grids: their unit


def test_int8_scales_in_chunks_are_those_of_whole_documents(monkeypatch):
    """``quantize`` works a chunk of whole documents at a time: the grids are those of one pass."""
    lengths = [3, 7, 2, 9, 1, 4]
    x = torch.randn(sum(lengths), 8, generator=torch.Generator().manual_seed(72)) * 3
    want = quantize(x, torch.int8, lengths=lengths)
    monkeypatch.setattr(maxsim.index, "CHUNK_TOKENS", 8)
    got = quantize(x, torch.int8, lengths=lengths)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_quantize_checks_lengths():
    with pytest.raises(ValueError, match="lengths must be >= 0 and sum to the 5 tokens"):
        quantize(torch.ones(5, 4), torch.int8, lengths=[2, 2])
    with pytest.raises(ValueError, match="lengths must be"):
        quantize(torch.ones(5, 4), torch.int8, lengths=[6, -1])


def test_int8_dim_is_bounded_for_int32_sums():
    with pytest.raises(ValueError, match="dim must be at most"):
        maxsim.Index(INT8_DIM_MAX + 1, torch.int8)
    assert int8_scale_bits(128) == 10 and int8_scale_bits(INT8_DIM_MAX) == 0


def test_int8_scales_of_older_files_are_requantized_on_load(tmp_path):
    """A file whose int8 scales are off their documents' grids (written before they shared one) loads with
    its tokens quantized again onto them: each value within half a code step of what the file held."""
    index = maxsim.Index(8, torch.int8)
    docs = documents(5, 8, 6)
    index.add(docs)
    x = torch.cat(docs).float()
    absmax = x.abs().amax(1) / 127
    index.tokens.copy_((x / absmax[:, None]).round().to(torch.int8))  # in place: per-token absmax scales
    index.scales.copy_(absmax)
    held = dequantize(index.tokens, index.scales, torch.float32)
    path = tmp_path / "older.safetensors"
    index.save(path)
    loaded = maxsim.Index.load(path)
    assert int8_scales_on_grid(loaded.scales, 8, loaded._lengths)
    assert not torch.equal(loaded.scales, index.scales)
    err = (dequantize(loaded.tokens, loaded.scales, torch.float32) - held).abs()
    assert bool((err <= loaded.scales[:, None] / 2 * (1 + 1e-6)).all())


@pytest.mark.parametrize("dtype", STORAGE, ids=dtype_id)
def test_save_load_round_trip(dtype, tmp_path):
    index = maxsim.Index(8, dtype)
    index.add(documents(9, 8, 3), ids=[5, 3, 9, 1, 0, 2, 8, 7, 6])
    path = tmp_path / "index.safetensors"
    index.save(path)
    loaded = maxsim.Index.load(path)
    assert loaded.dtype == dtype and loaded.dim == 8 and torch.equal(loaded.ids, index.ids)
    q = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(266)).half()
    assert torch.equal(loaded.search(q, 4)[1], index.search(q, 4)[1])


def test_truncated_or_corrupted_files_raise(tmp_path):
    index = maxsim.Index(8, torch.int8)
    index.add(documents(9, 8, 4))
    path = tmp_path / "index.safetensors"
    index.save(path)
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 40])
    with pytest.raises(ValueError, match="not a readable maxsim index"):
        maxsim.Index.load(cut)
    flipped = bytearray(data)
    flipped[-3] ^= 0x10  # one bit of the last tensor's data
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="corrupted"):
        maxsim.Index.load(bad)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ValueError, match="not a readable maxsim index"):
        maxsim.Index.load(garbage)


def test_bad_input():
    with pytest.raises(ValueError, match="dim must be a positive int"):
        maxsim.Index(0)
    with pytest.raises(TypeError, match="dtype must be one of"):
        maxsim.Index(8, torch.float32)
    index = maxsim.Index(8)
    with pytest.raises(ValueError, match="the index is empty"):
        index.search(torch.randn(2, 8), 1)
    with pytest.raises(TypeError, match="docs must be"):
        index.add([])
    with pytest.raises(ValueError, match="dim 4, the index has dim 8"):
        index.add([torch.randn(3, 4)])
    with pytest.raises(ValueError, match="NaN or infinite"):
        index.add([torch.full((2, 8), float("nan"))])
    with pytest.raises(ValueError, match="beyond 65504, which float16 storage"):
        maxsim.Index(8).add([torch.full((2, 8), 7e4)])
    with pytest.raises(ValueError, match="beyond 3.38953e\\+38, which bfloat16 storage"):
        maxsim.Index(8, torch.bfloat16).add([torch.full((2, 8), 3.4e38)])
    with pytest.raises(ValueError, match="which int8 storage cannot keep"):
        maxsim.Index(8, torch.int8).add([torch.full((2, 8), 1e36)])
    maxsim.Index(8, torch.bfloat16).add([torch.full((2, 8), 1e36)])
    index.add(documents(3, 8, 5), ids=[4, 5, 6])
    with pytest.raises(ValueError, match="ids must be unique"):
        index.add(documents(1, 8, 6), ids=[5])
    with pytest.raises(ValueError, match="ids must be unique"):
        index.add(documents(2, 8, 6), ids=[9, 9])
    with pytest.raises(ValueError, match="ids must be 2 integers"):
        index.add(documents(2, 8, 6), ids=[1.0, 2.0])
    with pytest.raises(ValueError, match="ids not in the index"):
        index.remove([4, 99])
    with pytest.raises(ValueError, match=r"k must lie in \[1, 3\]"):
        index.search(torch.randn(2, 8), 4)
    with pytest.raises(ValueError, match="q has dim 4"):
        index.search(torch.randn(2, 4), 1)
    with pytest.raises(ValueError, match="quantize_queries needs int8 or float8_e4m3fn storage"):
        index.search(torch.randn(2, 8), 1, quantize_queries=True)
    with pytest.raises(TypeError, match="quantize_queries must be None, False or True"):
        index.search(torch.randn(2, 8), 1, quantize_queries="yes")
