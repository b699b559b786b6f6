"""The oracle caption encoder: the positive control of every conditioning comparison.

It has no learned weights and loses nothing: each caption token becomes the concatenation of a one-hot vector of
its word id (the shapes world's word-level tokenizer) and a one-hot vector of its position,

    input_ids (B, L)  ->  hidden state (B, L, V + P),  V = len(world.vocab.ALL_TOKENS), P = ``ORACLE_POSITIONS``

so a DiT conditioned on it (through ``last_layer``'s RMSNorm + Linear, which turns the one-hots into learned word +
position embeddings) is told the exact caption. What a candidate reaches between the ``untrained`` floor and this
ceiling is what its encoder's features are worth. It looks like an HF base model to ``FrozenEncoder`` (one
identity block, ``last_hidden_state``), so it goes through the same tokenizing, template dropping and padding as
every real preset.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

ORACLE_POSITIONS = 64  # caption positions encoded; longer inputs are refused by FrozenEncoder's max_length


class OneHotCaptionModel(nn.Module):
    """One-hot word ⊕ one-hot position per token: ids (B, L) -> ``last_hidden_state`` (B, L, vocab + positions)."""

    def __init__(self, vocab_size: int, positions: int = ORACLE_POSITIONS):
        super().__init__()
        self.vocab_size, self.positions = vocab_size, positions
        width = vocab_size + positions
        self.embed = nn.Embedding(vocab_size, width)
        with torch.no_grad():
            self.embed.weight.zero_()
            self.embed.weight[:, :vocab_size] = torch.eye(vocab_size)
        self.embed.requires_grad_(False)
        self.layers = nn.ModuleList([nn.Identity()])  # FrozenEncoder taps "layer 1" = the output
        self.config = SimpleNamespace(max_position_embeddings=positions)

    @property
    def base_model(self) -> nn.Module:
        return self

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> Any:
        b, length = input_ids.shape
        if length > self.positions:
            raise ValueError(f"the oracle encodes at most {self.positions} tokens, got {length}")
        x = self.embed(input_ids)
        pos = torch.arange(length, device=input_ids.device)
        x[:, pos, self.vocab_size + pos] = 1.0
        x = self.layers[0](x)
        return SimpleNamespace(last_hidden_state=x)


def build_oracle(seed: int) -> tuple[nn.Module, Any]:
    """(OneHotCaptionModel over the shapes vocabulary, the shapes tokenizer); ``seed`` is unused (no weights)."""
    from models.tokenizer import shapes_tokenizer
    from world.vocab import ALL_TOKENS

    del seed
    return OneHotCaptionModel(len(ALL_TOKENS)), shapes_tokenizer()
