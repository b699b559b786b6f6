"""Reference tests for models/encoders/ and models/tokenizer.py.

The naive reference for every feature check is transformers' own ``output_hidden_states=True`` run of the same
model: "layer i" must be ``hidden_states[i]`` (docs/DESIGN.md §2), the last id the final-normed ``last_hidden_state``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.encoders import (
    ENCODER_PRESETS,
    FrozenEncoder,
    build_encoder,
    encoder_fingerprint,
    select_layers,
)
from models.tokenizer import shapes_tokenizer
from world.vocab import ALL_TOKENS, SPECIAL_TOKENS, WORDS

TOL = 1e-5
# token ids of "a red circle": positions in ALL_TOKENS (checked in test_tokenizer_ids_are_vocab_positions)
A, RED, CIRCLE = (ALL_TOKENS.index(w) for w in ("a", "red", "circle"))
PROMPTS = [
    "a red circle",
    "two blue squares above a green triangle .",
    "a photo of a yellow triangle left of a purple square",
]
# (preset, explicit layer ids spanning embeddings, middle and the final-normed last state)
PRESET_LAYERS = [("tiny-llama", [0, 3, 7, 12]), ("tiny-t5", [0, 1, 3, 6])]


@pytest.fixture(scope="module")
def llama() -> FrozenEncoder:
    return build_encoder("tiny-llama")


def reference_states(enc: FrozenEncoder, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """transformers' own hidden states of the encoder's model: num_layers + 1 tensors (B, L, D)."""
    with torch.no_grad():
        out = enc.model(input_ids=input_ids, attention_mask=mask.long(), output_hidden_states=True)
    assert len(out.hidden_states) == enc.num_layers + 1
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    return out.hidden_states


# ---------------------------------------------------------------------------------------------- select_layers


def naive_stride(num_layers: int, stride: int, start: int) -> tuple[int, ...]:
    return tuple(i for i in range(num_layers + 1) if i >= start and (i - start) % stride == 0)


def test_select_layers_explicit_and_negative() -> None:
    assert select_layers(12, layers=[11, 2, 5]) == (2, 5, 11)  # sorted ascending
    assert select_layers(12, layers=[-1]) == (12,)  # -1 = last, final-normed
    assert select_layers(12, layers=[-13, -2, 3]) == (0, 3, 11)  # Python-style over 13 hidden states
    assert select_layers(12, layers=[0, 12]) == (0, 12)


def test_select_layers_stride_defaults() -> None:
    assert select_layers(12) == (12,)  # nothing given -> last layer only
    assert select_layers(12, stride=3) == (2, 5, 8, 11)  # default start = stride - 1
    assert select_layers(36, stride=3) == tuple(range(2, 36, 3))  # Krea2: 2, 5, ..., 35
    assert select_layers(36, stride=3)[-1] == 35 and len(select_layers(36, stride=3)) == 12
    assert select_layers(12, stride=4, start=0) == (0, 4, 8, 12)
    assert select_layers(12, stride=1) == tuple(range(13))
    assert select_layers(12, stride=12) == (11,)
    assert select_layers(12, stride=5, start=12) == (12,)
    for n in (1, 6, 12, 36):
        for k in range(1, n + 1):
            assert select_layers(n, stride=k) == naive_stride(n, k, k - 1)
            assert select_layers(n, stride=k, start=0) == naive_stride(n, k, 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layers": [13]}, "valid ids are 0..12"),
        ({"layers": [-14]}, "valid ids are 0..12"),
        ({"layers": [12, -1]}, "duplicate"),
        ({"layers": []}, "empty"),
        ({"layers": [1.0]}, "must be ints"),
        ({"layers": [True]}, "must be ints"),
        ({"layers": [1], "stride": 3}, "not both"),
        ({"layers": [1], "start": 0}, "only applies with stride"),
        ({"start": 0}, "give stride too"),
        ({"stride": 0}, "1..12"),
        ({"stride": 13}, "1..12"),
        ({"stride": 3, "start": 13}, "0..12"),
        ({"stride": 3, "start": -1}, "0..12"),
    ],
)
def test_select_layers_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        select_layers(12, **kwargs)


@pytest.mark.parametrize("num_layers", [0, -3, True, 2.0])
def test_select_layers_bad_num_layers(num_layers: object) -> None:
    with pytest.raises(ValueError, match="positive int"):
        select_layers(num_layers)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- features


@pytest.mark.parametrize(("preset", "layers"), PRESET_LAYERS)
def test_features_equal_hf_hidden_states(preset: str, layers: list[int]) -> None:
    enc = build_encoder(preset, layers=layers)
    assert enc.layer_ids == tuple(layers)
    ids, mask = enc.tokenize(PROMPTS)
    ref = reference_states(enc, ids, mask)
    feats = enc.encode_ids(ids, mask)
    assert feats.shape == (len(PROMPTS), ids.shape[1], len(layers), enc.hidden_size)
    assert feats.dtype == torch.float32
    real = mask[:, :, None]
    for j, layer in enumerate(layers):
        torch.testing.assert_close(feats[:, :, j] * real, ref[layer] * real, atol=TOL, rtol=0)
    # the last id is the final-normed last_hidden_state
    torch.testing.assert_close(feats[:, :, -1] * real, ref[-1] * real, atol=TOL, rtol=0)


def test_default_llama_taps_stride_3(llama: FrozenEncoder) -> None:
    assert llama.layer_ids == (2, 5, 8, 11)
    ids, mask = llama.tokenize(PROMPTS)
    ref = reference_states(llama, ids, mask)
    feats = llama.encode_ids(ids, mask)
    for j, layer in enumerate(llama.layer_ids):
        torch.testing.assert_close(feats[:, :, j] * mask[:, :, None], ref[layer] * mask[:, :, None], atol=TOL, rtol=0)


def test_intermediate_layers_are_not_normed() -> None:
    """Layer 12 (last, final-normed) differs from the raw output of block 12; layer 11 is the raw block output."""
    enc = build_encoder("tiny-llama", layers=[11, 12])
    ids, mask = enc.tokenize(PROMPTS[:1])
    raw = {}
    handle = enc.model.layers[-1].register_forward_hook(lambda m, a, o: raw.setdefault("out", o))
    try:
        feats = enc.encode_ids(ids, mask)
    finally:
        handle.remove()
    last_raw = raw["out"][0] if isinstance(raw["out"], tuple) else raw["out"]
    torch.testing.assert_close(feats[:, :, 1], enc.model.norm(last_raw), atol=TOL, rtol=0)
    assert (feats[:, :, 1] - last_raw).abs().max() > 1e-2


def count_block_calls(enc: FrozenEncoder, blocks: nn.ModuleList, final_norm: nn.Module) -> list[int]:
    """Encode a prompt and return how many times each block (and, last, the final norm) completed a forward."""
    calls = [0] * (len(blocks) + 1)
    handles = []
    for i, blk in enumerate(blocks):
        handles.append(blk.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1)))
    handles.append(final_norm.register_forward_hook(lambda m, a, o: calls.__setitem__(-1, calls[-1] + 1)))
    try:
        enc(PROMPTS[:2])
    finally:
        for h in handles:
            h.remove()
    return calls


@pytest.mark.parametrize(
    ("preset", "layers", "blocks_run", "norm_runs"),
    [
        ("tiny-llama", [0], 0, 0),
        ("tiny-llama", [0, 4], 4, 0),
        ("tiny-llama", [2, 5, 8, 11], 11, 0),
        ("tiny-llama", [1, 12], 12, 1),
        ("tiny-t5", [0], 0, 0),
        ("tiny-t5", [2], 2, 0),
        ("tiny-t5", [6], 6, 1),
    ],
)
def test_deeper_blocks_do_not_run(preset: str, layers: list[int], blocks_run: int, norm_runs: int) -> None:
    enc = build_encoder(preset, layers=layers)
    if preset == "tiny-llama":
        blocks, norm = enc.model.layers, enc.model.norm
    else:
        blocks, norm = enc.model.encoder.block, enc.model.encoder.final_layer_norm
    calls = count_block_calls(enc, blocks, norm)
    assert calls[:-1] == [1] * blocks_run + [0] * (len(blocks) - blocks_run)
    assert calls[-1] == norm_runs


# ---------------------------------------------------------------------------------------------- prompting


@pytest.mark.parametrize(("preset", "layers"), PRESET_LAYERS)
def test_template_prefix_dropped(preset: str, layers: list[int]) -> None:
    enc = build_encoder(preset, layers=layers, template="describe : {}")
    bos = int(enc.add_bos)
    assert enc.drop_prefix == 2 + bos  # "describe", ":" (+ BOS for llama)
    ids, mask = enc.tokenize(PROMPTS)
    ref = reference_states(enc, ids, mask)
    out = enc(PROMPTS)
    k = enc.drop_prefix
    assert torch.equal(out.mask, mask[:, k:])
    assert torch.equal(out.token_ids, ids[:, k:])
    real = out.mask[:, :, None]
    for j, layer in enumerate(layers):
        torch.testing.assert_close(out.features[:, :, j] * real, ref[layer][:, k:] * real, atol=TOL, rtol=0)
    # the kept tokens are exactly the prompt's (+ EOS for T5)
    tok = enc.tokenizer
    for row, text in enumerate(PROMPTS):
        want = tok(text, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if enc.add_eos else [])
        assert out.token_ids[row][out.mask[row]].tolist() == want
    # an explicit count equal to the automatic one gives the same output
    explicit = build_encoder(preset, layers=layers, template="describe : {}", drop_prefix=k)
    assert torch.equal(explicit(PROMPTS).features, out.features)


def test_bos_eos_handling() -> None:
    llama = build_encoder("tiny-llama")
    ids, mask = llama.tokenize(["a red circle"])
    assert ids[0].tolist() == [2, A, RED, CIRCLE]  # [BOS] a red circle, no EOS
    assert llama.drop_prefix == 1
    out = llama(["a red circle"])
    assert out.token_ids[0].tolist() == [A, RED, CIRCLE]  # BOS dropped with the prefix

    t5 = build_encoder("tiny-t5")
    ids, _ = t5.tokenize(["a red circle"])
    assert ids[0].tolist() == [A, RED, CIRCLE, 3]  # no BOS, trailing [EOS]
    assert t5.drop_prefix == 0
    assert t5(["a red circle"]).token_ids[0].tolist() == [A, RED, CIRCLE, 3]  # EOS is kept

    plain = build_encoder("tiny-llama", add_bos=False)
    assert plain.tokenize(["a red circle"])[0][0].tolist() == [A, RED, CIRCLE]
    assert plain.drop_prefix == 0
    both = build_encoder("tiny-llama", add_eos=True, template="draw : {}")
    draw, colon = ALL_TOKENS.index("draw"), ALL_TOKENS.index(":")
    assert both.tokenize(["a red circle"])[0][0].tolist() == [2, draw, colon, A, RED, CIRCLE, 3]
    assert both(["a red circle"]).token_ids[0].tolist() == [A, RED, CIRCLE, 3]


@pytest.mark.parametrize(("preset", "layers"), PRESET_LAYERS)
@pytest.mark.parametrize("template", ["{}", "describe : {}"])
def test_padding_invariance(preset: str, layers: list[int], template: str) -> None:
    enc = build_encoder(preset, layers=layers, template=template)
    batch = enc(PROMPTS)
    assert batch.features.shape[:2] == batch.mask.shape
    # padded positions are exactly zero and carry the pad id
    assert torch.all(batch.features[~batch.mask] == 0)
    assert torch.all(batch.token_ids[~batch.mask] == enc.tokenizer.pad_token_id)
    assert (~batch.mask).any()  # the batch really has padding
    for row, text in enumerate(PROMPTS):
        alone = enc([text])
        n = int(alone.mask.sum())
        assert alone.mask.all() and int(batch.mask[row].sum()) == n
        assert batch.mask[row, :n].all()  # right-padded
        torch.testing.assert_close(batch.features[row, :n], alone.features[0], atol=TOL, rtol=0)


def test_unknown_word_encodes_as_unk(llama: FrozenEncoder) -> None:
    out = llama(["a zebra circle"])
    assert out.token_ids[0].tolist() == [A, 1, CIRCLE]


def test_max_length() -> None:
    enc = build_encoder("tiny-llama", max_length=5)
    enc.tokenize(["a red circle and"])  # BOS + 4 words = 5 tokens: at the limit, accepted
    with pytest.raises(ValueError, match="max_length=5"):
        enc.tokenize(["a red circle and square"])  # 6 tokens
    with pytest.raises(ValueError, match="max_length=5"):
        enc(["a red circle and square"])
    with pytest.raises(ValueError, match="max_position_embeddings=256"):
        build_encoder("tiny-llama", max_length=257)
    with pytest.raises(ValueError, match="positive int"):
        build_encoder("tiny-llama", max_length=0)


def test_bad_prompts_and_templates(llama: FrozenEncoder) -> None:
    with pytest.raises(ValueError, match="non-empty list"):
        llama("a red circle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty list"):
        llama([])
    with pytest.raises(ValueError, match=r"prompts\[1\]: a prompt must be a str"):
        llama(["a", 3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="exactly one"):
        build_encoder("tiny-llama", template="no placeholder")
    with pytest.raises(ValueError, match="'auto' or a non-negative int"):
        build_encoder("tiny-llama", drop_prefix=-1)
    templated = build_encoder("tiny-llama", template="describe : {}")
    with pytest.raises(ValueError, match="no tokens left"):
        templated([""])
    # a prompt glued to the prefix changes how it tokenizes ("describer" -> [UNK]): auto dropping refuses
    glued = build_encoder("tiny-llama", template="describe{}")
    with pytest.raises(ValueError, match="explicit drop_prefix"):
        glued(["r circle"])


# ---------------------------------------------------------------------------------------------- frozen, presets


def test_frozen_and_always_eval(llama: FrozenEncoder) -> None:
    assert all(not p.requires_grad for p in llama.parameters())
    assert sum(p.numel() for p in llama.parameters()) > 0
    returned = llama.train()
    assert returned is llama
    assert not llama.training and not any(m.training for m in llama.modules())
    llama.train(True)
    assert not any(m.training for m in llama.modules())


def test_build_encoder_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown encoder preset 'nope'.*tiny-llama.*tiny-t5"):
        build_encoder("nope")
    with pytest.raises(ValueError, match=r"unknown override\(s\) \['colour'\].*template"):
        build_encoder("tiny-llama", colour="red")
    assert {"tiny-llama", "tiny-t5"} <= set(ENCODER_PRESETS)


def test_seed_determinism_and_fingerprint() -> None:
    a, b = build_encoder("tiny-t5", seed=3), build_encoder("tiny-t5", seed=3)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    fp = encoder_fingerprint(a)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fp == encoder_fingerprint(b)
    assert fp != encoder_fingerprint(build_encoder("tiny-t5", seed=4))
    # anything that changes the features changes the key
    assert fp != encoder_fingerprint(build_encoder("tiny-t5", seed=3, layers=[2, 6]))
    assert fp != encoder_fingerprint(build_encoder("tiny-t5", seed=3, template="describe : {}"))
    assert fp != encoder_fingerprint(build_encoder("tiny-t5", seed=3, add_eos=False))


def test_build_does_not_touch_global_rng() -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    expected = torch.rand(4)
    torch.set_rng_state(state)
    build_encoder("tiny-llama", seed=7)
    build_encoder("tiny-t5", seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(4), expected)


# ---------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_ids_are_vocab_positions() -> None:
    tok = shapes_tokenizer()
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3]
    for i, word in enumerate(WORDS, start=len(SPECIAL_TOKENS)):
        ids = tok(word, add_special_tokens=False)["input_ids"]
        assert ids == [i], word
        assert ALL_TOKENS[i] == word and tok.decode(ids) == word
    # the whole vocabulary as one sentence round-trips
    sentence = " ".join(WORDS)
    ids = tok(sentence)["input_ids"]  # add_special_tokens=True: the tokenizer itself still adds none
    assert ids == list(range(len(SPECIAL_TOKENS), len(ALL_TOKENS)))
    assert tok.decode(ids) == sentence


def test_tokenizer_punctuation_case_unknown() -> None:
    tok = shapes_tokenizer()

    def words(text: str) -> list[str]:
        return tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])

    assert words("A red square.") == ["a", "red", "square", "."]
    assert words("Is it RED?") == ["is", "it", "red", "?"]
    assert words("square,circle:triangle") == ["square", ",", "circle", ":", "triangle"]
    assert words("circle's") == ["circle", "'", "[UNK]"]  # "s" alone is not a word of the world
    assert tok("a zebra .", add_special_tokens=False)["input_ids"] == [A, tok.unk_token_id, ALL_TOKENS.index(".")]
    assert tok.unk_token_id == 1
    batch = tok(["a", "a red circle"], padding=True, add_special_tokens=False)
    assert batch["input_ids"] == [[A, 0, 0], [A, RED, CIRCLE]]  # right padding with [PAD] = 0
