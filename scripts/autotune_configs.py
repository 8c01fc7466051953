"""Regenerate the sm_90 rows of ``maxsim.backends.triton.configs.TABLE`` by timing candidates on a GPU.

For each shape class it times candidate configurations on representative problems (the bench workloads
of that class) with ``triton.testing.do_bench_cudagraph`` (median of graph replays), by coordinate descent from the
current row: each field in turn takes the value that minimises the geometric mean over the problems of
time / best time seen for that problem. It prints the table to paste into ``configs.py`` (between
``# BEGIN TABLE`` and ``# END TABLE``) and, with ``--json``, writes every timing.

Run on the GPU machine from the repository root:
    PYTHONPATH=src python scripts/autotune_configs.py --classes rerank,flops --budget 150 --json out.json
The table stays deterministic at call time: nothing here runs inside a maxsim call.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time

import torch

from maxsim.backends.triton import configs
from maxsim.backends.triton.forward import maxsim_fwd
from maxsim.backends.triton.varlen import maxsim_varlen_fwd
from maxsim.index import quantize

# class -> problems: (name, kind, sizes)
PROBLEMS = {
    "rerank": [
        ("SmallRerank", "padded", dict(P=32, Qn=1, Dn=10, Lq=32, Ld=180, D=128)),
        ("HeavyRerank", "padded", dict(P=32, Qn=1, Dn=100, Lq=32, Ld=256, D=128)),
        ("LongDocStress", "padded", dict(P=8, Qn=1, Dn=16, Lq=64, Ld=1024, D=128)),
        ("Rerank1k", "padded", dict(P=16, Qn=1, Dn=1000, Lq=32, Ld=300, D=128)),
        ("RaggedCorpus", "varlen", dict(Nd=20000, Lq=32, lo=75, hi=300, D=128)),
    ],
    "mid": [("Mid", "padded", dict(P=1, Qn=1, Dn=2000, Lq=128, Ld=256, D=128))],
    "flops": [("ColPali", "padded", dict(P=1, Qn=1, Dn=1000, Lq=1024, Ld=1024, D=128))],
    "rerank-wide": [("Wide", "padded", dict(P=16, Qn=1, Dn=50, Lq=32, Ld=300, D=1024))],
    # issue 6's search: 32 queries (16-bit), and with int8 / e4m3 codes for queries and documents
    "packed": [("Search32", "varlen", dict(Nd=20000, Nq=32, Lq=32, lo=128, hi=300, D=128))],
}
for codes in ("i8", "f8"):  # the class names its dtype: int8 / float8_e4m3fn, whatever --dtype says
    PROBLEMS[f"rerank-{codes}"] = [("SearchOneQuery", "varlen", dict(Nd=100000, Lq=32, lo=128, hi=300, D=128))]
    PROBLEMS[f"packed-{codes}"] = PROBLEMS["packed"]
CLASS_DTYPES = {"i8": torch.int8, "f8": torch.float8_e4m3fn}

# the fields each class tunes, most promising first (the budget may stop the descent early)
CHOICES = {
    "rerank": {
        "split_waves": [1.0, 2.0, 4.0, 8.0],
        "block_q": [32, 64],
        "num_stages": [2, 3, 4],
        "block_l": [32, 64, 128],
        "docs": [1, 2, 4],
        "num_warps": [4, 8],
        "block_d": [64, 128],
        "lane_max": [True, False],
    },
    "flops": {
        "block_q": [128, 256],
        "block_l": [32, 64, 128],
        "num_warps": [4, 8],
        "num_stages": [2, 3, 4],
        "split_waves": [1.0, 4.0],
        "lane_max": [False, True],
    },
}
CHOICES["mid"] = CHOICES["flops"]
CHOICES["rerank-wide"] = CHOICES["rerank"]
CHOICES["packed"] = {
    "doc_run": [1, 8, 16, 32],
    "num_warps": [4, 8],
    "block_l": [32, 64, 128],
    "num_stages": [2, 3, 4],
    "block_q": [128, 256],
    "lane_max": [False, True],
}
for codes in ("i8", "f8"):
    CHOICES[f"rerank-{codes}"] = {
        "doc_run": [1, 8, 16, 32],
        "block_l": [64, 128, 256],
        "num_stages": [2, 3, 4, 5],
        "num_warps": [4, 8],
        "lane_max": [True, False],
        "block_q": [32, 64],
    }
    CHOICES[f"packed-{codes}"] = CHOICES["packed"]


def build(kind, sizes, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape):  # unit rows; float32 where codes are made of them
        x = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
        return torch.nn.functional.normalize(x, dim=-1).to(torch.float32 if dtype.itemsize == 1 else dtype)

    if kind == "padded":
        s = sizes
        q = rnd(s["P"], s["Qn"], s["Lq"], s["D"])
        d = rnd(s["P"], s["Dn"], s["Ld"], s["D"])
        return lambda cfg: maxsim_fwd(q, d, None, None, normalize=False, return_argmax=False, config=cfg)
    s = sizes
    lengths = torch.randint(s["lo"], s["hi"] + 1, (s["Nd"],), generator=torch.Generator().manual_seed(1))
    cu_d = torch.zeros(s["Nd"] + 1, dtype=torch.int32)
    cu_d[1:] = lengths.cumsum(0)
    nq = s.get("Nq", 1)
    d = rnd(int(lengths.sum()), s["D"])
    q = rnd(nq * s["Lq"], s["D"])
    scales = {}
    if dtype.itemsize == 1:  # codes of both sides, as Index.search on int8 / e4m3 storage
        d, d_scales = quantize(d, dtype, lengths=lengths.tolist())
        q, q_scales = quantize(q, dtype, scale_tries=1)
        scales = dict(d_scales=d_scales, q_scales=q_scales)
    cu_q = torch.arange(0, (nq + 1) * s["Lq"], s["Lq"], dtype=torch.int32, device=device)
    cu_d = cu_d.to(device)
    max_ld = int(lengths.max())
    return lambda cfg: maxsim_varlen_fwd(
        q, cu_q, d, cu_d, None, None, max_lq=s["Lq"], max_ld=max_ld, normalize=False, return_argmax=False,
        config=cfg, **scales,
    )  # fmt: skip


def time_config(fn, cfg) -> float:
    """Kernel time (ms): CUDA-graph replays (no host overhead, whose noise would swamp small kernels)."""
    from triton.testing import do_bench_cudagraph

    try:
        fn(cfg)
        torch.cuda.synchronize()
        return do_bench_cudagraph(lambda: fn(cfg), rep=20, return_mode="median")
    except Exception as exc:  # out of resources: not a candidate
        print(f"    {cfg}: {type(exc).__name__}: {str(exc)[:120]}", file=sys.stderr)
        return math.inf


def tune(cls, dtype, device, deadline, log):
    problems = [(name, build(kind, sizes, dtype, device)) for name, kind, sizes in PROBLEMS[cls]]
    arch, _ = configs.device_info(device)
    start = configs.TABLE.get((arch, cls), configs.DEFAULT)
    seen: dict = {}
    best_per_problem = {name: math.inf for name, _ in problems}

    def measure(cfg):
        if cfg not in seen:
            seen[cfg] = {name: time_config(fn, cfg) for name, fn in problems}
            for name, ms in seen[cfg].items():
                best_per_problem[name] = min(best_per_problem[name], ms)
            log.append(
                {"class": cls, "dtype": str(dtype), "config": dataclasses.asdict(cfg), "ms": seen[cfg]}
            )
        return seen[cfg]

    def score(cfg):
        ms = measure(cfg)
        return math.exp(sum(math.log(ms[n] / best_per_problem[n]) for n in ms) / len(ms))

    current = start
    measure(current)
    for field, values in CHOICES[cls].items():
        for value in values:
            if time.time() > deadline:
                break
            measure(dataclasses.replace(current, **{field: value}))
        current = min((c for c in seen), key=score)
    best = min(seen, key=score)
    print(
        f"{cls} {dtype}: {best}  ({ {n: round(v * 1000, 1) for n, v in seen[best].items()} } us)", flush=True
    )
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", default="rerank,flops")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds for all classes together")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    classes = [c for c in args.classes.split(",") if c]
    arch, sms = configs.device_info(device)
    print(f"{torch.cuda.get_device_name(device)} ({arch}, {sms} SMs)", flush=True)
    log: list = []
    table = dict(configs.TABLE)
    t0 = time.time()
    for i, cls in enumerate(classes):
        deadline = t0 + args.budget * (i + 1) / len(classes)
        cls_dtype = CLASS_DTYPES.get(cls.rpartition("-")[2], dtype)
        table[(arch, cls)] = tune(cls, cls_dtype, device, deadline, log)
    print("# BEGIN TABLE")
    print("TABLE: dict[tuple[str, str], FwdConfig] = {")
    for (a, c), cfg in sorted(table.items()):
        fields = ", ".join(repr(getattr(cfg, f.name)) for f in dataclasses.fields(cfg))
        print(f'    ("{a}", "{c}"): FwdConfig({fields}),')
    print("}")
    print("# END TABLE")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"device": torch.cuda.get_device_name(device), "arch": arch, "timings": log}, fh, indent=1
            )


if __name__ == "__main__":
    main()
