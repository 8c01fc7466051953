"""Bad input (DESIGN.md "Bad input"): every rule, for maxsim and maxsim_varlen.

Each case is a call that breaks one rule. It must raise the right exception type, with a message that names
the argument and the expected value, before any backend runs. ``validate=False`` skips exactly the checks
that read tensor values (``VALUE`` cases) and keeps every shape, type and device check (``ALWAYS`` cases).
No call writes into a caller's tensor, whether it fails or not.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from helpers import assert_scores_close

import maxsim
from maxsim import validate
from maxsim.backends import torch_backend
from maxsim.reference import maxsim_reference, maxsim_varlen_reference

ALWAYS, VALUE = "always", "value"  # kept by validate=False / skipped by validate=False
META = "meta"  # a second device on every machine: any computation on it next to a cpu tensor fails


def tokens(*shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=dtype).to(device)


def index(values, dtype=torch.int64, device="cpu") -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------------------
# Calls. Valid maxsim inputs: q [2, 3, 4], d [2, 5, 4]. Valid maxsim_varlen inputs: q [5, 4] in 2 sequences
# (lengths 2, 3), d [7, 4] in 3 documents (lengths 3, 1, 3).
# ---------------------------------------------------------------------------------------------------------


def padded(q=None, d=None, **kwargs):
    q = tokens(2, 3, 4) if q is None else q
    d = tokens(2, 5, 4) if d is None else d
    return maxsim.maxsim, (q, d), kwargs


def varlen(q=None, cu_q=None, d=None, cu_d=None, **kwargs):
    q = tokens(5, 4) if q is None else q
    cu_q = index([0, 2, 5], torch.int32) if cu_q is None else cu_q
    d = tokens(7, 4) if d is None else d
    cu_d = index([0, 3, 4, 7]) if cu_d is None else cu_d
    return maxsim.maxsim_varlen, (q, cu_q, d, cu_d), kwargs


@dataclass
class Case:
    id: str
    call: Callable  # () -> (function, args, kwargs): fresh tensors every time
    error: type
    arg: str  # the argument the message must name
    match: str  # regular expression the message must contain (the argument and what it expects)
    kind: str = ALWAYS


def cases_id(case: Case) -> str:
    return case.id


BAD_DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64, torch.int8, torch.int32, torch.int64]
BAD_DTYPES += [torch.uint8, torch.bool]
DTYPE_RULE = "must have dtype float32, float16, bfloat16"


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


PADDED_CASES = [
    # wrong rank / empty axes
    Case(
        "q-rank1", lambda: padded(q=tokens(4)), ValueError, "q", r"q must have shape \[\.\.\., tokens, dim\]"
    ),
    Case(
        "d-rank0", lambda: padded(d=torch.tensor(1.0)), ValueError, "d", r"d must have shape \[\.\.\., tokens"
    ),
    Case("q-empty-tokens", lambda: padded(q=tokens(2, 0, 4)), ValueError, "q", "q has an empty token axis"),
    Case("d-empty-tokens", lambda: padded(d=tokens(2, 0, 4)), ValueError, "d", "d has an empty token axis"),
    Case(
        "empty-dim",
        lambda: padded(q=tokens(2, 3, 0), d=tokens(2, 5, 0)),
        ValueError,
        "q",
        "q has an empty embedding dim",
    ),
    # q and d disagree
    Case(
        "D-mismatch",
        lambda: padded(d=tokens(2, 5, 6)),
        ValueError,
        "d",
        "q and d must have the same embedding dim D, got 4 and 6",
    ),
    Case(
        "dtype-mismatch",
        lambda: padded(d=tokens(2, 5, 4, dtype=torch.float16)),
        TypeError,
        "d",
        "q and d must have one dtype, got float32 and float16",
    ),
    Case(
        "dtype-mismatch-float64",
        lambda: padded(q=tokens(2, 3, 4, dtype=torch.float64)),
        TypeError,
        "q",
        "q and d must have one dtype, got float64 and float32",
    ),
    Case(
        "batch-not-broadcast",
        lambda: padded(d=tokens(3, 5, 4)),
        ValueError,
        "d",
        r"the batch dims of q \(2,\) and d \(3,\) do not broadcast",
    ),
    Case(
        "batch-not-broadcast-inner",
        lambda: padded(q=tokens(2, 3, 3, 4), d=tokens(3, 2, 5, 4)),
        ValueError,
        "q",
        r"the batch dims of q \(2, 3\) and d \(3, 2\) do not broadcast",
    ),
    # devices
    Case(
        "d-on-meta",
        lambda: padded(d=tokens(2, 5, 4, device=META)),
        ValueError,
        "d",
        "d is on meta but q is on cpu",
    ),
    Case(
        "q-on-meta",
        lambda: padded(q=tokens(2, 3, 4, device=META)),
        ValueError,
        "q",
        "d is on cpu but q is on meta",
    ),
    Case(
        "q_mask-on-meta",
        lambda: padded(q_mask=torch.ones(2, 3, dtype=torch.bool, device=META)),
        ValueError,
        "q_mask",
        "q_mask is on meta but q is on cpu",
    ),
    Case(
        "d_mask-on-meta",
        lambda: padded(d_mask=torch.ones(2, 5, dtype=torch.bool, device=META)),
        ValueError,
        "d_mask",
        "d_mask is on meta but d is on cpu",
    ),
    Case(
        "q_lengths-on-meta",
        lambda: padded(q_lengths=index([1, 2], device=META)),
        ValueError,
        "q_lengths",
        "q_lengths is on meta but q is on cpu",
    ),
    Case(
        "d_lengths-on-meta",
        lambda: padded(d_lengths=index([1, 2], device=META)),
        ValueError,
        "d_lengths",
        "d_lengths is on meta but d is on cpu",
    ),
    # unsupported dtypes, integer tensors, non-tensors
    *[
        Case(
            f"dtype-{dtype_name(t)}",
            lambda t=t: padded(q=tokens(2, 3, 4).to(t), d=tokens(2, 5, 4).to(t)),
            TypeError,
            "q",
            f"q {DTYPE_RULE}.*; got {dtype_name(t)}",
        )
        for t in BAD_DTYPES
    ],
    Case(
        "d-int64",
        lambda: padded(d=index([[[1] * 4] * 5] * 2)),
        TypeError,
        "d",
        f"d {DTYPE_RULE}.*; got int64",
    ),
    Case("q-list", lambda: padded(q=[[1.0] * 4] * 3), TypeError, "q", "q must be a torch.Tensor, got list"),
    Case(
        "q-numpy",
        lambda: padded(q=tokens(3, 4).numpy()),
        TypeError,
        "q",
        "q must be a torch.Tensor, got ndarray",
    ),
    Case(
        "d-none",
        lambda: (maxsim.maxsim, (tokens(3, 4), None), {}),
        TypeError,
        "d",
        "d must be a torch.Tensor, got NoneType",
    ),
    # lengths: range, dtype, type
    Case(
        "q_lengths-zero",
        lambda: padded(q_lengths=index([0, 3])),
        ValueError,
        "q_lengths",
        r"q_lengths must lie in \[1, 3\] \(the padded length of q\), got \[0, 3\]",
        VALUE,
    ),
    Case(
        "q_lengths-negative",
        lambda: padded(q_lengths=index([-1, 2])),
        ValueError,
        "q_lengths",
        r"q_lengths must lie in \[1, 3\]",
        VALUE,
    ),
    Case(
        "d_lengths-too-long",
        lambda: padded(d_lengths=index([5, 6], torch.int32)),
        ValueError,
        "d_lengths",
        r"d_lengths must lie in \[1, 5\] \(the padded length of d\), got \[5, 6\]",
        VALUE,
    ),
    Case(
        "d_lengths-zero",
        lambda: padded(d_lengths=index([0, 5])),
        ValueError,
        "d_lengths",
        r"d_lengths must lie in \[1, 5\]",
        VALUE,
    ),
    *[
        Case(
            f"q_lengths-{dtype_name(t)}",
            lambda t=t: padded(q_lengths=torch.ones(2, dtype=t)),
            TypeError,
            "q_lengths",
            f"q_lengths must have an integer dtype, got {dtype_name(t)}",
        )
        for t in (torch.float32, torch.float16, torch.bool, torch.complex64)
    ],
    Case(
        "d_lengths-list",
        lambda: padded(d_lengths=[1, 2]),
        TypeError,
        "d_lengths",
        "d_lengths must be an integer torch.Tensor, got list",
    ),
    # masks: dtype, type, shape
    *[
        Case(
            f"q_mask-{dtype_name(t)}",
            lambda t=t: padded(q_mask=torch.ones(2, 3, dtype=t)),
            TypeError,
            "q_mask",
            f"q_mask must have dtype bool.*, got {dtype_name(t)}",
        )
        for t in (torch.uint8, torch.int64, torch.float32)
    ],
    Case(
        "d_mask-list",
        lambda: padded(d_mask=[[True] * 5] * 2),
        TypeError,
        "d_mask",
        "d_mask must be a bool torch.Tensor, got list",
    ),
    Case(
        "q_mask-wrong-length",
        lambda: padded(q_mask=torch.ones(2, 4, dtype=torch.bool)),
        ValueError,
        "q_mask",
        r"q_mask must have shape \[\.\.\., 3\] to match q, got \(2, 4\)",
    ),
    Case(
        "d_mask-scalar",
        lambda: padded(d_mask=torch.tensor(True)),
        ValueError,
        "d_mask",
        r"d_mask must have shape \[\.\.\., 5\] to match d, got \(\)",
    ),
    # a mask or lengths that would enlarge its side's batch (never a silent [B, B])
    Case(
        "q_lengths-enlarges-candidates",
        lambda: padded(q=tokens(2, 1, 3, 4), d=tokens(2, 6, 5, 4), q_lengths=index([1, 2])),
        ValueError,
        "q_lengths",
        r"q_lengths has shape \(2,\), which must broadcast to the batch dims of q \(2, 1\) without enlarging it",
    ),
    Case(
        "q_mask-enlarges-candidates",
        lambda: padded(q=tokens(2, 1, 3, 4), d=tokens(2, 6, 5, 4), q_mask=torch.ones(2, 3, dtype=torch.bool)),
        ValueError,
        "q_mask",
        r"q_mask has shape \(2, 3\), which must broadcast to the token dims of q \(2, 1, 3\) without enlarging",
    ),
    Case(
        "d_lengths-enlarges-all-pairs",
        lambda: padded(q=tokens(2, 1, 3, 4), d=tokens(1, 6, 5, 4), d_lengths=index([[1] * 6] * 2)),
        ValueError,
        "d_lengths",
        r"d_lengths has shape \(2, 6\), which must broadcast to the batch dims of d \(1, 6\)",
    ),
    Case(
        "d_lengths-extra-dim",
        lambda: padded(d_lengths=index([[1, 2]])),
        ValueError,
        "d_lengths",
        r"d_lengths has shape \(1, 2\), which must broadcast to the batch dims of d \(2,\)",
    ),
    Case(
        "q_lengths-corpus-query",
        lambda: padded(q=tokens(3, 4), d=tokens(6, 5, 4), q_lengths=index([3] * 6)),
        ValueError,
        "q_lengths",
        r"q_lengths has shape \(6,\), which must broadcast to the batch dims of q \(\)",
    ),
    Case(
        "d_mask-not-broadcast",
        lambda: padded(d_mask=torch.ones(3, 5, dtype=torch.bool)),
        ValueError,
        "d_mask",
        r"d_mask has shape \(3, 5\), which must broadcast to the token dims of d \(2, 5\)",
    ),
    # one form per side
    Case(
        "q-mask-and-lengths",
        lambda: padded(q_mask=torch.ones(2, 3, dtype=torch.bool), q_lengths=index([1, 2])),
        ValueError,
        "q_mask",
        "give q_mask or q_lengths, not both",
    ),
    Case(
        "d-mask-and-lengths",
        lambda: padded(d_mask=torch.ones(2, 5, dtype=torch.bool), d_lengths=index([1, 2])),
        ValueError,
        "d_lengths",
        "give d_mask or d_lengths, not both",
    ),
    # a document without a real token
    Case(
        "d_mask-empty-row",
        lambda: padded(d_mask=index([[True, False, False, False, False], [False] * 5], torch.bool)),
        ValueError,
        "d_mask",
        r"d_mask has a document with no real token \(a row of all False\)",
        VALUE,
    ),
    Case(
        "d_mask-broadcast-empty",
        lambda: padded(d_mask=torch.zeros(5, dtype=torch.bool)),
        ValueError,
        "d_mask",
        "d_mask has a document with no real token",
        VALUE,
    ),
    # flags
    Case(
        "normalize-int",
        lambda: padded(normalize=1),
        TypeError,
        "normalize",
        "normalize must be a bool, got int",
    ),
    Case(
        "return_argmax-str",
        lambda: padded(return_argmax="yes"),
        TypeError,
        "return_argmax",
        "return_argmax must be a bool, got str",
    ),
]

VARLEN_CASES = [
    # wrong rank / empty axes
    Case(
        "q-rank3",
        lambda: varlen(q=tokens(1, 5, 4)),
        ValueError,
        "q",
        r"q must have 2 dims, got shape \(1, 5, 4\)",
    ),
    Case("d-rank1", lambda: varlen(d=tokens(4)), ValueError, "d", r"d must have 2 dims, got shape \(4,\)"),
    Case(
        "q-empty-tokens",
        lambda: varlen(q=tokens(0, 4), cu_q=index([0, 0])),
        ValueError,
        "q",
        "q has an empty token axis",
    ),
    Case(
        "d-empty-tokens",
        lambda: varlen(d=tokens(0, 4), cu_d=index([0, 0])),
        ValueError,
        "d",
        "d has an empty token axis",
    ),
    Case(
        "empty-dim",
        lambda: varlen(q=tokens(5, 0), d=tokens(7, 0)),
        ValueError,
        "q",
        "q has an empty embedding dim",
    ),
    # q and d disagree
    Case(
        "D-mismatch",
        lambda: varlen(d=tokens(7, 3)),
        ValueError,
        "d",
        "q and d must have the same embedding dim D",
    ),
    Case(
        "dtype-mismatch",
        lambda: varlen(q=tokens(5, 4, dtype=torch.bfloat16)),
        TypeError,
        "q",
        "q and d must have one dtype, got bfloat16 and float32",
    ),
    # devices
    Case(
        "d-on-meta",
        lambda: varlen(d=tokens(7, 4, device=META)),
        ValueError,
        "d",
        "d is on meta but q is on cpu",
    ),
    Case(
        "cu_seqlens_q-on-meta",
        lambda: varlen(cu_q=index([0, 2, 5], device=META)),
        ValueError,
        "cu_seqlens_q",
        "cu_seqlens_q is on meta but q is on cpu",
    ),
    Case(
        "cu_seqlens_d-on-meta",
        lambda: varlen(cu_d=index([0, 3, 4, 7], device=META)),
        ValueError,
        "cu_seqlens_d",
        "cu_seqlens_d is on meta but q is on cpu",
    ),
    Case(
        "pairs-on-meta",
        lambda: varlen(pairs=(index([0, 1]), index([2, 0], device=META))),
        ValueError,
        "pairs",
        r"pairs\[1\] \(d_ids\) is on meta but q is on cpu",
    ),
    # unsupported dtypes, integer tensors, non-tensors
    *[
        Case(
            f"dtype-{dtype_name(t)}",
            lambda t=t: varlen(q=tokens(5, 4).to(t), d=tokens(7, 4).to(t)),
            TypeError,
            "q",
            f"q {DTYPE_RULE}.*; got {dtype_name(t)}",
        )
        for t in BAD_DTYPES
    ],
    Case("d-list", lambda: varlen(d=[[0.0] * 4] * 7), TypeError, "d", "d must be a torch.Tensor, got list"),
    # cu_seqlens: values, dtype, rank, type
    Case(
        "cu_seqlens_q-start",
        lambda: varlen(cu_q=index([1, 2, 5])),
        ValueError,
        "cu_seqlens_q",
        "cu_seqlens_q must start at 0, got 1",
        VALUE,
    ),
    Case(
        "cu_seqlens_d-decreasing",
        lambda: varlen(cu_d=index([0, 3, 2, 7])),
        ValueError,
        "cu_seqlens_d",
        "cu_seqlens_d must be non-decreasing",
        VALUE,
    ),
    Case(
        "cu_seqlens_q-end",
        lambda: varlen(cu_q=index([0, 2, 4])),
        ValueError,
        "cu_seqlens_q",
        r"cu_seqlens_q must end at the token count of q \(5\), got 4",
        VALUE,
    ),
    Case(
        "cu_seqlens_d-end",
        lambda: varlen(cu_d=index([0, 3, 4, 6])),
        ValueError,
        "cu_seqlens_d",
        r"cu_seqlens_d must end at the token count of d \(7\), got 6",
        VALUE,
    ),
    Case(
        "cu_seqlens_d-empty-segment",
        lambda: varlen(cu_d=index([0, 3, 3, 7])),
        ValueError,
        "cu_seqlens_d",
        r"cu_seqlens_d holds an empty segment \(sequence 1 has no token\)",
        VALUE,
    ),
    Case(
        "cu_seqlens_q-empty-segment",
        lambda: varlen(cu_q=index([0, 0, 5])),
        ValueError,
        "cu_seqlens_q",
        r"cu_seqlens_q holds an empty segment \(sequence 0 has no token\)",
        VALUE,
    ),
    *[
        Case(
            f"cu_seqlens_q-{dtype_name(t)}",
            lambda t=t: varlen(cu_q=index([0, 2, 5], t)),
            TypeError,
            "cu_seqlens_q",
            f"cu_seqlens_q must have dtype int32 or int64, got {dtype_name(t)}",
        )
        for t in (torch.int16, torch.uint8, torch.float32, torch.float64)
    ],
    Case(
        "cu_seqlens_d-rank2",
        lambda: varlen(cu_d=index([[0, 3, 4, 7]])),
        ValueError,
        "cu_seqlens_d",
        r"cu_seqlens_d must have shape \[N\+1\] with N >= 1, got \(1, 4\)",
    ),
    Case(
        "cu_seqlens_q-rank0",
        lambda: varlen(cu_q=index(5)),
        ValueError,
        "cu_seqlens_q",
        r"cu_seqlens_q must have shape \[N\+1\] with N >= 1, got \(\)",
    ),
    Case(
        "cu_seqlens_q-no-sequence",
        lambda: varlen(cu_q=index([0])),
        ValueError,
        "cu_seqlens_q",
        r"cu_seqlens_q must have shape \[N\+1\] with N >= 1, got \(1,\)",
    ),
    Case(
        "cu_seqlens_d-list",
        lambda: varlen(cu_d=[0, 3, 4, 7]),
        TypeError,
        "cu_seqlens_d",
        "cu_seqlens_d must be an int32 or int64 torch.Tensor, got list",
    ),
    # max_seqlen
    Case(
        "max_seqlen_q-too-small",
        lambda: varlen(max_seqlen_q=2),
        ValueError,
        "max_seqlen_q",
        r"max_seqlen_q=2 is smaller than the longest sequence \(3\)",
        VALUE,
    ),
    Case(
        "max_seqlen_d-too-small",
        lambda: varlen(max_seqlen_d=1),
        ValueError,
        "max_seqlen_d",
        r"max_seqlen_d=1 is smaller than the longest sequence \(3\)",
        VALUE,
    ),
    Case(
        "max_seqlen_q-zero",
        lambda: varlen(max_seqlen_q=0),
        ValueError,
        "max_seqlen_q",
        "max_seqlen_q must be >= 1",
    ),
    *[
        Case(
            f"max_seqlen_d-{type(v).__name__}",
            lambda v=v: varlen(max_seqlen_d=v),
            TypeError,
            "max_seqlen_d",
            f"max_seqlen_d must be a Python int \\(or None\\), got {type(v).__name__}",
        )
        for v in (3.0, index(3), True, "3")
    ],
    # pairs
    Case(
        "pairs-q_ids-too-high",
        lambda: varlen(pairs=(index([0, 2]), index([0, 1]))),
        ValueError,
        "pairs",
        r"pairs\[0\] \(q_ids\) must lie in \[0, 1\], got \[0, 2\]",
        VALUE,
    ),
    Case(
        "pairs-d_ids-too-high",
        lambda: varlen(pairs=(index([0, 1]), index([3, 0], torch.int32))),
        ValueError,
        "pairs",
        r"pairs\[1\] \(d_ids\) must lie in \[0, 2\], got \[0, 3\]",
        VALUE,
    ),
    Case(
        "pairs-q_ids-negative",
        lambda: varlen(pairs=(index([0, -1]), index([0, 1]))),
        ValueError,
        "pairs",
        r"pairs\[0\] \(q_ids\) must lie in \[0, 1\], got \[-1, 0\]",
        VALUE,
    ),
    Case(
        "pairs-d_ids-negative",
        lambda: varlen(pairs=(index([0, 1]), index([-1, 2]))),
        ValueError,
        "pairs",
        r"pairs\[1\] \(d_ids\) must lie in \[0, 2\], got \[-1, 2\]",
        VALUE,
    ),
    Case(
        "pairs-lengths-differ",
        lambda: varlen(pairs=(index([0, 1]), index([0]))),
        ValueError,
        "pairs",
        r"pairs\[0\] and pairs\[1\] must have the same length, got 2 and 1",
    ),
    Case(
        "pairs-ids-rank2",
        lambda: varlen(pairs=(index([0, 1]), index([[0, 1]]))),
        ValueError,
        "pairs",
        r"pairs\[1\] \(d_ids\) must have shape \[P\], got \(1, 2\)",
    ),
    Case(
        "pairs-tensor",
        lambda: varlen(pairs=index([[0, 1], [0, 1]])),
        TypeError,
        "pairs",
        r"pairs must be None or a tuple \(q_ids, d_ids\)",
    ),
    Case(
        "pairs-three",
        lambda: varlen(pairs=(index([0]), index([0]), index([0]))),
        TypeError,
        "pairs",
        r"pairs must be None or a tuple \(q_ids, d_ids\)",
    ),
    *[
        Case(
            f"pairs-ids-{name}",
            lambda ids=ids: varlen(pairs=(ids(), index([0, 1]))),
            TypeError,
            "pairs",
            r"pairs\[0\] \(q_ids\) must be an integer torch.Tensor",
        )
        for name, ids in (
            ("float", lambda: torch.tensor([0.0, 1.0])),
            ("bool", lambda: torch.tensor([False, True])),
            ("list", lambda: [0, 1]),
        )
    ],
    # flags
    Case(
        "normalize-none", lambda: varlen(normalize=None), TypeError, "normalize", "normalize must be a bool"
    ),
    Case(
        "return_argmax-int",
        lambda: varlen(return_argmax=0),
        TypeError,
        "return_argmax",
        "return_argmax must be a bool, got int",
    ),
]

ALL_CASES = [pytest.param(c, id=f"maxsim-{c.id}") for c in PADDED_CASES]
ALL_CASES += [pytest.param(c, id=f"varlen-{c.id}") for c in VARLEN_CASES]
VALUE_CASES = [p for p in ALL_CASES if p.values[0].kind == VALUE]
ALWAYS_CASES = [p for p in ALL_CASES if p.values[0].kind == ALWAYS]


@pytest.fixture
def backend_calls(monkeypatch):
    """Counts the calls that reach the torch backend (and keeps them working)."""
    monkeypatch.delenv("MAXSIM_BACKEND", raising=False)
    calls = []
    for name in ("maxsim_padded", "maxsim_varlen"):
        original = getattr(torch_backend, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch_backend, name, spy)
    return calls


def raises(case: Case, *, validate: bool, backend_calls: list) -> pytest.ExceptionInfo:
    fn, args, kwargs = case.call()
    with pytest.raises(case.error, match=case.match) as info:
        fn(*args, **kwargs, validate=validate)
    assert re.search(rf"\b{re.escape(case.arg)}\b", str(info.value)), f"message does not name {case.arg}"
    assert backend_calls == [], "the error was raised after a backend ran"
    return info


@pytest.mark.parametrize("case", ALL_CASES)
def test_bad_input_raises_naming_the_argument(case, backend_calls):
    raises(case, validate=True, backend_calls=backend_calls)


@pytest.mark.parametrize("case", ALWAYS_CASES)
def test_validate_false_keeps_shape_type_device_checks(case, backend_calls):
    raises(case, validate=False, backend_calls=backend_calls)


# Value cases whose unchecked call indexes past cu_seqlens or reads segments that do not tile the tokens
# (undefined: torch may raise): validate=False is only promised to skip the check, which
# test_validate_false_skips_value_checks shows with the other cases.
UNCHECKED_OUT_OF_BOUNDS = {
    "pairs-q_ids-too-high",
    "pairs-d_ids-too-high",
    "cu_seqlens_q-start",
    "cu_seqlens_q-end",
    "cu_seqlens_d-decreasing",
}


@pytest.mark.parametrize("case", [p for p in VALUE_CASES if p.values[0].id not in UNCHECKED_OUT_OF_BOUNDS])
def test_validate_false_skips_value_checks(case, backend_calls):
    fn, args, kwargs = case.call()
    out = fn(*args, **kwargs, validate=False)
    assert len(backend_calls) == 1
    assert out.dtype == torch.float32


def test_validate_must_be_a_bool(backend_calls):
    for fn, args, _ in (padded(), varlen()):
        with pytest.raises(TypeError, match="validate must be a bool, got NoneType"):
            fn(*args, validate=None)
        with pytest.raises(TypeError, match="validate must be a bool, got int"):
            fn(*args, validate=1)
    assert backend_calls == []


def test_unchecked_values_compute_as_documented():
    """What validate=False gives where the checks would have failed: the obvious, documented results."""
    q, d = tokens(2, 3, 4), tokens(2, 5, 4)
    ref, _ = maxsim_reference(q, d)
    # lengths beyond the padded size keep every token; a query of length 0 adds nothing
    assert_scores_close(
        maxsim.maxsim(q, d, d_lengths=index([9, 5]), validate=False), ref, dtype=torch.float32
    )
    scores = maxsim.maxsim(q, d, q_lengths=index([0, 3]), validate=False)
    assert scores[0].item() == 0.0 and math.isclose(scores[1].item(), ref[1].item(), rel_tol=1e-5)
    # a document without a real token scores -inf
    scores = maxsim.maxsim(q, d, d_lengths=index([0, 5]), validate=False)
    assert scores[0].item() == float("-inf") and scores[1].isfinite()
    # an empty document segment scores -inf; an empty query segment scores 0
    fn, (q, cu_q, d, cu_d), _ = varlen()
    scores = maxsim.maxsim_varlen(q, cu_q, d, index([0, 3, 3, 7]), validate=False)
    assert bool((scores[:, 1] == float("-inf")).all()) and bool(scores[:, [0, 2]].isfinite().all())
    scores = maxsim.maxsim_varlen(q, index([0, 0, 5]), d, cu_d, validate=False)
    assert bool((scores[0] == 0).all())
    ref, _ = maxsim_varlen_reference(q, index([0, 5]), d, cu_d)
    assert_scores_close(scores[1], ref[0], dtype=torch.float32)


def test_accepted_edges(backend_calls):
    """Just inside the rules: none of these is an error."""
    q, d = tokens(2, 3, 4), tokens(2, 5, 4)
    maxsim.maxsim(q, d, q_mask=torch.zeros(2, 3, dtype=torch.bool))  # a query without a real token adds 0
    maxsim.maxsim(q, d, q_lengths=index([1, 3], torch.uint8), d_lengths=index([5, 1], torch.int16))
    maxsim.maxsim(q, d, d_mask=torch.ones(5, dtype=torch.bool))  # broadcast within its side
    maxsim.maxsim(q[:, None], d[None], q_lengths=index([[1], [3]]), d_lengths=index([[5, 1]]))
    maxsim.maxsim(tokens(3, 4), tokens(6, 5, 4), q_lengths=index(2))  # a 0-dim length for an unbatched q
    maxsim.maxsim(q.double(), d.double())  # float64, for gradcheck
    fn, (q, cu_q, d, cu_d), _ = varlen()
    maxsim.maxsim_varlen(q, cu_q.long(), d, cu_d.int(), max_seqlen_q=3, max_seqlen_d=10)
    maxsim.maxsim_varlen(q, cu_q, d, cu_d, pairs=(index([], torch.int32), index([])))
    maxsim.maxsim_varlen(q, cu_q, d, cu_d, pairs=[index([1, 1], torch.uint8), index([2, 0], torch.int16)])
    assert backend_calls == ["maxsim_padded"] * 6 + ["maxsim_varlen"] * 3


def snapshot(args, kwargs):
    """Every tensor a call receives (pairs included) with its version counter and, off meta, its values."""
    found = []

    def visit(value):
        if isinstance(value, torch.Tensor):
            found.append((value, value._version, None if value.is_meta else value.clone()))
        elif isinstance(value, (tuple, list)):
            for item in value:
                visit(item)

    visit(list(args) + list(kwargs.values()))
    return found


def assert_untouched(found):
    for tensor, version, values in found:
        assert tensor._version == version, "a caller's tensor was written in place"
        if values is not None:
            assert torch.equal(tensor, values), "a caller's tensor changed"


GOOD_CALLS = [
    pytest.param(lambda: padded(normalize=True, return_argmax=True), id="maxsim-normalize-argmax"),
    pytest.param(
        lambda: padded(
            q=tokens(2, 1, 3, 4, dtype=torch.float16),
            d=tokens(2, 6, 5, 4, dtype=torch.float16),
            q_mask=index([[[True, False, True]], [[False, False, False]]], torch.bool),
            d_lengths=index([[1, 2, 3, 4, 5, 5], [5] * 6], torch.int32),
            return_argmax=True,
        ),
        id="maxsim-candidates-masks",
    ),
    pytest.param(
        lambda: varlen(pairs=(index([1, 0, 1]), index([2, 2, 0])), normalize=True, return_argmax=True),
        id="varlen-pairs",
    ),
    pytest.param(lambda: varlen(max_seqlen_q=4, return_argmax=True), id="varlen-all-pairs"),
]


@pytest.mark.parametrize("validate", [True, False], ids=["validate", "no-validate"])
@pytest.mark.parametrize("call", [p.values[0].call for p in ALL_CASES], ids=[p.id for p in ALL_CASES])
def test_bad_input_writes_nothing(call, validate):
    fn, args, kwargs = call()
    found = snapshot(args, kwargs)
    try:
        fn(*args, **kwargs, validate=validate)
    except Exception:  # which error is the other tests' concern; here only the inputs matter
        pass
    assert_untouched(found)


@pytest.mark.parametrize("validate", [True, False], ids=["validate", "no-validate"])
@pytest.mark.parametrize("call", GOOD_CALLS)
def test_success_writes_nothing(call, validate):
    fn, args, kwargs = call()
    found = snapshot(args, kwargs)
    out = fn(*args, **kwargs, validate=validate)
    assert_untouched(found)
    for result in out if isinstance(out, tuple) else (out,):
        assert all(result.data_ptr() != tensor.data_ptr() for tensor, _, _ in found), (
            "a result aliases an input"
        )


def test_values_checked_once_per_tensor_version(monkeypatch):
    """A tensor whose values passed is not read again (no sync in a search's repeat calls) until torch changes
    it in place, through itself or a view; another tensor with the same values and an inference tensor are
    checked again; a failed check is not remembered."""
    reads = []
    aminmax = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda x, **kw: reads.append(1) or aminmax(x, **kw))
    # an empty memory of checks: one that the earlier tests of this process filled would be cleared mid-test
    monkeypatch.setattr(validate, "_CHECKED", {})
    q, d = tokens(5, 4), tokens(7, 4)
    cu_q, cu_d = index([0, 2, 5]), index([0, 3, 4, 7])

    def varlen(cu_d=cu_d, **kw):
        return maxsim.maxsim_varlen(q, cu_q, d, cu_d, **kw)

    expected = varlen()
    assert len(reads) == 2  # cu_seqlens_q and cu_seqlens_d, once each
    assert torch.equal(varlen(), expected) and len(reads) == 2
    pairs = (index([0, 1]), index([2, 0]))
    varlen(pairs=pairs)
    varlen(pairs=pairs)
    assert len(reads) == 4  # the pair ids, once each
    cu_d[1:2].fill_(0)  # through a view: sequence 0 is now empty
    with pytest.raises(ValueError, match="empty segment"):
        varlen()
    with pytest.raises(ValueError, match="empty segment"):  # a failure is not remembered
        varlen()
    cu_d[1] = 3
    varlen(cu_d=index([0, 3, 4, 7]))
    reads.clear()
    varlen(cu_d=index([0, 3, 4, 7]))  # another tensor
    assert len(reads) == 1
    with torch.inference_mode():
        cu_inference = index([0, 3, 4, 7])
    varlen(cu_d=cu_inference)
    varlen(cu_d=cu_inference)
    assert len(reads) == 3

    qp, dp = tokens(2, 3, 4), tokens(2, 5, 4)
    lengths = index([5, 2])
    maxsim.maxsim(qp, dp, d_lengths=lengths)
    reads.clear()
    maxsim.maxsim(qp, dp, d_lengths=lengths)
    assert not reads
    lengths[0] = 0
    with pytest.raises(ValueError, match="d_lengths must lie in"):
        maxsim.maxsim(qp, dp, d_lengths=lengths)
    mask = torch.ones(2, 5, dtype=torch.bool)
    maxsim.maxsim(qp, dp, d_mask=mask)
    mask[1] = False
    with pytest.raises(ValueError, match="no real token"):
        maxsim.maxsim(qp, dp, d_mask=mask)
