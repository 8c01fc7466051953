"""Train a projection head with ``maxsim.contrastive_loss`` on synthetic multi-vector data.

The data: every document is a cluster of tokens (a random center plus spread) in a small *signal* subspace.
Every token also carries *nuisance* dims of larger variance, drawn afresh for each token, and one fixed random
rotation mixes signal and nuisance (the distortion), so raw dot products mostly measure noise. A query is a
noisy subset of its document's tokens (with fresh nuisance). Documents have random lengths (padding holds
junk, masked out with ``d_lengths``); each query also gets hard negatives: documents around the same center.

The model is one ``nn.Linear`` head shared by queries and documents (as ColBERT's); it has to learn to
project the nuisance away. Retrieval accuracy is top-1 of each held-out query among all held-out documents.

    python examples/contrastive_training.py --steps 300 --device cuda

``main(argv)`` returns the accuracies before and after training and the loss of every step.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

import maxsim


@dataclass
class Task:
    """The synthetic retrieval task: sizes and the fixed distortion ``mix`` (float32 ``[dim, dim]``)."""

    signal: int
    nuisance: int
    doc_tokens: int
    query_tokens: int
    spread: float
    query_noise: float
    nuisance_scale: float
    mix: torch.Tensor

    @property
    def dim(self) -> int:
        return self.signal + self.nuisance


@dataclass
class Batch:
    """Observed tokens, float32 on the CPU: ``q [n, Lq, dim]``, ``d [n, Ld, dim]`` with int64 ``d_lengths [n]``,
    ``negatives [n, K, Ld, dim]`` with ``negatives_lengths [n, K]`` (None when K = 0)."""

    q: torch.Tensor
    d: torch.Tensor
    d_lengths: torch.Tensor
    negatives: torch.Tensor | None
    negatives_lengths: torch.Tensor | None


def make_task(args: argparse.Namespace, gen: torch.Generator) -> Task:
    """The task of the command line's sizes, with a random orthogonal distortion drawn from ``gen``."""
    dim = args.signal + args.nuisance
    mix, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen))
    return Task(args.signal, args.nuisance, args.doc_tokens, args.query_tokens, spread=0.6, query_noise=0.5,
                nuisance_scale=3.0, mix=mix)  # fmt: skip


