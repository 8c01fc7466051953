"""Measurement: ceilings, the reference check, timing, memory, floors and ratios (BENCHMARKING.md).

``run(config)`` returns the results as a JSON-ready dict (see ``report`` for the table, file and plot).

Per workload and dtype:
1. build the inputs (seeded);
2. compute the float64 reference on the first ``k`` output rows (``k`` bounded so the reference stays
   cheap; stated in the output), and for float16/bfloat16 the naive expression's error on those rows;
3. run each provider once on the full inputs (its warm-up) and compare its first ``k`` rows with the
   reference under DESIGN.md's tolerance rule; a provider that disagrees is ``wrong`` and is not timed;
4. time the others: on CUDA ``triton.testing.do_bench`` medians with p20/p80 (L2 flushed between calls:
   method ``cold``), optionally kernel-only CUDA-graph replay (``graph``) and eager wall clock
   (``eager``); on the CPU ``time.perf_counter`` around each call, providers interleaved round by round
   (``wall``);
5. measure peak extra memory of one call (training: forward + backward, the gradients included; CUDA: allocator
   peak after warm-up; CPU: growth of the resident-set peak) and maxsim's ratio to each provider's;
6. derive floors (bytes / copy bandwidth, FLOPs / matmul rate, both measured in the same run) and ratios.
"""

from __future__ import annotations

import ctypes
import datetime
import functools
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import system
from .baselines import Compile, Provider, Unsupported, environ, naive_fn, providers
from .workloads import Case, Inputs, Workload

SCHEMA = "maxsim-bench/1"

# The CPU-only default run is scaled so that all of it takes about a minute on 2 cores.
DEFAULT_CPU_SCALE = 0.05
# Wall-clock seconds of timed calls per workload on the CPU when --repeats is not given.
CPU_TARGET_S = 2.0
CPU_MIN_REPEATS, CPU_MAX_REPEATS = 3, 50
# Seconds of torch.compile per CPU run before the compile baseline is skipped (--compile auto).
CPU_COMPILE_BUDGET_S = 20.0
# The reference is computed on the first k rows: at most this many float64 similarity entries.
REF_BUDGET = 1 << 22
REF_MAX_ROWS = 256
GRAPH_CALLS = 50
EAGER_CALLS = 100

METHODS = {
    "cold": "do_bench median, L2 flushed between calls (maxsim with validate=False: no device->host sync, "
    "as the peers, which check nothing)",
    "graph": f"CUDA graph of {GRAPH_CALLS} calls replayed, per call (warm L2, no host overhead; validate=False)",
    "eager": f"wall clock around {EAGER_CALLS} back-to-back public calls (validate=True; max_seqlen passed "
    "where an API takes it), synchronized, per call",
    "wall": "time.perf_counter per call, providers interleaved, after one warm-up",
}


@dataclass
class Config:
    """What a ``maxsim bench`` run measures.

    Attributes:
        device: benchmark device.
        dtypes: input dtypes (workloads with a fixed dtype run once, in theirs).
        workloads: from ``workloads.select``.
        scale: multiplier on the number of scored pairs.
        methods: ``wall`` on CPU/MPS; any of ``cold``, ``graph``, ``eager`` on CUDA.
        repeats: timed calls per provider (CPU/MPS, graph replays, eager rounds); None = adaptive.
        compile_mode: ``auto`` / ``on`` / ``off``.
        progress: show a progress bar on stderr.
        seed: input seed.
        scale_note: how the scale was chosen (printed and stored).
        memory: measure peak extra memory.
        quick: small ceilings (a smoke run for tests and CI; its floors are not comparable).
    """

    device: torch.device
    dtypes: list[torch.dtype]
    workloads: list[Workload]
    scale: float = 1.0
    methods: list[str] = field(default_factory=lambda: ["wall"])
    repeats: int | None = None
    compile_mode: str = "auto"
    progress: bool = True
    seed: int = 0
    scale_note: str = ""
    memory: bool = True
    quick: bool = False


