"""Shapes world: exact geometry, layout rules, GenEval prompt conventions, descriptions, vocabulary, the stream."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from common.geneval_spec import TASKS, relative_position
from experiments.data.shapes import ShapesStream
from experiments.data.sharding import owns_batch
from world import scene as sw
from world.descriptions import describe
from world.prompts import render_geneval_folder, sample_prompt, satisfies, scene_for_prompt, write_geneval_metadata
from world.scene import BACKGROUND, CLASSES, COLORS, PALETTE, Obj, Scene, render, sample_scene
from world.vocab import ALL_TOKENS


def words(text: str) -> list[str]:
    """The tokenizer's split: whitespace, then punctuation isolated."""
    return re.findall(r"[A-Za-z0-9]+|[^\sA-Za-z0-9]", text.lower())


def naive_inside(cls: str, cx: int, cy: int, r: int, x: int, y: int) -> bool:
    """Point-in-shape for one pixel centre, written independently (triangle by half-plane tests)."""
    if cls == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if cls == "square":
        return cx - r <= x <= cx + r and cy - r <= y <= cy + r
    # triangle apex (cx, cy - r), base (cx - r, cy + r), (cx + r, cy + r): inside all three edges (cross products)
    pts = [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    signs = []
    for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1], strict=True):
        signs.append((x1 - x0) * (y - y0) - (y1 - y0) * (x - x0))
    return all(s >= 0 for s in signs) or all(s <= 0 for s in signs)


def test_constants_match_design() -> None:
    assert list(PALETTE.items()) == [
        ("red", (230, 25, 25)), ("green", (25, 170, 25)), ("blue", (30, 60, 230)), ("yellow", (240, 220, 30)),
        ("purple", (150, 40, 190)), ("orange", (245, 130, 20)), ("black", (10, 10, 10)), ("white", (245, 245, 245)),
    ]
    assert COLORS == tuple(PALETTE) and CLASSES == ("circle", "square", "triangle") and BACKGROUND == (128, 128, 128)
    assert sw.radius_range(32) == (4, 5) and sw.radius_range(64) == (7, 10)
    with pytest.raises(ValueError, match="32, 64"):
        sw.radius_range(48)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("r", [4, 5, 7, 10])
def test_render_matches_naive_geometry_and_box(cls: str, r: int) -> None:
    scene = Scene((Obj(cls, "blue", 20, 17, r),), 64)
    img = render(scene)
    assert img.dtype == np.uint8 and img.shape == (64, 64, 3)
    want = np.array([[naive_inside(cls, 20, 17, r, x, y) for x in range(64)] for y in range(64)])
    got = (img == PALETTE["blue"]).all(-1)
    np.testing.assert_array_equal(got, want)
    assert ((img == BACKGROUND).all(-1) | got).all()  # no anti-aliased in-between pixels
    ys, xs = np.nonzero(got)
    assert scene.objects[0].box == (xs.min(), ys.min(), xs.max(), ys.max())


def test_pixel_counts_hand_computed() -> None:
    # r = 4: lattice points in a disc of radius 4 = 49; square 9x9 = 81; triangle rows 1,1,3,3,5,5,7,7,9 = 41
    counts = {c: int((render(Scene((Obj(c, "red", 10, 10, 4),), 32)) == PALETTE["red"]).all(-1).sum()) for c in CLASSES}
    assert counts == {"circle": 49, "square": 81, "triangle": 41}


def test_obj_validation() -> None:
    with pytest.raises(ValueError, match="circle"):
        Obj("hexagon", "red", 5, 5, 4)
    with pytest.raises(ValueError, match="white"):
        Obj("circle", "pink", 5, 5, 4)


