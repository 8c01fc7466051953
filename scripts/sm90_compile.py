"""Compile the varlen forward kernel for sm_90 on a machine without a GPU, and show what a kernel change did.

Triton compiles for a named target with no device present (ptxas ships in its wheel), so a kernel edit can be
checked before device time is spent on it: does it compile with the GPU image's Triton (3.6; its software
pipeliner crashed on kernels that newer versions compile), are the document tiles still loaded ahead
(``cp.async`` copies), how many registers and how much shared memory it takes, and which instructions one trip
of the tile loop issues. Fewer instructions is no speed claim; only the GPU says that.

    pip install --no-deps --target /tmp/triton36 triton==3.6.0      # once: the GPU image's version
    PYTHONPATH=/tmp/triton36:src python scripts/sm90_compile.py [--dtype float16|float8|int8] \\
        [--block-q 256] [--block-l 64] [--qpack 8] [--docs 32] [--warps 8] [--stages 3] [--maxnreg N]

The defaults are the "packed" row (32 queries of 32 tokens, as in issue 6's search), with the register cap
that ``varlen.run_max_registers`` gives a runs launch of that many warps unless ``--maxnreg`` says otherwise
(0: none). The loop reported is the
one holding the first warpgroup tensor-core instruction (HGMMA / IGMMA ...), from its wait for loaded tiles to its next copy issue.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import os
import subprocess
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # compile: maxsim turns the interpreter on where it sees no GPU

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from maxsim.backends.triton import varlen  # noqa: E402

POINTERS = ("q_ptr", "qs_ptr", "d_ptr", "ds_ptr", "cu_q_ptr", "cu_d_ptr", "qid_ptr", "did_ptr", "score_ptr",
            "argmax_ptr", "pmax_ptr", "pidx_ptr")  # fmt: skip
ELEMENT = {"float16": "*fp16", "float8": "*fp8e4nv", "int8": "*i8"}


def compile_varlen(args) -> triton.compiler.CompiledKernel:
    fn = varlen._maxsim_varlen_kernel
    names = list(inspect.signature(fn.fn).parameters)
    codes = args.dtype != "float16"  # queries and documents as codes with float32 scales
    outputs = ("score_ptr", "argmax_ptr", "pmax_ptr", "pidx_ptr")
    types = dict.fromkeys(POINTERS, "*i64") | dict.fromkeys(outputs, "*fp32")
    types |= {"q_ptr": ELEMENT[args.dtype], "d_ptr": ELEMENT[args.dtype]}
    types |= {"qs_ptr": "*fp32", "ds_ptr": "*fp32"} if codes else {"qs_ptr": "*fp16", "ds_ptr": "*fp16"}
    constexprs = dict(
        BLOCK_Q=args.block_q, BLOCK_L=args.block_l, BLOCK_D=128, LISTED=False, NORMALIZE=False, ARGMAX=False,
        PARTIAL=False, SINGLE_D=True, PREC="ieee", LANE_MAX=False, D_SCALED=codes, Q_SCALED=codes,
        QPACK=args.qpack, DOCS=args.docs, sq_k=1, sd_k=1,  # contiguous tokens: unit column strides
    )  # fmt: skip
    signature = {n: types.get(n, "constexpr" if n in constexprs else "i32") for n in names}
    aligned = [*POINTERS, "D", "sq_l", "sd_l"]  # what the launcher sees divisible by 16 (D = 128)
    source = ASTSource(
        fn, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned},
    )  # fmt: skip
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=launch_options(args))


def launch_options(args) -> dict:
    """Triton's compile options of the launch: warps, stages and, for runs of documents, the register cap."""
    maxnreg = varlen.run_max_registers("sm_90", args.warps) if args.maxnreg is None else args.maxnreg or None
    options = {"num_warps": args.warps, "num_stages": args.stages}
    return options if maxnreg is None or args.docs == 1 else options | {"maxnreg": maxnreg}


def loop_instructions(sass: str) -> list[str]:
    lines = [line.split("\t")[1].strip() for line in sass.splitlines() if "\t" in line]
    first_mma = next(i for i, line in enumerate(lines) if "GMMA" in line_op(line))
    start = max(i for i in range(first_mma) if line_op(lines[i]) == "DEPBAR")
    end = next(i for i in range(first_mma, len(lines)) if "LDGDEPBAR" in lines[i])
    return [line for line in lines[start : end + 1] if line and not line.endswith(":")]


def line_op(line: str) -> str:
    words = line.split()
    return (words[1] if words[0].startswith("@") else words[0]).split(".")[0].rstrip(";")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(ELEMENT), default="float16")
    parser.add_argument("--block-q", type=int, default=256)
    parser.add_argument("--block-l", type=int, default=64)
    parser.add_argument("--qpack", type=int, default=8)
    parser.add_argument("--docs", type=int, default=32)
    parser.add_argument("--warps", type=int, default=8)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--maxnreg", type=int, default=None)
    args = parser.parse_args()
    kernel = compile_varlen(args)
    ttgir = kernel.asm["ttgir"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([tool, "-res-usage", cubin.name], capture_output=True, text=True, check=True)
    registers = next(word for word in usage.stdout.split() if word.startswith("REG:"))
    body = loop_instructions(kernel.asm["sass"])
    print(f"triton {triton.__version__}, sm_90, {args}")
    spilled = next(word for word in usage.stdout.split() if word.startswith("LOCAL:")).removeprefix("LOCAL:")
    print(f"{registers.removeprefix('REG:')} registers ({spilled} bytes spilled), {kernel.metadata.shared} bytes of shared memory, "
          f"{ttgir.count('ttg.async_copy_global_to_local')} async tile copies in the TTGIR")  # fmt: skip
    print(f"tile loop: {len(body)} instructions (branches included)")
    for op, count in collections.Counter(map(line_op, body)).most_common(16):
        print(f"  {op:<10} {count}")


if __name__ == "__main__":
    main()