# ----------------------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return torch.cuda.synchronize
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


def _quantiles(samples_ms: list[float]) -> dict:
    xs = sorted(samples_ms)
    if len(xs) == 1:
        return {"median": xs[0], "p20": xs[0], "p80": xs[0], "n": 1}
    q = statistics.quantiles(xs, n=10, method="inclusive")
    return {"median": statistics.median(xs), "p20": q[1], "p80": q[7], "n": len(xs)}


def _grads_off(inp: Inputs) -> None:
    if inp.train:
        inp.q.grad = None
        inp.d.grad = None


def _step(fn: Callable[[], torch.Tensor], inp: Inputs) -> Callable[[], torch.Tensor]:
    """What one timed call does: the forward, plus the backward of ``scores.sum()`` when training."""
    if not inp.train:
        return fn

    def step() -> torch.Tensor:
        scores = fn()
        scores.sum().backward()
        return scores

    return step


def time_cold(fn: Callable[[], object], inp: Inputs) -> dict:
    """CUDA: ``triton.testing.do_bench`` median with p20/p80, L2 flushed between calls (ms)."""
    grads = [inp.q, inp.d] if inp.train else None
    try:
        from triton.testing import do_bench
    except ImportError:
        return _time_events(fn, inp)
    med, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=grads)
    return {"median": med, "p20": p20, "p80": p80, "n": None}


def _time_events(fn: Callable[[], object], inp: Inputs, reps: int = 50) -> dict:
    """CUDA timing without triton: events around each call, a 256 MiB write between calls flushes L2."""
    flush = torch.empty(1 << 26, dtype=torch.int32, device="cuda")
    for _ in range(3):
        _grads_off(inp)
        fn()
    samples = []
    for _ in range(reps):
        _grads_off(inp)
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return _quantiles(samples)


