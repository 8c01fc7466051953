"""hub/: the kernel layout of Hugging Face ``kernels``, loaded offline from the local path, re-exports maxsim.compat."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_scores_close, random_tokens

import maxsim.compat as compat

kernels = pytest.importorskip("kernels", reason="the test extra installs Hugging Face kernels")

HUB = Path(__file__).resolve().parents[1] / "hub"
BACKENDS = ("cpu", "cuda", "rocm", "metal", "xpu")  # pure-Python (noarch) variants: torch-<backend>


@pytest.fixture(scope="module")
def kernel():
    return kernels.get_local_kernel(HUB)


def test_every_variant_is_the_same_reexport_with_its_backend():
    shim = (HUB / "kernel.py").resolve()
    variants = sorted(p.name for p in (HUB / "build").iterdir())
    assert variants == sorted(f"torch-{b}" for b in BACKENDS)
    for backend in BACKENDS:
        variant = HUB / "build" / f"torch-{backend}"
        assert (variant / "__init__.py").resolve() == shim, "every variant's __init__.py is hub/kernel.py"
        raw = json.loads((variant / "metadata.json").read_text())
        assert raw["name"] == "maxsim" and raw["backend"]["type"] == backend
        assert raw["id"] == f"_maxsim_{backend}"
        metadata = kernels.Metadata.read_from_file(variant / "metadata.json")  # kernels parses it
        assert str(metadata.name) == "maxsim" and metadata.python_depends == []


def test_loads_the_variant_of_this_machine(kernel):
    expected = "torch-cpu"
    if torch.version.cuda or torch.version.hip:
        expected = "torch-cuda" if torch.version.cuda else "torch-rocm"
    elif torch.backends.mps.is_available():
        expected = "torch-metal"
    assert Path(kernel.__file__).parent.name == expected
    loaded = [k for k in kernels.get_loaded_kernels() if k.module is kernel]
    assert len(loaded) == 1 and str(loaded[0].metadata.name) == "maxsim"


def test_exposes_the_compat_names_as_the_same_objects(kernel):
    assert sorted(kernel.__all__) == sorted(compat.__all__)
    for name in compat.__all__:
        assert getattr(kernel, name) is getattr(compat, name), name


def test_results_match_compat_and_the_reference(kernel):
    g = torch.Generator().manual_seed(0)
    D = 24
    queries = random_tokens((3 + 5, D), torch.float32, generator=g)
    documents = random_tokens((7 + 2 + 11, D), torch.float32, generator=g)
    q_off = torch.tensor([0, 3, 8], dtype=torch.int32)
    d_off = torch.tensor([0, 7, 9, 20], dtype=torch.int32)
    q_ids, d_ids = torch.tensor([0, 1, 1]), torch.tensor([2, 0, 1])
    packed = (queries, q_off, documents, d_off, q_ids, d_ids)

    assert torch.equal(kernel.score_pairs_packed(*packed), compat.score_pairs_packed(*packed))
    scores, argmax = kernel.score_pairs_packed_with_argmax(*packed, max_q_len=5)
    compat_scores, compat_argmax = compat.score_pairs_packed_with_argmax(*packed, max_q_len=5)
    assert torch.equal(scores, compat_scores) and torch.equal(argmax, compat_argmax)
    ref_scores, ref_argmax = compat.score_pairs_packed_with_argmax_reference(*packed, 5)
    assert_scores_close(scores, ref_scores, dtype=torch.float32)
    assert torch.equal(argmax, ref_argmax)

    padded_q = random_tokens((2, 4, D), torch.float32, generator=g)
    padded_d = random_tokens((2, 3, 6, D), torch.float32, generator=g)
    q_len, d_len = torch.tensor([4, 2]), torch.tensor([[6, 1, 3], [2, 6, 5]])
    scores, argmax = kernel.score_candidates_padded_with_argmax(padded_q, padded_d, q_len, d_len)
    ref_scores, ref_argmax = compat.score_candidates_padded_with_argmax_reference(
        padded_q, padded_d, q_len, d_len
    )
    assert_scores_close(scores, ref_scores, dtype=torch.float32)
    assert torch.equal(argmax, ref_argmax)
    assert torch.equal(kernel.score_candidates_padded(padded_q, padded_d, q_len, d_len), scores)

    scores = kernel.score_contrastive(padded_q, documents, d_off)
    assert_scores_close(
        scores, compat.score_contrastive_reference(padded_q, documents, d_off), dtype=torch.float32
    )
    assert torch.equal(scores, compat.score_contrastive(padded_q, documents, d_off))


def test_gradients_flow_through_the_kernel(kernel):
    g = torch.Generator().manual_seed(1)
    q = random_tokens((2, 4, 8), torch.float32, generator=g).requires_grad_()
    d = random_tokens((2, 3, 5, 8), torch.float32, generator=g).requires_grad_()
    lengths_q, lengths_d = torch.tensor([4, 3]), torch.full((2, 3), 5)
    kernel.score_candidates_padded_train(q, d, lengths_q, lengths_d).sum().backward()
    q_ref, d_ref = q.detach().clone().requires_grad_(), d.detach().clone().requires_grad_()
    compat.score_candidates_padded_reference(q_ref, d_ref, lengths_q, lengths_d).sum().backward()
    assert torch.allclose(q.grad, q_ref.grad, atol=1e-5) and torch.allclose(d.grad, d_ref.grad, atol=1e-5)


def test_without_the_package_the_kernel_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "maxsim.compat", None)  # the import of maxsim.compat fails
    with pytest.raises(ModuleNotFoundError, match="pip install maxsim"):
        runpy.run_path(str(HUB / "kernel.py"))
