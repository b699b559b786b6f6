"""DiT: shapes, patchify round trip, padding invariance, and the KV / injection channels."""

from __future__ import annotations

import pytest
import torch

from models.conditioning.base import Conditioning
from models.dit import DiT


def _dit(**kw) -> DiT:
    torch.manual_seed(0)
    dit = DiT(in_channels=3, image_size=16, patch=2, dim=32, depth=3, heads=4, **kw)
    for p in dit.parameters():  # zero-init output layers would hide bugs: randomise everything
        torch.nn.init.normal_(p, std=0.2)
    return dit


def test_patchify_unpatchify_round_trip_preserves_pixel_positions():
    dit = _dit()
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16)
    # unpatchify(inverse of the patch layout): build tokens by hand from x and check we get x back
    p, g = 2, 8
    tokens = x.view(2, 3, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(2, g * g, p * p * 3)
    assert torch.equal(dit.unpatchify(tokens), x)


def test_output_shape_and_zero_init_predicts_zero():
    dit = DiT(in_channels=3, image_size=16, patch=2, dim=32, depth=2, heads=4)
    cond = Conditioning(mask=torch.ones(2, 5, dtype=torch.bool), tokens=torch.randn(2, 5, 32))
    out = dit(torch.randn(2, 3, 16, 16), torch.rand(2), cond)
    assert out.shape == (2, 3, 16, 16) and torch.count_nonzero(out) == 0


def test_padding_never_changes_the_output():
    dit = _dit().eval()
    x, s = torch.randn(2, 3, 16, 16), torch.rand(2)
    tokens = torch.randn(2, 6, 32)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    ref = dit(x, s, Conditioning(mask=mask, tokens=tokens))
    junk = tokens.clone()
    junk[0, 4:] = 100.0  # different pad content
    longer_t = torch.cat([junk, torch.randn(2, 3, 32)], dim=1)  # longer padding
    longer_m = torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], dim=1)
    for t, m in [(junk, mask), (longer_t, longer_m)]:
        torch.testing.assert_close(dit(x, s, Conditioning(mask=m, tokens=t)), ref, atol=1e-5, rtol=1e-5)


def test_kv_context_conditions_the_output_and_respects_padding():
    dit = _dit(kv_context=True).eval()
    x, s = torch.randn(1, 3, 16, 16), torch.rand(1)
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    kv = [torch.randn(1, 4, 32) for _ in range(3)]
    ref = dit(x, s, Conditioning(mask=mask, kv=kv))
    padded = [k.clone() for k in kv]
    for k in padded:
        k[:, 3] = 50.0
    torch.testing.assert_close(dit(x, s, Conditioning(mask=mask, kv=padded)), ref, atol=1e-5, rtol=1e-5)
    other = [k.clone() for k in kv]
    other[1][:, 0] += 1.0
    assert not torch.allclose(dit(x, s, Conditioning(mask=mask, kv=other)), ref)
    with pytest.raises(ValueError, match="one context per DiT block"):
        dit(x, s, Conditioning(mask=mask, kv=kv[:2]))


def test_injection_adds_to_condition_positions_after_each_block():
    dit = _dit().eval()
    x, s = torch.randn(1, 3, 16, 16), torch.rand(1)
    mask = torch.ones(1, 4, dtype=torch.bool)
    tokens = torch.randn(1, 4, 32)
    zeros = [torch.zeros(1, 4, 32), torch.zeros(1, 4, 32), None]
    plain = dit(x, s, Conditioning(mask=mask, tokens=tokens))
    torch.testing.assert_close(dit(x, s, Conditioning(mask=mask, tokens=tokens, inject=zeros)), plain)
    # injecting after the LAST block cannot change image outputs (nothing attends afterwards)
    last_only = [None, None, torch.randn(1, 4, 32)]
    torch.testing.assert_close(dit(x, s, Conditioning(mask=mask, tokens=tokens, inject=last_only)), plain)
    first = [torch.randn(1, 4, 32), None, None]
    assert not torch.allclose(dit(x, s, Conditioning(mask=mask, tokens=tokens, inject=first)), plain)
    with pytest.raises(ValueError, match="condition tokens"):
        dit(x, s, Conditioning(mask=mask, kv=None, tokens=None, inject=first))
