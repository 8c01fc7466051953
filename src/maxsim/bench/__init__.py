"""``maxsim bench``: named workloads, providers, measurement and reports (see BENCHMARKING.md).

- ``workloads``: the one registry of named workloads (``WORKLOADS``) and the inputs each builds;
- ``baselines``: the providers timed side by side (maxsim, torch-chunked, naive, compile, peers);
- ``runner``: ceilings, the reference check, timing, memory, floors and ratios;
- ``report``: terminal table, JSON and plot.
"""

from .workloads import WORKLOADS, Workload

__all__ = ["WORKLOADS", "Workload"]
