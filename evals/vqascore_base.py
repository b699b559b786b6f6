"""What every VQAScore backend shares: the question and answer, the scorer interface, input checks, and the
encoder-decoder answer score (CLIP-FlanT5's formula).

VQAScore (Lin et al., 2024) is the probability a VLM answers "Yes" to ``Does this figure show "{text}"?``; the
backends are in ``evals.vqascore`` (registry ``SCORERS``) and ``evals.clip_flant5``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

QUESTION_TEMPLATE = 'Does this figure show "{}"? Please answer yes or no.'
ANSWER_TEMPLATE = "Yes"


def scorer_identity(kind: str, model: str | None = None, question: str = QUESTION_TEMPLATE,
                    answer: str = ANSWER_TEMPLATE, **extra: Any) -> dict[str, Any]:
    """What makes a VQAScore backend's numbers what they are (``evals.cache``): kind, model, the hash of its
    question + answer, and backend-specific settings (``extra``)."""
    from evals.cache import text_hash

    return {"judge": kind, "model": model, "template": text_hash(question, answer), **extra}


class VQAScorer:
    """Interface: ``score(images, texts) -> (N,) float tensor`` in [0, 1]; ``name`` labels every output."""

    name = "vqascore"
    batch_size = 16

    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def check_pairs(images: Sequence[Any], texts: Sequence[str]) -> None:
    """Image i is scored against text i: equal lengths, PIL images only (ValueError naming the first bad one)."""
    if len(images) != len(texts):
        raise ValueError(f"score() pairs image i with text i: got {len(images)} images and {len(texts)} texts")
    for i, im in enumerate(images):
        if not isinstance(im, Image.Image):
            raise ValueError(f"images[{i}] must be a PIL image, got {type(im).__name__}")


def seq2seq_answer_score(model: Any, tokenizer: Any, encoder_inputs: dict[str, torch.Tensor],
                         answer: str = ANSWER_TEMPLATE) -> torch.Tensor:
    """CLIP-FlanT5's score for an encoder-decoder: ``exp(-mean CE)`` over the answer's T5 labels (with ``</s>``).

    encoder_inputs: what the model's encoder takes (``input_ids``/``attention_mask`` or ``inputs_embeds``), batch B.
    Returns (B,) scores = geometric mean of the label tokens' teacher-forced probabilities, each a softmax over the
    tokenizer's ``len(tokenizer)`` ids (not the head's padding rows beyond them).
    """
    labels = tokenizer([answer], return_tensors="pt")["input_ids"]  # T5 appends </s>
    b = next(iter(encoder_inputs.values())).shape[0]
    labels = labels.expand(b, -1).contiguous().to(next(model.parameters()).device)
    with torch.no_grad():
        logits = model(**encoder_inputs, labels=labels).logits.float()  # (B, K, V)
    # FlanT5's head has 32128 rows for a 32100-id tokenizer; t2v_metrics resizes the embeddings to the tokenizer,
    # so its softmax runs over the tokenizer's ids only. Slicing does the same without re-tying the separate head.
    logits = logits[..., : min(len(tokenizer), logits.shape[-1])]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")  # (B, K)
    return ce.mean(dim=1).neg().exp().cpu()