def time_graph(fn: Callable[[], object], repeats: int) -> dict:
    """CUDA: capture ``GRAPH_CALLS`` calls in one graph, replay it ``repeats`` times, ms per call."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_CALLS):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / GRAPH_CALLS)
    del graph
    return _quantiles(samples)


def time_eager(fn: Callable[[], object], inp: Inputs, device: torch.device, repeats: int) -> dict:
    """Wall clock around ``EAGER_CALLS`` back-to-back calls, synchronized before and after, ms per call."""
    sync = _sync(device)
    samples = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(EAGER_CALLS):
            _grads_off(inp)
            fn()
        sync()
        samples.append((time.perf_counter() - t0) * 1e3 / EAGER_CALLS)
    return _quantiles(samples)


def time_interleaved(
    calls: dict[str, tuple[Callable[[], object], dict | None]],
    inp: Inputs,
    device: torch.device,
    repeats: int | None,
    target_s: float = 2.0,
) -> dict[str, dict]:
    """CPU/MPS: rounds that each time every provider once (perf_counter), ms quantiles per provider.

    ``repeats`` rounds; None = adaptive: rounds until ``target_s`` seconds of timed calls have passed, at
    least ``CPU_MIN_REPEATS`` and at most ``CPU_MAX_REPEATS``.
    """
    sync = _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    spent = 0.0
    rounds = 0
    while True:
        if repeats is not None and rounds >= repeats:
            break
        if repeats is None and rounds >= CPU_MIN_REPEATS and (spent >= target_s or rounds >= CPU_MAX_REPEATS):
            break
        for name, (fn, env) in calls.items():
            with environ(env):
                _grads_off(inp)
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                dt = time.perf_counter() - t0
            samples[name].append(dt * 1e3)
            spent += dt
        rounds += 1
    return {name: _quantiles(xs) for name, xs in samples.items()}


# ----------------------------------------------------------------------------------------------- memory


def _proc_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, val = line.split(":")
                out[key] = int(val.split()[0]) * 1024
    return out


@functools.cache
def _rss_supported() -> bool:
    try:
        _proc_status()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(
    fn: Callable[[], object], inp: Inputs, device: torch.device
) -> tuple[int | None, str, object, float]:
    """Peak extra memory of one call (bytes), how it was measured, the call's output and its seconds.

    CUDA: ``max_memory_allocated`` during the call minus what was allocated before (the outputs and, when
    training, the gradients included). CPU (Linux): growth of the resident-set high-water mark over the
    resident set before the call, after returning freed heap to the OS (approximate: memory the allocator
    kept from earlier calls is reused without growing the resident set).
    """
    if device.type == "cuda":
        _grads_off(inp)
        gc.collect()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() - base
        _grads_off(inp)
        return peak, "cuda max_memory_allocated after warm-up", out, seconds
    if device.type == "cpu" and _rss_supported():
        _grads_off(inp)  # tensors go on refcount: no gc.collect (a tenth of a second with torch loaded)
        _malloc_trim()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _proc_status()["VmRSS"]
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
        peak = _proc_status()["VmHWM"] - before
        _grads_off(inp)
        return max(0, peak), "rss high-water growth during the first call (approx.)", out, seconds
    t0 = time.perf_counter()
    out = fn()
    _sync(device)()
    return None, "not measured on this device", out, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- ceilings


def ceilings(device: torch.device, quick: bool = False) -> dict:
    """Copy bandwidth and matmul rate of ``device``, measured now (BENCHMARKING.md).

    ``quick`` uses a 1024^3 matmul and a 32 MiB copy (smoke runs only: such floors are not comparable).
    """
    sync = _sync(device)
    if device.type == "cuda" and not quick:
        from triton.testing import do_bench

        n = 1 << 30  # 2 GiB of float16
        x = torch.empty(n, dtype=torch.float16, device=device).normal_()
        y = torch.empty_like(x)
        ms = do_bench(lambda: y.copy_(x), return_mode="median")
        copy = {"bytes": 2 * n, "dtype": "float16", "ms": ms, "gbps": 2 * (2 * n) / (ms * 1e-3) / 1e9}
        x = y = None  # free before the matmul
        m = 8192
        a = torch.randn(m, m, dtype=torch.bfloat16, device=device)
        b = torch.randn(m, m, dtype=torch.bfloat16, device=device)
        ms = do_bench(lambda: a @ b, return_mode="median")
        mm = {"n": m, "dtype": "bfloat16", "ms": ms, "tflops": 2 * m**3 / (ms * 1e-3) / 1e12}
        a = b = None
        torch.cuda.empty_cache()
        return {"copy": copy, "matmul": mm, "method": "do_bench median"}

    def median_ms(fn: Callable[[], object], reps: int) -> float:
        xs = []
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            xs.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(xs)

    n = 1 << (23 if quick else 26)  # 256 MiB of float32 (32 MiB quick)
    x = torch.randn(n, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    ms = median_ms(lambda: y.copy_(x), 5)
    copy = {"bytes": 4 * n, "dtype": "float32", "ms": ms, "gbps": 2 * (4 * n) / (ms * 1e-3) / 1e9}
    x = y = None
    m = 1024 if quick else 4096
    a = torch.randn(m, m, device=device)
    b = torch.randn(m, m, device=device)
    a[:1024, :1024] @ b[:1024, :1024]  # warm the BLAS threads
    ms = median_ms(lambda: a @ b, 3)
    mm = {"n": m, "dtype": "float32", "ms": ms, "tflops": 2 * m**3 / (ms * 1e-3) / 1e12}
    return {"copy": copy, "matmul": mm, "method": "perf_counter median" + (" (quick)" if quick else "")}


# ------------------------------------------------------------------------------------------ correctness


def reference_rows(inp: Inputs) -> int:
    """How many output rows the reference is computed on (all of them when cheap)."""
    rows = inp.rows
    q, d = inp.q, inp.d
    lq = q.shape[-2]
    if inp.layout == "candidates":
        per_row = d.shape[1] * lq * d.shape[2] + d.shape[1] * d.shape[2] * d.shape[3]
    elif inp.layout == "all_pairs":
        per_row = d.shape[0] * lq * d.shape[1]
    elif inp.layout == "varlen":
        per_row = lq * (inp.max_seqlen_d or 1)
    else:
        per_row = lq * d.shape[1] + d.shape[1] * d.shape[2]
    return max(1, min(rows, REF_MAX_ROWS, REF_BUDGET // max(1, per_row)))


def reference(inp: Inputs) -> torch.Tensor:
    """The float64 reference scores of ``inp`` in the canonical output shape."""
    from maxsim.reference import maxsim_reference, maxsim_varlen_reference

    q, d = inp.q.detach(), inp.d.detach()
    with torch.no_grad():
        if inp.layout == "candidates":
            return maxsim_reference(q[:, None], d)[0]
        if inp.layout == "all_pairs":
            return maxsim_reference(q[:, None], d[None])[0]
        if inp.layout == "corpus":
            return maxsim_reference(q, d)[0]
        if inp.layout == "padded":
            return maxsim_reference(q, d, d_lengths=inp.d_lengths)[0]
        return maxsim_varlen_reference(q, inp.cu_seqlens_q, d, inp.cu_seqlens_d)[0][0]


def tolerance(ref: torch.Tensor, naive: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """DESIGN.md's rule: float32 ``1e-4 * max(1, |ref|)``; float16/bfloat16 ``2 * err(naive) + 1e-3 * max(1, |ref|)``."""
    mag = ref.abs().clamp(min=1)
    if dtype in (torch.float32, torch.float64) or naive is None:
        return 1e-4 * mag
    return 2 * (naive.double() - ref).abs() + 1e-3 * mag


