"""``maxsim.maxsim``'s per-signature prepared launches (``api._PREPARED``), with a stub backend on the CPU:
which calls take them, which fall back to the full path, and that both give the same results. The real
prepared launch (``triton.forward.PreparedForward``) is tested on the GPU (tests/test_gpu.py)."""

from __future__ import annotations

import types

import pytest
import torch
from helpers import assert_scores_close

import maxsim
from maxsim import api
from maxsim.backends import torch_backend
from maxsim.reference import maxsim_reference


class StubBackend(types.SimpleNamespace):
    """The torch backend, plus a prepared launch that counts its calls and can decline them."""

    def __init__(self):
        super().__init__(prepared_calls=0, declines=False, prepared=0)

    def maxsim_padded(self, *args, **kwargs):
        return torch_backend.maxsim_padded(*args, **kwargs)

    def prepare_padded(self, q, d, *, normalize, return_argmax):
        self.prepared += 1
        shape = (q.shape, d.shape)

        def launch(q, d):
            assert (q.shape, d.shape) == shape
            if self.declines:
                return None
            self.prepared_calls += 1
            return torch_backend.maxsim_padded(
                q, d, None, None, normalize=normalize, return_argmax=return_argmax
            )

        return launch


@pytest.fixture
def stub(monkeypatch):
    backend = StubBackend()
    monkeypatch.setattr(api, "get_backend", lambda device: backend)
    monkeypatch.setattr(api, "_PREPARED", {})
    return backend


def test_repeat_calls_take_the_prepared_launch(stub):
    q, d = torch.randn(4, 9, 16), torch.randn(4, 3, 11, 16)
    first = maxsim.maxsim(q[:, None], d, return_argmax=True)
    assert stub.prepared == 1 and stub.prepared_calls == 0
    for _ in range(3):
        again = maxsim.maxsim(q[:, None], d, return_argmax=True)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    assert stub.prepared == 1 and stub.prepared_calls == 3
    ref, ref_argmax = maxsim_reference(q[:, None], d)
    assert_scores_close(first[0], ref, dtype=torch.float32)
    assert torch.equal(first[1], ref_argmax)


def test_signature_covers_strides_flags_and_backend(stub, monkeypatch):
    q, d = torch.randn(7, 16), torch.randn(5, 11, 16)
    maxsim.maxsim(q, d)
    maxsim.maxsim(q, d.transpose(-1, -2).contiguous().transpose(-1, -2))  # same shape, other strides
    maxsim.maxsim(q, d, normalize=True)
    maxsim.maxsim(q, d, return_argmax=True)
    monkeypatch.setenv("MAXSIM_BACKEND", "torch")
    maxsim.maxsim(q, d)
    assert stub.prepared == 5 and stub.prepared_calls == 0
    maxsim.maxsim(q, d, normalize=True)  # prepared before, without MAXSIM_BACKEND set: a new signature
    assert stub.prepared == 6 and stub.prepared_calls == 0
    monkeypatch.delenv("MAXSIM_BACKEND")
    maxsim.maxsim(q, d, normalize=True)
    assert stub.prepared == 6 and stub.prepared_calls == 1


def test_masks_grad_and_declines_take_the_full_path(stub):
    q, d = torch.randn(6, 8), torch.randn(3, 10, 8)
    expected = maxsim.maxsim(q, d)
    maxsim.maxsim(q, d, d_lengths=torch.tensor([10, 4, 7]))
    assert stub.prepared == 1 and stub.prepared_calls == 0
    d_grad = d.clone().requires_grad_(True)
    maxsim.maxsim(q, d_grad).sum().backward()  # a training call: the full path, with autograd
    assert stub.prepared_calls == 0 and d_grad.grad is not None
    with torch.no_grad():
        assert torch.equal(maxsim.maxsim(q, d_grad), expected)  # no grad needed: prepared
    assert stub.prepared_calls == 1
    stub.declines = True
    assert torch.equal(maxsim.maxsim(q, d), expected)
    assert stub.prepared == 1 and stub.prepared_calls == 1


def test_bad_input_still_raises_after_a_signature_was_prepared(stub):
    q, d = torch.randn(6, 8), torch.randn(3, 10, 8)
    maxsim.maxsim(q, d)
    with pytest.raises(TypeError, match="normalize"):
        maxsim.maxsim(q, d, normalize=1)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        maxsim.maxsim(q.tolist(), d)
    with pytest.raises(ValueError, match="embedding dim"):
        maxsim.maxsim(q[:, :4], d)
    assert stub.prepared_calls == 0


def test_cache_is_bounded(stub, monkeypatch):
    monkeypatch.setattr(api, "MAX_PREPARED", 3)
    d = torch.randn(2, 5, 4)
    for n in range(1, 8):
        maxsim.maxsim(torch.randn(n, 4), d)
        assert len(api._PREPARED) <= 3


def test_backends_without_prepare_are_remembered_as_such(monkeypatch):
    monkeypatch.setattr(api, "_PREPARED", {})
    monkeypatch.setenv("MAXSIM_BACKEND", "torch")
    q, d = torch.randn(6, 8), torch.randn(3, 10, 8)
    first = maxsim.maxsim(q, d)
    assert list(api._PREPARED.values()) == [False]
    assert torch.equal(maxsim.maxsim(q, d), first)
