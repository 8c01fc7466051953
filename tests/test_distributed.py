"""maxsim.distributed.ShardedIndex on gloo: 2 and 3 ranks against one Index holding everything (ids and
scores, ties included), balance, save/load, and failures that raise on every rank instead of hanging."""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import integer_tokens

import maxsim
import maxsim.bench.distributed as bench_distributed
from maxsim.distributed import ShardedIndex

DIM = 8
TIMEOUT = datetime.timedelta(seconds=15)  # every collective of a test is bounded by this
DEADLINE_S = 90  # the parent kills the ranks after this: a hang fails the test instead of blocking it
# Ranks fork from a server process that imported these once: starting them takes well under a second.
multiprocessing.set_forkserver_preload(
    ["torch", "torch.distributed", "maxsim.distributed", "maxsim.bench.distributed"]
)


def _worker(rank: int, world: int, store: str, scenario, args) -> None:
    torch.set_num_threads(1)  # several ranks on a 2-core machine
    dist.init_process_group(
        "gloo", store=dist.FileStore(store, world), rank=rank, world_size=world, timeout=TIMEOUT
    )
    try:
        scenario(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(tmp_path, world: int, scenario, *args) -> None:
    """Run ``scenario(rank, world, *args)`` on ``world`` gloo ranks; a rank's exception fails the test."""
    context = mp.start_processes(
        _worker, args=(world, str(tmp_path / "store"), scenario, args), nprocs=world, join=False,
        start_method="forkserver",
    )  # fmt: skip
    _join(context, world)


def _join(context, world: int) -> None:
    """Wait for the ranks; a rank's exception fails the test, and so does a hang (after ``DEADLINE_S``)."""
    deadline = time.monotonic() + DEADLINE_S
    while not context.join(timeout=0.1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world} ranks did not finish within {DEADLINE_S} s")


def documents(n: int, seed: int, max_len: int = 9) -> list[torch.Tensor]:
    """Integer-valued documents (exact scores in every storage dtype), every one duplicated: many ties."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (n,), generator=g).tolist()
    docs = [integer_tokens((length, DIM), torch.float32, generator=g) for length in lengths]
    return [doc for doc in docs for _ in range(2)]


def _check_same(one: maxsim.Index, sharded: ShardedIndex, queries: torch.Tensor) -> None:
    """``sharded.search`` returns ``one.search``'s ids and scores exactly: several k, lengths, a 2-D query."""
    for k in (1, 7, 30, len(one)):
        want, got = one.search(queries, k), sharded.search(queries, k)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0]), (one.dtype, k)
    assert bool((want[0][:, 1:] == want[0][:, :-1]).all(dim=0).any()), "no ties to order"
    lengths = torch.tensor([4, 1, 3, 2, 4])
    want, got = one.search(queries, 9, q_lengths=lengths), sharded.search(queries, 9, q_lengths=lengths)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    want, got = one.search(queries[2], 5, chunk=3), sharded.search(queries[2], 5, chunk=3)
    assert got[1].shape == (5,) and torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


def _same_as_one_index(rank: int, world: int, tmp: str) -> None:
    """Adds with shuffled and default ids, removes, several k, masks, storage dtypes, save/load, re-adds."""
    g = torch.Generator().manual_seed(0)
    queries = integer_tokens((5, 4, DIM), torch.float32, generator=g).half()
    for dtype in (torch.float16, torch.int8):
        one, sharded = maxsim.Index(DIM, dtype), ShardedIndex(DIM, dtype)
        first = documents(20, 1)
        ids = torch.randperm(1000, generator=g)[:40]
        for index in (one, sharded):
            index.add(first, ids=ids)
            index.add(documents(7, 2))  # default ids: after the largest so far
        tokens = torch.cat(documents(5, 3))
        cu = torch.tensor([0] + [d.shape[0] for d in documents(5, 3)]).cumsum(0)
        assert torch.equal(sharded.add((tokens, cu)), one.add((tokens, cu)))
        drop = ids[::3].tolist()
        one.remove(drop)
        sharded.remove(drop)
        assert len(sharded) == len(one)
        sizes = sharded.shard_sizes
        assert sum(docs for docs, _ in sizes) == len(one) and sizes[rank] == (
            len(sharded._index),
            len(sharded._index.tokens),
        )

        _check_same(one, sharded, queries)
        path = os.path.join(tmp, str(dtype))
        sharded.save(path)
        loaded = ShardedIndex.load(path)
        assert loaded.dtype == dtype and loaded.shard_sizes == sharded.shard_sizes
        _check_same(one, loaded, queries)
        one.add(documents(3, 4))  # ids after the largest, balanced onto the loaded shards
        loaded.add(documents(3, 4))
        _check_same(one, loaded, queries)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_search_equals_one_index(world, tmp_path):
    spawn(tmp_path, world, _same_as_one_index, str(tmp_path))


