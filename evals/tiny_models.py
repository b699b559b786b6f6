"""Tiny offline models for tests, benchmarks and CPU demos: real transformers classes on toy configs, random
weights, word-level tokenizers built in memory (nothing is downloaded)."""

from __future__ import annotations

from typing import Any


def tiny_gemma3(seed: int = 0) -> tuple[Any, Any]:
    """(Gemma3ForConditionalGeneration, Gemma3Processor): a random 2-layer image-text-to-text Gemma3 with a 28 px
    vision tower, 4 image tokens, and a word-level tokenizer over a DPG/shapes judging vocabulary."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
        PreTrainedTokenizerFast,
    )

    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_image>", "<end_of_image>", "<image_soft_token>",
               "<start_of_turn>", "<end_of_turn>"]
    words = special + ["user", "model", "answer:", "yes", "no", "is", "there", "a", "the", "circle", "square",
                       "triangle", "red", "blue", "green", "left", "of", "exactly", "two", "?"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                  unk_token="<unk>", extra_special_tokens={
                                      "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                      "image_token": "<image_soft_token>"})
    template = ("{{ bos_token }}{% for m in messages %}<start_of_turn> {{ m['role'] }} {% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<start_of_image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}"
                "<end_of_turn> {% endfor %}{% if add_generation_prompt %}<start_of_turn> model {% endif %}")
    proc = Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": 28, "width": 28}), tokenizer=tok,
                           chat_template=template, image_seq_length=4)
    cfg = Gemma3Config(
        text_config={"vocab_size": len(words), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "sliding_window": 16,
                     "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2},
        vision_config={"image_size": 28, "patch_size": 14, "hidden_size": 32, "intermediate_size": 37,
                       "num_hidden_layers": 1, "num_attention_heads": 2},
        mm_tokens_per_image=4, image_token_index=6, boi_token_index=4, eoi_token_index=5)
    torch.manual_seed(seed)
    return Gemma3ForConditionalGeneration(cfg).eval(), proc


def tiny_sd_pipeline(folder: str, seed: int = 0) -> str:
    """Save a random tiny ``StableDiffusionPipeline`` (16 px images from 8 px latents, a 1-layer CLIP text encoder
    over a character-level BPE vocabulary) into ``folder``; returns ``folder`` for ``from_pretrained``."""
    import json
    import tempfile
    from pathlib import Path

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz.,!?":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)  # CLIP's BPE marks word ends; without merges every word is its letters
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        tokenizer = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=16)
    torch.manual_seed(seed)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                        projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=2, norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                        norm_num_groups=4, sample_size=16)
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                            scheduler=DDIMScheduler(clip_sample=False), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder
