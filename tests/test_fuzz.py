"""Seeded fuzz: random layouts, masks, sizes, dtypes and memory budgets against the reference.

Each case is built from one integer seed, so a failure names its seed and the case, and
``run_padded_case(seed)`` / ``run_varlen_case(seed)`` replays it alone::

    python -c "import sys; sys.path.insert(0, 'tests'); import test_fuzz; test_fuzz.run_padded_case(123)"

Scores follow the one tolerance rule (helpers.assert_scores_close). The argmax is compared exactly where it
is meaningful: integer-valued tokens without normalization (exact in every dtype, ties included: the first
winner), and every token whose winner is clear. Elsewhere (random values, normalize) two document tokens can
tie within float32 rounding, and the reported winner must then be one of them: its float64 similarity must
equal the best one under the same tolerance rule.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DTYPES,
    LOW_PRECISION,
    assert_scores_close,
    dtype_id,
    integer_tokens,
    naive_scores,
    random_tokens,
)

import maxsim
from maxsim.reference import lengths_to_mask, maxsim_reference, maxsim_varlen_reference

PADDED_BATCHES, PADDED_PER_BATCH = 8, 100  # 800 cases
VARLEN_BATCHES, VARLEN_PER_BATCH = 4, 60  # 240 cases
VARLEN_SEED0 = 1_000_000  # varlen seeds never collide with padded ones
LAYOUTS = ("query-vs-corpus", "pairs", "candidates", "all-pairs", "extra-dims")
SPECIAL_DIMS = (1, 2, 15, 16, 17, 33, 96, 127, 128, 130, 140)


def _tokens_count(rng: random.Random, high: int = 70) -> int:
    """Token counts: 1 often (the edge), otherwise anything up to ``high`` (mostly not a multiple of 16)."""
    return 1 if rng.random() < 0.15 else rng.randint(1, high)


def _dim(rng: random.Random) -> int:
    return rng.choice(SPECIAL_DIMS) if rng.random() < 0.4 else rng.randint(1, 140)


def _budget(rng: random.Random, work_bytes: int) -> int | None:
    """None (the default) or a small MAXSIM_MEMORY_BUDGET that cuts the work into about 1 to 64 blocks."""
    if rng.random() < 0.4:
        return None
    if rng.random() < 0.1:
        return 1  # the smallest: every axis cut to 1 where the backend can
    return max(1, int(work_bytes / 2 ** rng.uniform(0, 6)))


def _batch_shapes(rng: random.Random, layout: str) -> tuple[tuple, tuple]:
    n = lambda: rng.randint(1, 5)  # noqa: E731
    if layout == "query-vs-corpus":
        return (), (n(),)
    if layout == "pairs":
        b = n()
        return (b,), (b,)
    if layout == "candidates":
        return (b := n(), 1), (b, n())
    if layout == "all-pairs":
        return (n(), 1), (1, n())
    # extra leading dims: each paired, q-only, d-only or unit; leading unit dims dropped on either side
    q_batch, d_batch = [], []
    for _ in range(rng.randint(1, 3)):
        kind, size = rng.choice(("paired", "q", "d", "unit")), rng.randint(2, 3)
        q_batch.append(size if kind in ("paired", "q") else 1)
        d_batch.append(size if kind in ("paired", "d") else 1)
    for batch in (q_batch, d_batch):
        while batch and batch[0] == 1 and rng.random() < 0.5:
            batch.pop(0)
    return tuple(q_batch), tuple(d_batch)


def _make_tokens(shape, *, dtype, generator, integer: bool, normalize: bool, strided: bool) -> torch.Tensor:
    """Random or small-integer tokens ``shape``; ``strided``: a view of every other feature of a wider tensor."""
    make = integer_tokens if integer else random_tokens
    wide = (*shape[:-1], 2 * shape[-1]) if strided else shape
    x = make(wide, dtype, generator=generator)
    x = x[..., ::2] if strided else x
    if integer and normalize and dtype in LOW_PRECISION:
        # F.normalize in float16/bfloat16 turns a zero token into NaN (its eps 1e-12 rounds to 0 there), which
        # leaves the in-dtype baseline of the tolerance rule undefined; float32 keeps its zero tokens
        x[(x == 0).all(dim=-1)] = 1
    return x


def _side_mask(rng: random.Random, g: torch.Generator, batch: tuple, length: int, side: str, document: bool):
    """A mask or lengths for one side, shaped over a broadcastable part of its own batch dims."""
    form = rng.choice(("none", "mask", "lengths"))
    if form == "none":
        return {}, None
    shape = [size if rng.random() < 0.7 else 1 for size in batch]
    shape = shape[rng.randint(0, len(shape)) :]  # leading dims may be left to broadcasting
    if form == "lengths":
        dtype = rng.choice((torch.int64, torch.int32))
        lengths = torch.randint(1, length + 1, shape, generator=g).to(dtype)
        return {f"{side}_lengths": lengths}, lengths_to_mask(lengths, length)
    mask = torch.rand((*shape, length), generator=g) < rng.uniform(0.2, 0.9)
    if document:  # every document keeps a real token
        mask[..., torch.randint(0, length, (), generator=g)] = True
    return {f"{side}_mask": mask}, mask


def _describe(kwargs: dict) -> str:
    parts = []
    for name, value in kwargs.items():
        parts.append(f"{name}{list(value.shape)}" if isinstance(value, torch.Tensor) else f"{name}={value}")
    return " ".join(parts)


def _check_argmax(argmax, ref_argmax, q, d, d_mask, normalize: bool, exact: bool) -> None:
    """``argmax [..., Lq]`` against the reference's, for ``q [..., Lq, D]`` and ``d [..., Ld, D]``."""
    assert argmax.dtype == torch.int32, f"argmax dtype {argmax.dtype}"
    assert argmax.shape == ref_argmax.shape, (
        f"argmax shape {tuple(argmax.shape)} != {tuple(ref_argmax.shape)}"
    )
    if exact:
        assert torch.equal(argmax, ref_argmax), "argmax differs from the reference"
        return
    assert torch.equal(argmax == -1, ref_argmax == -1), "argmax -1 (masked query tokens) differs"
    differ = argmax != ref_argmax
    if not bool(differ.any()):
        return
    q, d = q.double(), d.double()
    if normalize:
        q, d = F.normalize(q, dim=-1), F.normalize(d, dim=-1)
    sim = q @ d.transpose(-1, -2)  # [..., Lq, Ld]
    sim = sim.expand(*argmax.shape, sim.shape[-1])
    ours = sim.gather(-1, argmax.long().clamp(min=0)[..., None])[..., 0]
    best = sim.gather(-1, ref_argmax.long().clamp(min=0)[..., None])[..., 0]
    assert 0 <= int(argmax[differ].min()) and int(argmax[differ].max()) < sim.shape[-1], "argmax out of range"
    if d_mask is not None:
        real = (
            d_mask[..., None, :].expand(sim.shape).gather(-1, argmax.long().clamp(min=0)[..., None])[..., 0]
        )
        assert bool(real[differ].all()), "argmax points at a masked document token"
    # a different winner is only allowed as a tie within float32 rounding
    assert_scores_close(ours[differ], best[differ], dtype=torch.float32)


