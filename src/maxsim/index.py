"""``maxsim.Index``: a packed multi-vector corpus with caller ids, quantized storage, search, save/load.

Storage: document tokens packed ``[T, D]`` with int64 offsets ``[N+1]`` and int64 ids ``[N]``, in one of
float16, bfloat16 (stored as given) or float8 e4m3 and int8 (each token scaled by its own float32 scale,
``token ≈ stored * scale``; e4m3 codes at the best of 8 scales within an octave of ``max|token| / 448``,
each refit so that the error is orthogonal to the token; ``round(token / scale)`` for int8, the scale
``max|token| / 127`` rounded up to a grid shared by the token's document: see ``quantize`` and
``int8_scales``).

Documents are kept in ascending id order, so search results with equal scores come out by lower id, as
``maxsim.topk``'s do. Search is ``maxsim.topk`` over the stored corpus in chunks of documents. Quantized
storage on the Triton backend (CUDA, or the interpreter on CPU with ``MAXSIM_BACKEND=triton``) goes straight
to the varlen kernel, which reads the int8/e4m3 codes and scales and widens them in registers; on the CPU the
torch backend's AVX2 kernel reads them in place too (codes times scales in float32, a block of tokens per
thread): nothing is dequantized into memory. Elsewhere (MPS, a CPU without the kernel) quantized chunks are
widened to the queries' 16-bit dtype one chunk of ``CHUNK_TOKENS`` tokens at a time (a bounded buffer).

Files are safetensors with a checksum of every tensor's bytes in the metadata: a truncated or corrupted
file raises ``ValueError`` on load, never a wrong result.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from pathlib import Path

import torch

from . import validate as check
from .backends import get_backend
from .search import check_k, chunk_step, merge_topk, packed_scorer, query_batch, stream_topk, topk

STORAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.int8)
QUANT_MAX = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}
FORMAT = "maxsim.Index/1"
CHUNK_TOKENS = 1 << 20  # tokens widened per search step for quantized storage (256 MiB at D=128, fp16)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


E4M3_SCALE_TRIES = 8  # e4m3 scales tried per token, 2^(k/8) times the absmax one (see quantize)


def _e4m3_codes(
    wide: torch.Tensor, norm2: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """e4m3 codes ``c`` of ``x / scale`` (``x = wide [T, D]`` float32, ``norm2 = |x|^2 [T]``; rounded to the
    nearest), the scale refit to ``|x|^2 / <x, c>`` (the error then orthogonal to ``x``; kept where that dot
    is not positive) and the fit ``<x, c>^2 / |c|^2 = |x|^2 cos^2(x, c)``: the refit error is
    ``|x|^2 - fit``, so of several tries the one of largest fit has the least."""
    codes = (wide / scale[:, None]).to(torch.float8_e4m3fn)
    wide_codes = codes.float()
    dot = (wide * wide_codes).sum(1)
    scale = torch.where(dot > 0, norm2 / dot, scale)
    return codes, scale, dot.clamp(min=0).square() / wide_codes.square().sum(1).clamp(min=1e-30)


def quantize(
    tokens: torch.Tensor,
    dtype: torch.dtype,
    *,
    scale_tries: int = E4M3_SCALE_TRIES,
    out: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    lengths: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``tokens [T, D]`` float as ``(stored [T, D] dtype, scales [T] float32 or None)``.

    ``out``: ``(stored, scales)`` to write them into (on any device: ``tokens`` is read a chunk at a time, so
    a corpus on the CPU is never copied whole to the GPU); without it they are new tensors on ``tokens``'
    device (for float16 / bfloat16, ``tokens.to(dtype)``: ``tokens`` itself when already of that dtype).

    int8: codes ``round(token / scale)``, the scale ``max|token| / 127`` rounded up to a grid shared by the
    token's document (``int8_scales``; ``lengths``: the documents' token counts, a Python list summing to
    ``T``; without it every token is a document of its own, as for queries).

    float8 e4m3: a float format's grid is the same in every octave, so where a token's values fall between
    grid points depends on its scale. Each token tries ``E4M3_SCALE_TRIES`` scales spread over one octave
    above the absmax one (``max|token| / 448``, so nothing saturates), rounds to the nearest e4m3 and refits
    the scale to ``|x|^2 / <x, codes>``, which makes the error orthogonal to the token ``x`` (a query close to
    a token, the similarities that decide a top-k, sees less of it); it keeps the try of least error
    (``scale_tries``: 1 tries the absmax scale alone, as ``Index.search`` does for queries). On
    issue 6's clustered corpus (20,000 documents, 512 queries, built on the CPU) recall@10 against the exact
    float16 answer went 0.978 (absmax) -> 0.981 (refit) -> 0.985 (best of 8, 9% less error), int8 0.994.
    A zero token gets zero codes and scale 1 (int8: its grid's unit); a token with a NaN or infinite value
    scale NaN, so that what is scored with it is NaN (``Index.add`` refuses such documents; quantized
    queries propagate it). Works about ``CHUNK_TOKENS`` tokens (whole documents) at a time (bounded float32
    temporaries).
    """
    if lengths is not None and (sum(lengths) != tokens.shape[0] or min(lengths, default=0) < 0):
        raise ValueError(f"lengths must be >= 0 and sum to the {tokens.shape[0]} tokens, got {sum(lengths)}")
    if dtype not in QUANT_MAX:
        if out is None:
            return tokens.to(dtype), None
        for t0 in range(0, tokens.shape[0], CHUNK_TOKENS):  # a chunk at a time, as below
            out[0][t0 : t0 + CHUNK_TOKENS].copy_(tokens[t0 : t0 + CHUNK_TOKENS])
        return out[0], None
    if out is None:
        out = (
            torch.empty(tokens.shape, dtype=dtype, device=tokens.device),
            torch.empty(tokens.shape[0], dtype=torch.float32, device=tokens.device),
        )
    stored, scales = out
    for t0, t1, chunk_lengths in _chunks(tokens.shape[0], lengths):
        wide = tokens[t0:t1].to(stored.device).float()  # moved in its own dtype, then widened
        absmax = wide.abs().amax(dim=1) / QUANT_MAX[dtype]
        absmax = torch.where(absmax.isfinite(), absmax, torch.full_like(absmax, float("nan")))  # see above
        if dtype == torch.int8:
            scale = int8_scales(absmax, tokens.shape[1], chunk_lengths)
            codes = (wide / scale[:, None]).round().clamp_(-127, 127).to(torch.int8)
        else:
            absmax = torch.where(absmax != 0, absmax, torch.ones_like(absmax))
            norm2 = wide.square().sum(1)
            codes, scale, fit = _e4m3_codes(wide, norm2, absmax)
            for k in range(1, scale_tries):
                codes_k, scale_k, fit_k = _e4m3_codes(wide, norm2, absmax * 2.0 ** (k / scale_tries))
                better = fit_k > fit  # select bytes: torch.where need not take float8 on every device
                codes = torch.where(better[:, None], codes_k.view(torch.uint8), codes.view(torch.uint8))
                codes = codes.view(torch.float8_e4m3fn)
                scale, fit = torch.where(better, scale_k, scale), torch.where(better, fit_k, fit)
        stored[t0:t1], scales[t0:t1] = codes, scale
    return stored, scales


