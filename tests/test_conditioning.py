"""Conditioning candidates: shapes, padding invariance, null condition, reference checks, LAP analysis hooks."""

from __future__ import annotations

import math

import pytest
import torch

from models.conditioning import CANDIDATES, LayerwiseAttentionPooling, Refiner, build_conditioner
from models.conditioning.base import Conditioning
from models.dit import DiT

ENC, DIT, HEADS = 16, 24, 4

# (name, options): every registered candidate with its defaults, then the variants worth a contract of their own
CASES = [(name, {}) for name in CANDIDATES] + [
    ("last_layer", {"refiner_blocks": 1, "layer": -2}),
    ("kv_fusion", {"kv_source": "hidden"}),
    ("kv_fusion", {"kv_source": "encoder"}),
    ("hsi", {"refiner_blocks": 1}),
    ("lap", {"refiner_blocks": 1}),
    ("lap", {"injection": "per_layer", "lap_blocks": 1}),
    ("lap", {"lap_blocks": 0}),
]
CASE_IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for n, o in CASES]


def build(name: str, n: int, depth: int, seed: int = 0, **options) -> torch.nn.Module:
    """A candidate with every zero-init weight randomised, so injections are not trivially zero."""
    torch.manual_seed(seed)
    cond = build_conditioner(name, enc_dim=ENC, num_layers=n, dit_dim=DIT, dit_depth=depth, heads=HEADS, **options)
    with torch.no_grad():
        for p in cond.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.2)
    return cond.eval()


def make_inputs(lengths: list[int], t: int, n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded features (B, T, N, ENC) and mask (B, T); padded content is random garbage too."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(lengths), t, n, ENC, generator=g)
    mask = torch.arange(t)[None] < torch.tensor(lengths)[:, None]
    return feats, mask


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def channels(c: Conditioning) -> dict[str, torch.Tensor]:
    """Every tensor a Conditioning carries, by name (None entries skipped)."""
    out = {}
    if c.tokens is not None:
        out["tokens"] = c.tokens
    for key in ("kv", "inject"):
        for i, x in enumerate(getattr(c, key) or []):
            if x is not None:
                out[f"{key}{i}"] = x
    return out


def depth_for(name: str, n: int) -> int:
    return n if CANDIDATES[name].layer_per_block else 3


# ----------------------------------------------------------------------------------------------------- shapes
SHAPE_CASES = [pytest.param(name, options, t, n, id=f"{case_id}-{t}-{n}")
               for (name, options), case_id in zip(CASES, CASE_IDS, strict=True)
               for t, n in [(1, 1), (5, 2), (7, 4)]
               if options.get("layer", -1) >= -n]  # layer=-2 needs N >= 2


@pytest.mark.parametrize("name,options,t,n", SHAPE_CASES)
def test_output_shapes(name: str, options: dict, t: int, n: int) -> None:
    depth = depth_for(name, n)
    cond = build(name, n, depth, **options)
    feats, mask = make_inputs([t, max(1, t - 1)], t, n)
    out = cond(feats, mask)
    assert torch.equal(out.mask, mask)
    if cond.feeds_tokens:
        assert out.tokens.shape == (2, t, DIT) and out.kv is None
    else:
        assert out.tokens is None and len(out.kv) == depth
        width = ENC if cond.kv_context == "encoder" else DIT  # the encoder's packed K/V pass unchanged
        assert all(k.shape == (2, t, width) for k in out.kv)
    injects = name == "hsi" or options.get("injection") == "per_layer"
    if injects:
        assert len(out.inject) == depth and out.inject[-1] is None
        assert all(x.shape == (2, t, DIT) for x in out.inject[:-1])
    else:
        assert out.inject is None
    for key, x in channels(out).items():  # padded positions are exactly zero in every channel
        assert not x[~mask].any(), key


# ------------------------------------------------------------------------------------------ padding invariance
@pytest.mark.parametrize("name,options", CASES, ids=CASE_IDS)
def test_padding_invariance(name: str, options: dict) -> None:
    n = 3
    cond = build(name, n, depth_for(name, n), **options)
    lengths = [5, 2, 3]
    feats, mask = make_inputs(lengths, 5, n)
    # Longer padding and different garbage (huge values) at the padded positions; same real content.
    feats2, _ = make_inputs(lengths, 9, n, seed=7)
    feats2 = feats2 * 1e3
    mask2 = torch.arange(9)[None] < torch.tensor(lengths)[:, None]
    feats2[:, :5][mask] = feats[mask]
    a, b = channels(cond(feats, mask)), channels(cond(feats2, mask2))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key][mask], b[key][mask2], atol=1e-6, rtol=0, msg=key)
        assert not b[key][~mask2].any()


