"""``maxsim.distributed.ShardedIndex``: one corpus sharded over the ranks of a ``torch.distributed`` group.

Every rank holds a shard, a ``maxsim.Index`` of the documents assigned to it. ``search`` runs the exact local
top-k on every rank, gathers the candidates (one ``all_gather`` of ``k`` per query and rank) and merges them
into the exact global top-k, identical on every rank.

Order of equal scores: by lower id, across shards as within one. Every shard's ``Index`` keeps its
documents in ascending id order, so its local top-k has equal scores by lower id; the merge sorts the
gathered candidates by id before a stable sort by score (``maxsim.search.merge_topk``). A sharded index
therefore returns what one ``maxsim.Index`` holding every document returns: the same ids and the same
float32 scores (each document's score is computed alone, whichever shard holds it).

Every method is collective: call it on every rank with the same arguments (documents, ids, queries). A
rank that fails (a missing or corrupted shard, a write error, an exception in its local search) never
leaves the others waiting: each collective step carries a success flag of every rank, and if any rank
failed, the failed ranks raise their own error and the others a ``RuntimeError`` naming them. A rank that
dies or never calls in is caught by the group's timeout (``init_process_group(timeout=...)``).

Collectives run on the shards' device: CUDA tensors for NCCL, the CPU for gloo.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from . import validate as check
from .index import Index
from .search import check_k, merge_topk

FORMAT = "maxsim.ShardedIndex/1"
MANIFEST = "manifest.json"
_LAST = torch.iinfo(torch.int64).max  # the id of a padding candidate: after every document
_NEG_INF_BITS = int(torch.tensor(float("-inf")).view(torch.int32))


def _group_info(group, device: torch.device) -> tuple[int, int, torch.device]:
    """``(rank, world size, device the collectives run on)`` of ``group`` for shards on ``device``."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "ShardedIndex needs an initialized process group: call torch.distributed.init_process_group first"
        )
    backend = dist.get_backend(group)
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"device must be a CUDA device for an NCCL process group, got {device}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group must be a process group this process is a member of")
    comm = torch.device("cpu") if backend == "gloo" else device
    return rank, dist.get_world_size(group), comm


def _raise_failures(failed: list[int], error: Exception | None, action: str) -> None:
    """Raise ``error`` on a rank that failed, a ``RuntimeError`` naming ``failed`` ranks on the others."""
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(
            f"{action} failed on rank(s) {failed} (their error is raised there); no rank goes on"
        )


def _agree(group, comm, rank: int, world: int, error, action: str, values: torch.Tensor) -> torch.Tensor:
    """One ``all_reduce`` of every rank's success flag and ``values`` (int64, summed over the ranks).

    Raises on every rank if any rank failed (``_raise_failures``); returns the summed ``values`` (CPU).
    """
    flags = torch.zeros(world, dtype=torch.int64)
    flags[rank] = error is not None
    payload = torch.cat([flags, values.reshape(-1).cpu()]).to(comm)
    dist.all_reduce(payload, group=group)
    payload = payload.cpu()
    _raise_failures(payload[:world].nonzero()[:, 0].tolist(), error, action)
    return payload[world:]


def _shard_row(index: Index, keep: torch.Tensor) -> torch.Tensor:
    """``(documents, tokens, largest id)``, int64 ``[3]``, of ``index``'s documents where ``keep`` is True."""
    lengths = index.offsets[1:] - index.offsets[:-1]
    kept_ids = index.ids[keep]
    top = int(kept_ids.max()) if kept_ids.numel() else 0
    return torch.tensor([kept_ids.numel(), int(lengths[keep].sum()), top], dtype=torch.int64)


def _shard_file(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}.safetensors"


