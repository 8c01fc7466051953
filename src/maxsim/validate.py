"""Every input check of the public API and its message, in one place.

Checks that read tensor values (lengths in range, a document with a real token, cu_seqlens order, pair
ids in range) need a device->host sync on GPUs; they run only when ``validate=True``, and once per tensor
and version: a tensor that passed is not read again until torch changes it in place (``checked_once``), so
the repeat calls of a search over one corpus cost no sync. Every other check (types, dtypes, shapes,
devices) always runs.
"""

from __future__ import annotations

import weakref

import torch

from .reference import lengths_to_mask

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_flag(value, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_tokens(x, name: str, *, rank: int | None = None, allow_float64: bool = False) -> None:
    """``x`` is a float tensor of tokens ``[..., L, D]`` (or exactly ``rank`` dims) with L, D >= 1."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    allowed = FLOAT_DTYPES + ((torch.float64,) if allow_float64 else ())
    if x.dtype not in allowed:
        names = ", ".join(_dtype_name(t) for t in allowed)
        raise TypeError(f"{name} must have dtype {names}; got {_dtype_name(x.dtype)}")
    if rank is not None and x.dim() != rank:
        raise ValueError(f"{name} must have {rank} dims, got shape {tuple(x.shape)}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape [..., tokens, dim] (at least 2 dims), got {tuple(x.shape)}")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has an empty embedding dim (shape {tuple(x.shape)})")
    if x.shape[-2] == 0:  # a shape check: it stays on with validate=False, packed tokens included
        raise ValueError(
            f"{name} has an empty token axis (shape {tuple(x.shape)}); it needs at least one token"
        )


def check_pair(q: torch.Tensor, d: torch.Tensor, *, q_name: str = "q", d_name: str = "d") -> None:
    """``q`` and ``d`` agree on dtype, embedding dim and device."""
    if q.dtype != d.dtype:
        raise TypeError(
            f"{q_name} and {d_name} must have one dtype, got {_dtype_name(q.dtype)} and {_dtype_name(d.dtype)}"
        )
    if q.shape[-1] != d.shape[-1]:
        raise ValueError(
            f"{q_name} and {d_name} must have the same embedding dim D, got {q.shape[-1]} and {d.shape[-1]}"
        )
    check_device(d, d_name, q.device, q_name)


def check_device(x: torch.Tensor, name: str, device: torch.device, ref_name: str) -> None:
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {device}; put them on one device")


SCALED_DTYPES = (torch.int8, torch.float8_e4m3fn)


def check_scaled_tokens(q: torch.Tensor, d: torch.Tensor, d_scales, *, d_name: str = "d", q_scales=None) -> None:
    """Quantized documents: ``d [T, D]`` int8/float8_e4m3fn with float32 ``d_scales [T]`` on ``q``'s device,
    ``q`` float16/bfloat16, or with float32 ``q_scales [Tq]`` codes of ``d``'s dtype; documents of another
    dtype take no scales."""
    if q_scales is not None:
        if d_scales is None or not isinstance(q_scales, torch.Tensor):
            raise TypeError("q_scales must be a torch.Tensor, and only with quantized documents and d_scales")
        if q.dtype != d.dtype:
            raise TypeError(
                f"q with q_scales must have {d_name}'s dtype {_dtype_name(d.dtype)}, got {_dtype_name(q.dtype)}"
            )
        if q_scales.dtype != torch.float32 or q_scales.shape != q.shape[:1]:
            raise ValueError(
                f"q_scales must be float32 [{q.shape[0]}] (one per token of q), "
                f"got {_dtype_name(q_scales.dtype)} {list(q_scales.shape)}"
            )
        check_device(q_scales, "q_scales", q.device, "q")
    if d_scales is None:
        if d.dtype in SCALED_DTYPES:
            raise ValueError(
                f"{d_name} of dtype {_dtype_name(d.dtype)} needs d_scales (float32, one per token)"
            )
        return
    if not isinstance(d_scales, torch.Tensor):
        raise TypeError(f"d_scales must be a torch.Tensor or None, got {type(d_scales).__name__}")
    if d.dtype not in SCALED_DTYPES:
        names = ", ".join(_dtype_name(t) for t in SCALED_DTYPES)
        raise TypeError(f"{d_name} must have dtype {names} with d_scales; got {_dtype_name(d.dtype)}")
    if d_scales.dtype != torch.float32 or d_scales.shape != d.shape[:1]:
        raise ValueError(
            f"d_scales must be float32 [{d.shape[0]}] (one per token of {d_name}), "
            f"got {_dtype_name(d_scales.dtype)} {list(d_scales.shape)}"
        )
    if q_scales is None and q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"q must be float16 or bfloat16 with quantized {d_name}, got {_dtype_name(q.dtype)}")
    if q.shape[-1] != d.shape[-1]:
        raise ValueError(
            f"q and {d_name} must have the same embedding dim D, got {q.shape[-1]} and {d.shape[-1]}"
        )
    check_device(d, d_name, q.device, "q")
    check_device(d_scales, "d_scales", q.device, "q")


def _broadcast(a: tuple, b: tuple) -> tuple | None:
    """``torch.broadcast_shapes(a, b)`` in plain Python (30x cheaper per call), or None if they clash."""
    if len(a) < len(b):
        a, b = b, a
    b = (1,) * (len(a) - len(b)) + tuple(b)
    out = []
    for x, y in zip(a, b, strict=True):
        if x != y and x != 1 and y != 1:
            return None
        out.append(y if x == 1 else x)
    return tuple(out)


def broadcast_batch(q: torch.Tensor, d: torch.Tensor) -> tuple:
    """The broadcast of the batch dims ``q.shape[:-2]`` and ``d.shape[:-2]``."""
    batch = _broadcast(q.shape[:-2], d.shape[:-2])
    if batch is None:
        raise ValueError(
            f"the batch dims of q {tuple(q.shape[:-2])} and d {tuple(d.shape[:-2])} do not broadcast "
            "(they follow torch.matmul's rules: align from the right, sizes equal or 1)"
        )
    return batch


def _check_fits(shape: torch.Size, target: torch.Size, name: str, what: str) -> None:
    if _broadcast(shape, target) != tuple(target):
        raise ValueError(
            f"{name} has shape {tuple(shape)}, which must broadcast to {what} {tuple(target)} without enlarging it"
        )


# What a value check of a tensor found: (id(tensor), check) -> (weak reference, version, result).
_CHECKED: dict[tuple, tuple] = {}
MAX_CHECKED = 256


def checked_once(x: torch.Tensor, check: tuple, run):
    """``run()`` (a value check of ``x`` that raises on bad values, else returns what it found), or what it
    returned for this very tensor object at its current version (``x._version``, which torch bumps on every
    in-place change, also through a view). A change that bypasses torch's version counter (through
    ``.data``, a NumPy or DLPack alias, a custom kernel) is not seen; inference tensors, which keep no
    version, are checked on every call, as is everything under ``torch.compile``."""
    if x.is_inference() or torch.compiler.is_compiling():
        return run()
    key = (id(x), check)
    entry = _CHECKED.get(key)
    version = x._version
    if entry is not None and entry[0]() is x and entry[1] == version:
        return entry[2]
    result = run()
    if len(_CHECKED) >= MAX_CHECKED:
        _CHECKED.clear()
    _CHECKED[key] = (weakref.ref(x), version, result)
    return result


def token_mask(
    x: torch.Tensor,
    mask,
    lengths,
    side: str,
    *,
    check_values: bool,
    require_real: bool,
) -> torch.Tensor | None:
    """The bool mask ``[*x.shape[:-1]]`` (True = real token) of one side, or None when all are real.

    Args:
        x: ``[..., L, D]`` the side's tokens.
        mask: bool ``[..., L]`` or None; lengths: integer ``[...]`` or None (not both).
        side: ``"q"`` or ``"d"``: names the arguments in messages (``q_mask``, ``q_lengths``, ...).
        check_values: check lengths in ``[1, L]`` and, with ``require_real``, a real token per sequence.
        require_real: every sequence of this side needs a real token (documents).
    """
    if mask is None and lengths is None:
        return None
    mask_name, lengths_name = f"{side}_mask", f"{side}_lengths"
    if mask is not None and lengths is not None:
        raise ValueError(f"give {mask_name} or {lengths_name}, not both")
    length = x.shape[-2]
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{mask_name} must be a bool torch.Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(
                f"{mask_name} must have dtype bool (True = real token), got {_dtype_name(mask.dtype)}"
            )
        check_device(mask, mask_name, x.device, side)
        if mask.dim() < 1 or mask.shape[-1] != length:
            raise ValueError(
                f"{mask_name} must have shape [..., {length}] to match {side}, got {tuple(mask.shape)}"
            )
        _check_fits(mask.shape, x.shape[:-1], mask_name, f"the token dims of {side}")
        if require_real and check_values:

            def every_row_real():
                if not mask.any(dim=-1).all():
                    raise ValueError(f"{mask_name} has a document with no real token (a row of all False)")

            checked_once(mask, ("real rows",), every_row_real)
        return mask.expand(x.shape[:-1])
    if lengths is not None:
        return lengths_to_mask(token_lengths(x, lengths, side, check_values=check_values), length)
    return None


def token_lengths(x: torch.Tensor, lengths, side: str, *, check_values: bool) -> torch.Tensor:
    """Checked ``{side}_lengths`` of ``x [..., L, D]``: an integer tensor broadcastable to the batch dims
    ``[...]`` (returned expanded to them, a view) whose values lie in ``[1, L]`` (checked with
    ``check_values``: ``check_in_range``)."""
    lengths_name = f"{side}_lengths"
    batch, length = x.shape[:-2], x.shape[-2]
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"{lengths_name} must be an integer torch.Tensor, got {type(lengths).__name__}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"{lengths_name} must have an integer dtype, got {_dtype_name(lengths.dtype)}")
    check_device(lengths, lengths_name, x.device, side)
    _check_fits(lengths.shape, batch, lengths_name, f"the batch dims of {side}")
    if check_values:
        check_in_range(lengths, lengths_name, 1, length, f" (the padded length of {side})")
    return lengths.expand(batch)


def check_in_range(x: torch.Tensor, name: str, low: int, high: int, what: str = "") -> None:
    """The values of the integer tensor ``x`` lie in ``[low, high]`` (one device->host sync, once per tensor
    version: ``checked_once``); else a ``ValueError`` naming ``name`` (``what`` says what the bounds are)."""

    def in_range():
        lo, hi = torch.stack(torch.aminmax(x)).tolist()
        if lo < low or hi > high:
            raise ValueError(f"{name} must lie in [{low}, {high}]{what}, got [{lo}, {hi}]")

    if x.numel() > 0:
        checked_once(x, ("range", low, high), in_range)


def check_cu_seqlens(
    cu,
    name: str,
    total: int,
    tokens_name: str,
    *,
    check_values: bool,
    device: torch.device | None = None,
    device_name: str = "q",
) -> int | None:
    """``cu`` is int32/int64 ``[N+1]``: 0, non-decreasing, no empty segment, ending at ``total``.

    With ``device``, ``cu`` must be on it (named after ``device_name``); checked before any value is read.
    Returns the longest segment when the values are checked (read in the same, single device->host sync).
    """
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be an int32 or int64 torch.Tensor, got {type(cu).__name__}")
    if cu.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must have dtype int32 or int64, got {_dtype_name(cu.dtype)}")
    if cu.dim() != 1 or cu.shape[0] < 2:
        raise ValueError(f"{name} must have shape [N+1] with N >= 1, got {tuple(cu.shape)}")
    if device is not None:
        check_device(cu, name, device, device_name)
    if not check_values:
        return None

    def longest_segment() -> int:
        steps = cu[1:] - cu[:-1]
        first, last, shortest, longest = torch.stack([cu[0], cu[-1], *torch.aminmax(steps)]).tolist()
        if first != 0:
            raise ValueError(f"{name} must start at 0, got {first}")
        if last != total:
            raise ValueError(f"{name} must end at the token count of {tokens_name} ({total}), got {last}")
        if shortest < 0:
            raise ValueError(f"{name} must be non-decreasing")
        if shortest == 0:
            empty = int((steps == 0).nonzero()[0, 0])
            raise ValueError(f"{name} holds an empty segment (sequence {empty} has no token)")
        return longest

    return checked_once(cu, ("cu_seqlens", total), longest_segment)


def check_max_seqlen(
    value, cu: torch.Tensor, name: str, *, check_values: bool, longest: int | None = None
) -> int:
    """``max_seqlen`` as a Python int; None costs one device->host sync to compute it, unless ``longest``
    (the longest segment of ``cu``, as ``check_cu_seqlens`` returns it) is known."""
    if value is None:
        return longest if longest is not None else int((cu[1:] - cu[:-1]).max())
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a Python int (or None), got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    if check_values:
        actual = longest if longest is not None else int((cu[1:] - cu[:-1]).max())
        if value < actual:
            raise ValueError(f"{name}={value} is smaller than the longest sequence ({actual})")
    return value


def check_pairs(
    pairs, nq: int, nd: int, device: torch.device, *, check_values: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``pairs`` is ``(q_ids [P], d_ids [P])`` of integer tensors with ids in range."""
    if not isinstance(pairs, (tuple, list)) or len(pairs) != 2:
        raise TypeError("pairs must be None or a tuple (q_ids, d_ids) of integer tensors")
    checked = []
    for ids, name, count in ((pairs[0], "pairs[0] (q_ids)", nq), (pairs[1], "pairs[1] (d_ids)", nd)):
        if not isinstance(ids, torch.Tensor) or ids.dtype not in INDEX_DTYPES + (
            torch.int16,
            torch.uint8,
            torch.int8,
        ):
            raise TypeError(f"{name} must be an integer torch.Tensor")
        if ids.dim() != 1:
            raise ValueError(f"{name} must have shape [P], got {tuple(ids.shape)}")
        check_device(ids, name, device, "q")
        if check_values:
            check_in_range(ids, name, 0, count - 1)
        checked.append(ids.long())
    if checked[0].shape != checked[1].shape:
        raise ValueError(
            f"pairs[0] and pairs[1] must have the same length, got {checked[0].shape[0]} and {checked[1].shape[0]}"
        )
    return checked[0], checked[1]