def test_padding_invariance_with_a_hole_in_the_mask() -> None:
    """Krea2 pads *between* prompt and suffix: padding need not be at the end."""
    cond = build("lap", 2, 3, refiner_blocks=2)
    feats, _ = make_inputs([6], 6, 2)
    mask = torch.tensor([[True, True, False, False, True, True]])
    ref = cond(feats[:, mask[0]], torch.ones(1, 4, dtype=torch.bool)).tokens[0]
    torch.testing.assert_close(cond(feats, mask).tokens[0, mask[0]], ref, atol=1e-6, rtol=0)


# -------------------------------------------------------------------------------------------- null condition
@pytest.mark.parametrize("name,options", CASES, ids=CASE_IDS)
def test_null_condition(name: str, options: dict) -> None:
    n = 3
    cond = build(name, n, depth_for(name, n), **options)
    feats_a, mask_a = make_inputs([4, 3, 2], 4, n, seed=1)
    feats_b, mask_b = make_inputs([1, 3, 4], 4, n, seed=2)
    drop = torch.tensor([True, False, True])
    out_a, out_b = cond(feats_a, mask_a, drop), cond(feats_b, mask_b, drop)
    null_mask = torch.tensor([True, False, False, False])
    for out in (out_a, out_b):
        assert torch.equal(out.mask[0], null_mask) and torch.equal(out.mask[2], null_mask)
    ca, cb = channels(out_a), channels(out_b)
    for key in ca:
        assert torch.equal(ca[key][drop], cb[key][drop]), key
        assert ca[key][0, 0].abs().sum() > 0, key  # the null token is real and carries the learned condition
    # Kept rows are untouched by the dropping of the others.
    keep = channels(cond(feats_a[1:2], mask_a[1:2]))
    for key in ca:
        torch.testing.assert_close(ca[key][1:2], keep[key], atol=1e-6, rtol=0)


def test_null_condition_is_learned_parameter() -> None:
    cond = build("last_layer", 2, 3)
    feats, mask = make_inputs([3], 3, 2)
    before = cond(feats, mask, torch.tensor([True])).tokens
    with torch.no_grad():
        cond.null_features.add_(1.0)
    assert not torch.allclose(before, cond(feats, mask, torch.tensor([True])).tokens)


# ---------------------------------------------------------------------------------- reference computations
def test_last_layer_matches_hand_projection() -> None:
    for layer in (-1, -2, 0):
        cond = build("last_layer", 3, 2, layer=layer)
        feats, mask = make_inputs([4, 2], 4, 3)
        proj = cond.proj
        ref = rms(feats[:, :, layer], proj.norm.weight) @ proj.linear.weight.T + proj.linear.bias
        torch.testing.assert_close(cond(feats, mask).tokens[mask], ref[mask], atol=1e-5, rtol=1e-5)


def test_kv_fusion_pairs_layer_i_with_block_i() -> None:
    cond = build("kv_fusion", 3, 3, kv_source="hidden")
    feats, mask = make_inputs([4, 2], 4, 3)
    out = cond(feats, mask)
    for i, proj in enumerate(cond.proj):
        ref = rms(feats[:, :, i], proj.norm.weight) @ proj.linear.weight.T + proj.linear.bias
        torch.testing.assert_close(out.kv[i][mask], ref[mask], atol=1e-5, rtol=1e-5)
    # on the encoder's own keys/values: block i gets encoder layer i's packed K/V exactly, nothing learned
    enc = build("kv_fusion", 3, 3, kv_source="encoder")
    assert [n for n, _ in enc.named_parameters()] == ["null_features"]
    out = enc(feats, mask)
    for i in range(3):
        assert torch.equal(out.kv[i][mask], feats[:, :, i][mask])


