"""Providers: everything ``maxsim bench`` times side by side, each called the way its users call it.

A provider turns :class:`~maxsim.bench.workloads.Inputs` into a zero-argument callable that returns the
workload's canonical scores (see ``workloads``) or raises :class:`Unsupported` with a short note. The
runner checks that output against the reference before it times the callable.

- ``maxsim``: the public API with the backend a device gets by default (or ``MAXSIM_BACKEND`` if set).
- ``torch-chunked``: the public API forced onto the torch backend (``MAXSIM_BACKEND=torch``); on devices
  whose default already is the torch backend it is the same thing and is not run twice.
- ``naive``: ``einsum`` -> masked ``amax`` -> ``sum`` in the input dtype (varlen: a matmul against the packed
  tokens and a segment max).
- ``compile``: ``torch.compile`` of ``naive`` (compile time measured apart, never timed with the calls).
- peers, when importable: ``maxsim-cpu`` (CPU, float32, one query against a corpus), ``flash-maxsim`` and
  ``late-interaction-kernels`` (CUDA), each through its public functions for the same layout.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
from collections.abc import Callable, Iterator

import torch

from .workloads import Inputs


class Unsupported(Exception):
    """A provider cannot run this layout / dtype / device; the message says why (shown as a note)."""


@contextlib.contextmanager
def environ(env: dict[str, str] | None) -> Iterator[None]:
    """Set environment variables for the duration of a block (None leaves the environment alone)."""
    if not env:
        yield
        return
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def default_backend(device: torch.device) -> str:
    """The maxsim backend a call on ``device`` gets now (``MAXSIM_BACKEND`` if set, else the device default)."""
    forced = os.environ.get("MAXSIM_BACKEND")
    if forced:
        return forced
    return device_backend(device)


def device_backend(device: torch.device) -> str:
    """The backend ``device`` gets by default, ignoring ``MAXSIM_BACKEND``."""
    for module in ("maxsim.api", "maxsim.backends"):
        try:
            fn = getattr(importlib.import_module(module), "backend_name", None)
        except ImportError:
            continue
        if fn is not None:
            return fn(torch.device(device))
    return "torch"


def package_version(dist: str) -> str | None:
    """Installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


class Provider:
    """Base class. Subclasses set ``name`` and implement ``prepare``.

    Attributes:
        name: key in the results (``maxsim``, ``naive``, ...).
        label: what the table shows.
        env: environment variables set around every call of this provider (prepare, check and timing).
        baseline: whether ratios of ``maxsim`` against it are reported.
        version: the peer package version, if any.
    """

    name = ""
    env: dict[str, str] | None = None
    baseline = True
    version: str | None = None

    @property
    def label(self) -> str:
        return self.name

    def available(self, device: torch.device) -> str | None:
        """None when this provider can run on ``device`` at all, else a note saying why not."""
        return None

    def prepare(self, inp: Inputs, *, sync_free: bool = False) -> Callable[[], torch.Tensor]:
        """A callable returning the canonical scores of ``inp`` (``sync_free``: without device->host syncs, so
        capturable in a CUDA graph: ``validate=False`` for maxsim)."""
        raise NotImplementedError


