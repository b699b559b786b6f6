"""Generate a benchmark's images with any generator, in the benchmark's official folder layout.

    python -m evals.generate --benchmark geneval --callable mypkg.gen:sample --out images/geneval
    python -m evals.generate --benchmark dpg --pipeline stabilityai/sdxl-turbo --gen-kwargs num_inference_steps=1 \\
        guidance_scale=0 --out images/dpg
    torchrun --nproc_per_node 8 -m evals.generate --benchmark genai --ckpt runs/x/final.ckpt --out images/genai

Generators (exactly one):
  --callable pkg.module:function   (or path/to/file.py:function) called as fn(prompts, seeds[, **gen_kwargs])
                                   -> PIL images (or uint8 (H, W, 3) arrays), one image per (prompt, seed)
  --pipeline ID_OR_PATH            diffusers DiffusionPipeline.from_pretrained; each image gets its own
                                   torch.Generator("cpu").manual_seed(seed); --gen-kwargs go to the pipeline call
  --ckpt FILE                      a checkpoint of this harness (final.ckpt / last.ckpt)

Layouts and seed policy (image k of the i-th prompt):
  geneval  <out>/<NNNNN>/metadata.jsonl + samples/<k:05d>.png        seed + 1000 i + k   (default seed 0, 4 samples)
  dpg      <out>/<item_id>.png (2x2 grid TL, TR, BL, BR = k 0..3)     seed + 1000 i + k   (default seed 0, 4 samples)
           and the single images in <out>/samples/<item_id>/<k>.png
  genai    <out>/<index:05d>.png, one per prompt                     seed + index        (default seed 42)
Every image has its own seed, so the folder is the same for any --batch-size and any number of processes. The
official GenEval script instead reseeds 42 before every prompt and draws its samples in sequence (image k of
every prompt starts from the same noise; batch-size dependent); DPG-Bench states no seed policy; GenAI-Bench's
generate.py seeds 42 once and draws in sequence.

Prompts: --prompt-file FILE (geneval: an evaluation_metadata.jsonl; dpg: a questions CSV or a prompts.jsonl of
{"item_id", "prompt"}; genai: a genai_image.json); default: the official prompt set shipped with this package
(553 / 1065 / 1600 prompts). --limit N keeps the first N prompts (a quick look before the full run).
--prompts shapes: a small shapes-world set instead (18 / 20 / 18 prompts), written into --out in the benchmark's
own format (evaluation_metadata.jsonl / dpg_bench.csv / genai_image.json + genai_skills.json), which the exact
judges score offline (evals.shapes_prompts; docs/benchmarks.md, "Check your generator offline").

Resumable: finished files are kept, files are written atomically; <out>/generation.json records the generator,
seed, samples and prompt list, and a run with other settings into the same --out is refused. Under torchrun each
process writes every WORLD_SIZE-th prompt (from RANK); the union is the one-process folder.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evals import cli
from evals.images import BENCHMARKS, DEFAULT_SEEDS, GenerateFn, checkpoint_generator, launch_share, write_folder

DATA = Path(__file__).parent / "data"
DEFAULT_PROMPTS = {
    "geneval": DATA / "geneval" / "evaluation_metadata.jsonl",
    "dpg": DATA / "dpg_bench" / "prompts.jsonl",
    "genai": DATA / "genai_bench" / "genai_image.json",
}


# ------------------------------------------------------------------------------------------------ prompts
def load_prompts(benchmark: str, path: str | Path | None = None, limit: int | None = None) -> Any:
    """The benchmark's prompts from ``path`` (default: the shipped official set), first ``limit`` only.

    geneval -> [metadata dict]; dpg -> [(item_id, text)]; genai -> {index: text}.
    """
    path = Path(path) if path is not None else DEFAULT_PROMPTS[benchmark]
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    if benchmark == "geneval":
        from evals.geneval import read_metadata_lines

        prompts: Any = read_metadata_lines(path)
    elif benchmark == "dpg":
        if path.suffix.lower() == ".csv":
            from evals.dpg_refined import item_prompts, load_questions

            prompts = item_prompts(load_questions(path))
        else:
            prompts = []
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                        prompts.append((str(row["item_id"]), str(row["prompt"])))
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise ValueError(f"{path}:{n}: expected a JSON object with item_id and prompt") from None
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            prompts = {int(k): str(v["prompt"]) for k, v in data.items()}
        except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: expected GenAI-Bench's genai_image.json ({{\"00000\": {{\"prompt\": ...}}}})"
                             ) from None
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    if limit is not None:
        prompts = dict(sorted(prompts.items())[:limit]) if isinstance(prompts, dict) else prompts[:limit]
    return prompts


# ------------------------------------------------------------------------------------------------ generators
def load_callable(spec: str) -> GenerateFn:
    """``pkg.module:function`` or ``path/to/file.py:function`` -> the function (imported, not called)."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ValueError(f"--callable must look like pkg.module:function or file.py:function, got {spec!r}")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise FileNotFoundError(f"--callable file not found: {path}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))  # as `python -m`: modules of the working directory import
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise ValueError(f"--callable: cannot import {target!r} ({err})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"--callable: {target!r} has no function {name!r}")
    return fn


def parse_kwargs(pairs: Sequence[str]) -> dict[str, Any]:
    """``["num_inference_steps=4", "guidance_scale=0"]`` -> typed values (parsed as YAML scalars)."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--gen-kwargs takes key=value, got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def pipeline_generator(pipeline: str, device: str = "auto", dtype: str = "auto", device_map: str | None = None,
                       call_kwargs: dict[str, Any] | None = None) -> GenerateFn:
    """A diffusers pipeline as a generator: one CPU ``torch.Generator`` per image, seeded with its seed."""
    import torch
    from diffusers import DiffusionPipeline

    from evals.runtime import from_pretrained, pick_device, pick_dtype

    device = pick_device(device)
    pipe = from_pretrained(DiffusionPipeline, pipeline, device=device, dtype=pick_dtype(dtype, device),
                           device_map=device_map, flag="--pipeline")
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    kwargs = dict(call_kwargs or {})

    def generate(prompts: list[str], seeds: list[int]) -> list[Any]:
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        with torch.no_grad():
            return list(pipe(prompt=list(prompts), generator=generators, **kwargs).images)

    return generate


# ------------------------------------------------------------------------------------------------ CLI
def parser() -> cli.Parser:
    p = cli.Parser(prog="python -m evals.generate", description=__doc__)
    p.add_argument("--benchmark", required=True, choices=BENCHMARKS, help="which benchmark's prompts and layout")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--callable", dest="fn", metavar="MODULE:FUNCTION",
                     help="your generator, fn(prompts: list[str], seeds: list[int]) -> list[PIL.Image]")
    src.add_argument("--pipeline", help="a diffusers pipeline: hub id or local folder")
    src.add_argument("--ckpt", help="a checkpoint of this harness")
    p.add_argument(cli.PROMPT_FILE, help="the benchmark's prompt file (see above); default: the shipped official set")
    p.add_argument("--prompts", choices=("official", "shapes"), default="official",
                   help="official: the shipped prompt set (or --prompt-file); shapes: a small shapes-world set in the "
                        "benchmark's format, written into --out, for an offline check with the exact judges")
    p.add_argument("--limit", type=cli.positive_int, default=None, help="only the first N prompts")
    p.add_argument("--n-samples", type=cli.positive_int, default=None,
                   help="images per prompt; default: geneval 4, dpg 4 (a 2x2 grid), genai 1")
    cli.add_seed(p, None, help="base seed; default per benchmark: "
                 + ", ".join(f"{b} {s}" for b, s in DEFAULT_SEEDS.items()))
    cli.add_batch_size(p, 16, help="images per generator call")
    p.add_argument("--gen-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra keyword arguments of the pipeline call, e.g. num_inference_steps=50 guidance_scale=9, "
                        "or of your --callable: fn(prompts, seeds, **kwargs); values parsed as YAML scalars")
    cli.add_placement(p)
    cli.add_out(p, help="the image folder to write (resumable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--generator-id", default=None, metavar="TEXT",
                   help="your name for the generator (e.g. mymodel-v2@step40k), recorded in --out's generation.json "
                        "and carried into every score of the folder; a resume with another id is refused")
    cli.alias(p, "--metadata", cli.PROMPT_FILE)
    return p


def check_args(args: Any) -> None:
    """Everything that can be checked before a model loads."""
    if args.prompts == "shapes" and args.prompt_file is not None:
        raise ValueError("--prompts shapes writes its own prompt file into --out: drop --prompt-file")
    if args.gen_kwargs and not (args.pipeline or args.fn):
        raise ValueError("--gen-kwargs applies to --pipeline and --callable only (a checkpoint samples with its "
                         "config's sampler)")
    if args.device_map is not None and not args.pipeline:
        raise ValueError("--device-map applies to --pipeline only")
    n = args.n_samples
    if args.benchmark == "dpg" and n not in (None, 4):
        raise ValueError(f"the DPG-Bench layout is a 2x2 grid, so --n-samples must be 4, got {n}")
    if args.benchmark == "genai" and n not in (None, 1):
        raise ValueError(f"the GenAI-Bench layout holds one image per prompt, so --n-samples must be 1, got {n}")
    if args.generator_id is not None and not args.generator_id.strip():
        raise ValueError("--generator-id must not be empty")
    if args.ckpt is not None and not Path(args.ckpt).is_file():
        raise FileNotFoundError(f"checkpoint not found: {args.ckpt}")
    if args.device_map is not None:
        from evals.runtime import check_device_map

        check_device_map(args.device_map)
    if args.pipeline:
        need_diffusers()


def need_diffusers() -> None:
    """``--pipeline`` runs diffusers: say how to install it before anything else is read or loaded."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise ValueError("--pipeline needs the diffusers package, which is not installed: pip install "
                         "'diffusers>=0.42' (or pip install 'unifusion-harness[eval]')") from None


