"""VQAScore (Lin et al., 2024): the probability a VLM answers "Yes" to "Does this figure show "{text}"?".

    scorer = make_scorer("hf", model_id="Qwen/Qwen2.5-VL-7B-Instruct")      # or pass model=..., processor=...
    scorer.score(images, texts) -> tensor (N,) in [0, 1]        image i is scored against text i

Backends (``SCORERS``):
- ``hf``: any transformers image-text-to-text VLM (Qwen2.5-VL, InternVL3, Gemma-3, LLaVA-OneVision). The chat
  prompt (image + question, generation prompt on) is followed by the answer's tokens, teacher-forced in one
  forward pass; the score is the geometric mean over answer tokens of softmax(raw logits)[answer token], i.e.
  P("Yes") at the first step for a one-token answer. Raw logits, not ``generate(output_scores=True)``'s processed
  ones (a repetition penalty from ``generation_config`` would otherwise leak in). Batched, left
  padding (so the answer positions line up at the end).
- ``openai``: an OpenAI-compatible chat endpoint with logprobs (vLLM, GPT-4o): one generated token with
  ``top_logprobs`` (20); the score is exp(logprob) of the answer among the first token's top-k, else 0.0 -- as
  t2v_metrics' GPT-4o backend -- and every such 0 is counted in ``counts["answer_not_in_top_k"]``.
- ``oracle``: the exact answer in the shapes world: 1.0 when the shapes detector + GenEval rules find the image
  satisfies the prompt's GenEval metadata, else 0.0.

``evals.vqascore_base.seq2seq_answer_score`` is CLIP-FlanT5's formula as t2v_metrics computes it: the answer is
tokenized as T5 labels, which appends ``</s>``, and the score is ``exp(-mean cross-entropy)`` over
``[▁Yes, </s>]``, the geometric mean of P(Yes) and P(</s> | Yes), so about sqrt(P(Yes)) when P(</s>) ~ 1. The
backends ``clip-flant5-xxl`` and ``clip-flant5-xl`` (``evals.clip_flant5``) wrap the checkpoints GenAI-Bench's
published tables used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from evals.vqascore_base import ANSWER_TEMPLATE, QUESTION_TEMPLATE, VQAScorer, check_pairs, scorer_identity

HF_DEFAULT = "Qwen/Qwen2.5-VL-7B-Instruct"  # the hf backend's model when none is named


class HFVQAScore(VQAScorer):
    """A transformers image-text-to-text VLM; see the module docstring. ``model``/``processor`` may be passed in."""

    name = "hf"

    def __init__(self, model_id: str | None = None, model: Any = None, processor: Any = None, batch_size: int = 16,
                 question: str = QUESTION_TEMPLATE, answer: str = ANSWER_TEMPLATE, device: str | None = None,
                 dtype: Any = "auto", device_map: str | dict | None = None):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from evals.runtime import from_pretrained, input_device, pick_device, pick_dtype, processor_from_pretrained

        if model is None and model_id is None:
            raise ValueError("the hf VQAScore judge needs a model: --judge-model (hub id or local folder), e.g. "
                             f"{HF_DEFAULT}")
        device = pick_device(device)
        if processor is None:
            processor = processor_from_pretrained(AutoProcessor, model_id, offline="--judge oracle")
        if model is None:
            model = from_pretrained(AutoModelForImageTextToText, model_id, device=device,
                                    dtype=pick_dtype(dtype, device), device_map=device_map,
                                    offline="--judge oracle")
        self.model, self.processor = model.eval(), processor
        self.device = input_device(self.model, device)
        self.model_id = model_id or type(model).__name__
        self.batch_size, self.question, self.answer = batch_size, question, answer
        self.processor.tokenizer.padding_side = "left"
        self.answer_ids = self.processor.tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not self.answer_ids:
            raise ValueError(f"answer {answer!r} tokenizes to nothing")
        self.name = f"hf:{self.model_id}"
        from evals.cache import model_revision

        self.identity = {**scorer_identity("hf", self.model_id, question, answer),
                         "revision": model_revision(self.model)}

    @torch.no_grad()
    def _batch(self, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
        messages = [[{"role": "user", "content": [{"type": "image", "image": im.convert("RGB")},
                                                  {"type": "text", "text": self.question.format(t)}]}]
                    for im, t in zip(images, texts, strict=True)]
        inputs = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True, return_tensors="pt",
                                                    processor_kwargs={"padding": True}).to(self.device)
        k = len(self.answer_ids)
        answer = torch.tensor(self.answer_ids, device=inputs["input_ids"].device).expand(len(texts), k)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], answer], dim=1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(answer)], dim=1)
        if "token_type_ids" in inputs:  # Gemma3 marks image tokens; answer tokens are text
            inputs["token_type_ids"] = torch.cat([inputs["token_type_ids"], torch.zeros_like(answer)], dim=1)
        logits = self.model(**inputs).logits.float()  # (B, L + k, V), raw
        # position L - 1 + j predicts answer token j
        logp = torch.log_softmax(logits[:, -k - 1: -1], dim=-1).gather(-1, answer[..., None])[..., 0]
        return logp.mean(dim=1).exp().cpu()

    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
        check_pairs(images, texts)
        out = [self._batch(images[i: i + self.batch_size], texts[i: i + self.batch_size])
               for i in range(0, len(texts), self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0)


class OracleVQAScore(VQAScorer):
    """Exact VQAScore of the shapes world: 1.0 when the image satisfies the prompt's GenEval metadata.

    ``metadata``: {prompt text: GenEval metadata dict}; an unknown text raises (no silent zero).
    """

    name = "oracle"
    batch_size = 256

    def __init__(self, metadata: dict[str, dict]):
        from evals.detectors import get_detector

        self.metadata, self.detector = dict(metadata), get_detector("shapes")
        self.identity = {"judge": "oracle"}

    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
        from evals.geneval import evaluate_image

        check_pairs(images, texts)
        out = []
        for im, text in zip(images, texts, strict=True):
            if text not in self.metadata:
                raise ValueError(f"oracle VQAScore has no shapes-world metadata for prompt {text!r}")
            correct, _, _ = evaluate_image(self.detector.detect(im), self.metadata[text])
            out.append(float(correct))
        return torch.tensor(out)


class OpenAIVQAScore(VQAScorer):
    """An OpenAI-compatible endpoint with logprobs; see the module docstring. ``url``: API base."""

    def __init__(self, url: str, model: str, top_logprobs: int = 20, batch_size: int = 16,
                 api_key: str | None = None, timeout: float = 300.0, question: str = QUESTION_TEMPLATE,
                 answer: str = ANSWER_TEMPLATE, retry: Any = None):
        from evals.judges import ChatClient

        self.client = ChatClient(url, api_key, timeout, retry)
        self.endpoint, self.model, self.top_logprobs = self.client.endpoint, model, top_logprobs
        self.batch_size, self.question, self.answer = batch_size, question, answer
        self.name = f"openai:{model}"
        self.not_in_top_k = 0
        import threading

        self._lock = threading.Lock()
        self.identity = scorer_identity("openai", model, question, answer, top_logprobs=top_logprobs)

    @property
    def counts(self) -> dict[str, int]:
        """``answer_not_in_top_k`` (scored 0.0) and ``retries`` (transient failures retried)."""
        return {"answer_not_in_top_k": self.not_in_top_k, "retries": self.client.retries}

    def _one(self, image: Image.Image, text: str) -> float:
        import math

        from evals.judges import image_message

        body = {"model": self.model, "temperature": 0.0, "max_tokens": 1, "logprobs": True,
                "top_logprobs": self.top_logprobs, "messages": image_message(image, self.question.format(text))}
        payload = self.client.post(body)
        try:
            first = payload["choices"][0]["logprobs"]["content"][0]
        except (KeyError, IndexError, TypeError) as e:
            raise RuntimeError(f"{self.endpoint} sent no choices[0].logprobs.content (does it support "
                               f"logprobs?): {str(payload)[:300]}") from e
        for cand in first.get("top_logprobs") or [first]:
            if str(cand.get("token", "")).strip() == self.answer:
                return math.exp(float(cand["logprob"]))
        with self._lock:  # requests run in threads
            self.not_in_top_k += 1
        return 0.0

    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
        from concurrent.futures import ThreadPoolExecutor

        check_pairs(images, texts)
        with ThreadPoolExecutor(max_workers=max(1, min(self.batch_size, len(texts)))) as pool:
            return torch.tensor(list(pool.map(self._one, images, texts)), dtype=torch.float32)


def _clip_flant5(variant: str) -> Callable[..., VQAScorer]:
    """Factory of the ``variant`` CLIP-FlanT5 scorer (imported on use: it needs the T5 and CLIP classes)."""

    def make(**kwargs: Any) -> VQAScorer:
        from evals.clip_flant5 import CLIPFlanT5Score

        return CLIPFlanT5Score(variant=variant, **kwargs)

    return make


SCORERS: dict[str, Callable[..., VQAScorer]] = {
    "hf": HFVQAScore, "openai": OpenAIVQAScore, "oracle": OracleVQAScore,
    "clip-flant5-xxl": _clip_flant5("clip-flant5-xxl"), "clip-flant5-xl": _clip_flant5("clip-flant5-xl"),
}


def make_scorer(name: str, **kwargs: Any) -> VQAScorer:
    """A scorer by backend name; unknown names list the valid ones."""
    if name not in SCORERS:
        raise ValueError(f"unknown VQAScore backend {name!r}; valid: {', '.join(SCORERS)}")
    return SCORERS[name](**kwargs)
