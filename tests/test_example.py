"""examples/contrastive_training.py: a short CPU run learns (accuracy up, loss down); without learning, nothing moves."""

from __future__ import annotations

import statistics

import pytest
from helpers import import_example

SHORT = ["--steps", "100", "--batch-size", "32", "--eval-docs", "128", "--log-every", "50", "--device", "cpu"]


@pytest.fixture(scope="module")
def example():
    return import_example("contrastive_training")


def test_short_cpu_run_learns(example, capsys):
    result = example.main([*SHORT, "--seed", "0"])
    before, after, losses = result["accuracy_before"], result["accuracy_after"], result["losses"]
    assert len(losses) == 100 and result["device"] == "cpu"
    assert before < 0.2, "the distortion should make the untrained head retrieve poorly"
    assert after >= before + 0.4 and after >= 0.5, (before, after)
    assert statistics.mean(losses[-10:]) < 0.5 * statistics.mean(losses[:10]), losses
    assert [step for step, _ in result["accuracies"]] == [0, 50, 100]
    out = capsys.readouterr().out
    assert "step    50  loss" in out and "top-1 accuracy" in out and f"{before:.3f} -> {after:.3f}" in out


def test_without_learning_nothing_improves(example):
    """The control: with a zero learning rate the same run keeps its accuracy (the test above can fail)."""
    result = example.main([*SHORT, "--steps", "20", "--seed", "0", "--lr", "0"])
    assert result["accuracy_after"] == result["accuracy_before"]
    assert statistics.mean(result["losses"][-5:]) > 0.5 * statistics.mean(result["losses"][:5])


def test_rejects_queries_longer_than_the_shortest_document(example):
    with pytest.raises(SystemExit):
        example.main(["--query-tokens", "20", "--doc-tokens", "32"])