class MaxSim(Provider):
    """The public API: ``maxsim.maxsim`` / ``maxsim.maxsim_varlen`` as a user calls them."""

    def __init__(self, name: str = "maxsim", backend: str | None = None, device: torch.device | None = None):
        self.name = name
        self.baseline = name != "maxsim"
        self.env = {"MAXSIM_BACKEND": backend} if backend else None
        self._backend = backend
        self._device = device
        self.version = package_version("maxsim")

    @property
    def label(self) -> str:
        backend = self._backend or (default_backend(self._device) if self._device is not None else None)
        return f"{self.name} [{backend}]" if backend else self.name

    def prepare(self, inp: Inputs, *, sync_free: bool = False) -> Callable[[], torch.Tensor]:
        import maxsim

        q, d, lay = inp.q, inp.d, inp.layout
        v = not sync_free
        if lay == "candidates":
            return lambda: maxsim.maxsim(q[:, None], d, validate=v)
        if lay == "all_pairs":
            return lambda: maxsim.maxsim(q[:, None], d[None], validate=v)
        if lay == "corpus":
            return lambda: maxsim.maxsim(q, d, validate=v)
        if lay == "padded":
            lengths = inp.d_lengths
            return lambda: maxsim.maxsim(q, d, d_lengths=lengths, validate=v)
        cu_q, cu_d, mq, md = inp.cu_seqlens_q, inp.cu_seqlens_d, inp.max_seqlen_q, inp.max_seqlen_d
        return lambda: maxsim.maxsim_varlen(q, cu_q, d, cu_d, max_seqlen_q=mq, max_seqlen_d=md, validate=v)[0]


def naive_fn(inp: Inputs) -> Callable[[], torch.Tensor]:
    """The naive expression for a layout: ``einsum`` -> masked ``amax`` -> ``sum`` in the input dtype."""
    q, d, lay = inp.q, inp.d, inp.layout
    if lay == "candidates":
        return lambda: _naive_candidates(q, d)
    if lay == "all_pairs":
        return lambda: _naive_all_pairs(q, d)
    if lay == "corpus":
        return lambda: _naive_corpus(q, d)
    if lay == "padded":
        lengths = inp.d_lengths
        return lambda: _naive_padded(q, d, lengths)
    lengths = inp.d_lengths
    return lambda: _naive_varlen(q, d, lengths)


