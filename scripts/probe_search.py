"""Time the packed search kernel on issue 6's corpus: the numbers that tune the "packed" rows of configs.py.

On a GPU (through the device tool), from the repository root:

    PYTHONPATH=src python scripts/probe_search.py [--label NAME] [--sweep]

prints one JSON object (do_bench medians in ms, L2 flushed): the varlen kernel alone on 32 queries of 32 tokens
against the 100k-document corpus of ``maxsim bench-search`` (``kernel``; ``kernel_per_doc`` with one document per
program), ``maxsim.topk``, and ``Index.search`` per storage dtype on 32 queries and on one. ``--sweep`` adds
variations of the float16 and quantized "packed" rows. To compare two versions of the kernels in one device
call, run it once per source tree (``PYTHONPATH=<tree>/src``) with different labels.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch
import triton

import maxsim
from maxsim.backends.triton import configs
from maxsim.backends.triton.varlen import maxsim_varlen_fwd
from maxsim.bench.search import DIM, QUERY_TOKENS, clustered_corpus

FLOAT16_SWEEP = ({"block_l": 32}, {"num_warps": 4}, {"num_stages": 2}, {"num_stages": 4}, {"doc_run": 8},
                 {"doc_run": 64}, {"block_q": 128}, {"block_q": 128, "num_warps": 4},
                 {"block_q": 128, "num_warps": 4, "num_stages": 2})  # fmt: skip
CODES_SWEEP = ({"block_l": 32}, {"block_l": 64}, {"block_l": 128}, {"block_q": 128, "block_l": 64},
               {"block_q": 128, "block_l": 128}, {"block_l": 64, "num_stages": 4}, {"block_l": 64, "num_stages": 2},
               {"num_warps": 8, "block_l": 64}, {"doc_run": 1})  # fmt: skip


def median_ms(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="probe")
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("probe_search needs a CUDA GPU")
    dev = torch.device("cuda")
    tokens, cu, q = clustered_corpus(args.docs, 32, dev)
    q_packed = q.reshape(-1, DIM)
    cu_q = torch.arange(0, q.shape[0] * QUERY_TOKENS + 1, QUERY_TOKENS, device=dev)
    packed = configs.TABLE[("sm_90", "packed")]
    longest = int((cu[1:] - cu[:-1]).max())  # read once: a sync inside the timed calls would be timed too

    def kernel(cfg=None):
        return maxsim_varlen_fwd(
            q_packed, cu_q, tokens, cu, None, None, max_lq=QUERY_TOKENS, max_ld=longest, normalize=False,
            return_argmax=False, config=cfg,
        )[0]  # fmt: skip

    per_doc = dataclasses.replace(packed, doc_run=1)
    reference = kernel(per_doc)
    res = {"label": args.label, "device": torch.cuda.get_device_name(), "kernel_vs_per_doc_max_abs":
           float((kernel() - reference).abs().max())}  # fmt: skip
    res["kernel"] = median_ms(kernel)
    res["kernel_per_doc"] = median_ms(lambda: kernel(per_doc))
    res["topk-32"] = median_ms(lambda: maxsim.topk(q, tokens, 10, cu_seqlens_d=cu))
    res["topk-1"] = median_ms(lambda: maxsim.topk(q[:1], tokens, 10, cu_seqlens_d=cu))
    for dtype in (torch.float16, torch.float8_e4m3fn, torch.int8):
        index = maxsim.Index(DIM, dtype, device=dev)
        index.add((tokens, cu))
        name = str(dtype).removeprefix("torch.")
        search = index.search
        _, ids = search(q, 10)
        res[f"{name}-32"] = median_ms(lambda search=search: search(q, 10))
        res[f"{name}-1"] = median_ms(lambda search=search: search(q[:1], 10))
        if args.sweep and dtype != torch.float16:
            key = ("sm_90", "packed-f8" if dtype == torch.float8_e4m3fn else "packed-i8")
            row = configs.TABLE[key]
            for change in CODES_SWEEP:
                configs.TABLE[key] = dataclasses.replace(row, **change)
                res[f"{name}-32 {change}"] = median_ms(lambda search=search: search(q, 10))
                res[f"{name}-32 {change} same ids"] = bool((search(q, 10)[1] == ids).all())
            configs.TABLE[key] = row
        del index, search
    if args.sweep:
        for change in FLOAT16_SWEEP:
            cfg = dataclasses.replace(packed, **change)
            res[f"kernel {change}"] = median_ms(lambda cfg=cfg: kernel(cfg))
            res[f"kernel {change} max abs"] = float((kernel(cfg) - reference).abs().max())
    print(json.dumps(res))


if __name__ == "__main__":
    main()