@pytest.mark.parametrize("size", [32, 64])
def test_sample_scene_layout_rules(size: int) -> None:
    rng = np.random.default_rng(1)
    lo, hi = size / 10, size / 6
    ns = set()
    for _ in range(300):
        scene = sample_scene(rng, size)
        ns.add(len(scene.objects))
        assert 1 <= len(scene.objects) <= 4
        for o in scene.objects:
            assert lo <= o.r <= hi
            x1, y1, x2, y2 = o.box
            assert x1 >= 0 and y1 >= 0 and x2 <= size - 1 and y2 <= size - 1
        # at least one background pixel between boxes: boxes grown by 1 px on one side still do not intersect
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1:]:
                ax1, ay1, ax2, ay2 = a.box
                bx1, by1, bx2, by2 = b.box
                assert ax2 + 1 < bx1 or bx2 + 1 < ax1 or ay2 + 1 < by1 or by2 + 1 < ay1
    assert ns == {1, 2, 3, 4}
    assert len(sample_scene(rng, size, n_objects=4).objects) == 4
    with pytest.raises(ValueError, match="1..4"):
        sample_scene(rng, size, n_objects=5)


def test_scene_json_round_trip() -> None:
    scene = sample_scene(np.random.default_rng(3), 32, n_objects=3)
    data = json.loads(json.dumps(scene.to_json()))
    assert Scene.from_json(data) == scene


def test_relative_position_hand_values() -> None:
    # offset (-10, 0); revised |10| - 0.1 * (4 + 4) = 9.2 -> dx = -0.92
    assert relative_position((0, 0, 4, 4), (10, 0, 14, 4)) == {"left of"}
    assert relative_position((10, 0, 14, 4), (0, 0, 4, 4)) == {"right of"}
    # diagonal: revised (-9.2, -9.2) / 14.14 = -0.65 on both axes
    assert relative_position((0, 0, 4, 4), (10, 10, 14, 14)) == {"left of", "above"}
    assert relative_position((0, 10, 4, 14), (0, 0, 4, 4)) == {"below"}
    # offset 0.5 is inside the 0.1 * (4 + 4) margin -> too close, empty set
    assert relative_position((0, 0, 4, 4), (0.5, 0, 4.5, 4)) == set()
    # mostly vertical: offset (-3, -10) -> revised (-2.2, -9.2) / 10.44 = (-0.21, -0.88): only "above"
    assert relative_position((0, 0, 4, 4), (3, 10, 7, 14)) == {"above"}


def test_prompt_templates_are_genevals() -> None:
    rng = np.random.default_rng(0)
    seen: dict[str, set[str]] = {t: set() for t in TASKS}
    for _ in range(400):
        for t in TASKS:
            seen[t].add(sample_prompt(rng, t)["prompt"])
    assert seen["single_object"] == {"a photo of a circle", "a photo of a square", "a photo of a triangle"}
    assert "a photo of a circle and a square" in seen["two_object"]
    assert "a photo of a circle and a circle" not in seen["two_object"]
    assert seen["counting"] >= {"a photo of two circles", "a photo of three squares", "a photo of four triangles"}
    assert "a photo of a red circle" in seen["colors"] and "a photo of an orange square" in seen["colors"]
    assert "a photo of a circle left of a square" in seen["position"]
    assert "a photo of a red circle and a blue square" in seen["color_attr"]
    assert "a photo of an orange triangle and a white circle" in seen["color_attr"]
    with pytest.raises(ValueError, match="single_object"):
        sample_prompt(rng, "counting_objects")


def test_prompt_metadata_structure() -> None:
    rng = np.random.default_rng(5)
    for _ in range(100):
        c = sample_prompt(rng, "counting")
        n = c["include"][0]["count"]
        assert 2 <= n <= 4 and c["exclude"] == [{"class": c["include"][0]["class"], "count": n + 1}]
        p = sample_prompt(rng, "position")
        b, a = p["include"]
        assert "position" not in b and a["position"][1] == 0 and a["class"] != b["class"]
        assert p["prompt"] == f"a photo of a {a['class']} {a['position'][0]} a {b['class']}"
        ca = sample_prompt(rng, "color_attr")
        x, y = ca["include"]
        assert x["class"] != y["class"] and x["color"] != y["color"]
    assert json.loads(json.dumps(p)) == p  # position tuples are lists, JSON round-trips unchanged


