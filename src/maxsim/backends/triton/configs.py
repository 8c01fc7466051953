"""Launch configurations of the Triton forward kernels: a table keyed by (architecture, shape class).

Deterministic at call time (no autotuning inside a call, so CUDA-graph capture and ``torch.compile`` see
the same launch every time). ``scripts/autotune_configs.py`` regenerates the sm_90 rows on a GPU and
prints the table to paste here.

The sm_90 rows (H100/H200) are tuned and tested there. Every other architecture (and the Triton
interpreter on the CPU) gets ``DEFAULT``: a conservative configuration, correct everywhere, untested for
speed.

Shape classes (``shape_class``):

- ``rerank``: ``Lq <= 64`` (bytes-bound: few query rows share each document);
- ``mid``: ``64 < Lq < 256``;
- ``flops``: ``Lq >= 256`` (ColPali-like, FLOP-bound);
- ``packed``: several queries of ``Lq <= 64`` against the same documents (all pairs, in-batch training):
  ``block_q`` rows hold ``block_q / pow2(Lq)`` whole queries, so each document tile feeds a taller dot;

each with a ``-f32`` variant for float32 inputs (twice the bytes per element: smaller tiles) and a ``-wide``
variant for ``D > 256`` (the query tile no longer stays in registers); queries quantized to int8 / float8
codes (``Index.search`` on int8 / e4m3 storage: one byte per element, the int8 / float8 tensor cores) have
``-i8`` / ``-f8`` variants of ``rerank`` and ``packed`` (the two tensor-core paths tune differently).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FwdConfig:
    """One launch configuration of the forward kernels.

    Attributes:
        block_q: query tokens per program (a power of two >= 16; cut to ``Lq`` rounded up).
        block_l: document tokens per tile (power of two >= 16).
        block_d: embedding columns per tile (power of two >= 16); ``D <= block_d`` keeps the query tile
            in registers for the whole document.
        docs: documents per program of the padded kernel (the query tile is loaded once for all of them).
        num_warps, num_stages: Triton launch options.
        split_waves: split the document axis when the grid has fewer than ``split_waves`` programs per
            multiprocessor.
        min_split_tiles: each split covers at least this many ``block_l`` tiles.
        lane_max: keep the running maximum elementwise over the tile and reduce once per document (best
            when bytes-bound); False reduces every tile (fewer registers: best for large FLOP-bound tiles).
        doc_run: documents per program of a varlen all-pairs launch without argmax, in one tile loop
            across them (a power of two; ``varlen.run_length`` shortens it for small launches).
    """

    block_q: int = 64
    block_l: int = 64
    block_d: int = 64
    docs: int = 1
    num_warps: int = 4
    num_stages: int = 2
    split_waves: float = 2.0
    min_split_tiles: int = 2
    lane_max: bool = True
    doc_run: int = 1


DEFAULT = FwdConfig()

# Regenerate with `python scripts/autotune_configs.py` on an sm_90 GPU. Keys: (arch, shape class).
# Measured on an H100 80GB HBM3 (2026-11-25, bfloat16): "rerank" by the script (graph replays:
# SmallRerank 6.3 us, HeavyRerank 71.2 us, LongDocStress 10.4 us, Rerank1k 393 us, RaggedCorpus 305 us);
# "flops" by its first version (do_bench, per-tile reduction: ColPali 470 us, 572 TFLOP/s; the elementwise
# running max measured 560-650 us there). The other rows are educated defaults, not tuned.
# "rerank" splits only below half a wave: LongDocStress (128 programs) measured 8.5 us unsplit against
# 9.3 / 10.4 us split in 2 / 3 (graph replays), and one launch instead of two saves ~20 us of host time.
# "packed" against 6 other candidates on issue 6's search (Index.search, float16, 32 queries of 32 tokens,
# 100k documents; do_bench, H100, 2026-11-25): 15.8 ms as in the table, 15.9 with 4 warps, 17.2 with
# block_l 32, 19.2 with 4 stages, 20-27 with block_l 128 or block_q 128.
# doc_run (varlen all pairs without argmax) on the same search, kernel only (do_bench median, L2 flushed,
# H100, 2026-12-05, 0eda28e): packed float16 15.3 ms with runs of 1, 14.1 of 8, 13.8 of 32 (17.9 with
# block_l 32, 15.8 block_l 128, 13.9 4 warps, 16.4 4 stages); one query ("rerank") 1.73 ms with 1,
# 1.78-1.94 with runs: kept at 1. Codes (queries quantized, e4m3 / int8): packed 34.0 / 14.7 ms as
# "packed", 15.0 / 19.4 with runs of 32 and 4 warps, 20-50 / 22-36 otherwise: the two tensor-core paths
# want different rows ("-f8", "-i8"); one query 1.38 / 0.96 as "rerank", 1.34 / 0.98 with runs of 32 and
# block_l 128.
# "packed" docs (documents per program of the padded kernel; the varlen search does not read it): the
# in-batch training forward with argmax (128 x 128 queries of 32 tokens against 256, bfloat16, do_bench,
# H100, 2026-12-05, scripts/profile_train.py at 7b474d6) 138.0 us with 1, 133.3 with 2, 129.1 with 4
# (123.5 with block_q 128 and 4 warps, not taken: those would change the search's row too).
# "packed-i8" once int8 sums reach float32 by their bits (100e3bd; kernel only, issue 6's 100k-document search,
# 32 queries, do_bench median, H100, 2026-12-06): 4 warps 13.41 ms (15.53 with the conversion), 8 warps 15.73
# (14.92 with it), runs of 32 on 4 warps 13.89, on 8 warps 37.0; float16's "packed" row 14.82 in the same run.
# With the scales loaded a tile ahead (c8ece26; same probe, H100, 2026-12-06): "packed-i8" 11.74 ms (runs of 32
# 11.87, 3 -> 2 stages 12.96, 8 warps 16.73); "packed-f8" 14.49 (runs of 1 on 2 stages 14.83, was 17.81);
# float16's "packed" 13.77-14.34 in the same process: the rows stay.
# With float8 dots summed once per 128 products and int8 sums scaled by one fused multiply-add (e488cb6; same
# probe, H100, 2026-12-06): "packed-f8" 10.39 ms (runs of 32 on 4 warps 10.41), "packed-i8" 11.27 (11.26);
# float16 13.9. One query with 64-row float8 dots (93a64f6): "rerank-f8" 0.97 ms, block_l 128 with runs of 1
# 1.09, block_l 64 with runs of 32 1.08, runs of 1 1.17; "rerank-i8" 0.90 (block_l 128 1.02, 8 warps 1.04).
# A sweep of both "packed" code rows at 3781d5b (same probe, H100, 2026-12-06; float16 14.0 / 13.87 ms):
# "packed-i8" 11.40 as it was, 9.95 with block_l 32 (taken: bench-search 11.6 -> 10.3 ms, 0.73x float16),
# 4 stages 11.34, 2 stages 12.58, block_q 128 12.94, 8 warps 16.3, block_l 128 19.2, elementwise maximum 24.5;
# "packed-f8" 10.42 as it is, elementwise maximum 10.26, 4 stages 10.60, runs of 8 10.68 / 1 10.87 / 64 11.07,
# block_l 32 11.73, block_q 128 11.94, 2 stages 12.19, 8 warps 15.74, block_l 128 18.1: the row stays.
# The packed search kernel summing a document's row maxima only on its last tile (not every tile: a reduction
# across warps) and launching the query groups of a run of documents together (they read its tiles once from
# memory, then from the L2): scripts/probe_search.py (kernel only, 32 queries, H100, 2026-12-06): float16 13.83 ->
# 12.73 ms (launch order alone 13.11), e4m3 index 10.76 -> 10.06. Tiles running across document ends (no part
# empty last tiles) measured 13.66: two more row reductions on each tile holding an end cost more than the
# empty columns they saved.
# Runs of documents stepping from tile to tile with scalars (one warp reduction for the next document's length,
# not a 3-value reduction over the lanes per tile; kernel only, 32 queries, H100, 2026-12-06, both trees in one
# call): float16 "packed" 12.36 -> 10.80 ms (4 warps 11.43, runs of 64 11.26, 2 stages 11.83, block_q 128 on 4
# warps 12.8); e4m3 index 9.94 -> 9.04; int8 index with runs of 32 9.32 (runs of 1 10.14, of 8 13.8, block_l 64
# 9.70): "packed-i8" takes runs of 32.
# The quantized rows swept again with a query's rows in one warp (282483e; same probe, H100, 2026-12-06; float16
# 11.01 ms): "packed-f8" 8.36 (4 stages 8.22, 8 warps 9.16, block_q 128 9.08, block_l 32 9.06, runs of 1 10.85;
# before 282483e 4 stages measured 9.08 against 8.99: the row stays); "packed-i8" 9.01 (4 stages 9.02, block_l
# 64 9.20, block_q 128 9.79, 8 warps 10.22, runs of 1 10.24).
# int8 tile maxima taken on integers (scales on a grid per document) and a document's last tile re-reading its
# last token instead of masking (e7dfa39; same probe, H100, 2026-12-06, against 9f8c8d7 in the same call):
# int8 index 9.02 -> 9.78 ms with block_l 32, 8.88 with block_l 64 (taken), 8 warps 10.26-12.08, block_q 128
# 10.18; e4m3 index 8.36 -> 8.06; float16 kernel 10.90 -> 10.89. With a tile's largest scale reduced inside each
# warp (f6f0660; no sweep of the rows since): bench-search int8 index 8.31 ms, float16 11.36 (H100, 2026-12-06).
# BEGIN TABLE
TABLE: dict[tuple[str, str], FwdConfig] = {
    ("sm_90", "flops"): FwdConfig(256, 64, 128, 1, 8, 3, 1.0, 2, False, 1),
    ("sm_90", "flops-f32"): FwdConfig(64, 64, 64, 1, 4, 2, 1.0, 2, False, 1),
    ("sm_90", "flops-wide"): FwdConfig(128, 64, 128, 1, 8, 3, 1.0, 2, False, 1),
    ("sm_90", "flops-wide-f32"): FwdConfig(64, 64, 64, 1, 4, 2, 1.0, 2, False, 1),
    ("sm_90", "mid"): FwdConfig(64, 64, 128, 1, 4, 3, 2.0, 2, True, 1),
    ("sm_90", "mid-f32"): FwdConfig(64, 64, 64, 1, 4, 2, 2.0, 2, True, 1),
    ("sm_90", "mid-wide"): FwdConfig(64, 64, 128, 1, 4, 3, 2.0, 2, True, 1),
    ("sm_90", "mid-wide-f32"): FwdConfig(64, 64, 64, 1, 4, 2, 2.0, 2, True, 1),
    ("sm_90", "packed"): FwdConfig(256, 64, 128, 4, 8, 3, 1.0, 2, False, 32),
    ("sm_90", "packed-f8"): FwdConfig(256, 64, 128, 1, 4, 3, 1.0, 2, False, 32),
    ("sm_90", "packed-i8"): FwdConfig(256, 64, 128, 1, 4, 3, 1.0, 2, False, 32),
    ("sm_90", "rerank"): FwdConfig(64, 64, 128, 1, 4, 3, 0.5, 2, True, 1),
    ("sm_90", "rerank-f8"): FwdConfig(64, 128, 128, 1, 4, 3, 0.5, 2, True, 32),
    ("sm_90", "rerank-i8"): FwdConfig(64, 64, 128, 1, 4, 3, 0.5, 2, True, 1),
    ("sm_90", "rerank-f32"): FwdConfig(32, 64, 64, 1, 4, 2, 2.0, 2, True, 1),
    ("sm_90", "rerank-wide"): FwdConfig(32, 64, 128, 1, 4, 3, 2.0, 2, True, 1),
    ("sm_90", "rerank-wide-f32"): FwdConfig(32, 64, 64, 1, 4, 2, 2.0, 2, True, 1),
}
# END TABLE


def shape_class(lq: int, dim: int, dtype: torch.dtype, queries: int = 1) -> str:
    """The table's shape class of a problem with ``lq`` query tokens of ``dim`` columns, ``queries`` of
    them scored against the same documents."""
    if queries > 1 and lq <= 64 and dim <= 256 and dtype != torch.float32:
        name = "packed"
    else:
        name = "rerank" if lq <= 64 else ("mid" if lq < 256 else "flops")
        if dim > 256:
            name += "-wide"
    if dtype == torch.float32:
        name += "-f32"
    elif dtype.itemsize == 1 and name in ("rerank", "packed"):
        name += "-i8" if dtype == torch.int8 else "-f8"
    return name


@functools.cache
def _device_info(device_type: str, index: int | None) -> tuple[str, int]:
    """(arch, multiprocessor count) of a device; the interpreter (CPU) gets ("cpu", 4)."""
    if device_type != "cuda":
        return "cpu", 4
    props = torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device())
    if getattr(torch.version, "hip", None):
        return f"gfx-{props.gcnArchName}", props.multi_processor_count
    return f"sm_{props.major}{props.minor}", props.multi_processor_count


def device_info(device: torch.device) -> tuple[str, int]:
    """(arch such as ``sm_90``, number of multiprocessors) of ``device``."""
    return _device_info(device.type, device.index)


def forward_config(
    device: torch.device, lq: int, dim: int, dtype: torch.dtype, queries: int = 1
) -> FwdConfig:
    """The configuration of the table for this device and problem (``DEFAULT`` when absent)."""
    arch, _ = device_info(device)
    return TABLE.get((arch, shape_class(lq, dim, dtype, queries)), DEFAULT)
