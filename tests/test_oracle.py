"""The oracle encoder (the positive control): every caption token is exactly one-hot word + one-hot position."""

from __future__ import annotations

import pytest
import torch

from experiments.config import load_experiment
from models.encoders import build_encoder
from models.encoders.oracle import ORACLE_POSITIONS, OneHotCaptionModel
from models.tokenizer import shapes_tokenizer
from world.vocab import ALL_TOKENS


def test_oracle_features_are_the_one_hot_words_and_positions_of_the_caption() -> None:
    prompts = ["a photo of a red circle", "a photo of two blue squares left of a green triangle"]
    enc = build_encoder("oracle")
    out = enc(prompts)
    v = len(ALL_TOKENS)
    assert out.features.shape[2:] == (1, v + ORACLE_POSITIONS)
    tok = shapes_tokenizer()
    for b, text in enumerate(prompts):
        ids = out.token_ids[b][out.mask[b].bool()] if out.token_ids is not None else None
        words = tok(text, add_special_tokens=False).input_ids
        n = int(out.mask[b].sum())
        feats = out.features[b, :n, 0]
        # hand-built: row i has a 1 at its word id and a 1 at v + its position in the encoder's input
        word_ids = feats[:, :v].argmax(-1)
        assert torch.equal(feats[:, :v].sum(-1), torch.ones(n)) and torch.equal(feats[:, v:].sum(-1), torch.ones(n))
        assert word_ids.tolist() == words  # every caption word, in order (the oracle has no template)
        positions = feats[:, v:].argmax(-1)
        assert positions.tolist() == sorted(positions.tolist()) and len(set(positions.tolist())) == n
        if ids is not None:
            assert word_ids.tolist() == ids.tolist()
        assert torch.equal(out.features[b, n:], torch.zeros_like(out.features[b, n:]))  # padding is exactly 0
    # two different colours differ, the same caption twice is identical
    a, b = enc(["a photo of a red circle", "a photo of a blue circle"]).features
    assert not torch.equal(a, b)


def test_oracle_refuses_captions_longer_than_its_positions() -> None:
    model = OneHotCaptionModel(vocab_size=5, positions=4)
    assert model(torch.tensor([[1, 2, 3, 4]])).last_hidden_state.shape == (1, 4, 9)
    with pytest.raises(ValueError, match="at most 4 tokens"):
        model(torch.tensor([[1, 2, 3, 4, 0]]))


def test_the_oracle_is_a_run_of_the_tiny_sweep_and_dropped_from_the_paper_variant() -> None:
    tiny = {r.name: r for r in load_experiment("conditioning_candidates")[1]}
    paper = {r.name for r in load_experiment("conditioning_candidates", paper=True)[1]}
    assert tiny["oracle"].config["encoder"]["preset"] == "oracle"
    assert "oracle" not in paper and {"lap", "last_layer"} <= paper
