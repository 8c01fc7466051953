"""The ``maxsim`` command: ``info``, ``bench`` (JSON, table, plot) and the workload registry."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import maxsim
from maxsim.bench import baselines, runner
from maxsim.bench.workloads import WORKLOADS, select
from maxsim.cli import main

SMOKE = ["--device", "cpu", "--quick", "--no-progress", "--no-memory"]


def _env_with_package() -> dict:
    env = dict(os.environ)
    src = str(Path(maxsim.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_info_in_process(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("maxsim", "torch", "numpy", "python", "cpu", "backend"):
        assert word in out
    assert torch.__version__ in out


def test_info_as_module():
    proc = subprocess.run(
        [sys.executable, "-m", "maxsim.cli", "info"], capture_output=True, text=True, env=_env_with_package(),
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "backend" in proc.stdout


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "results.json"
    args = ["bench", "--workloads", "SmallRerank", "--scale", "0.1", "--json", str(path)]
    code = main([*args, "--device", "cpu", "--quick", "--no-progress"])  # memory measured here
    assert code == 0
    return json.loads(path.read_text()), path


def test_bench_json_keys(small_run):
    data, _ = small_run
    assert data["schema"].startswith("maxsim-bench/")
    assert data["device"]["type"] == "cpu" and data["device"]["name"]
    assert data["threads"] == torch.get_num_threads()
    for key in ("maxsim", "torch", "triton", "numpy", "python", "peers"):
        assert key in data["versions"]
    assert "commit" in data["git"]
    assert data["ceilings"]["copy"]["gbps"] > 0 and data["ceilings"]["matmul"]["tflops"] > 0
    assert data["scale"] == 0.1
    (entry,) = data["results"]
    assert entry["workload"] == "SmallRerank" and entry["dtype"] == "float32" and entry["method"] == "wall"
    assert entry["shape"] == {"B": 3, "C": 10, "Lq": 32, "Ld": 180, "D": 128}
    assert entry["shape_id"] == "B3-C10-Lq32-Ld180-D128"
    assert entry["flops"] == 2 * 3 * 10 * 32 * 180 * 128
    assert entry["bytes"] == (3 * 32 + 30 * 180) * 128 * 4
    floors = entry["floor_ms"]
    assert floors["floor"] == max(floors["bytes"], floors["flops"]) > 0
    assert entry["check"]["reference_rows"] >= 1
    for name in ("maxsim", "naive"):
        p = entry["providers"][name]
        assert p["status"] == "ok", p
        assert p["check"]["ok"] is True
        ms = p["ms"]
        assert 0 < ms["p20"] <= ms["median"] <= ms["p80"]
        assert p["x_floor"] == pytest.approx(ms["median"] / floors["floor"])
        assert p["gbps"] > 0 and p["tflops"] > 0
        if Path("/proc/self/clear_refs").exists():
            assert isinstance(p["peak_mem_bytes"], int) and p["peak_mem_bytes"] >= 0
    assert entry["providers"]["maxsim"]["vs_maxsim"] == pytest.approx(1.0)
    assert set(entry["maxsim_speedup"]) >= {"naive"}
    # a peer that does not do this layout is listed as skipped, with the reason
    if "maxsim-cpu" in entry["providers"]:
        assert entry["providers"]["maxsim-cpu"]["status"] == "skipped"


def test_bench_prints_table_and_scale(capsys):
    assert main(["bench", "--workloads", "smallrerank", "--scale", "0.05", *SMOKE]) == 0
    out = capsys.readouterr().out
    assert "scale 0.05" in out
    assert "SmallRerank" in out and "B2-C10-Lq32-Ld180-D128" in out
    assert "maxsim [torch]" in out and "naive" in out and "x floor" in out


def test_default_cpu_scale_is_printed(monkeypatch, capsys):
    monkeypatch.setattr(runner, "DEFAULT_CPU_SCALE", 0.02)
    assert main(["bench", "--workloads", "SmallRerank", *SMOKE]) == 0
    out = capsys.readouterr().out
    assert "scale 0.02 (cpu default" in out


def test_ragged_layouts_and_peer(tmp_path):
    path = tmp_path / "ragged.json"
    args = [
        "bench",
        "--workloads",
        "RaggedCorpus,RaggedCorpusPadded",
        "--scale",
        "0.001",
        "--json",
        str(path),
    ]
    assert main([*args, *SMOKE]) == 0
    data = json.loads(path.read_text())
    by_name = {e["workload"]: e for e in data["results"]}
    assert by_name["RaggedCorpus"]["shape_id"] == "Nq1-Nd20-Lq32-Ld75..300-D128"
    padded = by_name["RaggedCorpusPadded"]
    assert padded["bytes_real"] < padded["bytes"]
    assert padded["floor_ms"]["floor_real"] <= padded["floor_ms"]["floor"]
    for e in by_name.values():
        for name in ("maxsim", "naive"):
            assert e["providers"][name]["check"]["ok"], (e["workload"], name)
        if baselines.MaxSimCpu().available(torch.device("cpu")) is None:
            assert e["providers"]["maxsim-cpu"]["status"] == "ok"
    assert "x_floor_real" in padded["providers"]["maxsim"]


def test_plot_from_json(small_run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _, path = small_run
    png = tmp_path / "plot.png"
    assert main(["bench", "--plot", str(png), "--from", str(path)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "SmallRerank" in capsys.readouterr().out


def test_from_needs_plot(small_run):
    _, path = small_run
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--from", str(path)])
    assert exc.value.code == 2


def test_from_rejects_other_json(tmp_path):
    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}')
    assert main(["bench", "--plot", str(tmp_path / "x.png"), "--from", str(other)]) == 2


def test_unknown_workload_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--workloads", "NoSuchThing", *SMOKE])
    assert exc.value.code == 2
    assert "SmallRerank" in capsys.readouterr().err


def test_wrong_provider_is_reported_not_timed(monkeypatch):
    class Off(baselines.Provider):
        name = "off-by-one"

        def prepare(self, inp, *, sync_free=False):
            return lambda: baselines.naive_fn(inp)() + 1

    real = baselines.providers

    def with_bad(device, **kw):
        provs, notes = real(device, **kw)
        return [*provs, Off()], notes

    monkeypatch.setattr(runner, "providers", with_bad)
    config = runner.Config(
        device=torch.device("cpu"), dtypes=[torch.float32], workloads=select("SmallRerank", "cpu"), scale=0.05,
        repeats=2, compile_mode="off", progress=False, memory=False, quick=True,
    )  # fmt: skip
    (entry,) = runner.run(config)["results"]
    bad = entry["providers"]["off-by-one"]
    assert bad["status"] == "wrong" and "ms" not in bad
    assert bad["check"]["ok"] is False
    assert entry["providers"]["maxsim"]["status"] == "ok"


def test_registry_shapes_match_the_issue():
    expect = {
        "SmallRerank": {"B": 32, "C": 10, "Lq": 32, "Ld": 180, "D": 128},
        "HeavyRerank": {"B": 32, "C": 100, "Lq": 32, "Ld": 256, "D": 128},
        "LongDocStress": {"B": 8, "C": 16, "Lq": 64, "Ld": 1024, "D": 128},
        "Rerank1k": {"B": 16, "C": 1000, "Lq": 32, "Ld": 300, "D": 128},
        "ColPali": {"Nq": 1, "Nd": 1000, "Lq": 1024, "Ld": 1024, "D": 128},
        "RaggedCorpus": {"Nq": 1, "Nd": 20000, "Lq": 32, "Ld_min": 75, "Ld_max": 300, "D": 128},
        "RaggedCorpusPadded": {"Nq": 1, "Nd": 20000, "Lq": 32, "Ld_min": 75, "Ld_max": 300, "D": 128},
        "InBatchTrain": {"Nq": 128, "Nd": 128, "Lq": 32, "Ld": 256, "D": 128},
        "ColPaliTrain": {"Nq": 32, "Nd": 32, "Lq": 1024, "Ld": 1024, "D": 128},
        "CpuOneQuery": {"Nq": 1, "Nd": 1000, "Lq": 32, "Ld": 512, "D": 128},
        "ColPali10k": {"Nq": 1, "Nd": 10000, "Lq": 1024, "Ld": 1024, "D": 128},
    }
    assert {k: w.sizes for k, w in WORKLOADS.items()} == expect
    layouts = {k: w.layout for k, w in WORKLOADS.items()}
    assert layouts["SmallRerank"] == layouts["Rerank1k"] == "candidates"
    assert layouts["RaggedCorpus"] == "varlen" and layouts["RaggedCorpusPadded"] == "padded"
    for name in ("InBatchTrain", "ColPaliTrain"):
        assert WORKLOADS[name].train and layouts[name] == "all_pairs"
    assert "ColPaliTrain" not in [w.name for w in select(None, "cpu")]  # a second a step even scaled down
    assert "ColPaliTrain" in [w.name for w in select(None, "cuda")]
    bar = WORKLOADS["CpuOneQuery"]
    assert bar.fixed_size and bar.dtype == torch.float32 and bar.scaled_dims(0.01) == bar.sizes
    assert "CpuOneQuery" not in [w.name for w in select(None, "cuda")]
    assert "CpuOneQuery" in [w.name for w in select(None, "cpu")]
    assert "ColPali10k" not in [w.name for w in select(None, "cpu")]  # opt-in: 5 GiB of inputs
    assert WORKLOADS["ColPali10k"].providers == ("maxsim",) and WORKLOADS["ColPali10k"].single_call


def test_scale_multiplies_pairs():
    assert WORKLOADS["Rerank1k"].scaled_dims(0.05) == {"B": 1, "C": 800, "Lq": 32, "Ld": 300, "D": 128}
    assert WORKLOADS["HeavyRerank"].scaled_dims(0.5)["B"] == 16
    assert WORKLOADS["ColPali"].scaled_dims(0.01)["Nd"] == 10
    assert WORKLOADS["InBatchTrain"].scaled_dims(0.25)["Nq"] == 64
    assert WORKLOADS["SmallRerank"].scaled_dims(2)["B"] == 64


@pytest.mark.parametrize("name", [n for n in WORKLOADS if not WORKLOADS[n].fixed_size])
def test_inputs_and_reference_head(name):
    """Every layout builds, its first rows' reference equals the full reference's, and maxsim agrees."""
    w = WORKLOADS[name]
    tiny = {"candidates": 2 / (w.sizes.get("B", 1) * w.sizes.get("C", 1)), "all_pairs": 9 / 128**2}
    scale = tiny.get(w.layout, 3 / w.sizes.get("Nd", 1))
    case = w.build("cpu", torch.float32, scale=scale, seed=1)
    inp = case.inputs
    full = runner.reference(inp)
    head = runner.reference(inp.head(1))
    torch.testing.assert_close(head, full[:1])
    out = baselines.MaxSim().prepare(inp)()
    assert out.shape == full.shape
    check = runner.check_output(out, full, runner.tolerance(full, None, torch.float32), inp.rows)
    assert check["ok"], check
    naive = baselines.naive_fn(inp)()
    assert runner.check_output(naive, full, runner.tolerance(full, None, torch.float32), inp.rows)["ok"]


def test_low_precision_tolerance_uses_naive_error():
    w = WORKLOADS["SmallRerank"]
    case = w.build("cpu", torch.bfloat16, scale=2 / 320)
    inp = case.inputs
    ref = runner.reference(inp)
    naive = baselines.naive_fn(inp)()
    allowed = runner.tolerance(ref, naive, torch.bfloat16)
    assert runner.check_output(maxsim.maxsim(inp.q[:, None], inp.d), ref, allowed, inp.rows)["ok"]
    assert not runner.check_output(naive + 0.5, ref, allowed, inp.rows)["ok"]


def test_bars_are_read_at_full_size_only():
    from maxsim.bench.workloads import Bar

    bar = Bar("speedup:maxsim-cpu", ">=", 2.0, "cpu", ("wall",), ("float32",), "2x")
    entry = {
        "method": "wall",
        "dtype": "float32",
        "providers": {"maxsim": {"status": "ok", "ms": {"median": 1.0}, "x_floor": 1.2}},
        "maxsim_speedup": {"maxsim-cpu": 2.01, "naive": 0.5},
    }
    ceil = {"matmul": {"tflops": 1.0}}
    (ok,) = runner.evaluate_bars(entry, (bar,), "cpu", ceil, full_size=True)
    assert ok["verdict"] == "pass" and ok["measured"] == 2.01
    entry["maxsim_speedup"]["maxsim-cpu"] = 1.96
    assert runner.evaluate_bars(entry, (bar,), "cpu", ceil, True)[0]["verdict"] == "pass (within 3%)"
    entry["maxsim_speedup"]["maxsim-cpu"] = 1.5
    assert runner.evaluate_bars(entry, (bar,), "cpu", ceil, True)[0]["verdict"] == "fail"
    assert runner.evaluate_bars(entry, (bar,), "cpu", ceil, False)[0]["verdict"].startswith("n/a: scaled")
    assert runner.evaluate_bars(entry, (bar,), "cuda", ceil, True) == []
    every = Bar("speedup:*", ">=", 1.0, "cpu", ("wall",), None, "never slower")
    verdicts = {b["metric"]: b["verdict"] for b in runner.evaluate_bars(entry, (every,), "cpu", ceil, True)}
    assert verdicts == {"speedup:maxsim-cpu": "pass", "speedup:naive": "fail"}
    del entry["maxsim_speedup"]["maxsim-cpu"]
    assert runner.evaluate_bars(entry, (bar,), "cpu", ceil, True)[0]["verdict"].startswith("n/a")


def test_restricted_single_call_workload_with_memory_bar():
    from maxsim.bench.workloads import Bar, Workload

    w = Workload(
        "TinyPages", "corpus", {"Nq": 1, "Nd": 4, "Lq": 64, "Ld": 64, "D": 16}, "test", dtype=torch.float32,
        fixed_size=True, providers=("maxsim",), single_call=True,
        bars=(Bar("peak_mem_budget", "<=", 1.1, "cpu", ("wall",), None, "memory"),),
    )  # fmt: skip
    config = runner.Config(
        device=torch.device("cpu"), dtypes=[torch.float32], workloads=[w], compile_mode="off", progress=False,
        quick=True,
    )  # fmt: skip
    results = runner.run(config)
    (entry,) = results["results"]
    assert list(entry["providers"]) == ["maxsim"]
    assert entry["providers"]["maxsim"]["ms"]["n"] == 1 and entry["single_call"]
    (bar,) = results["bars"]
    if Path("/proc/self/clear_refs").exists():
        assert bar["verdict"] in ("pass", "pass (within 3%)"), bar


def test_training_workloads_report_memory_and_bars(tmp_path, capsys):
    """Both training steps run on the CPU (scaled: 4x4 and 1x1 pairs), with memory and their ratios."""
    path = tmp_path / "train.json"
    args = ["bench", "--workloads", "InBatchTrain,ColPaliTrain", "--scale", "0.001", "--json", str(path)]
    assert main([*args, "--device", "cpu", "--quick", "--no-progress", "--compile", "off"]) == 0
    data = json.loads(path.read_text())
    by_name = {e["workload"]: e for e in data["results"]}
    assert by_name["InBatchTrain"]["shape_id"] == "Nq4-Nd4-Lq32-Ld256-D128"
    assert by_name["ColPaliTrain"]["shape_id"] == "Nq1-Nd1-Lq1024-Ld1024-D128"
    for e in by_name.values():
        assert e["train"] and e["layout"] == "all_pairs"
        provs = e["providers"]
        for name in ("maxsim", "naive"):
            assert provs[name]["status"] == "ok" and provs[name]["check"]["ok"], (e["workload"], name)
        if Path("/proc/self/clear_refs").exists():
            ours = provs["maxsim"]["peak_mem_bytes"]
            assert isinstance(ours, int)
            for name, ratio in e["maxsim_mem_ratio"].items():
                assert ratio == pytest.approx(ours / provs[name]["peak_mem_bytes"])
        assert e["bars"] == []  # the training bars are read on CUDA, in bfloat16
    out = capsys.readouterr().out
    assert "forward + backward of scores.sum() timed" in out


def _train_entry(ms: float, mem: dict[str, int]) -> dict:
    """A CUDA bfloat16 cold entry of a training workload: maxsim at ``ms``, each peer at twice that."""
    providers = {
        name: {"status": "ok", "ms": {"median": ms * (1 if name == "maxsim" else 2)}, "peak_mem_bytes": peak}
        for name, peak in mem.items()
    }
    return {
        "method": "cold",
        "dtype": "bfloat16",
        "providers": providers,
        "maxsim_speedup": {name: 2.0 for name in mem if name != "maxsim"},
        "maxsim_mem_ratio": {
            name: mem["maxsim"] / peak for name, peak in mem.items() if name != "maxsim" and mem["maxsim"]
        },
    }


def test_training_bars_of_issue_5():
    ceil = {"matmul": {"tflops": 1.0}}
    bars = WORKLOADS["InBatchTrain"].bars
    limits = {
        name: {b.metric: b.value for b in WORKLOADS[name].bars} for name in ("InBatchTrain", "ColPaliTrain")
    }
    assert (
        limits["InBatchTrain"] == {**limits["ColPaliTrain"], "ms": 0.30}
        and limits["ColPaliTrain"]["ms"] == 0.9
    )
    peers = {"flash-maxsim": 400, "late-interaction-kernels": 500}
    good = _train_entry(0.25, {"maxsim": 20, "naive": 1000, **peers})
    verdicts = {b["metric"]: b["verdict"] for b in runner.evaluate_bars(good, bars, "cuda", ceil, True)}
    assert verdicts == {
        "ms": "pass",
        "speedup:flash-maxsim": "pass",
        "speedup:late-interaction-kernels": "pass",
        "mem_ratio:naive": "pass",
        "mem_ratio:flash-maxsim": "pass",
        "mem_ratio:late-interaction-kernels": "pass",
    }
    bad = _train_entry(0.35, {"maxsim": 60, "naive": 1000, "flash-maxsim": 50})
    results = {b["metric"]: b for b in runner.evaluate_bars(bad, bars, "cuda", ceil, True)}
    assert results["ms"]["verdict"] == "fail" and results["ms"]["measured"] == 0.35
    assert results["mem_ratio:naive"]["verdict"] == "fail" and results["mem_ratio:naive"]["measured"] == 0.06
    assert results["mem_ratio:flash-maxsim"]["verdict"] == "fail"
    assert (
        results["mem_ratio:late-interaction-kernels"]["verdict"]
        == "n/a: late-interaction-kernels not installed"
    )
    assert (
        runner.evaluate_bars(good, WORKLOADS["ColPaliTrain"].bars, "cuda", ceil, True)[0]["verdict"] == "pass"
    )
    unmeasured = _train_entry(0.25, {"maxsim": None, "naive": 1000, **peers})
    verdicts = {b["metric"]: b["verdict"] for b in runner.evaluate_bars(unmeasured, bars, "cuda", ceil, True)}
    assert verdicts["mem_ratio:naive"] == "n/a: memory not measured" and verdicts["ms"] == "pass"
    good["dtype"] = "float16"
    assert runner.evaluate_bars(good, bars, "cuda", ceil, True) == []  # issue 5's bars are bfloat16


def test_git_commit_prefers_the_given_commit(monkeypatch):
    """A tree copied to a GPU machine may sit beside a stale .git: MAXSIM_GIT_COMMIT wins."""
    from maxsim.bench import system

    monkeypatch.setenv("MAXSIM_GIT_COMMIT", "abc1234")
    assert system.git_commit() == {"commit": "abc1234", "dirty": None, "source": "MAXSIM_GIT_COMMIT"}
    monkeypatch.delenv("MAXSIM_GIT_COMMIT")
    assert system.git_commit()["commit"] != "abc1234"


def test_readme_chart_comes_from_a_committed_results_json(tmp_path):
    """The README's chart is `maxsim bench --plot` of a JSON under benchmarks/results/: both exist, and the
    command the README gives remakes it."""
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    match = re.search(r"maxsim bench --plot (\S+) --from (\S+\.json)", readme)
    assert match, "the README names the command that makes its chart"
    chart, source = match.groups()
    assert (root / chart).is_file() and f"]({chart})" in readme
    assert source.startswith("benchmarks/results/") and (root / source).is_file()
    out = tmp_path / "chart.png"
    assert main(["bench", "--plot", str(out), "--from", str(root / source)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