def test_hsi_tokens_from_layer0_inject_from_next_layer() -> None:
    cond = build("hsi", 3, 3)
    feats, mask = make_inputs([4, 2], 4, 3)
    out = cond(feats, mask)
    p = cond.proj
    ref = rms(feats[:, :, 0], p.norm.weight) @ p.linear.weight.T + p.linear.bias
    torch.testing.assert_close(out.tokens[mask], ref[mask], atol=1e-5, rtol=1e-5)
    for i, proj in enumerate(cond.inject):
        ref = rms(feats[:, :, i + 1], proj.norm.weight) @ proj.linear.weight.T + proj.linear.bias
        torch.testing.assert_close(out.inject[i][mask], ref[mask], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,options", [("hsi", {}), ("lap", {"injection": "per_layer"})])
def test_injections_are_zero_at_init(name: str, options: dict) -> None:
    torch.manual_seed(0)
    cond = build_conditioner(name, enc_dim=ENC, num_layers=4, dit_dim=DIT, dit_depth=4, **options)
    feats, mask = make_inputs([3, 2], 3, 4)
    out = cond(feats, mask)
    assert len(out.inject) == 4 and out.inject[-1] is None
    assert all(torch.equal(x, torch.zeros_like(x)) for x in out.inject[:-1])
    assert out.tokens[mask].abs().min() >= 0 and out.tokens[mask].abs().sum() > 0
    # ...and still trainable: the zero Linear gets a gradient.
    out.inject[0].sum().backward()
    grads = [p.grad for p in cond.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert grads


@pytest.mark.parametrize("name", ["kv_fusion", "hsi"])
def test_depth_mismatch_errors(name: str) -> None:
    with pytest.raises(ValueError, match="num_layers == dit_depth"):
        build_conditioner(name, enc_dim=ENC, num_layers=3, dit_dim=DIT, dit_depth=4)


def test_bad_feature_shapes_raise() -> None:
    cond = build("lap", 3, 2)
    feats, mask = make_inputs([2], 2, 3)
    with pytest.raises(ValueError, match="N=3"):
        cond(feats[:, :, :2], mask)
    with pytest.raises(ValueError, match="bool"):
        cond(feats, mask.float())


# ------------------------------------------------------------------------------------------------------ LAP
def naive_block(x: torch.Tensor, blk: torch.nn.Module) -> tuple[torch.Tensor, list, torch.Tensor, torch.Tensor]:
    """One token's (N, D) through a TransformerBlock, written out by hand; also per-head attention probs and
    the raw (pre-QK-norm) query/key norms per layer."""
    a = blk.attn
    h = rms(x, blk.norm1.weight)
    qkv = h @ a.qkv.weight.T + a.qkv.bias
    d = x.shape[-1]
    q, k, v = qkv[:, :d], qkv[:, d : 2 * d], qkv[:, 2 * d :]
    heads, probs = [], []
    for i in range(a.heads):
        s = slice(i * a.head_dim, (i + 1) * a.head_dim)
        qi, ki = rms(q[:, s], a.q_norm.weight), rms(k[:, s], a.k_norm.weight)
        p = torch.softmax(qi @ ki.T / math.sqrt(a.head_dim), dim=-1)
        probs.append(p)
        heads.append(p @ v[:, s])
    x = x + torch.cat(heads, -1) @ a.proj.weight.T + a.proj.bias
    u = rms(x, blk.norm2.weight) @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias
    u = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))
    x = x + u @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias
    return x, probs, q.norm(dim=-1), k.norm(dim=-1)


def random_lap(n: int, blocks: int = 2, seed: int = 0) -> LayerwiseAttentionPooling:
    torch.manual_seed(seed)
    lap = LayerwiseAttentionPooling(ENC, n, blocks=blocks, heads=HEADS)
    with torch.no_grad():
        for name, p in lap.named_parameters():  # norm gains / pool weights away from their constant inits
            if "norm" in name or "pool" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name else 0.0))
    return lap.eval()


def test_lap_matches_naive_loop() -> None:
    n = 4
    lap = random_lap(n)
    lap.record = True
    feats, mask = make_inputs([3, 1], 3, n)
    out = lap(feats, mask)
    w = lap.pool.weight[0]
    for b in range(2):
        for t in range(3):
            if not mask[b, t]:
                assert not out[b, t].any()
                assert not lap.recorded["attn"][0][b * 3 + t].any() and not lap.recorded["qk_norm"][b, t].any()
                continue
            x = feats[b, t]
            for i, blk in enumerate(lap.blocks):
                before = x
                x, probs, qn, kn = naive_block(x, blk)
                torch.testing.assert_close(lap.recorded["attn"][i][b * 3 + t], torch.stack(probs))
                torch.testing.assert_close(lap.recorded["q_norm"][b, t, i], qn)
                torch.testing.assert_close(lap.recorded["qk_norm"][b, t, i], qn * kn)
                assert not torch.equal(before, x)
            ref = sum(w[j] * x[j] for j in range(n))
            torch.testing.assert_close(out[b, t], ref, atol=1e-5, rtol=1e-5)
    assert lap.recorded["attn"][1].shape == (6, HEADS, n, n)
    assert lap.recorded["q_norm"].shape == (2, 3, 2, n)


