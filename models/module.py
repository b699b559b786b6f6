"""The LightningModule: frozen encoder -> conditioner -> DiT, trained by flow matching.

One config dict (``experiments/configs/base.yaml`` merged with an ablation's overrides) builds everything, so a
checkpoint's hyper-parameters rebuild the same model. The frozen encoder is rebuilt from its preset rather than
stored: its weights are stripped from checkpoints (an 8B encoder in every checkpoint would be absurd), and
loading checks that nothing else is missing.

The DiT works in ``latent`` space (models/latents.py: ``pixel`` by default, or a frozen diffusers VAE).
Batches: {"image": (B, 3, S, S) float in [-1, 1], "caption": list[str | Prompt]}: a ``Prompt`` carries reference
images (reconstruction, editing), which reach the DiT only as the VLM's image tokens. With ``encoder.verifi`` the
DiT is conditioned on the VLM's own rewrite of each caption (paper Sec. 3), generated once per distinct caption
and cached as the generated token ids (models/encoders/rewrites.py); ``generate(..., verifi=...)`` switches it per call
("flexible inference"). With ``encoder.cache`` set (a folder, or ``auto``), plain encodings are read from / written
to a disk feature cache (models/feature_cache.py). Validation batches (Lightning's validation loop) add fixed noise
levels and noise seeds per item; ``validation_step`` scores them with the EMA weights, conditional and with the null
condition (experiments/validation.py).
"""

from __future__ import annotations

import math
import os
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from common.prompt import Prompt, as_prompt
from models.conditioning import encoder_features
from models.conditioning.kv_fusion import check_dit_shape
from models.encoders import EncoderOutput, build_encoder
from models.encoders.kv import attention_shape
from models.encoders.rewrites import RewriteCache
from models.flow import cfg_velocity, euler_sample, flow_matching_loss, sample_sigmas, velocity_from_output
from models.latents import build_latent_space
from models.parts import build_parts

ENCODER_PREFIX = "encoder."
FINGERPRINT_MAX_PARAMS = 500_000_000  # encoders up to this size are checksummed into every checkpoint
LATENT_PREFIX = "latent."  # the frozen VAE, like the encoder, is rebuilt from its preset, never stored


class NonFiniteLossError(FloatingPointError):
    """Raised when the training loss is NaN/inf: the run stops instead of silently training on garbage."""


