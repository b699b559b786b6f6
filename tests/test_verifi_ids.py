"""VERIFI conditions on exactly the token ids generation produced, never on its decoded text tokenised again.

An offline byte-level BPE tokenizer (trained here with `tokenizers` on a tiny corpus) and a random tiny Llama: its
greedy rewrites decode to text whose re-encoding is *not* the generated ids, yet the DiT's conditioning ids (the
encoder's kept token ids, through the module's rewrite cache too) are the generated ones, which a direct
``model.generate`` on the same prompt gives independently.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from experiments.config import load_base, merge
from models.encoders import ENCODER_PRESETS, EncoderPreset, FrozenEncoder, VerifiSpec, build_encoder
from models.encoders.rewrites import Rewrite, RewriteCache, tokenizer_fingerprint
from models.module import UniFusionModule
from models.tokenizer import shapes_tokenizer

SPECIAL = ["<pad>", "<s>", "<|user|>", "<|assistant|>", "<|end|>"]
TEMPLATE = "<s><|user|>{}<|end|>"
VERIFI = VerifiSpec(template="<s><|user|>{}<|end|><|assistant|>", stop="<|end|>", max_new_tokens=12)
PROMPT = "a red circle above a blue square"
SEED = 3  # a random tiny Llama (each of the seeds 0-4 tried greedily generates a rewrite that does not round-trip)


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    corpus = ["a red circle above a blue square", "two green triangles left of a yellow circle",
              "a picture of three objects on a plain gray background", "the blue square is below the red circle"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(corpus * 20, trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="<|end|>")


def bpe_llama(seed: int = SEED) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    tok = bpe_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg).eval(), tok


def generated_directly(model, tok) -> list[int]:
    """The greedy rewrite of PROMPT straight from HF ``generate`` (no FrozenEncoder involved)."""
    head = tok([VERIFI.template.format(PROMPT)], add_special_tokens=False, return_tensors="pt")
    stop = tok.convert_tokens_to_ids(VERIFI.stop)
    out = model.generate(**head, max_new_tokens=VERIFI.max_new_tokens, do_sample=False, eos_token_id=stop,
                         pad_token_id=tok.pad_token_id)[0, head["input_ids"].shape[1]:].tolist()
    return out[: out.index(stop)] if stop in out else out


@pytest.fixture(scope="module")
def bpe():
    model, tok = bpe_llama()
    return FrozenEncoder(model, tok, [-1], template=TEMPLATE, verifi=VERIFI, name="bpe-llama"), generated_directly(
        model, tok)


def kept(out, row: int = 0) -> list[int]:
    return out.token_ids[row][out.mask[row]].tolist()


def test_decode_encode_is_not_the_identity_but_conditioning_uses_the_generated_ids(bpe) -> None:
    enc, gen = bpe
    tok = enc.tokenizer
    text = tok.decode(gen, skip_special_tokens=True)
    # the premise: tokenising the decoded rewrite again gives other ids (with or without the joining space)
    assert tok(text, add_special_tokens=False)["input_ids"] != gen
    assert tok(" " + text.strip(), add_special_tokens=False)["input_ids"] != gen
    out = enc([PROMPT], verifi=True)
    assert kept(out) == gen
    rewrite = enc.generate_rewrites([PROMPT])[0]
    assert rewrite.ids == tuple(gen) and rewrite.text == text.strip() == out.rewrites[0]


def test_given_ids_are_used_as_they_are(bpe) -> None:
    enc, _ = bpe
    tok = enc.tokenizer
    canonical = tok(" red circle", add_special_tokens=False)["input_ids"]
    spelled = tok.convert_tokens_to_ids(list("Ġred") + ["Ġcircle"])  # the same text, one byte per token
    assert tok.decode(spelled) == tok.decode(canonical) and spelled != canonical
    out = enc([PROMPT, PROMPT], verifi=True, rewrites=[spelled, canonical])
    assert kept(out, 0) == spelled and kept(out, 1) == canonical
    assert not torch.allclose(out.features[0, :1], out.features[1, :1])  # different ids, different condition


def bpe_module(monkeypatch) -> UniFusionModule:
    """A VERIFI module on the random tiny Llama, registered as preset ``bpe-llama`` for this test."""
    preset = EncoderPreset(builder=lambda seed: bpe_llama(), template=TEMPLATE, layers=(-1,), max_length=64,
                           verifi=VERIFI)
    monkeypatch.setitem(ENCODER_PRESETS, "bpe-llama", preset)
    cfg = merge(load_base(), {"candidate": "last_layer", "encoder": {"preset": "bpe-llama", "layers": [-1],
                                                                     "stride": None, "start": None, "verifi": True},
                              "dit": {"dim": 32, "depth": 2, "heads": 2, "patch": 8}, "conditioner": {"heads": 2}})
    return UniFusionModule(cfg)


def test_module_caches_and_conditions_on_the_generated_ids(monkeypatch) -> None:
    module = bpe_module(monkeypatch)
    gen = generated_directly(*bpe_llama())
    out = module.encode([PROMPT, PROMPT])
    assert kept(out, 0) == kept(out, 1) == gen
    assert len(module._rewrites) == 1
    cached = module._rewrites.get(UniFusionModule._key(module.encoder._prompts([PROMPT])[0]), module.encoder.tokenizer)
    assert cached.ids == tuple(gen)
    # the cache is tied to its tokenizer: another tokenizer's ids mean other tokens
    with pytest.raises(ValueError, match="holds token ids of tokenizer"):
        module._rewrites.get(next(iter(module._rewrites._entries)), shapes_tokenizer())


def test_rewrite_cache_fingerprint() -> None:
    a, b = bpe_tokenizer(), bpe_tokenizer()
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)  # deterministic training, same tokenizer
    b.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)
    cache = RewriteCache(a)
    cache.put("k", Rewrite((5, 6), "x"), a)
    assert cache.missing(["k", "j", "j"]) == ["j"]
    with pytest.raises(ValueError, match="holds token ids of tokenizer"):
        cache.put("j", Rewrite((7,), "y"), b)
    with pytest.raises(ValueError, match="empty rewrite"):
        cache.put("j", Rewrite((), ""), a)
    assert tokenizer_fingerprint(build_encoder("tiny-llama").tokenizer) == tokenizer_fingerprint(shapes_tokenizer())


def test_rewrite_features_come_from_the_generation_and_equal_encoding_it_again(bpe, monkeypatch) -> None:
    """Generating, the encoder keeps the hidden states of the passes that generated (the paper's "same forward
    pass"): no second pass runs, and the features equal those of encoding the same ids again, for rows of different
    lengths in one left-padded batch, rewrites cut at max_new_tokens included."""
    import dataclasses

    enc, _ = bpe

    def no_second_pass(*args, **kwargs):
        raise AssertionError("encoded again")

    prompts = [PROMPT, "two green triangles", "a picture of three objects on a plain gray background"]
    for limit in (VERIFI.max_new_tokens, 2):
        e = FrozenEncoder(enc.model, enc.tokenizer, [0, 1, -1], template=TEMPLATE, name="bpe-llama",
                          verifi=dataclasses.replace(VERIFI, max_new_tokens=limit))
        again = e(prompts, verifi=True, rewrites=[r.ids for r in e.generate_rewrites(prompts)])
        with monkeypatch.context() as m:
            m.setattr(e, "encode_ids", no_second_pass)
            live = e(prompts, verifi=True)
        assert torch.equal(live.mask, again.mask) and torch.equal(live.token_ids, again.token_ids)
        assert live.features.shape[2] == 3 and int(live.mask.sum(1).max()) <= limit
        torch.testing.assert_close(live.features, again.features, atol=1e-5, rtol=1e-5)


def test_module_encodes_new_prompts_in_their_generating_pass_and_caches_the_ids(monkeypatch) -> None:
    """A batch of new distinct prompts: one generation, no second encoding, rewrites cached; the same batch again
    is encoded from the cached ids, with the same features."""
    module = bpe_module(monkeypatch)
    prompts = [PROMPT, "two green triangles"]
    real = module.encoder.encode_ids
    with monkeypatch.context() as m:
        m.setattr(module.encoder, "encode_ids", lambda *a, **k: (_ for _ in ()).throw(AssertionError("again")))
        first = module.encode(prompts)
    assert len(module._rewrites) == 2 and kept(first, 0) == generated_directly(*bpe_llama())
    calls = []
    monkeypatch.setattr(module.encoder, "encode_ids", lambda *a, **k: calls.append(1) or real(*a, **k))
    second = module.encode(prompts)
    assert calls == [1] and torch.equal(first.token_ids, second.token_ids)
    torch.testing.assert_close(first.features, second.features, atol=1e-5, rtol=1e-5)
