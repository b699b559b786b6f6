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
