"""Turn samples into model inputs: prompt template, image tokens, label masking, padding.

Training sequences are ``<s> prompt answer </s>`` with labels = -100 on the prompt (including
every image token) and on padding, so the loss is on the answer and its end-of-sequence only.
Training batches are right-padded; generation batches are left-padded so that every row's
new tokens start at the same position.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from PIL import Image

from mcit.data.format import Sample
from mcit.errors import DataError

IGNORE_INDEX = -100


def num_image_tokens(processor) -> int:
    """How many ``<image>`` tokens one image becomes (what LlavaProcessor expands it to)."""
    crop = processor.image_processor.crop_size
    height, width = crop["height"], crop["width"]
    n = (height // processor.patch_size) * (width // processor.patch_size)
    n += processor.num_additional_image_tokens
    if processor.vision_feature_select_strategy == "default":
        n -= 1
    return n


@dataclass
class Encoder:
    processor: object
    prompt_template: str
    max_length: int  # text tokens; image tokens come on top
    image_cache_size: int = 50_000  # processed images kept in memory (tiny images: ~28 KB each)
    # placeholder positions after <s> whose input embeddings a prompt method replaces (Fwd-Prompt);
    # they hold the pad id but are attended to, which tells them apart from padding
    prefix_tokens: int = 0

    def __post_init__(self):
        self.tokenizer = self.processor.tokenizer
        self.image_token = self.processor.image_token
        self.n_image_tokens = num_image_tokens(self.processor)
        self._images: OrderedDict = OrderedDict()
        self._ids: OrderedDict = OrderedDict()  # (question, answer, prefix_tokens) -> train_ids, LRU
        self._prompts: OrderedDict = OrderedDict()  # (question, prefix_tokens) -> prompt ids, LRU

    # --- text ---------------------------------------------------------------------------
    def prompt_ids(self, sample: Sample) -> list[int]:
        """The prompt's ids (memoised: evaluation sorts by their length, then encodes them)."""
        return self._memo(self._prompts, (sample.question, self.prefix_tokens), lambda: self._prompt_ids(sample))

    def _memo(self, cache: OrderedDict, key, compute):
        """``cache[key]``, computed on a miss; least recently used entries go past ``image_cache_size``."""
        hit = cache.get(key)
        if hit is not None:
            cache.move_to_end(key)
            return hit
        out = cache[key] = compute()
        if len(cache) > self.image_cache_size:
            cache.popitem(last=False)
        return out

    def _prompt_ids(self, sample: Sample) -> list[int]:
        if self.image_token in self.prompt_template:  # a chat template places the image itself
            prompt = self.prompt_template.format(question=sample.question)
        else:
            prompt = self.prompt_template.format(question=f"{self.image_token}\n{sample.question}")
        prompt = prompt.replace(self.image_token, self.image_token * self.n_image_tokens)
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        return ([bos] if bos is not None else []) + [self.tokenizer.pad_token_id] * self.prefix_tokens + ids

    def train_ids(self, sample: Sample) -> tuple[list[int], list[int]]:
        """(input ids, labels) of a sample; memoised, since a stage revisits its samples every epoch
        and tokenising was ~5% of a tiny model's step."""
        return self._memo(self._ids, (sample.question, sample.answer, self.prefix_tokens), lambda: self._train_ids(sample))

    def _train_ids(self, sample: Sample) -> tuple[list[int], list[int]]:
        prompt = self.prompt_ids(sample)
        answer = self.tokenizer(" " + sample.answer, add_special_tokens=False)["input_ids"]
        answer = answer + [self.tokenizer.eos_token_id]
        budget = self.max_length + self.n_image_tokens + self.prefix_tokens
        if len(prompt) >= budget:
            raise DataError(
                f"sample {sample.id!r} ({sample.task}): the prompt alone is {len(prompt)} tokens, "
                f"over the limit of {budget}; raise model.tiny.max_length or shorten the instruction"
            )
        answer = answer[: budget - len(prompt)]
        return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer

    # --- images -------------------------------------------------------------------------
    def pixels(self, sample: Sample) -> torch.Tensor:
        key = str(sample.image)
        cached = self._images.get(key)
        if cached is not None:
            self._images.move_to_end(key)
            return cached
        if sample.image is None:
            raise DataError(f"sample {sample.id!r} ({sample.task}) has no image; text-only samples are not supported yet")
        try:
            with Image.open(sample.image) as im:
                image = im.convert("RGB")
        except (OSError, ValueError) as e:
            raise DataError(f"sample {sample.id!r}: cannot open image {sample.image}: {e}") from None
        pixels = self.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
        self._images[key] = pixels
        if len(self._images) > self.image_cache_size:
            self._images.popitem(last=False)
        return pixels

    # --- batches ------------------------------------------------------------------------
    def train_batch(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id
        encoded = [self.train_ids(s) for s in samples]
        width = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(samples), width), pad, dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(samples), width), dtype=torch.long)
        for row, (ids, labs) in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(labs)] = torch.tensor(labs)
            attention[row, : len(ids)] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention,
            "labels": labels,
            "pixel_values": torch.stack([self.pixels(s) for s in samples]),
        }

    def generation_batch(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id
        encoded = [self.prompt_ids(s) for s in samples]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(samples), width), pad, dtype=torch.long)
        attention = torch.zeros((len(samples), width), dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention,
            "pixel_values": torch.stack([self.pixels(s) for s in samples]),
        }