def _sha256(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.digest()


class ShardedIndex:
    """A corpus sharded over the ranks of a process group: ``add``, ``remove``, ``search``, ``save``/``load``.

    Args:
        dim: token dimension D.
        dtype: storage dtype: float16, bfloat16, float8_e4m3fn or int8 (as ``maxsim.Index``).
        device: where this rank's shard lives: ``cuda:<local rank>`` with NCCL, ``cpu`` with gloo.
        group: the process group (default: the world).
    """

    def __init__(
        self, dim: int, dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu", group=None
    ):
        self._index = Index(dim, dtype, device)
        self.group = group
        self.rank, self.world_size, self._comm = _group_info(group, self._index.device)
        self._sizes = torch.zeros(self.world_size, 2, dtype=torch.int64)  # every shard's (documents, tokens)
        self._max_id: int | None = None  # the largest caller id in the whole index

    def __len__(self) -> int:
        return int(self._sizes[:, 0].sum())

    @property
    def dim(self) -> int:
        return self._index.dim

    @property
    def dtype(self) -> torch.dtype:
        return self._index.dtype

    @property
    def device(self) -> torch.device:
        return self._index.device

    @property
    def shard_sizes(self) -> list[tuple[int, int]]:
        """``(documents, tokens)`` of every rank's shard, known on every rank."""
        return [tuple(row) for row in self._sizes.tolist()]

    def _agree(self, error: Exception | None, action: str, values: torch.Tensor) -> torch.Tensor:
        return _agree(self.group, self._comm, self.rank, self.world_size, error, action, values)

    def add(self, docs, ids: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """Add documents (collective: the same documents and ids on every rank); each rank keeps its own.

        Each document goes, in order, to the shard holding the fewest tokens (the lower rank on equal
        counts), so the same calls give the same assignment on every rank.

        Args:
            docs: a list of ``[L_i, D]`` float tensors, or ``(tokens [T, D], cu_seqlens [N+1])``.
            ids: one unique int64 id per document (default: after the largest id so far).

        Returns:
            int64 ids ``[N]`` (CPU).
        """
        error = None
        signature = torch.zeros(self.world_size, 4, dtype=torch.int64)
        try:
            tokens, lengths = self._index._packed(docs)  # every document checked on every rank
            new_ids = self._new_ids(ids, len(lengths))
            taken = bool(torch.isin(new_ids.to(self.device), self._index.ids).any())
            signature[self.rank] = torch.tensor([len(lengths), tokens.shape[0], int(new_ids.sum()), taken])
        except Exception as e:  # noqa: BLE001 - raised on every rank by _agree
            error = e
        signature = self._agree(error, "ShardedIndex.add", signature).view(self.world_size, 4)
        if bool((signature[:, :3] != signature[0, :3]).any()):
            raise ValueError("add must be given the same documents and ids on every rank; the ranks differ")
        if bool(signature[:, 3].any()):
            raise ValueError("ids must be unique: a document with one of these ids is already in the index")
        owners = torch.tensor(self._assign(lengths), dtype=torch.int64)
        sizes = torch.tensor(lengths, dtype=torch.int64)
        mine = owners == self.rank
        if bool(mine.any()):
            keep = torch.repeat_interleave(mine, sizes).to(tokens.device)
            cu = torch.zeros(int(mine.sum()) + 1, dtype=torch.int64)
            cu[1:] = sizes[mine].cumsum(0)
            self._index.add((tokens[keep], cu), ids=new_ids[mine])
        self._sizes[:, 0].index_add_(0, owners, torch.ones_like(owners))
        self._sizes[:, 1].index_add_(0, owners, sizes)
        top = int(new_ids.max())
        self._max_id = top if self._max_id is None else max(self._max_id, top)
        return new_ids

    def _new_ids(self, ids, n: int) -> torch.Tensor:
        """The ids of ``n`` new documents as int64 ``[n]`` (CPU), unique among themselves."""
        if ids is None:
            start = 0 if self._max_id is None else self._max_id + 1
            return torch.arange(start, start + n, dtype=torch.int64)
        new_ids = torch.as_tensor(ids)
        if new_ids.dtype.is_floating_point or new_ids.dtype == torch.bool or new_ids.shape != (n,):
            raise ValueError(f"ids must be {n} integers (one per document), got {tuple(new_ids.shape)}")
        new_ids = new_ids.to(torch.int64).cpu()
        if new_ids.unique().numel() != n:
            raise ValueError("ids must be unique: the same id is given twice")
        return new_ids

    def _assign(self, lengths: list[int]) -> list[int]:
        """The rank each document goes to: in order, the shard with the fewest tokens, lower rank on ties."""
        heap = [(tokens, rank) for rank, tokens in enumerate(self._sizes[:, 1].tolist())]
        heapq.heapify(heap)
        owners = []
        for length in lengths:
            tokens, rank = heapq.heappop(heap)
            owners.append(rank)
            heapq.heappush(heap, (tokens + length, rank))
        return owners

    def remove(self, ids) -> None:
        """Remove the documents with these ids (collective; each id must be in some shard)."""
        drop = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
        error = None
        found = torch.zeros(drop.shape[0], dtype=torch.int64)
        rows = torch.zeros(self.world_size, 3, dtype=torch.int64)  # every shard after: _row
        try:
            held = torch.isin(self._index.ids, drop.to(self.device))
            found = torch.isin(drop, self._index.ids.cpu()).to(torch.int64)
            rows[self.rank] = _shard_row(self._index, ~held)
        except Exception as e:  # noqa: BLE001 - raised on every rank by _agree
            error = e
        summed = self._agree(error, "ShardedIndex.remove", torch.cat([found, rows.reshape(-1)]))
        found, rows = summed[: drop.shape[0]], summed[drop.shape[0] :].view(self.world_size, 3)
        if not bool((found > 0).all()):
            raise ValueError(f"ids not in the index: {drop[found == 0].tolist()[:10]}")
        if bool(held.any()):
            self._index.remove(self._index.ids[held])
        self._set_sizes(rows)

    def _set_sizes(self, rows: torch.Tensor) -> None:
        """Every shard's sizes and the largest id from ``rows`` ``[W, 3]`` (``_shard_row`` of every rank)."""
        self._sizes = rows[:, :2].clone()
        present = rows[:, 0] > 0
        self._max_id = int(rows[present, 2].max()) if bool(present.any()) else None

    def search(
        self,
        q: torch.Tensor,
        k: int,
        *,
        q_mask=None,
        q_lengths=None,
        chunk: int | None = None,
        normalize=False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact ``k`` best documents per query over all shards (collective: the same queries everywhere).

        Args:
            q: ``[Nq, Lq, D]`` or ``[Lq, D]`` float32/float16/bfloat16 on the shards' device.
            k: how many documents per query, ``1 <= k <=`` the documents of all shards.
            q_mask, q_lengths, chunk, normalize: as ``maxsim.Index.search`` (``chunk`` per shard).

        Returns:
            float32 scores and int64 ids ``[Nq, k]`` (``[k]`` for a 2-D ``q``), best first, equal scores by
            lower id: what one ``maxsim.Index`` holding every document returns. The same on every rank.
        """
        check.check_tokens(q, "q")
        if q.dim() not in (2, 3):
            raise ValueError(f"q must have shape [Nq, Lq, D] or [Lq, D], got {tuple(q.shape)}")
        if q.shape[-1] != self.dim:
            raise ValueError(f"q has dim {q.shape[-1]}, the index has dim {self.dim}")
        check.check_device(q, "q", self.device, "the index")
        check_k(k, len(self))
        nq = 1 if q.dim() == 2 else q.shape[0]
        # Candidates [Nq, k, 2]: float32 score bits and id; padding loses to every document.
        cand = torch.tensor([_NEG_INF_BITS, _LAST], device=self.device).repeat(nq, k, 1)
        error = None
        try:
            local_k = min(k, len(self._index))
            if local_k:
                scores, ids = self._index.search(
                    q, local_k, q_mask=q_mask, q_lengths=q_lengths, chunk=chunk, normalize=normalize
                )
                cand[:, :local_k, 0] = scores.reshape(nq, local_k).view(torch.int32)
                cand[:, :local_k, 1] = ids.reshape(nq, local_k)
        except Exception as e:  # noqa: BLE001 - raised on every rank below
            error = e
        flat = torch.cat([cand.reshape(-1), torch.tensor([int(error is not None)], device=self.device)])
        flat = flat.to(self._comm)
        parts = [torch.empty_like(flat) for _ in range(self.world_size)]
        dist.all_gather(parts, flat, group=self.group)
        gathered = torch.stack(parts).to(self.device)
        _raise_failures(gathered[:, -1].nonzero()[:, 0].tolist(), error, "ShardedIndex.search")
        cand = gathered[:, :-1].view(self.world_size, nq, k, 2).transpose(0, 1).reshape(nq, -1, 2)
        # Sorted by id, the candidates meet merge_topk's order of equal scores (into an empty top-k).
        cand = cand.gather(1, cand[..., 1].argsort(dim=1)[..., None].expand_as(cand))
        scores, ids = cand[..., 0].to(torch.int32).view(torch.float32), cand[..., 1]
        scores, ids = merge_topk(scores[:, :0], ids[:, :0], scores, ids, k)
        if q.dim() == 2:
            return scores[0], ids[0]
        return scores, ids

    def save(self, path: str | Path) -> None:
        """Write the index into directory ``path`` (collective): each rank its shard, every rank the manifest.

        Files: ``shard-RRRRR-of-WWWWW.safetensors`` (rank R's ``maxsim.Index``) and ``manifest.json`` (format,
        dim, dtype, world size, every shard's file and SHA-256). Without a shared file system, each host's
        directory holds its ranks' shards and the manifest.
        """
        root = Path(path)
        error = None
        digests = torch.zeros(self.world_size, 32, dtype=torch.int64)
        name = _shard_file(self.rank, self.world_size)
        try:
            root.mkdir(parents=True, exist_ok=True)
            self._index.save(root / name)
            digests[self.rank] = torch.tensor(list(_sha256(root / name)))
        except Exception as e:  # noqa: BLE001 - raised on every rank by _agree
            error = e
        digests = self._agree(error, "ShardedIndex.save", digests).view(self.world_size, 32)
        manifest = {
            "format": FORMAT, "dim": self.dim, "dtype": str(self.dtype).removeprefix("torch."),
            "world_size": self.world_size,
            "shards": [
                {"file": _shard_file(rank, self.world_size), "sha256": bytes(digests[rank].tolist()).hex()}
                for rank in range(self.world_size)
            ],
        }  # fmt: skip
        tmp = root / f"{MANIFEST}.rank{self.rank}.tmp"
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(tmp, root / MANIFEST)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu", group=None) -> ShardedIndex:
        """Read an index written by ``save`` (collective), each rank its own shard.

        Raises, on every rank and before any goes on: on a rank that failed, its own error (``ValueError``
        for a world size other than the one saved, a shard that is missing, truncated, corrupted or not the
        one the manifest names); on the others, a ``RuntimeError`` naming the failed ranks.
        """
        root, device = Path(path), torch.device(device)
        rank, world, comm = _group_info(group, device)
        error, manifest, index = None, None, None
        rows = torch.zeros(world, 3, dtype=torch.int64)
        try:
            manifest = _read_manifest(root, world)
            file = root / manifest["shards"][rank]["file"]
            if _sha256(file).hex() != manifest["shards"][rank]["sha256"]:
                raise ValueError(f"{file} is not the shard the manifest names (its SHA-256 differs)")
            index = Index.load(file, device)
            if index.dim != manifest["dim"] or str(index.dtype).removeprefix("torch.") != manifest["dtype"]:
                raise ValueError(f"{file} disagrees with the manifest on dim or dtype")
            rows[rank] = _shard_row(index, torch.ones(len(index), dtype=torch.bool, device=device))
        except Exception as e:  # noqa: BLE001 - raised on every rank below
            error = e
        rows = _agree(group, comm, rank, world, error, "ShardedIndex.load", rows).view(world, 3)
        sharded = cls(manifest["dim"], index.dtype, device, group)
        sharded._index = index
        sharded._set_sizes(rows)
        return sharded


def _read_manifest(root: Path, world: int) -> dict:
    """The manifest of ``root``, checked for format and for ``world`` ranks."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{root} holds no readable sharded index manifest ({MANIFEST}): {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{root / MANIFEST} is not a maxsim sharded index manifest")
    if manifest["world_size"] != world:
        raise ValueError(
            f"{root} was saved by {manifest['world_size']} ranks and this process group has {world}: "
            "load it with the world size it was saved with"
        )
    if len(manifest["shards"]) != world:
        raise ValueError(f"{root / MANIFEST} lists {len(manifest['shards'])} shards for {world} ranks")
    return manifest


__all__ = ["ShardedIndex"]
