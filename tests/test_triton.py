"""The Triton kernels against the reference: every layout, ragged varlen, masks, argmax, odd sizes, NaN.

Without a GPU the kernels run in the Triton interpreter on CPU tensors: this module sets
``TRITON_INTERPRET=1`` at collection when torch sees no CUDA device, before triton is first imported (it
changes nothing for the other test files, which never run Triton kernels on the CPU); with one they run
compiled on ``cuda``. Shapes are small: the interpreter runs every program in Python. float32 and float16
only (the interpreter's bfloat16 is wrong; ``test_gpu.py`` covers bfloat16).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():  # before triton's first import, or its own library is not interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from helpers import (  # noqa: E402
    NoGradient,
    assert_grads_close,
    assert_scores_close,
    dtype_id,
    integer_tokens,
    naive_scores,
    random_tokens,
    record_argmax_gradients,
)

import maxsim  # noqa: E402
from maxsim.backends import get_backend  # noqa: E402
from maxsim.backends import triton as triton_backend  # noqa: E402
from maxsim.backends.triton import backward, configs, forward  # noqa: E402
from maxsim.backends.triton.forward import maxsim_fwd  # noqa: E402
from maxsim.backends.triton.varlen import maxsim_varlen_fwd  # noqa: E402
from maxsim.reference import lengths_to_mask, maxsim_reference, maxsim_varlen_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16)
# a small config that forces several query blocks, several documents per program and D chunks
SMALL = configs.FwdConfig(block_q=16, block_l=16, block_d=16, docs=3, num_warps=4, num_stages=1)
# the same with one reduction per tile (the FLOP-bound variant of the tile loop)
SMALL_TILE_MAX = configs.FwdConfig(
    block_q=16, block_l=16, block_d=16, docs=1, num_warps=4, num_stages=1, lane_max=False
)


def test_kernels_run_here():
    """On the CPU the kernels must really run in the interpreter (not fall back to the torch backend)."""
    assert DEVICE == "cuda" or triton_backend.INTERPRETED


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("MAXSIM_BACKEND", "triton")
    monkeypatch.setattr(forward, "POISON", True)


@pytest.mark.parametrize(
    "ask, tf32",
    [
        ("pass", False),
        ("torch.backends.cuda.matmul.allow_tf32 = True", True),
        ("torch.set_float32_matmul_precision('high')", True),
        ("torch.backends.cuda.matmul.fp32_precision = 'tf32'", True),
        ("torch.backends.fp32_precision = 'tf32'", True),
        ("torch.backends.fp32_precision = 'tf32'; torch.backends.cuda.matmul.fp32_precision = 'ieee'", False),
    ],
)
def test_float32_dots_follow_either_tf32_api(ask, tf32):
    """float32 dots are IEEE unless TF32 was allowed, by torch's legacy flag or its new ``fp32_precision`` (which
    makes reading the legacy flag raise). Each case in a fresh process: the flags are global."""
    if "fp32_precision" in ask and not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("torch < 2.9 has no fp32_precision")
    code = (
        f"import torch\n{ask}\nfrom maxsim.backends.triton import forward\n"
        "print(forward.dot_precision(torch.float32), forward.dot_precision(torch.float16))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["tf32" if tf32 else "ieee", "tf32"]


def to_dev(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


def check(scores, argmax, q, d, *, q_mask=None, d_mask=None, normalize=False, exact_argmax=False):
    """Scores within the project's tolerance; argmax identical (exact inputs) or a maximal token."""
    q, d, q_mask, d_mask = (None if t is None else t.cpu() for t in (q, d, q_mask, d_mask))
    scores = scores.cpu()
    ref, ref_argmax = maxsim_reference(q, d, q_mask=q_mask, d_mask=d_mask, normalize=normalize)
    naive = naive_scores(q.float(), d.float(), q_mask=q_mask, d_mask=d_mask, normalize=normalize)
    if q.dtype != torch.float32:
        naive = naive_scores(q, d, q_mask=q_mask, d_mask=d_mask, normalize=normalize)
    assert_scores_close(scores, ref, dtype=q.dtype, naive=naive)
    if argmax is None:
        return
    argmax = argmax.cpu()
    assert argmax.dtype == torch.int32 and argmax.shape == ref_argmax.shape
    if exact_argmax:
        assert torch.equal(argmax, ref_argmax)
        return
    assert torch.equal(argmax < 0, ref_argmax < 0)
    # the token we picked must be maximal within rounding
    qq, dd = q.double(), d.double()
    if normalize:
        qq, dd = torch.nn.functional.normalize(qq, dim=-1), torch.nn.functional.normalize(dd, dim=-1)
    sim = qq @ dd.transpose(-1, -2)
    sim = sim.expand(*argmax.shape, sim.shape[-1])
    picked = sim.gather(-1, argmax.clamp(min=0).long()[..., None])[..., 0]
    best = sim.gather(-1, ref_argmax.clamp(min=0).long()[..., None])[..., 0]
    real = ref_argmax >= 0
    assert bool(((best - picked)[real] <= 1e-2 * best[real].abs().clamp(min=1)).all())


# (name, q batch, d batch, Lq, Ld, D)
LAYOUTS = [
    ("query-vs-corpus", (), (5,), 33, 97, 96),
    ("pairs", (3,), (3,), 17, 40, 130),
    ("candidates", (2, 1), (2, 4), 32, 33, 64),
    ("all-pairs", (3, 1), (1, 4), 1, 1, 1),
    ("all-pairs", (2, 1), (1, 3), 20, 18, 16),
    ("all-pairs-transposed", (1, 3), (2, 1), 9, 14, 24),  # a permuted view, not one reshape
]


