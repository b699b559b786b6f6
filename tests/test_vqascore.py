"""VQAScore: the HF path equals a direct softmax, batching changes nothing, CLIP-FlanT5's geometric mean, oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from local_http import json_server, user_text
from PIL import Image

from evals.tiny_models import tiny_gemma3
from evals.vqascore import HFVQAScore, OracleVQAScore, make_scorer
from evals.vqascore_base import seq2seq_answer_score


@pytest.fixture(scope="module")
def gemma():
    return tiny_gemma3()


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def test_hf_score_is_the_softmax_of_raw_logits(gemma) -> None:
    model, proc = gemma
    scorer = HFVQAScore(model=model, processor=proc, answer="yes", question="is there a {} ?")
    ims, texts = images(3), ["red circle", "blue square left of a green triangle", "circle"]
    got = scorer.score(ims, texts)
    yes = proc.tokenizer.convert_tokens_to_ids("yes")
    for im, text, g in zip(ims, texts, got, strict=True):
        msg = [[{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text",
                                                                             "text": f"is there a {text} ?"}]}]]
        inputs = proc.apply_chat_template(msg, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1].float()
        assert float(g) == pytest.approx(float(torch.softmax(logits, -1)[yes]), rel=1e-5)
    assert ((got > 0) & (got < 1)).all()
    # batching (left padding of prompts of different lengths) changes no score
    single = HFVQAScore(model=model, processor=proc, answer="yes", question="is there a {} ?", batch_size=1)
    torch.testing.assert_close(single.score(ims, texts), got, rtol=1e-5, atol=1e-7)


def test_hf_multi_token_answer_is_a_geometric_mean(gemma) -> None:
    model, proc = gemma
    two = HFVQAScore(model=model, processor=proc, answer="yes no", question="is there a {} ?")
    first = HFVQAScore(model=model, processor=proc, answer="yes", question="is there a {} ?")
    im, text = images(1), ["circle"]
    p_yes = float(first.score(im, text)[0])
    msg = [[{"role": "user", "content": [{"type": "image", "image": im[0]}, {"type": "text",
                                                                            "text": "is there a circle ?"}]}]]
    inputs = proc.apply_chat_template(msg, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="pt")
    yes, no = proc.tokenizer.convert_tokens_to_ids(["yes", "no"])
    ids = torch.cat([inputs["input_ids"], torch.tensor([[yes]])], 1)
    extra = {"token_type_ids": torch.cat([inputs["token_type_ids"], torch.zeros(1, 1, dtype=torch.long)], 1)}
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
                       **extra).logits[0, -1]
    p_no = float(torch.softmax(logits.float(), -1)[no])
    assert float(two.score(im, text)[0]) == pytest.approx((p_yes * p_no) ** 0.5, rel=1e-5)


def test_clip_flant5_formula_is_the_geometric_mean_with_eos() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    words = ["<pad>", "</s>", "<unk>", "Yes", "No", "does", "this", "figure", "show", "a", "red", "circle", "?"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])  # as T5
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=len(words), d_model=32, d_ff=64, num_layers=2,
                                                num_heads=2, d_kv=16, decoder_start_token_id=0, pad_token_id=0,
                                                eos_token_id=1)).eval()
    enc = tok(["does this figure show a red circle ?", "does this figure show a circle ?"], return_tensors="pt",
              padding=True)
    score = seq2seq_answer_score(model, tok, dict(enc), "Yes")
    assert tok("Yes")["input_ids"] == [3, 1]  # the labels are [Yes, </s>]
    for b in range(2):
        one = {k: v[b: b + 1] for k, v in enc.items()}
        with torch.no_grad():
            step0 = model(**one, decoder_input_ids=torch.tensor([[0]])).logits[0, -1]
            step1 = model(**one, decoder_input_ids=torch.tensor([[0, 3]])).logits[0, -1]
        p_yes, p_eos = torch.softmax(step0, -1)[3].item(), torch.softmax(step1, -1)[1].item()
        assert score[b].item() == pytest.approx((p_yes * p_eos) ** 0.5, rel=1e-5)
        assert score[b].item() != pytest.approx(p_yes, rel=1e-3)  # not P(Yes) itself


def test_clip_flant5_softmax_runs_over_the_tokenizers_ids_not_the_padded_head() -> None:
    """FlanT5's output head has more rows (32128) than its tokenizer has ids (32100); t2v_metrics resizes the model
    to the tokenizer, so its probabilities are a softmax over the tokenizer's ids. A head padded by 8 rows here."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    words = ["<pad>", "</s>", "<unk>", "Yes", "No", "a", "red", "circle"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(1)
    model = T5ForConditionalGeneration(T5Config(vocab_size=len(words) + 8, d_model=32, d_ff=64, num_layers=2,
                                                num_heads=2, d_kv=16, decoder_start_token_id=0, pad_token_id=0,
                                                eos_token_id=1, tie_word_embeddings=False)).eval()
    enc = dict(tok(["a red circle"], return_tensors="pt"))
    with torch.no_grad():
        steps = [model(**enc, decoder_input_ids=torch.tensor([ids])).logits[0, -1] for ids in ([0], [0, 3])]
    p_in = [torch.softmax(s[: len(words)], -1)[t].item() for s, t in zip(steps, (3, 1), strict=True)]
    p_all = [torch.softmax(s, -1)[t].item() for s, t in zip(steps, (3, 1), strict=True)]
    score = seq2seq_answer_score(model, tok, enc, "Yes")[0].item()
    assert score == pytest.approx((p_in[0] * p_in[1]) ** 0.5, rel=1e-5)
    assert score != pytest.approx((p_all[0] * p_all[1]) ** 0.5, rel=1e-3)  # the padded rows would matter