def check_output(out: object, ref: torch.Tensor, allowed: torch.Tensor, rows: int) -> dict:
    """Compare a provider's output (full) with the reference of its first ``len(ref)`` rows."""
    if not isinstance(out, torch.Tensor):
        return {"ok": False, "note": f"returned {type(out).__name__}, not a tensor"}
    k = ref.shape[0]
    if out.dim() != ref.dim() or out.shape[0] != rows or tuple(out.shape[1:]) != tuple(ref.shape[1:]):
        return {"ok": False, "note": f"output shape {tuple(out.shape)}, expected {(rows, *ref.shape[1:])}"}
    ours = out[:k].detach().to(device=ref.device, dtype=torch.float64)
    err = (ours - ref).abs()
    finite = bool(torch.isfinite(ours).all())
    within = bool((err <= allowed).all()) if finite else False
    worst = float((err / allowed).max()) if finite else float("inf")
    return {
        "ok": finite and within,
        "max_abs_err": float(err.max()) if finite else None,
        "worst_vs_allowed": worst,
    }


# ------------------------------------------------------------------------------------------------- run


class Progress:
    """A tqdm bar on stderr, or a plain counter when tqdm is missing (or nothing when disabled)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled = total, 0, enabled
        self.bar = None
        self.tty = sys.stderr.isatty()
        if enabled and self.tty:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, file=sys.stderr, unit="step", dynamic_ncols=True, leave=False)
            except ImportError:
                self.bar = None

    def step(self, desc: str, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description_str(desc[:48])
            self.bar.update(n)
        elif self.tty:
            print(f"\r[{self.done}/{self.total}] {desc[:60]:<60}", file=sys.stderr, end="", flush=True)
        elif n:  # a log: one line per finished step
            print(f"[{self.done}/{self.total}] {desc}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.tty:
            print(file=sys.stderr)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _call(fn: Callable[[], object], env: dict | None, sync: Callable[[], None]) -> tuple[object, float]:
    with environ(env):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        return out, time.perf_counter() - t0


def _error_note(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(config: Config) -> dict:
    """Run the benchmark and return the results (JSON-ready)."""
    device = config.device
    sync = _sync(device)
    provs, notes = providers(
        device,
        compile_mode=config.compile_mode,
        compile_budget_s=CPU_COMPILE_BUDGET_S,
    )
    cases = []
    for w in config.workloads:
        dtypes = [w.dtype] if w.dtype is not None else config.dtypes
        for dt in dtypes:
            if (w.name, dt) not in [(c[0].name, c[1]) for c in cases]:
                cases.append((w, dt))
    total = sum(1 + len(_providers_for(w, provs)) * (1 + len(_methods_for(w, config))) for w, _ in cases) + 1
    progress = Progress(total, config.progress)
    started = time.perf_counter()
    result: dict = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["maxsim", *sys.argv[1:]]) if sys.argv else None,
        "device": system.device_info(device),
        "versions": system.versions(),
        "git": system.git_commit(),
        "backend": {"maxsim": provs[0].label, "MAXSIM_BACKEND": os.environ.get("MAXSIM_BACKEND")},
        "threads": torch.get_num_threads(),
        "scale": config.scale,
        "scale_note": config.scale_note,
        "methods": {m: METHODS[m] for m in config.methods},
        "providers": {p.name: {"label": p.label, "version": p.version} for p in provs},
        "notes": list(notes),
        "tolerance": "float32: |ours-ref| <= 1e-4*max(1,|ref|); float16/bfloat16: "
        "|ours-ref| <= 2*|naive-ref| + 1e-3*max(1,|ref|); ref = float64 on the same inputs",
        "floors": "bytes floor = input bytes (each distinct token once; padded as given) / copy bandwidth; "
        "real floor = real tokens only; FLOP floor = 2*sum(Lq*Ld*D) over scored pairs, real tokens / matmul "
        "rate; floor = max. Training: bytes = read q,d + write their gradients, FLOPs = forward",
        "results": [],
    }
    try:
        progress.step("ceilings", 0)
        ceil = ceilings(device, config.quick)
        if config.quick:
            result["notes"].append("--quick: small ceilings, floors not comparable with full runs")
        result["ceilings"] = ceil
        progress.step("ceilings")
        if "graph" in config.methods and any(w.train for w, _ in cases):
            result["notes"].append(
                "graph: training steps (forward + backward) are not captured; cold and eager only"
            )
        if ceil["matmul"]["dtype"] == "float32" and any(dt != torch.float32 for _, dt in cases):
            result["notes"].append("the FLOP floor of float16/bfloat16 inputs uses the float32 matmul rate")
        for w, dt in cases:
            entries = _run_case(w, dt, config, provs, ceil, progress, sync)
            result["results"].extend(entries)
            _free(device)
    finally:
        progress.close()
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    result["bars"] = [
        {"workload": e["workload"], "dtype": e["dtype"], "method": e["method"], **b}
        for e in result["results"]
        for b in e.get("bars", [])
    ]
    return result


def _run_case(
    w: Workload,
    dtype: torch.dtype,
    config: Config,
    provs: list[Provider],
    ceil: dict,
    progress: Progress,
    sync: Callable[[], None],
) -> list[dict]:
    device = config.device
    provs = _providers_for(w, provs)
    tag = f"{w.name} {_dtype_name(dtype)}"
    started = time.perf_counter()
    progress.step(f"{tag}: inputs", 0)
    case = w.build(device, dtype, config.scale, config.seed)
    inp = case.inputs
    k = reference_rows(inp)
    sub = inp.head(k)
    ref = reference(sub)
    naive_sub = None
    if dtype not in (torch.float32, torch.float64):
        with torch.no_grad():
            naive_sub = naive_fn(sub)()
    allowed = tolerance(ref, naive_sub, dtype)
    del sub, naive_sub
    progress.step(f"{tag}: reference")

    status: dict[str, dict] = {}
    fns: dict[str, Callable[[], object]] = {}
    rss_in_check = config.memory and device.type == "cpu"
    memory_how = None
    for p in provs:
        progress.step(f"{tag}: check {p.name}", 0)
        rec: dict = {"label": p.label}
        status[p.name] = rec
        try:
            with environ(p.env):
                fn = p.prepare(inp)
            if isinstance(p, Compile) and p.compile_s is not None:
                rec["compile_s"] = round(p.compile_s, 3)
            step = _step(fn, inp)
            _grads_off(inp)
            if rss_in_check:  # on the CPU the check call also gives the memory: no extra (slow) call
                with environ(p.env):
                    peak, memory_how, out, warm = peak_memory(step, inp, device)
                rec["peak_mem_bytes"] = peak
            else:
                out, warm = _call(step, p.env, sync)
            _grads_off(inp)
            rec["warmup_ms"] = warm * 1e3
            rec["check"] = check_output(out, ref, allowed, inp.rows)
            del out
            if rec["check"]["ok"]:
                rec["status"] = "ok"
                fns[p.name] = step
            else:
                rec["status"] = "wrong"
        except Unsupported as e:
            rec.update(status="skipped", note=str(e))
            if isinstance(p, Compile) and p.compile_s is not None:
                rec["compile_s"] = round(p.compile_s, 3)
        except Exception as e:  # noqa: BLE001 - a failing provider is reported, the run goes on
            rec.update(status="error", note=_error_note(e))
            _grads_off(inp)
            _free(device)
        progress.step(f"{tag}: check {p.name}")

    by_name = {p.name: p for p in provs}
    methods = _methods_for(w, config)
    timings: dict[str, dict[str, dict]] = {m: {} for m in methods}
    if w.single_call:  # the check call was the measurement
        for method in methods:
            for name in fns:
                once = status[name]["warmup_ms"]
                timings[method][name] = {
                    "status": "ok",
                    "ms": {"median": once, "p20": once, "p80": once, "n": 1},
                }
        progress.step(f"{tag}: timing", len(provs) * len(methods))
    elif device.type == "cuda":
        for method in methods:
            for name in list(fns):
                p = by_name[name]
                progress.step(f"{tag}: {method} {name}", 0)
                try:
                    timings[method][name] = _time_cuda(method, p, fns[name], inp, config)
                except Unsupported as e:
                    timings[method][name] = {"status": "skipped", "note": str(e)}
                except Exception as e:  # noqa: BLE001
                    timings[method][name] = {"status": "error", "note": _error_note(e)}
                    _free(device)
                _grads_off(inp)
                progress.step(f"{tag}: {method} {name}")
            progress.step(f"{tag}: {method}", len(provs) - len(fns))
    else:
        progress.step(f"{tag}: timing", 0)
        calls = {name: (fns[name], by_name[name].env) for name in fns}
        target = CPU_TARGET_S * (2 if w.fixed_size else 1)  # the bar workload gets more samples
        measured = time_interleaved(calls, inp, device, config.repeats, target) if calls else {}
        for method in methods:
            timings[method] = {name: {"status": "ok", "ms": ms} for name, ms in measured.items()}
        progress.step(f"{tag}: timing", len(provs) * len(methods))

    if config.memory and not rss_in_check and not w.single_call:
        for name in fns:
            try:
                with environ(by_name[name].env):
                    peak, memory_how, out, _ = peak_memory(fns[name], inp, device)
                del out
                status[name]["peak_mem_bytes"] = peak
            except Exception as e:  # noqa: BLE001
                status[name]["peak_mem_bytes"] = None
                status[name]["memory_note"] = _error_note(e)
                _free(device)

    entries = []
    for method in methods:
        entries.append(_entry(case, dtype, method, status, timings[method], ceil, k, inp.rows, memory_how))
    full_size = case.dims == w.sizes
    for entry in entries:
        entry["elapsed_s"] = round(time.perf_counter() - started, 2)
        entry["single_call"] = w.single_call
        entry["bars"] = evaluate_bars(entry, w.bars, device.type, ceil, full_size)
    del case, inp, fns
    return entries


def _providers_for(w: Workload, provs: list[Provider]) -> list[Provider]:
    return [p for p in provs if w.providers is None or p.name in w.providers]


NOISE = 0.03  # BENCHMARKING.md: a bar holds within 3%, the run-to-run noise of do_bench medians


def memory_budget() -> int:
    """The torch backend's memory budget in bytes (``MAXSIM_MEMORY_BUDGET``, default 256 MiB)."""
    try:
        from maxsim.backends.torch_backend import memory_budget as budget

        return int(budget())
    except (ImportError, AttributeError):
        return int(os.environ.get("MAXSIM_MEMORY_BUDGET") or 256 * 2**20)


