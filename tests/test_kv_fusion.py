"""Layerwise KV fusion on the encoder's own keys and values (paper Sec. 2.1): what the DiT blocks receive is the
frozen encoder's per-layer K/V, the attention over them is plain concat-then-softmax, padding never matters,
grouped KV heads work, and a DiT of the wrong shape is refused at config load naming the key."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from experiments.config import load_experiment
from models.blocks import Attention
from models.conditioning import build_conditioner
from models.dit import DiT
from models.encoders import ENCODER_PRESETS, Prompt, build_encoder
from models.encoders.kv import attention_shape

PROMPTS = ["a photo of a red circle", "two blue squares left of a green triangle ."]


def image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-vlm-random"])
def encoder(request):
    enc = build_encoder(request.param)
    enc.set_features("kv")
    return enc


def reference_kv(enc, input_ids: torch.Tensor, mask: torch.Tensor, **vision) -> list[tuple[torch.Tensor, ...]]:
    """Per layer (k, v), each (B, kv_heads, L, head_dim), recomputed without any KV cache: the input of block i
    (a pre-hook), its input RMSNorm, k/v projections and the model's RoPE at positions 0..L-1."""
    inputs: dict[int, torch.Tensor] = {}
    hooks = [blk.register_forward_pre_hook(
        lambda m, args, kwargs, i=i: inputs.__setitem__(i, args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True) for i, blk in enumerate(enc._blocks)]
    base = enc.model.base_model
    with torch.no_grad():
        try:
            base(input_ids=input_ids, attention_mask=mask.long(), use_cache=False, **vision)
        finally:
            for h in hooks:
                h.remove()
        lm = getattr(base, "language_model", base)
        shape = attention_shape(enc.model)
        b, length = input_ids.shape
        out = []
        for i, blk in enumerate(enc._blocks):
            x = blk.input_layernorm(inputs[i])
            k = blk.self_attn.k_proj(x).view(b, length, shape.kv_heads, shape.head_dim).transpose(1, 2)
            v = blk.self_attn.v_proj(x).view(b, length, shape.kv_heads, shape.head_dim).transpose(1, 2)
            cos, sin = lm.rotary_emb(x, torch.arange(length)[None])
            _, k = apply_rotary_pos_emb(k, k, cos, sin)
            out.append((k.float(), v.float()))
    return out


def kv_dit(enc, seed: int = 0) -> tuple[torch.nn.Module, DiT]:
    """KV fusion (encoder source) + a DiT shaped like the encoder, every zero-init weight randomised."""
    shape = attention_shape(enc.model)
    torch.manual_seed(seed)
    cond = build_conditioner("kv_fusion", enc_dim=enc.feature_size, num_layers=len(enc.layer_ids),
                             dit_dim=shape.hidden, dit_depth=shape.layers, kv_source="encoder")
    dit = DiT(in_channels=3, image_size=8, patch=4, dim=shape.hidden, depth=shape.layers, heads=shape.heads,
              kv_context=cond.kv_context, kv_heads=shape.kv_heads, head_dim=shape.head_dim)
    with torch.no_grad():
        for p in dit.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.1)
    return cond.eval(), dit.eval()


