"""A demo study answered by SIMULATED annotators (not people): the tool end to end on committed images.

Systems: two committed shapes-world sample folders (GenEval layout, 12 prompts x 2 seeds, the same prompts and
seeds): ``lap``, the trained LAP checkpoint (the layer-dropout analysis's full-model images), and ``untrained``, the
same configuration before training (the sweep's floor: fresh weights of the checkpoint's seed, never trained;
``python -m evals.ab demo --make-floor`` draws them again). The two really differ, so the report shows a preference.
Each simulated annotator goes through the same functions the web pages call (``next_pair`` / ``record_vote``), one
pair at a time, round robin:
- a *careful* one answers, with probability 0.85, what the world's exact detector supports — the image where it
  finds more of the prompt's objects (``shapes_world.adherence``), a tie when both score the same; for a gold
  pair, the better image — and otherwise a uniformly random choice;
- a *careless* one answers at random and fast (1 to 2.5 s per pair, careful ones take 4 to 14 s), and the gold
  pairs and the speed check should flag them.
The numbers say how the tool reports; they are not human judgements of the two systems.
"""

from __future__ import annotations

import json
import random
import tempfile
from datetime import timedelta
from pathlib import Path

from common.files import atomic_write_text
from evals.ab.assign import next_pair, record_vote
from evals.ab.db import Pair, make_engine, make_sessions, utcnow
from evals.ab.report import build_report, write_report
from evals.ab.study import add_annotators, create_study

ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT = ROOT / "results" / "conditioning_candidates" / "checkpoints" / "lap.ckpt"
LAP_IMAGES = ROOT / "results" / "conditioning_candidates" / "analysis" / "lap" / "layer_dropout" / "images" / "none"
FLOOR_IMAGES = ROOT / "results" / "ab_demo" / "systems" / "untrained"
SYSTEMS = {"lap": LAP_IMAGES, "untrained": FLOOR_IMAGES}
ASPECTS = ["overall", "prompt_adherence"]
CAREFUL, CARELESS, P_RIGHT = 6, 2, 0.85
CAREFUL_SECONDS, CARELESS_SECONDS = (4.0, 6.5, 9.0, 14.0), (1.0, 1.5, 2.5)  # simulated time-on-task per pair
NOTE = ("SIMULATED annotators, not people: 6 careful ones follow the exact shapes-world detector 85% of the time, "
        "2 careless ones answer at random and fast (see evals/ab/demo.py). The numbers show the tool's report, not "
        "a human preference between the two systems.")

README = """# A/B demo study — SIMULATED annotators

{note}

Regenerate (about 10 s, no model needed): `python -m evals.ab demo --out results/ab_demo`

- systems: `lap` = the committed LAP checkpoint's samples
  (`results/conditioning_candidates/analysis/lap/layer_dropout/images/none`), `untrained` = the same configuration
  before training, the sweep's floor (`systems/untrained`, drawn by `python -m evals.ab demo --make-floor`: fresh
  weights of the checkpoint's seed, the same prompts and seeds); 12 GenEval prompts x 2 seeds = 24 pairs, 3 votes
  per pair, 8 gold pairs (30%), gold threshold 0.7, minimum median time per pair 3 s (the default). Simulated
  time-on-task: careful annotators take 4 to 14 s per pair, careless ones 1 to 2.5 s.
- reading: the exact detector finds more of the prompt's objects in the `lap` image for {lap_better} of the {pairs}
  pairs, in the `untrained` one for {floor_better}, and as many in both for {ties}; careful simulated annotators
  follow it, so `lap` is preferred with the CI in `win_rates.csv`. The two careless annotators are caught by the
  gold pairs and by their speed (`annotators.csv`) and left out of `win_rates.csv` (`win_rates_all_annotators.csv`
  keeps them).

Files: `report.md`, `win_rates.csv`, `win_rates_all_annotators.csv`, `win_rates.png`, `annotators.csv`,
`agreement.csv`.
"""


