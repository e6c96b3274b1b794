"""A sample's frozen image feature in every family: the vision tower's output, pooled per sample,
never the projector (which may train). What prompt pools, ModalPrompt, HiDe/DISCO's anchors and
task similarity match images by.

- LLaVA-1.5: the tower's pooled output (its CLS token after the final norm), as before.
- LLaVA-NeXT / OneVision: the mean of the tower's output tokens for the base image (the whole
  image resized; the first of each sample's patches).
- InternVL: the mean over the sample's tiles of the tower's mean output token (a sample's tiles
  counted from its image tokens).
- Qwen2-VL / Qwen2.5-VL: the mean of the tower's patch features before the merger (the projector
  inside the tower), split per image by its grid.
- Idefics3 / SmolVLM: the mean over the sample's real crops (padding crops are all zero) of the
  tower's mean output token.
"""

from __future__ import annotations

import torch

from mcit.errors import McitError
from mcit.models.families import family_of, part, unwrap

# the batch keys that carry a family's images (what the family's forward reads beside the ids)
IMAGE_INPUTS = {
    "llava": ("pixel_values",),
    "llava_next": ("pixel_values", "image_sizes"),
    "llava_onevision": ("pixel_values", "image_sizes"),
    "qwen2_vl": ("pixel_values", "image_grid_thw"),
    "internvl": ("pixel_values",),
    "idefics3": ("pixel_values", "pixel_attention_mask"),
}


def _segment_mean(features: torch.Tensor, counts: list[int], what: str) -> torch.Tensor:
    if sum(counts) != features.shape[0] or min(counts, default=1) < 1:
        raise McitError(f"image query: {what} per sample {counts} do not add up to the {features.shape[0]} computed")
    return torch.stack([chunk.mean(0) for chunk in torch.split(features, counts)])


class VisionQuery:
    """``query(input_ids, images)``: (batch, dim) frozen image features; ``dim`` their width."""

    def __init__(self, model):
        self.family = family_of(model)
        base = unwrap(model)
        self.config = base.config
        self.tower = part(model, self.family.vision)
        self.keys = IMAGE_INPUTS[self.family.name]
        name = self.family.name
        if name == "qwen2_vl":
            self.dim = int(self.tower.merger.ln_q.weight.shape[0])
        else:
            self.dim = int(self.tower.config.hidden_size)
        if name == "internvl":
            vc = self.config.vision_config
            size = vc.image_size[0] if isinstance(vc.image_size, (list, tuple)) else vc.image_size
            patch = vc.patch_size[0] if isinstance(vc.patch_size, (list, tuple)) else vc.patch_size
            self.tile_tokens = int((size // patch) ** 2 * self.config.downsample_ratio ** 2)
            self.image_id = self.config.image_token_id

    def images(self, kwargs: dict) -> dict:
        """The image inputs among a forward's (or a batch's) keyword arguments."""
        return {k: kwargs[k] for k in self.keys if kwargs.get(k) is not None}

    def dtype(self) -> torch.dtype:
        return next(self.tower.parameters()).dtype

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, images: dict) -> torch.Tensor:
        pixels = images["pixel_values"].to(self.dtype())
        name = self.family.name
        if name == "llava":
            return self.tower(pixels).pooler_output
        if name in ("llava_next", "llava_onevision"):
            base = pixels[:, 0] if pixels.dim() == 5 else pixels
            return self.tower(base).last_hidden_state.mean(1)
        if name == "internvl":
            per_tile = self.tower(pixel_values=pixels).last_hidden_state.mean(1)
            counts = ((input_ids == self.image_id).sum(1) // self.tile_tokens).tolist()
            return _segment_mean(per_tile, counts, "tiles")
        if name == "qwen2_vl":
            grid = images["image_grid_thw"]
            seen = []
            hook = self.tower.merger.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
            try:
                self.tower(pixels, grid_thw=grid)
            finally:
                hook.remove()
            return _segment_mean(seen[0], grid.prod(-1).tolist(), "patches")
        if name == "idefics3":
            real = pixels.flatten(2).abs().sum(-1) > 0  # (batch, crops): padding crops are all zero
            per_crop = self.tower(pixel_values=pixels[real]).last_hidden_state.mean(1)
            return _segment_mean(per_crop, real.sum(1).tolist(), "crops")
        raise McitError(f"image query: no rule for the {name} family")


__all__ = ["IMAGE_INPUTS", "VisionQuery"]
