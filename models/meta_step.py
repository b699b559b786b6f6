"""One training step on meta tensors: what a run costs, measured before any weights load.

    shape = StepShape(batch=32, text_tokens=256, tiles=0, rewrite_tokens=0, template_tokens=30, image_size=256)
    cost = measure_step(config, shape)      -> StepCost: parameters, FLOPs by part, activation bytes

Every part is built from its architecture alone (hub encoders and VAEs from ``models/hub_configs``) under
PyTorch's ``FakeTensorMode``: tensors with real shapes, dtypes and devices whose storage is on the meta device, so
an 8B encoder and a 5B DiT take no memory and shape, head and dtype errors surface in seconds. (Bare meta tensors
are not enough: transformers' models ask data-dependent questions -- may the attention mask be skipped, how long
is the sequence for dynamic RoPE -- that they only skip for fake tensors, as when tracing.) The step is the one
``UniFusionModule.training_step`` takes:

    images (B, 3, S, S)  --VAE encoder-->  x0 (B, C, S/f, S/f)                                  frozen, no grad
    prompt tokens + tiles --vision tower, LM up to the deepest tap-->  features (B, T, N, D_enc) frozen, no grad
        VERIFI: the VLM first writes the rewrite (counted as one forward of the whole LM + its head over the
        prompt and the rewrite: the matmuls a KV-cached decode does) and then encodes it (FrozenEncoder does both)
    features --conditioner--> condition --DiT--> v; flow-matching loss; backward           trained, bf16 autocast

FLOPs come from ``torch.utils.flop_counter``'s formulas (matmuls, convolutions and attention; the CPU attention
kernel fake tensors dispatch to is counted with the same formula as the GPU ones), per part. Activation memory is
the peak of live bytes during the trained forward and backward (weights and their gradients are not activations
and are left out; ``StepMeter`` counts FLOPs and bytes in one pass), and with activation checkpointing it is
derived from the same step block by block (``checkpointed_peak``).
Every token is counted as real: the batch is padded to the stated lengths (an upper bound for real batches).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from models import hub_configs
from models.conditioning import LayerwiseAttentionPooling
from models.encoders.taps import find_blocks, tap_hidden_states
from models.flow import flow_matching_loss
from models.parts import build_parts

aten = torch.ops.aten


def _cpu_attention(query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _cpu_attention_backward(grad: Tensor, query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any) -> int:
    return sdpa_backward_flop_count(grad.shape, query.shape, key.shape, value.shape)


# torch.utils.flop_counter's formulas (matmuls, convolutions, attention), plus the CPU attention kernel fake tensors
# dispatch to: FlopCounterMode does not know it, and it does the work of the GPU kernels it counts.
FLOP_FORMULAS: dict[Any, Any] = {
    **flop_registry,
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
}


@dataclass(frozen=True)
class StepShape:
    """The sizes of one micro-batch (what one GPU processes in one forward).

    ``tiles``: square images the vision tower sees per sample (InternVL: a k x k grid + a thumbnail of one image;
    0 = no image input). ``rewrite_tokens``: VERIFI's generated tokens (0 = VERIFI off); the DiT then sees the image
    tokens and the rewrite, not the user's text. ``template_tokens``: the chat template around the user content (the
    encoder runs it, the DiT never sees it).
    """

    batch: int
    text_tokens: int
    tiles: int = 0
    rewrite_tokens: int = 0
    template_tokens: int = 0
    image_size: int = 256


@dataclass
class StepCost:
    """Parameters, FLOPs (multiply-add = 2) and activation bytes of one micro-batch step."""

    params: dict[str, int]  # encoder, latent (frozen); conditioner, dit (trained); dit_blocks (FSDP units)
    flops: dict[str, int]  # encoder, rewrite (VERIFI), latent: forward only; conditioner, dit: forward + backward
    flops_dit_forward: int  # the DiT's forward alone
    flops_recompute: int  # what activation checkpointing adds: the DiT blocks' forward, run again in backward
    act_bytes: int  # peak live bytes of the trained forward + backward, without activation checkpointing
    act_bytes_ac: int  # the same with every DiT block checkpointed
    frozen_bytes: int  # peak live bytes of the frozen encoder's and VAE's forward (the kept features included)
    tokens: dict[str, int] = field(default_factory=dict)  # encoder (L), condition (T), image (DiT latent tokens)
    dit_depth: int = 0  # DiT blocks (FSDP gathers one block's parameters at a time)
    taps: int = 0  # encoder hidden states the conditioner receives (N)

    @property
    def flops_total(self) -> int:
        return sum(self.flops.values())


class StepMeter(TorchDispatchMode):
    """FLOPs of every op run inside (``torch.utils.flop_counter``'s formulas) and the peak bytes of tensors alive
    at the same time, weights left out.

    Every storage an op returns or reads for the first time is counted until it is freed, except the parameters
    and buffers of ``modules`` (weights are not activations) and their parameters' gradients, taken out as soon as
    they are accumulated: ``peak`` is that of inputs, activations and temporaries. (``FlopCounterMode`` itself is
    not used: its module tracker keeps references to activations, so memory could not be measured in the same
    pass, and it attributes backward FLOPs to modules only approximately.)
    """

    def __init__(self, modules: list[nn.Module]):
        super().__init__()
        self.flops = self.current = self.peak = 0
        self._live: dict[int, int] = {}
        tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
        self._weights = {id(t.untyped_storage()) for t in tensors}
        self._hooks = [p.register_post_accumulate_grad_hook(self._drop_grad)
                       for m in modules for p in m.parameters() if p.requires_grad]

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = FLOP_FORMULAS.get(func._overloadpacket)
        if formula is not None:  # called as FlopCounterMode calls them
            self.flops += formula(*args, **kwargs, out_val=out)
        for t in (*tree_leaves(args), *tree_leaves(kwargs), *tree_leaves(out)):
            if isinstance(t, Tensor):
                self._track(t.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self._live or key in self._weights:
            return
        self._live[key] = storage.nbytes()
        self.current += self._live[key]
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def _drop_grad(self, p: Tensor) -> None:
        if p.grad is not None:
            self._free(id(p.grad.untyped_storage()))

    def __exit__(self, *exc: Any) -> Any:
        for h in self._hooks:
            h.remove()
        return super().__exit__(*exc)

    @contextmanager
    def part(self, into: dict[str, int], name: str) -> Iterator[None]:
        """Add the FLOPs of the ops run inside to ``into[name]``."""
        before = self.flops
        yield
        into[name] = into.get(name, 0) + self.flops - before


# ------------------------------------------------------------------------------------------------ the parts


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _encoder(preset: str) -> tuple[nn.Module, Any]:
    """(model, config) of a hub encoder preset: its generative class (what the preset loads), bf16 like the weights,
    built from the shipped config on fake tensors."""
    import transformers

    from models.encoders.hub import HUB_SPECS

    if preset not in HUB_SPECS:
        raise ValueError(f"the meta step builds hub encoders only (their architecture ships in the repo); "
                         f"{preset!r} is not one of {sorted(HUB_SPECS)}")
    config = hub_configs.encoder_config(preset)
    text = hub_configs.text_config(config)
    rope = getattr(text, "rope_parameters", None) or {}
    if rope.get("rope_type") == "dynamic":
        # Dynamic NTK scaling only changes the rotary frequencies beyond max_position_embeddings and asks for the
        # sequence length as a number; the cost is that of the plain rotary embedding.
        text = type(text).from_dict({**text.to_dict(), "rope_parameters": {**rope, "rope_type": "default"}})
        config = type(config).from_dict({**config.to_dict(), "text_config": text.to_dict()}) \
            if hasattr(config, "text_config") else text
    cls = getattr(transformers, HUB_SPECS[preset].model_class)
    return cls._from_config(config, dtype=torch.bfloat16), config


def _text_stack(model: nn.Module) -> nn.Module:
    """The transformer that produces the hidden states the encoder taps (the LM of a VLM, a T5 encoder)."""
    base = model.base_model
    return getattr(base, "language_model", base)


def _image_features(model: nn.Module, config: Any, images: int) -> Tensor:
    """(images, tokens, D): the vision tower + projector on ``images`` square inputs at the tower's resolution."""
    kind = type(config).__name__
    if kind not in ("InternVLConfig", "Gemma3Config"):
        raise ValueError(f"the meta step has no image path for {kind} (native-resolution towers need the image "
                         "grid as data); use a tiled or fixed-resolution VLM preset, or text-only tasks")
    size = config.vision_config.image_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    out = model.base_model.get_image_features(pixel_values=torch.zeros(images, 3, size, size, dtype=torch.bfloat16))
    return out if isinstance(out, Tensor) else out.pooler_output


def _taps(lm: nn.Module, x: Tensor, layer_ids: tuple[int, ...], deepest_only: bool = True) -> list[Tensor]:
    """Hidden states ``layer_ids`` of ``lm`` on inputs_embeds ``x`` (B, L, D), tapped as the frozen encoder taps
    them; blocks past the deepest tap are skipped unless ``deepest_only`` is False (then the whole stack runs)."""
    got = tap_hidden_states(find_blocks(lm, None), layer_ids, lambda: lm(
        inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long), use_cache=False),
        stop_early=deepest_only)
    return [got[i] for i in layer_ids]