def evaluate_bars(entry: dict, bars: tuple, device_type: str, ceil: dict, full_size: bool) -> list[dict]:
    """Check an entry's ``maxsim`` row against the issues' bars for its workload.

    Each result: ``{"text", "metric", "op", "value", "measured", "verdict"}`` with verdict ``pass``,
    ``pass (within 3%)``, ``fail`` or ``n/a: why``. Bars are read only at full size, on their device,
    method and dtypes.
    """
    out = []
    ours = entry["providers"].get("maxsim", {})
    for bar in bars:
        if bar.device != device_type or entry["method"] not in bar.methods:
            continue
        if bar.dtypes is not None and entry["dtype"] not in bar.dtypes:
            continue
        metrics = [bar.metric]
        if bar.metric == "speedup:*":
            metrics = [f"speedup:{name}" for name in entry.get("maxsim_speedup", {})]
        for metric in metrics:
            res = {"text": bar.text, "metric": metric, "op": bar.op, "value": bar.value, "measured": None}
            measured, why = _bar_metric(metric, entry, ours, ceil)
            if not full_size:
                res["verdict"] = "n/a: scaled run (bars hold at full size)"
            elif measured is None:
                res["verdict"] = f"n/a: {why}"
            else:
                res["measured"] = measured
                strict = measured <= bar.value if bar.op == "<=" else measured >= bar.value
                loose = (
                    measured <= bar.value * (1 + NOISE)
                    if bar.op == "<="
                    else measured >= bar.value / (1 + NOISE)
                )
                res["verdict"] = "pass" if strict else ("pass (within 3%)" if loose else "fail")
            out.append(res)
    return out