def layout_id(layout) -> str:
    name, qb, db, lq, ld, dim = layout
    return f"{name}-q{list(qb)}-d{list(db)}-Lq{lq}-Ld{ld}-D{dim}".replace(" ", "")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("form", ["none", "mask", "lengths"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_layouts(layout, form, dtype):
    _, qb, db, lq, ld, dim = layout
    g = torch.Generator().manual_seed(len(qb) * 100 + lq * 7 + ld)
    q = random_tokens((*qb, lq, dim), dtype, generator=g)
    d = random_tokens((*db, ld, dim), dtype, generator=g)
    kwargs, q_mask, d_mask = {}, None, None
    if form == "mask":
        q_mask = torch.rand((*qb, lq), generator=g) < 0.7
        d_mask = torch.rand((*db, ld), generator=g) < 0.6
        d_mask[..., 0] = True
        kwargs = {"q_mask": q_mask.to(DEVICE), "d_mask": d_mask.to(DEVICE)}
    elif form == "lengths":
        q_len = torch.randint(1, lq + 1, qb, generator=g)
        d_len = torch.randint(1, ld + 1, db, generator=g)
        q_mask, d_mask = lengths_to_mask(q_len, lq), lengths_to_mask(d_len, ld)
        kwargs = {"q_lengths": q_len.to(DEVICE), "d_lengths": d_len.to(DEVICE)}
    qd, dd = to_dev(q, d)
    scores, argmax = maxsim.maxsim(qd, dd, return_argmax=True, **kwargs)
    assert scores.shape == torch.broadcast_shapes(qb, db)
    check(scores, argmax, q, d, q_mask=q_mask, d_mask=d_mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_strided_views_in_place(dtype):
    """Non-contiguous views: a transposed token matrix, a sliced D, an expanded (zero-stride) query."""
    g = torch.Generator().manual_seed(3)
    base = random_tokens((4, 2 * 24, 19), dtype, generator=g)
    d = base.transpose(1, 2)[..., ::2]  # [4, 19, 24], D stride 2 * 19, token stride 1
    q = random_tokens((9, 24), dtype, generator=g)[None].expand(4, 9, 24)  # pairs with a zero stride
    qd, dd = to_dev(q, d)
    scores, argmax = maxsim.maxsim(qd, dd, return_argmax=True)
    check(scores, argmax, q, d)


TILE_CASES = [  # (config, n_split, normalize)
    pytest.param(SMALL, None, False, id="lane-max-raw"),
    pytest.param(SMALL, 3, False, id="lane-max-split-raw"),
    pytest.param(SMALL, None, True, id="lane-max-normalize"),
    pytest.param(SMALL, 3, True, id="lane-max-split-normalize"),
    pytest.param(SMALL_TILE_MAX, 3, False, id="tile-max-split-raw"),
    pytest.param(SMALL_TILE_MAX, None, True, id="tile-max-normalize"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(("cfg", "n_split", "normalize"), TILE_CASES)
def test_small_tiles_splits_and_ties(cfg, n_split, normalize, dtype):
    """Several query blocks, documents per program, D chunks and document splits; integer ties."""
    g = torch.Generator().manual_seed(5)
    q = integer_tokens((2, 2, 20, 20), dtype, generator=g)  # 2 query blocks, 2 D chunks of SMALL
    d = integer_tokens((2, 4, 40, 20), dtype, generator=g)  # 2 blocks of 3 documents, 3 tiles
    q_mask = torch.rand(2, 2, 20, generator=g) < 0.8
    d_mask = torch.rand(2, 4, 40, generator=g) < 0.7
    d_mask[..., 39] = True
    qd, dd, qm, dm = to_dev(q, d, q_mask, d_mask)
    scores, argmax = maxsim_fwd(
        qd, dd, qm, dm, normalize=normalize, return_argmax=True, config=cfg, n_split=n_split
    )
    no_argmax, none = maxsim_fwd(
        qd, dd, qm, dm, normalize=normalize, return_argmax=False, config=cfg, n_split=n_split
    )
    assert none is None
    assert torch.equal(scores, no_argmax)
    # canonical [P, Qn, Lq] x [P, Dn, Ld] -> reference layout [P, Qn, 1] x [P, 1, Dn]
    q4, d4 = q[:, :, None], d[:, None]
    check(scores, argmax, q4, d4, q_mask=q_mask[:, :, None], d_mask=d_mask[:, None], normalize=normalize,
          exact_argmax=not normalize)  # fmt: skip


PACKED = configs.FwdConfig(block_q=64, block_l=16, block_d=16, docs=2, num_warps=4, num_stages=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n_split", [None, 2], ids=["whole", "split"])
@pytest.mark.parametrize("lane_max", [True, False], ids=["lane-max", "tile-max"])
def test_packed_queries(lane_max, n_split, dtype):
    """Several short queries per program (QPACK): 5 queries of 13 tokens in blocks of 4 x 16 rows (the last
    block half empty), masks on both sides, integer ties, D chunks, split documents."""
    cfg = dataclasses.replace(PACKED, lane_max=lane_max)
    flags = (True, True, False, False, True, "ieee")  # q mask, d mask, d lengths, normalize, argmax, prec
    plan = forward._padded_plan(torch.device(DEVICE), dtype, 2, 5, 13, 20, 3, 37, flags, cfg, n_split)
    assert plan[-1]["QPACK"] == 4 and plan[-1]["BLOCK_Q"] == 64
    g = torch.Generator().manual_seed(11)
    q = integer_tokens((2, 5, 13, 20), dtype, generator=g)
    d = integer_tokens((2, 3, 37, 20), dtype, generator=g)
    q_mask = torch.rand(2, 5, 13, generator=g) < 0.8
    d_mask = torch.rand(2, 3, 37, generator=g) < 0.7
    d_mask[..., 0] = True
    qd, dd, qm, dm = to_dev(q, d, q_mask, d_mask)
    scores, argmax = maxsim_fwd(qd, dd, qm, dm, normalize=False, return_argmax=True, config=cfg, n_split=n_split)
    alone, _ = maxsim_fwd(qd, dd, qm, dm, normalize=False, return_argmax=False, config=cfg, n_split=n_split)
    assert torch.equal(scores, alone)
    check(scores, argmax, q[:, :, None], d[:, None], q_mask=q_mask[:, :, None], d_mask=d_mask[:, None])


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n_split", [None, 2], ids=["whole", "split"])
def test_varlen_packed_queries(n_split, dtype):
    """All pairs of short packed queries, several per program: 7 queries of 1 to 13 tokens in blocks of
    4 x 16 rows against ragged documents, integer ties, split documents."""
    g = torch.Generator().manual_seed(13)
    q_len = torch.tensor([13, 1, 7, 13, 5, 9, 2])
    d_len = torch.tensor([37, 1, 20, 16])
    cu_q = torch.cat([torch.zeros(1, dtype=torch.int64), q_len.cumsum(0)])
    cu_d = torch.cat([torch.zeros(1, dtype=torch.int64), d_len.cumsum(0)])
    q = integer_tokens((int(cu_q[-1]), 20), dtype, generator=g)
    d = integer_tokens((int(cu_d[-1]), 20), dtype, generator=g)
    qd, cqd, dd, cdd = to_dev(q, cu_q, d, cu_d)
    scores, argmax = maxsim_varlen_fwd(
        qd, cqd, dd, cdd, None, None, max_lq=13, max_ld=37, normalize=False, return_argmax=True,
        config=PACKED, n_split=n_split,
    )  # fmt: skip
    ref, ref_argmax = maxsim_varlen_reference(q, cu_q, d, cu_d)
    assert torch.equal(scores.cpu().double(), ref)
    assert torch.equal(argmax.cpu(), ref_argmax)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("dim", [1, 96, 130])
@pytest.mark.parametrize("sizes", [(1, 1), (33, 97), (1, 97), (33, 1)], ids=lambda s: f"Lq{s[0]}-Ld{s[1]}")
def test_odd_sizes(sizes, dim, dtype):
    lq, ld = sizes
    g = torch.Generator().manual_seed(lq * 1000 + ld * 10 + dim)
    q = random_tokens((2, lq, dim), dtype, generator=g)
    d = random_tokens((2, 3, ld, dim), dtype, generator=g)
    qd, dd = to_dev(q, d)
    scores, argmax = maxsim.maxsim(qd[:, None], dd, return_argmax=True)
    check(scores, argmax, q[:, None], d)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_normalize(dtype):
    g = torch.Generator().manual_seed(11)
    q = random_tokens((3, 9, 48), dtype, generator=g) * 7
    d = random_tokens((5, 20, 48), dtype, generator=g) * 0.1
    if dtype == torch.float32:  # a zero token: F.normalize leaves it zero (in float16 its eps underflows)
        q[0, 2] = 0
        d[1, 3] = 0
    qd, dd = to_dev(q, d)
    scores, argmax = maxsim.maxsim(qd[:, None], dd[None], normalize=True, return_argmax=True)
    check(scores, argmax, q[:, None], d[None], normalize=True)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("cfg", [SMALL, SMALL_TILE_MAX], ids=["lane-max", "tile-max"])
@pytest.mark.parametrize("n_split", [None, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_nan_inf_and_masked_garbage(dtype, n_split, cfg):
    """NaN wins (the first NaN), masked tokens never take part whatever they hold, all -inf: first real."""
    g = torch.Generator().manual_seed(13)
    q = integer_tokens((1, 1, 4, 16), dtype, generator=g)
    d = integer_tokens((1, 5, 40, 16), dtype, generator=g)
    d_mask = torch.ones(1, 5, 40, dtype=torch.bool)
    d[0, 0, 7, 0] = float("nan")  # doc 0: NaN at token 7 (and 30): the first NaN wins
    d[0, 0, 30, 0] = float("nan")
    d[0, 3, 21, 0] = float("nan")  # doc 3: a NaN after whole tiles without one (a row's maximum set before)
    d[0, 1, 5] = float("nan")  # doc 1: NaN only in masked tokens: ignored
    d[0, 1, 33] = float("inf")
    d_mask[0, 1, [5, 33]] = False
    q[0, 0, 1] = 0
    q[0, 0, 1, 0] = float("inf")  # query token 1: +inf * d[..., 0]
    d[0, 2, :, 0] = -1  # doc 2: every real similarity of query token 1 is -inf
    d[0, 2, 0, 0] = 1
    d_mask[0, 2, :3] = False  # ... and the masked token 0 (+inf) must not win: the first real is 3
    qd, dd, dm = to_dev(q, d, d_mask)
    scores, argmax = maxsim_fwd(
        qd, dd, None, dm, normalize=False, return_argmax=True, config=cfg, n_split=n_split
    )
    check(scores, argmax, q[:, :, None], d[:, None], d_mask=d_mask[:, None], exact_argmax=True)
    assert argmax[0, 0, 0, [0, 2, 3]].tolist() == [7, 7, 7]  # (token 1's inf * 0 is NaN already at 0)
    assert argmax[0, 0, 3, [0, 2, 3]].tolist() == [21, 21, 21]
    assert argmax[0, 0, 2, 1].item() == 3


@pytest.mark.parametrize("n_split", [None, 3])
def test_document_without_real_token(n_split):
    """validate=False: a document with no real token scores -inf with argmax -1 (the reference's)."""
    g = torch.Generator().manual_seed(17)
    q = random_tokens((1, 1, 5, 16), torch.float32, generator=g)
    d = random_tokens((1, 3, 50, 16), torch.float32, generator=g)
    d_mask = torch.rand(1, 3, 50, generator=g) < 0.5
    d_mask[0, 1] = False
    qd, dd, dm = to_dev(q, d, d_mask)
    scores, argmax = maxsim_fwd(
        qd, dd, None, dm, normalize=False, return_argmax=True, config=SMALL, n_split=n_split
    )
    assert scores[0, 0, 1].item() == float("-inf")
    assert (argmax[0, 0, 1] == -1).all()
    check(scores, argmax, q[:, :, None], d[:, None], d_mask=d_mask[:, None])


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("cfg", [SMALL, SMALL_TILE_MAX], ids=["lane-max", "tile-max"])
@pytest.mark.parametrize("n_split", [None, 3])
def test_document_lengths(n_split, cfg, dtype):
    """``d_lengths`` read as lengths by the kernel: int32 and int64, a broadcast (zero-stride) view, integer
    ties, splits; values outside ``[1, Ld]`` (validate=False) are clamped: none real scores -inf / -1."""
    g = torch.Generator().manual_seed(19)
    q = integer_tokens((2, 2, 20, 20), dtype, generator=g)
    d = integer_tokens((2, 5, 40, 20), dtype, generator=g)
    lengths = torch.tensor([[40, 1, 17, 33, 16], [2, 39, 99, 0, -3]])
    clamped = lengths.clamp(0, 40)
    q_mask = torch.rand(2, 2, 20, generator=g) < 0.8
    qd, dd, qm = to_dev(q, d, q_mask)
    for lengths_dev in (lengths.to(DEVICE), lengths.to(DEVICE, torch.int32)):
        scores, argmax = maxsim_fwd(
            qd, dd, qm, None, d_lengths=lengths_dev, normalize=False, return_argmax=True, config=cfg,
            n_split=n_split,
        )  # fmt: skip
        ref, ref_argmax = maxsim_reference(
            q[:, :, None], d[:, None], q_mask=q_mask[:, :, None], d_mask=lengths_to_mask(clamped, 40)[:, None]
        )
        assert torch.equal(argmax.cpu(), ref_argmax)
        assert torch.equal(scores.cpu().double(), ref)
    one = torch.tensor([7, 40, 1], device=DEVICE)[None].expand(2, 3)  # zero stride over the groups
    scores, argmax = maxsim_fwd(
        qd, dd[:, :3], qm, None, d_lengths=one, normalize=False, return_argmax=True, config=cfg, n_split=n_split
    )
    by_mask, mask_argmax = maxsim_fwd(
        qd, dd[:, :3], qm, lengths_to_mask(one, 40), normalize=False, return_argmax=True, config=cfg,
        n_split=n_split,
    )  # fmt: skip
    assert torch.equal(scores, by_mask) and torch.equal(argmax, mask_argmax)


def ragged(g, lengths, dim, dtype, cu_dtype=torch.int32):
    tokens = random_tokens((sum(lengths), dim), dtype, generator=g)
    cu = torch.zeros(len(lengths) + 1, dtype=cu_dtype)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return tokens, cu


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("listed", [False, True], ids=["all-pairs", "listed"])
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalize"])
def test_varlen(listed, normalize, dtype):
    g = torch.Generator().manual_seed(19)
    q, cu_q = ragged(g, [3, 33, 1], 96, dtype)
    d, cu_d = ragged(g, [1, 97, 40, 5, 18], 96, dtype, cu_dtype=torch.int64)
    pairs = (torch.tensor([0, 2, 1, 1, 0]), torch.tensor([4, 0, 1, 1, 2])) if listed else None
    qd, cqd, dd, cdd = to_dev(q, cu_q, d, cu_d)
    pd = None if pairs is None else tuple(to_dev(*pairs))
    scores, argmax = maxsim.maxsim_varlen(
        qd, cqd, dd, cdd, pairs=pd, normalize=normalize, return_argmax=True, max_seqlen_q=33, max_seqlen_d=97
    )
    ref, ref_argmax = maxsim_varlen_reference(q, cu_q, d, cu_d, pairs=pairs, normalize=normalize)
    assert_scores_close(scores, ref, dtype=dtype, naive=_varlen_naive(q, cu_q, d, cu_d, pairs, normalize))
    assert torch.equal(argmax.cpu() < 0, ref_argmax < 0)
    if dtype == torch.float32 and not normalize:
        assert torch.equal(argmax.cpu(), ref_argmax)


def _varlen_naive(q, cu_q, d, cu_d, pairs, normalize):
    cq, cd = cu_q.tolist(), cu_d.tolist()
    nq, nd = len(cq) - 1, len(cd) - 1
    ids = (
        [(i, j) for i in range(nq) for j in range(nd)]
        if pairs is None
        else list(zip(*(p.tolist() for p in pairs), strict=True))
    )
    out = [
        naive_scores(q[cq[i] : cq[i + 1]], d[cd[j] : cd[j + 1]], normalize=normalize) for i, j in ids
    ]  # fmt: skip
    out = torch.stack(out)
    return out.reshape(nq, nd) if pairs is None else out


def test_run_max_registers_keeps_two_programs_per_multiprocessor():
    """A runs launch of 8 warps on NVIDIA is capped at 128 registers (2 x 256 threads x 128 = the 65536 of
    a multiprocessor); 4 warps need no cap below the hardware's 255; AMD and the interpreter get none."""
    from maxsim.backends.triton.varlen import run_max_registers

    assert run_max_registers("sm_90", 8) == 128
    assert run_max_registers("sm_80", 16) == 64
    assert run_max_registers("sm_90", 4) is None
    assert run_max_registers("gfx-gfx942", 8) is None
    assert run_max_registers("cpu", 8) is None


# runs of documents (all pairs without argmax): 4 documents per program in one tile loop
RUN = configs.FwdConfig(block_q=64, block_l=16, block_d=16, num_warps=4, num_stages=1, lane_max=False, doc_run=4)


# documents per run of 4 (block_l 16): "mixed" has runs with documents shorter than a tile; in "long" every
# document fills at least a tile (ending on a tile's edge: 16, 48)
RUN_LENGTHS = {"mixed": [37, 2, 16, 33, 1, 15, 50], "long": [37, 16, 33, 17, 48, 16, 50]}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("block_q", [16, 64], ids=["query-blocks", "packed-queries"])
@pytest.mark.parametrize("tokens", ["exact", "normalize", "nan", "int8-codes", "e4m3-codes"])
@pytest.mark.parametrize("lengths", list(RUN_LENGTHS))
def test_varlen_runs_of_documents(lengths, tokens, block_q, dtype, monkeypatch):
    """All pairs without argmax take runs of ``docs`` documents per program: documents ending on a
    tile's edge or inside one, shorter than a tile, longer than several tiles, a last run cut short (7
    documents in runs of 4); queries of 1 to 20 tokens (block_q 16: two query blocks; 64: 4 queries packed
    in a block), D of 2 chunks. Integer tokens give exact scores; a NaN token makes its document's scores
    NaN; quantized codes (queries too) match the reference on the dequantized tokens."""
    from maxsim.backends.triton import varlen
    from maxsim.index import quantize

    monkeypatch.setattr(varlen, "RUN_WAVES", 0)
    g = torch.Generator().manual_seed(67)
    q_len, d_len = [13, 1, 7, 20, 5], RUN_LENGTHS[lengths]
    cu_q = torch.tensor([0, *torch.tensor(q_len).cumsum(0).tolist()], dtype=torch.int32)
    cu_d = torch.tensor([0, *torch.tensor(d_len).cumsum(0).tolist()], dtype=torch.int64)
    q = integer_tokens((sum(q_len), 20), dtype, generator=g)
    d = integer_tokens((sum(d_len), 20), dtype, generator=g)
    kw, q_ref, d_ref = {}, q.double(), d.double()
    if tokens == "nan":
        d[cu_d[2] + 3, 3] = float("nan")  # document 2's fourth token
        d_ref = d.double()
    if tokens.endswith("codes"):
        code_dtype = torch.int8 if tokens == "int8-codes" else torch.float8_e4m3fn
        d, d_scales = quantize(d.float(), code_dtype, lengths=d_len)
        q, q_scales = quantize(q.float(), code_dtype, scale_tries=1)
        kw = dict(d_scales=d_scales.to(DEVICE), q_scales=q_scales.to(DEVICE))
        q_ref, d_ref = _dequantized(q, q_scales), _dequantized(d, d_scales)
    cfg = dataclasses.replace(RUN, block_q=block_q)
    scores, argmax = maxsim_varlen_fwd(
        *to_dev(q, cu_q, d, cu_d), None, None, max_lq=20, max_ld=50, normalize=tokens == "normalize",
        return_argmax=False, config=cfg, **kw,
    )  # fmt: skip
    assert argmax is None
    ref, _ = maxsim_varlen_reference(q_ref, cu_q, d_ref, cu_d, normalize=tokens == "normalize")
    if tokens in ("exact", "nan"):
        torch.testing.assert_close(scores.cpu().double(), ref, rtol=0, atol=0, equal_nan=True)
        assert scores[:, 2].isnan().all() == (tokens == "nan")
    elif tokens == "normalize":
        assert_scores_close(scores, ref, dtype=dtype, naive=_varlen_naive(q, cu_q, d, cu_d, None, True))
    else:
        assert_scores_close(scores, ref, dtype=code_dtype)


@pytest.mark.parametrize("block_d", [16, 64], ids=["d-chunks", "one-d-tile"])
def test_varlen_runs_int8_maxima_on_integers(block_d, monkeypatch):
    """int8 codes by codes in runs (each tile's maxima taken on integers: ``index.int8_scales``): documents
    whose scales span 24 octaves (the tiles of one document on different units), a document whose
    similarities with a query are all negative (its last tile's masked columns must not win), and the
    largest products the grid allows (codes -128 by 127 at ``m = 2**b``) match the reference on the
    dequantized tokens."""
    from maxsim.backends.triton import varlen
    from maxsim.index import int8_scales

    monkeypatch.setattr(varlen, "RUN_WAVES", 0)
    g = torch.Generator().manual_seed(73)
    dim, q_len, d_len = 40, [13, 1, 7, 20, 5], RUN_LENGTHS["mixed"]
    cu_q = torch.tensor([0, *torch.tensor(q_len).cumsum(0).tolist()], dtype=torch.int32)
    cu_d = torch.tensor([0, *torch.tensor(d_len).cumsum(0).tolist()], dtype=torch.int64)
    q = torch.randint(-127, 128, (sum(q_len), dim), generator=g).to(torch.int8)
    q[13] = torch.randint(1, 128, (dim,), generator=g).to(torch.int8)  # query 1: positive codes
    q[0] = 127
    q_scales = 2.0 ** torch.randint(-3, 4, (sum(q_len),), generator=g).float()
    d = torch.randint(-128, 128, (sum(d_len), dim), generator=g).to(torch.int8)
    d[37:39] = -torch.randint(1, 129, (2, dim), generator=g).to(torch.int8)  # document 1: negative codes
    d[0] = -128
    absmax = 2.0 ** (torch.rand(sum(d_len), generator=g) * 24 - 12)
    absmax[0] = 2.0**13  # document 0's largest: m = 2**b exactly
    d_scales = int8_scales(absmax, dim, d_len)
    cfg = dataclasses.replace(RUN, block_d=block_d)
    scores, _ = maxsim_varlen_fwd(
        *to_dev(q, cu_q, d, cu_d), None, None, max_lq=20, max_ld=50, normalize=False, return_argmax=False,
        config=cfg, d_scales=d_scales.to(DEVICE), q_scales=q_scales.to(DEVICE),
    )  # fmt: skip
    ref, _ = maxsim_varlen_reference(_dequantized(q, q_scales), cu_q, _dequantized(d, d_scales), cu_d)
    assert float(ref[1, 1]) < 0
    assert_scores_close(scores, ref, dtype=torch.int8)


@pytest.mark.parametrize("n_split", [2, 4])
def test_varlen_splits_and_ties(n_split):
    g = torch.Generator().manual_seed(23)
    lq, ld = [2, 20], [1, 70, 33]
    q = integer_tokens((sum(lq), 24), torch.float16, generator=g)
    d = integer_tokens((sum(ld), 24), torch.float16, generator=g)
    cu_q = torch.tensor([0, 2, 22], dtype=torch.int32)
    cu_d = torch.tensor([0, 1, 71, 104], dtype=torch.int32)
    qd, cqd, dd, cdd = to_dev(q, cu_q, d, cu_d)
    for pairs in (None, (torch.tensor([1, 0, 1]), torch.tensor([2, 1, 1]))):
        pd = None if pairs is None else tuple(to_dev(*pairs))
        scores, argmax = maxsim_varlen_fwd(
            qd, cqd, dd, cdd, *(pd or (None, None)), max_lq=20, max_ld=70, normalize=False, return_argmax=True,
            config=SMALL, n_split=n_split,
        )  # fmt: skip
        ref, ref_argmax = maxsim_varlen_reference(q, cu_q, d, cu_d, pairs=pairs)
        assert torch.equal(scores.cpu().double(), ref)
        assert torch.equal(argmax.cpu(), ref_argmax)


def _reference_grads(q, d, weights, **kwargs):
    """float64 gradients of ``(scores * weights).sum()`` by the reference's autograd (first-winner routing)."""
    qr, dr = (t.detach().cpu().double().requires_grad_(True) for t in (q, d))
    masks = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    masks = {k: v for k, v in masks.items() if k != "d_lengths"}
    if "d_lengths" in kwargs:
        masks["d_mask"] = lengths_to_mask(kwargs["d_lengths"].cpu(), d.shape[-2])
    (maxsim_reference(qr, dr, **masks)[0] * weights.double()).sum().backward()
    return qr.grad, dr.grad


def _triton_grads(q, d, weights, **kwargs):
    qd, dd = (t.detach().to(DEVICE).requires_grad_(True) for t in (q, d))
    kwargs = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    (maxsim.maxsim(qd, dd, **kwargs) * weights.to(DEVICE)).sum().backward()
    return qd.grad.cpu(), dd.grad.cpu()


# backward module settings: the defaults, then blocks that split every axis (the dq blocks for many query
# rows, then those for few rows, and a counting sort of 16 entries a chunk)
SMALL_BWD = [
    {},
    {"DQ_BLOCKS": (2, 16, 16, 2), "DQ_MIN_PROGRAMS": 0, "DD_BLOCKS": (16, 2, 16, 2), "MAX_CHUNK": 16},
    {"DQ_BLOCKS_FEW_ROWS": (4, 2, 16, 1), "DQ_MIN_PROGRAMS": 10**9, "DD_BLOCKS": (2, 4, 16, 2), "MAX_CHUNK": 16},
]
SMALL_BWD_IDS = ["default-blocks", "small-blocks", "small-blocks-few-rows"]


@pytest.mark.parametrize("blocks", SMALL_BWD, ids=SMALL_BWD_IDS)
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalize"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_backward_kernels(layout, dtype, normalize, blocks, monkeypatch):
    """Triton ``dq``/``dd`` against the reference's autograd, with masks on both sides, in the input dtype."""
    for name, value in blocks.items():
        monkeypatch.setattr(backward, name, value)
    _, qb, db, lq, ld, dim = layout
    g = torch.Generator().manual_seed(37)
    q = random_tokens((*qb, lq, dim), dtype, generator=g)
    d = random_tokens((*db, ld, dim), dtype, generator=g)
    q_mask = torch.rand(*qb, lq, generator=g) > 0.3
    d_lengths = torch.randint(1, ld + 1, db, generator=g)
    weights = torch.rand(torch.broadcast_shapes(qb, db), generator=g) + 0.5
    kw = dict(q_mask=q_mask, d_lengths=d_lengths, normalize=normalize)
    ref_dq, ref_dd = _reference_grads(q, d, weights, **kw)
    dq, dd = _triton_grads(q, d, weights, **kw)
    assert_grads_close(dq, ref_dq, dtype=dtype)
    assert_grads_close(dd, ref_dd, dtype=dtype)
    assert bool((dq[~q_mask.expand(dq.shape[:-1])] == 0).all()), "masked query tokens get a gradient"


def test_backward_ties_route_to_the_first_winner_and_is_deterministic():
    """Integer tokens (many exact ties): the gradients equal the reference's exactly, run after run."""
    g = torch.Generator().manual_seed(41)
    q = integer_tokens((3, 1, 9, 16), torch.float32, generator=g)
    d = integer_tokens((1, 4, 21, 16), torch.float32, generator=g)
    weights = torch.arange(1.0, 13.0).view(3, 4)
    ref_dq, ref_dd = _reference_grads(q, d, weights)
    first = _triton_grads(q, d, weights)
    again = _triton_grads(q, d, weights)
    assert torch.equal(first[0].double(), ref_dq) and torch.equal(first[1].double(), ref_dd)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("max_chunk", [16, 1024])
def test_entries_by_token_is_a_stable_inversion(max_chunk, monkeypatch):
    """The counting sort of the ``dd`` kernel lists, per document token, exactly the query tokens that won
    it, in ascending ``qi * Lq + i`` order (several chunks per document, masked entries, hot tokens)."""
    monkeypatch.setattr(backward, "MAX_CHUNK", max_chunk)
    g = torch.Generator().manual_seed(43)
    P, Qn, Dn, Lq, Ld = 2, 5, 3, 13, 7
    argmax = torch.randint(-1, Ld, (P, Qn, Dn, Lq), generator=g, dtype=torch.int32)
    argmax[0, :, 1, :4] = 2  # a token won by many query tokens across chunks
    order, rows = backward._entries_by_token(argmax.to(DEVICE), Qn, Dn, Lq, Ld)
    order, (starts, counts) = order.cpu().long(), rows.cpu().long()
    for p in range(P):
        for n in range(Dn):
            won = argmax[p, :, n, :].reshape(-1)  # by u = qi * Lq + i
            for j in range(Ld):
                r = (p * Dn + n) * Ld + j
                want = torch.nonzero(won == j).flatten()
                assert torch.equal(order[starts[r] : starts[r] + counts[r]], want), (p, n, j)
    assert counts.sum() == int((argmax >= 0).sum())


@pytest.mark.parametrize("blocks", SMALL_BWD, ids=SMALL_BWD_IDS)
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalize"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_varlen_backward_kernels(dtype, normalize, blocks, monkeypatch):
    """All pairs of packed sequences: the Triton ``dq``/``dd`` against the reference's autograd (ragged
    lengths from 1 to 33 tokens, a long document, weights per pair), and bitwise equal run after run."""
    for name, value in blocks.items():
        monkeypatch.setattr(backward, name, value)
    g = torch.Generator().manual_seed(53)
    q, cu_q = ragged(g, [3, 1, 17], 20, dtype)
    d, cu_d = ragged(g, [4, 9, 1, 33], 20, dtype)
    weights = torch.rand(3, 4, generator=g) + 0.5
    qr, dr = (t.double().requires_grad_(True) for t in (q, d))
    (maxsim_varlen_reference(qr, cu_q, dr, cu_d, normalize=normalize)[0] * weights.double()).sum().backward()
    runs = []
    for _ in range(2):
        qd, dd = (t.to(DEVICE, copy=True).requires_grad_(True) for t in (q, d))
        cqd, cdd = to_dev(cu_q, cu_d)
        (maxsim.maxsim_varlen(qd, cqd, dd, cdd, normalize=normalize) * weights.to(DEVICE)).sum().backward()
        runs.append((qd.grad.cpu(), dd.grad.cpu()))
    assert_grads_close(runs[0][0], qr.grad, dtype=dtype)
    assert_grads_close(runs[0][1], dr.grad, dtype=dtype)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_varlen_gradients():
    g = torch.Generator().manual_seed(31)
    q, cu_q = ragged(g, [3, 5], 16, torch.float32)
    d, cu_d = ragged(g, [4, 9, 2], 16, torch.float32)
    grads = []
    for backend in ("triton", "torch"):
        qd, dd = (t.to(DEVICE).requires_grad_(True) for t in (q, d))
        cqd, cdd = to_dev(cu_q, cu_d)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MAXSIM_BACKEND", backend)
            scores = maxsim.maxsim_varlen(qd, cqd, dd, cdd)
        scores.sum().backward()
        grads.append((qd.grad.cpu(), dd.grad.cpu()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


@pytest.mark.parametrize("layout", ["padded", "varlen"])
def test_undefined_score_gradient_gives_none(layout):
    """A backward reached with no gradient for the scores (not materialized) returns no gradient."""
    g = torch.Generator().manual_seed(33)
    q, cu_q = ragged(g, [3, 5], 16, torch.float32)
    d, cu_d = ragged(g, [4, 9, 2], 16, torch.float32)
    qd, dd = (t.to(DEVICE).requires_grad_(True) for t in (q, d))
    if layout == "padded":
        scores = maxsim.maxsim(qd.view(2, 4, 16)[:, None], dd[:15].view(3, 5, 16)[None])
    else:
        cqd, cdd = to_dev(cu_q, cu_d)
        scores = maxsim.maxsim_varlen(qd, cqd, dd, cdd)
    (NoGradient.apply(scores).sum() + qd.sum()).backward()
    assert torch.equal(qd.grad.cpu(), torch.ones_like(q)) and dd.grad is None


@pytest.mark.parametrize("layout", ["padded", "varlen"])
def test_argmax_gradient_is_not_materialized(layout, monkeypatch):
    """Eager training (``ops.PaddedFunction`` / ``VarlenFunction``): the backward gets None for the argmax
    output, not a zeros tensor the size of the argmax built on every step."""
    from maxsim.backends.triton import ops

    function = ops.PaddedFunction if layout == "padded" else ops.VarlenFunction
    seen = record_argmax_gradients(monkeypatch, function)
    g = torch.Generator().manual_seed(32)
    q, cu_q = ragged(g, [3, 5], 16, torch.float32)
    d, cu_d = ragged(g, [4, 9, 2], 16, torch.float32)
    qd, dd = (t.to(DEVICE).requires_grad_(True) for t in (q, d))
    if layout == "padded":
        maxsim.maxsim(qd.view(2, 4, 16)[:, None], dd[:15].view(3, 5, 16)[None]).sum().backward()
    else:
        cqd, cdd = to_dev(cu_q, cu_d)
        maxsim.maxsim_varlen(qd, cqd, dd, cdd).sum().backward()
    assert seen == [None]
    assert qd.grad is not None and dd.grad is not None


def test_training_call_sees_in_place_changes():
    """Changing a tensor the call used in place before the backward raises autograd's usual error: no
    gradient computed from changed values."""
    g = torch.Generator().manual_seed(44)
    q = random_tokens((3, 1, 5, 16), torch.float32, generator=g).to(DEVICE).requires_grad_(True)
    d = random_tokens((1, 4, 7, 16), torch.float32, generator=g).to(DEVICE).requires_grad_(True)
    q_used = q * 1
    scores = maxsim.maxsim(q_used, d)
    q_used.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        scores.sum().backward()


def test_backend_selection():
    assert get_backend(torch.device(DEVICE)) is triton_backend
    # float64 goes to the torch backend (Triton has no float64 path)
    q = torch.randn(3, 8, dtype=torch.float64, device=DEVICE)
    d = torch.randn(2, 5, 8, dtype=torch.float64, device=DEVICE)
    assert maxsim.maxsim(q, d).dtype == torch.float64


def test_config_table_is_deterministic():
    dev = torch.device(DEVICE)
    a = configs.forward_config(dev, 32, 128, torch.float16)
    assert a == configs.forward_config(dev, 32, 128, torch.float16)
    assert configs.shape_class(32, 128, torch.float16) == "rerank"
    assert configs.shape_class(1024, 128, torch.bfloat16) == "flops"
    assert configs.shape_class(100, 1024, torch.float32) == "mid-wide-f32"
    assert configs.shape_class(32, 128, torch.int8) == "rerank-i8"
    assert configs.shape_class(32, 128, torch.float8_e4m3fn, queries=32) == "packed-f8"
    for cfg in configs.TABLE.values():
        for block in (cfg.block_q, cfg.block_l, cfg.block_d):
            assert block >= 16 and block & (block - 1) == 0


def _opcheck_cases():
    g = torch.Generator().manual_seed(37)
    q = random_tokens((2, 1, 5, 16), torch.float32, generator=g)
    d = random_tokens((2, 3, 7, 16), torch.float32, generator=g)
    d_mask = torch.rand(2, 3, 7, generator=g) < 0.7
    d_mask[..., 0] = True
    q_mask = torch.rand(2, 1, 5, generator=g) < 0.7
    d_lengths = torch.tensor([[7, 1, 4], [2, 6, 7]], dtype=torch.int32)
    qv, cu_q = ragged(g, [3, 5], 16, torch.float32)
    dv, cu_d = ragged(g, [4, 9, 2], 16, torch.float32)
    ids = (torch.tensor([0, 1, 1]), torch.tensor([2, 0, 1]))
    q, d, q_mask, d_mask, d_lengths, qv, cu_q, dv, cu_d = to_dev(q, d, q_mask, d_mask, d_lengths, qv, cu_q, dv, cu_d)
    ids = tuple(to_dev(*ids))
    return [
        ("fwd_padded", (q, d, None, None, None, False, True)),
        ("fwd_padded", (q.requires_grad_(), d.requires_grad_(), q_mask, d_mask, None, True, False)),
        ("fwd_padded", (q, d, q_mask, None, d_lengths, False, True)),
        ("fwd_varlen", (qv, cu_q, dv, cu_d, None, None, 5, 9, False, True)),
        ("fwd_varlen", (qv.requires_grad_(), cu_q, dv.requires_grad_(), cu_d, *ids, 5, 9, True, True)),
    ]


@pytest.mark.parametrize("case", range(5))
def test_opcheck(case):
    """``torch.library.opcheck``: schema, fake kernel, autograd registration, AOT dispatch."""
    name, args = _opcheck_cases()[case]
    torch.library.opcheck(getattr(torch.ops.maxsim, name).default, args)


@pytest.mark.parametrize("corpus", ["padded", "packed"])
def test_topk_through_the_kernels(corpus):
    """maxsim.topk streams its chunks through the Triton kernels: the same ids and scores as the full
    reference matrix, exactly, on integer tokens with duplicated documents (ties by lower id)."""
    g = torch.Generator().manual_seed(43)
    q = integer_tokens((3, 5, 16), torch.float32, generator=g)
    d = integer_tokens((6, 9, 16), torch.float32, generator=g)
    d = torch.cat([d, d[:3]])
    lengths = torch.randint(1, 10, (6,), generator=g)
    lengths = torch.cat([lengths, lengths[:3]])
    full, _ = maxsim_reference(q[:, None], d[None], d_mask=lengths_to_mask(lengths, 9)[None])
    order = torch.sort(full, dim=1, descending=True, stable=True)
    if corpus == "padded":
        scores, ids = maxsim.topk(*to_dev(q, d), 5, d_lengths=lengths.to(DEVICE), chunk=4)
    else:
        tokens = torch.cat([d[i, :n] for i, n in enumerate(lengths.tolist())])
        cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).int()])
        scores, ids = maxsim.topk(*to_dev(q, tokens), 5, cu_seqlens_d=cu.to(DEVICE), chunk=4)
    assert torch.equal(scores.cpu().double(), order.values[:, :5])
    assert torch.equal(ids.cpu(), order.indices[:, :5])


# Quantized documents (Index storage): int8 / float8_e4m3fn codes with a float32 scale per token, widened in
# registers. The reference scores the dequantized tokens in float64, so the float32 tolerance applies.
QUANT = (torch.int8, torch.float8_e4m3fn)
QUANT_CASES = [  # (config, n_split)
    pytest.param(None, None, id="default"),
    pytest.param(SMALL, 3, id="lane-max-split"),
    pytest.param(SMALL_TILE_MAX, None, id="tile-max"),
]


def _dequantized(codes, scales):
    return codes.double() * scales.double()[:, None]


@pytest.mark.parametrize("queries", ["wide", "quantized"])
@pytest.mark.parametrize("qdtype", QUANT, ids=dtype_id)
@pytest.mark.parametrize(("cfg", "n_split"), QUANT_CASES)
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalize"])
@pytest.mark.parametrize("dim", [1, 130])
def test_varlen_quantized_documents(dim, normalize, cfg, n_split, qdtype, queries):
    """Ragged queries and documents, odd D (one D chunk or several), all and listed pairs; the queries
    16-bit (the codes widened) or quantized too (``q_scales``: the dots on the int8 / float8 codes)."""
    from maxsim.index import quantize

    g = torch.Generator().manual_seed(53 + dim)
    q, cu_q = ragged(g, [3, 33, 1], dim, torch.float16)
    q[5] = 0  # a zero query token (scale 1, codes 0)
    d, cu_d = ragged(g, [1, 97, 40, 5, 18], dim, torch.float32, cu_dtype=torch.int64)
    codes, scales = quantize(d, qdtype, lengths=(cu_d[1:] - cu_d[:-1]).tolist())
    wide = _dequantized(codes, scales)
    q_kw, q_wide = {}, q.double()
    if queries == "quantized":
        q, q_scales = quantize(q.float(), qdtype, scale_tries=1)
        q_kw, q_wide = dict(q_scales=q_scales.to(DEVICE)), _dequantized(q, q_scales)
    for pairs in (None, (torch.tensor([0, 2, 1, 1]), torch.tensor([4, 0, 1, 3]))):
        pd = (None, None) if pairs is None else tuple(to_dev(*pairs))
        scores, argmax = maxsim_varlen_fwd(
            *to_dev(q, cu_q, codes, cu_d), *pd, max_lq=33, max_ld=97, normalize=normalize, return_argmax=True,
            config=cfg, n_split=n_split, d_scales=scales.to(DEVICE), **q_kw,
        )  # fmt: skip
        ref, ref_argmax = maxsim_varlen_reference(q_wide, cu_q, wide, cu_d, pairs=pairs, normalize=normalize)
        assert_scores_close(scores, ref, dtype=qdtype if queries == "quantized" else torch.float32)
        assert torch.equal(argmax.cpu() < 0, ref_argmax < 0)


@pytest.mark.parametrize("queries", ["wide", "quantized"])
@pytest.mark.parametrize("qdtype", QUANT, ids=dtype_id)
@pytest.mark.parametrize(("cfg", "n_split"), QUANT_CASES)
def test_varlen_quantized_ties_exact(cfg, n_split, qdtype, queries):
    """Integer codes with power-of-two scales (the queries' too, when quantized): every product exact, so
    scores and argmax (the first of many tied tokens) equal the reference's exactly. A NaN e4m3 code winning
    as the first NaN is checked on a GPU only (test_gpu.py): the interpreter widens e4m3fn's NaN code 0x7F
    to 480."""
    g = torch.Generator().manual_seed(59)
    q = integer_tokens((22, 24), torch.float16, generator=g)
    q_kw, q_wide = {}, q.double()
    if queries == "quantized":
        q_scales = 2.0 ** torch.randint(-2, 3, (22,), generator=g).float()
        q = q.to(qdtype)
        q_kw, q_wide = dict(q_scales=q_scales.to(DEVICE)), _dequantized(q, q_scales)
    codes = integer_tokens((104, 24), torch.float32, generator=g, low=-3, high=4)
    scales = 2.0 ** torch.randint(-3, 2, (104,), generator=g).float()
    scales[40:50] = 0.5  # a run of equal scales: duplicated tokens tie exactly
    codes[40:45] = codes[45:50]
    codes = codes.to(qdtype)
    cu_q = torch.tensor([0, 2, 22], dtype=torch.int32)
    cu_d = torch.tensor([0, 1, 71, 104], dtype=torch.int32)
    scores, argmax = maxsim_varlen_fwd(
        *to_dev(q, cu_q, codes, cu_d), None, None, max_lq=20, max_ld=70, normalize=False, return_argmax=True,
        config=cfg, n_split=n_split, d_scales=scales.to(DEVICE), **q_kw,
    )  # fmt: skip
    ref, ref_argmax = maxsim_varlen_reference(q_wide, cu_q, _dequantized(codes, scales), cu_d)
    assert torch.equal(scores.cpu().double(), ref)
    assert torch.equal(argmax.cpu(), ref_argmax)


@pytest.mark.parametrize(
    "cfg",
    [
        pytest.param(configs.FwdConfig(block_q=16, block_l=16, block_d=256, num_stages=1), id="one-d-tile"),
        pytest.param(SMALL_TILE_MAX, id="d-tiles"),
    ],
)
def test_varlen_int8_extreme_sums_exact(cfg):
    """int8 codes times codes at D=256: the int32 sums reach 2**22 (-128 * -128 everywhere) and -4161536
    (-128 * 127); converted to float32 exactly in one D tile (by their bits) and in several (a conversion)."""
    rows = torch.tensor([-128, 127, 1, 0, -1], dtype=torch.float32)[:, None].expand(5, 256).clone()
    rows[4, ::2] = 127  # alternating 127 / -1
    q_scales = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.25])
    d_scales = torch.tensor([2.0, 1.0, 0.125, 4.0, 1.0])
    q, d = rows.to(torch.int8), rows.flip(0).to(torch.int8)
    cu_q = torch.tensor([0, 2, 5], dtype=torch.int32)
    cu_d = torch.tensor([0, 1, 3, 4, 5], dtype=torch.int32)  # the last document: the -128 token alone
    scores, argmax = maxsim_varlen_fwd(
        *to_dev(q, cu_q, d, cu_d), None, None, max_lq=3, max_ld=2, normalize=False, return_argmax=True,
        config=cfg, d_scales=d_scales.to(DEVICE), q_scales=q_scales.to(DEVICE),
    )  # fmt: skip
    ref, ref_argmax = maxsim_varlen_reference(_dequantized(q, q_scales), cu_q, _dequantized(d, d_scales), cu_d)
    # both extremes are maxima against the last document: query 0's tokens -128 (scale 1) and 127 (scale 0.5)
    assert ref[0, 3] == (2**22 - 127 * 128 * 256 * 0.5) * d_scales[4]
    assert torch.equal(scores.cpu().double(), ref)
    assert torch.equal(argmax.cpu(), ref_argmax)


@pytest.mark.parametrize("quantize_queries", [False, None], ids=["wide-queries", "default"])
@pytest.mark.parametrize("qdtype", QUANT, ids=dtype_id)
def test_index_search_reads_quantized_tokens(qdtype, quantize_queries, monkeypatch):
    """Index.search on the Triton backend hands the stored codes and scales to the kernel (nothing widened
    into memory): the reference's top-k over the dequantized tokens, with query lengths and duplicated
    documents (equal scores by lower id). By default (the kernels take codes here) the queries are quantized
    too: the reference then scores the dequantized query codes."""
    from maxsim import index as index_module

    widened = []
    monkeypatch.setattr(index_module, "dequantize", lambda *a: widened.append(a) or 1 / 0)
    g = torch.Generator().manual_seed(61)
    lengths = torch.randint(1, 30, (12,), generator=g).tolist()
    docs = [random_tokens((n, 40), torch.float32, generator=g) for n in lengths]
    docs += docs[:3]
    ids = torch.arange(15) * 3 + 1
    index = maxsim.Index(40, qdtype, device=DEVICE)
    index.add(docs, ids=ids)
    q = random_tokens((3, 9, 40), torch.float16, generator=g)
    q_lengths = torch.tensor([9, 4, 1])
    scores, got = index.search(
        q.to(DEVICE), 6, q_lengths=q_lengths.to(DEVICE), chunk=4, quantize_queries=quantize_queries
    )
    assert not widened
    assert triton_backend.dots_quantized(q.to(DEVICE), index.tokens)  # the interpreter, an sm_90 GPU
    q_scored = q.double()
    if quantize_queries is None:
        q_scored = _dequantized(*index_module.quantize(q.reshape(-1, 40), qdtype, scale_tries=1)).view(q.shape)
    wide = _dequantized(index.tokens.cpu(), index.scales.cpu())
    cu = index.offsets.cpu()
    spans = list(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True))
    full = torch.tensor([
        [maxsim_reference(q_scored[i, :n], wide[a:b])[0].item() for a, b in spans]
        for i, n in enumerate(q_lengths.tolist())
    ], dtype=torch.float64)  # fmt: skip
    order = torch.sort(full, dim=1, descending=True, stable=True)
    assert torch.equal(got.cpu(), ids[order.indices[:, :6]])
    assert_scores_close(scores, order.values[:, :6], dtype=qdtype if quantize_queries is None else torch.float32)
    one_scores, one_ids = index.search(q[0].to(DEVICE), 6, quantize_queries=quantize_queries)
    assert torch.equal(one_ids, got[0])
    if qdtype == torch.float8_e4m3fn and quantize_queries is None and DEVICE == "cuda":
        # float8 codes times codes: the tensor cores' sums differ in the last bits between one query's launch
        # and three queries' (other tile shapes; 4e-5 relative measured on an H100)
        assert_scores_close(one_scores, scores[0], dtype=qdtype)
    else:
        assert torch.equal(one_scores, scores[0])


def test_quantized_bad_input():
    g = torch.Generator().manual_seed(67)
    q, cu_q = ragged(g, [3], 16, torch.float16)
    d, cu_d = ragged(g, [5, 2], 16, torch.float16)
    codes = d.to(torch.int8)
    scales = torch.ones(7)
    kw = dict(max_lq=3, max_ld=5, normalize=False, return_argmax=False)
    q, cu_q, d, cu_d, codes, scales = to_dev(q, cu_q, d, cu_d, codes, scales)
    with pytest.raises(ValueError, match="d of dtype int8 needs d_scales"):
        maxsim_varlen_fwd(q, cu_q, codes, cu_d, None, None, **kw)
    with pytest.raises(ValueError, match=r"d_scales must be float32 \[7\]"):
        maxsim_varlen_fwd(q, cu_q, codes, cu_d, None, None, **kw, d_scales=scales[:6])
    with pytest.raises(ValueError, match=r"d_scales must be float32"):
        maxsim_varlen_fwd(q, cu_q, codes, cu_d, None, None, **kw, d_scales=scales.half())
    with pytest.raises(TypeError, match="d must have dtype int8, float8_e4m3fn with d_scales"):
        maxsim_varlen_fwd(q, cu_q, d, cu_d, None, None, **kw, d_scales=scales)
    with pytest.raises(TypeError, match="q must be float16 or bfloat16 with quantized d"):
        maxsim_varlen_fwd(q.float(), cu_q, codes, cu_d, None, None, **kw, d_scales=scales)
    with pytest.raises(TypeError, match="d_scales must be a torch.Tensor"):
        maxsim_varlen_fwd(q, cu_q, codes, cu_d, None, None, **kw, d_scales=[1.0] * 7)
    q_codes, q_scales = q.to(torch.int8), torch.ones(3, device=q.device)
    with pytest.raises(TypeError, match="q with q_scales must have d's dtype int8"):
        maxsim_varlen_fwd(q, cu_q, codes, cu_d, None, None, **kw, d_scales=scales, q_scales=q_scales)
    with pytest.raises(ValueError, match=r"q_scales must be float32 \[3\]"):
        maxsim_varlen_fwd(q_codes, cu_q, codes, cu_d, None, None, **kw, d_scales=scales, q_scales=q_scales[:2])
    with pytest.raises(TypeError, match="only with quantized documents and d_scales"):
        maxsim_varlen_fwd(q_codes, cu_q, codes, cu_d, None, None, **kw, q_scales=q_scales)


@pytest.mark.parametrize("qdtype", QUANT, ids=dtype_id)
@pytest.mark.parametrize("wide", [torch.float16, torch.bfloat16, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("dim", [1, 7, 128, 200])
def test_quantize_queries_matches_index_quantize(dim, wide, qdtype):
    """The backend's one-launch query quantization gives ``index.quantize(..., scale_tries=1)``'s codes
    exactly and its scales (int8 exactly; e4m3 to float32 rounding: the refit's dot is summed in another
    order), on strided rows, with zero tokens (scale 1; int8: the unit of its grid) and tokens with NaN / inf
    (scale NaN)."""
    from maxsim.index import int8_scale_bits, quantize

    g = torch.Generator().manual_seed(61 + dim)
    x = (torch.randn(33, dim + 3, generator=g) * torch.logspace(-3, 3, 33)[:, None]).to(wide)[:, 1 : dim + 1]
    x[4], x[9, 0], x[11, -1] = 0.0, float("nan"), float("-inf")
    codes, scales = triton_backend.quantize_queries(x.to(DEVICE), qdtype)
    want_codes, want_scales = quantize(x, qdtype, scale_tries=1)
    finite = want_scales.isfinite()
    assert codes.dtype == qdtype and codes.shape == x.shape and scales.dtype == torch.float32
    assert torch.equal(codes.cpu()[finite].float(), want_codes[finite].float())  # -0 and 0 alike
    zero_scale = 2.0 ** -int8_scale_bits(dim) if qdtype == torch.int8 else 1.0  # int8: its own grid's unit
    assert torch.equal(scales.cpu().isnan(), ~finite) and finite.sum() == 31 and scales[4] == zero_scale
    rtol = 0 if qdtype == torch.int8 else 2 * dim * torch.finfo(torch.float32).eps  # two orders of a sum
    torch.testing.assert_close(scales.cpu()[finite], want_scales[finite], rtol=rtol, atol=0)
    empty_codes, empty_scales = triton_backend.quantize_queries(x[:0].to(DEVICE), qdtype)
    assert empty_codes.shape == (0, dim) and empty_scales.shape == (0,)
