"""maxsim.contrastive_loss and maxsim.nn.ContrastiveLoss against a plain-torch float64 re-statement."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    DTYPES,
    assert_grads_close,
    assert_scores_close,
    dtype_id,
    naive_scores,
    random_tokens,
)
from test_maxsim import make_masks, reference_masks

import maxsim
from maxsim.nn import ContrastiveLoss
from maxsim.reference import maxsim_reference

# (Nq, Nd, K, Lq, Ld, Ln, D, temperature): in-batch only, extra shared documents, hard negatives, unit and
# odd sizes
CASES = [
    (3, 3, 0, 33, 97, 1, 130, 1.0),
    (4, 6, 2, 31, 17, 5, 96, 0.05),
    (1, 1, 1, 1, 1, 1, 1, 0.3),
    (5, 7, 3, 8, 513, 97, 16, 2.0),
]


def case_id(case) -> str:
    nq, nd, k, lq, ld, ln, dim, t = case
    return f"Nq{nq}-Nd{nd}-K{k}-Lq{lq}-Ld{ld}-Ln{ln}-D{dim}-T{t:g}"


def reference_loss(q, d, negatives=None, *, q_mask=None, d_mask=None, negatives_mask=None, temperature=1.0,
                   normalize=False, reduction="mean"):  # fmt: skip
    """The objective restated one query at a time in float64: ``logsumexp(logits_i) - logits_i[i]``."""
    losses = []
    for i in range(q.shape[0]):
        qm = None if q_mask is None else q_mask[i]
        row = [maxsim_reference(q[i], d, q_mask=qm, d_mask=d_mask, normalize=normalize)[0]]
        if negatives is not None:
            nm = None if negatives_mask is None else negatives_mask[i]
            row.append(maxsim_reference(q[i], negatives[i], q_mask=qm, d_mask=nm, normalize=normalize)[0])
        logits = torch.cat(row) / temperature
        losses.append(torch.logsumexp(logits, 0) - logits[i])
    losses = torch.stack(losses)
    return {"mean": losses.mean(), "sum": losses.sum(), "none": losses}[reduction]


def naive_loss(q, d, negatives, *, q_mask, d_mask, negatives_mask, temperature, normalize, reduction="mean"):
    """The loss as a user would compute it with scores in the input dtype (the low-precision tolerance)."""
    qm = None if q_mask is None else q_mask[:, None]
    logits = naive_scores(q[:, None], d[None], q_mask=qm, d_mask=None if d_mask is None else d_mask[None],
                          normalize=normalize)  # fmt: skip
    if negatives is not None:
        hard = naive_scores(q[:, None], negatives, q_mask=qm, d_mask=negatives_mask, normalize=normalize)
        logits = torch.cat([logits, hard], dim=1)
    target = torch.arange(q.shape[0])
    return torch.nn.functional.cross_entropy(logits / temperature, target, reduction=reduction)


def make_problem(case, dtype, form, seed):
    """Tokens, the loss's mask/lengths keywords, and the same masks as bool tensors for the references.

    Masked document and negative tokens hold large values, so a mask that is not applied changes the loss.
    """
    nq, nd, k, lq, ld, ln, dim, _ = case
    g = torch.Generator().manual_seed(seed)
    q = random_tokens((nq, lq, dim), dtype, generator=g)
    d = random_tokens((nd, ld, dim), dtype, generator=g)
    negatives = random_tokens((nq, k, ln, dim), dtype, generator=g) if k else None
    kwargs = make_masks(g, (nq, lq), (nd, ld), form)
    q_mask, d_mask = reference_masks(kwargs, lq, ld)
    n_mask = None
    if negatives is not None:
        side = make_masks(g, (nq, lq), (nq, k, ln), form)
        kwargs.update({f"negatives_{key[2:]}": v for key, v in side.items() if key.startswith("d_")})
        n_mask = reference_masks(side, lq, ln)[1]
        if n_mask is not None:
            negatives = negatives.masked_fill(~n_mask[..., None], 30.0)
    if d_mask is not None:
        d = d.masked_fill(~d_mask[..., None], 30.0)
    masks = {"q_mask": q_mask, "d_mask": d_mask, "negatives_mask": n_mask}
    return q, d, negatives, kwargs, masks


def _leaves(*xs, double=False):
    return [None if x is None else (x.double() if double else x).detach().requires_grad_() for x in xs]


def check_against_reference(case, dtype, form, normalize, temperature, *, seed, device="cpu"):
    """Loss and gradients on ``device`` against the float64 re-statement (on the CPU)."""
    q, d, negatives, kwargs, masks = make_problem(case, dtype, form, seed)
    q, d, negatives = _leaves(*(None if x is None else x.to(device) for x in (q, d, negatives)))
    on_device = {key: value.to(device) for key, value in kwargs.items()}
    loss = maxsim.contrastive_loss(q, d, negatives, temperature=temperature, normalize=normalize, **on_device)
    rq, rd, rn = _leaves(*(None if x is None else x.cpu() for x in (q, d, negatives)), double=True)
    ref = reference_loss(rq, rd, rn, temperature=temperature, normalize=normalize, **masks)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and loss.shape == ()
    naive = naive_loss(rq.to(dtype), rd.to(dtype), None if rn is None else rn.to(dtype),
                       temperature=temperature, normalize=normalize, **masks)  # fmt: skip
    assert_scores_close(loss, ref, dtype=dtype, naive=naive)
    loss.backward()
    ref.backward()
    for ours, theirs in ((q, rq), (d, rd), (negatives, rn)):
        if ours is not None:
            assert_grads_close(ours.grad.cpu(), theirs.grad, dtype=dtype)


@pytest.mark.parametrize("dtype", (*DTYPES, torch.float64), ids=dtype_id)
@pytest.mark.parametrize("form", ["none", "mask", "lengths"])
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalize"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_loss_and_gradients_match_reference(case, normalize, form, dtype):
    # Raw Gaussian tokens score in the hundreds: a temperature below 1 multiplies the float32 rounding of
    # those scores into the logits and gradients beyond the tolerance rule. Small temperatures go with
    # normalized tokens, as in training; float64 inputs take every temperature.
    temperature = case[-1] if normalize or dtype == torch.float64 else max(case[-1], 1.0)
    check_against_reference(case, dtype, form, normalize, temperature, seed=CASES.index(case))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("form", ["mask", "lengths"])
def test_cuda_matches_reference(form, dtype):
    for case in CASES:
        check_against_reference(case, dtype, form, True, case[-1], seed=CASES.index(case), device="cuda")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions(reduction):
    case = CASES[1]
    q, d, negatives, kwargs, masks = make_problem(case, torch.float32, "mask", seed=7)
    q, d, negatives = _leaves(q, d, negatives)
    loss = maxsim.contrastive_loss(q, d, negatives, temperature=0.1, reduction=reduction, **kwargs)
    rq, rd, rn = _leaves(q, d, negatives, double=True)
    ref = reference_loss(rq, rd, rn, temperature=0.1, reduction=reduction, **masks)
    assert loss.shape == ((case[0],) if reduction == "none" else ())
    assert_scores_close(loss, ref, dtype=torch.float32)
    weights = torch.randn(loss.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    (loss.double() * weights).sum().backward()
    (ref * weights).sum().backward()
    for ours, theirs in ((q, rq), (d, rd), (negatives, rn)):
        assert_grads_close(ours.grad, theirs.grad, dtype=torch.float32)
    per_query = maxsim.contrastive_loss(q, d, negatives, temperature=0.1, reduction="none", **kwargs)
    expected = {"mean": per_query.mean(), "sum": per_query.sum(), "none": per_query}[reduction]
    torch.testing.assert_close(loss, expected)


def test_gradcheck_float64_with_a_learned_temperature():
    q, d, negatives, kwargs, _ = make_problem((3, 4, 2, 5, 6, 3, 4, 0.5), torch.float64, "mask", seed=9)
    temperature = torch.tensor(0.5, dtype=torch.float64)
    inputs = _leaves(q, d, negatives, temperature)

    def loss(q, d, negatives, temperature):
        return maxsim.contrastive_loss(q, d, negatives, temperature=temperature, normalize=True, **kwargs)

    assert torch.autograd.gradcheck(loss, inputs)


def test_shared_negatives_equal_extra_documents():
    """Negatives every query shares, given per query (a broadcast view) or appended to ``d``: one loss."""
    g = torch.Generator().manual_seed(10)
    q = random_tokens((4, 9, 32), torch.float32, generator=g)
    d = random_tokens((4, 11, 32), torch.float32, generator=g)
    shared = random_tokens((3, 11, 32), torch.float32, generator=g)
    per_query = maxsim.contrastive_loss(q, d, shared[None].expand(4, -1, -1, -1), temperature=0.2)
    appended = maxsim.contrastive_loss(q, torch.cat([d, shared]), temperature=0.2)
    torch.testing.assert_close(per_query, appended, rtol=1e-6, atol=1e-6)
    in_batch = maxsim.contrastive_loss(q, d, temperature=0.2)
    assert per_query > in_batch  # more negatives, a larger loss


def test_validate_false_gives_the_same_loss():
    q, d, negatives, kwargs, _ = make_problem(CASES[3], torch.float32, "lengths", seed=11)
    checked = maxsim.contrastive_loss(q, d, negatives, temperature=0.5, **kwargs)
    unchecked = maxsim.contrastive_loss(q, d, negatives, temperature=0.5, validate=False, **kwargs)
    assert torch.equal(checked, unchecked)


def test_module_is_the_function():
    q, d, negatives, kwargs, _ = make_problem(CASES[1], torch.float32, "mask", seed=12)
    module = ContrastiveLoss(temperature=0.05, normalize=True, reduction="none")
    expected = maxsim.contrastive_loss(q, d, negatives, temperature=0.05, normalize=True, reduction="none",
                                       **kwargs)  # fmt: skip
    assert torch.equal(module(q, d, negatives, **kwargs), expected)
    assert list(module.parameters()) == [] and module.state_dict() == {}
    assert repr(module) == "ContrastiveLoss(temperature=0.05, normalize=True, reduction='none')"
    assert repr(ContrastiveLoss()) == "ContrastiveLoss(temperature=1.0, normalize=False, reduction='mean')"


def test_module_learns_a_parameter_temperature():
    q, d, negatives, kwargs, masks = make_problem(CASES[1], torch.float32, "lengths", seed=13)
    temperature = torch.nn.Parameter(torch.tensor(0.2))
    module = ContrastiveLoss(temperature)
    assert list(module.parameters()) == [temperature]
    assert repr(module) == "ContrastiveLoss(temperature=tensor(0.2), normalize=False, reduction='mean')"
    module(q, d, negatives, **kwargs).backward()
    ref_t = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    rq, rd, rn = _leaves(q, d, negatives, double=True)
    reference_loss(rq, rd, rn, temperature=ref_t, **masks).backward()
    assert_grads_close(temperature.grad, ref_t.grad, dtype=torch.float32)


def _bad_inputs():
    g = torch.Generator().manual_seed(14)
    q, d, n = torch.randn(3, 4, 8, generator=g), torch.randn(5, 6, 8, generator=g), torch.randn(3, 2, 7, 8)
    no_real = torch.ones(5, 6, dtype=torch.bool)
    no_real[2] = False
    no_real_negative = torch.ones(3, 2, 7, dtype=torch.bool)
    no_real_negative[1, 1] = False
    return [
        ("q-list", dict(q=q.tolist(), d=d), TypeError, "q must be a torch.Tensor"),
        ("q-int", dict(q=q.long(), d=d), TypeError, "q must have dtype"),
        ("q-rank", dict(q=q[0], d=d), ValueError, "q must have 3 dims"),
        ("d-rank", dict(q=q, d=d[None]), ValueError, "d must have 3 dims"),
        ("dtypes", dict(q=q, d=d.half()), TypeError, "q and d must have one dtype"),
        ("dim", dict(q=q, d=d[..., :5]), ValueError, "q and d must have the same embedding dim"),
        ("too-few-docs", dict(q=q, d=d[:2]), ValueError, "d must hold at least one document per query"),
        ("neg-rank", dict(q=q, d=d, negatives=n[0]), ValueError, "negatives must have 4 dims"),
        ("neg-count", dict(q=q, d=d, negatives=n[:2]), ValueError, "negatives must have shape [Nq=3"),
        ("neg-dtype", dict(q=q, d=d, negatives=n.double()), TypeError, "q and negatives must have one dtype"),
        ("neg-dim", dict(q=q, d=d, negatives=n[..., :4]), ValueError, "q and negatives must have the same"),
        ("q-mask-dtype", dict(q=q, d=d, q_mask=torch.ones(3, 4)), TypeError, "q_mask must have dtype bool"),
        ("d-mask-shape", dict(q=q, d=d, d_mask=torch.ones(5, 5, dtype=torch.bool)), ValueError, "d_mask"),
        ("d-mask-empty", dict(q=q, d=d, d_mask=no_real), ValueError, "d_mask has a document with no real"),
        ("q-lengths-range", dict(q=q, d=d, q_lengths=torch.tensor([1, 5, 2])), ValueError, "q_lengths"),
        ("d-both", dict(q=q, d=d, d_mask=no_real, d_lengths=torch.ones(5, dtype=torch.long)), ValueError,
         "give d_mask or d_lengths, not both"),
        ("neg-mask-empty", dict(q=q, d=d, negatives=n, negatives_mask=no_real_negative), ValueError,
         "negatives_mask has a document with no real token"),
        ("neg-lengths-zero", dict(q=q, d=d, negatives=n, negatives_lengths=torch.zeros(3, 2, dtype=torch.long)),
         ValueError, "negatives_lengths must lie in [1, 7]"),
        ("neg-mask-alone", dict(q=q, d=d, negatives_mask=no_real_negative), ValueError,
         "negatives_mask and negatives_lengths need negatives"),
        ("t-zero", dict(q=q, d=d, temperature=0.0), ValueError, "temperature must be a finite number > 0"),
        ("t-negative", dict(q=q, d=d, temperature=-1), ValueError, "temperature must be a finite number > 0"),
        ("t-inf", dict(q=q, d=d, temperature=float("inf")), ValueError, "temperature"),
        ("t-str", dict(q=q, d=d, temperature="0.1"), TypeError, "temperature must be a number"),
        ("t-bool", dict(q=q, d=d, temperature=True), TypeError, "temperature must be a number"),
        ("t-shape", dict(q=q, d=d, temperature=torch.ones(1)), ValueError, "temperature must be a 0-dim"),
        ("t-int-tensor", dict(q=q, d=d, temperature=torch.tensor(1)), TypeError, "temperature must be a float"),
        ("t-tensor-zero", dict(q=q, d=d, temperature=torch.tensor(0.0)), ValueError, "temperature must be > 0"),
        ("reduction", dict(q=q, d=d, reduction="avg"), ValueError, "reduction must be one of 'mean'"),
        ("normalize", dict(q=q, d=d, normalize="yes"), TypeError, "normalize must be a bool"),
    ]  # fmt: skip


BAD = _bad_inputs()


@pytest.mark.parametrize(("kwargs", "error", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument(kwargs, error, message):
    with pytest.raises(error) as info:
        maxsim.contrastive_loss(**kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"temperature": 0}, ValueError),
        ({"temperature": "hot"}, TypeError),
        ({"reduction": "avg"}, ValueError),
    ],
)
def test_module_checks_its_options(kwargs, error):
    with pytest.raises(error):
        ContrastiveLoss(**kwargs)
