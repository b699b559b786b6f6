"""Feature cache: exact rows, no recomputation across cache objects, isolation between encoders, bad shards;
image prompts keyed by their exact pixels and the tiles setting; training with ``encoder.cache``."""

from __future__ import annotations

import copy
import gc
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from experiments.config import config_hash, load_base, merge
from experiments.data.shapes import ShapesStream
from models.encoders import FrozenEncoder, Prompt, build_encoder
from models.feature_cache import CorruptShardError, FeatureCache
from world.scene import render, sample_scene

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
    with pytest.raises(ValueError, match=r"prompts\[1\] must be a str or models.encoders.Prompt"):
        cache([A, 3])
    with pytest.raises(ValueError, match=r"prompts\[0\].images\[0\]: an image array must be uint8"):
        cache([Prompt(A, (np.zeros((4, 4, 3), np.float32),))])


# ---------------------------------------------------------------------------------------------- image prompts
@pytest.fixture(scope="module")
def vlm() -> FrozenEncoder:
    return build_encoder("tiny-vlm-random")  # tiles 5 by default


def scene(seed: int) -> np.ndarray:
    return render(sample_scene(np.random.default_rng(seed)))


def test_a_str_and_a_text_only_prompt_are_one_entry_under_the_first_versions_key(tmp_path: Path,
                                                                                    enc: FrozenEncoder) -> None:
    cache = FeatureCache(tmp_path, enc)
    first_version = hashlib.blake2b(repr((cache.fingerprint, cache.layer_ids, A)).encode(), digest_size=16)
    assert cache.key(A) == cache.key(Prompt(A)) == cache.key(Prompt(A, ())) == first_version.hexdigest()
    cache([A])
    assert torch.equal(cache([Prompt(A)]).features, cache([A]).features) and (cache.hits, cache.misses) == (2, 1)


def test_image_prompts_hit_only_for_the_identical_image(tmp_path: Path, vlm: FrozenEncoder) -> None:
    img, other = scene(0), scene(1)
    p = Prompt("make the red circle blue .", (img,))
    with FeatureCache(tmp_path, vlm) as cache:
        first = cache([p, A])
    direct = vlm([p, A])
    assert torch.equal(first.features, direct.features) and torch.equal(first.mask, direct.mask)
    assert first.mask[0].sum() > first.mask[1].sum() + 30  # the image's tokens are in the entry

    calls: list[int] = []
    hook = vlm.register_forward_hook(lambda mod, args, out: calls.append(len(args[0])))
    try:
        # the same pixels as another array, a PIL image, a PNG file (path or str): one entry, read from disk
        png = tmp_path / "scene.png"
        Image.fromarray(img).save(png)
        cache = FeatureCache(tmp_path, vlm)
        same = cache([Prompt(p.text, (img.copy(),)), Prompt(p.text, (Image.fromarray(img),)),
                      Prompt(p.text, (png,)), Prompt(p.text, (str(png),))])
        assert calls == [] and (cache.hits, cache.misses) == (4, 0)
        assert all(torch.equal(same.features[i], first.features[0]) for i in range(4))

        pixel = img.copy()
        pixel[5, 7, 0] ^= 1  # one channel of one pixel, off by one
        variants = [Prompt(p.text, (pixel,)), Prompt(p.text, (other,)), p.text, Prompt("", (img,)),
                    Prompt(p.text, (img, other)), Prompt(p.text, (other, img))]
        out = cache(variants)
        assert calls == [6] and (cache.hits, cache.misses) == (4, 6)  # every variant is its own entry
        assert len({cache.key(v) for v in [p, *variants]}) == 7
        ref = vlm(variants)
        n = int(ref.mask[0].sum())
        assert torch.equal(out.features[0, :n], ref.features[0, :n])  # the changed pixel's own features...
        assert not torch.equal(out.features[0, :n], first.features[0, :n])  # ...not the cached image's
        torch.testing.assert_close(out.features, ref.features, rtol=0, atol=1e-5)
    finally:
        hook.remove()


def test_tiles_and_autocast_are_part_of_the_key(tmp_path: Path, vlm: FrozenEncoder) -> None:
    p = Prompt("add a blue triangle .", (scene(2),))
    cache = FeatureCache(tmp_path, vlm)
    five = cache([p, A])
    try:
        vlm.set_tiles(1)  # after the cache took the encoder's fingerprint
        one = cache([p, A])
        assert (cache.hits, cache.misses) == (1, 3)  # the image prompt is re-encoded; text alone does not tile
        n = int(one.mask[0].sum())
        assert n < int(five.mask[0].sum())  # 1 tile: fewer image tokens
        assert torch.equal(one.features[0, :n], vlm([p]).features[0, :n])
    finally:
        vlm.set_tiles(5)
    assert torch.equal(cache([p]).features[0], five.features[0]) and (cache.hits, cache.misses) == (2, 3)

    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16-mixed training encodes under autocast
        amp = cache([A])
    assert (cache.hits, cache.misses) == (2, 4)
    n = int(amp.mask[0].sum())
    assert not torch.equal(amp.features[0, :n].float(), five.features[1, :n])
    assert torch.equal(cache([A]).features[0, :n], five.features[1, :n]) and cache.hits == 3  # fp32 entry again


