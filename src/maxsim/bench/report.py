"""Presenting results: the terminal table, the JSON file and the PNG plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

_MiB = 2**20


def _g(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 10 ** (digits + 1):
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def _ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.4g}" if x < 1000 else f"{x:.0f}"


def _is_cpu_like(results: dict) -> bool:
    return results.get("device", {}).get("type") != "cuda"


def header_lines(results: dict) -> list[str]:
    """Device, versions, commit, scale and ceilings of a run."""
    dev = results.get("device", {})
    v = results.get("versions", {})
    git = results.get("git", {}) or {}
    name = dev.get("name", "?")
    if dev.get("type") == "cpu":
        where = f"cpu: {name} ({results.get('threads')} torch threads)"
    elif dev.get("type") == "cuda":
        cap = dev.get("capability") or []
        where = f"cuda: {name} (sm_{''.join(map(str, cap))})"
    else:
        where = f"{dev.get('type')}: {name}"
    commit = git.get("commit")
    commit = (commit[:10] + ("+dirty" if git.get("dirty") else "")) if commit else "no git"
    soft = f"maxsim {v.get('maxsim')}, torch {v.get('torch')}"
    if v.get("triton"):
        soft += f", triton {v.get('triton')}"
    lines = [f"maxsim bench | {where} | {soft} | commit {commit}"]
    lines.append(f"maxsim = {results.get('backend', {}).get('maxsim')}; scale {results.get('scale')}"
                 + (f" ({results['scale_note']})" if results.get("scale_note") else ""))  # fmt: skip
    for method, desc in (results.get("methods") or {}).items():
        lines.append(f"method {method}: {desc}")
    ceil = results.get("ceilings")
    if ceil:
        c, m = ceil["copy"], ceil["matmul"]
        rate = m["tflops"] * 1e3 if _is_cpu_like(results) else m["tflops"]
        unit = "GFLOP/s" if _is_cpu_like(results) else "TFLOP/s"
        lines.append(
            f"ceilings: copy {c['gbps']:.1f} GB/s ({c['bytes'] / _MiB:.0f} MiB {c['dtype']} copy_, read+write)"
            f" | matmul {rate:.1f} {unit} ({m['dtype']} {m['n']}^3)"
        )
    peers = {k: val for k, val in (v.get("peers") or {}).items() if val}
    if peers:
        lines.append("peers: " + ", ".join(f"{k} {val}" for k, val in peers.items()))
    for note in results.get("notes", []):
        lines.append(f"note: {note}")
    return lines


def table(results: dict) -> str:
    """The terminal table of a run (or of a results JSON)."""
    cpu = _is_cpu_like(results)
    unit = "GFLOP/s" if cpu else "TFLOP/s"
    lines = header_lines(results)
    cols = ["provider", "ms", "p20..p80", "x floor", "vs maxsim", "GB/s", unit, "+mem MiB", "check"]
    for e in results.get("results", []):
        f = e["floor_ms"]
        chk = e["check"]
        head = (
            f"{e['workload']}  {e['shape_id']}  {e['dtype']}  {e['method']}  |  floor {_ms(f['floor'])} ms"
            f" ({f['bound']}-bound; bytes {_ms(f['bytes'])} ms, FLOPs {_ms(f['flops'])} ms)"
        )
        if e["layout"] == "padded":
            head += f"  real-token floor {_ms(f['floor_real'])} ms"
        lines.append("")
        lines.append(head)
        ref_note = f"reference on {chk['reference_rows']}/{chk['rows']} rows"
        if e.get("train"):
            ref_note += "; forward + backward of scores.sum() timed, forward scores checked"
        lines.append(f"  {ref_note}")
        rows = []
        for name, p in e["providers"].items():
            label = p.get("label", name)
            st = p.get("status")
            if st != "ok":
                note = p.get("note") or ""
                if st == "wrong":
                    c = p.get("check", {})
                    note = (
                        c.get("note")
                        or f"max err {_g(c.get('max_abs_err'))} = {_g(c.get('worst_vs_allowed'))}x allowed"
                    )
                extra = f" (compile {p['compile_s']:.1f} s)" if p.get("compile_s") else ""
                rows.append([label, f"{st.upper() if st == 'wrong' else st}: {note}{extra}"])
                continue
            ms = p["ms"]
            tf = p.get("tflops")
            rate = tf * 1e3 if (cpu and tf is not None) else tf
            x_floor = _g(p.get("x_floor"))
            if "x_floor_real" in p:
                x_floor += f" ({_g(p['x_floor_real'])} real)"
            mem = p.get("peak_mem_bytes")
            check = "ok"
            if p.get("compile_s"):
                check += f" (compile {p['compile_s']:.1f} s)"
            rows.append(
                [
                    label,
                    _ms(ms["median"]),
                    f"{_ms(ms['p20'])}..{_ms(ms['p80'])}",
                    x_floor,
                    _g(p.get("vs_maxsim")),
                    _g(p.get("gbps")),
                    _g(rate),
                    _g(mem / _MiB) if mem is not None else "-",
                    check,
                ]
            )
        lines.extend("  " + line for line in _align([cols, *rows]))
        sp = e.get("maxsim_speedup") or {}
        if sp:
            lines.append("  maxsim speedup: " + ", ".join(f"{k} {v:.2f}x" for k, v in sp.items()))
        mem = e.get("maxsim_mem_ratio") or {}
        if mem:
            lines.append("  maxsim peak memory: " + ", ".join(f"{_g(v)}x {k}'s" for k, v in mem.items()))
    lines.extend(bar_lines(results))
    if results.get("elapsed_s") is not None:
        lines.append("")
        lines.append(f"run took {results['elapsed_s']:.0f} s")
    return "\n".join(lines)


def bar_lines(results: dict) -> list[str]:
    """The bars section: each issue target read from this run, with its verdict."""
    bars = results.get("bars") or []
    if not bars:
        return []
    lines = ["", "bars (from the issues; read at full size; 3% noise allowance):"]
    scaled = 0
    for b in bars:
        verdict = b["verdict"]
        if verdict.startswith("n/a: scaled"):
            scaled += 1
            continue
        mark = "PASS" if verdict.startswith("pass") else ("FAIL" if verdict == "fail" else "n/a ")
        measured = _g(b.get("measured"))
        extra = " (within 3%)" if "within" in verdict else (verdict[4:] if verdict.startswith("n/a") else "")
        lines.append(
            f"  {mark}  {b['workload']} {b['dtype']} {b['method']}: {b['metric']} {b['op']} {b['value']:g},"
            f" measured {measured}{extra}  [{b['text']}]"
        )
    if scaled:
        lines.append(f"  ({scaled} bars not read: this run is scaled; --scale 1 reads them)")
    return lines


def _align(rows: list[list[str]]) -> list[str]:
    full = [r for r in rows if len(r) > 2]
    widths = [max(len(r[i]) for r in full) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        if len(r) == 2:  # a provider that was not timed: label + note across the row
            out.append(r[0].ljust(widths[0]) + "  " + r[1])
        else:
            out.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return out


def _clean(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(results: dict, path: str | Path) -> Path:
    """Write results as JSON (non-finite numbers become null)."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(results), indent=1) + "\n")
    return path


