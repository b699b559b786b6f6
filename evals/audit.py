"""Judge audit (paper App. A.3 made measurable): every available judge on shapes-world probes whose answer is known.

    python -m evals.audit --out OUT [--n 20] [--hf-tiny] [--vqascore-hf MODEL_ID] [--dpg-hf MODEL_ID]
                                    [--judge-url http://host:8000/v1 --judge-model SERVED_NAME]

Two probe sets, with ground truth computed from the scene itself, never from a judge:
- **GenEval probes**: per task, ``n`` prompts; each is asked of a render of a scene made for it (truth: yes) and
  of a near miss, a scene made for another prompt of the same task that does not satisfy it
  (``world.prompts.satisfies``; truth: no). Judges: the GenEval ``shapes`` detector + official rules, and VQAScore
  backends (yes = score >= 0.5).
- **DPG probes**: ``n`` dense scenes with their DSG question rows, asked of the scene's own render and of the next
  scene's render; truth = ``answer_question`` on the scene's exact objects. Judges: the DPG judges.

Backends: the exact ones always (``geneval:shapes``, ``vqascore:oracle``, ``dpg:oracle``); ``--hf-tiny`` adds
the tiny random Gemma3 as VQAScore and DPG judge (a deliberately bad judge: the audit must show it near chance);
``--vqascore-hf`` / ``--dpg-hf`` add real models on a cluster, ``--judge-url`` + ``--judge-model`` an OpenAI-compatible
server (as VQAScore and as DPG judge).

Writes ``OUT/audit.csv`` (``judge, probe, group, n_yes, n_no, false_yes, fy_low, fy_high, false_no, fn_low,
fn_high, unparsed, unparsed_rate, accuracy``; rates with 95% bootstrap CIs; group = GenEval task or DPG L1
category, plus ``all``) and ``OUT/audit.md``. A judge answer that cannot be parsed as yes or no is counted as
``unparsed``, never as either answer: false-yes and false-no rates count only real answers (over all probes of the
truth), and an unparsed answer is never correct.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from common.geneval_spec import TASKS
from world.prompts import sample_prompt, satisfies, scene_for_prompt
from world.scene import render


def geneval_probes(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """[{"task", "meta", "image", "truth"}]: per task n prompts x (own scene: True, near miss: False)."""
    rng = np.random.default_rng(seed)
    probes = []
    for task in TASKS:
        for _ in range(n):
            meta = sample_prompt(rng, task)
            probes.append({"group": task, "meta": meta, "image": Image.fromarray(render(scene_for_prompt(meta, rng))),
                           "truth": True})
            for _ in range(100):
                other = scene_for_prompt(sample_prompt(rng, task), rng)
                if not satisfies(meta, other):
                    probes.append({"group": task, "meta": meta, "image": Image.fromarray(render(other)),
                                   "truth": False})
                    break
    return probes


def exact_detections(scene) -> list:
    """The scene's objects as detections (score 1): what a perfect detector would return."""
    from world.detector import ShapeDetection
    from world.scene import shape_mask

    s = scene.size
    return [ShapeDetection(o.cls, o.color, tuple(float(v) for v in o.box), 1.0,
                           shape_mask(o.cls, o.cx, o.cy, o.r, o.r, s, s)) for o in scene.objects]


