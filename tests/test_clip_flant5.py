"""CLIP-FlanT5 on a tiny random CLIP + T5: the score equals a hand-spliced teacher-forced computation, batching is
invisible (and the original's batch-mask quirk is reproduced on request), original checkpoint keys load, a missing
checkpoint says how to point at a local copy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evals.clip_flant5 import (
    IMAGE_TOKEN_INDEX,
    SYSTEM_MSG,
    CLIPFlanT5,
    CLIPFlanT5Score,
    expand_to_square,
    load_clip_flant5,
    load_original_state_dict,
    map_original_key,
)
from evals.vqascore import make_scorer

WORDS = ["<pad>", "</s>", "<unk>", "Yes", "No", "USER", ":", "ASSISTANT", "Does", "this", "figure", "show", '"', '"?',
         "Please", "answer", "yes", "or", "no", ".", "a", "red", "circle", "two", "blue", "squares", "left", "of",
         "green", "triangle", *SYSTEM_MSG.replace(".", " ").replace("'", " ").replace(",", " ").split()]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(WORDS))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])  # as T5
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_model(seed: int) -> CLIPFlanT5:
    from transformers import CLIPVisionConfig, T5Config

    vision = CLIPVisionConfig(image_size=56, patch_size=14, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                              num_attention_heads=2)
    t5 = T5Config(vocab_size=len(dict.fromkeys(WORDS)), d_model=16, d_ff=32, num_layers=2, num_heads=2, d_kv=8,
                  feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                  tie_word_embeddings=False)
    torch.manual_seed(seed)
    return CLIPFlanT5.from_configs(vision, t5).eval()


def tiny_processor():
    from evals.clip_flant5 import image_processor_class

    return image_processor_class()(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})


def test_the_image_processor_resizes_through_pil_as_the_peer_does() -> None:
    """t2v_metrics (transformers 4.x) resizes with PIL bicubic, centre-crops, rescales and normalises: by hand here.
    transformers 5's default CLIPImageProcessor resizes through torchvision and misses by up to one 8-bit level."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (30, 47, 3), dtype=np.uint8))  # 47 wide, 30 high
    got = tiny_processor()(images=[image], return_tensors="pt")["pixel_values"][0]
    w = int(47 * 56 / 30)  # shortest edge to 56, the long side scaled and truncated (87)
    resized = np.asarray(image.resize((w, 56), Image.Resampling.BICUBIC), dtype=np.float64)
    left = (w - 56) // 2
    crop = resized[:, left: left + 56] / 255.0
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    want = torch.tensor(((crop - mean) / std).transpose(2, 0, 1), dtype=torch.float32)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    from transformers import CLIPImageProcessor

    if CLIPImageProcessor is not type(tiny_processor()):  # transformers 5: the torchvision one would not match
        other = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
        assert (other(images=[image], return_tensors="pt")["pixel_values"][0] - want).abs().max() > 1e-3


def scorer(model: CLIPFlanT5, **kw) -> CLIPFlanT5Score:
    return CLIPFlanT5Score(model=model, tokenizer=tiny_tokenizer(), image_processor=tiny_processor(), **kw)


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (12, 20, 3), dtype=np.uint8)) for _ in range(n)]  # not square


TEXTS = ["a red circle", "two blue squares left of a green triangle", "a circle", "two green squares"]


def direct_score(model: CLIPFlanT5, image: Image.Image, text: str, keep: int | None = None) -> float:
    """By hand: pad with the CLIP mean colour, penultimate CLIP layer without CLS, projector, splice between the two
    separately tokenized chunks, then sqrt(P(Yes) * P(</s> | Yes)) from two decoder steps. ``keep``: only the first
    ``keep`` encoder positions (what a truncated attention mask leaves)."""
    tok, proc = tiny_tokenizer(), tiny_processor()
    square = Image.new("RGB", (20, 20), (122, 116, 104))  # int(255 * OpenAI CLIP mean)
    square.paste(image, (0, 4))
    with torch.no_grad():
        hidden = model.vision(proc(images=[square], return_tensors="pt")["pixel_values"],
                              output_hidden_states=True).hidden_states
        img = model.projector(hidden[len(hidden) - 2][0, 1:])
        before = tok(SYSTEM_MSG + " USER: ")["input_ids"]
        after = tok(f'\nDoes this figure show "{text}"? Please answer yes or no. ASSISTANT: ')["input_ids"]
        assert before[-1] == 1 and after[-1] == 1  # each chunk ends with </s>, as t5_tokenizer_image_token
        emb = model.t5.shared
        seq = torch.cat([emb(torch.tensor(before)), img, emb(torch.tensor(after))])[None, :keep]
        yes = tok.convert_tokens_to_ids("Yes")
        step0 = model.t5(inputs_embeds=seq, decoder_input_ids=torch.tensor([[0]])).logits[0, -1]
        step1 = model.t5(inputs_embeds=seq, decoder_input_ids=torch.tensor([[0, yes]])).logits[0, -1]
    return float((step0.softmax(-1)[yes] * step1.softmax(-1)[1]).sqrt())