def _balance_and_world_size(rank: int, world: int, tmp: str) -> None:
    sharded = ShardedIndex(DIM)
    lengths = [50, 10, 10, 10, 10, 10, 7, 3]
    docs = [torch.ones(n, DIM) for n in lengths]
    sharded.add(docs)
    # in order, to the shard with the fewest tokens (the lower rank on equal counts)
    assert sharded.shard_sizes == [(1, 50), (3, 30), (4, 30)]
    assert sorted(sharded._index.ids.tolist()) == {0: [0], 1: [1, 3, 5], 2: [2, 4, 6, 7]}[rank]
    # two documents on three ranks: rank 2's shard is empty, in search and through save/load
    one, small = maxsim.Index(DIM), ShardedIndex(DIM)
    for index in (one, small):
        index.add(documents(1, 7), ids=[9, 4])
    small.save(os.path.join(tmp, "small"))
    q = torch.ones(3, DIM).half()
    for index in (small, ShardedIndex.load(os.path.join(tmp, "small"))):
        assert index.shard_sizes[2] == (0, 0)
        assert torch.equal(index.search(q, 2)[1], one.search(q, 2)[1]) and index.search(q, 2)[1].tolist() == [
            4,
            9,
        ]
    pair = dist.new_group([0, 1])  # every rank calls new_group; ranks 0 and 1 save a 2-rank index
    if rank < 2:
        two = ShardedIndex(DIM, group=pair)
        two.add(docs)
        two.save(os.path.join(tmp, "two"))
    dist.barrier()
    with pytest.raises(ValueError, match="saved by 2 ranks and this process group has 3"):
        ShardedIndex.load(os.path.join(tmp, "two"))


def test_balance_by_tokens_and_loading_with_another_world_size_raises(tmp_path):
    spawn(tmp_path, 3, _balance_and_world_size, str(tmp_path))


def _failures_raise_everywhere(rank: int, world: int, tmp: str) -> None:
    sharded = ShardedIndex(DIM)
    sharded.add(documents(4, 5))
    sharded.save(tmp)
    dist.barrier()
    if rank == 1:  # rank 1's shard is corrupted on disk: its load fails, rank 0's would succeed
        shard = os.path.join(tmp, "shard-00001-of-00002.safetensors")
        with open(shard, "r+b") as f:
            f.seek(-3, os.SEEK_END)
            f.write(b"xyz")
    dist.barrier()
    if rank == 1:
        with pytest.raises(ValueError, match="not the shard the manifest names"):
            ShardedIndex.load(tmp)
    else:
        with pytest.raises(RuntimeError, match=r"ShardedIndex.load failed on rank\(s\) \[1\]"):
            ShardedIndex.load(tmp)
    # a search that fails on one rank only (rank 1 is given other queries' lengths) raises on both
    q = torch.ones(2, 3, DIM).half()
    bad = torch.tensor([3, 4]) if rank == 1 else torch.tensor([3, 2])
    error = ValueError if rank == 1 else RuntimeError
    with pytest.raises(error, match="q_lengths" if rank == 1 else r"search failed on rank\(s\) \[1\]"):
        sharded.search(q, 3, q_lengths=bad)
    # add given different documents on the ranks, an id already taken
    with pytest.raises(ValueError, match="same documents and ids on every rank"):
        sharded.add(documents(1 + rank, 6))
    with pytest.raises(ValueError, match="already in the index"):
        sharded.add(documents(1, 6), ids=[0, 100])
    with pytest.raises(ValueError, match=r"ids not in the index: \[100\]"):
        sharded.remove([0, 100])
    assert len(sharded) == 8 and sharded.search(q, 8)[1].shape == (2, 8)  # nothing changed, still in step


def test_failures_raise_on_every_rank(tmp_path):
    spawn(tmp_path, 2, _failures_raise_everywhere, str(tmp_path / "index"))


def test_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        ShardedIndex(DIM)


def _bench(rank: int, world: int, port: int, argv: list[str]) -> None:
    """``maxsim.bench.distributed.main`` in the environment torchrun gives each rank."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    assert bench_distributed.main(argv) == 0


def test_bench_smoke_run(tmp_path):
    """The distributed search workload's --quick run on 2 gloo ranks, started as torchrun starts them (gloo
    named: on a machine with CUDA the default would be NCCL, one GPU per rank)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "dist.json"
    context = mp.start_processes(
        _bench, args=(2, port, ["--quick", "--backend", "gloo", "--timeout", "30", "--json", str(out)]), nprocs=2, join=False,
        start_method="forkserver",
    )  # fmt: skip
    _join(context, 2)
    results = json.loads(out.read_text())
    assert results["schema"] == "maxsim-bench-dist/1" and results["world_size"] == 2
    assert results["backend"] == "gloo" and results["check"]["status"] == "ok"
    assert results["check"]["ids_match"] == 1.0 and results["sharded"]["ms"]["n"] == 3
    assert sum(docs for docs, _ in results["shards"]) == 64 and results["sharded"]["queries_per_s"] > 0
    workload = results["workload"]
    assert workload["corpus_gb"] == workload["tokens"] * 32 * 2 / 1e9  # D 32, float16
    assert "queries/s" in bench_distributed.summary(results)