def _replay_hint(kind: str, seed: int) -> str:
    return (
        f"replay: python -c \"import sys; sys.path.insert(0, 'tests'); import test_fuzz; "
        f'test_fuzz.run_{kind}_case({seed})"'
    )


def padded_case(seed: int) -> dict:
    """The inputs of one random ``maxsim.maxsim`` call and its description, all from ``seed``."""
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    layout = rng.choice(LAYOUTS)
    q_batch, d_batch = _batch_shapes(rng, layout)
    lq, ld, dim = _tokens_count(rng), _tokens_count(rng), _dim(rng)
    dtype = rng.choice(DTYPES)
    integer = rng.random() < 0.3
    normalize = rng.random() < 0.4
    return_argmax = rng.random() < 0.6
    strided = rng.random() < 0.2
    options = dict(dtype=dtype, generator=g, integer=integer, normalize=normalize, strided=strided)
    q, d = _make_tokens((*q_batch, lq, dim), **options), _make_tokens((*d_batch, ld, dim), **options)
    q_kwargs, q_mask = _side_mask(rng, g, q_batch, lq, "q", document=False)
    d_kwargs, d_mask = _side_mask(rng, g, d_batch, ld, "d", document=True)
    kwargs = {**q_kwargs, **d_kwargs, "normalize": normalize, "return_argmax": return_argmax}
    pairs = torch.broadcast_shapes(q_batch, d_batch).numel()
    budget = _budget(rng, 4 * pairs * (3 * lq * ld + (lq + ld) * dim))
    description = (
        f"seed={seed} {layout} q{list(q.shape)} d{list(d.shape)} {dtype_id(dtype)}"
        f"{' integer' if integer else ''}{' strided' if strided else ''} {_describe(kwargs)} budget={budget}"
    )
    return dict(
        layout=layout, q=q, d=d, lq=lq, ld=ld, dim=dim, dtype=dtype, integer=integer, normalize=normalize,
        return_argmax=return_argmax, q_mask=q_mask, d_mask=d_mask, kwargs=kwargs, budget=budget,
        description=description,
    )  # fmt: skip


def run_padded_case(seed: int) -> str:
    """One random ``maxsim.maxsim`` call against the reference; returns its description."""
    case = padded_case(seed)
    q, d, kwargs, budget = case["q"], case["d"], case["kwargs"], case["budget"]
    q_mask, d_mask, normalize, dtype = case["q_mask"], case["d_mask"], case["normalize"], case["dtype"]
    integer, return_argmax, description = case["integer"], case["return_argmax"], case["description"]
    try:
        with pytest.MonkeyPatch.context() as env:
            env.delenv("MAXSIM_BACKEND", raising=False)
            if budget is None:
                env.delenv("MAXSIM_MEMORY_BUDGET", raising=False)
            else:
                env.setenv("MAXSIM_MEMORY_BUDGET", str(budget))
            out = maxsim.maxsim(q, d, **kwargs)
        scores, argmax = out if return_argmax else (out, None)
        ref, ref_argmax = maxsim_reference(q, d, q_mask=q_mask, d_mask=d_mask, normalize=normalize)
        assert scores.dtype == torch.float32, f"scores dtype {scores.dtype}"
        if integer and not normalize:  # exact sums of small integers
            assert torch.equal(scores.double(), ref), "integer-valued scores differ from the reference"
        else:
            naive = naive_scores(q, d, q_mask=q_mask, d_mask=d_mask, normalize=normalize)
            assert_scores_close(scores, ref, dtype=dtype, naive=naive)
        if return_argmax:
            _check_argmax(argmax, ref_argmax, q, d, d_mask, normalize, exact=integer and not normalize)
    except Exception as error:  # any failure, the library's own errors included, names its case
        raise AssertionError(f"{description}\n{error!r}\n{_replay_hint('padded', seed)}") from error
    return description


def _cu(lengths: list[int], dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=dtype)