@pytest.mark.parametrize("size", [32, 64])
def test_scene_for_prompt_satisfies_geneval(size: int) -> None:
    rng = np.random.default_rng(7)
    for _ in range(60):
        for task in TASKS:
            meta = sample_prompt(rng, task)
            scene = scene_for_prompt(meta, rng, size)
            assert satisfies(meta, scene)
            # independent checks: exactly the included objects, colours honoured, position relation by hand
            want = sorted((cl["class"], cl.get("color")) for cl in meta["include"] for _ in range(cl["count"]))
            got = sorted((o.cls, o.color if any("color" in cl for cl in meta["include"]) else None)
                         for o in scene.objects)
            assert got == want
            if task == "position":
                b_cls, (rel, _) = meta["include"][0]["class"], meta["include"][1]["position"]
                a = next(o for o in scene.objects if o.cls == meta["include"][1]["class"])
                b = next(o for o in scene.objects if o.cls == b_cls)
                (ax, ay), (bx, by) = (a.cx, a.cy), (b.cx, b.cy)
                dx, dy = ax - bx, ay - by
                d = (2 * a.r + 2 * b.r)
                # hand form of the rule for equal-sided boxes: revised = max(|off| - 0.1 d, 0)
                rx = max(abs(dx) - 0.1 * d, 0) * np.sign(dx) / np.hypot(dx, dy)
                ry = max(abs(dy) - 0.1 * d, 0) * np.sign(dy) / np.hypot(dx, dy)
                assert {"left of": rx < -0.5, "right of": rx > 0.5, "above": ry < -0.5, "below": ry > 0.5}[rel]


def test_satisfies_rejects_violations() -> None:
    meta = {"tag": "counting", "include": [{"class": "circle", "count": 2}],
            "exclude": [{"class": "circle", "count": 3}], "prompt": "a photo of two circles"}
    two = Scene((Obj("circle", "red", 5, 5, 4), Obj("circle", "blue", 20, 20, 4)), 32)
    three = Scene(two.objects + (Obj("circle", "red", 5, 20, 4),), 32)
    assert satisfies(meta, two) and not satisfies(meta, three) and not satisfies(meta, Scene(two.objects[:1], 32))
    pos = {"tag": "position", "include": [{"class": "square", "count": 1},
                                          {"class": "circle", "count": 1, "position": ["left of", 0]}], "prompt": ""}
    left = Scene((Obj("circle", "red", 5, 15, 4), Obj("square", "blue", 25, 15, 4)), 32)
    right = Scene((Obj("circle", "red", 25, 15, 4), Obj("square", "blue", 5, 15, 4)), 32)
    assert satisfies(pos, left) and not satisfies(pos, right)
    col = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}], "prompt": ""}
    assert satisfies(col, left) and not satisfies(col, Scene((Obj("circle", "blue", 5, 15, 4),), 32))
    with pytest.raises(ValueError, match="triangle"):
        scene_for_prompt({"tag": "colors", "include": [{"class": "cat", "count": 1}]}, np.random.default_rng(0))
    with pytest.raises(ValueError, match="1..4"):
        scene_for_prompt({"tag": "counting", "include": [{"class": "circle", "count": 5}]},
                         np.random.default_rng(0))


def test_describe_hand_example() -> None:
    scene = Scene((Obj("square", "blue", 26, 16, 4), Obj("circle", "red", 5, 5, 4), Obj("circle", "red", 5, 26, 4)),
                  32)
    assert describe(scene) == (
        "a picture of three objects on a plain gray background: two red circles and a blue square. "
        "a red circle is in the top left part. the blue square is in the right part. "
        "a red circle is in the bottom left part."
    )
    pair = Scene((Obj("triangle", "orange", 16, 16, 4), Obj("circle", "red", 5, 5, 4)), 32)
    assert describe(pair) == (
        "a picture of two objects on a plain gray background: a red circle and an orange triangle. "
        "the red circle is in the top left part. the orange triangle is in the middle. "
        "the red circle is left of the orange triangle. the red circle is above the orange triangle."
    )


