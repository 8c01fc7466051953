r"""Distributed search benchmark: queries/s of ``maxsim.distributed.ShardedIndex``, launched by ``torchrun``.

    torchrun --standalone --nproc-per-node 2 -m maxsim.bench.distributed --quick    (CPU smoke run, gloo)
    torchrun --standalone --nproc-per-node 4 -m maxsim.bench.distributed --json out.json   (4 GPUs, NCCL)
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        -m maxsim.bench.distributed                                        (2 hosts of 8 GPUs)

Every rank builds the same seeded corpus (ragged documents of unit tokens, added in batches) and keeps its
shard. Timed: batches of 32 queries of 32 tokens; per batch the wall clock from a barrier to the merged
top-k on the rank (local top-k, ``all_gather``, merge), the slowest rank's, after warm-up. Then one
``maxsim.Index`` holding the whole corpus on rank 0's device searches the same batches, timed the same way
for the speedup, and its results check the sharded ones: scores within DESIGN.md's float32 tolerance, ids
equal but where near-equal scores may swap (``--no-check`` skips it, for corpora that do not fit one device).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch
import torch.distributed as dist

from ..distributed import ShardedIndex
from ..index import QUANT_MAX, Index
from . import report, system
from .runner import _quantiles

SCHEMA = "maxsim-bench-dist/1"
ADD_BATCH = 4096  # documents per add call while building the corpus
METHOD = (
    "wall clock per batch of queries from a barrier to the merged top-k (CUDA synchronized), the slowest "
    "rank's, after warm-up; queries/s = queries per batch / median"
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m maxsim.bench.distributed",
        description="Queries/s of a ShardedIndex over the ranks of torchrun (one shard per rank).",
    )
    p.add_argument("--backend", choices=("nccl", "gloo"), help="default: nccl with CUDA, else gloo")
    p.add_argument("--docs", type=int, help="documents (default 100000 on CUDA, 1000 on the CPU)")
    p.add_argument("--min-len", type=int, default=32, help="shortest document (default 32 tokens)")
    p.add_argument("--max-len", type=int, default=256, help="longest document (default 256 tokens)")
    p.add_argument("--dim", type=int, default=128, help="token dimension (default 128)")
    p.add_argument(
        "--dtype", default="float16", choices=("float16", "bfloat16", "float8_e4m3fn", "int8"),
        help="storage dtype (default float16)",
    )  # fmt: skip
    p.add_argument("--k", type=int, default=10, help="documents per query (default 10)")
    p.add_argument("--queries", type=int, default=32, help="queries per batch (default 32)")
    p.add_argument("--query-len", type=int, default=32, help="tokens per query (default 32)")
    p.add_argument("--batches", type=int, default=20, help="timed batches (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first (default 3)")
    p.add_argument("--seed", type=int, default=0, help="corpus and query seed (default 0)")
    p.add_argument("--no-check", action="store_true", help="no single-index check and speedup")
    p.add_argument("--timeout", type=float, default=600, help="seconds any collective may wait (default 600)")
    p.add_argument("--json", metavar="PATH", help="write the results JSON here (rank 0)")
    p.add_argument(
        "--quick", action="store_true",
        help="smoke run: 64 documents of 8-32 tokens, D 32, 3 timed batches after 1 warm-up",
    )  # fmt: skip
    return p


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def _corpus_batches(args, device: torch.device):
    """The seeded corpus in ``ADD_BATCH``-document pieces ``(tokens [T, D], cu_seqlens [n+1])``, float32,
    the same on every rank (lengths drawn on the CPU, tokens on ``device``)."""
    lengths = torch.randint(
        args.min_len, args.max_len + 1, (args.docs,), generator=torch.Generator().manual_seed(args.seed)
    )
    g = torch.Generator(device).manual_seed(args.seed + 1)
    for start in range(0, args.docs, ADD_BATCH):
        part = lengths[start : start + ADD_BATCH]
        cu = torch.zeros(part.shape[0] + 1, dtype=torch.int64)
        cu[1:] = part.cumsum(0)
        tokens = _unit(torch.randn(int(cu[-1]), args.dim, generator=g, device=device))
        yield tokens, cu


def _time_batches(search, batches: list, warmup: int, device: torch.device, barrier) -> tuple[list, list]:
    """Milliseconds per batch of ``search(q)`` but the first ``warmup`` batches, and every batch's result."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, results = [], []
    for i, q in enumerate(batches):
        barrier()
        sync()
        start = time.perf_counter()
        results.append(search(q))
        sync()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return times, results


def _check(got: list, want: list) -> dict:
    """Sharded against single-index results of every batch: DESIGN.md's float32 tolerance on the scores,
    the fraction of equal ids."""
    scores, ids = (torch.cat([r[i] for r in got]) for i in (0, 1))
    ref_scores, ref_ids = (torch.cat([r[i] for r in want]) for i in (0, 1))
    bound = 1e-4 * ref_scores.abs().clamp(min=1.0)
    err = (scores - ref_scores).abs()
    return {
        "status": "ok" if bool((err <= bound).all()) else "wrong",
        "max_score_err": float(err.max()),
        "ids_match": int((ids == ref_ids).sum()) / ids.numel(),  # exact: a float32 mean may round 1 down
    }