def run_varlen_case(seed: int) -> str:
    """One random ``maxsim.maxsim_varlen`` call (all pairs or listed pairs) against the reference."""
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    q_lens = [_tokens_count(rng) for _ in range(rng.randint(1, 6))]
    d_lens = [_tokens_count(rng) for _ in range(rng.randint(1, 8))]
    dim, dtype = _dim(rng), rng.choice(DTYPES)
    integer = rng.random() < 0.3
    normalize = rng.random() < 0.4
    return_argmax = rng.random() < 0.6
    options = dict(dtype=dtype, generator=g, integer=integer, normalize=normalize, strided=False)
    q, d = _make_tokens((sum(q_lens), dim), **options), _make_tokens((sum(d_lens), dim), **options)
    cu_q, cu_d = (
        _cu(q_lens, rng.choice((torch.int32, torch.int64))),
        _cu(d_lens, rng.choice((torch.int32, torch.int64))),
    )
    nq, nd = len(q_lens), len(d_lens)
    pairs = None
    if rng.random() < 0.5:  # listed pairs, repeats allowed, sometimes none
        count = rng.randint(0, 12)
        ids_dtype = rng.choice((torch.int64, torch.int32))
        pairs = (
            torch.randint(0, nq, (count,), generator=g).to(ids_dtype),
            torch.randint(0, nd, (count,), generator=g).to(ids_dtype),
        )
    kwargs = {"pairs": pairs, "normalize": normalize, "return_argmax": return_argmax}
    if rng.random() < 0.5:  # given as Python ints (as compiled code does), sometimes above the longest
        kwargs["max_seqlen_q"] = max(q_lens) + rng.choice((0, 0, 1, 5))
        kwargs["max_seqlen_d"] = max(d_lens) + rng.choice((0, 0, 3))
    n_pairs = nq * nd if pairs is None else len(pairs[0])
    lq, ld = max(q_lens), max(d_lens)
    budget = _budget(rng, 4 * max(n_pairs, 1) * (3 * lq * ld + (lq + ld) * dim))
    shown = {k: v for k, v in kwargs.items() if k != "pairs"}
    description = (
        f"seed={seed} varlen q_lens={q_lens} d_lens={d_lens} D={dim} {dtype_id(dtype)}"
        f"{' integer' if integer else ''} pairs={'all' if pairs is None else len(pairs[0])} "
        f"{_describe(shown)} budget={budget}"
    )
    try:
        with pytest.MonkeyPatch.context() as env:
            env.delenv("MAXSIM_BACKEND", raising=False)
            if budget is None:
                env.delenv("MAXSIM_MEMORY_BUDGET", raising=False)
            else:
                env.setenv("MAXSIM_MEMORY_BUDGET", str(budget))
            out = maxsim.maxsim_varlen(q, cu_q, d, cu_d, **kwargs)
        scores, argmax = out if return_argmax else (out, None)
        ref, ref_argmax = maxsim_varlen_reference(q, cu_q, d, cu_d, pairs=pairs, normalize=normalize)
        assert scores.dtype == torch.float32, f"scores dtype {scores.dtype}"
        q_ids, d_ids = (
            (torch.arange(nq).repeat_interleave(nd), torch.arange(nd).repeat(nq)) if pairs is None else pairs
        )
        segments = [
            (q[cu_q[i] : cu_q[i + 1]], d[cu_d[j] : cu_d[j + 1]])
            for i, j in zip(q_ids.tolist(), d_ids.tolist(), strict=True)
        ]
        if integer and not normalize:
            assert torch.equal(scores.double(), ref), "integer-valued scores differ from the reference"
        else:
            naive = [naive_scores(qs, ds, normalize=normalize) for qs, ds in segments]
            naive = torch.stack(naive).reshape(ref.shape) if naive else ref.float()
            assert_scores_close(scores, ref, dtype=dtype, naive=naive)
        if return_argmax:
            width = kwargs.get("max_seqlen_q", max(q_lens))
            assert argmax.shape == (*ref.shape, width), f"argmax shape {tuple(argmax.shape)}, width {width}"
            assert bool((argmax[..., ref_argmax.shape[-1] :] == -1).all()), (
                "argmax beyond the queries is not -1"
            )
            argmax = argmax[..., : ref_argmax.shape[-1]].reshape(-1, ref_argmax.shape[-1])
            ref_argmax = ref_argmax.reshape(-1, ref_argmax.shape[-1])
            for row, (qs, ds) in enumerate(segments):  # per pair: the query's own tokens, -1 beyond them
                length = qs.shape[0]
                assert bool((argmax[row, length:] == -1).all()), (
                    f"pair {row}: argmax beyond the query is not -1"
                )
                _check_argmax(
                    argmax[row, :length],
                    ref_argmax[row, :length],
                    qs,
                    ds,
                    None,
                    normalize,
                    exact=integer and not normalize,
                )
    except Exception as error:
        raise AssertionError(f"{description}\n{error!r}\n{_replay_hint('varlen', seed)}") from error
    return description


@pytest.mark.parametrize("batch", range(PADDED_BATCHES), ids=lambda b: f"padded-batch{b}")
def test_fuzz_padded(batch):
    for seed in range(batch * PADDED_PER_BATCH, (batch + 1) * PADDED_PER_BATCH):
        run_padded_case(seed)


@pytest.mark.parametrize("batch", range(VARLEN_BATCHES), ids=lambda b: f"varlen-batch{b}")
def test_fuzz_varlen(batch):
    first = VARLEN_SEED0 + batch * VARLEN_PER_BATCH
    for seed in range(first, first + VARLEN_PER_BATCH):
        run_varlen_case(seed)


def test_fuzz_covers_what_it_claims():
    """The padded cases reach every layout, dtype, mask form, unit sizes and the chunking paths."""
    cases = [padded_case(seed) for seed in range(PADDED_BATCHES * PADDED_PER_BATCH)]
    seen = " ".join(case["description"] for case in cases)
    words = (*LAYOUTS, *map(dtype_id, DTYPES), "integer", "strided", "normalize=True", "return_argmax=True")
    for word in (*words, "q_mask", "d_mask", "q_lengths", "d_lengths", "budget=None", "budget=1 "):
        assert word in seen, f"no fuzz case with {word!r}"
    assert {1, 70} <= {case[name] for case in cases for name in ("lq", "ld")}
    assert {1, 140} <= {case["dim"] for case in cases} and any(case["dim"] % 16 for case in cases)
    assert sum(1 < (case["budget"] or 0) < 2**16 for case in cases) > 100, "too few small memory budgets"
    assert sum(case["integer"] and case["return_argmax"] and not case["normalize"] for case in cases) > 50