def test_every_world_text_is_in_vocab() -> None:
    vocab = set(ALL_TOKENS)
    rng = np.random.default_rng(11)
    texts = [sample_prompt(rng, t)["prompt"] for _ in range(300) for t in TASKS]
    texts += [describe(sample_scene(rng, s)) for _ in range(300) for s in (32, 64)]
    unknown = {w for t in texts for w in words(t)} - vocab
    assert not unknown, f"words missing from vocab.WORDS: {sorted(unknown)}"
    from models.tokenizer import shapes_tokenizer

    tok = shapes_tokenizer()
    assert all(tok.unk_token_id not in tok(t)["input_ids"] for t in texts[::25])


def test_stream_is_pure_function_of_seed_and_index() -> None:
    items = [x for _, x in zip(range(12), ShapesStream(seed=4), strict=False)]
    resumed = [x for _, x in zip(range(4), ShapesStream(seed=4, start_index=8), strict=False)]
    for a, b in zip(items[8:], resumed, strict=True):
        assert a["index"] == b["index"] and a["caption"] == b["caption"] and torch.equal(a["image"], b["image"])
    other = next(iter(ShapesStream(seed=5)))
    assert not torch.equal(other["image"], items[0]["image"]) or other["caption"] != items[0]["caption"]
    for it in items:
        img = it["image"]
        assert img.dtype == torch.float32 and img.shape == (3, 32, 32) and img.min() >= -1 and img.max() <= 1
        expect = torch.from_numpy(render(Scene.from_json(it["scene"]))).permute(2, 0, 1).float() / 127.5 - 1
        assert torch.equal(img, expect)


def test_stream_captions_match_scenes() -> None:
    for it in zip(range(40), ShapesStream(seed=1, long_caption_prob=1.0), strict=False):
        item = it[1]
        assert item["caption"] == describe(Scene.from_json(item["scene"]))
    tags = set()
    for _, item in zip(range(200), ShapesStream(seed=1, long_caption_prob=0.0), strict=False):
        assert item["caption"].startswith("a photo of")
        tags.add(len(item["scene"]["objects"]))
    assert tags == {1, 2, 3, 4}


def test_stream_workers_split_by_index() -> None:
    stream = ShapesStream(seed=2, start_index=3)
    assert [i for _, i in zip(range(4), stream.indices(1, 2), strict=False)] == [4, 6, 8, 10]
    loader = DataLoader(stream, batch_size=None, num_workers=2)
    got = sorted(x["index"] for _, x in zip(range(10), loader, strict=False))
    assert got == list(range(3, 13))
    # batch_size-aware split: multi-worker batches arrive exactly in index order
    batched = ShapesStream(seed=2, start_index=3, batch_size=4)
    loader = DataLoader(batched, batch_size=4, num_workers=2, collate_fn=lambda xs: [x["index"] for x in xs])
    order = [i for _, b in zip(range(3), loader, strict=False) for i in b]
    assert order == list(range(3, 15))


