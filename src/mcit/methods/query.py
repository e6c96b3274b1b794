"""Frozen per-sample query features of a LLaVA batch, for key matching (prompt pools, experts).

image: the vision tower's pooled feature; text: the mean input embedding of the instruction's
tokens (attended, not padding, placeholders, image tokens or <s>). Both under no_grad."""

from __future__ import annotations

import torch

from mcit.models.tuning import llava_parts


class FrozenQueries:
    def __init__(self, model, encoder):
        _, self.tower, self.embed = llava_parts(model)
        tok = encoder.tokenizer
        self.pad_id, self.bos_id = tok.pad_token_id, tok.bos_token_id
        self.image_id = tok.convert_tokens_to_ids(encoder.image_token)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor):
        image_q = self.tower(pixel_values.to(self.embed.weight.dtype)).pooler_output
        text = attention_mask.bool() & (input_ids != self.pad_id) & (input_ids != self.image_id)
        if self.bos_id is not None:
            text &= input_ids != self.bos_id
        emb = self.embed.weight[input_ids.clamp(min=0)]
        w = text.unsqueeze(-1).to(emb.dtype)
        return image_q, (emb * w).sum(1) / w.sum(1).clamp(min=1.0)


def key_scores(image_q, text_q, image_keys, text_keys) -> torch.Tensor:
    """cos(image, key) + cos(text, key): (batch, entries). Keys are (entries, dim), or (entries,
    prototypes, dim) for entries with several keys per modality: the best-matching one counts."""
    return _cos(image_q, image_keys) + _cos(text_q, text_keys)


def _cos(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    n = torch.nn.functional.normalize
    k = n(keys.detach().float(), dim=-1)
    cos = n(q.float(), dim=-1) @ k.reshape(-1, k.shape[-1]).T
    return cos if keys.dim() == 2 else cos.view(q.shape[0], *k.shape[:2]).amax(-1)
