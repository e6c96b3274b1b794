"""Load the starting model of a run: always ``from_pretrained`` of a checkpoint folder.

``start``: a start shipped with mcit (``mcit/starts/<name>``); ``hf``: a local folder;
``tiny``: the from-scratch base that :mod:`mcit.models.start` builds into the cache. The rest of
the run cannot tell them apart.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mcit.data.benchmark import Benchmark
from mcit.errors import ConfigError

# A llava-hf style checkpoint folder: each requirement is satisfied by any one of its files.
HF_REQUIRED = {
    "model config": ("config.json",),
    "weights": ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"),
    "tokenizer": ("tokenizer.json", "tokenizer.model"),
    "image processor": ("preprocessor_config.json", "processor_config.json"),
}


def check_checkpoint_dir(path: Path) -> None:
    """A clear error naming what a local checkpoint folder lacks (no hub access is ever tried)."""
    if not path.is_dir():
        raise ConfigError(f"model.path: {path} is not a folder (expected a llava-hf style checkpoint folder)")
    missing = [f"{what} ({' or '.join(files)})" for what, files in HF_REQUIRED.items()
               if not any((path / f).is_file() for f in files)]
    index = next((path / f for f in HF_REQUIRED["weights"] if f.endswith(".index.json") and (path / f).is_file()), None)
    if index is not None:
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError):
            raise ConfigError(f"model.path: {index} is not a weight index (no 'weight_map')") from None
        missing += [f"weight shard {s}" for s in shards if not (path / s).is_file()]
    if missing:
        raise ConfigError(f"model.path: {path} is incomplete; missing: {'; '.join(missing)}")


def load_pretrained(path: Path, dtype: str = "float32", gradient_checkpointing: bool = False):
    """(model, processor) of a local checkpoint folder of any supported family (:mod:`families`):
    LLaVA-1.5 through its own classes, the others through ``AutoModelForImageTextToText`` and the
    family's processor."""
    import os

    from mcit.models.families import family_of_type, load_processor, read_model_type

    check_checkpoint_dir(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder only: never reach for the hub
    model_type = read_model_type(path)
    family = family_of_type(model_type)
    try:
        if family.fixed_image_tokens:
            from transformers import LlavaForConditionalGeneration, LlavaProcessor

            processor = LlavaProcessor.from_pretrained(path, local_files_only=True)
            model = LlavaForConditionalGeneration.from_pretrained(path, dtype=getattr(torch, dtype), local_files_only=True)
        else:
            from transformers import AutoModelForImageTextToText

            processor = load_processor(path, model_type)
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"model.path: cannot load a {family.name} checkpoint from {path}: {e}") from None
    except ImportError as e:  # e.g. SmolVLM's processor without num2words
        raise ConfigError(f"model.path: the {family.name} processor needs a package: {e}") from None
    if gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # adapters on a frozen embedding still need activations' grads
    model.eval()
    return model, processor


def prompt_template(cfg, processor) -> str:
    """The prompt format: ``model.prompt_template`` if the config sets it (or the model is tiny),
    else, for hf checkpoints, the processor's chat template rendered around ``{question}``."""
    if "prompt_template" in cfg.model.model_fields_set or cfg.model.kind == "tiny":
        return cfg.model.prompt_template
    if cfg.model.kind == "start":  # the template the start was instruction-tuned with
        from mcit.models.start import read_manifest

        return read_manifest(start_path(cfg)).get("prompt_template", cfg.model.prompt_template)
    chat = getattr(processor, "chat_template", None)
    if not chat:
        return cfg.model.prompt_template
    sentinel = "\x00QUESTION\x00"
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sentinel}]}]
    try:
        try:
            text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        except AttributeError:  # an image-only processor whose template call reads its video settings (SmolVLM)
            text = processor.tokenizer.apply_chat_template(conversation, chat_template=chat, add_generation_prompt=True,
                                                           tokenize=False)
    except Exception as e:  # a template that cannot render one user turn: say so, let the user set it
        raise ConfigError(f"model.path: the processor's chat template cannot render a prompt ({e}); "
                          "set model.prompt_template") from None
    bos = processor.tokenizer.bos_token
    if bos and text.startswith(bos):
        text = text[len(bos):]  # the encoder adds <s> itself
    text = text.replace("{", "{{").replace("}", "}}").replace(sentinel, "{question}")
    if "{question}" not in text:
        raise ConfigError("model.path: the chat template dropped the question; set model.prompt_template")
    return text.rstrip()


def start_path(cfg) -> Path:
    """The checkpoint folder a run loads: the shipped start, the local folder, or (tiny) the cached
    from-scratch base, which only :func:`starting_model` builds."""
    if cfg.model.kind == "start":
        from mcit.models.start import start_folder

        return start_folder(cfg)
    return Path(cfg.model.path)


def text_budget(cfg, model, n_image_tokens: int) -> int:
    """Text tokens per sequence: the config's (a start's: its manifest's), at most what the model's
    positions hold beside the image tokens and a few prompt placeholders."""
    if cfg.model.kind == "tiny":
        return cfg.model.tiny.max_length
    limit = cfg.model.max_length
    if cfg.model.kind == "start" and "max_length" not in cfg.model.model_fields_set:
        from mcit.models.start import read_manifest

        limit = read_manifest(start_path(cfg)).get("max_length", limit)
    positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if positions:
        limit = min(limit, positions - n_image_tokens)
    return limit


def starting_model(cfg, bench: Benchmark, cache_dir: Path, accelerator, show_progress: bool = True):
    if cfg.model.kind == "tiny":
        from mcit.models.start import ensure_tiny_base

        path = ensure_tiny_base(cfg, bench, cache_dir, accelerator.device, show_progress)
    else:
        path = start_path(cfg)
    return load_pretrained(path, cfg.model.dtype, cfg.model.kind == "hf" and cfg.model.gradient_checkpointing)