def _bar_metric(metric: str, entry: dict, ours: dict, ceil: dict) -> tuple[float | None, str]:
    if ours.get("status") != "ok" or "ms" not in ours:
        return None, f"maxsim {ours.get('status', 'not run')}"
    for prefix, key in (("speedup:", "maxsim_speedup"), ("mem_ratio:", "maxsim_mem_ratio")):
        if metric.startswith(prefix):
            other = metric[len(prefix) :]
            value = entry.get(key, {}).get(other)
            if value is not None:
                return value, ""
            p = entry["providers"].get(other)
            if p is None:
                return None, f"{other} not installed"
            if p.get("status") != "ok":
                return None, f"{other} {p.get('status')}"
            return None, "memory not measured"  # only mem_ratio gets here: an ok provider has a speedup
    if metric == "ms":
        return ours["ms"]["median"], ""
    if metric == "matmul_fraction":
        return ours["tflops"] / ceil["matmul"]["tflops"], ""
    if metric == "peak_mem_budget":
        peak = ours.get("peak_mem_bytes")
        return (None, "memory not measured") if peak is None else (peak / memory_budget(), "")
    value = ours.get(metric)
    if value is None and metric == "x_floor_real":
        value = ours.get("x_floor")  # unpadded layouts: the real floor is the floor
    return value, "" if value is not None else f"no {metric}"


