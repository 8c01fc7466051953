#!/usr/bin/env bash
# The GPU suite: the whole test suite on the GPU, then `maxsim bench` on it, in one command.
#
# Run it on the GPU machine through the device tool, from the repository root:
#     run(command="MAXSIM_GIT_COMMIT=<sha> bash scripts/gpu_suite.sh", carry=[".whl"])
# with <sha> the output of `git rev-parse HEAD` here: .git does not travel, and the results JSON records it.
# Its log and results come back under $OUT:
#     $OUT/gpu-suite-<device>.log     everything printed (tests, info, bench table)
#     $OUT/bench-<device>.json        the results JSON (commit it under benchmarks/results/)
#     $OUT/bench-<device>.png         the plot, when matplotlib is there
# (<device> is the GPU's name with spaces as dashes, e.g. NVIDIA-H100-80GB-HBM3.)
# Plot a returned JSON here with: maxsim bench --plot out.png --from bench-<device>.json
#
# The GPU image has torch, triton, numpy and pytest but no network. The peers (pure-Python wheels) travel in
# .whl/ (ignored by git); fetch them here once, from the repository root:
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#         flash-maxsim late-interaction-kernels
# Wheels found in .whl/ are installed into /tmp/site, which goes on PYTHONPATH after src/ (the package
# runs from the working tree, not installed). Without .whl/ the peers are reported as not installed.
#
# After `maxsim bench` it runs the search workloads (`maxsim bench-search`, $OUT/search-<device>.json) and an
# NCCL run of the sharded search over every GPU of the machine (`torchrun ... -m maxsim.bench.distributed`,
# $OUT/dist-<device>.json).
#
# Environment knobs:
#     BENCH_ARGS   extra arguments for `maxsim bench`, e.g. "--dtype float16,bfloat16 --method cold,graph"
#     SEARCH_ARGS  extra arguments for `maxsim bench-search` (default: the full 100k-document corpus)
#     DIST_ARGS    arguments for the sharded-search run (default "--docs 20000"; issue 8's 20 GB corpus:
#                  "--docs 430000 --min-len 64 --max-len 300")
#     DIST_NPROC   ranks of that run (default: one per GPU)
#     SKIP_BENCH=1 / SKIP_SEARCH=1 / SKIP_DIST=1   leave that step out
#     SKIP_TESTS=1 run only the benchmarks
#     PYTEST_ARGS  extra arguments for pytest (default: none)
#     PYTEST_WORKERS  pytest-xdist workers where xdist imports (default 16; OMP_NUM_THREADS default 2 for them)
# MAXSIM_BACKEND is unset for both steps so every call gets the device's default backend.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
unset MAXSIM_BACKEND
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || echo "gpu_suite: installing .whl/*.whl failed; peers may be missing" >&2
    export PYTHONPATH="$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi

DEVICE="$("$PY" -c 'import re, torch
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
print(re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-"))')"
LOG="$OUT/gpu-suite-$DEVICE.log"
JSON="$OUT/bench-$DEVICE.json"

tests_rc=0
bench_rc=0
{
    echo "== gpu_suite on $DEVICE at $(date -u +%Y-%m-%dT%H:%M:%SZ), commit ${MAXSIM_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo '?')}"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
    "$PY" -m maxsim.cli info

    if [ "${SKIP_TESTS:-0}" != "1" ]; then
        # pytest-xdist (in the GPU image): 16 workers share the GPU and the 16 cores, two CPU threads each; on
        # an H100 machine the whole suite took about 100 s. With torch's default of a thread per core in every
        # worker the CPU tests thrash: 8 such workers had not finished it after 560 s.
        workers=()
        if "$PY" -c 'import xdist' 2>/dev/null; then
            workers=(-n "${PYTEST_WORKERS:-16}" -p no:cacheprovider)
        fi
        echo "== pytest (MAXSIM_BACKEND unset) ${workers[*]}"
        # shellcheck disable=SC2086
        OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" "$PY" -m pytest tests -q -rfE "${workers[@]}" ${PYTEST_ARGS:-}
        tests_rc=$?
        echo "== pytest exit status $tests_rc"
    fi

    if [ "${SKIP_BENCH:-0}" != "1" ]; then
        echo "== maxsim bench"
        plot=()
        if "$PY" -c 'import matplotlib' 2>/dev/null; then
            plot=(--plot "$OUT/bench-$DEVICE.png")
        fi
        # shellcheck disable=SC2086
        "$PY" -m maxsim.cli bench --json "$JSON" "${plot[@]}" ${BENCH_ARGS:-}
        bench_rc=$?
        echo "== bench exit status $bench_rc"
    fi

    if [ "${SKIP_SEARCH:-0}" != "1" ]; then
        echo "== maxsim bench-search"
        # shellcheck disable=SC2086
        "$PY" -m maxsim.cli bench-search --json "$OUT/search-$DEVICE.json" ${SEARCH_ARGS:-} || bench_rc=1
    fi

    if [ "${SKIP_DIST:-0}" != "1" ]; then
        nproc="${DIST_NPROC:-$("$PY" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
        echo "== sharded search, $nproc GPU(s), NCCL (torchrun)"
        # shellcheck disable=SC2086
        "$PY" -m torch.distributed.run --standalone --nproc-per-node "$nproc" -m maxsim.bench.distributed \
            --json "$OUT/dist-$DEVICE.json" ${DIST_ARGS:---docs 20000} || bench_rc=1
    fi
    echo "$tests_rc $bench_rc" >"$OUT/.status"
} 2>&1 | tee "$LOG"

read -r tests_rc bench_rc <"$OUT/.status" 2>/dev/null || { tests_rc=1; bench_rc=1; }
rm -f "$OUT/.status"
echo "gpu_suite: tests exit $tests_rc, bench exit $bench_rc; log $LOG, results $JSON"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
