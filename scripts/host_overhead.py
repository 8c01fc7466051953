"""Host time per call on a CUDA GPU: the public call, its stages, and the peers, for small workloads.

Small reranking calls are bound by the host (Python and the launch), not the GPU. This prints, per
workload, the wall time per call of 2,000 back-to-back calls (best of 5 rounds, synchronized around each
round) for: ``maxsim.maxsim`` as a user calls it, the same with ``validate=False``, the backend launcher
alone, an empty ``torch.empty`` of the output, and each peer through the bench's providers; then a
cProfile of the public call.

    PYTHONPATH=src python scripts/host_overhead.py [--workloads SmallRerank,LongDocStress] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

import maxsim
from maxsim.bench import baselines
from maxsim.bench.workloads import select

CALLS = 2000
ROUNDS = 5


def per_call_us(fn) -> float:
    """Best-of-rounds wall time per call (µs) of ``CALLS`` back-to-back calls."""
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(ROUNDS):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(CALLS):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / CALLS * 1e6)
    return best


def _rows(inp, device: torch.device) -> dict:
    """The calls to time for one candidates workload: ours, its stages, naive and the peers."""
    from maxsim.backends.triton.forward import maxsim_fwd

    q, d = inp.q, inp.d
    rows = {
        "maxsim.maxsim": lambda: maxsim.maxsim(q[:, None], d),
        "maxsim.maxsim validate=False": lambda: maxsim.maxsim(q[:, None], d, validate=False),
        "launcher (maxsim_fwd)": lambda: maxsim_fwd(
            q[:, None], d, None, None, normalize=False, return_argmax=False
        ),
        "torch.empty of the scores": lambda: torch.empty(q.shape[0], 1, d.shape[1], device=device),
    }
    provs, _ = baselines.providers(device, compile_mode="off")
    for p in provs:
        if p.name in ("flash-maxsim", "late-interaction-kernels", "naive"):
            rows[p.name] = p.prepare(inp)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="SmallRerank,LongDocStress")
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of the public call")
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)

    for w in select(args.workloads, "cuda"):
        inp = w.build(device, dtype).inputs
        if inp.layout != "candidates":
            raise SystemExit(f"{w.name}: only candidate layouts are timed here")
        rows = _rows(inp, device)
        print(f"{w.name} {args.dtype} ({torch.cuda.get_device_name()}): host µs per call")
        for name, fn in rows.items():
            print(f"  {name:32s} {per_call_us(fn):8.1f}")
        if args.profile:
            prof = cProfile.Profile()
            fn = rows["maxsim.maxsim"]
            prof.enable()
            for _ in range(CALLS):
                fn()
            prof.disable()
            torch.cuda.synchronize()
            pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
