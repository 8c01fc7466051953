"""maxsim.viz: the alignment data is MaxSim's own argmax, the picture is a PNG, masks and bad input."""

from __future__ import annotations

import struct
import sys

import pytest
import torch
from helpers import integer_tokens, random_tokens

import maxsim
from maxsim.viz import PlotUnavailable, alignment, alignment_figure

pytest.importorskip("matplotlib", reason="the plot extra (and the test extra) installs matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _pair(Lq=5, Ld=9, D=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return random_tokens((Lq, D), dtype, generator=g), random_tokens((Ld, D), dtype, generator=g)


def _marks(figure):
    """The (row, column, label) of every value written on the heatmap."""
    (ax, _colorbar) = figure.axes
    return [(round(t.get_position()[1]), round(t.get_position()[0]), t.get_text()) for t in ax.texts]


@pytest.mark.parametrize("normalize", [False, True], ids=["dot", "cosine"])
def test_alignment_is_maxsims_argmax(normalize):
    q, d = _pair()
    data = alignment(q, d, normalize=normalize)
    score, argmax = maxsim.maxsim(q, d, normalize=normalize, return_argmax=True)
    assert torch.equal(data.argmax, argmax) and data.argmax.dtype == torch.int32
    assert data.similarity.shape == (5, 9) and data.similarity.dtype == torch.float32
    rows = torch.arange(5)
    assert torch.equal(data.best, data.similarity[rows, data.argmax.long()])
    assert torch.allclose(data.best, data.similarity.max(dim=1).values)
    assert data.score == pytest.approx(score.item(), rel=1e-5)
    assert data.best.sum().item() == pytest.approx(data.score, rel=1e-5)
    if normalize:
        assert float(data.similarity.abs().max()) <= 1 + 1e-5


def test_ties_mark_the_first_winner():
    g = torch.Generator().manual_seed(3)
    q, d = (
        integer_tokens((6, 4), torch.float32, generator=g),
        integer_tokens((7, 4), torch.float32, generator=g),
    )
    d[4] = d[1]  # a guaranteed tie between tokens 1 and 4
    data = alignment(q, d)
    assert torch.equal(data.argmax, maxsim.maxsim(q, d, return_argmax=True)[1])
    first = (data.similarity == data.similarity.max(dim=1, keepdim=True).values).int().argmax(dim=1)
    assert torch.equal(data.argmax.long(), first)


def test_masks_blank_their_cells_and_never_win():
    q, d = _pair(Lq=4, Ld=6)
    d = d.clone()
    d[2] = 10 * q[0]  # the best document token for q[0], masked out below
    q_mask = torch.tensor([True, False, True, True])
    d_mask = torch.tensor([True, True, False, True, True, False])
    data = alignment(q, d, q_mask=q_mask, d_mask=d_mask)
    score, argmax = maxsim.maxsim(q, d, q_mask=q_mask, d_mask=d_mask, return_argmax=True)
    assert torch.equal(data.argmax, argmax) and data.argmax[1] == -1
    assert data.argmax[0] != 2 and not bool(torch.isin(data.argmax, torch.tensor([2, 5])).any())
    assert bool(data.similarity[1].isnan().all()) and bool(data.similarity[:, [2, 5]].isnan().all())
    assert not bool(data.similarity[q_mask][:, d_mask].isnan().any())
    assert data.best[1] == 0 and data.score == pytest.approx(score.item(), rel=1e-5)
    figure, _ = alignment_figure(q, d, q_mask=q_mask, d_mask=d_mask)
    assert sorted(row for row, _, _ in _marks(figure)) == [0, 2, 3], "no mark on a masked query token"


def test_figure_png_marks_and_labels(tmp_path):
    q, d = _pair(Lq=3, Ld=5)
    q_tokens, d_tokens = ["what", "is", "maxsim"], ["maxsim", "is", "a", "late", "interaction"]
    path = tmp_path / "align.png"
    figure, data = alignment_figure(
        q, d, q_tokens=q_tokens, d_tokens=d_tokens, title="demo", path=path, dpi=50
    )
    raw = path.read_bytes()
    assert raw[:8] == PNG_SIGNATURE and raw[12:16] == b"IHDR"
    width, height = struct.unpack(">II", raw[16:24])
    fig_w, fig_h = figure.get_size_inches()
    assert (width, height) == (round(fig_w * 50), round(fig_h * 50))
    expected = [(i, j, f"{data.best[i].item():.2f}") for i, j in enumerate(data.argmax.tolist())]
    assert _marks(figure) == expected
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == q_tokens
    assert [t.get_text() for t in ax.get_xticklabels()] == d_tokens
    assert ax.get_title().startswith("demo\nMaxSim = ")


def test_half_precision_and_index_labels():
    q, d = _pair(dtype=torch.bfloat16)
    figure, data = alignment_figure(q, d, normalize=True)
    assert torch.equal(data.argmax, maxsim.maxsim(q, d, normalize=True, return_argmax=True)[1])
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == [str(j) for j in range(9)]


def test_bad_input_names_the_argument():
    q, d = _pair()
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        alignment([[1.0]], d)
    with pytest.raises(ValueError, match="q must have 2 dims"):
        alignment(q[None], d)
    with pytest.raises(ValueError, match="d must have 2 dims"):
        alignment(q, d[None])
    with pytest.raises(ValueError, match="embedding dim"):
        alignment(q, d[:, :3])
    with pytest.raises(TypeError, match="q_mask"):
        alignment(q, d, q_mask=torch.ones(5))
    with pytest.raises(ValueError, match="d_mask"):
        alignment(q, d, d_mask=torch.zeros(9, dtype=torch.bool))  # no real document token
    with pytest.raises(ValueError, match=r"q_tokens must hold one string per query token \(5\), got 2"):
        alignment_figure(q, d, q_tokens=["a", "b"])
    with pytest.raises(TypeError, match="d_tokens must be a list of strings"):
        alignment_figure(q, d, d_tokens="abc")
    with pytest.raises(TypeError, match="q_tokens must hold strings only"):
        alignment_figure(q, d, q_tokens=[1, 2, 3, 4, 5])


def test_without_matplotlib_the_error_names_the_plot_extra(monkeypatch):
    q, d = _pair()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(PlotUnavailable, match=r"pip install 'maxsim\[plot\]'"):
        alignment_figure(q, d)
    assert isinstance(PlotUnavailable("x"), ImportError)
    alignment(q, d)  # the data needs no matplotlib