class UniFusionModule(L.LightningModule):
    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.save_hyperparameters({"config": config})
        self.config = config
        enc_cfg, dit_cfg = config["encoder"], config["dit"]
        self.encoder = build_encoder(
            enc_cfg["preset"], layers=enc_cfg.get("layers"), stride=enc_cfg.get("stride"), start=enc_cfg.get("start")
        )
        if enc_cfg.get("tiles") is not None:  # null: the preset's default
            self.encoder.set_tiles(enc_cfg["tiles"])
        self.verifi = bool(enc_cfg.get("verifi", False))
        if self.verifi and self.encoder.verifi is None:
            raise ValueError(f"encoder.verifi=true needs a generative VLM preset; {enc_cfg['preset']!r} cannot rewrite")
        # VERIFI rewrite cache: prompt key -> the generated token ids (+ their text, for people), for this tokenizer
        self._rewrites = RewriteCache(self.encoder.tokenizer)
        cache = enc_cfg.get("cache")  # absent in configs saved before the key existed: off
        if cache is not None and (not isinstance(cache, (str, os.PathLike)) or not str(cache)):
            raise ValueError(f"encoder.cache must be null, 'auto' or a folder path, got {cache!r}")
        self._cache_root = cache
        self._feature_cache: Any = None  # models.feature_cache.FeatureCache, built at the first encode
        cond_opts = config.get("conditioner", {})
        if encoder_features(config["candidate"], cond_opts) == "kv":  # KV fusion on the encoder's own keys/values
            self.encoder.set_features("kv")
            check_dit_shape(dit_cfg, attention_shape(self.encoder.model), enc_cfg["preset"])
        n_layers = len(self.encoder.layer_ids)
        latent = build_latent_space(config.get("latent", "pixel"))
        self.conditioner, self.dit = build_parts(
            config, enc_dim=self.encoder.feature_size, num_layers=n_layers, latent_channels=latent.channels,
            latent_size=latent.latent_size(config["data"]["size"]))
        self.latent = latent
        # EMA of everything trainable; buffers follow too (use_buffers) so the EMA model is self-contained.
        self.ema = AveragedModel(
            nn.ModuleDict({"conditioner": self.conditioner, "dit": self.dit}),
            multi_avg_fn=get_ema_multi_avg_fn(config["ema"]["decay"]),
            use_buffers=True,
        )
        self.ema.requires_grad_(False)
        self.strict_loading = False  # encoder keys are absent by design; on_load_checkpoint checks the rest
        self._val_parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.val_losses: dict[str, np.ndarray] | None = None  # per-item losses of the latest validation

    # ---------------------------------------------------------------- checkpoints without the frozen encoder
    def encoder_fingerprint(self) -> str | None:
        """``encoder_fingerprint`` of the frozen encoder (taps, prompting, a checksum of its weights), computed once;
        None for encoders over ``FINGERPRINT_MAX_PARAMS`` (hashing 16 GB at every save is not worth it: a hub
        encoder is named by its preset's repository and revision instead)."""
        if not hasattr(self, "_encoder_fp"):
            from models.encoders import encoder_fingerprint

            n = sum(t.numel() for t in self.encoder.model.state_dict().values())
            self._encoder_fp = encoder_fingerprint(self.encoder) if n <= FINGERPRINT_MAX_PARAMS else None
        return self._encoder_fp

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        sd = checkpoint["state_dict"]
        for k in [k for k in sd if k.startswith((ENCODER_PREFIX, LATENT_PREFIX))]:
            del sd[k]
        checkpoint["encoder_fingerprint"] = self.encoder_fingerprint()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning's FSDP strategy loads (and removes) the state dict before this hook: nothing left to check here
        expected = {k for k in self.state_dict() if not k.startswith((ENCODER_PREFIX, LATENT_PREFIX))} \
            if "state_dict" in checkpoint else set()
        missing = expected - set(checkpoint.get("state_dict", ()))
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} trainable entries, e.g. {sorted(missing)[:3]}")
        # The encoder is rebuilt, not stored: a rebuilt one with other weights (e.g. a tiny VLM pretrained again on
        # another machine) would silently feed the conditioner features it never saw.
        saved = checkpoint.get("encoder_fingerprint")
        if saved is not None and self.encoder_fingerprint() not in (None, saved):
            raise RuntimeError(
                f"checkpoint was trained against encoder {saved}, but {self.config['encoder']['preset']!r} here "
                f"rebuilds as {self.encoder_fingerprint()} (other weights or taps): load it where its encoder is")

    # ---------------------------------------------------------------- conditioning
    @staticmethod
    def _key(p: Prompt) -> tuple:
        """VERIFI rewrite-cache key: the text and the decoded pixels of every image."""
        from common.prompt import image_digest

        return (p.text, tuple(image_digest(im) for im in p.images))

    def feature_cache(self) -> Any:
        """The disk feature cache of ``encoder.cache`` (built on first use), or None when it is off."""
        if self._cache_root is None:
            return None
        if self._feature_cache is None:
            from models.feature_cache import FeatureCache

            root = self._cache_root
            if root == "auto":
                from common.paths import cache_dir

                root = cache_dir() / "features"
            self._feature_cache = FeatureCache(root, self.encoder)
        return self._feature_cache

    def on_train_end(self) -> None:
        if self._feature_cache is not None:  # write this run's new entries now, not only at interpreter exit
            self._feature_cache.flush()

    def encode(self, prompts: list, verifi: bool | None = None) -> EncoderOutput:
        """Encoder features of captions/prompts; with VERIFI, of their (cached) rewrites.

        Plain encodings go through the disk feature cache when ``encoder.cache`` is set; VERIFI encodings never
        do (the cache keys prompts, not rewrites: the rewrites are cached in memory in ``self._rewrites``). A batch
        of distinct prompts none of which has a cached rewrite is encoded in its generation's own passes (the
        paper's single pass); a batch with cached or repeated prompts generates the missing rewrites once each and
        encodes every row's ids again.
        """
        verifi = self.verifi if verifi is None else verifi
        if not verifi:
            cache = self.feature_cache()
            return self.encoder(prompts) if cache is None else cache(prompts)
        items = [as_prompt(p) for p in prompts]
        keys = [self._key(p) for p in items]
        by_key, tok = dict(zip(keys, items, strict=True)), self.encoder.tokenizer
        todo = self._rewrites.missing(keys)
        if 0 < len(todo) == len(keys) <= 64:  # all new and distinct: features from the generating passes themselves
            out = self.encoder(items, verifi=True)
            for k, rewrite in zip(keys, out.generated, strict=True):
                self._rewrites.put(k, rewrite, tok)
            return out
        for i in range(0, len(todo), 64):  # greedy rewrites are deterministic: generate each distinct one once
            chunk = todo[i: i + 64]
            for k, rewrite in zip(chunk, self.encoder.generate_rewrites([by_key[k] for k in chunk]), strict=True):
                self._rewrites.put(k, rewrite, tok)
        # condition on exactly the generated ids (never on their decoded text tokenised again)
        return self.encoder(items, verifi=True, rewrites=[self._rewrites.get(k, tok).ids for k in keys])

    # ---------------------------------------------------------------- model
    def velocity(
        self,
        x: torch.Tensor,
        s: torch.Tensor,
        features: torch.Tensor,
        mask: torch.Tensor,
        drop: torch.Tensor | None = None,
        ema: bool = False,
    ) -> torch.Tensor:
        """x (B, C, S, S), s (B,), features (B, T, N, D_enc), mask (B, T) -> v (B, C, S, S)."""
        parts = self.ema.module if ema else {"conditioner": self.conditioner, "dit": self.dit}
        cond_mod, dit = parts["conditioner"], parts["dit"]
        out = dit(x, s, cond_mod(features, mask, drop))
        return velocity_from_output(out, x, s, self.config["flow"].get("prediction") or "v")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x0 = self.latent.encode(batch["image"])
        enc = self.encode(batch["caption"])
        features, mask = enc.features.to(x0.device), enc.mask.to(x0.device)
        b = x0.shape[0]
        fcfg = self.config["flow"]
        # All training randomness comes from (seed, global batch number), the batch's place in the data stream
        # (= global_step with one device and no accumulation): a resumed run draws exactly what it would have, and
        # DDP over k ranks draws what one process accumulating k batches per step draws.
        n = int(batch["index"][0]) // self.config["train"]["batch_size"]
        g = torch.Generator().manual_seed((self.config["seed"] << 40) + n)
        drop = (torch.rand(b, generator=g) < fcfg["p_uncond"]).to(x0.device)
        eps = torch.randn(x0.shape, generator=g).to(x0.device, x0.dtype)
        s = sample_sigmas(b, g, fcfg["logit_mean"], fcfg["logit_std"], fcfg["shift"]).to(x0.device)
        loss = flow_matching_loss(lambda xs, ss: self.velocity(xs, ss, features, mask, drop), x0, eps, s)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite loss {loss.item()} at step {self.global_step} "
                f"(candidate={self.config['candidate']}, lr={self.config['optim']['lr']}); stopping the run. "
                "Lower optim.lr or check the data/encoder features."
            )
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=b)
        return loss

    # ---------------------------------------------------------------- validation (held-out flow-matching loss)
    def on_validation_epoch_start(self) -> None:
        self._val_parts = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Flow-matching loss of fixed items at fixed noise levels with fixed noise, conditional and with the null
        condition, with the EMA weights (the ones ``generate`` samples with).

        batch: the training keys plus ``sigmas`` (B, K) noise levels, ``noise_seeds`` (B, K) torch seeds of each
        item's noise at each level and optionally ``level_weights`` (B, K) (default 1/K each): an item's loss is
        the weighted sum over its levels (levels of weight 0 are scored but only kept per level). Keeps the
        per-level losses for ``on_validation_epoch_end``.
        """
        x0 = self.latent.encode(batch["image"])
        b, k = batch["sigmas"].shape
        enc = self.encode(batch["caption"])
        features = enc.features.to(x0.device).repeat_interleave(k, 0)
        mask = enc.mask.to(x0.device).repeat_interleave(k, 0)
        xk = x0.repeat_interleave(k, 0)
        eps = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(int(sd)))
                           for sd in batch["noise_seeds"].reshape(-1)]).to(x0.device, x0.dtype)
        s = batch["sigmas"].reshape(-1).to(x0.device)
        losses = []
        for null in (False, True):
            drop = torch.full((b * k,), null, dtype=torch.bool, device=x0.device)
            per = flow_matching_loss(lambda xs, ss, drop=drop: self.velocity(xs, ss, features, mask, drop, ema=True),
                                     xk, eps, s, per_item=True)
            losses.append(per.view(b, k).double().cpu())
        weights = batch.get("level_weights")
        weights = torch.full((b, k), 1 / k) if weights is None else weights
        self._val_parts.append((batch["index"].cpu(), losses[0], losses[1], weights.double().cpu(),
                                batch["sigmas"].cpu()))

    def on_validation_epoch_end(self) -> None:
        """``self.val_losses``: {"index", "cond", "uncond"}, float64 (N,) arrays in item order (one entry per item
        of the validation set: its level-weighted loss), {"cond_levels", "uncond_levels"} (N, K) per level and
        "sigmas" (N, K); the means are logged as ``val.loss``, ``val.loss_uncond``, ``val.cond_gain``."""
        index, cond_k, uncond_k, weights, sigmas = (torch.cat(parts) for parts in zip(*self._val_parts, strict=True))
        order = torch.argsort(index)
        cond_k, uncond_k, weights, sigmas = cond_k[order], uncond_k[order], weights[order], sigmas[order]
        cond, uncond = (cond_k * weights).sum(1), (uncond_k * weights).sum(1)
        self.val_losses = {"index": index[order].numpy(), "cond": cond.numpy(), "uncond": uncond.numpy(),
                           "cond_levels": cond_k.numpy(), "uncond_levels": uncond_k.numpy(),
                           "sigmas": sigmas.double().numpy()}
        means = {"val.loss": cond.mean(), "val.loss_uncond": uncond.mean(), "val.cond_gain": (uncond - cond).mean()}
        for name, value in means.items():  # every rank scored the same items: the sync averages equal values
            self.log(name, value.item(), on_epoch=True, sync_dist=True)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # EMA right after the weights change, before any callback (ModelCheckpoint) sees the step: a checkpoint
        # then always holds the EMA of exactly the steps it claims, and a resumed run matches a straight one.
        super().optimizer_step(*args, **kwargs)
        self.ema.update_parameters(nn.ModuleDict({"conditioner": self.conditioner, "dit": self.dit}))

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip by the global gradient norm; under FSDP through the root FSDP module's ``clip_grad_norm_`` (the
        norm over every rank's shards: Lightning's FSDP precision plugin refuses norm clipping)."""
        from lightning.pytorch.strategies import FSDPStrategy

        if gradient_clip_val and isinstance(self.trainer.strategy, FSDPStrategy):
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        o = self.config["optim"]
        params = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith(("ema.", "encoder."))]
        opt = torch.optim.AdamW(params, lr=o["lr"], betas=tuple(o["betas"]), weight_decay=o["weight_decay"])
        warmup, total = o["warmup_steps"], max(1, self.config["train"]["steps"])

        def lr_lambda(step: int) -> float:  # linear warm-up, then cosine to 10% of the peak
            if step < warmup:
                return (step + 1) / warmup
            frac = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate(
        self,
        prompts: list,
        seeds: list[int],
        steps: int | None = None,
        cfg_scale: float | None = None,
        use_ema: bool = True,
        layer_dropout: list[int] | None = None,
        verifi: bool | None = None,
        image_steps: float | None = None,
        trace: list[str] | None = None,
    ) -> np.ndarray:
        """Sample one image per (prompt, seed). Returns uint8 (B, S, S, 3).

        ``prompts``: str or ``Prompt`` (text + reference images, any number and aspect ratio). The initial noise of
        each image comes from its own seed, so an image does not depend on what else is in the batch.
        ``layer_dropout`` (LAP only) zeroes those layers' pooling weights for this call (paper Fig. 8).
        ``verifi``: condition on the VLM's rewrite (default: as trained).
        ``image_steps`` = p: the zero-shot edit schedule of paper Sec. 5: the first ``round(p * steps)`` steps
        are conditioned on each prompt's images alone, the rest on its text alone. ``trace``, if given, receives
        "image" or "text" per sampling step.
        """
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        scfg = self.config["sample"]
        steps = steps or scfg["steps"]
        scale = scfg["cfg_scale"] if cfg_scale is None else cfg_scale
        size, dev = self.config["data"]["size"], self.device
        lat, ch = self.latent.latent_size(size), self.latent.channels
        noise = torch.stack(
            [torch.randn(ch, lat, lat, generator=torch.Generator().manual_seed(int(sd))) for sd in seeds]
        ).to(dev)
        items = [as_prompt(p) for p in prompts]
        if image_steps is None:
            phases = [(self.encode(items, verifi), steps)]
        else:
            if not 0.0 <= image_steps <= 1.0:
                raise ValueError(f"image_steps must be a fraction in [0, 1], got {image_steps}")
            if not all(p.images for p in items):
                raise ValueError("image_steps (zero-shot editing) needs every prompt to carry an image")
            k = round(image_steps * steps)
            phases = [(self.encode([Prompt("", p.images) for p in items], verifi=False), k),
                      (self.encode([p.text for p in items], verifi), steps - k)]
        b = len(items)
        cond_mod = self.ema.module["conditioner"] if use_ema else self.conditioner
        restore = None
        if layer_dropout is not None:
            if not hasattr(cond_mod, "set_layer_dropout"):
                raise ValueError(f"layer dropout needs a LAP conditioner, not {self.config['candidate']!r}")
            restore = cond_mod.layer_dropout
            cond_mod.set_layer_dropout(layer_dropout)
        # one condition per sampling step, in order: the Euler sampler calls the velocity once per step
        schedule = [(enc, name) for (enc, n), name in zip(phases, ("image", "text") if len(phases) == 2 else ("text",),
                                                            strict=True) for _ in range(n)]
        step_i = iter(range(steps))

        def fn(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            enc, name = schedule[next(step_i)]
            if trace is not None:
                trace.append(name)
            features, mask = enc.features.to(dev), enc.mask.to(dev)
            if scale == 1.0:
                return self.velocity(x, s, features, mask, None, ema=use_ema)
            feats2, mask2 = torch.cat([features, features]), torch.cat([mask, mask])
            drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(dev)
            v = self.velocity(torch.cat([x, x]), torch.cat([s, s]), feats2, mask2, drop, ema=use_ema)
            return cfg_velocity(v[:b], v[b:], scale)

        try:
            x0 = self.latent.decode(euler_sample(fn, noise, steps, shift=scfg.get("shift", 1.0)))
        finally:
            if restore is not None:
                cond_mod.set_layer_dropout(restore)
        img = ((x0.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return img.permute(0, 2, 3, 1).cpu().numpy()