def _methods_for(w: Workload, config: Config) -> list[str]:
    """The timing methods a workload gets: training steps are not captured in CUDA graphs."""
    methods = [m for m in config.methods if not (w.train and m == "graph")]
    return methods or ["cold"]


def _time_cuda(method: str, p: Provider, step: Callable, inp: Inputs, config: Config) -> dict:
    """Time one provider: ``step`` is the checked call (validated: eager); cold and graph use the sync-free one."""
    repeats = config.repeats or 20
    with environ(p.env):
        if method == "eager":
            return {"status": "ok", "ms": time_eager(step, inp, config.device, max(3, repeats // 4))}
        fn = p.prepare(inp, sync_free=True)
        if method == "cold":
            return {"status": "ok", "ms": time_cold(_step(fn, inp), inp)}
        try:
            return {"status": "ok", "ms": time_graph(fn, repeats)}
        except Exception as e:  # noqa: BLE001 - capture failures are a property of the provider
            torch.cuda.synchronize()
            raise Unsupported(f"not capturable: {_error_note(e)}") from None


def _entry(
    case: Case,
    dtype: torch.dtype,
    method: str,
    status: dict[str, dict],
    timing: dict[str, dict],
    ceil: dict,
    k: int,
    rows: int,
    memory_how: str | None,
) -> dict:
    bw = ceil["copy"]["gbps"] * 1e9
    rate = ceil["matmul"]["tflops"] * 1e12
    bytes_ms = case.bytes_given / bw * 1e3
    real_ms = case.bytes_real / bw * 1e3
    flops_ms = case.flops / rate * 1e3
    floor_ms = max(bytes_ms, flops_ms)
    floor_real_ms = max(real_ms, flops_ms)
    padded = case.bytes_given != case.bytes_real and case.layout == "padded"
    provs: dict[str, dict] = {}
    for name, rec in status.items():
        out = dict(rec)
        t = timing.get(name)
        if t is not None:
            if t.get("status") != "ok":
                out["status"] = t["status"]
                out["note"] = t.get("note")
            else:
                ms = t["ms"]
                med = ms["median"]
                out["ms"] = ms
                out["x_floor"] = med / floor_ms
                if padded:
                    out["x_floor_real"] = med / floor_real_ms
                out["gbps"] = case.bytes_given / (med * 1e-3) / 1e9
                out["tflops"] = case.flops / (med * 1e-3) / 1e12
        provs[name] = out
    base = provs.get("maxsim", {}).get("ms", {}).get("median")
    base_mem = provs.get("maxsim", {}).get("peak_mem_bytes")
    speedup, mem_ratio = {}, {}
    for name, out in provs.items():
        med = out.get("ms", {}).get("median")
        if base and med:
            out["vs_maxsim"] = med / base
            if name != "maxsim":
                speedup[name] = med / base
        mem = out.get("peak_mem_bytes")
        if name != "maxsim" and out.get("status") == "ok" and base_mem is not None and mem:
            mem_ratio[name] = base_mem / mem
    return {
        "workload": case.name,
        "layout": case.layout,
        "shape": case.dims,
        "shape_id": case.shape_id,
        "dtype": _dtype_name(dtype),
        "method": method,
        "train": case.inputs.train,
        "pairs": case.pairs,
        "bytes": case.bytes_given,
        "bytes_real": case.bytes_real,
        "flops": case.flops,
        "floor_ms": {
            "bytes": bytes_ms,
            "bytes_real": real_ms,
            "flops": flops_ms,
            "floor": floor_ms,
            "floor_real": floor_real_ms,
            "bound": "bytes" if bytes_ms >= flops_ms else "flops",
        },
        "check": {"reference_rows": k, "rows": rows, "reference": "float64 maxsim.reference"},
        "memory": memory_how,
        "providers": provs,
        "maxsim_speedup": speedup,
        "maxsim_mem_ratio": mem_ratio,
    }
