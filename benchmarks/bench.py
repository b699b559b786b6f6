"""`make bench`: the harness's speed and memory, measured side by side in one run.

    python benchmarks/bench.py [--device cpu|cuda] [--repeats 5] [--out results/bench]

Every timed figure is the median of ``--repeats`` runs after warm-up; figures meant to be compared are measured in
the same process, one right after the other, and reported as ratios (absolute times on shared machines are not
comparable between runs). Writes ``<out>/bench.csv`` (``figure, value, unit, reference, ratio, goal, met,
detail``) and prints the same table. On CUDA the model steps run under bf16 autocast.

Figures:
1. ``dit_step_vs_krea2``: one training step (forward, MSE, backward, AdamW) of our LAP + refiner + DiT at the
   default sweep's size against diffusers' ``Krea2Transformer2DModel`` (the same design: layerwise text fusion,
   refiner, single-stream DiT) at the same width, depth, heads, layer taps and token counts, and at equal parameter
   count: its SwiGLU widths are solved so that its text side has our conditioner's parameters (as nearly as a
   width allows) and its whole model ours (its shared timestep modulation is smaller than our per-block adaLN).
   ``dit_step_vs_krea2_paper_proportions``: the same at the ablation variant's proportions, 23x narrower (DiT 32
   deep, 11 taps, LAP at 1/6 of the DiT width, as many caption as image tokens). The two steps are timed in
   alternation and the goal is on the median of the rounds' ratios: ours/peer <= 1.
2. ``mfu``: model FLOPs (``torch.utils.flop_counter``) of our training step / its time, over the machine's
   measured matmul peak (a large square matmul in the same run). Goal on H100 bf16: >= 40%.
3. ``lap_refiner_overhead``: time of LAP (2 blocks) + refiner (2 blocks) forward+backward over one DiT
   forward+backward at the paper's proportions scaled down: encoder width = DiT width, 11 taps (every 3rd of
   Llama-3.1-8B's 32 layers), DiT depth 32, 4 image tokens per text token. Goal <= 5%.
4. ``strided_capture``: features kept by stride-3 capture vs all hidden states (bytes), and the time of our hook
   capture vs HF ``output_hidden_states=True``. Goal ~1/3 of the memory.
5. ``feature_cache``: a training step on cached encoder features vs encoding the captions on the fly.
6. ``judge_batching`` / ``vqascore_batching``: judged questions/s of the HF judge and VQAScore images/s (tiny
   Gemma3), batched vs one per forward (VQAScore goal: >= 4x).
7. ``sweep_stages``: the committed default sweep's wall time and its share per stage (train from the runs' own
   timings; sample / score / plot measured here on the committed LAP checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
ROWS: list[dict] = []


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], device: str, repeats: int, warmup: int = 2) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def paired_times(fn_a: Callable[[], object], fn_b: Callable[[], object], device: str, repeats: int,
                 warmup: int = 2) -> tuple[float, float, float]:
    """(median seconds of a, median seconds of b, median of the per-round ratios a / b), a and b timed in
    alternation round by round, so load that drifts on a shared machine falls on both sides of each ratio."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    sync(device)
    ta, tb = [], []
    for _ in range(repeats):
        for fn, times in ((fn_a, ta), (fn_b, tb)):
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb), statistics.median(a / b for a, b in zip(ta, tb, strict=True))


def record(figure: str, value: float, unit: str, reference: float | None = None, goal: str = "",
           met: bool | None = None, detail: str = "") -> None:
    ratio = value / reference if reference else None
    ROWS.append({"figure": figure, "value": value, "unit": unit, "reference": reference, "ratio": ratio,
                 "goal": goal, "met": met, "detail": detail})
    shown = f"{value:.4g} {unit}" + (f"  (ref {reference:.4g}, ratio {ratio:.3f})" if ratio is not None else "")
    print(f"{figure:>26}: {shown}  goal {goal or '-'}  {'' if met is None else ('MET' if met else 'MISSED')}"
          f"  {detail}", flush=True)


def autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------ 1 + 2
@dataclass(frozen=True)
class PeerSize:
    """One size of the comparison with Krea2: our LAP (+ refiner) + DiT, and the token counts."""

    name: str
    enc_dim: int
    taps: int
    dit_dim: int
    depth: int
    heads: int
    lap_dim: int | None
    lap_heads: int
    in_channels: int
    image_size: int
    patch: int
    text: int
    batch: int


# The default sweep's LAP run: LAP(2) + refiner(2) over 4 taps of a 64-wide encoder, DiT 96 x 4 over 32 px pixels.
DEFAULT = PeerSize("default", 64, 4, 96, 4, 4, None, 4, 3, 32, 4, 10, 32)
# The ablation variant's proportions, 23x narrower: 11 taps of an encoder 1.4x the DiT's width, LAP at 1/6 of the
# DiT's width, DiT 32 deep, 2x2 patches of a 16-channel latent, as many caption tokens as image tokens.
PAPER = PeerSize("paper_proportions", 176, 11, 128, 32, 2, 24, 2, 16, 16, 2, 64, 2)


def ours(size: PeerSize, device: str):
    from models.conditioning import build_conditioner
    from models.dit import DiT

    cond = build_conditioner("lap", enc_dim=size.enc_dim, num_layers=size.taps, dit_dim=size.dit_dim,
                             dit_depth=size.depth, heads=size.heads, refiner_blocks=2, lap_blocks=2,
                             lap_dim=size.lap_dim, lap_heads=size.lap_heads).to(device)
    dit = DiT(in_channels=size.in_channels, image_size=size.image_size, patch=size.patch, dim=size.dit_dim,
              depth=size.depth, heads=size.heads).to(device)
    return cond, dit


def krea2(size: PeerSize, device: str, intermediate: int, text_intermediate: int):
    from diffusers import Krea2Transformer2DModel

    # Same width, depth, heads, taps, layerwise and refiner text blocks as ours; its text blocks work at the text width.
    head = size.dit_dim // size.heads
    axis = head // 3 // 2 * 2  # 3-axis RoPE (text/frame, row, column): even sizes summing to the head width
    return Krea2Transformer2DModel(
        in_channels=size.in_channels * size.patch**2, num_layers=size.depth,
        attention_head_dim=size.dit_dim // size.heads, num_attention_heads=size.heads, num_key_value_heads=size.heads,
        intermediate_size=intermediate,
        text_hidden_dim=size.enc_dim, num_text_layers=size.taps, text_num_attention_heads=4,
        text_num_key_value_heads=4, text_intermediate_size=text_intermediate, num_layerwise_text_blocks=2,
        num_refiner_text_blocks=2, axes_dims_rope=(head - 2 * axis, axis, axis)).to(device)


def n_params(*mods: torch.nn.Module) -> int:
    return sum(p.numel() for m in mods for p in m.parameters())


def krea2_equal_params(size: PeerSize, device: str):
    """Krea2 at ``size`` with its SwiGLU widths set so that its text side has our conditioner's parameter count as
    nearly as a text width allows and its whole model ours (parameters are linear in the two widths)."""
    import torch.nn as nn

    with torch.device("meta"):
        cond, dit = ours(size, "meta")
        want_text, want = n_params(cond), n_params(cond, dit)

        def text_side(m: nn.Module) -> int:
            return n_params(m.text_fusion, m.txt_in)

        a, b = krea2(size, "meta", 64, 64), krea2(size, "meta", 64, 128)
        per_text = (text_side(b) - text_side(a)) / 64
        text_i = max(1, round(64 + (want_text - text_side(a)) / per_text))
        a, b = krea2(size, "meta", 64, text_i), krea2(size, "meta", 128, text_i)
        per = (n_params(b) - n_params(a)) / 64
        inter = max(1, round(64 + (want - n_params(a)) / per))
    return krea2(size, device, inter, text_i)


