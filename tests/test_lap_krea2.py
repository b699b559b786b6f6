"""Reference check of our LAP data flow against diffusers' ``Krea2TextFusion`` (models/conditioning/lap.py).

Our layer-axis blocks differ from Krea2's by design (see lap.py's docstring), so the blocks themselves are not
compared. What must agree is everything around them:

- the reshape convention: axis 2 of (B, T, N, D) is the layer axis N, each token's N layers form one length-N
  sequence for the blocks, and the blocks get no attention mask;
- the pooling: ``Linear(N, 1, bias=False)`` over the layer axis, giving (B, T, D).

Krea2TextFusion accepts ``num_layerwise_blocks=0`` and ``num_refiner_blocks=0``, so the pooling is compared
directly through its public forward, with both sides' block stacks empty (and, separately, with both sides'
blocks monkeypatched to the same layer-axis-mixing function). Krea2 computes padded tokens too and does not zero
them; ours zeroes them, so padded positions are compared against zero, real ones against Krea2.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers.transformer_krea2 import Krea2TextFusion

from models.conditioning import LayerwiseAttentionPooling

B, T, N, D, HEADS = 2, 5, 4, 16, 4
TOL = 1e-5


def make_krea2(blocks: int = 0) -> Krea2TextFusion:
    return Krea2TextFusion(
        num_text_layers=N,
        dim=D,
        num_heads=HEADS,
        num_kv_heads=2,
        intermediate_size=32,
        num_layerwise_blocks=blocks,
        num_refiner_blocks=0,
        eps=1e-6,
    ).eval()


def make_pair(blocks: int = 0, seed: int = 0) -> tuple[Krea2TextFusion, LayerwiseAttentionPooling]:
    """Krea2 fusion and our LAP with the same random pooling weights (Krea2's init copied into ours)."""
    torch.manual_seed(seed)
    krea = make_krea2(blocks)
    ours = LayerwiseAttentionPooling(D, N, blocks=blocks, heads=HEADS).eval()
    assert ours.pool.weight.shape == krea.projector.weight.shape == (1, N)
    assert ours.pool.bias is None and krea.projector.bias is None
    with torch.no_grad():
        krea.projector.weight.normal_()  # not the PyTorch default init: make every weight distinct and signed
        ours.pool.weight.copy_(krea.projector.weight)
    return krea, ours


def make_inputs(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """features (B, T, N, D) random, mask (B, T) right-padded to the given real lengths."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(lengths), T, N, D, generator=g)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    return feats, mask


@pytest.mark.parametrize("lengths", [[T, T], [3, 5], [1, 2]])
def test_pooling_matches_krea2_without_blocks(lengths: list[int]) -> None:
    krea, ours = make_pair(blocks=0)
    feats, mask = make_inputs(lengths)
    with torch.no_grad():
        want = krea(feats)  # (B, T, D); no refiner blocks, so the mask would be unused anyway
        got = ours(feats, mask)
    assert want.shape == got.shape == (len(lengths), T, D)
    torch.testing.assert_close(got[mask], want[mask], atol=TOL, rtol=0)
    assert torch.all(got[~mask] == 0)


def test_layer_axis_is_dim_2() -> None:
    """One-hot pooling weights select one layer, feats[:, :, k], on both sides: N is axis 2 of (B, T, N, D)."""
    krea, ours = make_pair(blocks=0)
    feats, mask = make_inputs([T, T])
    for k in range(N):
        onehot = torch.zeros(1, N)
        onehot[0, k] = 1.0
        with torch.no_grad():
            krea.projector.weight.copy_(onehot)
            ours.pool.weight.copy_(onehot)
            torch.testing.assert_close(krea(feats), feats[:, :, k], atol=0, rtol=0)
            torch.testing.assert_close(ours(feats, mask), feats[:, :, k], atol=0, rtol=0)


def mix_layers(x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """A deterministic stand-in block that mixes along the layer axis (dim 1 of (R, N, D)) and across D.

    Any mistake in which axis the blocks see as the sequence (N vs T vs D) changes its output.
    """
    assert attention_mask is None  # layer-axis blocks run unmasked on both sides
    steps = torch.arange(1, x.shape[1] + 1, dtype=x.dtype)[None, :, None]
    return torch.tanh(x.cumsum(dim=1) / steps + x.roll(1, dims=-1))


@pytest.mark.parametrize("stand_in", ["identity", "mix_layers"])
def test_data_flow_matches_krea2_with_patched_blocks(monkeypatch: pytest.MonkeyPatch, stand_in: str) -> None:
    """Both sides' 2 layer-axis blocks replaced by the same function: outputs must agree on real tokens.

    Also records what each side feeds its blocks: Krea2 all B*T tokens, ours only the R real ones, each as a
    (tokens, N, D) batch of length-N sequences, in the same (b, t) row-major order.
    """
    krea, ours = make_pair(blocks=2)
    feats, mask = make_inputs([3, 5])
    seen: dict[str, list[torch.Tensor]] = {"krea": [], "ours": []}

    def patched(side: str):
        def forward(x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
            seen[side].append(x.detach().clone())
            return x if stand_in == "identity" else mix_layers(x, attention_mask)

        return forward

    for blk in krea.layerwise_blocks:
        monkeypatch.setattr(blk, "forward", patched("krea"))
    for blk in ours.blocks:
        monkeypatch.setattr(blk, "forward", patched("ours"))
    with torch.no_grad():
        want = krea(feats)
        got = ours(feats, mask)

    assert len(seen["krea"]) == len(seen["ours"]) == 2
    r = int(mask.sum())
    assert seen["krea"][0].shape == (B * T, N, D) and seen["ours"][0].shape == (r, N, D)
    torch.testing.assert_close(seen["krea"][0], feats.reshape(B * T, N, D), atol=0, rtol=0)
    torch.testing.assert_close(seen["ours"][0], seen["krea"][0][mask.reshape(-1)], atol=0, rtol=0)
    torch.testing.assert_close(seen["ours"][1], seen["krea"][1][mask.reshape(-1)], atol=TOL, rtol=0)
    torch.testing.assert_close(got[mask], want[mask], atol=TOL, rtol=0)
    assert torch.all(got[~mask] == 0)
    if stand_in == "identity":  # identity blocks = Krea2 with zero blocks = a plain pooling of the input
        every_token = torch.ones(B, T, dtype=torch.bool)
        weight = krea.projector.weight.detach()[0]
        torch.testing.assert_close(want, naive_pool(feats, every_token, weight), atol=TOL, rtol=0)


def test_pooling_gradients_match_krea2() -> None:
    krea, ours = make_pair(blocks=0)
    feats, mask = make_inputs([T, T])
    g = torch.randn(B, T, D, generator=torch.Generator().manual_seed(2))
    (krea(feats) * g).sum().backward()
    (ours(feats, mask) * g).sum().backward()
    torch.testing.assert_close(ours.pool.weight.grad, krea.projector.weight.grad, atol=1e-4, rtol=1e-5)


def naive_pool(feats: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """out[b, t, d] = sum_n weight[n] * feats[b, t, n, d] on real tokens, 0 on padded ones: (B, T, D)."""
    return torch.einsum("btnd,n->btd", feats, weight) * mask[:, :, None]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pooling_matches_naive_einsum(seed: int) -> None:
    torch.manual_seed(seed)
    lap = LayerwiseAttentionPooling(D, N, blocks=0, heads=HEADS).eval()
    torch.testing.assert_close(lap.pooling_weights(), torch.full((N,), 1.0 / N))  # starts as the layer mean
    feats, mask = make_inputs([2, 4], seed=seed + 10)
    with torch.no_grad():
        torch.testing.assert_close(lap(feats, mask), feats.mean(dim=2) * mask[:, :, None], atol=TOL, rtol=0)
        weight = torch.randn(N)
        lap.pool.weight.copy_(weight[None])
        torch.testing.assert_close(lap(feats, mask), naive_pool(feats, mask, weight), atol=TOL, rtol=0)
        # layer dropout = the same pooling with those weights zeroed (trained weight untouched)
        lap.set_layer_dropout([1, -1])
        dropped = weight.clone()
        dropped[[1, N - 1]] = 0.0
        torch.testing.assert_close(lap(feats, mask), naive_pool(feats, mask, dropped), atol=TOL, rtol=0)
        torch.testing.assert_close(lap.pooling_weights(), weight)


def test_pooling_rejects_wrong_layer_count() -> None:
    lap = LayerwiseAttentionPooling(D, N, blocks=0)
    feats, mask = make_inputs([T, T])
    with pytest.raises(ValueError, match=f"N={N}"):
        lap(feats[:, :, :-1], mask)
