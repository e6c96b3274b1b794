"""A tiny LLaVA built from config: the same transformers classes as a 7B checkpoint.

The model is a stock ``LlavaForConditionalGeneration`` (CLIP vision tower, MLP projector, Llama
language model) with a word-level tokenizer built offline from the benchmark's vocabulary and a
stock ``LlavaProcessor``; it is saved with ``save_pretrained`` and loaded with
``from_pretrained``, so everything downstream is the real-checkpoint code path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN]
# Words of the prompt template and of common instructions; the rest comes from the data.
_BASE_WORDS = ["user", "assistant", ":", ".", ",", "?", "[", "]", "'", "-"]
_WORD_RE = re.compile(r"\w+|[^\w\s]")


def words_of(text: str) -> list[str]:
    """Split text the way the tokenizer's pre-tokenizer does (lower-cased)."""
    return _WORD_RE.findall(text.replace(IMAGE_TOKEN, " ").lower())


def build_word_tokenizer(texts: Iterable[str], extra_words: Iterable[str] = (), specials: Iterable[str] = (),
                         named: dict[str, str] | None = None):
    """A word-level fast tokenizer whose vocabulary is every word in ``texts``.

    Built offline (no hub download); lower-cases and splits punctuation, so decoding joins
    words with single spaces ("a red circle ." rather than "a red circle."). ``specials``: more
    special tokens (another family's image tokens), kept whole; ``named``: the tokenizer's named
    special tokens (default: ``image_token`` = ``<image>``).
    """
    from transformers import PreTrainedTokenizerFast

    vocab_words: set[str] = set(_BASE_WORDS) | {str(i) for i in range(101)}
    vocab_words.update(w.lower() for w in extra_words)
    for text in texts:
        for special in specials:
            text = text.replace(special, " ")
        vocab_words.update(words_of(text))
    specials = [t for t in specials if t not in SPECIAL_TOKENS]
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *specials])}
    for word in sorted(vocab_words):
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens=named if named is not None else {"image_token": IMAGE_TOKEN},
    )
    if specials:
        tokenizer.add_special_tokens({"additional_special_tokens": specials}, replace_extra_special_tokens=False)
    tokenizer.padding_side = "left"
    return tokenizer


def build_tiny_llava(spec, tokenizer):
    """Build a randomly initialised LLaVA + processor from a ``TinyModelConfig``.

    ``<image>`` is part of the tokenizer before the model is built so that the image token
    index and the embedding table agree.
    """
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    num_patches = (spec.image_size // spec.patch_size) ** 2
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 4,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_hidden * 4,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_heads,
        max_position_embeddings=spec.max_length + num_patches + spec.prompt_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=num_patches,
        vision_feature_layer=-1,  # a 2-layer tower has no useful penultimate layer
        vision_feature_select_strategy="default",
    )
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(spec.init_seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLIP tower's CLS token
    )
    return model, processor
