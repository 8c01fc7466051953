"""Where a training step's time goes on a CUDA GPU: the bench's training workloads, stage by stage.

For each workload (bfloat16) it prints do_bench medians (L2 flushed) of the forward alone, the forward with
argmax, forward + backward of ``scores.sum()`` (the bench's training method), the backward kernels alone
from a saved argmax, the host time of one step (wall clock of issuing it, the GPU kept busy), and the
profiler's tables of GPU kernels and of host time for a few steps.

    PYTHONPATH=src python scripts/profile_train.py [--workloads InBatchTrain,ColPaliTrain]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
from triton.testing import do_bench

import maxsim
from maxsim.backends.triton import backward
from maxsim.backends.triton.backward import maxsim_bwd
from maxsim.backends.triton.configs import FwdConfig
from maxsim.backends.triton.forward import maxsim_fwd

FORWARD_CANDIDATES = [  # forward configurations tried with argmax (the training forward)
    FwdConfig(256, 64, 128, 1, 8, 3, 1.0, 2, False),
    FwdConfig(128, 64, 128, 1, 8, 3, 1.0, 2, True),
    FwdConfig(128, 64, 128, 1, 4, 3, 1.0, 2, True),
    FwdConfig(128, 32, 128, 1, 4, 3, 1.0, 2, True),
    FwdConfig(256, 32, 128, 1, 8, 3, 1.0, 2, True),
    FwdConfig(128, 64, 128, 1, 8, 4, 1.0, 2, True),
    FwdConfig(64, 64, 128, 1, 4, 3, 1.0, 2, True),
    # several documents per program: the query tile loaded once for them (in-batch: 2048 programs of 4 tiles
    # each load their own 256-row tile without)
    FwdConfig(256, 64, 128, 2, 8, 3, 1.0, 2, False),
    FwdConfig(256, 64, 128, 4, 8, 3, 1.0, 2, False),
    FwdConfig(128, 64, 128, 4, 4, 3, 1.0, 2, False),
    # wider tiles: each row's two reductions (max, then first index) cost their shuffles once per 128 columns
    FwdConfig(128, 128, 128, 1, 8, 3, 1.0, 2, False),
    FwdConfig(256, 128, 128, 1, 8, 2, 1.0, 2, False),
]


# backward blocks tried (backward.DQ_BLOCKS / DD_BLOCKS: three block sizes, then warps)
DQ_CANDIDATES = [(2, 16, 128, 2), (8, 4, 128, 2), (4, 4, 128, 1), (16, 2, 128, 2), (2, 32, 128, 4)]
DD_CANDIDATES = [(1, 8, 128, 1), (1, 4, 128, 1), (1, 16, 128, 1), (2, 8, 128, 2)]
CHUNK_CANDIDATES = [256, 512, 2048, 4096]  # backward.MAX_CHUNK: entries per chunk of the dd counting sort
SORT_WARPS_CANDIDATES = [(2, 2), (8, 8), (4, 8), (8, 4)]  # backward.SORT_WARPS: the count / place kernels' warps


def _with_settings(settings: dict, fn):
    """Run ``fn`` with the ``backward`` module's attributes set as ``settings`` says."""
    saved = {name: getattr(backward, name) for name in settings}
    for name, value in settings.items():
        setattr(backward, name, value)
    try:
        return fn()
    finally:
        for name, value in saved.items():
            setattr(backward, name, value)


def _step(q, d):
    q.grad = d.grad = None
    maxsim.maxsim(q[:, None], d[None], validate=False).sum().backward()


def _host_us(fn, calls: int = 10) -> float:
    """Wall time of issuing ``calls`` calls behind a long GPU sleep (the GPU never waits for the host).

    Few calls: a training step launches about ten kernels, and once the driver's launch queue is full the
    host waits for the sleeping GPU, which would count GPU time as host time."""
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU time: the calls below only queue
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    return elapsed