def test_lap_record_off_stores_nothing() -> None:
    lap = random_lap(3)
    feats, mask = make_inputs([2], 2, 3)
    lap(feats, mask)
    assert lap.recorded == {}


def hand_pool(lap: LayerwiseAttentionPooling, feats: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Run the LAP blocks on every token, then pool the layers with ``weights`` by hand: (B, T, D)."""
    b, t, n, d = feats.shape
    x = feats.reshape(b * t, n, d)
    for blk in lap.blocks:
        x = blk(x)
    return torch.einsum("rnd,n->rd", x, weights).reshape(b, t, d)


def test_layer_dropout() -> None:
    n = 5
    lap = random_lap(n)
    feats, mask = make_inputs([4, 2], 4, n)
    params = {k: v.clone() for k, v in lap.state_dict().items()}
    full = lap(feats, mask)
    lap.set_layer_dropout(())
    assert torch.equal(lap(feats, mask), full)  # dropping none is exactly the full model

    for drop in [(0,), (1, 3), (0, 4), tuple(range(n))]:
        lap.set_layer_dropout(drop)
        w = lap.pool.weight[0].detach().clone()
        w[list(drop)] = 0
        out = lap(feats, mask)
        torch.testing.assert_close(out[mask], hand_pool(lap, feats, w)[mask], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out[mask], full[mask])
    lap.set_layer_dropout([-1])
    torch.testing.assert_close(lap(feats, mask), (lap.set_layer_dropout([n - 1]), lap(feats, mask))[1])

    for k, v in lap.state_dict().items():  # the trained parameters never change
        assert torch.equal(v, params[k]), k
    assert torch.equal(lap.pooling_weights(), params["pool.weight"][0])
    lap.set_layer_dropout(())
    assert torch.equal(lap(feats, mask), full)
    with pytest.raises(ValueError, match="out of range"):
        lap.set_layer_dropout([n])
    with pytest.raises(ValueError, match="out of range"):
        lap.set_layer_dropout([-n - 1])


def test_layer_dropout_option_of_conditioner() -> None:
    a = build("lap", 4, 3, injection="per_layer", layer_dropout=(1, 2))
    b = build("lap", 4, 3, injection="per_layer")
    feats, mask = make_inputs([3, 2], 3, 4)
    assert not torch.allclose(a(feats, mask).tokens, b(feats, mask).tokens)
    b.set_layer_dropout((1, 2))
    ca, cb = channels(a(feats, mask)), channels(b(feats, mask))
    for key in ca:
        assert torch.equal(ca[key], cb[key]), key
    assert all(lap.dropped == (1, 2) for lap in (b.lap, *b.inject_laps))


def test_pooling_weights() -> None:
    lap = random_lap(4)
    w = lap.pooling_weights()
    assert w.shape == (4,) and torch.equal(w, lap.pool.weight[0])
    w.add_(1.0)  # a copy: editing it cannot touch the model
    assert not torch.equal(w, lap.pool.weight[0])
    fresh = LayerwiseAttentionPooling(ENC, 4, blocks=1, heads=HEADS)
    assert torch.equal(fresh.pooling_weights(), torch.full((4,), 0.25))  # starts as the mean over layers


def test_per_layer_injection_uses_dedicated_laps() -> None:
    cond = build("lap", 3, 4, injection="per_layer")
    assert len(cond.inject_laps) == 3
    ids = {id(p) for lap in (cond.lap, *cond.inject_laps) for p in lap.parameters()}
    assert len(ids) == 4 * len(list(cond.lap.parameters()))
    feats, mask = make_inputs([3], 3, 3)
    out = cond(feats, mask)
    for i in range(3):
        ref = cond.inject_proj[i](cond.inject_laps[i](feats, mask), mask)
        assert torch.equal(out.inject[i], ref)


# -------------------------------------------------------------------------------------------------- refiner
def test_refiner_masks_padding_like_truncation() -> None:
    torch.manual_seed(0)
    ref = Refiner(DIT, blocks=2, heads=HEADS).eval()
    x = torch.randn(2, 6, DIT)
    mask = torch.arange(6)[None] < torch.tensor([[6], [3]])
    out = ref(x, mask)
    torch.testing.assert_close(out[1, :3], ref(x[1:, :3], mask[1:, :3])[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[0], ref(x[:1], mask[:1])[0])
    assert not out[1, 3:].any()
    # Bidirectional: an early token's output depends on a later token.
    y = x.clone()
    y[1, 2] += 1
    assert not torch.allclose(ref(y, mask)[1, 0], out[1, 0])
    with pytest.raises(ValueError, match="blocks >= 1"):
        Refiner(DIT, blocks=0)


@pytest.mark.parametrize("name", ["last_layer", "hsi", "lap"])
def test_refiner_on_token_candidates(name: str) -> None:
    with_ref = build(name, 3, 3, refiner_blocks=2)
    assert isinstance(with_ref.refiner, Refiner) and len(with_ref.refiner.blocks) == 2
    assert build(name, 3, 3).refiner is None
    feats, mask = make_inputs([3, 2], 3, 3)
    tokens = with_ref(feats, mask).tokens
    base = with_ref.proj(with_ref.lap(feats, mask) if name == "lap" else feats[:, :, 0 if name == "hsi" else -1],
                         mask)
    torch.testing.assert_close(tokens, with_ref.refiner(base, mask))


def test_refiner_rejected_on_kv_fusion() -> None:
    with pytest.raises(ValueError, match="last_layer, hsi, lap"):
        build_conditioner("kv_fusion", enc_dim=ENC, num_layers=3, dit_dim=DIT, dit_depth=3, refiner_blocks=2)
    cond = build_conditioner("kv_fusion", enc_dim=ENC, num_layers=3, dit_dim=DIT, dit_depth=3, refiner_blocks=0)
    assert not any("refiner" in k for k in cond.state_dict())


# ------------------------------------------------------------------------------------------------- registry
def test_registry() -> None:
    with pytest.raises(ValueError, match=", ".join(CANDIDATES)):
        build_conditioner("t5", enc_dim=ENC, num_layers=2, dit_dim=DIT, dit_depth=2)
    with pytest.raises(TypeError, match=r"\['lap_blocks'\].*valid: layer, heads, refiner_blocks"):
        build_conditioner("last_layer", enc_dim=ENC, num_layers=2, dit_dim=DIT, dit_depth=2, lap_blocks=2)
    with pytest.raises(ValueError, match="input, per_layer"):
        build_conditioner("lap", enc_dim=ENC, num_layers=2, dit_dim=DIT, dit_depth=2, injection="deep")
    with pytest.raises(ValueError, match="valid: -2..1"):
        build_conditioner("last_layer", enc_dim=ENC, num_layers=2, dit_dim=DIT, dit_depth=2, layer=2)
    with pytest.raises(ValueError, match="refiner_blocks"):
        build_conditioner("lap", enc_dim=ENC, num_layers=2, dit_dim=DIT, dit_depth=2, refiner_blocks=-1)
    with pytest.raises(ValueError, match="heads"):
        build_conditioner("lap", enc_dim=ENC, num_layers=2, dit_dim=DIT, dit_depth=2, heads=0)
    # heads is common to all, even where unused (kv_fusion), so one config block serves every candidate.
    for name in CANDIDATES:
        cond = build_conditioner(name, enc_dim=ENC, num_layers=3, dit_dim=DIT, dit_depth=3, heads=2)
        assert isinstance(cond, CANDIDATES[name])


# ------------------------------------------------------------------------------------------ through the DiT
@pytest.mark.parametrize("name,options", CASES, ids=CASE_IDS)
def test_dit_output_is_padding_invariant(name: str, options: dict) -> None:
    """The contract with models/dit.py: whatever channel a candidate uses, padding never reaches the image."""
    n = 3
    cond = build(name, n, n, **options)
    torch.manual_seed(0)
    # KV fusion on the encoder's keys/values: the blocks' KV heads must take the ENC-wide packed [k | v]
    gqa = {"kv_heads": 2, "head_dim": ENC // 4} if cond.kv_context == "encoder" else {}
    dit = DiT(in_channels=3, image_size=8, patch=4, dim=DIT, depth=n, heads=HEADS,
              kv_context=cond.kv_context, **gqa).eval()
    with torch.no_grad():
        for p in dit.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.1)
    feats, mask = make_inputs([4, 2], 4, n)
    feats2, _ = make_inputs([4, 2], 6, n, seed=3)
    mask2 = torch.arange(6)[None] < torch.tensor([[4], [2]])
    feats2[:, :4][mask] = feats[mask]
    x, s = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 0.8])
    v1, v2 = dit(x, s, cond(feats, mask)), dit(x, s, cond(feats2, mask2))
    torch.testing.assert_close(v1, v2, atol=1e-5, rtol=1e-5)
    assert v1.abs().sum() > 0
