"""Frozen per-sample query features of a batch, for key matching (prompt pools, experts).

image: the vision tower's output pooled per sample (:class:`mcit.models.vision.VisionQuery`, in
every family); text: the mean input embedding of the instruction's tokens (attended, not padding,
placeholders, image tokens, <s> or a training batch's answer; in families whose processor expands
the image, none of the tokenizer's special tokens either: their row/column and image-boundary
tokens). Both under no_grad."""

from __future__ import annotations

import torch

from mcit.models.families import unwrap
from mcit.models.vision import VisionQuery


class FrozenQueries:
    def __init__(self, model, encoder):
        self.vision = VisionQuery(model)
        base = unwrap(model)
        self.embed = base.get_input_embeddings()
        tok = encoder.tokenizer
        self.pad_id, self.bos_id = tok.pad_token_id, tok.bos_token_id
        self.image_id = tok.convert_tokens_to_ids(encoder.image_token)
        skip = {self.image_id} | (set(tok.all_special_ids) if encoder.dynamic else set())
        self._skip = torch.tensor(sorted(skip), dtype=torch.long)

    @property
    def dim(self) -> int:
        return self.vision.dim

    def images(self, kwargs: dict) -> dict:
        """The image inputs among a forward's keyword arguments (or a batch)."""
        return self.vision.images(kwargs)

    def is_image(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Image positions (the image token, and in dynamic families every special token of the image)."""
        return torch.isin(input_ids, self._skip.to(input_ids.device))

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, images: dict,
                 exclude: torch.Tensor | None = None):
        """``images``: the batch's image inputs (``pixel_values`` and the family's companions).
        ``exclude``: positions left out of the text query (a training batch's answer tokens, so that
        a sample's query is the same in training and in generation, where there is no answer)."""
        image_q = self.vision(input_ids, images)
        text = attention_mask.bool() & (input_ids != self.pad_id) & ~self.is_image(input_ids)
        if exclude is not None:
            text &= ~exclude
        if self.bos_id is not None:
            text &= input_ids != self.bos_id
        emb = self.embed.weight[input_ids.clamp(min=0)]
        w = text.unsqueeze(-1).to(emb.dtype)
        return image_q, (emb * w).sum(1) / w.sum(1).clamp(min=1.0)

    def batched(self, samples, encoder, device, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """The (image, text) queries of ``samples``, in batches of generation inputs."""
        image, text = [], []
        for i in range(0, len(samples), batch_size):
            b = {k: v.to(device) for k, v in encoder.generation_batch(samples[i : i + batch_size]).items()}
            qi, qt = self(b["input_ids"], b["attention_mask"], self.images(b))
            image.append(qi)
            text.append(qt)
        return torch.cat(image), torch.cat(text)


def pull_keys(queries: torch.Tensor, k: int, rounds: int) -> torch.Tensor:
    """``k`` unit keys minimising mean(1 - cos(query, nearest key)), found exactly by spherical
    k-means: assign every query to its nearest key, set each key to its queries' mean direction,
    until no assignment changes or ``rounds`` rounds (one key: the queries' mean direction).

    They start on queries spread by farthest-point selection (the first query, then each time the
    query least similar to the keys so far), so the result depends on the data alone."""
    q = torch.nn.functional.normalize(queries.float(), dim=-1)
    chosen = [0]
    while len(chosen) < k:
        chosen.append(int((q @ q[chosen].T).amax(1).argmin()))
    keys, assign = q[chosen].clone(), None
    for _ in range(rounds):
        new = (q @ keys.T).argmax(1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        for j in range(k):
            mine = q[assign == j]
            if len(mine):  # a key no query is nearest to stays where it is
                keys[j] = torch.nn.functional.normalize(mine.sum(0), dim=0)
    return keys


def key_scores(image_q, text_q, image_keys, text_keys) -> torch.Tensor:
    """cos(image, key) + cos(text, key): (batch, entries). Keys are (entries, dim), or (entries,
    prototypes, dim) for entries with several keys per modality: the best-matching one counts."""
    return _cos(image_q, image_keys) + _cos(text_q, text_keys)


def _cos(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    n = torch.nn.functional.normalize
    k = n(keys.detach().float(), dim=-1)
    cos = n(q.float(), dim=-1) @ k.reshape(-1, k.shape[-1]).T
    return cos if keys.dim() == 2 else cos.view(q.shape[0], *k.shape[:2]).amax(-1)