def _naive_candidates(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bqe,bcke->bcqk", q, d).amax(-1).sum(-1).float()


def _naive_all_pairs(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return torch.einsum("aqe,bke->abqk", q, d).amax(-1).sum(-1).float()


def _naive_corpus(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return torch.einsum("qe,nke->nqk", q, d).amax(-1).sum(-1).float()


def _naive_padded(q: torch.Tensor, d: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    sim = torch.einsum("qe,nke->nqk", q, d)
    real = torch.arange(d.shape[1], device=d.device) < lengths[:, None]
    return sim.masked_fill(~real[:, None, :], float("-inf")).amax(-1).sum(-1).float()


def _naive_varlen(q: torch.Tensor, d: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    sim = d @ q.T  # [T, Lq]
    return torch.segment_reduce(sim, "max", lengths=lengths, axis=0).sum(-1).float()


class Naive(Provider):
    name = "naive"

    def prepare(self, inp: Inputs, *, sync_free: bool = False) -> Callable[[], torch.Tensor]:
        return naive_fn(inp)


_NAIVE = {
    "candidates": _naive_candidates,
    "all_pairs": _naive_all_pairs,
    "corpus": _naive_corpus,
    "padded": _naive_padded,
    "varlen": _naive_varlen,
}


class Compile(Provider):
    """``torch.compile`` of the naive expression; the first call (compilation) is timed apart.

    ``compile_s`` holds the compile time of the last ``prepare``. On the CPU a run-wide compile budget
    (seconds, None = no limit) skips compilation once spent, since inductor's C++ builds take many seconds.
    """

    name = "compile"

    def __init__(self, budget_s: float | None = None):
        self.budget_s = budget_s
        self.spent_s = 0.0
        self.compile_s: float | None = None

    def prepare(self, inp: Inputs, *, sync_free: bool = False) -> Callable[[], torch.Tensor]:
        import time

        if self.budget_s is not None and self.spent_s >= self.budget_s:
            raise Unsupported(
                f"compile budget of {self.budget_s:.0f} s spent ({self.spent_s:.0f} s); --compile on to force"
            )
        torch._dynamo.reset()
        fn = torch.compile(_NAIVE[inp.layout], dynamic=False)
        args = _naive_args(inp)
        t0 = time.perf_counter()
        try:
            out = fn(*args)
            if inp.train:  # the backward graph compiles on the first backward: count it here too
                out.sum().backward()
                inp.q.grad = inp.d.grad = None
            if inp.q.device.type == "cuda":
                torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - any compiler failure is a skip, not a crash
            raise Unsupported(f"torch.compile failed: {type(e).__name__}: {_first_line(e)}") from None
        finally:
            self.compile_s = time.perf_counter() - t0
            self.spent_s += self.compile_s
        return lambda: fn(*args)


def _naive_args(inp: Inputs) -> tuple:
    if inp.layout in ("padded", "varlen"):
        return (inp.q, inp.d, inp.d_lengths)
    return (inp.q, inp.d)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:160] if text else ""


class MaxSimCpu(Provider):
    """PyPI ``maxsim-cpu``: one float32 query against a corpus (``maxsim_scores`` / ``_variable``)."""

    name = "maxsim-cpu"
    # Seen with maxsim-cpu 0.1.0: queries of more than 32 tokens give wrong scores (Lq=48: errors of ~10 on
    # scores of ~25; Lq=512 with Ld=1024 segfaulted), so such calls are skipped rather than risk the run.
    MAX_LQ = 32

    def __init__(self):
        self.version = package_version("maxsim-cpu")

    def available(self, device: torch.device) -> str | None:
        if device.type != "cpu":
            return "CPU only"
        try:
            importlib.import_module("maxsim_cpu")
        except ImportError:
            return "not installed (pip install maxsim-cpu)"
        return None

    def prepare(self, inp: Inputs, *, sync_free: bool = False) -> Callable[[], torch.Tensor]:
        import maxsim_cpu

        if inp.train:
            raise Unsupported("no backward")
        if inp.layout not in ("corpus", "varlen", "padded"):
            raise Unsupported("single-query layouts only")
        if inp.q.dtype != torch.float32:
            raise Unsupported("float32 only")
        if inp.q.shape[-2] > self.MAX_LQ and _version_tuple(self.version) <= (0, 1, 0):
            raise Unsupported(
                f"maxsim-cpu {self.version} returns wrong scores (or crashes) beyond {self.MAX_LQ} query tokens"
            )
        qn = inp.q.detach().contiguous().numpy()
        dn = inp.d.detach().contiguous().numpy()
        if inp.layout == "corpus":
            return lambda: torch.from_numpy(maxsim_cpu.maxsim_scores(qn, dn))
        if inp.layout == "varlen":
            cu = inp.cu_seqlens_d.tolist()
            docs = [dn[cu[i] : cu[i + 1]] for i in range(len(cu) - 1)]
        else:  # zero-copy views of each padded row's real tokens
            docs = [dn[i, :n] for i, n in enumerate(inp.lengths)]
        return lambda: torch.from_numpy(maxsim_cpu.maxsim_scores_variable(qn, docs))


class FlashMaxSim(Provider):
    """PyPI ``flash-maxsim`` (Triton, CUDA)."""

    name = "flash-maxsim"

    def __init__(self):
        self.version = package_version("flash-maxsim")

    def available(self, device: torch.device) -> str | None:
        if device.type != "cuda":
            return "CUDA only"
        return _importable("flash_maxsim", "flash-maxsim")

    def prepare(self, inp: Inputs, *, sync_free: bool = False) -> Callable[[], torch.Tensor]:
        import flash_maxsim as fm

        q, d, lay = inp.q, inp.d, inp.layout
        if lay == "candidates":
            return lambda: fm.flash_maxsim_rerank_padded(q, d)
        if lay == "corpus":
            return lambda: fm.flash_maxsim(q, d)
        if lay == "padded":
            lengths = inp.d_lengths.to(torch.int32)
            return lambda: fm.flash_maxsim(q, d, doc_lengths=lengths)
        if lay == "varlen":
            cu, md = inp.cu_seqlens_d, inp.max_seqlen_d
            return lambda: fm.flash_maxsim_packed(q, d, cu, md)
        if inp.train:
            return lambda: fm.flash_maxsim_batched_train(q, d, shared_docs=True)
        return lambda: fm.flash_maxsim_batched(q, d)


class LateInteractionKernels(Provider):
    """PyPI ``late-interaction-kernels`` (Triton, CUDA)."""

    name = "late-interaction-kernels"

    def __init__(self):
        self.version = package_version("late-interaction-kernels")

    def available(self, device: torch.device) -> str | None:
        if device.type != "cuda":
            return "CUDA only"
        return _importable("late_interaction_kernels", "late-interaction-kernels")

    def prepare(self, inp: Inputs, *, sync_free: bool = False) -> Callable[[], torch.Tensor]:
        import late_interaction_kernels as lik

        q, d, lay = inp.q, inp.d, inp.layout
        if lay in ("candidates", "all_pairs"):
            return lambda: lik.maxsim(q, d)
        if lay == "corpus":
            return lambda: lik.maxsim(q[None], d)[0]
        if lay == "padded":
            mask = torch.arange(d.shape[1], device=d.device) < inp.d_lengths[:, None]
            return lambda: lik.maxsim(q[None], d, d_mask=mask)[0]
        cu_q, cu_d, mq, md = inp.cu_seqlens_q, inp.cu_seqlens_d, inp.max_seqlen_q, inp.max_seqlen_d
        return lambda: lik.maxsim_varlen(q, d, cu_q, cu_d, mq, md)[0]


def _version_tuple(version: str | None) -> tuple[int, ...]:
    """``"0.1.0"`` -> ``(0, 1, 0)``; unknown or unparsable versions count as ``(0,)`` (the oldest)."""
    parts = []
    for piece in (version or "0").split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts) or (0,)


def _importable(module: str, dist: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - a broken peer is skipped, whatever it raises
        if isinstance(e, ImportError):
            return f"not installed (pip install {dist})"
        return f"import failed: {type(e).__name__}: {_first_line(e)}"
    return None


PEERS = (MaxSimCpu, FlashMaxSim, LateInteractionKernels)


def providers(
    device: torch.device, *, compile_mode: str = "auto", compile_budget_s: float | None = None
) -> tuple[list[Provider], list[str]]:
    """The providers for a run on ``device``, and notes about the ones left out.

    Args:
        device: the benchmark device.
        compile_mode: ``auto`` (on; on the CPU within ``compile_budget_s``), ``on`` or ``off``.
        compile_budget_s: the CPU compile budget for ``auto``.

    Returns:
        ``(providers, notes)``; ``maxsim`` comes first.
    """
    notes: list[str] = []
    out: list[Provider] = [MaxSim("maxsim", None, device)]
    own = device_backend(device)
    forced = os.environ.get("MAXSIM_BACKEND")
    if (forced or own) == "torch":
        notes.append(
            "torch-chunked: the default backend on this device is the torch backend (one row: maxsim)"
        )
    else:
        out.append(MaxSim("torch-chunked", "torch", device))
    out.append(Naive())
    if compile_mode == "off":
        notes.append("compile: off (--compile off)")
    else:
        budget = compile_budget_s if (compile_mode == "auto" and device.type == "cpu") else None
        out.append(Compile(budget))
    for cls in PEERS:
        peer = cls()
        why = peer.available(device)
        if why is None:
            out.append(peer)
        elif why != "CPU only" and why != "CUDA only":
            notes.append(f"{peer.name}: {why}")
    return out, notes


def peer_versions() -> dict[str, str | None]:
    """Versions of the peer packages (None where not installed)."""
    return {
        "maxsim-cpu": package_version("maxsim-cpu"),
        "flash-maxsim": package_version("flash-maxsim"),
        "late-interaction-kernels": package_version("late-interaction-kernels"),
    }
