"""Images through the VLM, tiles, VERIFI and the zero-shot edit schedule on the tiny InternVL (random init)."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch

from models.encoders import FrozenEncoder, Prompt, build_encoder
from models.tiny_vlm import TILE
from world.scene import render, sample_scene

TOKENS_PER_TILE = (TILE // 2) ** 2 // 4  # 2 px patches, pixel shuffle 0.5


@pytest.fixture(scope="module")
def vlm() -> FrozenEncoder:
    enc = build_encoder("tiny-vlm-random")
    enc.verifi = dataclasses.replace(enc.verifi, max_new_tokens=6)
    return enc


def image(seed: int = 0, size: int = 32) -> np.ndarray:
    return render(sample_scene(np.random.default_rng(seed), size))


def test_template_tokens_dropped_exactly(vlm: FrozenEncoder) -> None:
    text = "a photo of two red circles"
    out = vlm([text, "a square"])
    want = vlm.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert out.token_ids[0][out.mask[0]].tolist() == want  # chat markup before and after the content is gone
    assert out.mask[1].sum() == 2
    ids, _ = vlm.tokenize([text])
    chat = vlm.tokenizer.convert_ids_to_tokens(ids[0].tolist())
    assert chat[:2] == ["<|im_start|>", "user"] and chat[-1] == "<|im_end|>"


@pytest.mark.parametrize("tiles, grid", [(1, 0), (5, 4), (10, 9)])
def test_tiles_count_sets_image_token_count(vlm: FrozenEncoder, tiles: int, grid: int) -> None:
    before = vlm.tiles
    vlm.set_tiles(tiles)
    try:
        out = vlm([Prompt("", (image(),))])
    finally:
        vlm.set_tiles(before)
    n_tiles = grid + 1  # grid tiles + the thumbnail (InternVL adds it only with a grid)
    toks = out.token_ids[0][out.mask[0]]
    ctx = vlm.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert int((toks == ctx).sum()) == n_tiles * TOKENS_PER_TILE
    assert out.mask[0].sum() == n_tiles * TOKENS_PER_TILE + 2  # + <img> </img>


@pytest.mark.parametrize("bad", [0, 2, 11, "5"])
def test_impossible_tiles_rejected(vlm: FrozenEncoder, bad) -> None:
    before = vlm.tiles
    with pytest.raises(ValueError, match=r"tiles=.*use 1 .*3\.\.10"):
        vlm.set_tiles(bad)
    assert vlm.tiles == before == 5  # unchanged; 5 is tiny-vlm's default


def test_image_features_differ_per_image_and_text_is_kept_after(vlm: FrozenEncoder) -> None:
    a, b = vlm([Prompt("make it blue", (image(0),))]), vlm([Prompt("make it blue", (image(1),))])
    n = int(a.mask.sum())
    assert not torch.allclose(a.features[0, : n - 3], b.features[0, : n - 3])
    words = vlm.tokenizer.convert_ids_to_tokens(a.token_ids[0, n - 3: n].tolist())
    assert words == ["make", "it", "blue"]


def test_multi_reference_two_aspect_ratios(vlm: FrozenEncoder) -> None:
    wide = np.full((24, 48, 3), 200, np.uint8)
    tall = np.full((48, 20, 3), 30, np.uint8)
    out = vlm([Prompt("add a red circle .", (wide, tall)), "a circle"])
    toks = vlm.tokenizer.convert_ids_to_tokens(out.token_ids[0][out.mask[0]].tolist())
    assert toks.count("<img>") == 2 and toks.count("</img>") == 2
    assert torch.isfinite(out.features).all()
    assert out.mask[1].sum() == 2  # the text-only row of the same batch is unaffected


def test_padding_and_batch_invariance_with_images(vlm: FrozenEncoder) -> None:
    p = Prompt("remove the red circle .", (image(3),))
    alone = vlm([p])
    mixed = vlm(["a photo of four squares", p])
    n = int(alone.mask.sum())
    torch.testing.assert_close(mixed.features[1, :n], alone.features[0, :n], rtol=1e-4, atol=1e-5)


def test_verifi_conditions_on_exactly_the_generated_positions(vlm: FrozenEncoder) -> None:
    prompts = ["a photo of a red circle", Prompt("make it blue", (image(),))]
    out = vlm(prompts, verifi=True)
    ctx_ids = {vlm.tokenizer.convert_tokens_to_ids(t) for t in ("<img>", "</img>", "<IMG_CONTEXT>")}
    for b, p in enumerate(prompts):
        p = p if isinstance(p, Prompt) else Prompt(p)
        row = vlm._verifi_rows([p], None, 0)[0]
        head_len = len(row.ids) - len(row.rewrite.ids)
        assert row.rewrite.text == out.rewrites[b]
        image_pos = [i for i, t in enumerate(row.ids[:head_len]) if t in ctx_ids]
        want = image_pos + list(range(head_len, len(row.ids)))
        got = out.positions[b][out.mask[b]].tolist()
        assert got == want
        assert all(t not in ctx_ids for t in row.ids[head_len:])
    # the text-only row keeps the rewrite's tokens and nothing of the user's prompt or the chat markup
    gen = out.token_ids[0][out.mask[0]].tolist()
    assert gen == list(vlm.generate_rewrites(prompts[:1])[0].ids)
    assert out.positions[0, 0] > len(vlm.tokenizer("a photo of a red circle")["input_ids"]) + 10


def test_cached_rewrites_equal_generated(vlm: FrozenEncoder) -> None:
    prompts = ["a photo of two squares"]
    live = vlm(prompts, verifi=True)
    ids = [r.ids for r in vlm.generate_rewrites(prompts)]
    cached = vlm(prompts, verifi=True, rewrites=ids)
    torch.testing.assert_close(cached.features, live.features)
    assert torch.equal(cached.positions, live.positions)
    with pytest.raises(ValueError, match="only applies with verifi"):
        vlm(prompts, rewrites=ids)
    with pytest.raises(ValueError, match="token ids generation produced"):  # text would be tokenised again
        vlm(prompts, verifi=True, rewrites=live.rewrites)


def test_bad_inputs(vlm: FrozenEncoder, tmp_path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match=r"prompt 0, image 0: the image failed to decode"):
        vlm([Prompt("x", (str(bad),))])
    with pytest.raises(ValueError, match=r"uint8 \(H, W, 3\)"):
        vlm([Prompt("x", (np.zeros((8, 8), np.uint8),))])
    long = " ".join(["red"] * 600)
    with pytest.raises(ValueError, match=r"over the encoder's limit max_length=512"):
        vlm([long])
    text_only = build_encoder("tiny-llama")
    with pytest.raises(ValueError, match="text-only"):
        text_only([Prompt("x", (image(),))])
    with pytest.raises(ValueError, match="no VERIFI prompt"):
        text_only(["x"], verifi=True)
    with pytest.raises(ValueError, match="takes no images"):
        text_only.set_tiles(5)
    buf = io.BytesIO()
    from PIL import Image

    Image.fromarray(image()).save(buf, format="PNG")
    path = tmp_path / "ok.png"
    path.write_bytes(buf.getvalue())
    assert vlm([Prompt("x", (str(path),))]).mask.sum() > TOKENS_PER_TILE  # a path decodes like an array
