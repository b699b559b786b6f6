"""Feature cache: exact rows, no recomputation across cache objects, isolation between encoders, bad shards."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

import pytest
import torch

from models.encoders import FrozenEncoder, build_encoder
from models.feature_cache import CorruptShardError, FeatureCache

A = "a red circle"
B = "two blue squares left of a green triangle above a black circle"
C = "a square"
D = "a photo of three yellow triangles"


@pytest.fixture(scope="module")
def enc() -> FrozenEncoder:
    return build_encoder("tiny-llama")


def count_calls(encoder: FrozenEncoder) -> list[int]:
    """Batch sizes of every encoder call, seen from outside the cache (a forward hook)."""
    calls: list[int] = []
    encoder.register_forward_hook(lambda mod, args, out: calls.append(len(args[0])))
    return calls


def shards(root: Path) -> list[Path]:
    return sorted(root.glob("*/shard-*.safetensors"))


def test_cached_rows_are_the_encoders_rows_in_a_mixed_batch(tmp_path: Path) -> None:
    enc = build_encoder("tiny-llama")
    calls = count_calls(enc)
    cache = FeatureCache(tmp_path, enc)
    first = cache([A, B])
    direct = enc([A, B])
    assert torch.equal(first.features, direct.features) and torch.equal(first.mask, direct.mask)
    assert torch.equal(first.token_ids, direct.token_ids) and first.layer_ids == direct.layer_ids == (2, 5, 8, 11)

    calls.clear()
    mixed = cache([C, B, A, D])  # two new prompts of other lengths between two cached ones
    assert calls == [2] and cache.encoder_calls == 2 and (cache.hits, cache.misses) == (2, 4)
    new = enc([C, D])  # the one batch the cache sent for the misses
    ref = enc([C, B, A, D])
    assert torch.equal(mixed.mask, ref.mask) and torch.equal(mixed.token_ids, ref.token_ids)
    assert mixed.features.shape == ref.features.shape == (4, 12, 4, 64)
    for row, (src, i) in enumerate([(new, 0), (first, 1), (first, 0), (new, 1)]):
        n = int(src.mask[i].sum())
        assert torch.equal(mixed.features[row, :n], src.features[i, :n]), row  # bit-exact: the computed row
        assert torch.count_nonzero(mixed.features[row, n:]) == 0  # padding exactly zero
    # against one direct call only up to the encoder's own padded-length ulp noise (measured ~7e-8)
    torch.testing.assert_close(mixed.features, ref.features, rtol=0, atol=1e-6)


def test_a_second_cache_over_the_same_root_computes_nothing(tmp_path: Path, enc: FrozenEncoder) -> None:
    with FeatureCache(tmp_path, enc, shard_entries=2) as cache:  # small shards: 3 new prompts -> 2 files
        before = cache([A, B, C])
        assert len(shards(tmp_path)) == 1  # the full shard was written as soon as it held 2 entries
    assert len(shards(tmp_path)) == 2  # leaving the block flushed the third entry
    other = build_encoder("tiny-llama")  # same preset, same seed: same fingerprint, fresh object
    calls = count_calls(other)
    again = FeatureCache(tmp_path, other)
    out = again([C, A, B, A])
    assert calls == [] and again.encoder_calls == 0 and again.hits == 4 and len(again) == 3
    assert torch.equal(out.features[:3], before.features[[2, 0, 1]])
    assert torch.equal(out.mask[:3], before.mask[[2, 0, 1]]) and torch.equal(out.features[3], out.features[1])


def test_buffered_entries_are_flushed_when_the_cache_is_collected(tmp_path: Path, enc: FrozenEncoder) -> None:
    cache = FeatureCache(tmp_path, enc)
    cache([A, A, D])  # a repeated prompt is encoded once and stored once
    assert cache.encoder_calls == 1 and len(cache) == 2 and shards(tmp_path) == []
    del cache
    gc.collect()
    assert len(shards(tmp_path)) == 1
    assert FeatureCache(tmp_path, enc)([D, A]).mask.sum().item() > 0 and len(FeatureCache(tmp_path, enc)) == 2


def test_another_encoder_never_reads_the_first_ones_entries(tmp_path: Path, enc: FrozenEncoder) -> None:
    FeatureCache(tmp_path, enc).fill([A, B])
    for other in (build_encoder("tiny-llama", layers=[1, 4]), build_encoder("tiny-llama", seed=1)):
        calls = count_calls(other)
        cache = FeatureCache(tmp_path, other)
        out = cache([A, B])
        assert calls == [2] and cache.misses == 2 and cache.hits == 0
        direct = other([A, B])
        assert torch.equal(out.features, direct.features) and out.layer_ids == direct.layer_ids
        cache.flush()
    assert len({p.parent for p in shards(tmp_path)}) == 3  # one folder per fingerprint
    # a shard copied into another encoder's folder is refused, not read
    src = next(FeatureCache(tmp_path, enc).folder.glob("shard-*.safetensors"))
    wrong = FeatureCache(tmp_path, build_encoder("tiny-llama", seed=1)).folder / src.name
    shutil.copy(src, wrong)
    with pytest.raises(CorruptShardError, match=f"{wrong.name}.*not a unifusion-feature-cache/1 shard of encoder"):
        FeatureCache(tmp_path, build_encoder("tiny-llama", seed=1))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_corrupt_shard_is_an_error_naming_the_file(tmp_path: Path, enc: FrozenEncoder, damage: str) -> None:
    FeatureCache(tmp_path, enc).fill([A, B])
    (path,) = shards(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-10] if damage == "truncate" else b"not a safetensors file at all")
    with pytest.raises(CorruptShardError, match=rf"{path}.*unreadable.*delete it"):
        FeatureCache(tmp_path, enc)
    path.unlink()  # the documented fix: delete it, and its entries are recomputed
    cache = FeatureCache(tmp_path, enc)
    assert torch.equal(cache([A, B]).features, enc([A, B]).features) and cache.misses == 2


def test_bad_prompts_are_rejected(tmp_path: Path, enc: FrozenEncoder) -> None:
    cache = FeatureCache(tmp_path, enc)
    with pytest.raises(ValueError, match="non-empty list of strings"):
        cache(A)  # a bare string would silently become one prompt per character
    with pytest.raises(ValueError, match="non-empty list"):
        cache([])
    with pytest.raises(ValueError, match=r"prompts\[1\] must be a str"):
        cache([A, 3])
