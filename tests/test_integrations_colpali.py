"""maxsim.integrations.colpali.score_multi_vector against colpali-engine's ``score_multi_vector``.

colpali-engine is not in the test extra: it requires torchvision, and PyPI's torchvision is a CUDA build
that cannot load beside the CPU torch pinned here, which breaks ``transformers``' model imports for the
other tests. So the reference is a re-statement of colpali-engine's documented behaviour (checked against
colpali-engine 0.3.18's own function when this was written): queries and passages in batches of
``batch_size``, each batch zero-padded to its longest item with no mask, all pairs scored in the input dtype
as the sum over query tokens of the max over passage tokens, scores gathered on the CPU as float32.
Where colpali-engine imports, the last test also compares with its own function.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DTYPES, assert_scores_close, dtype_id, random_tokens

import maxsim
from maxsim.integrations.colpali import score_multi_vector


def colpali_reference(qs, ps, batch_size=128):
    """colpali-engine's ``score_multi_vector``, re-stated (module docstring), on the CPU."""
    rows = []
    for i in range(0, len(qs), batch_size):
        q = torch.nn.utils.rnn.pad_sequence(list(qs[i : i + batch_size]), batch_first=True)
        blocks = []
        for j in range(0, len(ps), batch_size):
            p = torch.nn.utils.rnn.pad_sequence(list(ps[j : j + batch_size]), batch_first=True)
            blocks.append((q[:, None] @ p[None].transpose(-1, -2)).amax(dim=-1).sum(dim=-1))
        rows.append(torch.cat(blocks, dim=1))
    return torch.cat(rows).to(torch.float32)


# (query lengths, passage lengths, D, batch_size): unit sizes, odd sizes, several batches each way
CASES = [
    ([1], [1], 1, 128),
    ([3, 1, 7, 5, 2], [4, 9, 1, 13, 6, 2, 8], 16, 2),
    ([31, 33, 1], [97, 1, 130, 48], 130, 128),
    ([16, 20, 7, 9], [1030, 1024, 700], 128, 3),
]


def case_id(case) -> str:
    q_lens, p_lens, dim, batch_size = case
    return f"Nq{len(q_lens)}-Np{len(p_lens)}-Lq{max(q_lens)}-Lp{max(p_lens)}-D{dim}-bs{batch_size}"


@pytest.mark.parametrize("form", ["lists", "padded"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_colpali_engine(case, dtype, form):
    q_lens, p_lens, dim, batch_size = case
    g = torch.Generator().manual_seed(0)
    qs = [random_tokens((n, dim), dtype, generator=g) for n in q_lens]
    ps = [random_tokens((n, dim), dtype, generator=g) for n in p_lens]
    if form == "padded":  # a padded tensor is one batch of zero padding per batch_size slice, as a list is
        qs = torch.nn.utils.rnn.pad_sequence(qs, batch_first=True)
        ps = torch.nn.utils.rnn.pad_sequence(ps, batch_first=True)
    out = score_multi_vector(qs, ps, batch_size=batch_size)
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    ref = colpali_reference([x.double() for x in qs], [x.double() for x in ps], batch_size)
    assert_scores_close(out, ref, dtype=dtype, naive=colpali_reference(qs, ps, batch_size))


def test_zero_padding_takes_part_as_in_colpali_engine():
    """A padding token scores 0: in a passage shorter than the longest of its batch it beats negative
    similarities, so the score depends on ``batch_size``, as colpali-engine's does."""
    qs = [torch.tensor([[1.0, 0.0]])]
    ps = [torch.tensor([[-1.0, 0.0]]), torch.tensor([[-2.0, 0.0], [-3.0, 0.0]])]
    assert score_multi_vector(qs, ps, batch_size=1).tolist() == [[-1.0, -2.0]]
    assert score_multi_vector(qs, ps, batch_size=2).tolist() == [[0.0, -2.0]]  # ps[0] padded by one zero
    assert colpali_reference(qs, ps, 2).tolist() == [[0.0, -2.0]]
    assert maxsim.maxsim(qs[0], ps[0]).item() == -1.0  # maxsim itself never scores padding


@pytest.mark.parametrize("device", [None, "cpu", torch.device("cpu")], ids=str)
def test_device_and_result_on_cpu(device):
    g = torch.Generator().manual_seed(1)
    qs = [torch.randn(n, 8, generator=g) for n in (2, 5)]
    ps = [torch.randn(n, 8, generator=g) for n in (3, 1, 4)]
    out = score_multi_vector(qs, ps, device=device)
    assert out.device.type == "cpu" and out.shape == (2, 3)
    torch.testing.assert_close(out, colpali_reference(qs, ps))


def test_gradients_flow():
    g = torch.Generator().manual_seed(2)
    qs = [torch.randn(n, 8, generator=g, dtype=torch.float64, requires_grad=True) for n in (2, 5)]
    ps = [torch.randn(n, 8, generator=g, dtype=torch.float64, requires_grad=True) for n in (3, 1, 4)]
    assert torch.autograd.gradcheck(
        lambda *xs: score_multi_vector(list(xs[:2]), list(xs[2:]), batch_size=2), qs + ps
    )


Q = [torch.randn(3, 4), torch.randn(2, 4)]
P = [torch.randn(5, 4)]
BAD_INPUT = [
    (lambda: score_multi_vector([], P), ValueError, "qs is empty: no queries provided"),
    (lambda: score_multi_vector(Q, torch.randn(0, 5, 4)), ValueError, "ps is empty: no passages provided"),
    (lambda: score_multi_vector("qs", P), TypeError, "qs must be a torch.Tensor or a list"),
    (lambda: score_multi_vector(Q, [torch.randn(5)]), ValueError, r"ps\[0\] must have 2 dims"),
    (lambda: score_multi_vector(Q, torch.randn(5, 4)), ValueError, "ps must have 3 dims"),
    (
        lambda: score_multi_vector(Q, [P[0], torch.randn(0, 4)]),
        ValueError,
        r"ps\[1\] has an empty token axis",
    ),
    (
        lambda: score_multi_vector([Q[0], Q[1].half()], P),
        TypeError,
        r"qs\[0\] and qs\[1\] must have one dtype",
    ),
    (lambda: score_multi_vector(Q, [P[0].half()]), TypeError, "qs and ps must have one dtype"),
    (
        lambda: score_multi_vector(Q, [torch.randn(5, 3)]),
        ValueError,
        "qs and ps must have the same embedding dim",
    ),
    (lambda: score_multi_vector(Q, P, batch_size=0), ValueError, "batch_size must be >= 1"),
    (lambda: score_multi_vector(Q, P, batch_size=True), TypeError, "batch_size must be an int"),
    (lambda: score_multi_vector(Q, P, device=0), TypeError, "device must be None, a str or a torch.device"),
]


@pytest.mark.parametrize("call, error, match", BAD_INPUT, ids=[m for _, _, m in BAD_INPUT])
def test_bad_input_names_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_against_colpali_engine_itself():
    processing = pytest.importorskip(
        "colpali_engine.utils.processing_utils",
        reason="colpali-engine does not import here (see the module docstring)",
        exc_type=ImportError,
    )
    g = torch.Generator().manual_seed(3)
    qs = [torch.randn(n, 16, generator=g) for n in (3, 1, 7)]
    ps = [torch.randn(n, 16, generator=g) for n in (4, 9, 1, 13)]
    theirs = processing.BaseVisualRetrieverProcessor.score_multi_vector(qs, ps, batch_size=2, device="cpu")
    torch.testing.assert_close(score_multi_vector(qs, ps, batch_size=2, device="cpu"), theirs)
