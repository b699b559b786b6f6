"""GenEval prompts of the shapes world: sampling, GenEval's correctness rule on a scene, scenes for a prompt.

A prompt is a GenEval metadata object ``{"tag", "include", "exclude"?, "prompt"}`` over the world's classes and
colours (``world.scene``); the task list and the relation rule are GenEval's (``common.geneval_spec``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common.geneval_spec import RELATIONS, TASKS, relative_position
from world.scene import CLASSES, COLORS, MAX_OBJECTS, NUMBER_WORDS, PALETTE, Obj, Scene, place, render


def _robust_relations(a: Obj, b: Obj) -> set[str]:
    """Relations of a to b that hold for inclusive boxes AND for exclusive (x2+1) boxes, whichever a scorer uses."""
    incl = relative_position(a.box, b.box)
    excl = relative_position(tuple(v + (1 if k >= 2 else 0) for k, v in enumerate(a.box)),
                             tuple(v + (1 if k >= 2 else 0) for k, v in enumerate(b.box)))
    return incl & excl


def article(word: str) -> str:
    """GenEval's ``with_article``: "an" before a vowel."""
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _pick(rng: np.random.Generator, options: tuple[str, ...], k: int) -> list[str]:
    return [options[i] for i in rng.choice(len(options), size=k, replace=False)]