def generator_label(args: Any) -> str:
    extra = f" {json.dumps(parse_kwargs(args.gen_kwargs), sort_keys=True)}" if args.gen_kwargs else ""
    if args.fn:  # the keyword arguments are part of what generated the images: a resume with others is refused
        target, _, name = args.fn.rpartition(":")
        return f"callable:{Path(target).resolve() if target.endswith('.py') else target}:{name}{extra}"
    if args.pipeline:
        return f"pipeline:{args.pipeline}{extra}"
    return f"ckpt:{Path(args.ckpt).resolve()}"


@cli.entry
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI entry; returns ``{"out", "generated", "kept", "prompts", "rank", "world"}`` of this process."""
    args = parser().parse_args(argv)
    check_args(args)
    metadata = args.prompt_file
    if args.prompts == "shapes":
        from evals.shapes_prompts import write_shapes_prompts

        metadata = write_shapes_prompts(args.benchmark, args.out, args.limit)
    prompts = load_prompts(args.benchmark, metadata, args.limit)
    kwargs = parse_kwargs(args.gen_kwargs)
    rank, world = launch_share()
    if args.fn:
        fn = load_callable(args.fn)
        generate = (lambda prompts, seeds: fn(prompts, seeds, **kwargs)) if kwargs else fn
    elif args.pipeline:
        generate = pipeline_generator(args.pipeline, args.device, args.dtype, args.device_map, kwargs)
    else:
        generate = checkpoint_generator(args.ckpt, args.device)
    stats = write_folder(args.benchmark, generate, prompts, args.out, args.n_samples, args.seed, args.batch_size,
                         generator=generator_label(args), rank=rank, world=world, progress=not args.quiet,
                         generator_id=args.generator_id)
    share = f" (rank {rank} of {world})" if world > 1 else ""
    print(f"{args.benchmark}: {stats.generated} images generated, {stats.kept} kept, {stats.prompts} prompts"
          f"{share} -> {args.out}")
    return {"out": str(args.out), "generated": stats.generated, "kept": stats.kept, "prompts": stats.prompts,
            "rank": rank, "world": world}


if __name__ == "__main__":
    main()