def load_json(path: str | Path) -> dict:
    """Read a results JSON written by ``write_json``.

    Raises:
        ValueError: the file is not a ``maxsim bench`` results file.
    """
    data = json.loads(Path(path).read_text())
    if (
        not isinstance(data, dict)
        or "results" not in data
        or not str(data.get("schema", "")).startswith("maxsim-bench/")
    ):
        raise ValueError(f"{path}: not a maxsim bench results JSON (no 'schema': 'maxsim-bench/...')")
    return data


class PlotUnavailable(RuntimeError):
    """matplotlib is missing."""


def plot(results: dict, path: str | Path) -> Path:
    """A bar chart of time / floor per workload and provider (log scale), saved as PNG.

    Raises:
        PlotUnavailable: matplotlib is not installed (``pip install 'maxsim[plot]'``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise PlotUnavailable(
            "--plot needs matplotlib: pip install matplotlib (or pip install 'maxsim[plot]')"
        ) from e
    entries = results.get("results", [])
    panels: dict[tuple[str, str], list[dict]] = {}
    for e in entries:
        panels.setdefault((e["dtype"], e["method"]), []).append(e)
    names: list[str] = []
    for e in entries:
        for name, p in e["providers"].items():
            if p.get("x_floor") is not None and name not in names:
                names.append(name)
    n_groups = max([len(v) for v in panels.values()] or [1])
    fig, axes = plt.subplots(
        max(1, len(panels)), 1, figsize=(max(8.0, 1.3 * n_groups + 2), 3.6 * max(1, len(panels)) + 0.6),
        squeeze=False,
    )  # fmt: skip
    width = 0.8 / max(1, len(names))
    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", [None])
    for ax, ((dtype, method), group) in zip(axes[:, 0], panels.items(), strict=False):
        for j, name in enumerate(names):
            xs, ys = [], []
            for i, e in enumerate(group):
                p = e["providers"].get(name, {})
                if p.get("x_floor") is not None:
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(p["x_floor"])
            label = results.get("providers", {}).get(name, {}).get("label", name)
            ax.bar(xs, ys, width=width, label=label, color=colors[j % len(colors)])
        ax.set_yscale("log")
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(group)))
        ax.set_xticklabels([e["workload"] for e in group], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("time / floor (log)")
        ax.set_title(f"{dtype}, {method}  (1 = at the floor; lower is better)", fontsize=9)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=8, ncol=min(len(names), 5) or 1)
    dev = results.get("device", {})
    title = f"maxsim bench: {dev.get('name', '?')}"
    if dev.get("type") == "cpu":
        title += f" ({results.get('threads')} threads)"
    title += f" | torch {results.get('versions', {}).get('torch')}"
    commit = (results.get("git") or {}).get("commit")
    if commit:
        title += f" | {commit[:10]}"
    fig.suptitle(title, fontsize=10, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.97 - 0.02 * (len(names) > 3)))
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
