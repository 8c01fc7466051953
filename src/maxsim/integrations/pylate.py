"""PyLate drop-ins: ``colbert_scores``, ``colbert_scores_pairwise`` and ``colbert_kd_scores`` on maxsim.

The three functions keep the names, arguments, shapes, mask conventions and results of ``pylate.scores``
(PyLate 1.5.1 and later; 1.3-1.5.0 lack only ``backend``), and compute with :func:`maxsim.maxsim` /
:func:`maxsim.maxsim_varlen` instead of PyLate's ``[Nq, Nd, Lq, Ld]`` einsum. They are differentiable in
the embeddings (gradients in the input dtype), so PyLate's losses train through them.

Masks follow PyLate, not :func:`maxsim.maxsim`. PyLate *multiplies* its masks (0/1, as float, int or bool)
into the similarities, so a masked document token scores 0 rather than being excluded: it wins whenever
every real token of the document has a negative similarity, and a document with no real token scores 0.
``maxsim.maxsim``'s masks exclude (a masked document token never wins; an empty document is an error).
Here each mask is multiplied into its side's tokens before scoring (``<q, d * m> = <q, d> * m``), which
is PyLate's result exactly, ties and gradients included (a winning masked token passes no gradient).

Results are in PyLate's dtype: the embeddings' dtype promoted with each mask's dtype (float16 embeddings
with a float32 mask give float32, with a bool mask float16), computed with float32 accumulation.

``backend`` (``"auto"``, ``"torch"``, ``"flash"``, ``"lik"`` or None) is accepted for signature
compatibility and ignored; maxsim picks its own backend from the device (``MAXSIM_BACKEND`` forces one).

To make PyLate itself (models, rerankers, losses, evaluators) score with maxsim, call :func:`patch` once,
before building models and losses; :func:`unpatch` restores PyLate's functions.
"""

from __future__ import annotations

import inspect
import sys
import types

import numpy as np
import torch

from .. import validate as _v
from ..api import maxsim as _maxsim
from ..api import maxsim_varlen as _maxsim_varlen

__all__ = ["colbert_scores", "colbert_scores_pairwise", "colbert_kd_scores", "patch", "unpatch"]

BACKENDS = ("auto", "torch", "flash", "lik")


def _check_backend(backend) -> None:
    if backend is not None and (not isinstance(backend, str) or backend.lower() not in BACKENDS):
        raise ValueError(f"backend must be None or one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")


