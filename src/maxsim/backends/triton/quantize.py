"""Query quantization in one launch: each token's int8 / float8 e4m3 codes and scale, as
``index.quantize(tokens, dtype, scale_tries=1)`` gives them (``Index.search`` with ``dots_quantized``).

The torch version is some thirty small kernels: issue 6's one-query e4m3 search spent 0.17 ms outside its
0.97 ms kernel with them (1.14 ms in all), 1.06 ms with this launch (H100, 2026-12-06).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...index import QUANT_MAX, int8_scale_bits
from .forward import INTERPRETED, _int8_grid_unit, _pow2_at_least
from .launch import Launcher


@triton.jit
def _e4m3_grid(v):
    """float32 ``v`` (``|v| <= 448``) rounded half to even to the float8 e4m3 grid, so that converting it is
    exact (the Triton interpreter's conversion does not carry a rounding into the exponent: 124.5 -> 64).

    Adding and taking away ``1.5 * 2**(e + 20)`` rounds to a multiple of ``2**(e - 3)``, the spacing of 3
    mantissa bits at ``v``'s exponent ``e`` (at least -6: e4m3's subnormals are spaced ``2**-9``).
    """
    e = tl.maximum(((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    magic = (((e + 147) << 23) | 0x400000).to(tl.float32, bitcast=True)
    return (v + magic) - magic


@triton.jit
def _quantize_rows_kernel(
    x_ptr, codes_ptr, scales_ptr, D, sx_t, sx_k, SCALE_BITS,
    QMAX: tl.constexpr, INT8: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One token per program: codes ``[D]`` and its float32 scale (NaN for a token with NaN / inf)."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    real = offs < D
    x = tl.load(x_ptr + t * sx_t + offs * sx_k, mask=real, other=0.0).to(tl.float32)
    ax = tl.abs(x)
    finite = tl.min(tl.where(ax < float("inf"), 1, 0), 0) > 0  # NaN and inf both fail the comparison
    absmax = tl.div_rn(tl.max(ax, 0), QMAX)
    if INT8:  # index.int8_scales, the token a document of its own
        unit, inv_unit = _int8_grid_unit(tl.where(absmax > 0, absmax, 1.0), SCALE_BITS)
        scale = tl.maximum(tl.math.ceil(absmax * inv_unit), 1.0) * unit
        # |x / scale| <= 127: adding and taking away 1.5 * 2**23 rounds it half to even, as torch.round
        codes = (tl.div_rn(x, scale) + 12582912.0) - 12582912.0
        codes = tl.minimum(tl.maximum(codes, -127.0), 127.0).to(tl.int8)
    else:  # the absmax scale refit to |x|^2 / <x, codes> where that dot is positive (index._e4m3_codes)
        absmax = tl.where(absmax != 0, absmax, 1.0)
        codes = _e4m3_grid(tl.div_rn(x, absmax)).to(tl.float8e4nv)
        dot = tl.sum(x * codes.to(tl.float32), 0)
        scale = tl.where(dot > 0, tl.div_rn(tl.sum(x * x, 0), dot), absmax)
    tl.store(codes_ptr + t * D + offs, codes, mask=real)
    tl.store(scales_ptr + t, tl.where(finite, scale, float("nan")))


_QUANTIZE_ROWS = Launcher(_quantize_rows_kernel, INTERPRETED.value)


def quantize_rows(tokens: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``tokens [T, D]`` float16/bfloat16/float32 as ``(codes [T, D] dtype, scales [T] float32)``, int8 or
    float8_e4m3fn: ``index.quantize(tokens, dtype, scale_tries=1)`` (e4m3 scales may differ from it in the
    last bit: the dot of the refit is summed in another order)."""
    T, D = tokens.shape
    codes = torch.empty(T, D, dtype=dtype, device=tokens.device)
    scales = torch.empty(T, dtype=torch.float32, device=tokens.device)
    if T:
        _QUANTIZE_ROWS(
            T, (tokens, codes, scales), (D, *tokens.stride(), int8_scale_bits(D)),
            dict(QMAX=QUANT_MAX[dtype], INT8=dtype == torch.int8, BLOCK_D=_pow2_at_least(D)), 4, 1,
        )  # fmt: skip
    return codes, scales
