"""VQA judges for DPG-style yes/no questions behind one interface: the shapes-world oracle, an HF transformers VLM,
and an OpenAI-compatible chat endpoint (e.g. a vLLM server).

A judge maps a batch of ``JudgeRequest`` (one image + one question row) to ``JudgeResult`` (answer "yes"/"no"/None
and the raw model text). Text judges share one policy (``TextJudge``): the refined chain-of-thought prompt (paper
App. A.3.2) or a plain ``direct`` prompt, a robust parse of the verdict, one retry of unparseable answers, then
``None`` (scored 0 and counted as unparsed by the aggregation).
"""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from PIL import Image

JUDGE_MODES: tuple[str, ...] = ("cot", "direct")
OPENAI_DEFAULT = "google/gemma-3-27b-it"  # the served model an OpenAI-compatible judge asks for by default
HF_PRESETS: dict[str, str] = {"gemma-3-27b-it": "google/gemma-3-27b-it", "gemma-3-12b-it": "google/gemma-3-12b-it"}

COT_TEMPLATE = (
    "You are a meticulous visual question answering judge for text-to-image evaluation.\n"
    "Question about the image: {question}\n\n"
    "First, reason step by step about every aspect of the image that is relevant to the question: which objects "
    "are present, their count, colours, shapes, sizes, textures, text, their positions and relations to each "
    "other, and whether any of them is missing or wrong. Be strict: answer yes only if the image clearly "
    "satisfies the question.\n"
    "Then finish with a final line of exactly 'Answer: yes' or 'Answer: no'."
)
DIRECT_TEMPLATE = "{question} Answer with a single word: yes or no."

_MARKUP = re.compile(r"[*_`#>\[\]]")
# "answer" must be followed by ":", "=", "-" or "is": "I could answer no" in the reasoning is not a verdict.
_VERDICT = re.compile(r"\b(?:final\s+)?answer\s*(?:is\s*|[:\-=]\s*)\"?'?(yes|no)\b")
_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class JudgeRequest:
    """One question about one image. ``image``: RGB PIL image (one tile); ``row``: the question's CSV row."""

    item_id: str
    image_index: int
    proposition_id: int
    question: str
    image: Image.Image
    row: dict[str, Any]


@dataclass(frozen=True)
class JudgeResult:
    """``answer``: "yes", "no" or None (unparseable after the retry); ``raw``: the model text (all attempts)."""

    answer: str | None
    raw: str


def judge_identity(kind: str, model: str | None = None, mode: str | None = None,
                   size_hint: int | None = None) -> dict[str, Any]:
    """What makes a DPG judge's answers what they are (``evals.cache``): kind, model (presets resolved to their hub
    id), prompt mode and the hash of its prompt template; the oracle's canvas size hint."""
    if kind == "oracle":
        return {"judge": "oracle", "size_hint": size_hint}
    from evals.cache import text_hash

    return {"judge": kind, "model": HF_PRESETS.get(model, model), "mode": mode,
            "template": text_hash(COT_TEMPLATE if mode == "cot" else DIRECT_TEMPLATE)}


def build_prompt(question: str, mode: str = "cot") -> str:
    """The text sent with the image: the CoT prompt ending in an 'Answer: yes/no' line, or the direct one."""
    if mode not in JUDGE_MODES:
        raise ValueError(f"unknown judge mode {mode!r}; valid: {JUDGE_MODES}")
    return (COT_TEMPLATE if mode == "cot" else DIRECT_TEMPLATE).format(question=question.strip())


def parse_answer(text: str, mode: str = "cot") -> str | None:
    """The verdict in a judge's reply: "yes", "no" or None.

    Case, punctuation and markdown are ignored. The last "Answer: yes|no" wins (CoT text may quote the format
    earlier). Without such a line: CoT mode accepts a last line that is only yes/no; direct mode takes the reply's
    first word when it is yes/no ("Yes, there is..." -> "yes").
    """
    if mode not in JUDGE_MODES:
        raise ValueError(f"unknown judge mode {mode!r}; valid: {JUDGE_MODES}")
    clean = _MARKUP.sub(" ", text.lower())
    verdicts = _VERDICT.findall(clean)
    if verdicts:
        return verdicts[-1]
    lines = [ln for ln in clean.splitlines() if _WORD.search(ln)]
    if not lines:
        return None
    if mode == "cot":
        words = _WORD.findall(lines[-1])
        return words[0] if len(words) == 1 and words[0] in ("yes", "no") else None
    first = _WORD.findall(lines[0])[0]
    return first if first in ("yes", "no") else None


class Judge:
    """Interface: ``judge(requests) -> results`` (same order). ``batch_size``: how many requests per call the
    runner should group."""

    name = "judge"
    batch_size = 1

    def judge(self, requests: list[JudgeRequest]) -> list[JudgeResult]:
        raise NotImplementedError