def sample_prompt(rng: np.random.Generator, task: str) -> dict[str, Any]:
    """One GenEval metadata object ``{"tag", "include", "exclude"?, "prompt"}`` for ``task`` in this world.

    Mirrors GenEval's ``create_prompts.py``: distinct classes for two-object / position / colour-attribution
    prompts, distinct colours for colour attribution, counts 2–4 with an exclude of N+1, position ``include[0]``
    the target B and ``include[1]`` the object A with ``"position": [rel, 0]``; same prompt templates and articles.
    """
    if task == "single_object":
        (c,) = _pick(rng, CLASSES, 1)
        return {"tag": task, "include": [{"class": c, "count": 1}], "prompt": f"a photo of {article(c)}"}
    if task == "two_object":
        a, b = _pick(rng, CLASSES, 2)
        return {"tag": task, "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
                "prompt": f"a photo of {article(a)} and {article(b)}"}
    if task == "counting":
        (c,) = _pick(rng, CLASSES, 1)
        n = int(rng.integers(2, 4, endpoint=True))
        return {"tag": task, "include": [{"class": c, "count": n}], "exclude": [{"class": c, "count": n + 1}],
                "prompt": f"a photo of {NUMBER_WORDS[n]} {c}s"}
    if task == "colors":
        (c,) = _pick(rng, CLASSES, 1)
        (col,) = _pick(rng, COLORS, 1)
        return {"tag": task, "include": [{"class": c, "count": 1, "color": col}],
                "prompt": f"a photo of {article(col)} {c}"}
    if task == "position":
        a, b = _pick(rng, CLASSES, 2)
        rel = RELATIONS[rng.integers(len(RELATIONS))]
        return {"tag": task, "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
                "prompt": f"a photo of {article(a)} {rel} {article(b)}"}
    if task == "color_attr":
        a, b = _pick(rng, CLASSES, 2)
        ca, cb = _pick(rng, COLORS, 2)
        return {"tag": task,
                "include": [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
                "prompt": f"a photo of {article(ca)} {a} and {article(cb)} {b}"}
    raise ValueError(f"unknown task {task!r}; valid: {TASKS}")


_WORDS = {"a": 1, "an": 1, **{w: n for n, w in NUMBER_WORDS.items()}}


def parse_prompt(text: str) -> dict[str, Any]:
    """The GenEval metadata object of a prompt text written by ``sample_prompt`` (its inverse): "a photo of a red
    circle" -> ``{"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}], "prompt": ...}``.

    What a generator that only sees the text (``evals.generate --callable``) needs to draw the scene exactly;
    text outside the six templates raises ValueError.
    """
    words = text.strip().split(" ")
    if words[:3] != ["a", "photo", "of"]:
        raise ValueError(f"not a shapes-world GenEval prompt (must start 'a photo of'): {text!r}")
    rest = words[3:]

    def obj(tokens: list[str]) -> dict[str, Any] | None:
        """[article, (colour,) class] -> a clause; None when the tokens are not one object."""
        if len(tokens) == 2 and tokens[0] in ("a", "an") and tokens[1] in CLASSES:
            return {"class": tokens[1], "count": 1}
        if len(tokens) == 3 and tokens[0] in ("a", "an") and tokens[1] in COLORS and tokens[2] in CLASSES:
            return {"class": tokens[2], "count": 1, "color": tokens[1]}
        return None

    def result(tag: str, include: list[dict], exclude: list[dict] | None = None) -> dict[str, Any]:
        meta = {"tag": tag, "include": include, **({"exclude": exclude} if exclude else {}), "prompt": text}
        _check_meta(meta)
        return meta

    if (single := obj(rest)) is not None:
        return result("colors" if "color" in single else "single_object", [single])
    if len(rest) == 2 and rest[0] in NUMBER_WORDS.values() and rest[1].endswith("s") and rest[1][:-1] in CLASSES:
        n = _WORDS[rest[0]]
        return result("counting", [{"class": rest[1][:-1], "count": n}], [{"class": rest[1][:-1], "count": n + 1}])
    if "and" in rest:
        cut = rest.index("and")
        a, b = obj(rest[:cut]), obj(rest[cut + 1:])
        if a is not None and b is not None and ("color" in a) == ("color" in b):
            return result("color_attr" if "color" in a else "two_object", [a, b])
    for rel in RELATIONS:
        rw = rel.split(" ")
        for cut in range(1, len(rest)):
            if rest[cut: cut + len(rw)] == rw:
                a, b = obj(rest[:cut]), obj(rest[cut + len(rw):])
                if a is not None and b is not None and "color" not in a and "color" not in b:
                    return result("position", [b, {**a, "position": [rel, 0]}])
    raise ValueError(f"not a shapes-world GenEval prompt: {text!r}")


def _check_meta(meta: dict[str, Any]) -> None:
    if meta.get("tag") not in TASKS:
        raise ValueError(f"unknown tag {meta.get('tag')!r}; valid: {TASKS}")
    clauses = list(meta.get("include", [])) + list(meta.get("exclude", []))
    if not meta.get("include"):
        raise ValueError("metadata needs a non-empty 'include' list")
    for cl in clauses:
        if cl.get("class") not in CLASSES:
            raise ValueError(f"unknown class {cl.get('class')!r}; valid: {CLASSES}")
        if "color" in cl and cl["color"] not in PALETTE:
            raise ValueError(f"unknown colour {cl['color']!r}; valid: {COLORS}")
        if "position" in cl:
            rel, target = cl["position"]
            if rel not in RELATIONS:
                raise ValueError(f"unknown relation {rel!r}; valid: {RELATIONS}")
            if not 0 <= int(target) < len(meta["include"]):
                raise ValueError(f"position target {target} out of range of include (len {len(meta['include'])})")
    total = sum(int(cl.get("count", 1)) for cl in meta["include"])
    if not 1 <= total <= MAX_OBJECTS:
        raise ValueError(f"metadata asks for {total} objects; this world holds 1..{MAX_OBJECTS} per image")


def satisfies(meta: dict[str, Any], scene: Scene) -> bool:
    """GenEval's correctness rule applied to the scene's ground truth (objects in scene order = score order).

    Include clauses: the first ``count`` objects of the class must exist and carry the colour if one is
    required; a position clause needs the relation against the target group's found objects. Exclude clauses
    fail when the class occurs ``count`` times or more.
    """
    _check_meta(meta)
    by_cls: dict[str, list[Obj]] = {c: [o for o in scene.objects if o.cls == c] for c in CLASSES}
    matched: list[list[Obj] | None] = []
    ok = True
    for cl in meta["include"]:
        found = by_cls[cl["class"]][: int(cl["count"])]
        good = len(found) >= int(cl["count"])
        if good and "color" in cl:
            good = sum(o.color == cl["color"] for o in found) >= int(cl["count"])
        if good and "position" in cl:
            rel, target = cl["position"]
            tgt = matched[int(target)] if int(target) < len(matched) else None
            good = tgt is not None and all(rel in relative_position(a.box, b.box) for a in found for b in tgt)
        matched.append(found if good else None)
        ok = ok and good
    for cl in meta.get("exclude", []):
        if len(by_cls[cl["class"]]) >= int(cl["count"]):
            ok = False
    return ok


def scene_for_prompt(meta: dict[str, Any], rng: np.random.Generator, size: int = 32) -> Scene:
    """A random scene that satisfies ``meta`` under GenEval's rules (``satisfies`` holds; checked, not hoped).

    The scene holds exactly the included objects (``count`` of each class, the required colour or a random one),
    no distractors: so counts are exact, the top-``count`` objects of a class are unambiguous, and excluded kinds
    never appear. Position relations are rejection-sampled to hold for inclusive and exclusive box conventions.
    """
    _check_meta(meta)
    specs: list[tuple[str, str]] = []
    for cl in meta["include"]:
        for _ in range(int(cl["count"])):
            specs.append((cl["class"], cl.get("color") or COLORS[rng.integers(len(COLORS))]))
    clauses = meta["include"]
    while True:
        objs = place(rng, size, specs)
        if objs is None:
            continue
        scene = Scene(objs, size)
        # map each include clause to its objects (specs are laid out clause by clause)
        groups, k = [], 0
        for cl in clauses:
            groups.append(objs[k: k + int(cl["count"])])
            k += int(cl["count"])
        pos_ok = all(
            cl["position"][0] in _robust_relations(a, b)
            for cl, grp in zip(clauses, groups, strict=True) if "position" in cl
            for a in grp for b in groups[int(cl["position"][1])]
        )
        if pos_ok and satisfies(meta, scene):
            return scene


def _distinct_prompts(task: str) -> int:
    """How many distinct metadata objects ``sample_prompt(·, task)`` can produce."""
    nc, nk = len(CLASSES), len(COLORS)
    return {"single_object": nc, "two_object": nc * (nc - 1), "counting": nc * len(NUMBER_WORDS),
            "colors": nc * nk, "position": nc * (nc - 1) * len(RELATIONS),
            "color_attr": nc * (nc - 1) * nk * (nk - 1)}[task]


def sample_geneval_metadata(n_per_task: int, seed: int) -> list[dict[str, Any]]:
    """A shapes-world GenEval prompt set: for each task in TASKS order, prompts drawn with ``sample_prompt`` from
    ``default_rng(seed)`` and de-duplicated until ``n_per_task`` distinct ones are found. Tasks with fewer distinct
    prompts contribute all of them: single_object 3, two_object 6, counting 9, colors 24, position 24 (color_attr
    has 336)."""
    if n_per_task < 1:
        raise ValueError(f"n_per_task must be >= 1, got {n_per_task}")
    rng = np.random.default_rng(seed)
    out: list[dict[str, Any]] = []
    for task in TASKS:
        want = min(n_per_task, _distinct_prompts(task))
        seen: set[str] = set()
        while len(seen) < want:
            meta = sample_prompt(rng, task)
            key = json.dumps(meta, sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append(meta)
    return out


def write_geneval_metadata(path: str | Path, n_per_task: int, seed: int) -> list[dict[str, Any]]:
    """Write ``sample_geneval_metadata(n_per_task, seed)`` as an ``evaluation_metadata.jsonl`` (one JSON object per
    line) and return its objects."""
    out = sample_geneval_metadata(n_per_task, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(m) + "\n" for m in out))
    return out


def render_geneval_folder(metadata: list[dict[str, Any]], out_dir: str | Path, n_samples: int = 4, seed: int = 0,
                          size: int = 32) -> Path:
    """Clean renders in GenEval's official layout; returns ``out_dir``.

    ``<out>/<NNNNN>/metadata.jsonl`` holds the prompt's ONE metadata object (``json.dump``, as GenEval's generator
    writes it) and ``<out>/<NNNNN>/samples/<k:05d>.png`` the k-th render of ``scene_for_prompt`` with
    ``default_rng([seed, NNNNN, k])``.
    """
    out_dir = Path(out_dir)
    for idx, meta in enumerate(metadata):
        sub = out_dir / f"{idx:05d}"
        (sub / "samples").mkdir(parents=True, exist_ok=True)
        with open(sub / "metadata.jsonl", "w") as fp:
            json.dump(meta, fp)
        for k in range(n_samples):
            scene = scene_for_prompt(meta, np.random.default_rng([seed, idx, k]), size)
            Image.fromarray(render(scene)).save(sub / "samples" / f"{k:05d}.png")
    return out_dir