def tapped_layers(config: dict[str, Any], n_blocks: int) -> tuple[int, ...]:
    """The hidden-state ids a run taps from an encoder of ``n_blocks`` blocks (its own taps, else its preset's)."""
    from models.encoders.registry import preset_taps

    enc = config["encoder"]
    return preset_taps(enc["preset"], n_blocks, enc.get("layers"), enc.get("stride"), enc.get("start"))


def _latent(name: str) -> tuple[nn.Module | None, int, int]:
    """(VAE or None for pixels, channels C, downsampling f) of a latent preset, built from its config."""
    from diffusers import AutoencoderKL

    from models.latents import LATENT_PRESETS

    if name not in LATENT_PRESETS:
        raise ValueError(f"unknown latent space {name!r}; valid: {sorted(LATENT_PRESETS)}")
    p = LATENT_PRESETS[name]
    if name == "pixel":
        return None, 3, 1
    vae = p.builder() if p.builder is not None else AutoencoderKL(**hub_configs.vae_config(name))
    return vae, p.channels, p.downsample


# ------------------------------------------------------------------------------------------------ the step


def frozen_pass(config: dict[str, Any], shape: StepShape, fake: FakeTensorMode) -> dict[str, Any]:
    """Encoder (and VERIFI rewrite) and VAE forward: FLOPs, parameters, peak live bytes, the features' shape."""
    from models.conditioning import encoder_features
    from models.encoders.kv import attention_shape

    b = shape.batch
    with fake:
        model, arch = _encoder(config["encoder"]["preset"])
        vae, channels, f = _latent(config.get("latent", "pixel"))
        lm = _text_stack(model)
        n_blocks = len(find_blocks(lm, None))
    width = hub_configs.text_width(arch)
    # KV fusion on the encoder's own keys and values reads every block's attention (FrozenEncoder.set_features):
    # the whole stack runs and each token carries N = blocks packed [k | v] vectors.
    kv = encoder_features(config["candidate"], config.get("conditioner")) == "kv"
    ids = tuple(range(n_blocks)) if kv else tapped_layers(config, n_blocks)
    out: dict[str, Any] = {"params": {"encoder": _numel(model), "latent": _numel(vae) if vae is not None else 0},
                           "flops": {}, "layer_ids": ids, "enc_dim": attention_shape(model).kv_width if kv else width,
                           "channels": channels, "latent_size": shape.image_size // f}
    meter = StepMeter([model, *([vae] if vae is not None else [])])
    with fake, meter, torch.no_grad():
        with meter.part(out["flops"], "encoder"):
            images = _image_features(model, arch, b * shape.tiles).reshape(b, -1, width) if shape.tiles else None
            n_image = images.shape[1] if images is not None else 0
            n_text = shape.template_tokens + shape.text_tokens + shape.rewrite_tokens
            text = model.get_input_embeddings()(torch.zeros(b, n_text, dtype=torch.long))
            x = torch.cat([images, text], 1) if images is not None else text
            if kv:
                _taps(lm, x, (n_blocks,), deepest_only=False)
                feats = torch.zeros(b, x.shape[1], n_blocks, out["enc_dim"])
            else:
                feats = torch.stack(_taps(lm, x, ids), 2).float()
        keep = n_image + (shape.rewrite_tokens if shape.rewrite_tokens else shape.text_tokens)
        out["features"] = tuple(feats[:, :keep].shape)
        out["tokens"] = {"encoder": x.shape[1], "condition": keep}
        del feats, x, text, images
        if shape.rewrite_tokens:  # VERIFI generation: the whole LM and its head over prompt + rewrite
            with meter.part(out["flops"], "rewrite"):
                x = torch.zeros(b, n_image + n_text, width, dtype=torch.bfloat16)
                h = _taps(lm, x, (n_blocks,), deepest_only=False)[0]
                model.get_output_embeddings()(h[:, -shape.rewrite_tokens:])
            del x, h
        with meter.part(out["flops"], "latent"):
            if vae is not None:
                vae.encode(torch.zeros(b, 3, shape.image_size, shape.image_size))  # the posterior's mean: free
    out["frozen_bytes"] = meter.peak
    return out


def trained_pass(config: dict[str, Any], frozen: dict[str, Any], shape: StepShape, fake: FakeTensorMode,
                  checkpointing: bool) -> dict[str, Any]:
    """Conditioner + DiT forward, flow-matching loss and backward on the features' shape: FLOPs per part, peak live
    bytes, parameters."""
    bf16 = config.get("trainer", {}).get("precision", "auto") in ("bf16-mixed", "auto")  # "auto" on a GPU
    with fake:
        cond, dit = build_parts(config, enc_dim=frozen["enc_dim"], num_layers=len(frozen["layer_ids"]),
                                latent_channels=frozen["channels"], latent_size=frozen["latent_size"])
        for m in cond.modules():  # the data-dependent gather of real tokens cannot run on fake tensors
            if isinstance(m, LayerwiseAttentionPooling):
                m.dense = True
        dit.activation_checkpointing = checkpointing
        b, lat = shape.batch, frozen["latent_size"]
        features = torch.zeros(frozen["features"])
        mask = torch.ones(frozen["features"][:2], dtype=torch.bool)
        x0 = torch.zeros(b, frozen["channels"], lat, lat)
        eps, s = torch.zeros_like(x0), torch.full((b,), 0.5)
    flops: dict[str, int] = {}
    meter = StepMeter([cond, dit])
    blocks: list[list[int]] = []  # per DiT block: [bytes its forward keeps alive besides its output, its FLOPs]

    def enter(block: nn.Module, args: tuple) -> None:
        blocks.append([-meter.current, -meter.flops])

    def leave(block: nn.Module, args: tuple, out: Tensor) -> None:
        blocks[-1][0] += meter.current - out.untyped_storage().nbytes()
        blocks[-1][1] += meter.flops

    hooks = [h for blk in dit.blocks for h in (blk.register_forward_pre_hook(enter), blk.register_forward_hook(leave))]
    with fake, meter:
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
            with meter.part(flops, "conditioner"):  # drop=None: the CFG null row is a select, no FLOPs
                condition = cond(features, mask)
            # The DiT's backward stops at the condition's tensors, then the conditioner's runs from their gradients:
            # the order of one backward, with every FLOP in its own part.
            # (KV fusion on the encoder's own keys and values passes them through untrained: no gradient to cut.)
            cut = [t for t in (condition.tokens, *(condition.kv or ()), *(condition.inject or ()))
                   if t is not None and t.requires_grad]
            leaves = {id(t): t.detach().requires_grad_() for t in cut}

            def swap(t: Tensor | None) -> Tensor | None:
                return leaves.get(id(t), t) if t is not None else None

            condition.tokens = swap(condition.tokens)
            condition.kv = [swap(t) for t in condition.kv] if condition.kv is not None else None
            condition.inject = [swap(t) for t in condition.inject] if condition.inject is not None else None
            with meter.part(flops, "dit"), meter.part(flops, "dit_forward"):
                loss = flow_matching_loss(lambda xs, ss: dit(xs, ss, condition), x0, eps, s)
        forward_end, forward_peak = meter.current, meter.peak
        with meter.part(flops, "dit"):
            loss.backward()
        with meter.part(flops, "conditioner"):
            if cut:
                torch.autograd.backward(cut, [leaves[id(t)].grad for t in cut])
    for h in hooks:
        h.remove()
    casts = 2 * _numel(dit.blocks[0]) if bf16 else 0  # autocast's bf16 copies of one block's fp32 weights
    return {"act_bytes": meter.peak, "flops": flops, "tokens": {"image": dit.grid ** 2},
            "forward_end": forward_end, "forward_peak": forward_peak, "block_kept": [k for k, _ in blocks],
            "block_flops": sum(f for _, f in blocks), "block_casts": casts,
            "params": {"conditioner": _numel(cond), "dit": _numel(dit), "dit_blocks": _numel(dit.blocks)}}


def measure_step(config: dict[str, Any], shape: StepShape) -> StepCost:
    """Build every part of a run on fake meta tensors and take one training step at ``shape``.

    Activation checkpointing of the DiT blocks is derived from the same step block by block
    (``checkpointed_peak``, tested against a checkpointed step). Raises whatever building or running raises (a
    head count that does not divide a width, a shape mismatch, a preset without a shipped architecture), before any
    weights are needed.
    """
    fake = FakeTensorMode()
    frozen = frozen_pass(config, shape, fake)
    plain = trained_pass(config, frozen, shape, fake, checkpointing=False)
    dit_forward = plain["flops"].pop("dit_forward")
    return StepCost(
        params={**frozen["params"], **plain["params"]},
        flops={**frozen["flops"], **plain["flops"]},
        flops_dit_forward=dit_forward,
        flops_recompute=plain["block_flops"],
        act_bytes=plain["act_bytes"],
        act_bytes_ac=checkpointed_peak(plain),
        frozen_bytes=frozen["frozen_bytes"],
        tokens={**frozen["tokens"], **plain["tokens"]},
        dit_depth=config["dit"]["depth"],
        taps=len(frozen["layer_ids"]),
    )


def checkpointed_peak(plain: dict[str, Any]) -> int:
    """Peak live bytes of the step with every DiT block checkpointed, from the plain step's measurements.

    A checkpointed block keeps only its output through the forward, so what all blocks keep (``block_kept``) is
    gone, except autocast's bf16 weight copies, which stay cached until the forward ends (``block_casts`` per
    block); in the backward each block holds what it keeps again only while its own backward runs. The peak is the
    larger of the forward's and the backward's.
    """
    kept = plain["block_kept"]
    saved = sum(kept)
    forward = plain["forward_peak"] - saved + len(kept) * plain["block_casts"]
    backward = plain["act_bytes"] - saved + max(kept, default=0)
    return int(max(forward, backward))


def square_tiles(tiles: int) -> int:
    """448 px images InternVL's tiling makes of one square image when allowed ``tiles``: a k x k grid with
    k*k <= tiles - 1, plus a thumbnail when k > 1 (1 = the thumbnail alone)."""
    k = math.isqrt(max(tiles - 1, 1))
    return k * k + 1 if k > 1 else 1
