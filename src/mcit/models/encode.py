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


def expands_images(processor) -> bool:
    """Whether the family's processor expands the image placeholder (every family but LLaVA-1.5,
    whose fixed count mcit expands itself, :func:`num_image_tokens`)."""
    return type(processor).__name__ != "LlavaProcessor"


def num_image_tokens(processor) -> int:
    """How many ``<image>`` tokens one image becomes (what LlavaProcessor expands it to); 0 for a
    family whose processor decides it per image."""
    if expands_images(processor):
        return 0
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

    # what stands for the image in a template that does not place it (Qwen2-VL: with its
    # vision start/end tokens); None: the processor's image token
    placeholder: str | None = None

    def __post_init__(self):
        self.tokenizer = self.processor.tokenizer
        self.image_token = self.processor.image_token
        self.n_image_tokens = num_image_tokens(self.processor)
        self.dynamic = expands_images(self.processor)  # the processor expands images and makes their tensors
        self._inputs: OrderedDict = OrderedDict()  # dynamic: (question, image, prefix) -> (ids, extras, image tensors)
        self._images: OrderedDict = OrderedDict()
        self._ids: OrderedDict = OrderedDict()  # (question, answer, prefix_tokens) -> train_ids, LRU
        self._prompts: OrderedDict = OrderedDict()  # (question, prefix_tokens) -> prompt ids, LRU

    # --- text ---------------------------------------------------------------------------
    def prompt_ids(self, sample: Sample) -> list[int]:
        """The prompt's ids (memoised: evaluation sorts by their length, then encodes them)."""
        if self.dynamic:
            return self._processed(sample)[0]
        return self._memo(self._prompts, (sample.question, self.prefix_tokens), lambda: self._prompt_ids(sample))

    def _key(self, sample: Sample) -> tuple:
        """What a sample's ids depend on: its question, and its image where the processor sizes the
        image's tokens by it."""
        return (sample.question, str(sample.image)) if self.dynamic else (sample.question,)

    def _prompt_text(self, sample: Sample) -> str:
        if self.image_token in self.prompt_template:  # a chat template places the image itself
            return self.prompt_template.format(question=sample.question)
        return self.prompt_template.format(question=f"{self.placeholder or self.image_token}\n{sample.question}")

    def _processed(self, sample: Sample):
        """Dynamic families: (prompt ids, token-aligned extras, image tensors), the image expanded by
        the family's processor (memoised, least recently used out past ``image_cache_size``)."""
        return self._memo(self._inputs, (*self._key(sample), self.prefix_tokens), lambda: self._process(sample))

    def _process(self, sample: Sample):
        image = self._image(sample)
        images = [[image]] if type(self.processor).__name__ in ("Idefics3Processor", "SmolVLMProcessor") else [image]
        out = dict(self.processor(text=[self._prompt_text(sample)], images=images, return_tensors="pt",
                                  add_special_tokens=False))
        ids = out.pop("input_ids")[0].tolist()
        out.pop("attention_mask", None)
        lead = self._lead()
        # per-token inputs beside the ids (Qwen2-VL's mm_token_type_ids): 0 on <s>, placeholders, answer, padding
        extras = {k: [0] * len(lead) + out.pop(k)[0].tolist() for k in list(out) if k.endswith("token_type_ids")}
        return lead + ids, extras, out

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

    def _lead(self) -> list[int]:
        """What precedes every prompt: <s> (where the tokenizer has one) and the prompt placeholders."""
        bos = self.tokenizer.bos_token_id
        return ([bos] if bos is not None else []) + [self.tokenizer.pad_token_id] * self.prefix_tokens

    def _prompt_ids(self, sample: Sample) -> list[int]:
        prompt = self._prompt_text(sample).replace(self.image_token, self.image_token * self.n_image_tokens)
        return self._lead() + self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def train_ids(self, sample: Sample) -> tuple[list[int], list[int]]:
        """(input ids, labels) of a sample; memoised, since a stage revisits its samples every epoch
        and tokenising was ~5% of a tiny model's step."""
        return self._memo(self._ids, (*self._key(sample), sample.answer, self.prefix_tokens), lambda: self._train_ids(sample))

    def _image_budget(self, sample: Sample, prompt: list[int]) -> int:
        """The image's tokens in ``prompt``: fixed (LLaVA-1.5), or what the processor added."""
        if not self.dynamic:
            return self.n_image_tokens
        plain = self.tokenizer(self._prompt_text(sample), add_special_tokens=False)["input_ids"]
        return max(0, len(prompt) - len(plain))

    def _train_ids(self, sample: Sample) -> tuple[list[int], list[int]]:
        prompt = self.prompt_ids(sample)
        answer = self.tokenizer(" " + sample.answer, add_special_tokens=False)["input_ids"]
        answer = answer + [self.tokenizer.eos_token_id]
        budget = self.max_length + self._image_budget(sample, prompt) + self.prefix_tokens
        if len(prompt) >= budget:
            raise DataError(
                f"sample {sample.id!r} ({sample.task}): the prompt alone is {len(prompt)} tokens, "
                f"over the limit of {budget}; raise model.tiny.max_length or shorten the instruction"
            )
        answer = answer[: budget - len(prompt)]
        return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer

    # --- images -------------------------------------------------------------------------
    def _image(self, sample: Sample) -> Image.Image:
        if sample.image is None:
            raise DataError(f"sample {sample.id!r} ({sample.task}) has no image; text-only samples are not supported yet")
        try:
            with Image.open(sample.image) as im:
                image = im.convert("RGB")
        except (OSError, ValueError) as e:
            raise DataError(f"sample {sample.id!r}: cannot open image {sample.image}: {e}") from None
        return image

    def pixels(self, sample: Sample) -> torch.Tensor:
        """LLaVA-1.5: one image's pixel values (cached)."""
        key = str(sample.image)
        cached = self._images.get(key)
        if cached is not None:
            self._images.move_to_end(key)
            return cached
        image = self._image(sample)
        pixels = self.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
        self._images[key] = pixels
        if len(self._images) > self.image_cache_size:
            self._images.popitem(last=False)
        return pixels

    # --- batches ------------------------------------------------------------------------
    def _image_inputs(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        if not self.dynamic:
            return {"pixel_values": torch.stack([self.pixels(s) for s in samples])}
        return collate_images([self._processed(s)[2] for s in samples])

    def _extras(self, samples: list[Sample], width: int, lengths: list[int], left: bool) -> dict[str, torch.Tensor]:
        """The per-token inputs beside the ids, padded as the ids are (0 on the answer and padding)."""
        if not self.dynamic:
            return {}
        rows = [self._processed(s)[1] for s in samples]
        out = {}
        for key in rows[0]:
            t = torch.zeros((len(samples), width), dtype=torch.long)
            for r, (row, n) in enumerate(zip(rows, lengths, strict=True)):
                vals = torch.tensor(row[key][:n])
                if left:
                    t[r, width - n : width - n + len(vals)] = vals
                else:
                    t[r, : len(vals)] = vals
            out[key] = t
        return out

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
        lengths = [len(ids) for ids, _ in encoded]
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
                **self._extras(samples, width, lengths, left=False), **self._image_inputs(samples)}

    def generation_batch(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id
        encoded = [self.prompt_ids(s) for s in samples]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(samples), width), pad, dtype=torch.long)
        attention = torch.zeros((len(samples), width), dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        lengths = [len(ids) for ids in encoded]
        return {"input_ids": input_ids, "attention_mask": attention,
                **self._extras(samples, width, lengths, left=True), **self._image_inputs(samples)}


def collate_images(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One batch's image tensors from each sample's processor output: concatenated along the first
    dimension, which is the batch (LLaVA-NeXT's patches, Idefics3's crops: (1, n, ...)) or the
    images' patches or tiles themselves (Qwen2-VL's flattened patches with their grid, InternVL's
    tiles); other dimensions that differ (a sample with fewer crops) are zero-padded, which the
    families read as absent (LLaVA-NeXT by image_sizes, Idefics3 by all-zero crops and its
    pixel_attention_mask)."""
    out = {}
    for key in parts[0]:
        tensors = [p[key] for p in parts]
        dims = tensors[0].dim()
        if any(t.dim() != dims for t in tensors):
            raise DataError(f"image inputs {key!r}: samples differ in rank {sorted({t.dim() for t in tensors})}")
        shape = [max(t.shape[d] for t in tensors) for d in range(1, dims)]
        padded = []
        for t in tensors:
            if list(t.shape[1:]) != shape:
                pads = []
                for d in range(dims - 1, 0, -1):  # F.pad takes the last dimension first
                    pads += [0, shape[d - 1] - t.shape[d]]
                t = torch.nn.functional.pad(t, pads)
            padded.append(t)
        out[key] = torch.cat(padded)
    return out