def received_kv(dit: DiT, run) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The (k, v, mask) each DiT block's attention is handed as extra keys/values during ``run()``."""
    got: list = [None] * len(dit.blocks)
    hooks = [blk.attn.register_forward_pre_hook(
        lambda m, args, kwargs, i=i: got.__setitem__(i, kwargs["extra_kv"]), with_kwargs=True)
        for i, blk in enumerate(dit.blocks)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return got


def test_preset_attention_shapes_match_the_built_models() -> None:
    """The table config load checks against is the shape of the model each tiny preset builds."""
    for name, preset in ENCODER_PRESETS.items():
        if name.startswith("tiny-") and name != "tiny-vlm":  # tiny-vlm = tiny-vlm-random's architecture, pretrained
            enc = build_encoder(name)
            if preset.attention is None:
                with pytest.raises(ValueError, match="no KV cache"):
                    enc.set_features("kv")
            else:
                assert attention_shape(enc.model) == preset.attention, name
    assert ENCODER_PRESETS["tiny-vlm"].attention == ENCODER_PRESETS["tiny-vlm-random"].attention


def test_dit_blocks_receive_the_encoders_own_keys_and_values(encoder) -> None:
    prompts = [PROMPTS[0], Prompt(PROMPTS[1], (image(),)) if encoder.vision else PROMPTS[1]]
    out = encoder(prompts)
    shape = attention_shape(encoder.model)
    assert shape.heads > shape.kv_heads  # both tiny encoders use grouped-query attention
    assert out.features.shape[2:] == (shape.layers, 2 * shape.kv_heads * shape.head_dim)
    assert out.layer_ids == tuple(range(shape.layers))
    rows = [encoder._row(encoder._prompts([p])[0], i) for i, p in enumerate(prompts)]
    ids, mask, vision = encoder._pad(rows)
    ref = reference_kv(encoder, ids, mask, **vision)
    cond, dit = kv_dit(encoder)
    x, s = torch.randn(2, 3, 8, 8), torch.tensor([0.2, 0.7])
    got = received_kv(dit, lambda: dit(x, s, cond(out.features, out.mask)))
    for i, (k, v, kmask) in enumerate(got):
        assert k.shape == (2, shape.kv_heads, out.mask.shape[1], shape.head_dim)
        assert torch.equal(kmask, out.mask)
        for b in range(2):
            pos = out.positions[b][out.mask[b]]
            n = len(pos)
            torch.testing.assert_close(k[b, :, :n], ref[i][0][b, :, pos], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(v[b, :, :n], ref[i][1][b, :, pos], atol=1e-5, rtol=1e-4)
    # the keys are rotated: the same token's key differs with its position, so RoPE was applied (not raw k_proj)
    assert not torch.allclose(ref[0][0][0, :, 1], ref[0][0][0, :, 2])


def test_attention_equals_naive_concat_then_softmax() -> None:
    """GQA (4 query / 2 KV heads), head_dim != dim / heads, a padded own mask and a padded extra mask."""
    torch.manual_seed(0)
    dim, heads, kv_heads, hd = 24, 4, 2, 8
    attn = Attention(dim, heads, qk_norm=True, kv_heads=kv_heads, head_dim=hd)
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    b, s, t = 2, 5, 3
    x = torch.randn(b, s, dim)
    own = torch.tensor([[True] * 5, [True, True, True, False, False]])
    ek, ev = torch.randn(b, kv_heads, t, hd), torch.randn(b, kv_heads, t, hd)
    emask = torch.tensor([[True, True, True], [True, False, False]])
    out = attn(x, own, extra_kv=(ek, ev, emask))

    w, bias = attn.qkv.weight, attn.qkv.bias
    qkv = x @ w.T + bias
    q, k, v = qkv[..., : heads * hd], qkv[..., heads * hd: (heads + kv_heads) * hd], qkv[..., (heads + kv_heads) * hd:]

    def rms(z, weight):
        return z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

    ref = torch.zeros(b, s, heads * hd)
    for i in range(b):
        keep = torch.cat([own[i], emask[i]])
        for h in range(heads):
            g = h // (heads // kv_heads)  # query head h reads KV head g (HF repeat_kv grouping)
            qh = rms(q[i, :, h * hd:(h + 1) * hd], attn.q_norm.weight)
            kh = torch.cat([rms(k[i, :, g * hd:(g + 1) * hd], attn.k_norm.weight), ek[i, g]])
            vh = torch.cat([v[i, :, g * hd:(g + 1) * hd], ev[i, g]])
            scores = (qh @ kh.T / math.sqrt(hd)).masked_fill(~keep, float("-inf"))
            ref[i, :, h * hd:(h + 1) * hd] = torch.softmax(scores, -1) @ vh
    ref = ref @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_padding_never_changes_keys_values_or_the_image(encoder) -> None:
    cond, dit = kv_dit(encoder, seed=1)
    alone = encoder([PROMPTS[0]])
    padded = encoder([PROMPTS[0], PROMPTS[1] + " and a big red square below the blue square ."])
    n = int(alone.mask.sum())
    assert padded.mask.shape[1] > n
    torch.testing.assert_close(padded.features[0, :n], alone.features[0, :n], atol=1e-5, rtol=1e-5)
    assert not padded.features[0, n:].any()  # padded lanes are exactly 0
    x, s = torch.randn(1, 3, 8, 8), torch.tensor([0.4])
    with torch.no_grad():
        v1 = dit(x, s, cond(alone.features, alone.mask))
        v2 = dit(torch.cat([x, x]), torch.cat([s, s]), cond(padded.features, padded.mask))[:1]
    torch.testing.assert_close(v1, v2, atol=1e-5, rtol=1e-4)
    assert v1.abs().sum() > 0
    with torch.no_grad():  # and the condition does reach the image
        v3 = dit(x, s, cond(encoder([PROMPTS[1]]).features, encoder([PROMPTS[1]]).mask))
    assert not torch.allclose(v1, v3)


def test_a_dit_that_does_not_match_the_encoder_is_refused(encoder) -> None:
    shape = attention_shape(encoder.model)
    cond = build_conditioner("kv_fusion", enc_dim=encoder.feature_size, num_layers=shape.layers,
                             dit_dim=shape.hidden, dit_depth=shape.layers, kv_source="encoder")
    dit = DiT(in_channels=3, image_size=8, patch=4, dim=shape.hidden, depth=shape.layers, heads=shape.heads,
              kv_context="encoder")  # kv_heads left at heads: twice the encoder's KV width
    out = encoder([PROMPTS[0]])
    with pytest.raises(ValueError, match="its heads must be the encoder's"):
        dit(torch.randn(1, 3, 8, 8), torch.tensor([0.5]), cond(out.features, out.mask))


@pytest.mark.parametrize("sets,key", [(["dit.dim=96"], "dit.dim=96 (needs 192)"),
                                      (["dit.kv_heads=6"], "dit.kv_heads=6 (needs 2)"),
                                      (["dit.depth=3"], "dit.depth=3 (needs 4)"),
                                      (["encoder.preset=tiny-t5"], "tiny-t5' has none")])
def test_config_load_names_the_dit_key_that_does_not_match(sets: list[str], key: str) -> None:
    with pytest.raises(ValueError, match="kv_fusion") as err:
        load_experiment("conditioning_candidates", smoke=True, sets=sets)
    assert key in str(err.value)


def test_both_kv_fusion_variants_in_the_sweep() -> None:
    _, runs = load_experiment("kv_fusion_source", smoke=True)
    by = {r.name: r.config for r in runs}
    main = {r.name: r for r in load_experiment("conditioning_candidates", smoke=True)[1]}
    assert next(r for r in runs if r.name == "kv_fusion").dirname == main["kv_fusion"].dirname  # one config
    assert by["kv_fusion"]["conditioner"]["kv_source"] == "encoder"
    assert by["kv_fusion_hidden"]["conditioner"]["kv_source"] == "hidden"
    tiny = ENCODER_PRESETS[by["kv_fusion"]["encoder"]["preset"]].attention
    dit = by["kv_fusion"]["dit"]
    assert (dit["depth"], dit["dim"], dit["heads"], dit["kv_heads"]) == (tiny.layers, tiny.hidden, tiny.heads,
                                                                          tiny.kv_heads)
    _, paper = load_experiment("conditioning_candidates", paper=True,
                               sets=["data.hf.path=parquet", "data.hf.data_files=/data/x.parquet"])
    llama = {r.name: r.config for r in paper}["kv_fusion"]
    assert llama["encoder"]["preset"] == "llama-3.1-8b"
    assert {k: llama["dit"][k] for k in ("depth", "dim", "heads", "kv_heads")} == \
        {"depth": 32, "dim": 4096, "heads": 32, "kv_heads": 8}
