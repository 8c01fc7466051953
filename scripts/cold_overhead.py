"""What the "cold" timing method (``do_bench``: the L2 flushed by zeroing 256 MB before each call) adds to a
kernel's time by itself: each size of a read-only reduction is timed cold and as a CUDA-graph replay. The
flush leaves the L2 full of dirty lines; the timed kernel's reads evict them, so their write-back to HBM
shares its bandwidth, a fixed cost any kernel pays under this method, ours and the peers' alike.

    PYTHONPATH=src python scripts/cold_overhead.py
"""

from __future__ import annotations

import torch
from triton.testing import do_bench, do_bench_cudagraph


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


if __name__ == "__main__":
    main()
