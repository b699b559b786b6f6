"""OpenAI-compatible judges retry transient failures (429 / 5xx / timeouts) with backoff and count the retries;
permanent errors fail at once; the counts reach summary.json."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from local_http import json_server, user_text
from PIL import Image

from evals.judges import JudgeRequest, OpenAIJudge, RetryPolicy
from evals.vqascore import OpenAIVQAScore

FAST = RetryPolicy(attempts=4, initial=0.01, max_wait=0.05)


def flaky(failures: dict[str, list]):
    """Each question containing a key first gets that key's HTTP failure statuses in order, then a real answer:
    "Answer: yes" (chat) with logprobs for "Yes"."""
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def reply(body: dict) -> tuple[int, object]:
        text = user_text(body)
        with lock:
            n = seen[text] = seen.get(text, 0) + 1
        plan = next((v for k, v in failures.items() if k in text), [])
        if n <= len(plan):
            return plan[n - 1], b"busy"
        return 200, {"choices": [{"message": {"content": "Answer: yes"},
                                  "logprobs": {"content": [{"token": "Yes", "logprob": -0.5,
                                                            "top_logprobs": [{"token": "Yes", "logprob": -0.5}]}]}}]}

    return reply


def requests(*subjects: str) -> list[JudgeRequest]:
    img = Image.new("RGB", (8, 8))
    return [JudgeRequest("i", 0, p, f"Is there a {s}?", img, {}) for p, s in enumerate(subjects, start=1)]


def test_transient_failures_are_retried_and_counted() -> None:
    plan = {"circle": [429, 503], "square": [500], "triangle": [502, 504, 408]}
    with json_server(flaky(plan)) as server:
        judge = OpenAIJudge(server.url, mode="direct", batch_size=3, retry=FAST)
        res = judge.judge(requests("circle", "square", "triangle", "star"))
        assert [r.answer for r in res] == ["yes"] * 4
        assert judge.counts == {"retries": 2 + 1 + 3}
        assert len(server.seen) == 4 + 6  # each question once, plus one request per retry


def test_a_timeout_is_retried(monkeypatch) -> None:
    import urllib.request

    real, calls = urllib.request.urlopen, []

    def first_times_out(req, timeout=None):
        calls.append(timeout)
        if len(calls) == 1:
            raise TimeoutError("The read operation timed out")  # what urlopen raises when the reply is late
        return real(req, timeout=timeout)

    with json_server(flaky({})) as server:
        monkeypatch.setattr(urllib.request, "urlopen", first_times_out)
        judge = OpenAIJudge(server.url, mode="direct", timeout=7.0, retry=FAST)
        assert judge.judge(requests("circle"))[0].answer == "yes"
    assert judge.counts == {"retries": 1} and calls == [7.0, 7.0]


def test_permanent_errors_and_exhausted_retries_fail_with_the_endpoint_named() -> None:
    with json_server(flaky({"circle": [400], "square": [503] * 10})) as server:
        judge = OpenAIJudge(server.url, mode="direct", retry=FAST)
        with pytest.raises(RuntimeError, match="answered HTTP 400"):
            judge.judge(requests("circle"))
        assert judge.counts["retries"] == 0 and len(server.seen) == 1  # a 400 is not retried
        with pytest.raises(RuntimeError, match="HTTP 503.*gave up after 4 attempts"):
            judge.judge(requests("square"))
        assert judge.counts["retries"] == 3 and len(server.seen) == 1 + 4
    with pytest.raises(RuntimeError, match="unreachable.*gave up after 2 attempts"):  # nothing listens
        OpenAIJudge("http://127.0.0.1:9/v1", retry=RetryPolicy(2, 0.01, 0.02)).judge(requests("x"))


def test_vqascore_client_counts_retries_into_results(tmp_path: Path) -> None:
    import json

    from evals import genai_bench

    data, images = tmp_path / "data", tmp_path / "images"
    data.mkdir()
    (data / "genai_image.json").write_text(json.dumps({f"{i:05d}": {"prompt": f"thing {i}"} for i in range(3)}))
    (data / "genai_skills.json").write_text(json.dumps({"basic": [0, 1], "advanced": [2]}))
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(images / f"{i:05d}.png")
    with json_server(flaky({"thing 1": [429, 429]})) as server:
        scorer = OpenAIVQAScore(server.url, "served", batch_size=3, retry=FAST)
        results = genai_bench.run(images, scorer, tmp_path / "out", data, n_resamples=10, progress=False)
    assert results["counts"]["retries"] == 2 and results["counts"]["answer_not_in_top_k"] == 0
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["counts"]["retries"] == 2 and saved["all"]["mean"] == pytest.approx(2.718281828 ** -0.5)