def _observe(task: Task, signal: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Signal tokens ``[..., signal]`` with fresh nuisance appended, through the fixed rotation."""
    nuisance = task.nuisance_scale * torch.randn(*signal.shape[:-1], task.nuisance, generator=gen)
    return torch.cat([signal, nuisance], dim=-1) @ task.mix


def _documents(task: Task, centers: torch.Tensor, gen: torch.Generator):
    """Token clusters around ``centers [..., signal]``: signal ``[..., Ld, signal]`` and lengths ``[...]``."""
    shape = centers.shape[:-1]
    signal = centers[..., None, :] + task.spread * torch.randn(
        *shape, task.doc_tokens, task.signal, generator=gen
    )
    lengths = torch.randint(task.doc_tokens // 2, task.doc_tokens + 1, shape, generator=gen)
    return signal, lengths


def sample(task: Task, n: int, negatives: int, gen: torch.Generator) -> Batch:
    """``n`` documents, one query each (a noisy subset of the document's real tokens) and hard negatives."""
    centers = torch.randn(n, task.signal, generator=gen)
    signal, lengths = _documents(task, centers, gen)
    real = torch.arange(task.doc_tokens) < lengths[:, None]
    order = torch.rand(n, task.doc_tokens, generator=gen).masked_fill(~real, 2.0).argsort(dim=1)
    picked = signal.gather(1, order[:, : task.query_tokens, None].expand(-1, -1, task.signal))
    q = _observe(task, picked + task.query_noise * torch.randn(picked.shape, generator=gen), gen)
    d = _observe(task, signal, gen)
    d = d.masked_fill(~real[..., None], 5.0)  # junk in the padding: it must be masked out to score right
    if negatives == 0:
        return Batch(q, d, lengths, None, None)
    hard_signal, hard_lengths = _documents(task, centers[:, None].expand(-1, negatives, -1), gen)
    return Batch(q, d, lengths, _observe(task, hard_signal, gen), hard_lengths)


@torch.no_grad()
def accuracy(head: torch.nn.Module, batch: Batch, device: torch.device, dtype: torch.dtype) -> float:
    """Top-1 retrieval accuracy: how often query ``i`` scores document ``i`` highest among all documents."""
    q = head(batch.q.to(device)).to(dtype)
    d = head(batch.d.to(device)).to(dtype)
    scores = maxsim.maxsim(q[:, None], d[None], d_lengths=batch.d_lengths.to(device)[None], normalize=True)
    return (scores.argmax(dim=1).cpu() == torch.arange(len(scores))).float().mean().item()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=64, help="queries (and positive documents) per step")
    p.add_argument("--negatives", type=int, default=1, help="hard negatives per query")
    p.add_argument("--lr", type=float, default=0.01, help="Adam learning rate")
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--signal", type=int, default=16, help="dims that carry the document's identity")
    p.add_argument("--nuisance", type=int, default=48, help="noise dims mixed in by the distortion")
    p.add_argument("--out-dim", type=int, default=32, help="output dim of the head")
    p.add_argument("--doc-tokens", type=int, default=32, help="padded document length")
    p.add_argument("--query-tokens", type=int, default=8)
    p.add_argument("--eval-docs", type=int, default=256, help="held-out documents (and queries)")
    p.add_argument("--log-every", type=int, default=50, help="steps between loss / accuracy lines")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the tokens maxsim scores (the head stays float32)")  # fmt: skip
    args = p.parse_args(argv)
    if args.query_tokens > args.doc_tokens // 2:
        p.error("--query-tokens must be at most half of --doc-tokens (the shortest document)")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Train and report.

    Returns:
        ``{"accuracy_before", "accuracy_after"}`` (floats in [0, 1]), ``"losses"`` (one float per step),
        ``"accuracies"`` (``(step, accuracy)`` at each log line), ``"device"`` and ``"seconds"``.
    """
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(args.seed)
    task = make_task(args, gen)
    held_out = sample(task, args.eval_docs, 0, torch.Generator().manual_seed(args.seed + 1))
    torch.manual_seed(args.seed)
    head = torch.nn.Linear(task.dim, args.out_dim, bias=False).to(device)
    optimizer = torch.optim.Adam(head.parameters(), lr=args.lr)

    def encode(tokens: torch.Tensor | None) -> torch.Tensor | None:
        return None if tokens is None else head(tokens.to(device)).to(dtype)

    before = accuracy(head, held_out, device, dtype)
    print(
        f"device {device}, {args.dtype}: top-1 accuracy on {args.eval_docs} held-out documents {before:.3f}"
    )
    losses, accuracies = [], [(0, before)]
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = sample(task, args.batch_size, args.negatives, gen)
        negatives_lengths = None if batch.negatives is None else batch.negatives_lengths.to(device)
        loss = maxsim.contrastive_loss(
            encode(batch.q), encode(batch.d), encode(batch.negatives), d_lengths=batch.d_lengths.to(device),
            negatives_lengths=negatives_lengths, temperature=args.temperature, normalize=True,
        )  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % args.log_every == 0 or step == args.steps:
            accuracies.append((step, accuracy(head, held_out, device, dtype)))
            print(f"step {step:5d}  loss {loss.item():.4f}  top-1 accuracy {accuracies[-1][1]:.3f}")
    after = accuracies[-1][1]
    seconds = time.perf_counter() - started
    print(f"accuracy {before:.3f} -> {after:.3f} in {args.steps} steps ({seconds:.1f} s)")
    return {"accuracy_before": before, "accuracy_after": after, "losses": losses, "accuracies": accuracies,
            "device": str(device), "seconds": seconds}  # fmt: skip


if __name__ == "__main__":
    main()