def run(args: argparse.Namespace) -> dict:
    """Build, check and time on this rank (collective); returns the results (complete on rank 0)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    dtype = getattr(torch, args.dtype)
    start = time.perf_counter()

    def log(message: str) -> None:  # progress on rank 0's stderr (with its GPU memory)
        if rank == 0:
            held = f", {torch.cuda.memory_reserved(device) / 1e9:.1f} GB reserved" if nccl else ""
            print(f"[{time.perf_counter() - start:7.1f} s] {message}{held}", file=sys.stderr, flush=True)

    sharded = ShardedIndex(args.dim, dtype, device)
    one = Index(args.dim, dtype, device) if rank == 0 and not args.no_check else None
    built, step = 0, max(args.docs // 10, 1)
    for tokens, cu in _corpus_batches(args, device):
        sharded.add((tokens, cu))
        if one is not None:
            one.add((tokens, cu))
        built += cu.shape[0] - 1
        if built // step != (built - cu.shape[0] + 1) // step or built == args.docs:
            log(f"built {built} / {args.docs} documents")
    qdtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float16
    g = torch.Generator(device).manual_seed(args.seed + 2)
    shape = (args.queries, args.query_len, args.dim)
    batches = [
        _unit(torch.randn(shape, generator=g, device=device)).to(qdtype)
        for _ in range(args.warmup + args.batches)
    ]
    log("searching the sharded index")
    sharded_ms, got = _time_batches(
        lambda q: sharded.search(q, args.k), batches, args.warmup, device, dist.barrier
    )
    times = torch.tensor(sharded_ms, dtype=torch.float64, device=device)  # NCCL reduces CUDA tensors only
    dist.all_reduce(times, op=dist.ReduceOp.MAX)  # a batch takes as long as its slowest rank
    single, check = None, {"status": "skipped"}
    if one is not None:
        log("searching one index on rank 0")
        single_ms, want = _time_batches(
            lambda q: one.search(q, args.k), batches, args.warmup, device, lambda: None
        )
        single, check = _quantiles(single_ms), _check(got, want)
    dist.barrier()
    sharded_q = _quantiles(times.tolist())
    tokens = sum(t for _, t in sharded.shard_sizes)
    token_bytes = args.dim * dtype.itemsize + (4 if dtype in QUANT_MAX else 0)  # a float32 scale per token

    def qps(ms: dict) -> float:
        return args.queries / ms["median"] * 1e3

    return {
        "schema": SCHEMA,
        "method": METHOD,
        "backend": dist.get_backend(),
        "world_size": world,
        "device": system.device_info(device),
        "threads": torch.get_num_threads(),
        "versions": system.versions(),
        "git": system.git_commit(),
        "workload": {
            "docs": args.docs,
            "tokens": tokens,
            "corpus_gb": tokens * token_bytes / 1e9,  # stored tokens and their scales (int8 / e4m3)
            "min_len": args.min_len,
            "max_len": args.max_len,
            "dim": args.dim,
            "dtype": args.dtype,
            "k": args.k,
            "queries_per_batch": args.queries,
            "query_len": args.query_len,
        },
        "shards": sharded.shard_sizes,
        "check": check,
        "sharded": {"ms": sharded_q, "queries_per_s": qps(sharded_q)},
        "single": None if single is None else {"ms": single, "queries_per_s": qps(single)},
        "speedup": None if single is None else single["median"] / sharded_q["median"],
    }


def summary(results: dict) -> str:
    """The lines rank 0 prints."""
    w, dev, s = results["workload"], results["device"], results["sharded"]
    lines = [
        f"maxsim bench (distributed) | {results['world_size']} ranks, {results['backend']}, {dev.get('name')}"
        " | "
        f"{w['docs']} documents, {w['tokens']} tokens ({w['corpus_gb']:.2f} GB), D {w['dim']}, {w['dtype']} | "
        f"{w['queries_per_batch']} queries x {w['query_len']} tokens, k {w['k']}",
        f"method: {results['method']}",
        f"shards (documents, tokens): {results['shards']}",
        f"check against one Index: {results['check']}",
        f"sharded: {s['ms']['median']:.3f} ms per batch (p20 {s['ms']['p20']:.3f}, "
        f"p80 {s['ms']['p80']:.3f}), {s['queries_per_s']:.1f} queries/s",
    ]
    if results["single"] is not None:
        one = results["single"]
        lines.append(
            f"one Index on rank 0: {one['ms']['median']:.3f} ms per batch, {one['queries_per_s']:.1f} "
            f"queries/s; speedup {results['speedup']:.2f}x"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point under ``torchrun``; returns the exit status (1 when the check fails)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.quick:
        args.docs = args.docs or 64
        args.min_len, args.max_len, args.dim = 8, 32, 32
        args.batches, args.warmup = 3, 1
    if "RANK" not in os.environ:
        parser.error(
            "launch it with torchrun: torchrun --standalone --nproc-per-node 2 -m maxsim.bench.distributed"
        )
    backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if args.docs is None:
        args.docs = 100_000 if backend == "nccl" else 1000
    for name in ("docs", "min_len", "dim", "k", "queries", "query_len", "batches"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_len < args.min_len or args.warmup < 0 or args.k > args.docs:
        parser.error("need --min-len <= --max-len, --warmup >= 0 and --k <= --docs")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout))
    try:
        results = run(args)
    finally:
        dist.destroy_process_group()
    if int(os.environ["RANK"]) == 0:
        print(summary(results), flush=True)
        if args.json:
            print(f"wrote {report.write_json(results, args.json)}")
    return 1 if results["check"]["status"] == "wrong" else 0


if __name__ == "__main__":
    sys.exit(main())