def _truth(pair: Pair, folder_a: Path) -> str:
    """What the exact detector supports for a real pair (left / right / tie), from the prompt's GenEval metadata."""
    from evals.ab.shapes_world import adherence

    meta = json.loads((folder_a / pair.prompt_key / "metadata.jsonl").read_text().splitlines()[0])
    left, right = adherence(pair.left_image.path, meta), adherence(pair.right_image.path, meta)
    return "left" if left > right else "right" if right > left else "tie"


def make_floor(out: str | Path = FLOOR_IMAGES) -> Path:
    """Draw the ``untrained`` system: the committed LAP checkpoint's configuration with fresh weights of its seed
    (as the sweep's 0-step floor run), sampled on the LAP images' prompts and seeds into GenEval's layout."""
    import torch

    from evals.images import generate_geneval_folder
    from models.checkpoints import load_module
    from models.module import UniFusionModule

    metadata = [json.loads((d / "metadata.jsonl").read_text().splitlines()[0])
                for d in sorted(p for p in LAP_IMAGES.iterdir() if p.is_dir())]
    n_samples = len(list((LAP_IMAGES / "00000" / "samples").glob("*.png")))
    config = load_module(CHECKPOINT).config
    torch.manual_seed(int(config["seed"]))
    floor = UniFusionModule(config).eval()
    return generate_geneval_folder(floor, metadata, out, n_samples=n_samples, seed=0)


def run_demo(out: str | Path, db: str | None = None, seed: int = 0) -> Path:
    """Create the demo study, let the simulated annotators finish it, write the report to ``out``."""
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(db or str(Path(tmp) / "demo.sqlite"))
        sessions = make_sessions(engine)
        (name_a, dir_a), (name_b, dir_b) = SYSTEMS.items()
        create_study(sessions, "ab_demo", dir_a, dir_b, "geneval", ASPECTS, votes_per_pair=3, name_a=name_a,
                     name_b=name_b, gold_rate=0.3, gold_threshold=0.7, seed=seed)
        people = add_annotators(sessions, "ab_demo", CAREFUL + CARELESS)
        with sessions() as s:  # the side each pair's answer should be: gold's, or what the detector supports
            truth = {p.id: p.gold_answer or _truth(p, dir_a) for p in s.query(Pair)}
            winner = {p.id: "tie" if truth[p.id] == "tie" else name_a if (truth[p.id] == "left") == p.a_on_left
                      else name_b for p in s.query(Pair).filter(Pair.gold_answer.is_(None))}  # real pairs, by system
        rng, pace = random.Random(seed), random.Random(seed + 1)  # pace: simulated seconds per pair
        clock = utcnow()
        active = [(token, k < CAREFUL) for k, (_, token) in enumerate(people)]
        for _ in range(10_000):  # bounded: the study holds far fewer items than this
            if not active:
                break
            token, careful = active.pop(0)
            clock += timedelta(seconds=1)
            pair, _, _ = next_pair(sessions, token, now=clock)
            if pair is None:
                continue  # this one is done; it leaves the round
            choices = {a: truth[pair.id] if careful and rng.random() < P_RIGHT else rng.choice(["left", "right", "tie"])
                       for a in ASPECTS}
            seconds = pace.choice(CAREFUL_SECONDS if careful else CARELESS_SECONDS)
            record_vote(sessions, token, pair.public_id, choices, now=clock + timedelta(seconds=seconds))
            active.append((token, careful))
        report = build_report(sessions, "ab_demo", note=NOTE)
        engine.dispose()
    truths = list(winner.values())
    write_report(report, out)
    atomic_write_text(out / "README.md", README.format(note=NOTE, pairs=len(truths), ties=truths.count("tie"),
                                                       lap_better=truths.count(name_a),
                                                       floor_better=truths.count(name_b)))
    return out
