"""What the "cold" timing method (``do_bench``: the L2 flushed by zeroing 256 MB before each call) adds to a
kernel's time by itself: each size of a read-only reduction is timed cold and as a CUDA-graph replay. The
flush leaves the L2 full of dirty lines; the timed kernel's reads evict them, so their write-back to HBM
shares its bandwidth, a fixed cost any kernel pays under this method, ours and the peers' alike.

A second table times a Triton streaming read cold, with and without an L2 evict-first hint on its loads
(``eviction_policy="evict_first"`` with one stage: ``ld.global.L1::evict_first.L2::cache_hint`` under a
``createpolicy.fractional.L2::evict_first`` policy; with two or more stages Triton turns the loads into
``cp.async`` copies and drops the hint), against the floor of ``maxsim bench`` (bytes / copy bandwidth).

    PYTHONPATH=src python scripts/cold_overhead.py
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.testing import do_bench, do_bench_cudagraph

PROGRAMS_PER_SM = 16


@triton.jit
def _read(x_ptr, out_ptr, n, BLOCK: tl.constexpr, EVICTION: tl.constexpr):
    """Sum ``x`` in a grid-stride loop (each program writes its own BLOCK partial sums)."""
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(pid * BLOCK, n, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0, eviction_policy=EVICTION).to(tl.float32)
    tl.store(out_ptr + pid * BLOCK + tl.arange(0, BLOCK), acc)


def main() -> None:
    print(f"{torch.cuda.get_device_name()}: x.sum() of float16 tensors, µs (median)")
    print(f"{'MB read':>8} {'cold':>8} {'graph':>8} {'cold - graph':>13} {'cold GB/s':>10}")
    for mb in (1, 16, 64, 256, 1024):
        x = torch.ones(mb * 2**19, dtype=torch.float16, device="cuda")

        def read(x=x):
            x.sum()

        cold = do_bench(read, return_mode="median") * 1e3
        graph = do_bench_cudagraph(read, return_mode="median") * 1e3
        print(f"{mb:>8} {cold:>8.1f} {graph:>8.1f} {cold - graph:>13.1f} {mb * 2**20 / cold / 1e3:>10.0f}")

    copy = torch.empty(2**30, dtype=torch.float16, device="cuda")
    copy_bytes_per_ms = 2 * copy.nbytes / do_bench(copy.clone, return_mode="median")  # read + write, as the bench
    del copy
    programs = torch.cuda.get_device_properties(0).multi_processor_count * PROGRAMS_PER_SM
    block = 1024
    partial = torch.empty(programs * block, device="cuda")
    print("\nTriton streaming read, cold, µs (x the floor: bytes / copy bandwidth)")
    print(f"{'MB read':>8} {'no hint':>16} {'L2 evict_first':>16}")
    for mb in (15, 64, 210, 1024):
        x = torch.ones(mb * 2**19, dtype=torch.float16, device="cuda")
        floor = x.nbytes / copy_bytes_per_ms
        cells = []
        for eviction in ("", "evict_first"):

            def read(x=x, eviction=eviction):
                _read[(programs,)](x, partial, x.numel(), BLOCK=block, EVICTION=eviction, num_warps=4, num_stages=1)

            t = do_bench(read, return_mode="median")
            cells.append(f"{t * 1e3:.1f} ({t / floor:.2f}x)")
        print(f"{mb:>8} {cells[0]:>16} {cells[1]:>16}")


if __name__ == "__main__":
    main()