def _as_tensor(x, name: str) -> torch.Tensor:
    """PyLate's input forms as one tensor: a tensor as is, a numpy array shared, a list of tensors stacked,
    a list of numpy arrays or of nested lists as float32."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if not isinstance(x, (list, tuple)):
        raise TypeError(f"{name} must be a torch.Tensor, a numpy array or a list, got {type(x).__name__}")
    if len(x) == 0:
        raise ValueError(f"{name} is empty")
    try:
        if all(isinstance(item, torch.Tensor) for item in x):
            return torch.stack(list(x))
        return torch.from_numpy(np.asarray(x, dtype=np.float32))
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"{name} must hold items of one shape (pad them and pass a mask): {error}") from None


def _apply_mask(x: torch.Tensor, mask, name: str, x_name: str, dims: int) -> tuple[torch.Tensor, torch.dtype]:
    """``x * mask[..., None]`` for a mask shaped like the first ``dims`` dims of ``x``, and the mask's dtype."""
    if mask is None:
        return x, x.dtype
    mask = _as_tensor(mask, name)
    if mask.dtype.is_complex:
        raise TypeError(f"{name} must hold 0/1 as bool, integers or floats, got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(x.shape[:dims]):
        raise ValueError(
            f"{name} must have shape {list(x.shape[:dims])} (as {x_name}), got {list(mask.shape)}"
        )
    _v.check_device(mask, name, x.device, x_name)
    return x * mask.to(x.dtype)[..., None], mask.dtype


def _padded_scores(q, d, queries_mask, documents_mask, d_rank: int) -> torch.Tensor:
    """``colbert_scores`` (``d_rank`` 3: all pairs) and ``colbert_kd_scores`` (4: own candidates)."""
    q = _as_tensor(q, "queries_embeddings")
    d = _as_tensor(d, "documents_embeddings")
    _v.check_tokens(q, "queries_embeddings", rank=3, allow_float64=True)
    _v.check_tokens(d, "documents_embeddings", rank=d_rank, allow_float64=True)
    _v.check_pair(q, d, q_name="queries_embeddings", d_name="documents_embeddings")
    if d_rank == 4 and d.shape[0] != q.shape[0]:
        raise ValueError(
            f"documents_embeddings must hold one candidate list per query: {q.shape[0]} queries, got shape "
            f"{tuple(d.shape)}"
        )
    q, q_mask_dtype = _apply_mask(q, queries_mask, "queries_mask", "queries_embeddings", 2)
    d, d_mask_dtype = _apply_mask(d, documents_mask, "documents_mask", "documents_embeddings", d_rank - 1)
    scores = _maxsim(q[:, None], d[None] if d_rank == 3 else d)
    return scores.to(torch.promote_types(torch.promote_types(q.dtype, q_mask_dtype), d_mask_dtype))


def colbert_scores(
    queries_embeddings,
    documents_embeddings,
    queries_mask=None,
    documents_mask=None,
    backend: str | None = None,
) -> torch.Tensor:
    """ColBERT scores of every query against every document, as ``pylate.scores.colbert_scores``.

    Args:
        queries_embeddings: ``[Nq, Lq, D]`` float32/float16/bfloat16 (float64 on CPU), or a numpy array or
            list PyLate accepts (a list of tensors is stacked, nested lists become float32).
        documents_embeddings: ``[Nd, Ld, D]``, same dtype.
        queries_mask: ``[Nq, Lq]`` 0/1 (bool, int or float), multiplied into the similarities.
        documents_mask: ``[Nd, Ld]`` 0/1, multiplied into the similarities (a masked token scores 0).
        backend: accepted and ignored (see the module docstring).

    Returns:
        ``[Nq, Nd]`` in PyLate's dtype (the embeddings' dtype promoted with the masks'), differentiable.
    """
    _check_backend(backend)
    return _padded_scores(queries_embeddings, documents_embeddings, queries_mask, documents_mask, 3)


def colbert_kd_scores(
    queries_embeddings,
    documents_embeddings,
    queries_mask=None,
    documents_mask=None,
    backend: str | None = None,
) -> torch.Tensor:
    """Scores of each query against its own candidates (distillation), as ``pylate.scores.colbert_kd_scores``.

    Args:
        queries_embeddings: ``[Nq, Lq, D]`` float32/float16/bfloat16 (float64 on CPU), or a form PyLate
            accepts (see :func:`colbert_scores`).
        documents_embeddings: ``[Nq, C, Ld, D]``, same dtype: ``C`` candidates per query.
        queries_mask: ``[Nq, Lq]`` 0/1, multiplied into the similarities.
        documents_mask: ``[Nq, C, Ld]`` 0/1, multiplied into the similarities.
        backend: accepted and ignored.

    Returns:
        ``[Nq, C]`` in PyLate's dtype, differentiable.
    """
    _check_backend(backend)
    return _padded_scores(queries_embeddings, documents_embeddings, queries_mask, documents_mask, 4)


def _token_list(x, name: str) -> list[torch.Tensor]:
    """A padded ``[B, L, D]`` tensor, or a list of ``[L_i, D]`` items, as a list of 2-D tensors."""
    if isinstance(x, torch.Tensor):
        _v.check_tokens(x, name, rank=3, allow_float64=True)
        return list(x.unbind(0))
    if not isinstance(x, (list, tuple)):
        raise TypeError(f"{name} must be a torch.Tensor, a numpy array or a list, got {type(x).__name__}")
    items = [_as_tensor(item, f"{name}[{i}]") for i, item in enumerate(x)]
    for i, item in enumerate(items):
        _v.check_tokens(item, f"{name}[{i}]", rank=2, allow_float64=True)
    return items


def colbert_scores_pairwise(
    queries_embeddings, documents_embeddings, backend: str | None = None
) -> torch.Tensor:
    """ColBERT score of each query with the document at the same index, as
    ``pylate.scores.colbert_scores_pairwise``.

    Args:
        queries_embeddings: ``[B, Lq, D]`` float32/float16/bfloat16 (float64 on CPU), or a list of ``B``
            ``[Lq_i, D]`` tensors (or arrays, or nested lists) of any lengths; every token counts.
        documents_embeddings: ``[B, Ld, D]`` or a list of ``B`` ``[Ld_i, D]`` items, same dtype.
        backend: accepted and ignored.

    Returns:
        ``[B]`` in the embeddings' dtype, differentiable.
    """
    _check_backend(backend)
    q, d = (
        torch.from_numpy(x) if isinstance(x, np.ndarray) else x
        for x in (queries_embeddings, documents_embeddings)
    )
    padded = isinstance(q, torch.Tensor) and isinstance(d, torch.Tensor)
    if padded:
        _v.check_tokens(q, "queries_embeddings", rank=3, allow_float64=True)
        _v.check_tokens(d, "documents_embeddings", rank=3, allow_float64=True)
        _v.check_pair(q, d, q_name="queries_embeddings", d_name="documents_embeddings")
    else:
        q, d = _token_list(q, "queries_embeddings"), _token_list(d, "documents_embeddings")
    if len(q) != len(d):
        raise ValueError(
            f"queries_embeddings and documents_embeddings must hold as many items, got {len(q)} and {len(d)}"
        )
    if padded:
        return _maxsim(q, d).to(q.dtype)
    if not q:
        raise ValueError("queries_embeddings is empty")
    for i, (qi, di) in enumerate(zip(q, d, strict=True)):
        _v.check_pair(q[0], qi, q_name="queries_embeddings[0]", d_name=f"queries_embeddings[{i}]")
        _v.check_pair(qi, di, q_name=f"queries_embeddings[{i}]", d_name=f"documents_embeddings[{i}]")
    pairs = torch.arange(len(q), device=q[0].device)
    scores = _maxsim_varlen(
        torch.cat(q), _offsets(q), torch.cat(d), _offsets(d), pairs=(pairs, pairs),
        max_seqlen_q=max(x.shape[0] for x in q), max_seqlen_d=max(x.shape[0] for x in d), validate=False,
    )  # fmt: skip
    return scores.to(q[0].dtype)


def _offsets(items: list[torch.Tensor]) -> torch.Tensor:
    lengths = [0] + [item.shape[0] for item in items]
    return torch.tensor(lengths, dtype=torch.int64, device=items[0].device).cumsum(0)


# ---------------------------------------------------------------------------------------------------------
# patch() / unpatch(): PyLate's own code scoring with maxsim
# ---------------------------------------------------------------------------------------------------------


def _colbert_scores_documents_mask(queries_embeddings, documents_embeddings, mask=None) -> torch.Tensor:
    """PyLate < 1.3's ``colbert_scores``, whose ``mask`` is the documents mask."""
    return colbert_scores(queries_embeddings, documents_embeddings, documents_mask=mask)


def _colbert_kd_scores_documents_mask(queries_embeddings, documents_embeddings, mask=None) -> torch.Tensor:
    """PyLate < 1.3's ``colbert_kd_scores``, whose ``mask`` is the documents mask."""
    return colbert_kd_scores(queries_embeddings, documents_embeddings, documents_mask=mask)


_NAMES = ("colbert_scores", "colbert_scores_pairwise", "colbert_kd_scores")
_swapped: dict = {}  # PyLate's function -> its replacement, while patched
_outside: list = []  # (module, attribute, PyLate's function) that patch() set outside PyLate


def _is_pylate(module_name: str) -> bool:
    return module_name == "pylate" or module_name.startswith("pylate.")


def _swap_defaults(fn, by_id: dict) -> None:
    fn = getattr(fn, "__func__", fn)  # staticmethod, classmethod
    if not isinstance(fn, types.FunctionType):
        return
    if fn.__defaults__ and any(id(v) in by_id for v in fn.__defaults__):
        fn.__defaults__ = tuple(by_id.get(id(v), v) for v in fn.__defaults__)
    if fn.__kwdefaults__ and any(id(v) in by_id for v in fn.__kwdefaults__.values()):
        fn.__kwdefaults__ = {k: by_id.get(id(v), v) for k, v in fn.__kwdefaults__.items()}


def _swap(mapping: dict, *, pylate_only: bool) -> list[tuple[types.ModuleType, str, object]]:
    """Replace each key of ``mapping`` by its value in the attributes of the loaded modules (PyLate's only, or
    all), and in the default arguments of the functions and methods that PyLate's modules define
    (``score_metric=colbert_kd_scores``). Returns the ``(module, attribute, old value)`` it set."""
    by_id = {id(old): new for old, new in mapping.items()}
    changed = []
    for module_name, module in list(sys.modules.items()):
        own = _is_pylate(module_name)
        if not isinstance(module, types.ModuleType) or (pylate_only and not own):
            continue
        for attr, value in list(vars(module).items()):
            if id(value) in by_id:
                setattr(module, attr, by_id[id(value)])
                changed.append((module, attr, value))
            elif own and getattr(value, "__module__", None) == module_name:
                _swap_defaults(value, by_id)
                for member in vars(value).values() if isinstance(value, type) else ():
                    _swap_defaults(member, by_id)
    return changed


def patch() -> None:
    """Make PyLate score with maxsim: its three scoring functions are replaced everywhere they are held.

    Every loaded module's attribute that is one of ``pylate.scores``' functions (``pylate.scores`` itself,
    the module defining them, and each module that did ``from pylate.scores import colbert_scores``) and
    every default argument of a function or method defined in PyLate (the losses' ``score_metric``) now holds
    this module's function. Modules imported later get it from ``pylate.scores``. Objects built before the
    call keep what they hold, so call it before building models, losses and evaluators. With PyLate < 1.3,
    whose functions take ``mask`` (the documents mask) where later ones take ``queries_mask`` and
    ``documents_mask``, the replacements keep that older signature. Calling it again does nothing.

    Raises:
        ImportError: PyLate is not installed.
    """
    if _swapped:
        return
    import pylate.scores

    originals = {name: getattr(pylate.scores, name) for name in _NAMES}
    with_masks = "queries_mask" in inspect.signature(originals["colbert_scores"]).parameters
    replacements = {
        "colbert_scores": colbert_scores if with_masks else _colbert_scores_documents_mask,
        "colbert_scores_pairwise": colbert_scores_pairwise,
        "colbert_kd_scores": colbert_kd_scores if with_masks else _colbert_kd_scores_documents_mask,
    }
    _swapped.update({originals[name]: replacements[name] for name in _NAMES})
    _outside.extend(
        change for change in _swap(_swapped, pylate_only=False) if not _is_pylate(change[0].__name__)
    )


def unpatch() -> None:
    """Undo :func:`patch`: PyLate's own functions are back in PyLate's modules (those imported while patched
    included) and in the other modules' attributes that :func:`patch` set. Does nothing when not patched."""
    _swap({new: old for old, new in _swapped.items()}, pylate_only=True)
    for module, attr, original in _outside:
        if getattr(module, attr, None) is _swapped.get(original):
            setattr(module, attr, original)
    _swapped.clear()
    _outside.clear()