def profile(
    name: str, nq: int, nd: int, lq: int, ld: int, dim: int = 128, cprofile: bool = False, forwards: bool = True
) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(nq, lq, dim, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    d = torch.randn(nd, ld, dim, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    with torch.no_grad():
        _, argmax = maxsim.maxsim(q[:, None], d[None], return_argmax=True)
    g = torch.ones(1, nq, nd, device="cuda")
    qp, dp, am = q.detach()[None], d.detach()[None], argmax[None]
    rows = {
        "forward": lambda: maxsim.maxsim(q.detach()[:, None], d.detach()[None], validate=False),
        "forward+argmax": lambda: maxsim.maxsim(
            q.detach()[:, None], d.detach()[None], validate=False, return_argmax=True
        ),
        "train step": lambda: _step(q, d),
        "backward dq": lambda: maxsim_bwd(qp, dp, am, g, normalize=False, need_dq=True, need_dd=False),
        "backward dd": lambda: maxsim_bwd(qp, dp, am, g, normalize=False, need_dq=False, need_dd=True),
    }
    for cfg in FORWARD_CANDIDATES if forwards else ():
        label = (
            f"fwd+argmax {cfg.block_q}/{cfg.block_l}/{cfg.docs}d/{cfg.num_warps}w/{cfg.num_stages}s"
            f"/lane{int(cfg.lane_max)}"
        )
        rows[label] = lambda c=cfg: maxsim_fwd(qp, dp, None, None, normalize=False, return_argmax=True, config=c)
    # each backward candidate: (label, the backward module's settings, the stage it times)
    candidates = [(f"dq blocks {b}", {"DQ_BLOCKS": b, "DQ_MIN_PROGRAMS": 0}, "backward dq") for b in DQ_CANDIDATES]
    candidates += [(f"dd blocks {b}", {"DD_BLOCKS": b}, "backward dd") for b in DD_CANDIDATES]
    candidates += [(f"dd chunk {c}", {"MAX_CHUNK": c}, "backward dd") for c in CHUNK_CANDIDATES]
    candidates += [(f"dd sort warps {w}", {"SORT_WARPS": w}, "backward dd") for w in SORT_WARPS_CANDIDATES]
    for label, settings, stage in candidates:
        rows[label] = lambda s=settings, fn=rows[stage]: _with_settings(s, fn)
    print(f"== {name}: Nq={nq} Nd={nd} Lq={lq} Ld={ld} D={dim} bfloat16")
    for label, fn in rows.items():
        print(f"  {label:<16} {do_bench(fn) * 1e3:9.1f} us  (host {_host_us(fn):7.1f} us/call)")
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(5):
            _step(q, d)
        torch.cuda.synchronize()
    events = prof.key_averages()
    print(events.table(sort_by="cuda_time_total", row_limit=12))
    print("-- host side of the same 5 steps (every thread, the autograd engine's included)")
    print(events.table(sort_by="self_cpu_time_total", row_limit=25))
    if cprofile:
        for label in ("train step", "backward dd"):
            print(f"-- cProfile of 20 calls of {label} (host)")
            torch.cuda.synchronize()
            torch.cuda._sleep(2_000_000_000)
            stats = cProfile.Profile()
            stats.runcall(lambda fn=rows[label]: [fn() for _ in range(20)])
            torch.cuda.synchronize()
            pstats.Stats(stats).sort_stats("tottime").print_stats(15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="InBatchTrain,ColPaliTrain")
    parser.add_argument("--cprofile", action="store_true", help="also print a cProfile of 20 steps (host)")
    parser.add_argument("--no-forward-candidates", action="store_true", help="time only the backward candidates")
    shapes = {"InBatchTrain": (128, 128, 32, 256), "ColPaliTrain": (32, 32, 1024, 1024)}
    args = parser.parse_args()
    for name in args.workloads.split(","):
        profile(name, *shapes[name], cprofile=args.cprofile, forwards=not args.no_forward_candidates)


if __name__ == "__main__":
    main()