INT8_VALUE_MAX = 127 * 2.0**100  # int8 tokens' largest |value|: their scales stay far from float32's limits
INT8_DIM_MAX = (2**31 - 1) // (127 * 128)  # int8 storage's largest dim: int32 sums of its codes' products fit
INT8_LOWEST_EXPONENT = -100  # int8 grids' units are at least 2**(this - bits): normal float32 numbers


def int8_scale_bits(dim: int) -> int:
    """``b``: an int8 document's scales are ``m * unit`` with integers ``1 <= m <= 2**b`` (``int8_scales``),
    the most for which ``m`` times a sum of ``dim`` products of codes (queries in ``[-127, 127]``, documents in
    ``[-128, 127]``) fits an int32: 10 for D = 128."""
    return ((2**31 - 1) // (dim * 127 * 128)).bit_length() - 1


def int8_grid_exponent(largest: torch.Tensor) -> torch.Tensor:
    """int32 ``e = max(ceil(log2(largest)), INT8_LOWEST_EXPONENT)`` of positive float32 ``largest``, from its
    bits (exact; a subnormal gives the lowest). A grid of largest scale ``largest`` has unit ``2**(e - b)``."""
    bits = largest.view(torch.int32)
    e = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return e.clamp(min=INT8_LOWEST_EXPONENT)


def _power_of_two(e: torch.Tensor) -> torch.Tensor:
    """float32 ``2**e`` of int32 ``e`` in the normal range, from its bits."""
    return ((e + 127) << 23).view(torch.float32)


def _document_max(x: torch.Tensor, lengths: list[int] | None) -> torch.Tensor:
    """Each token's document's maximum of ``x [T]`` (``x`` itself without ``lengths``)."""
    if lengths is None:
        return x
    doc = torch.repeat_interleave(
        torch.arange(len(lengths), device=x.device), torch.tensor(lengths, device=x.device), output_size=x.shape[0]
    )
    return x.new_zeros(len(lengths)).scatter_reduce(0, doc, x, "amax")[doc]


def int8_scales(absmax: torch.Tensor, dim: int, lengths: list[int] | None = None) -> torch.Tensor:
    """float32 int8 scales ``[T]`` for tokens of ``max|token| / 127`` ``absmax [T]`` (>= 0, or NaN: stays NaN),
    each rounded up to its document's grid: the multiples ``m * unit``, ``1 <= m <= 2**b``, of
    ``unit = 2**(e - b)``, with ``e`` from the document's largest ``absmax`` (``int8_grid_exponent``; 1 for
    a document of zeros) and ``b = int8_scale_bits(dim)``.

    So each scale is at most ``unit`` above its token's ``absmax`` (the codes' step grows by at most a
    ``2**-(b-1)`` part of the document's largest), and the GPU kernel takes a tile's maximum with integers:
    any tile's scales are integers ``m <= 2**b`` times the unit of the tile's largest scale, so ``m`` times a
    tile's int32 dot stays an int32, and the float conversion waits for each row's maximum of the tile.
    ``lengths``: the documents' token counts (a list summing to ``T``), or None: each token alone.
    """
    largest = _document_max(absmax.nan_to_num(0.0), lengths)
    largest = torch.where(largest > 0, largest, torch.ones_like(largest))
    unit = _power_of_two(int8_grid_exponent(largest) - int8_scale_bits(dim))
    return (absmax / unit).ceil().clamp(min=1) * unit  # NaN stays NaN


def int8_scales_on_grid(scales: torch.Tensor, dim: int, lengths: list[int]) -> bool:
    """Whether float32 ``scales [T]`` are on their documents' grids (``int8_scales``), as the GPU kernel
    needs: each document's scales ``m * unit`` with integers ``1 <= m <= 2**b`` and ``unit`` that of its
    largest scale."""
    for t0, t1, chunk_lengths in _chunks(scales.shape[0], lengths):
        s = scales[t0:t1]
        if not bool((s.isfinite() & (s > 0)).all()):
            return False
        m = s / _power_of_two(int8_grid_exponent(_document_max(s, chunk_lengths)) - int8_scale_bits(dim))
        if not bool(((m == m.round()) & (m >= 1) & (m <= 2 ** int8_scale_bits(dim))).all()):
            return False
    return True


def _chunks(total: int, lengths: list[int] | None):
    """``(t0, t1, lengths)``: tokens ``[t0, t1)`` of about ``CHUNK_TOKENS`` in all, whole documents and their
    lengths (a longer document alone), or without ``lengths`` ``CHUNK_TOKENS`` tokens and None."""
    if lengths is None:
        for t0 in range(0, total, CHUNK_TOKENS):
            yield t0, min(total, t0 + CHUNK_TOKENS), None
        return
    t0, t1, group = 0, 0, []
    for n in lengths:
        if group and t1 + n - t0 > CHUNK_TOKENS:
            yield t0, t1, group
            t0, group = t1, []
        group.append(n)
        t1 += n
    if group:
        yield t0, t1, group


def dequantize(stored: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Stored tokens back as ``dtype`` (``stored * scale`` per token for quantized storage)."""
    if scales is None:
        return stored.to(dtype)
    return (stored.float() * scales[:, None]).to(dtype)


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``tensors`` (CPU, contiguous)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class Index:
    """A multi-vector corpus to search: ``add``, ``remove``, ``search``, ``save`` / ``load``, ``to``.

    Args:
        dim: token dimension D.
        dtype: storage dtype: float16, bfloat16, float8_e4m3fn or int8.
        device: where the tokens live (default CPU).
    """

    def __init__(self, dim: int, dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu"):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if dtype not in STORAGE_DTYPES:
            names = ", ".join(_dtype_name(t) for t in STORAGE_DTYPES)
            raise TypeError(f"dtype must be one of {names}; got {dtype}")
        if dtype == torch.int8 and dim > INT8_DIM_MAX:
            raise ValueError(f"dim must be at most {INT8_DIM_MAX} for int8 storage (int32 sums), got {dim}")
        self.dim = dim
        self.dtype = dtype
        device = torch.device(device)
        self._set_storage(
            torch.empty(0, dim, dtype=dtype, device=device),
            torch.empty(0, dtype=torch.float32, device=device) if dtype in QUANT_MAX else None,
        )
        self.offsets = torch.zeros(1, dtype=torch.int64, device=device)
        self.ids = torch.empty(0, dtype=torch.int64, device=device)
        self._lengths: list[int] = []  # host copy of the document lengths (chunking needs no sync)
        self._host_starts: tuple[list[int], int] | None = None  # see _starts_and_longest

    def __len__(self) -> int:
        return self.ids.shape[0]

    # ``tokens`` and ``scales`` are the first rows of buffers that ``add`` grows by at least a quarter at a
    # time, so adding a corpus in many small batches copies it a few times, not once per batch.
    @property
    def tokens(self) -> torch.Tensor:
        """The stored tokens ``[T, D]`` in the storage dtype, packed by ``offsets``."""
        return self._token_buf[: self._n_tokens]

    @property
    def scales(self) -> torch.Tensor | None:
        """float32 ``[T]``: each stored token's scale (int8 / float8_e4m3fn storage), else None."""
        return None if self._scale_buf is None else self._scale_buf[: self._n_tokens]

    def _set_storage(self, tokens: torch.Tensor, scales: torch.Tensor | None) -> None:
        """Hold exactly ``tokens`` ``[T, D]`` and ``scales`` ``[T]`` (or None): no spare room."""
        self._token_buf, self._scale_buf, self._n_tokens = tokens, scales, tokens.shape[0]

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def add(self, docs, ids: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """Add documents; returns their int64 ids.

        Args:
            docs: a list of ``[L_i, D]`` float tensors, or ``(tokens [T, D], cu_seqlens [N+1])``.
            ids: one unique int64 id per document (default: after the largest id so far).
        """
        tokens, lengths = self._packed(docs)
        n = len(lengths)
        if ids is None:
            start = int(self.ids.max()) + 1 if len(self) else 0
            new_ids = torch.arange(start, start + n, dtype=torch.int64)
        else:
            new_ids = torch.as_tensor(ids)
            if new_ids.dtype.is_floating_point or new_ids.dtype == torch.bool or new_ids.shape != (n,):
                raise ValueError(f"ids must be {n} integers (one per document), got {tuple(new_ids.shape)}")
            new_ids = new_ids.to(torch.int64).cpu()
        if new_ids.unique().numel() != n or bool(torch.isin(new_ids, self.ids.cpu()).any()):
            raise ValueError("ids must be unique: a document with one of these ids is already in the index")
        used, need = self._n_tokens, self._n_tokens + tokens.shape[0]
        if self._token_buf.shape[0] < need:  # grown by at least a quarter: many small adds copy a few times
            self._resize_storage(max(need, used + used // 4))
        new_scales = None if self._scale_buf is None else self._scale_buf[used:need]
        quantize(tokens, self.dtype, out=(self._token_buf[used:need], new_scales), lengths=lengths)  # in place
        self._n_tokens = need
        ends = self.offsets[-1] + torch.tensor(lengths, dtype=torch.int64, device=self.device).cumsum(0)
        self.offsets = torch.cat([self.offsets, ends])
        in_order = len(self) == 0 or int(new_ids.min()) > int(self.ids.max())
        self.ids = torch.cat([self.ids, new_ids.to(self.device)])
        self._lengths += lengths
        self._host_starts = None
        if not in_order or bool((new_ids[1:] < new_ids[:-1]).any()):
            self._sort_by_id()
        return new_ids

    def reserve(self, tokens: int) -> None:
        """Room for ``tokens`` stored tokens in all (``memory()["spare"]`` reports it), so that adding them
        copies nothing already stored. Without it, a corpus added in batches grows the storage by a quarter
        at a time, and the last growth briefly holds the old storage beside the new one: 1.8 to 2.25 times
        the final size. ``remove`` and a move to another device drop the spare room. Less than is held
        already does nothing. ``tokens`` that is not a Python int is a ``TypeError``, a negative one a
        ``ValueError``.
        """
        if isinstance(tokens, bool) or not isinstance(tokens, int):
            raise TypeError(f"tokens must be a Python int (a count of tokens), got {type(tokens).__name__}")
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        if tokens > self._token_buf.shape[0]:
            self._resize_storage(tokens)

    def _resize_storage(self, rows: int) -> None:
        """New token (and scale) buffers of ``rows`` rows holding what is stored."""
        self._token_buf = _resized(self._token_buf, self._n_tokens, rows)
        if self._scale_buf is not None:
            self._scale_buf = _resized(self._scale_buf, self._n_tokens, rows)

    def _sort_by_id(self) -> None:
        """Reorder the documents (tokens, scales, offsets, lengths) by ascending id."""
        order = torch.argsort(self.ids)
        lengths = torch.tensor(self._lengths, dtype=torch.int64, device=self.device)[order]
        old_starts = self.offsets[:-1][order]
        new_offsets = torch.cat([self.offsets[:1], lengths.cumsum(0)])
        total = self.tokens.shape[0]
        shift = torch.repeat_interleave(old_starts - new_offsets[:-1], lengths, output_size=total)
        gather = torch.arange(total, device=self.device) + shift
        self._set_storage(self.tokens[gather], None if self.scales is None else self.scales[gather])
        self.offsets = new_offsets
        self.ids = self.ids[order]
        self._lengths = lengths.tolist()
        self._host_starts = None

    def _packed(self, docs) -> tuple[torch.Tensor, list[int]]:
        """``docs`` as packed float tokens ``[T, D]`` and a list of lengths, checked."""
        if isinstance(docs, tuple):
            if len(docs) != 2:
                raise TypeError(
                    "docs must be a list of [L, D] tensors or a tuple (tokens [T, D], cu_seqlens)"
                )
            tokens, cu = docs
            check.check_tokens(tokens, "docs tokens", rank=2)
            check.check_cu_seqlens(cu, "docs cu_seqlens", tokens.shape[0], "docs tokens", check_values=True)
            lengths = (cu[1:] - cu[:-1]).tolist()
        elif isinstance(docs, (list, tuple)) and docs:
            for i, doc in enumerate(docs):
                check.check_tokens(doc, f"docs[{i}]", rank=2)
            lengths = [doc.shape[0] for doc in docs]
            tokens = torch.cat([doc.to(docs[0].dtype) for doc in docs])
        else:
            raise TypeError("docs must be a non-empty list of [L, D] tensors or a tuple (tokens, cu_seqlens)")
        if tokens.shape[1] != self.dim:
            raise ValueError(f"documents have dim {tokens.shape[1]}, the index has dim {self.dim}")
        lowest, highest = torch.aminmax(tokens)  # no |tokens| temporary: a corpus may fill the device
        largest = float(torch.maximum(-lowest, highest))  # NaN or inf if any
        if not math.isfinite(largest):
            raise ValueError("documents hold NaN or infinite values, which quantized storage cannot keep")
        if self.dtype == torch.int8:
            limit = INT8_VALUE_MAX
        else:  # stored as given: inf beyond its largest; e4m3 scales any finite value
            limit = math.inf if self.dtype in QUANT_MAX else torch.finfo(self.dtype).max
        if largest > limit:
            name = _dtype_name(self.dtype)
            raise ValueError(f"documents hold values beyond {limit:.6g}, which {name} storage cannot keep")
        return tokens, lengths

    def remove(self, ids) -> None:
        """Remove the documents with these ids (each must be in the index)."""
        drop = torch.as_tensor(ids, dtype=torch.int64).reshape(-1).to(self.device)
        present = torch.isin(drop, self.ids)
        if not bool(present.all()):
            raise ValueError(f"ids not in the index: {drop[~present].tolist()[:10]}")
        keep = ~torch.isin(self.ids, drop)
        lengths = torch.tensor(self._lengths, dtype=torch.int64, device=self.device)
        token_keep = torch.repeat_interleave(keep, lengths, output_size=self.tokens.shape[0])
        self._set_storage(self.tokens[token_keep], None if self.scales is None else self.scales[token_keep])
        kept_lengths = lengths[keep]
        self.offsets = torch.cat([self.offsets[:1], kept_lengths.cumsum(0)])
        self.ids = self.ids[keep]
        self._lengths = kept_lengths.tolist()
        self._host_starts = None

    def search(
        self,
        q: torch.Tensor,
        k: int,
        *,
        q_mask=None,
        q_lengths=None,
        chunk: int | None = None,
        normalize=False,
        quantize_queries: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` best documents per query: ``maxsim.topk`` semantics, the caller's ids.

        Quantized storage is read in place where the backend's ``reads_quantized`` (the Triton kernels, the
        CPU kernel); elsewhere (MPS, a CPU without the kernel) ``CHUNK_TOKENS`` stored tokens at a time are
        widened to 16 bits. Queries quantized to the storage format (``quantize_queries``) go to the int8 /
        float8 tensor cores as codes where the backend's ``dots_quantized`` (the Triton kernels on an NVIDIA
        GPU that has them); elsewhere they are widened back to 16 bits, which scores the same tokens.

        Args:
            q: ``[Nq, Lq, D]`` or ``[Lq, D]`` float32/float16/bfloat16 on the index's device (cast to the
                storage dtype, or for quantized storage to bfloat16 if ``q`` is, else float16).
            q_mask, q_lengths: the queries' real tokens, as in ``maxsim.topk``.
            chunk: documents per step (default: ``maxsim.topk``'s; about ``CHUNK_TOKENS`` tokens when
                quantized tokens are widened).
            quantize_queries: int8 / float8_e4m3fn storage only: quantize each query token to the storage
                format (its absmax scale, as ``quantize(..., scale_tries=1)``) and score those codes; faster
                where the codes go to the tensor cores, at some recall (``benchmarks/README.md``). None:
                where the backend's ``dots_quantized``.

        Returns:
            float32 scores and int64 ids ``[Nq, k]`` (``[k]`` for a 2-D ``q``), best first, equal scores by
            lower id.
        """
        check.check_tokens(q, "q")
        if q.dim() not in (2, 3):
            raise ValueError(f"q must have shape [Nq, Lq, D] or [Lq, D], got {tuple(q.shape)}")
        if q.shape[-1] != self.dim:
            raise ValueError(f"q has dim {q.shape[-1]}, the index has dim {self.dim}")
        check.check_device(q, "q", self.device, "the index")
        if len(self) == 0:
            raise ValueError("the index is empty")
        if quantize_queries not in (None, False, True):
            raise TypeError(f"quantize_queries must be None, False or True, got {quantize_queries!r}")
        if self.scales is None:
            if quantize_queries:
                raise ValueError(f"quantize_queries needs int8 or float8_e4m3fn storage, not {self.dtype}")
            return self._search_packed(q.to(self.dtype), k, q_mask, q_lengths, chunk, normalize)
        queries = q.to(torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float16)
        backend = get_backend(self.device)
        q_scales = None
        if backend.dots_quantized(queries, self.tokens) and quantize_queries is not False:
            codes, scales = backend.quantize_queries(queries.reshape(-1, self.dim), self.dtype)
            queries, q_scales = codes.view(queries.shape), scales.view(queries.shape[:-1])
        elif quantize_queries:  # the same codes, widened back: the backend multiplies 16-bit queries only
            codes, scales = quantize(queries.reshape(-1, self.dim), self.dtype, scale_tries=1)
            queries = dequantize(codes, scales, queries.dtype).view(queries.shape)
        if backend.reads_quantized(queries, self.tokens):
            return self._search_packed(queries, k, q_mask, q_lengths, chunk, normalize, q_scales)
        return self._search_widened(queries, k, q_mask, q_lengths, chunk, normalize)

    def _starts_and_longest(self) -> tuple[list[int], int]:
        """The documents' offsets as a host list and the longest document, kept until the index changes
        (a list of millions of offsets costs tens of milliseconds to build: not once per search)."""
        if self._host_starts is None:
            starts = list(itertools.accumulate(self._lengths, initial=0))
            self._host_starts = starts, max(self._lengths, default=0)
        return self._host_starts

    def _search_packed(self, queries, k, q_mask, q_lengths, chunk, normalize, q_scales=None):
        """The stored tokens as a packed corpus, ``maxsim.topk``'s streaming; quantized storage goes with its
        scales straight to the backend's ``maxsim_varlen_scaled``, which reads the codes in place (and with
        ``q_scales``, ``queries`` holding codes, multiplies codes by codes)."""
        check_k(k, len(self))
        batch, mask = query_batch(queries, q_mask, q_lengths, validate=True)
        if q_scales is not None:
            q_scales = q_scales.reshape(batch.shape[:2])
        starts, longest = self._starts_and_longest()
        with torch.no_grad():
            step = chunk_step(batch.shape[0], chunk)
            score = packed_scorer(
                batch, mask, self.tokens, self.offsets, longest, normalize, step,
                d_scales=self.scales, starts=starts, q_scales=q_scales,
            )  # fmt: skip
            scores, pos = stream_topk(score, len(self), batch.shape[0], k, chunk, self.device)
        if queries.dim() == 2:
            scores, pos = scores[0], pos[0]
        return scores, self.ids[pos]

    def _search_widened(self, queries, k, q_mask, q_lengths, chunk, normalize):
        """Where the backend does not read quantized tokens: chunks of documents widened to the queries'
        16-bit dtype one at a time (a ``CHUNK_TOKENS`` buffer), merged into a running top-k."""
        n = len(self)
        check_k(k, n)
        wide = queries.dtype
        single = queries.dim() == 2
        starts, _ = self._starts_and_longest()
        bounds, first = [0], 0
        for i in range(1, n + 1):
            if (
                i == n
                or (chunk is not None and i - first >= chunk)
                or (chunk is None and starts[i] - starts[first] >= CHUNK_TOKENS)
            ):
                bounds.append(i)
                first = i
        nq = 1 if single else queries.shape[0]
        best_scores = torch.empty(nq, 0, dtype=torch.float32, device=self.device)
        best_pos = torch.empty(nq, 0, dtype=torch.int64, device=self.device)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            t0, t1 = starts[a], starts[b]
            tokens = dequantize(self.tokens[t0:t1], self.scales[t0:t1], wide)
            scores, pos = topk(
                queries, tokens, min(k, b - a), q_mask=q_mask, q_lengths=q_lengths,
                cu_seqlens_d=self.offsets[a : b + 1] - t0, normalize=normalize,
            )  # fmt: skip
            scores, pos = (scores[None], pos[None]) if single else (scores, pos)
            # this chunk's positions are above every kept one, and its top-k has equal scores in position order
            best_scores, best_pos = merge_topk(best_scores, best_pos, scores, pos + a, k)
        if single:
            best_scores, best_pos = best_scores[0], best_pos[0]
        return best_scores, self.ids[best_pos]

    def to(self, device: torch.device | str) -> Index:
        """Move the index to ``device`` (in place; its spare room is not moved); returns it."""
        tokens = self.tokens.to(device)
        if tokens.device == self.device:  # already there: keep the storage and its spare room
            return self
        self._set_storage(tokens, None if self.scales is None else self.scales.to(device))
        self.offsets = self.offsets.to(device)
        self.ids = self.ids.to(device)
        return self

    def memory(self) -> dict:
        """Bytes held: ``tokens``, ``scales``, ``offsets``, ``ids``, ``spare`` (room grown ahead for later
        ``add`` calls), ``total``, and ``bytes_per_token`` (without the spare room)."""
        held = self._token_buf.numel() * self._token_buf.element_size()
        held += 0 if self._scale_buf is None else self._scale_buf.numel() * 4
        parts = {
            "tokens": self.tokens.numel() * self.tokens.element_size(),
            "scales": 0 if self.scales is None else self.scales.numel() * 4,
            "offsets": self.offsets.numel() * 8,
            "ids": self.ids.numel() * 8,
        }
        parts["bytes_per_token"] = sum(parts.values()) / max(self._n_tokens, 1)
        parts["spare"] = held - parts["tokens"] - parts["scales"]
        parts["total"] = sum(v for name, v in parts.items() if name != "bytes_per_token")
        return parts

    def save(self, path: str | Path) -> None:
        """Write the index to a safetensors file (with a checksum of every tensor)."""
        save_file, _ = _safetensors()
        tensors = {"tokens": self.tokens, "offsets": self.offsets, "ids": self.ids}
        if self.scales is not None:
            tensors["scales"] = self.scales
        tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        meta = {
            "format": FORMAT,
            "dim": str(self.dim),
            "dtype": _dtype_name(self.dtype),
            "sha256": _digest(tensors),
        }
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> Index:
        """Read an index written by ``save``; a truncated or corrupted file raises ``ValueError``."""
        _, safe_open = _safetensors()
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except FileNotFoundError:
            raise
        except Exception as e:  # safetensors' own errors: bad header, truncated data
            raise ValueError(f"{path} is not a readable maxsim index: {e}") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a maxsim index file (format {meta.get('format')!r})")
        if meta.get("sha256") != _digest(tensors):
            raise ValueError(f"{path} is corrupted: its tensors do not match the checksum written with them")
        dtype = getattr(torch, meta["dtype"], None)
        index = cls(int(meta["dim"]), dtype)
        _check_loaded(tensors, index, path)
        tokens, scales = tensors["tokens"], tensors.get("scales")
        lengths = (tensors["offsets"][1:] - tensors["offsets"][:-1]).tolist()
        if index.dtype == torch.int8 and not int8_scales_on_grid(scales, index.dim, lengths):
            # written before int8 scales shared a grid per document: the tokens quantized again onto theirs
            # (each value moves by at most half a code step)
            for t0, t1, chunk_lengths in _chunks(tokens.shape[0], lengths):
                wide = dequantize(tokens[t0:t1], scales[t0:t1], torch.float32)
                quantize(wide, torch.int8, out=(tokens[t0:t1], scales[t0:t1]), lengths=chunk_lengths)
        index._set_storage(tokens, scales)
        index.offsets, index.ids = tensors["offsets"], tensors["ids"]
        index._lengths = lengths
        index._host_starts = None
        return index.to(device)


def _resized(buffer: torch.Tensor, used: int, rows: int) -> torch.Tensor:
    """A new buffer of ``rows`` rows holding the first ``used`` rows of ``buffer``."""
    grown = buffer.new_empty((rows, *buffer.shape[1:]))
    grown[:used] = buffer[:used]
    return grown


def _check_loaded(tensors: dict, index: Index, path) -> None:
    """The loaded tensors form a valid index of ``index``'s dim and dtype."""
    tokens, offsets, ids = tensors.get("tokens"), tensors.get("offsets"), tensors.get("ids")
    problems = []
    if tokens is None or offsets is None or ids is None:
        problems.append("missing tensors")
    else:
        if tokens.dtype != index.dtype or tokens.dim() != 2 or tokens.shape[1] != index.dim:
            problems.append("tokens of the wrong dtype or shape")
        if ids.dim() != 1 or offsets.shape != (ids.shape[0] + 1,):
            problems.append("offsets and ids disagree")
        elif offsets[0] != 0 or offsets[-1] != tokens.shape[0] or bool((offsets[1:] <= offsets[:-1]).any()):
            problems.append("offsets out of order")
        if bool((ids[1:] <= ids[:-1]).any()):
            problems.append("ids not strictly increasing")
        if (index.dtype in QUANT_MAX) != ("scales" in tensors) or (
            "scales" in tensors
            and (tensors["scales"].shape != (tokens.shape[0],) or tensors["scales"].dtype != torch.float32)
        ):
            problems.append("scales missing or of the wrong dtype or shape")
        elif "scales" in tensors and not bool(((tensors["scales"] > 0) & tensors["scales"].isfinite()).all()):
            problems.append("scales not all positive and finite")
    if problems:
        raise ValueError(f"{path} holds an inconsistent index: {', '.join(problems)}")


def _safetensors():
    try:
        from safetensors import safe_open
        from safetensors.torch import save_file
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("Index.save/load need safetensors: pip install 'maxsim[index]'") from e
    return save_file, safe_open


__all__ = ["Index", "quantize", "dequantize"]