@pytest.mark.parametrize(("world", "workers"), [(2, 0), (2, 2), (3, 2)])
def test_stream_ranks_read_disjoint_batches_that_tile_the_global_batch(world: int, workers: int) -> None:
    """DDP ranks (x DataLoader workers): step s of the job reads global batches s*world .. s*world + world - 1,
    rank r the r-th of them, so together they read the world-1 stream's items in order, none twice."""
    bs, steps, start_step = 3, 4, 2
    start = start_step * world * bs  # a run resumed at step 2
    per_rank = []
    for rank in range(world):
        stream = ShapesStream(seed=2, start_index=start, batch_size=bs, rank=rank, world_size=world)
        loader = DataLoader(stream, batch_size=bs, num_workers=workers,
                            collate_fn=lambda xs: [x["index"] for x in xs])
        per_rank.append([b for _, b in zip(range(steps), loader, strict=False)])
    order = [i for s in range(steps) for r in range(world) for i in per_rank[r][s]]
    assert order == list(range(start, start + steps * world * bs))
    # indices() is owns_batch solved for the offset: each (rank, worker) yields exactly the blocks it owns
    for rank in range(world):
        stream = ShapesStream(seed=2, start_index=start, batch_size=bs, rank=rank, world_size=world)
        for wid in range(max(workers, 1)):
            got = [i for _, i in zip(range(5 * bs), stream.indices(wid, max(workers, 1)), strict=False)]
            offsets = sorted({(i - start) // bs for i in got})
            owned = [o for o in range(offsets[-1] + 1) if owns_batch(o, rank, world, wid, max(workers, 1))]
            assert offsets == owned and len(offsets) == 5
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size\).*rank=2, world_size=2"):
        ShapesStream(seed=0, rank=2, world_size=2)


def test_write_geneval_metadata(tmp_path) -> None:
    meta = write_geneval_metadata(tmp_path / "evaluation_metadata.jsonl", n_per_task=5, seed=0)
    lines = [json.loads(line) for line in (tmp_path / "evaluation_metadata.jsonl").read_text().splitlines()]
    assert lines == meta
    assert [m["tag"] for m in meta] == ["single_object"] * 3 + [t for t in TASKS[1:] for _ in range(5)]
    assert len({json.dumps(m, sort_keys=True) for m in meta}) == len(meta)
    assert write_geneval_metadata(tmp_path / "again.jsonl", 5, 0) == meta
    full = write_geneval_metadata(tmp_path / "all.jsonl", n_per_task=1000, seed=1)
    counts = {t: sum(m["tag"] == t for m in full) for t in TASKS}
    assert counts == {"single_object": 3, "two_object": 6, "counting": 9, "colors": 24, "position": 24,
                      "color_attr": 336}


def test_render_geneval_folder_layout(tmp_path) -> None:
    meta = write_geneval_metadata(tmp_path / "m.jsonl", n_per_task=2, seed=3)
    out = render_geneval_folder(meta, tmp_path / "imgs", n_samples=2, seed=9, size=64)
    dirs = sorted(p.name for p in out.iterdir())
    assert dirs == [f"{i:05d}" for i in range(len(meta))]
    for i, m in enumerate(meta):
        with open(out / f"{i:05d}" / "metadata.jsonl") as fp:
            assert json.load(fp) == m  # GenEval reads it with json.load: one object
        files = sorted(p.name for p in (out / f"{i:05d}" / "samples").iterdir())
        assert files == ["00000.png", "00001.png"]
        png = np.asarray(Image.open(out / f"{i:05d}" / "samples" / "00001.png"))
        assert np.array_equal(png, render(scene_for_prompt(m, np.random.default_rng([9, i, 1]), 64)))


def test_caption_block_makes_batches_all_short_or_all_long() -> None:
    from experiments.data.shapes import ShapesStream, stream_item

    stream = iter(ShapesStream(seed=4, long_caption_prob=0.5, batch_size=8))
    kinds = []
    for _ in range(12):
        batch = [next(stream) for _ in range(8)]
        long = {item["caption"].startswith("a picture of") for item in batch}
        assert len(long) == 1, [item["caption"] for item in batch]  # one kind per batch
        kinds.append(long.pop())
    assert 0 < sum(kinds) < 12  # both kinds occur
    # still a pure function of (seed, index, block)
    a, b = stream_item(4, 13, caption_block=8), stream_item(4, 13, caption_block=8)
    assert a["caption"] == b["caption"] and torch.equal(a["image"], b["image"])


def test_parse_prompt_inverts_sample_prompt() -> None:
    from world.prompts import parse_prompt

    rng = np.random.default_rng(5)
    for task in TASKS:
        for _ in range(200):
            meta = sample_prompt(rng, task)
            assert parse_prompt(meta["prompt"]) == meta
    for text in ("a photo of a red circle and a square", "a photo of five circles", "a picture of a circle",
                 "a photo of a red circle left of a square", "a photo of a hexagon"):
        with pytest.raises(ValueError, match="not a shapes-world GenEval prompt|unknown"):
            parse_prompt(text)