def test_oracle_and_bad_input() -> None:
    from world.prompts import sample_prompt, scene_for_prompt
    from world.scene import render

    rng = np.random.default_rng(3)
    meta = sample_prompt(rng, "colors")
    good = Image.fromarray(render(scene_for_prompt(meta, rng)))
    blank = Image.new("RGB", (32, 32), (128, 128, 128))
    oracle = make_scorer("oracle", metadata={meta["prompt"]: meta})
    assert oracle.score([good, blank], [meta["prompt"]] * 2).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="no shapes-world metadata"):
        oracle.score([good], ["a photo of a dog"])
    with pytest.raises(ValueError, match="2 images and 1 texts"):
        oracle.score([good, blank], [meta["prompt"]])
    with pytest.raises(ValueError, match="unknown VQAScore backend .clip.; valid: hf, openai, oracle, clip-flant5-xxl, "
                       "clip-flant5-xl"):
        make_scorer("clip")
    assert isinstance(oracle, OracleVQAScore)


def logprob_reply(body: dict) -> tuple[int, dict]:
    """A logprobs endpoint: "Yes" is likely for circles, absent from the top-k otherwise."""
    top = ([{"token": "Yes", "logprob": -0.25}, {"token": "No", "logprob": -1.5}] if "circle" in user_text(body)
           else [{"token": "No", "logprob": -0.1}, {"token": "Maybe", "logprob": -3.0}])
    return 200, {"choices": [{"message": {"content": top[0]["token"]},
                              "logprobs": {"content": [{**top[0], "top_logprobs": top}]}}]}


def test_openai_logprob_backend_against_a_local_server() -> None:
    with json_server(logprob_reply) as server:
        scorer = make_scorer("openai", url=server.url, model="served-vlm")
        got = scorer.score(images(3), ["a red circle", "two squares", "a circle"])
    assert got.tolist() == pytest.approx([math.exp(-0.25), 0.0, math.exp(-0.25)])
    assert scorer.counts == {"answer_not_in_top_k": 1, "retries": 0} and scorer.name == "openai:served-vlm"
    body = server.seen[0]["body"]
    assert body["logprobs"] is True and body["top_logprobs"] == 20 and body["max_tokens"] == 1
    texts = {user_text(r["body"]) for r in server.seen}
    assert 'Does this figure show "two squares"? Please answer yes or no.' in texts