def bench_dit_vs_peer(device: str, repeats: int, size: PeerSize = DEFAULT, mfu: bool = True) -> None:
    """One training step (forward, MSE, backward, AdamW) of ours against diffusers' Krea2 at equal parameter count
    and tokens; at the default size also our MFU."""
    torch.manual_seed(0)
    cond, dit = ours(size, device)
    peer = krea2_equal_params(size, device)
    batch, text = size.batch, size.text
    feats = torch.randn(batch, text, size.taps, size.enc_dim, device=device)
    mask = torch.ones(batch, text, dtype=torch.bool, device=device)
    mask[: batch // 2, text - 3:] = False  # some padding, as real batches have
    x = torch.randn(batch, size.in_channels, size.image_size, size.image_size, device=device)
    s = torch.rand(batch, device=device)
    target = torch.randn_like(x)
    opt_ours = torch.optim.AdamW([*cond.parameters(), *dit.parameters()], lr=1e-4)
    opt_peer = torch.optim.AdamW(peer.parameters(), lr=1e-4)
    tokens, g = dit.patchify(x).shape[1], dit.grid
    x_packed = torch.randn(batch, tokens, size.in_channels * size.patch**2, device=device)
    target_packed = torch.randn_like(x_packed)
    grid = torch.stack(torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij"), -1).reshape(-1, 2)
    pos = torch.cat([torch.zeros(text, 3), torch.cat([torch.zeros(tokens, 1), grid.float()], 1)]).to(device)

    def step_ours() -> None:
        with autocast(device):
            loss = torch.mean((dit(x, s, cond(feats, mask)).float() - target) ** 2)
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_peer() -> None:
        with autocast(device):
            out = peer(x_packed, feats, s, pos, encoder_attention_mask=mask, return_dict=False)[0]
            loss = torch.mean((out.float() - target_packed) ** 2)
        loss.backward()
        opt_peer.step()
        opt_peer.zero_grad(set_to_none=True)

    t_ours, t_peer, paired = paired_times(step_ours, step_peer, device, repeats)
    figure = "dit_step_vs_krea2" + ("" if size is DEFAULT else f"_{size.name}")
    record(figure, t_ours * 1e3, "ms/step", t_peer * 1e3, "ratio <= 1.0", paired <= 1.0,
           f"median of the alternating rounds' ratios {paired:.3f}; batch {batch}, {text} text + {tokens} image "
           f"tokens, DiT {size.dit_dim} x {size.depth}, {size.taps} taps "
           f"of {size.enc_dim}, LAP width {size.lap_dim or size.enc_dim}; params ours {n_params(cond, dit) / 1e6:.3f}M "
           f"(conditioner {n_params(cond) / 1e6:.3f}M), Krea2 {n_params(peer) / 1e6:.3f}M (text fusion + txt_in "
           f"{n_params(peer.text_fusion, peer.txt_in) / 1e6:.3f}M)")
    if not mfu:
        return

    # 2. MFU: FLOPs of our step (forward + backward) over the measured matmul peak.
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        with autocast(device):
            loss = torch.mean((dit(x, s, cond(feats, mask)).float() - target) ** 2)
        loss.backward()
    opt_ours.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    n = 4096 if device.startswith("cuda") else 1024
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    t_mm = median_time(lambda: a @ b, device, repeats)
    peak = 2 * n**3 / t_mm
    achieved = flops / t_ours
    goal = ">= 40% (H100 bf16)" if device.startswith("cuda") else "(GPU goal: 40%)"
    record("mfu", 100 * achieved / peak, "%", None, goal, (achieved / peak >= 0.4) if device.startswith("cuda")
           else None, f"{flops / 1e9:.2f} GFLOP/step, achieved {achieved / 1e9:.1f} GFLOP/s, "
           f"matmul peak {peak / 1e9:.1f} GFLOP/s ({n}x{n} {str(dtype).split('.')[-1]}, "
           f"{torch.get_num_threads()} threads)")


def bench_dit_vs_peer_paper(device: str, repeats: int) -> None:
    bench_dit_vs_peer(device, repeats, PAPER, mfu=False)


# ------------------------------------------------------------------------------------------------ 3
def bench_lap_overhead(device: str, repeats: int, width: int = 256, depth: int = 32, taps: int = 11,
                       text: int = 64, batch: int = 2) -> None:
    from models.conditioning import build_conditioner
    from models.dit import DiT

    torch.manual_seed(0)
    cond = build_conditioner("lap", enc_dim=width, num_layers=taps, dit_dim=width, dit_depth=depth, heads=4,
                             refiner_blocks=2, lap_blocks=2).to(device)
    dit = DiT(in_channels=3, image_size=64, patch=4, dim=width, depth=depth, heads=4).to(device)
    feats = torch.randn(batch, text, taps, width, device=device)
    mask = torch.ones(batch, text, dtype=torch.bool, device=device)
    x, s = torch.randn(batch, 3, 64, 64, device=device), torch.rand(batch, device=device)
    with torch.no_grad():
        fixed = cond(feats, mask)
    tokens = fixed.tokens.detach().requires_grad_(True)

    def cond_step() -> None:
        with autocast(device):
            out = cond(feats, mask).tokens
        out.float().square().mean().backward()

    def dit_step() -> None:
        from models.conditioning.base import Conditioning

        with autocast(device):
            out = dit(x, s, Conditioning(mask=mask, tokens=tokens))
        out.float().square().mean().backward()

    t_cond = median_time(cond_step, device, repeats)
    t_dit = median_time(dit_step, device, repeats)
    frac = t_cond / t_dit
    record("lap_refiner_overhead", 100 * frac, "% of a DiT step", None, "<= 5%", frac <= 0.05,
           f"width {width}, {taps} taps, DiT depth {depth}, {text} text + {dit.grid**2} image tokens, batch {batch}: "
           f"LAP+refiner {t_cond * 1e3:.0f} ms vs DiT {t_dit * 1e3:.0f} ms (fwd+bwd)")


# ------------------------------------------------------------------------------------------------ 4 + 5
def bench_capture(device: str, repeats: int) -> None:
    from transformers import LlamaConfig, LlamaModel

    from models.encoders import FrozenEncoder, select_layers
    from models.tokenizer import shapes_tokenizer

    torch.manual_seed(0)
    tok = shapes_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=24,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaModel(cfg).to(device).eval()
    from experiments.data.shapes import stream_item

    prompts = [stream_item(0, i, 32, 1.0)["caption"] for i in range(16)]  # long descriptions (~150 tokens)
    strided = FrozenEncoder(model, tok, select_layers(24, stride=3), add_bos=True, max_length=192)
    everything = FrozenEncoder(model, tok, select_layers(24, stride=1, start=0), add_bos=True, max_length=192)
    ids, mask = strided.tokenize(prompts)
    ids, mask = ids.to(device), mask.to(device)
    f_k = strided.encode_ids(ids, mask)
    f_all = everything.encode_ids(ids, mask)
    ratio = f_k.numel() / f_all.numel()
    record("strided_capture_memory", f_k.numel() * 4 / 2**20, "MiB kept", f_all.numel() * 4 / 2**20, "~ 1/3",
           abs(ratio - 1 / 3) < 0.05, f"stride 3 keeps {f_k.shape[2]} of {f_all.shape[2]} hidden states "
           f"(B {ids.shape[0]}, L {ids.shape[1]}, D 256)")

    def hf_all() -> None:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
            torch.stack([out.hidden_states[i] for i in strided.layer_ids], 2)

    t_hooks = median_time(lambda: strided.encode_ids(ids, mask), device, repeats)
    t_hf = median_time(hf_all, device, repeats)
    record("capture_hooks_vs_hf", t_hooks * 1e3, "ms", t_hf * 1e3, "ratio <= 1.0", t_hooks <= t_hf * 1.05,
           "forward hooks on the tapped blocks vs output_hidden_states=True (deepest tap 23 of 24: one block "
           "skipped)")


def bench_feature_cache(device: str, repeats: int) -> None:
    from experiments.config import load_experiment
    from experiments.data.datamodule import collate
    from experiments.data.shapes import stream_item
    from models.flow import flow_matching_loss, sample_sigmas
    from models.module import UniFusionModule

    cfg = {r.name: r for r in load_experiment("conditioning_candidates")[1]}["lap"].config
    torch.manual_seed(0)
    m = UniFusionModule(cfg).to(device)
    opt = torch.optim.AdamW([p for n, p in m.named_parameters()
                             if p.requires_grad and not n.startswith(("ema.", "encoder."))], lr=1e-4)
    batch = collate([stream_item(0, i, 32, 0.0) for i in range(32)])
    x0 = batch["image"].to(device)
    cached = m.encoder(batch["caption"])

    def step(enc) -> None:
        g = torch.Generator().manual_seed(0)
        eps = torch.randn(x0.shape, generator=g).to(device)
        s = sample_sigmas(x0.shape[0], g).to(device)
        with autocast(device):
            loss = flow_matching_loss(lambda xs, ss: m.velocity(xs, ss, enc.features.to(device),
                                                                 enc.mask.to(device)), x0, eps, s)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t_fly = median_time(lambda: step(m.encoder(batch["caption"])), device, repeats)
    t_cached = median_time(lambda: step(cached), device, repeats)
    record("feature_cache", t_cached * 1e3, "ms/step", t_fly * 1e3, "(saving)", None,
           "default LAP step on cached features vs encoding 32 short captions with the tiny Llama each step")


# ------------------------------------------------------------------------------------------------ 6
def bench_judge(device: str, repeats: int) -> None:
    from PIL import Image

    from evals.judges import HFJudge, JudgeRequest
    from evals.tiny_models import tiny_gemma3

    model, proc = tiny_gemma3()
    reqs = [JudgeRequest("x", 0, i, "is there a red circle ?", Image.new("RGB", (32, 32), (128, 128, 128)), {})
            for i in range(16)]
    batched = HFJudge(mode="direct", batch_size=8, model=model.to(device), processor=proc, device=device)
    single = HFJudge(mode="direct", batch_size=1, model=model, processor=proc, device=device)

    def run(judge: HFJudge) -> None:
        for start in range(0, len(reqs), judge.batch_size):
            judge.judge(reqs[start: start + judge.batch_size])

    t_b = median_time(lambda: run(batched), device, max(1, repeats // 2), warmup=1)
    t_1 = median_time(lambda: run(single), device, max(1, repeats // 2), warmup=1)
    record("judge_batching", len(reqs) / t_b, "questions/s", len(reqs) / t_1, "batched > 1 per forward",
           t_b < t_1, "HF judge, tiny Gemma3, direct mode, 8 new tokens: batch 8 vs batch 1")

    from evals.vqascore import HFVQAScore

    ims = [Image.new("RGB", (32, 32), (10 * i, 128, 128)) for i in range(32)]
    texts = ["a red circle left of a blue square"] * 32
    vq_b = HFVQAScore(model=model, processor=proc, batch_size=16, device=device)
    vq_1 = HFVQAScore(model=model, processor=proc, batch_size=1, device=device)
    t_vb = median_time(lambda: vq_b.score(ims, texts), device, repeats)
    t_v1 = median_time(lambda: vq_1.score(ims, texts), device, repeats)
    ratio = t_v1 / t_vb
    record("vqascore_batching", len(ims) / t_vb, "images/s", len(ims) / t_v1, ">= 4x one per forward",
           ratio >= 4, f"VQAScore, tiny Gemma3, batch 16 vs batch 1: {ratio:.1f}x")


# ------------------------------------------------------------------------------------------------ 7
def bench_sweep_stages(device: str) -> None:
    import json
    import shutil
    import tempfile

    from analysis.common import load_checkpoint
    from analysis.figures import render_experiment
    from evals.geneval import evaluate_folder
    from evals.images import generate_geneval_folder
    from experiments.sweep_time import full_sweep_time
    from world.prompts import write_geneval_metadata

    exp = ROOT / "results" / "conditioning_candidates"
    if not (exp / "metrics.csv").is_file():
        record("sweep_stages", float("nan"), "s", None, "", None, "no committed results/conditioning_candidates")
        return
    metrics = pd.read_csv(exp / "metrics.csv")
    train_s = float(metrics[metrics.metric == "time.train_s"].value.sum())
    eval_s = float(metrics[metrics.metric == "time.eval_s"].value.sum())
    full = full_sweep_time(exp / "sweep_time.txt")  # the last invocation that trained every run
    wall = full[0] if full else None
    module = load_checkpoint(exp / "checkpoints" / "lap.ckpt", device)
    cfg = module.config["eval"]
    with tempfile.TemporaryDirectory() as tmp:
        meta = write_geneval_metadata(Path(tmp) / "m.jsonl", cfg["geneval"]["n_per_task"], cfg["geneval"]["seed"])
        t0 = time.perf_counter()
        generate_geneval_folder(module, meta, Path(tmp) / "img", n_samples=cfg["geneval"]["n_samples"],
                                seed=cfg["geneval"]["seed"], batch_size=cfg["batch_size"])
        t_sample = time.perf_counter() - t0
        t0 = time.perf_counter()
        evaluate_folder(Path(tmp) / "img", detector="shapes")
        t_score = time.perf_counter() - t0
        shutil.copy(exp / "metrics.csv", Path(tmp) / "metrics.csv")
        t0 = time.perf_counter()
        render_experiment(Path(tmp), "fig4")
        t_plot = time.perf_counter() - t0
    sample_share = t_sample / (t_sample + t_score)
    pretrain_s = 0.0
    if module.config["encoder"]["preset"] == "tiny-vlm":  # pretrained once per machine, then read from the cache
        from models.tiny_vlm import pretraining_record

        pretrain_s = float(pretraining_record()["seconds"])
    total = pretrain_s + train_s + eval_s + t_plot
    shares = {"pretrain encoder": pretrain_s / total, "train": train_s / total,
              "sample": eval_s * sample_share / total, "score": eval_s * (1 - sample_share) / total,
              "plot": t_plot / total}
    record("sweep_stages", wall or total, "s wall", None, "<= 900 s", (wall or total) <= 900,
           "CPU-seconds share: " + json.dumps({k: round(v, 3) for k, v in shares.items()})
           + " (pretrain encoder: once per machine, cached; runs two at a time)")


def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    p.add_argument("--only", help="comma-separated subset: dit,dit_paper,lap,capture,cache,judge,sweep")
    a = p.parse_args(argv)
    if a.repeats < 5:
        p.error("--repeats must be >= 5 (medians of fewer are not worth reporting)")
    import platform

    print(f"device {a.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}", flush=True)
    benches = {"dit": bench_dit_vs_peer, "dit_paper": bench_dit_vs_peer_paper, "lap": bench_lap_overhead,
               "capture": bench_capture,
               "cache": bench_feature_cache, "judge": bench_judge}
    chosen = a.only.split(",") if a.only else [*benches, "sweep"]
    for name in chosen:
        if name == "sweep":
            bench_sweep_stages(a.device)
        else:
            benches[name](a.device, a.repeats)
    df = pd.DataFrame(ROWS)
    from common.files import atomic_write_text

    name = "bench.csv" if a.device == "cpu" else f"bench_{a.device.split(':')[0]}.csv"
    if a.only and (a.out / name).exists():  # a subset re-run replaces its own rows and keeps the others
        old = pd.read_csv(a.out / name)
        old = old[~old["figure"].isin(df["figure"])]
        df = pd.concat([old, df], ignore_index=True)
    atomic_write_text(a.out / name, df.to_csv(index=False))
    print(f"wrote {a.out / name}")
    return df


if __name__ == "__main__":
    main()
