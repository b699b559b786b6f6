"""Shapes-world prompt sets for GenEval, DPG-Bench and GenAI-Bench, in each benchmark's own file format: with
them a generator can be checked offline, end to end, by the exact judges of the shapes world (no weights).

    python -m evals.generate --benchmark geneval --prompts shapes --callable ... --out images/geneval

writes the benchmark's prompt file into ``--out``, beside the images (the scorers ignore loose files there), and
generates from it:

  geneval  <out>/evaluation_metadata.jsonl      18 prompts, 3 per GenEval task (``world.prompts``); scored by
                                                ``evals.geneval --judge shapes`` (the prompt folders hold them too)
  dpg      <out>/dpg_bench.csv                  20 dense descriptions of 2-4 object scenes with their DSG questions,
                                                the official CSV header (``world.dpg_questions``); scored by
                                                ``evals.dpg_refined --questions <out>/dpg_bench.csv --judge oracle``
  genai    <out>/genai_image.json, genai_skills.json   the 18 GenEval-style prompts as GenAI-Bench prompts (the
                                                tasks in turn), tagged with GenAI-Bench skills (``GENAI_SKILLS``),
                                                basic and advanced in the first 3 already; scored by
                                                ``evals.genai_bench --data <out> --judge oracle``

The sets are fixed (seed ``SEED``), so every run writes the same files; ``--limit N`` writes the first N.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SEED = 0
N_PER_TASK = 3  # 6 GenEval tasks x 3 = 18 prompts
N_DPG = 20
PROMPT_FILE = {"geneval": "evaluation_metadata.jsonl", "dpg": "dpg_bench.csv", "genai": "genai_image.json"}
GENAI_SKILLS_FILE = "genai_skills.json"
# GenEval task -> GenAI-Bench tags (a prompt is "basic" unless it needs an advanced skill, as in GenAI-Bench)
GENAI_SKILLS: dict[str, tuple[str, ...]] = {
    "single_object": ("basic",), "two_object": ("basic",), "colors": ("basic", "attribute"),
    "color_attr": ("basic", "attribute"), "position": ("basic", "spatial relation"),
    "counting": ("advanced", "counting"),
}


def shapes_files(benchmark: str, limit: int | None = None) -> dict[str, str]:
    """{file name: text} of ``benchmark``'s shapes-world prompt set (first ``limit`` prompts)."""
    if benchmark in ("geneval", "genai"):
        from world.prompts import sample_geneval_metadata

        metadata = sample_geneval_metadata(N_PER_TASK, SEED)
        if benchmark == "geneval":
            return {PROMPT_FILE["geneval"]: "".join(json.dumps(m) + "\n" for m in metadata[:limit])}
        # one task after the other in turn, so that the first prompts already hold basic and advanced ones
        by_task: dict[str, list[dict[str, Any]]] = {}
        for m in metadata:
            by_task.setdefault(m["tag"], []).append(m)
        metadata = [ms[k] for k in range(N_PER_TASK) for ms in by_task.values() if k < len(ms)][:limit]
        images = {f"{i:05d}": {"id": f"{i:05d}", "prompt": m["prompt"]} for i, m in enumerate(metadata)}
        skills: dict[str, list[int]] = {}
        for i, m in enumerate(metadata):
            for tag in GENAI_SKILLS[m["tag"]]:
                skills.setdefault(tag, []).append(i)
        if "advanced" not in skills or "basic" not in skills:
            raise ValueError(f"--limit {limit} leaves GenAI-Bench's shapes-world set without basic or advanced "
                             "prompts, which it reports apart: use --limit 3 or more")
        return {PROMPT_FILE["genai"]: json.dumps(images, indent=1) + "\n",
                GENAI_SKILLS_FILE: json.dumps(skills, indent=1) + "\n"}
    if benchmark == "dpg":
        from world.dpg_questions import dpg_questions_csv, make_dpg_prompt_set

        text, _ = dpg_questions_csv(make_dpg_prompt_set(N_DPG, SEED)[:limit])
        return {PROMPT_FILE["dpg"]: text}
    raise ValueError(f"unknown benchmark {benchmark!r}; valid: {', '.join(PROMPT_FILE)}")


def write_shapes_prompts(benchmark: str, out_dir: str | Path, limit: int | None = None) -> Path:
    """Write ``shapes_files(benchmark, limit)`` into ``out_dir`` (atomically, each process through its own
    temporary file, since every torchrun process writes them) and return the prompt file, the one
    ``evals.generate.load_prompts`` reads. A folder that already holds images of other prompts (a
    ``generation.json`` but no shapes prompt file), or a prompt file with other content, is refused before
    anything is written."""
    from common.files import atomic_write_text  # a temporary file per process: torchrun ranks all write these

    out = Path(out_dir)
    files = shapes_files(benchmark, limit)
    for name, text in files.items():
        path = out / name
        if path.is_file() and path.read_text(encoding="utf-8") != text:
            raise ValueError(f"{path} holds another prompt set than --prompts shapes writes: write into a new --out")
    if (out / "generation.json").is_file() and not (out / PROMPT_FILE[benchmark]).is_file():
        raise ValueError(f"{out} holds images of other prompts (generation.json, no {PROMPT_FILE[benchmark]}): "
                         "write into a new --out")
    for name, text in files.items():
        if not (out / name).is_file():  # a resumed run finds the same text there
            atomic_write_text(out / name, text)
    return out / PROMPT_FILE[benchmark]


def genai_metadata(prompts: dict[int, str]) -> dict[str, dict[str, Any]]:
    """{prompt text: GenEval metadata} of shapes-world GenAI-Bench prompts (``world.prompts.parse_prompt``), what
    the exact VQAScore (``evals.vqascore.OracleVQAScore``) checks each image against; a prompt outside the shapes
    world raises ValueError naming it."""
    from world.prompts import parse_prompt

    out = {}
    for i in sorted(prompts):
        try:
            out[prompts[i]] = parse_prompt(prompts[i])
        except ValueError:
            raise ValueError(f"--judge oracle scores shapes-world prompts only (python -m evals.generate --benchmark "
                             f"genai --prompts shapes writes them, then --data <that --out>); prompt {i:05d} is not "
                             f"one: {prompts[i]!r}") from None
    return out