class OracleJudge(Judge):
    """Exact answers in the shapes world: ``detect_shapes`` on the tile, then ``answer_question`` on the row's
    ``tuple``. ``size_hint``: the world canvas size the tiles depict (tiles of another size are resized)."""

    name = "oracle"

    def __init__(self, size_hint: int | None = None, batch_size: int = 256):
        self.size_hint = size_hint
        self.batch_size = batch_size
        self.identity = judge_identity("oracle", size_hint=size_hint)

    def judge(self, requests: list[JudgeRequest]) -> list[JudgeResult]:
        from world.detector import detect_shapes
        from world.dpg_questions import answer_question

        cache: dict[int, list] = {}  # detections per image object: a batch holds many questions per tile
        out = []
        for req in requests:
            key = id(req.image)
            if key not in cache:
                cache[key] = detect_shapes(req.image, size_hint=self.size_hint)
            yes = answer_question(req.row, cache[key])
            out.append(JudgeResult("yes" if yes else "no", f"oracle: {'yes' if yes else 'no'}"))
        return out


class TextJudge(Judge):
    """A judge that generates text: prompt building, parsing and the single retry live here; subclasses implement
    ``generate(images, prompts) -> texts``."""

    def __init__(self, mode: str = "cot", batch_size: int = 8):
        if mode not in JUDGE_MODES:
            raise ValueError(f"unknown judge mode {mode!r}; valid: {JUDGE_MODES}")
        self.mode = mode
        self.batch_size = batch_size

    def generate(self, images: list[Image.Image], prompts: list[str]) -> list[str]:
        raise NotImplementedError

    def judge(self, requests: list[JudgeRequest]) -> list[JudgeResult]:
        prompts = [build_prompt(r.question, self.mode) for r in requests]
        raws = self.generate([r.image for r in requests], prompts)
        answers = [parse_answer(t, self.mode) for t in raws]
        retry = [i for i, a in enumerate(answers) if a is None]
        if retry:  # one more try for the unparseable ones, batched together
            again = self.generate([requests[i].image for i in retry], [prompts[i] for i in retry])
            for i, text in zip(retry, again, strict=True):
                raws[i] = f"{raws[i]}\n[retry]\n{text}"
                answers[i] = parse_answer(text, self.mode)
        return [JudgeResult(a, t) for a, t in zip(answers, raws, strict=True)]


class HFJudge(TextJudge):
    """A transformers image-text-to-text VLM (default preset ``gemma-3-27b-it``; any hub id or local path), greedy
    decoding, batched with left padding. ``model``/``processor`` may be passed in (tests build tiny ones)."""

    name = "hf"

    def __init__(self, model_id: str = "gemma-3-27b-it", mode: str = "cot", batch_size: int = 8,
                 max_new_tokens: int | None = None, model: Any = None, processor: Any = None,
                 device: str | None = None, dtype: Any = "auto", device_map: str | dict | None = None):
        super().__init__(mode, batch_size)
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from evals.runtime import from_pretrained, input_device, pick_device, pick_dtype, processor_from_pretrained

        self.model_id = HF_PRESETS.get(model_id, model_id)
        self.max_new_tokens = max_new_tokens or (512 if mode == "cot" else 8)
        device = pick_device(device)
        if processor is None:
            processor = processor_from_pretrained(AutoProcessor, self.model_id, offline="--judge oracle")
        if model is None:
            model = from_pretrained(AutoModelForImageTextToText, self.model_id, device=device,
                                    dtype=pick_dtype(dtype, device), device_map=device_map,
                                    offline="--judge oracle")
        self.model, self.processor = model.eval(), processor
        self.device = input_device(self.model, device)
        self.processor.tokenizer.padding_side = "left"  # generation appends on the right
        from evals.cache import model_revision

        self.identity = {**judge_identity("hf", self.model_id, mode), "revision": model_revision(self.model)}

    def generate(self, images: list[Image.Image], prompts: list[str]) -> list[str]:
        import torch

        messages = [[{"role": "user", "content": [{"type": "image", "image": im.convert("RGB")},
                                                  {"type": "text", "text": p}]}] for im, p in zip(images, prompts,
                                                                                                  strict=True)]
        inputs = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True, return_tensors="pt",
                                                    processor_kwargs={"padding": True})
        inputs = inputs.to(self.device)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self.processor.batch_decode(new, skip_special_tokens=True)]