def dpg_probes(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """[{"group", "row", "image", "truth"}]: every question of n scenes on its own render and on the next one's."""
    from evals.dpg_refined import category_of
    from world.dpg_questions import answer_question, make_dpg_prompt_set, questions_for_scene

    items = make_dpg_prompt_set(max(2, n), seed)
    probes = []
    for k, (item_id, scene, text) in enumerate(items):
        other = items[(k + 1) % len(items)][1]
        for shown in (scene, other):
            image = Image.fromarray(render(shown))
            truth_dets = exact_detections(shown)
            for row in questions_for_scene(item_id, scene, text):
                probes.append({"group": category_of(row["tuple"])[1], "row": row, "image": image,
                               "truth": bool(answer_question(row, truth_dets))})
    return probes


def rates(rows: pd.DataFrame, judge: str, probe: str, seed: int = 0, n_resamples: int = 1000) -> list[dict[str, Any]]:
    """False-yes / false-no rates with bootstrap CIs, per group and over all; rows: group, truth (bool), answer
    (True = yes, False = no, None = unparsed). Rates are over all probes of the truth; unparsed answers are counted
    on their own (``unparsed``, ``unparsed_rate``) and are never correct."""
    from common.stats import bootstrap_ci

    def rate(values: np.ndarray) -> tuple[float | None, float | None, float | None]:
        if not len(values):
            return None, None, None
        lo, hi = bootstrap_ci(values.astype(float), lambda x: float(x.mean()), n_resamples=n_resamples, seed=seed)
        return float(values.mean()), lo, hi

    out = []
    for group, g in [*rows.groupby("group", sort=False), ("all", rows)]:
        truth = g.truth.to_numpy(dtype=bool)
        said_yes = np.array([a is True or a is np.True_ for a in g.answer])
        said_no = np.array([a is False or a is np.False_ for a in g.answer])
        unparsed = ~(said_yes | said_no)
        fy, fy_lo, fy_hi = rate(said_yes[~truth])
        fn, fn_lo, fn_hi = rate(said_no[truth])
        out.append({"judge": judge, "probe": probe, "group": group, "n_yes": int(truth.sum()),
                    "n_no": int((~truth).sum()), "false_yes": fy, "fy_low": fy_lo, "fy_high": fy_hi, "false_no": fn,
                    "fn_low": fn_lo, "fn_high": fn_hi, "unparsed": int(unparsed.sum()),
                    "unparsed_rate": float(unparsed.mean()),
                    "accuracy": float(np.where(truth, said_yes, said_no).mean())})
    return out


def geneval_judges(hf_tiny: bool, vqascore_hf: str | None, place: dict[str, Any] | None = None,
                   endpoint: dict[str, Any] | None = None) -> dict[str, Callable[[list[dict]], list[bool]]]:
    from evals.detectors import get_detector
    from evals.geneval import evaluate_image
    from evals.vqascore import HFVQAScore, OracleVQAScore

    detector = get_detector("shapes")
    judges: dict[str, Callable[[list[dict]], list[bool]]] = {
        "geneval:shapes": lambda ps: [bool(evaluate_image(detector.detect(p["image"]), p["meta"])[0]) for p in ps],
    }

    def vqa(scorer_factory: Callable[[list[dict]], Any]) -> Callable[[list[dict]], list[bool]]:
        def run(ps: list[dict]) -> list[bool]:
            scorer = scorer_factory(ps)
            return (scorer.score([p["image"] for p in ps], [p["meta"]["prompt"] for p in ps]) >= 0.5).tolist()
        return run

    judges["vqascore:oracle"] = vqa(lambda ps: OracleVQAScore({p["meta"]["prompt"]: p["meta"] for p in ps}))
    if hf_tiny:
        from evals.tiny_models import tiny_gemma3

        model, proc = tiny_gemma3()
        judges["vqascore:hf-tiny-gemma3"] = vqa(lambda ps: HFVQAScore(model=model, processor=proc, answer="yes"))
    if vqascore_hf:
        judges[f"vqascore:hf:{vqascore_hf}"] = vqa(lambda ps: HFVQAScore(model_id=vqascore_hf, **(place or {})))
    if endpoint:
        from evals.vqascore import OpenAIVQAScore

        judges[f"vqascore:openai:{endpoint['model']}"] = vqa(lambda ps: OpenAIVQAScore(**endpoint))
    return judges


def dpg_judges(hf_tiny: bool, dpg_hf: str | None, place: dict[str, Any] | None = None,
               endpoint: dict[str, Any] | None = None) -> dict[str, Any]:
    from evals.judges import HFJudge, OracleJudge

    judges: dict[str, Any] = {"dpg:oracle": OracleJudge()}
    if hf_tiny:
        from evals.tiny_models import tiny_gemma3

        model, proc = tiny_gemma3()
        judges["dpg:hf-tiny-gemma3"] = HFJudge(mode="direct", model=model, processor=proc)
    if dpg_hf:
        judges[f"dpg:hf:{dpg_hf}"] = HFJudge(model_id=dpg_hf, **(place or {}))
    if endpoint:
        from evals.judges import OpenAIJudge

        judges[f"dpg:openai:{endpoint['model']}"] = OpenAIJudge(**endpoint)
    return judges


def run_dpg_judge(judge: Any, probes: list[dict]) -> list[bool | None]:
    """The judge's verdict on every probe: True (yes), False (no) or None (its answer could not be parsed)."""
    from evals.judges import JudgeRequest

    reqs = [JudgeRequest(p["row"]["item_id"], 0, int(p["row"]["proposition_id"]),
                         p["row"]["question_natural_language"], p["image"], p["row"]) for p in probes]
    verdict = {"yes": True, "no": False}
    answers: list[bool | None] = []
    for start in range(0, len(reqs), max(1, judge.batch_size)):
        answers += [verdict.get(r.answer) for r in judge.judge(reqs[start: start + judge.batch_size])]
    return answers


def audit(n: int = 20, seed: int = 0, hf_tiny: bool = False, vqascore_hf: str | None = None,
          dpg_hf: str | None = None, n_resamples: int = 1000, place: dict[str, Any] | None = None,
          endpoint: dict[str, Any] | None = None) -> pd.DataFrame:
    """The audit table (see the module docstring). ``place``: device / dtype / device_map of the HF judges;
    ``endpoint``: ``{"url", "model", "api_key"}`` of an OpenAI-compatible server, audited as both judges."""
    rows = []
    gprobes = geneval_probes(n, seed)
    for name, judge in geneval_judges(hf_tiny, vqascore_hf, place, endpoint).items():
        answers = judge(gprobes)
        df = pd.DataFrame({"group": [p["group"] for p in gprobes], "truth": [p["truth"] for p in gprobes],
                           "answer": answers})
        rows += rates(df, name, "geneval", seed, n_resamples)
    dprobes = dpg_probes(n, seed)
    for name, judge in dpg_judges(hf_tiny, dpg_hf, place, endpoint).items():
        df = pd.DataFrame({"group": [p["group"] for p in dprobes], "truth": [p["truth"] for p in dprobes],
                           "answer": run_dpg_judge(judge, dprobes)})
        rows += rates(df, name, "dpg", seed, n_resamples)
    return pd.DataFrame(rows)


def render_markdown(df: pd.DataFrame) -> str:
    def pct(v, lo, hi) -> str:
        return "" if pd.isna(v) else f"{100 * v:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"

    lines = ["| judge | probe | group | yes / no probes | false yes | false no | unparsed | accuracy |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for _, r in df.iterrows():
        lines.append(f"| {r.judge} | {r.probe} | {r.group} | {r.n_yes} / {r.n_no} | "
                     f"{pct(r.false_yes, r.fy_low, r.fy_high)} | {pct(r.false_no, r.fn_low, r.fn_high)} | "
                     f"{r.unparsed} | {100 * r.accuracy:.1f}% |")
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    from evals import cli

    p = cli.Parser(prog="python -m evals.audit", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=cli.positive_int, default=20, help="prompts per GenEval task; DPG scenes")
    cli.add_seed(p, 0, help="seed of the probes and of the bootstrap")
    cli.add_n_resamples(p)
    p.add_argument("--hf-tiny", action="store_true", help="also audit the tiny random Gemma3 (a bad judge)")
    p.add_argument("--vqascore-hf", help="hub id / local folder of a VQAScore VLM to audit")
    p.add_argument("--dpg-hf", help="hub id / local folder of a DPG judge VLM to audit (CoT mode)")
    cli.add_judge_endpoint(p, help="also audit an OpenAI-compatible server (e.g. vLLM, http://host:8000/v1) as "
                                   "VQAScore judge (logprobs) and as DPG judge (CoT); --judge-model names its model")
    p.add_argument("--judge-model", default=None, help="with --judge-url: the served model name")
    cli.add_placement(p)
    cli.add_out(p, help="writes audit.csv and audit.md here")
    return p


def _main(argv: list[str] | None = None) -> pd.DataFrame:
    from common.files import atomic_write_text

    a = parser().parse_args(argv)
    out = Path(a.out)  # an existing file is refused by the parser (evals.cli.out_folder)
    if a.device_map is not None:
        from evals.runtime import check_device_map

        check_device_map(a.device_map)
    endpoint = None
    if a.judge_url or a.judge_model:
        if not (a.judge_url and a.judge_model):
            raise ValueError("--judge-url and --judge-model go together (an OpenAI-compatible server and its model); "
                             "hub models are audited with --vqascore-hf / --dpg-hf")
        from evals.judges import chat_endpoint

        chat_endpoint(a.judge_url)
        endpoint = {"url": a.judge_url, "model": a.judge_model, "api_key": os.environ.get(a.judge_api_key_env)}
    place = {"device": a.device, "dtype": a.dtype, "device_map": a.device_map}
    df = audit(a.n, a.seed, a.hf_tiny, a.vqascore_hf, a.dpg_hf, a.n_resamples, place, endpoint)
    atomic_write_text(out / "audit.csv", df.to_csv(index=False))
    atomic_write_text(out / "audit.md", render_markdown(df))
    print(render_markdown(df[df.group == "all"]))
    return df


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """CLI entry; returns the audit table. Input errors exit 2 with one ``error:`` line."""
    from evals.cli import entry

    return entry(_main)(argv)


if __name__ == "__main__":
    main()
