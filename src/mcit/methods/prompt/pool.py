"""The pool of prompts and their keys (an ``nn.Module`` inside the model, so it checkpoints
with the model's trainable weights), and how a selected entry is scored against a query."""

from __future__ import annotations

import torch
from torch import nn

POOL_ATTR = "mcit_prompt_pool"  # the pool's name inside the model: its parameters checkpoint with the model's


class PromptPool(nn.Module):
    def __init__(self, size: int, length: int, d_text: int, d_image: int, std: float, generator: torch.Generator,
                 depth: int = 1, keys: int = 1):
        super().__init__()
        shape = (size,) if keys == 1 else (size, keys)  # one key per entry keeps the earlier (size, d) layout
        self.prompts = nn.Parameter(torch.randn(size, length, d_text, generator=generator) * std)
        self.text_keys = nn.Parameter(torch.randn(*shape, d_text, generator=generator))
        self.image_keys = nn.Parameter(torch.randn(*shape, d_image, generator=generator))
        # Deep prompts: entry x decoder layer 1..depth-1 x length x d (drawn after the keys, so
        # depth 1 keeps the pool of earlier versions bit for bit).
        self.layer_prompts = (
            nn.Parameter(torch.randn(size, depth - 1, length, d_text, generator=generator) * std) if depth > 1 else None
        )

    def values(self, layer: int) -> torch.Tensor:
        """The prompts (entries x length x d) placed at the input of language-model layer ``layer``
        (0 = the input embeddings)."""
        return self.prompts if layer == 0 else self.layer_prompts[:, layer - 1]


def _best_cos(keys: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """cos(query, key) of each selected entry (B x k x d keys), or of its best key (B x k x P x d)."""
    q = q.to(keys.dtype).unsqueeze(1)
    if keys.dim() == 4:
        return nn.functional.cosine_similarity(keys, q.unsqueeze(2), dim=-1).amax(-1)
    return nn.functional.cosine_similarity(keys, q, dim=-1)