def _png_data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def chat_endpoint(url: str) -> str:
    """``http://host:8000/v1`` (or the full ``.../chat/completions``) -> the chat-completions URL."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--judge-url must start with http:// or https://, got {url!r}")
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def image_message(image: Image.Image, text: str) -> list[dict[str, Any]]:
    """One user turn: the image as a PNG data URI, then the text (OpenAI chat format)."""
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _png_data_uri(image)}},
                                         {"type": "text", "text": text}]}]


RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})  # HTTP answers worth another try


@dataclass(frozen=True)
class RetryPolicy:
    """How an OpenAI-compatible client retries transient failures (HTTP 429 / 5xx / 408, timeouts, refused or
    dropped connections): at most ``attempts`` tries per request; before retry k (1, 2, ...) it waits
    ``initial * 2**(k-1)`` s, capped at ``max_wait``, plus up to ``initial`` s of random jitter (so many clients
    do not retry in step). Anything else (400, 401, 404, a malformed answer) fails at once."""

    attempts: int = 6
    initial: float = 1.0
    max_wait: float = 60.0


class _Transient(RuntimeError):
    """A failure worth retrying."""


class ChatClient:
    """POSTs chat-completions requests to ``url`` (an API base or the full ``.../chat/completions``), retrying
    transient failures with tenacity (``RetryPolicy``); ``retries`` counts every retry of every request (the
    clients run requests in threads, so the count is locked)."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 300.0,
                 retry: RetryPolicy | None = None) -> None:
        self.endpoint = chat_endpoint(url)
        self.api_key, self.timeout, self.retry = api_key, timeout, retry or RetryPolicy()
        try:
            import tenacity  # noqa: F401
        except ImportError:
            raise ValueError("OpenAI-compatible judges retry with the tenacity package: pip install tenacity (or "
                             "the project's 'eval' extra)") from None
        self.retries = 0
        self._lock = threading.Lock()

    def _once(self, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.endpoint, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read().decode())
        except urllib.error.HTTPError as e:
            err = _Transient if e.code in RETRY_STATUS else RuntimeError
            raise err(f"judge endpoint {self.endpoint} answered HTTP {e.code}: {e.read()[:300]!r}") from e
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:  # refused, reset, timed out
            raise _Transient(f"judge endpoint {self.endpoint} unreachable: {getattr(e, 'reason', e)}") from e

    def _count(self, _state: Any) -> None:
        with self._lock:
            self.retries += 1

    def post(self, body: dict[str, Any]) -> dict[str, Any]:
        """The endpoint's JSON answer; RuntimeError naming the endpoint once the retries are used up."""
        import tenacity

        policy = self.retry
        try:
            for attempt in tenacity.Retrying(
                    retry=tenacity.retry_if_exception_type(_Transient),
                    wait=tenacity.wait_exponential(multiplier=policy.initial, max=policy.max_wait)
                    + tenacity.wait_random(0, policy.initial),
                    stop=tenacity.stop_after_attempt(policy.attempts), before_sleep=self._count, reraise=True):
                with attempt:
                    return self._once(body)
        except _Transient as err:
            raise RuntimeError(f"{err} (gave up after {policy.attempts} attempts)") from err
        raise AssertionError("unreachable")  # tenacity either returns or raises


class OpenAIJudge(TextJudge):
    """An OpenAI-compatible ``/chat/completions`` endpoint (vLLM, TGI, ...). ``url``: the API base, e.g.
    ``http://host:8000/v1``. Requests in a batch run concurrently (``batch_size`` threads); temperature 0."""

    name = "openai"

    def __init__(self, url: str, model: str = OPENAI_DEFAULT, mode: str = "cot", batch_size: int = 16,
                 max_tokens: int | None = None, api_key: str | None = None, timeout: float = 300.0,
                 retry: RetryPolicy | None = None):
        super().__init__(mode, batch_size)
        self.client = ChatClient(url, api_key, timeout, retry)
        self.endpoint, self.model = self.client.endpoint, model
        self.max_tokens = max_tokens or (1024 if mode == "cot" else 8)
        self.identity = judge_identity("openai", model, mode)

    @property
    def counts(self) -> dict[str, int]:
        """``retries``: transient failures retried so far (reported in summary.json)."""
        return {"retries": self.client.retries}

    def _one(self, image: Image.Image, prompt: str) -> str:
        body = {"model": self.model, "temperature": 0.0, "max_tokens": self.max_tokens,
                "messages": image_message(image, prompt)}
        payload = self.client.post(body)
        try:
            return str(payload["choices"][0]["message"]["content"] or "").strip()
        except (KeyError, IndexError, TypeError) as e:
            raise RuntimeError(f"judge endpoint {self.endpoint} sent no choices[0].message.content: "
                               f"{str(payload)[:300]}") from e

    def generate(self, images: list[Image.Image], prompts: list[str]) -> list[str]:
        with ThreadPoolExecutor(max_workers=max(1, min(self.batch_size, len(prompts)))) as pool:
            return list(pool.map(self._one, images, prompts))


JUDGES: dict[str, Callable[..., Judge]] = {"oracle": OracleJudge, "hf": HFJudge, "openai": OpenAIJudge}


def make_judge(name: str, **kwargs: Any) -> Judge:
    """A judge by registry name (``JUDGES``: oracle, hf, openai) with its constructor's keyword arguments."""
    if name not in JUDGES:
        raise ValueError(f"unknown judge {name!r}; valid: {tuple(JUDGES)}")
    return JUDGES[name](**kwargs)
