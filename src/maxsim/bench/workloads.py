"""The one registry of named benchmark workloads, and the inputs each one builds.

A workload is a layout plus sizes. ``Workload.build(device, dtype, scale)`` makes a :class:`Case`: the
input tensors (seeded, L2-normalized tokens as ColBERT-style encoders emit them), the sizes actually used,
the bytes and FLOPs the floors are computed from, and a way to cut the first rows out for the reference
check.

Layouts (``Inputs.layout``) and the canonical output every provider returns:

=============  ============================================================  ==============
``candidates``  ``q [B, Lq, D]`` (called as ``q[:, None]``), ``d [B, C, Ld, D]``  ``[B, C]``
``corpus``      one query ``q [Lq, D]`` against ``d [N, Ld, D]``                   ``[N]``
``varlen``      one query ``q [Lq, D]``, packed ``d [T, D]`` with ``cu_seqlens_d``  ``[N]``
``padded``      one query ``q [Lq, D]``, ``d [N, Lmax, D]`` with ``d_lengths [N]``  ``[N]``
``all_pairs``   ``q [Nq, Lq, D]`` (``q[:, None]``) against ``d [Nd, Ld, D]`` (``d[None]``)  ``[Nq, Nd]``
=============  ============================================================  ==============

``scale`` multiplies the number of scored (query, document) pairs: the batch/document counts of every
layout (for ``all_pairs`` each side by ``sqrt(scale)``), never the token lengths or ``D``. Workloads marked
``fixed_size`` (the CPU bar) ignore it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

DIM = 128

LAYOUTS = ("candidates", "corpus", "varlen", "padded", "all_pairs")


@dataclass
class Inputs:
    """The tensors of one workload instance (or of the first rows of one, for the reference check).

    Attributes:
        layout: one of ``LAYOUTS``.
        q: query tokens: ``[B, Lq, D]`` (candidates), ``[Lq, D]`` (corpus/varlen/padded), ``[Nq, Lq, D]``
            (all_pairs).
        d: document tokens: ``[B, C, Ld, D]``, ``[N, Ld, D]``, packed ``[T, D]`` (varlen),
            ``[N, Lmax, D]`` (padded), ``[Nd, Ld, D]`` (all_pairs).
        d_lengths: int64 ``[N]`` real lengths (padded, and varlen's segment lengths), on the device.
        cu_seqlens_q, cu_seqlens_d: int32 offsets (varlen).
        max_seqlen_q, max_seqlen_d: Python ints (varlen, padded).
        lengths: the document lengths as a host list (varlen, padded).
        train: forward + backward of ``scores.sum()``; ``q`` and ``d`` are leaves that require grad.
    """

    layout: str
    q: torch.Tensor
    d: torch.Tensor
    d_lengths: torch.Tensor | None = None
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_d: torch.Tensor | None = None
    max_seqlen_q: int | None = None
    max_seqlen_d: int | None = None
    lengths: list[int] | None = None
    train: bool = False

    @property
    def rows(self) -> int:
        """How many rows the first axis of the output has (what ``head`` cuts)."""
        if self.layout in ("candidates", "all_pairs"):
            return self.q.shape[0]
        if self.layout == "varlen":
            return self.cu_seqlens_d.shape[0] - 1
        return self.d.shape[0]

    def head(self, k: int) -> Inputs:
        """The same problem restricted to the first ``k`` output rows (detached, no grad)."""
        q, d = self.q.detach(), self.d.detach()
        if self.layout == "candidates":
            return Inputs(self.layout, q[:k], d[:k])
        if self.layout == "all_pairs":
            return Inputs(self.layout, q[:k], d)
        if self.layout == "corpus":
            return Inputs(self.layout, q, d[:k])
        if self.layout == "padded":
            lengths = self.lengths[:k]
            return Inputs(
                self.layout, q, d[:k], d_lengths=self.d_lengths[:k], lengths=lengths,
                max_seqlen_q=self.max_seqlen_q, max_seqlen_d=max(lengths),
            )  # fmt: skip
        cu = self.cu_seqlens_d[: k + 1]
        lengths = self.lengths[:k]
        return Inputs(
            self.layout, q, d[: sum(lengths)], d_lengths=self.d_lengths[:k], cu_seqlens_q=self.cu_seqlens_q,
            cu_seqlens_d=cu, max_seqlen_q=self.max_seqlen_q, max_seqlen_d=max(lengths), lengths=lengths,
        )  # fmt: skip


@dataclass
class Case:
    """One built workload: inputs plus what the floors and the report need.

    Attributes:
        name: workload name; ``layout``: its layout; ``dims``: the sizes used (after ``scale``).
        shape_id: readable id, e.g. ``B32-C10-Lq32-Ld180-D128``.
        bytes_given: bytes of the inputs as the call gets them (padding included), each distinct token once.
        bytes_real: bytes of the real (unpadded) tokens.
        flops: ``2 * sum over scored pairs of Lq * Ld * D``, real tokens only (forward).
        pairs: number of scored (query, document) pairs.
    """

    name: str
    layout: str
    dims: dict
    shape_id: str
    dtype: torch.dtype
    inputs: Inputs
    bytes_given: int
    bytes_real: int
    flops: int
    pairs: int
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Bar:
    """A target from the issues, checked on a full-size run of its workload (see ``runner.evaluate_bars``).

    Attributes:
        metric: what of the ``maxsim`` row is compared: ``ms`` (its median), ``x_floor``, ``x_floor_real``,
            ``matmul_fraction`` (TFLOP/s over the run's matmul rate), ``speedup:<provider>`` (that provider's ms
            over maxsim's; ``speedup:*`` = every baseline timed in the entry), ``mem_ratio:<provider>``
            (maxsim's peak extra memory over that provider's) or ``peak_mem_budget`` (peak extra memory over
            the torch backend's memory budget).
        op: ``<=`` or ``>=``.
        value: the target.
        device: device type the bar is about.
        methods: timing methods it is read from.
        dtypes: input dtypes it holds for (None = any).
        text: the wording of the issue.
    """

    metric: str
    op: str
    value: float
    device: str
    methods: tuple[str, ...]
    dtypes: tuple[str, ...] | None
    text: str


_GPU16 = ("float16", "bfloat16")
_GPU_PEERS = ("flash-maxsim", "late-interaction-kernels")


def _gpu_bar(metric: str, op: str, value: float, text: str, methods=("cold",), dtypes=_GPU16) -> Bar:
    return Bar(metric, op, value, "cuda", methods, dtypes, text)


def _never_slower() -> tuple[Bar, ...]:
    text = "never slower than naive, torch.compile, flash-maxsim or late-interaction-kernels (issue 4)"
    return (_gpu_bar("speedup:*", ">=", 1.0, text),)


def _per_peer(metric: str, op: str, value: float, text: str, **kw) -> tuple[Bar, ...]:
    """The bar ``<metric>:<peer>`` for each GPU peer."""
    return tuple(_gpu_bar(f"{metric}:{peer}", op, value, text, **kw) for peer in _GPU_PEERS)


def _train_bars(ms: float) -> tuple[Bar, ...]:
    """Issue 5's bars of an in-batch training step (bfloat16, forward + backward, L2 flushed)."""
    bf16 = ("bfloat16",)
    return (
        _gpu_bar("ms", "<=", ms, f"forward + backward <= {ms:g} ms (issue 5)", dtypes=bf16),
        *_per_peer("speedup", ">=", 1.0, "faster than both peers (issue 5)", dtypes=bf16),
        _gpu_bar(
            "mem_ratio:naive", "<=", 1 / 20, "peak extra memory <= 1/20 of naive's (issue 5)", dtypes=bf16
        ),
        *_per_peer(
            "mem_ratio", "<=", 1.0, "peak extra memory no more than either peer's (issue 5)", dtypes=bf16
        ),
    )


@dataclass(frozen=True)
class Workload:
    """A named workload of the registry.

    Attributes:
        name: registry key.
        layout: one of ``LAYOUTS``.
        sizes: full-size dims: ``B, C`` (candidates), ``Nq, Nd`` (others), ``Lq``, ``Ld`` (or
            ``Ld_min, Ld_max`` for ragged corpora), ``D``.
        description: one line for ``--list`` and the report.
        train: time forward + backward of ``scores.sum()``.
        dtype: a fixed input dtype (the CPU bar is float32 whatever ``--dtype`` says); None follows ``--dtype``.
        fixed_size: ignore ``--scale`` (the CPU bar runs at full size).
        devices: device types this workload runs on by default (any runs it when named explicitly).
        bars: the issues' targets for this workload (checked when it runs at full size).
        providers: only these providers run it (None = all); for shapes whose baselines cannot fit.
        single_call: the check call is the measurement (time and memory): for runs too long to repeat.
    """

    name: str
    layout: str
    sizes: dict
    description: str
    train: bool = False
    dtype: torch.dtype | None = None
    fixed_size: bool = False
    devices: tuple[str, ...] = ("cpu", "cuda", "mps")
    bars: tuple[Bar, ...] = ()
    providers: tuple[str, ...] | None = None
    single_call: bool = False

    def scaled_dims(self, scale: float) -> dict:
        """The sizes at ``scale`` (a multiplier on the number of scored pairs)."""
        s = dict(self.sizes)
        if self.fixed_size or scale == 1:
            return s
        if self.layout == "candidates":
            # fewer queries first; below one query, fewer candidates
            if s["B"] * scale < 1:
                s["C"] = max(1, round(s["B"] * s["C"] * scale))
            s["B"] = max(1, round(s["B"] * scale))
        elif self.layout == "all_pairs":
            s["Nq"] = max(1, round(s["Nq"] * math.sqrt(scale)))
            s["Nd"] = max(1, round(s["Nd"] * math.sqrt(scale)))
        else:
            s["Nd"] = max(1, round(s["Nd"] * scale))
        return s

    def shape_id(self, dims: dict) -> str:
        """Readable id of a sized instance."""
        D = dims.get("D", DIM)
        if self.layout == "candidates":
            return f"B{dims['B']}-C{dims['C']}-Lq{dims['Lq']}-Ld{dims['Ld']}-D{D}"
        if self.layout == "varlen":
            return f"Nq{dims['Nq']}-Nd{dims['Nd']}-Lq{dims['Lq']}-Ld{dims['Ld_min']}..{dims['Ld_max']}-D{D}"
        if self.layout == "padded":
            ld = f"Ld{dims['Ld_max']}({dims['Ld_min']}..{dims['Ld_max']})"
            return f"Nq{dims['Nq']}-Nd{dims['Nd']}-Lq{dims['Lq']}-{ld}-D{D}"
        return f"Nq{dims['Nq']}-Nd{dims['Nd']}-Lq{dims['Lq']}-Ld{dims['Ld']}-D{D}"

    def build(
        self, device: torch.device | str, dtype: torch.dtype, scale: float = 1.0, seed: int = 0
    ) -> Case:
        """Make the inputs on ``device``.

        Args:
            device: where the tensors live.
            dtype: input dtype (overridden by the workload's own ``dtype`` when it has one).
            scale: multiplier on the number of scored pairs (ignored when ``fixed_size``).
            seed: generator seed; the same seed gives the same tensors on the same device type.

        Returns:
            A :class:`Case`.
        """
        device = torch.device(device)
        dtype = self.dtype or dtype
        dims = self.scaled_dims(scale)
        D = dims.get("D", DIM)
        gen = _generator(device, seed)
        esz = torch.empty((), dtype=dtype).element_size()
        lay = self.layout
        lengths = None
        if lay == "candidates":
            B, C, Lq, Ld = dims["B"], dims["C"], dims["Lq"], dims["Ld"]
            q = _tokens((B, Lq, D), gen, device, dtype)
            d = _tokens((B, C, Ld, D), gen, device, dtype)
            inputs = Inputs(lay, q, d)
            pairs, q_tok, d_tok = B * C, B * Lq, B * C * Ld
            flops = 2 * pairs * Lq * Ld * D
            bytes_given = bytes_real = (q_tok + d_tok) * D * esz
        elif lay in ("corpus", "all_pairs"):
            Nq, Nd, Lq, Ld = dims["Nq"], dims["Nd"], dims["Lq"], dims["Ld"]
            q = _tokens((Nq, Lq, D), gen, device, dtype)
            q = q[0] if lay == "corpus" else q
            d = _tokens((Nd, Ld, D), gen, device, dtype)
            pairs = Nq * Nd
            flops = 2 * pairs * Lq * Ld * D
            bytes_given = bytes_real = (Nq * Lq + Nd * Ld) * D * esz
            if self.train:
                q.requires_grad_(True)
                d.requires_grad_(True)
                # read q and d, write their gradients
                bytes_given = bytes_real = 2 * bytes_given
            inputs = Inputs(lay, q, d, train=self.train)
        else:  # varlen / padded: one query against a ragged corpus
            Nd, Lq, lo, hi = dims["Nd"], dims["Lq"], dims["Ld_min"], dims["Ld_max"]
            lgen = torch.Generator().manual_seed(seed + 1)
            lengths = torch.randint(lo, hi + 1, (Nd,), generator=lgen).tolist()
            total = sum(lengths)
            q = _tokens((Lq, D), gen, device, dtype)
            packed = _tokens((total, D), gen, device, dtype)
            d_lengths = torch.tensor(lengths, dtype=torch.int64, device=device)
            pairs = Nd
            flops = 2 * Lq * total * D
            bytes_real = (Lq + total) * D * esz
            if lay == "varlen":
                cu = torch.zeros(Nd + 1, dtype=torch.int32)
                cu[1:] = torch.tensor(lengths).cumsum(0)
                inputs = Inputs(
                    lay, q, packed, d_lengths=d_lengths,
                    cu_seqlens_q=torch.tensor([0, Lq], dtype=torch.int32, device=device),
                    cu_seqlens_d=cu.to(device), max_seqlen_q=Lq, max_seqlen_d=max(lengths), lengths=lengths,
                )  # fmt: skip
                bytes_given = bytes_real + (Nd + 3) * 4
            else:
                # Padding holds junk with a larger norm than any real token: it wins every max unless masked.
                padded = 4 * _tokens((Nd, hi, D), gen, device, dtype)
                mask = torch.arange(hi, device=device) < d_lengths[:, None]
                padded[mask] = packed
                del packed
                inputs = Inputs(
                    lay, q, padded, d_lengths=d_lengths, max_seqlen_q=Lq, max_seqlen_d=max(lengths),
                    lengths=lengths,
                )  # fmt: skip
                bytes_given = (Lq + Nd * hi) * D * esz + Nd * 8
        return Case(
            name=self.name, layout=lay, dims=dims, shape_id=self.shape_id(dims), dtype=dtype, inputs=inputs,
            bytes_given=bytes_given, bytes_real=bytes_real, flops=flops, pairs=pairs,
        )  # fmt: skip


def _generator(device: torch.device, seed: int) -> torch.Generator:
    try:
        return torch.Generator(device=device).manual_seed(seed)
    except RuntimeError:  # devices without their own generator: draw on the CPU
        return torch.Generator().manual_seed(seed)


def _tokens(shape: tuple, gen: torch.Generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """L2-normalized Gaussian tokens (float32 draw, then cast), drawn in slabs to bound the float32 copy."""
    out = torch.empty(shape, dtype=dtype, device=device)
    flat = out.view(-1, shape[-1])
    step = max(1, (1 << 26) // shape[-1])
    gen_device = gen.device
    for start in range(0, flat.shape[0], step):
        n = min(step, flat.shape[0] - start)
        x = torch.randn(n, shape[-1], generator=gen, device=gen_device, dtype=torch.float32)
        x = torch.nn.functional.normalize(x, dim=-1)
        flat[start : start + n] = x.to(device=device, dtype=dtype)
    return out


_ALL_DEVICES = ("cpu", "cuda", "mps")

_SMALL_BARS = (
    _gpu_bar("x_floor", "<=", 1.5, "<= 1.5x floor, L2 flushed (issue 4)"),
    *_per_peer(
        "speedup", ">=", 1.0, "faster than both peers in a CUDA-graph replay (issue 4)", methods=("graph",)
    ),
    *_per_peer(
        "speedup", ">=", 1.0, "eager call time no slower than either peer (issue 4)", methods=("eager",)
    ),
    *_never_slower(),
)

WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "SmallRerank", "candidates", {"B": 32, "C": 10, "Lq": 32, "Ld": 180, "D": DIM},
            "rerank 10 candidates per query, 32 queries", bars=_SMALL_BARS,
        ),
        Workload(
            "HeavyRerank", "candidates", {"B": 32, "C": 100, "Lq": 32, "Ld": 256, "D": DIM},
            "rerank 100 candidates per query, 32 queries",
            bars=(_gpu_bar("x_floor", "<=", 1.05, "<= 1.05x floor (issue 4)"), *_never_slower()),
        ),
        Workload(
            "LongDocStress", "candidates", {"B": 8, "C": 16, "Lq": 64, "Ld": 1024, "D": DIM},
            "few long documents per query", bars=_SMALL_BARS,
        ),
        Workload(
            "Rerank1k", "candidates", {"B": 16, "C": 1000, "Lq": 32, "Ld": 300, "D": DIM},
            "rerank 1000 candidates per query, 16 queries",
            bars=(_gpu_bar("x_floor", "<=", 1.0, "<= 1.0x floor (issue 4)"), *_never_slower()),
        ),
        Workload(
            "ColPali", "corpus", {"Nq": 1, "Nd": 1000, "Lq": 1024, "Ld": 1024, "D": DIM},
            "one page-image query against 1000 pages (FLOP-bound)",
            bars=(
                _gpu_bar(
                    "matmul_fraction", ">=", 0.70, ">= 70% of the bf16 matmul TFLOP/s (issue 4)",
                    dtypes=("bfloat16",),
                ),
                *_never_slower(),
            ),
        ),
        Workload(
            "RaggedCorpus", "varlen", {"Nq": 1, "Nd": 20000, "Lq": 32, "Ld_min": 75, "Ld_max": 300, "D": DIM},
            "one query against 20k packed documents, lengths uniform in [75, 300] (maxsim_varlen)",
            bars=(_gpu_bar("x_floor_real", "<=", 1.05, "<= 1.05x the floor of its real bytes (issue 4)"),
                  *_never_slower()),
        ),
        Workload(
            "RaggedCorpusPadded", "padded",
            {"Nq": 1, "Nd": 20000, "Lq": 32, "Ld_min": 75, "Ld_max": 300, "D": DIM},
            "the RaggedCorpus documents padded to [N, 300, D] with d_lengths",
            bars=(_gpu_bar("x_floor_real", "<=", 1.1, "padded: <= 1.1x the ragged floor (issue 4)"),
                  *_never_slower()),
        ),
        Workload(
            "InBatchTrain", "all_pairs", {"Nq": 128, "Nd": 128, "Lq": 32, "Ld": 256, "D": DIM},
            "in-batch negatives training step: all pairs, forward + backward of scores.sum()", train=True,
            bars=_train_bars(0.30),
        ),
        Workload(
            "ColPaliTrain", "all_pairs", {"Nq": 32, "Nd": 32, "Lq": 1024, "Ld": 1024, "D": DIM},
            "ColPali-sized in-batch training step: all pairs, forward + backward of scores.sum() (FLOP-bound; "
            "on the CPU by name only: a second a step even scaled down)",
            train=True, devices=("cuda",), bars=_train_bars(0.9),
        ),
        Workload(
            "CpuOneQuery", "corpus", {"Nq": 1, "Nd": 1000, "Lq": 32, "Ld": 512, "D": DIM},
            "the CPU bar: one float32 query against 1000 documents of 512 tokens, full size always",
            dtype=torch.float32, fixed_size=True, devices=("cpu",),
            bars=(Bar("speedup:maxsim-cpu", ">=", 2.0, "cpu", ("wall",), ("float32",),
                      "the default backend >= 2x faster than maxsim-cpu (issue 3)"),),
        ),
        Workload(
            "ColPali10k", "corpus", {"Nq": 1, "Nd": 10000, "Lq": 1024, "Ld": 1024, "D": DIM},
            "the CPU memory bar: one ColPali query against 10,000 pages, maxsim only, one call (opt-in: "
            "5 GiB of float32 inputs)",
            dtype=torch.float32, fixed_size=True, devices=(), providers=("maxsim",), single_call=True,
            bars=(Bar("peak_mem_budget", "<=", 1.1, "cpu", ("wall",), None,
                      "peak extra memory <= 1.1x the default memory budget (issue 3)"),),
        ),
    )
}  # fmt: skip


def select(names: str | list[str] | None, device_type: str) -> list[Workload]:
    """Workloads by name (comma list, case-insensitive), or the default set for a device type.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if not names:
        return [w for w in WORKLOADS.values() if device_type in w.devices]
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    lower = {k.lower(): w for k, w in WORKLOADS.items()}
    out = []
    for name in names:
        w = lower.get(name.strip().lower())
        if w is None:
            raise ValueError(f"unknown workload {name.strip()!r}; known: {', '.join(WORKLOADS)}")
        if w not in out:
            out.append(w)
    return out