# ---------------------------------------------------------------------------------------------- training
def train_config(cache: str | None, steps: int, batch_size: int) -> dict:
    return merge(load_base(), {
        "candidate": "lap", "encoder": {"preset": "tiny-vlm-random", "cache": cache},
        "dit": {"dim": 32, "depth": 4, "heads": 2, "patch": 8}, "conditioner": {"heads": 2},
        "train": {"steps": steps, "batch_size": batch_size, "ckpt_every": 1000, "log_every": 1},
        "optim": {"warmup_steps": 2}, "data": {"tasks": {"t2i": 1.0, "reconstruction": 1.0, "edit": 1.0}},
    })


def test_training_with_the_cache_reads_it_and_matches_training_without(tmp_path: Path, monkeypatch) -> None:
    import experiments.train as train_mod

    steps, bs = 6, 4
    setting = train_mod.apply_model_settings

    def perturbed(module, config) -> None:  # adaLN-zero: at init the DiT ignores its condition, so wrong
        g = torch.Generator().manual_seed(0)  # features would hardly change the first losses; open it (seeded)
        with torch.no_grad():
            for q in module.dit.parameters():
                q.add_(torch.randn(q.shape, generator=g) * 0.05)
        setting(module, config)

    monkeypatch.setattr(train_mod, "apply_model_settings", perturbed)
    calls: list[int] = []
    forward = FrozenEncoder.forward

    def counting(self, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return forward(self, prompts, *args, **kwargs)

    monkeypatch.setattr(FrozenEncoder, "forward", counting)

    def run(name: str, cache: str | None):
        calls.clear()
        module = train_mod.train(train_config(cache, steps, bs), tmp_path / name)
        losses = torch.tensor(pd.read_csv(tmp_path / name / "logs" / "metrics.csv")["train/loss"].tolist())
        weights = {k: v for k, v in module.state_dict().items() if not k.startswith("encoder.")}
        return module, losses, weights, list(calls)

    # The captions training will see (batches of one task each: text, reconstruction or edit Prompts).
    cfg = train_config(None, steps, bs)
    stream = iter(ShapesStream(seed=cfg["seed"], size=cfg["data"]["size"], batch_size=bs,
                               long_caption_prob=cfg["data"]["long_caption_prob"], tasks=cfg["data"]["tasks"]))
    captions = [next(stream)["caption"] for _ in range(steps * bs)]
    assert {type(c) for c in captions} == {str, Prompt} and any(isinstance(c, Prompt) and c.text for c in captions)
    root = tmp_path / "cache"
    FeatureCache(root, build_encoder("tiny-vlm-random")).fill(captions[::2], batch_size=3)  # half, other batches
    assert len(shards(root)) == 1

    _, plain, w_plain, calls_plain = run("plain", None)
    assert calls_plain == [bs] * steps and len(shards(root)) == 1

    module, cold, w_cold, calls_cold = run("half_cached", str(root))
    cache = module.feature_cache()
    assert calls_cold == [bs // 2] * steps and (cache.hits, cache.misses) == (steps * bs // 2,) * 2
    assert len(shards(root)) == 2  # the misses, written when training ended (the module is still alive)

    module, warm, w_warm, calls_warm = run("cached", str(root))
    cache = module.feature_cache()
    assert calls_warm == [] and (cache.hits, cache.misses, cache.encoder_calls) == (steps * bs, 0, 0)
    assert len(shards(root)) == 2  # nothing new to write

    assert torch.equal(warm, cold) and all(torch.equal(w_warm[k], w_cold[k]) for k in w_cold)  # the same rows
    # Cached rows computed in other batches differ from on-the-fly ones by float32 round-off (features <= ~1e-6);
    # measured here: identical losses, weights within 1.2e-7. Rows given to the wrong prompts move the losses by
    # up to 1.2e-4 and the weights by 1.4e-2, so these tolerances catch a cache that serves wrong rows.
    torch.testing.assert_close(cold, plain, rtol=0, atol=1e-6)
    for k in w_plain:
        torch.testing.assert_close(w_cold[k], w_plain[k], rtol=0, atol=1e-5, msg=k)


def test_module_cache_setting(tmp_path: Path, monkeypatch) -> None:
    from models.module import UniFusionModule

    monkeypatch.setenv("UNIFUSION_CACHE", str(tmp_path))
    cfg = merge(train_config("auto", 1, 2), {"encoder": {"verifi": True}})
    m = UniFusionModule(cfg)
    m.encoder.verifi = type(m.encoder.verifi)(template=m.encoder.verifi.template, stop=m.encoder.verifi.stop,
                                              max_new_tokens=2)
    m.encode([A])  # VERIFI: encoded from the rewrite, never through the disk cache
    assert m._feature_cache is None
    m.encode([A, Prompt(C, (scene(3),))], verifi=False)
    cache = m.feature_cache()
    assert cache.folder.parent == tmp_path / "features" and cache.misses == 2
    m.on_train_end()
    assert len(shards(tmp_path / "features")) == 1
    with pytest.raises(ValueError, match="encoder.cache must be null, 'auto' or a folder"):
        UniFusionModule(train_config(3, 1, 2))


def test_a_null_cache_key_leaves_run_directories_as_they_were() -> None:
    cfg = load_base()
    assert cfg["encoder"]["cache"] is None  # off by default: committed results are unchanged
    before = copy.deepcopy(cfg)
    del before["encoder"]["cache"]  # a config from before the key existed
    assert config_hash(cfg) == config_hash(before)
    assert config_hash(merge(cfg, {"encoder": {"cache": "auto"}})) != config_hash(cfg)