def test_score_equals_the_hand_spliced_computation() -> None:
    model = tiny_model(0)
    s = scorer(model)
    ims = images(3)
    got = s.score(ims, TEXTS[:3])
    for im, text, g in zip(ims, TEXTS[:3], got, strict=True):
        assert float(g) == pytest.approx(direct_score(model, im, text), rel=1e-5)
    assert len(set(got.tolist())) == 3 and ((got > 0) & (got < 1)).all()
    assert s.name == "clip-flant5-xxl"
    padded = expand_to_square(ims[0], s.fill)
    assert padded.size == (20, 20) and padded.getpixel((0, 0)) == (122, 116, 104)
    assert padded.getpixel((5, 4)) == ims[0].getpixel((5, 0))  # centred vertically


def test_batching_changes_nothing() -> None:
    """Each prompt's mask covers its real tokens, so a score is the same alone and in any batch (a prompt of
    another length beside it included), and equals the direct per-pair computation."""
    model = tiny_model(1)
    ims = images(4)
    one = scorer(model, batch_size=1).score(ims, TEXTS)
    torch.testing.assert_close(scorer(model, batch_size=4).score(ims, TEXTS), one, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(scorer(model, batch_size=3).score(ims, TEXTS), one, rtol=1e-5, atol=1e-7)
    lengths = [len(scorer(model).token_ids(t)) for t in TEXTS]
    assert len(set(lengths)) > 1  # the batches do mix prompt lengths
    for i, text in enumerate(TEXTS):
        assert float(one[i]) == pytest.approx(direct_score(model, ims[i], text), rel=1e-5)


def original_state_dict(model: CLIPFlanT5) -> dict[str, torch.Tensor]:
    """``model``'s weights under CLIPT5ForConditionalGeneration's key names (transformers-4 CLIP keys, with the
    ``vision_model.`` level; tied T5 aliases left out as a safetensors save does; the ``embed_tokens`` alias in)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("vision."):
            out["vision_tower.vision_tower.vision_model." + k[len("vision."):].removeprefix("vision_model.")] = v
        elif k.startswith("projector."):
            out["mm_projector." + k[len("projector."):]] = v
        elif k not in ("t5.encoder.embed_tokens.weight", "t5.decoder.embed_tokens.weight"):
            out[k[len("t5."):]] = v
    out["embed_tokens.weight"] = out["shared.weight"]
    out["vision_tower.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(17)[None]  # old buffer
    return {k: v.detach().clone() for k, v in out.items()}


def untied_source() -> CLIPFlanT5:
    model = tiny_model(2)
    model.t5.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.t5.lm_head.weight))  # FlanT5: untied head
    return model


def test_original_key_names_load_into_the_wrapper() -> None:
    src, dst = untied_source(), tiny_model(3)
    sd = original_state_dict(src)
    assert map_original_key("mm_projector.2.bias") == "projector.2.bias"
    assert map_original_key("encoder.block.1.layer.0.SelfAttention.q.weight") == \
        "t5.encoder.block.1.layer.0.SelfAttention.q.weight"
    assert map_original_key("embed_tokens.weight") is None
    assert map_original_key("vision_tower.vision_tower.vision_model.post_layernorm.weight",
                            set(dst.state_dict())) in dst.state_dict()
    ims = images(2)
    assert not torch.allclose(scorer(dst).score(ims, TEXTS[:2]), scorer(src).score(ims, TEXTS[:2]))
    load_original_state_dict(dst, sd)
    torch.testing.assert_close(scorer(dst).score(ims, TEXTS[:2]), scorer(src).score(ims, TEXTS[:2]))
    assert not torch.equal(dst.t5.lm_head.weight, dst.t5.shared.weight)  # untied, encoder embedding intact
    torch.testing.assert_close(dst.t5.encoder.embed_tokens.weight, src.t5.shared.weight)
    with pytest.raises(ValueError, match="lacks 1 wrapper weights, e.g. \\['projector.2.bias'\\]"):
        load_original_state_dict(tiny_model(4), {k: v for k, v in sd.items() if k != "mm_projector.2.bias"})
    with pytest.raises(ValueError, match="have no place in the wrapper, e.g. \\['mm_projector.9.weight'\\]"):
        load_original_state_dict(tiny_model(4), {**sd, "mm_projector.9.weight": torch.zeros(1)})


def test_load_a_local_checkpoint_folder(tmp_path: Path) -> None:
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig

    src = untied_source()
    ckpt, clip = tmp_path / "clip-flant5-tiny", tmp_path / "clip-tower"
    ckpt.mkdir()
    save_file({k: v.contiguous() for k, v in original_state_dict(src).items() if not k.endswith("position_ids")},
              str(ckpt / "model.safetensors"))
    cfg = src.t5.config.to_dict() | {"tie_word_embeddings": False, "model_type": "t5",
                                     "architectures": ["CLIPT5ForConditionalGeneration"],
                                     "mm_vision_tower": str(clip), "mm_projector_type": "mlp2x_gelu",
                                     "mm_vision_select_layer": -2, "mm_hidden_size": 16}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    tiny_tokenizer().save_pretrained(ckpt)
    CLIPVisionConfig(**{k: v for k, v in src.vision.config.to_dict().items() if k != "model_type"}
                     ).save_pretrained(clip)
    tiny_processor().save_pretrained(clip)
    model, tok, proc = load_clip_flant5(str(ckpt))
    loaded = CLIPFlanT5Score(model=model, tokenizer=tok, image_processor=proc)
    torch.testing.assert_close(loaded.score(images(2), TEXTS[:2]), scorer(src).score(images(2), TEXTS[:2]))


def test_missing_checkpoint_says_how_to_point_at_a_local_copy(tmp_path: Path) -> None:
    from evals import genai_bench as gb

    advice = ("hf download zhiqiulin/clip-flant5-xxl --local-dir A.*google/flan-t5-xxl.*clip-vit-large-patch14-336"
              ".*--judge-model A --judge-tokenizer B --judge-vision-tower C.*HF_HUB_OFFLINE=1.*--judge oracle")
    with pytest.raises(FileNotFoundError, match=advice):
        load_clip_flant5("zhiqiulin/clip-flant5-xxl", cache_dir=str(tmp_path / "hf"), local_files_only=True)
    with pytest.raises(FileNotFoundError, match=advice):
        make_scorer("clip-flant5-xxl", model_id=str(tmp_path / "nowhere"), device="cpu")
    with pytest.raises(FileNotFoundError, match=advice):  # the images exist: the missing weights are the error
        gb.build_scorer(gb.parser().parse_args(["--images", str(tmp_path), "--judge", "clip-flant5-xl",
                                                "--judge-model", str(tmp_path / "nowhere"), "--out", "o"]))
    # the flags the advice names exist and reach the loader
    named = gb.parser().parse_args(["--images", "d", "--judge-model", "A", "--judge-tokenizer", "B",
                                    "--judge-vision-tower", "C", "--out", "o"])
    kwargs = gb.scorer_spec(named)[1]
    assert (kwargs["model_id"], kwargs["tokenizer_id"], kwargs["vision_tower"]) == ("A", "B", "C")
    with pytest.raises(ValueError, match="unknown prompt_style"):
        scorer(tiny_model(0), prompt_style="chat")
    with pytest.raises(ValueError, match="exactly one image placeholder"):
        model = tiny_model(0)
        model.encoder_inputs([[5, 6]], torch.zeros(1, 16, 16))
    assert IMAGE_TOKEN_INDEX == -200
