"""Tiny random checkpoints of each model family, built offline from their transformers configs and
saved as a checkpoint folder the way a downloaded one is laid out (config, safetensors, tokenizer,
preprocessor_config.json, processor_config.json, chat_template.jinja).

The tokenizer is mcit's word-level one over the benchmark's words plus the family's own special
tokens; the image processors are the PIL ones (no torchvision). Sizes are the smallest each family
accepts, so that a smoke stream runs in seconds."""

from __future__ import annotations

import json
from pathlib import Path

FAMILIES = ("llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "internvl", "idefics3", "smolvlm")

# a chat template of the families' shape: the image where the family's processor expects it
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}user : {% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}IMAGE{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %} assistant :{% endif %}")
IDEFICS_SPECIALS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
                    *[f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]]


def _text(tok, **kw) -> dict:
    d = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    d.update(kw)
    return d


def _clip() -> dict:
    return dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, image_size=32, patch_size=8, projection_dim=32)


def build_family(family: str, out: Path, texts: list[str]) -> Path:
    """A tiny random ``family`` checkpoint folder at ``out`` whose tokenizer knows ``texts``."""
    import torch
    import transformers as T

    from mcit.models.tiny import build_word_tokenizer

    torch.manual_seed(0)
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    if family in ("llava_next", "llava_onevision"):
        specials = ["<image>", "<video>"]
        tok = build_word_tokenizer(texts, specials=specials, named={"image_token": "<image>", "video_token": "<video>"})
        ids = dict(image_token_index=tok.convert_tokens_to_ids("<image>"))
        common = dict(vision_config=_clip(), text_config=dict(model_type="llama", **_text(tok)), image_grid_pinpoints=pinpoints,
                      vision_feature_layer=-1, vision_feature_select_strategy="default", **ids)
        proc = dict(patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1)
        if family == "llava_onevision":  # its towers are SigLIP: no CLS token, every patch feature kept
            common.update(vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=8),
                          vision_feature_select_strategy="full")
            proc.update(vision_feature_select_strategy="full", num_additional_image_tokens=0)
        if family == "llava_next":
            image = T.LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                 image_grid_pinpoints=pinpoints)
            model = T.LlavaNextForConditionalGeneration(T.LlavaNextConfig(**common))
        else:
            image = T.LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints)
            common["video_token_index"] = tok.convert_tokens_to_ids("<video>")
            model = T.LlavaOnevisionForConditionalGeneration(T.LlavaOnevisionConfig(**common))
            proc["num_image_tokens"] = 16
        placeholder = "<image>"
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        names = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                 "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
        tok = build_word_tokenizer(texts, specials=list(names.values()), named=names)
        image = T.Qwen2VLImageProcessorPil(min_pixels=32 * 32, max_pixels=64 * 64, patch_size=8, merge_size=2,
                                           temporal_patch_size=2)
        ids = {f"{k}_id": tok.convert_tokens_to_ids(v) for k, v in names.items()}
        vision = dict(depth=1, hidden_size=32, num_heads=4, patch_size=8, spatial_merge_size=2, temporal_patch_size=2)
        rope = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0}
        if family == "qwen2_vl":
            config = T.Qwen2VLConfig(text_config=_text(tok, rope_parameters=rope), vision_config=dict(embed_dim=32, **vision), **ids)
            model = T.Qwen2VLForConditionalGeneration(config)
        else:
            config = T.Qwen2_5_VLConfig(text_config=_text(tok, rope_parameters=rope),
                                        vision_config=dict(intermediate_size=64, out_hidden_size=32, fullatt_block_indexes=[0],
                                                           window_size=16, **vision), **ids)
            model = T.Qwen2_5_VLForConditionalGeneration(config)
        proc, placeholder = {}, "<|vision_start|><|image_pad|><|vision_end|>"
    elif family == "internvl":
        names = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                 "video_token": "<video>"}
        tok = build_word_tokenizer(texts, specials=list(names.values()), named=names)
        image = T.GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, max_patches=4)
        config = T.InternVLConfig(
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                               image_size=[32, 32], patch_size=[8, 8]),
            text_config=dict(model_type="qwen2", **_text(tok)), image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
            downsample_ratio=0.5, vision_feature_layer=-1)
        model = T.InternVLForConditionalGeneration(config)
        proc, placeholder = dict(image_seq_length=4), "<IMG_CONTEXT>"
    elif family in ("idefics3", "smolvlm"):
        tok = build_word_tokenizer(texts, specials=IDEFICS_SPECIALS, named={"image_token": "<image>"})
        idefics = family == "idefics3"
        image = (T.Idefics3ImageProcessorPil if idefics else T.SmolVLMImageProcessorPil)(
            do_image_splitting=True, size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
        config = (T.Idefics3Config if idefics else T.SmolVLMConfig)(
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                               image_size=32, patch_size=8),
            text_config=dict(model_type="llama", **_text(tok)), image_token_id=tok.convert_tokens_to_ids("<image>"),
            scale_factor=2)
        model = (T.Idefics3ForConditionalGeneration if idefics else T.SmolVLMForConditionalGeneration)(config)
        proc, placeholder = dict(image_seq_len=4), "<image>"
    else:
        raise ValueError(family)
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(tok, key))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    image.save_pretrained(out)
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    (out / "processor_config.json").write_text(
        json.dumps({**proc, "processor_class": PROCESSOR_MAPPING_NAMES[model.config.model_type]}))
    (out / "chat_template.jinja").write_text(TEMPLATE.replace("IMAGE", placeholder))
    return out
