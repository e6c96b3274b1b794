"""Model families beyond LLaVA-1.5: what each names its parts, and how its processor is loaded.

transformers 5 loads every family below through ``AutoModelForImageTextToText``; they differ in
where the language model, the vision tower and the projector sit, and in how an image becomes
tokens (LLaVA-1.5: a fixed count; LLaVA-NeXT/OneVision: by the image's size; Qwen2-VL: by its
patch grid; InternVL: by its tiles; Idefics3/SmolVLM: by its crops, with row/column tokens). For
all but LLaVA-1.5 mcit lets the family's own processor expand the image placeholder and produce
the image tensors, so the number of image tokens is always the processor's.

Several of these processors also build a video processor, which needs torchvision; torchvision
replaces the CPU torch on these machines and must not be installed. Without it the processor is
built on an image-only path (:func:`load_processor`): the family's own class with its video
attribute left out. With torchvision installed, the processor loads as transformers saves it.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

from mcit.errors import ConfigError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.json's model_type
    language_model: str  # the decoder's module name (LoRA goes only under it)
    vision: str  # the vision tower's module name (never trained)
    projector: str | None  # the vision-to-language projector's module name; None: inside the tower
    placeholder: str | None = None  # what stands for the image in a prompt without a chat template
    fixed_image_tokens: bool = False  # mcit expands the image token itself (LLaVA-1.5 only)
    needs: str = ""  # what the folder holds beyond a tokenizer and an image processor (README)


FAMILIES = (
    Family("llava", ("llava",), "language_model", "vision_tower", "multi_modal_projector", fixed_image_tokens=True),
    Family("llava_next", ("llava_next",), "language_model", "vision_tower", "multi_modal_projector",
           needs="image_grid_pinpoints in config.json and preprocessor_config.json"),
    Family("llava_onevision", ("llava_onevision",), "language_model", "vision_tower", "multi_modal_projector",
           needs="a video processor config is ignored without torchvision"),
    Family("qwen2_vl", ("qwen2_vl", "qwen2_5_vl"), "language_model", "visual", "visual.merger",
           placeholder="<|vision_start|><|image_pad|><|vision_end|>",
           needs="the projector (merger) sits inside the vision tower; min/max_pixels in preprocessor_config.json"),
    Family("internvl", ("internvl",), "language_model", "vision_tower", "multi_modal_projector",
           needs="the transformers-native layout (OpenGVLab/*-hf), not the remote-code one"),
    Family("idefics3", ("idefics3", "smolvlm"), "text_model", "vision_model", "connector",
           needs="SmolVLM's processor needs the num2words package"),
)

_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}
VISION_NAMES = tuple(sorted({f.vision for f in FAMILIES}))
PROJECTOR_NAMES = tuple(sorted({f.projector for f in FAMILIES if f.projector}))


def supported_types() -> str:
    return ", ".join(sorted(_BY_TYPE))


def family_of_type(model_type: str, where: str = "model.path") -> Family:
    family = _BY_TYPE.get(model_type)
    if family is None:
        raise ConfigError(f"{where}: model_type {model_type!r} is not a supported family; supported: {supported_types()}")
    return family


def unwrap(model):
    """The transformers model inside a PEFT wrapper (the model itself when there is none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def family_of(model) -> Family:
    """The family of a (possibly PEFT-wrapped) model."""
    base = unwrap(model)
    return family_of_type(getattr(base.config, "model_type", ""), "model")


def _has(name: str, part: str) -> bool:
    """Whether the parameter or module ``name`` lies under a module called ``part`` (dotted path)."""
    return f".{part}." in f".{name}."


def is_projector(name: str) -> bool:
    return any(_has(name, p) for p in PROJECTOR_NAMES)


def is_vision(name: str) -> bool:
    """A vision-tower parameter (a projector inside the tower, Qwen2-VL's merger, is not)."""
    return any(_has(name, v) for v in VISION_NAMES) and not is_projector(name)


def lora_scope(family: Family) -> str:
    """The regex prefix of the modules LoRA may adapt: the language model's, never the tower's."""
    return rf"(.*\.)?{family.language_model}\..*"


def read_model_type(path: Path) -> str:
    try:
        return json.loads((path / "config.json").read_text()).get("model_type", "")
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"model.path: {path / 'config.json'} is not readable JSON ({e})") from None


def torchvision_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


def _image_only(cls):
    """The processor class without its video attribute (its video processor needs torchvision)."""

    class ImageOnly(cls):
        @classmethod
        def get_attributes(klass):
            return [a for a in cls.get_attributes() if "video" not in a]

    ImageOnly.__name__ = ImageOnly.__qualname__ = cls.__name__
    return ImageOnly


def processor_class(model_type: str):
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    name = PROCESSOR_MAPPING_NAMES.get(model_type)
    if name is None or not hasattr(transformers, name):
        raise ConfigError(f"model.path: transformers {transformers.__version__} has no processor for {model_type!r}")
    return getattr(transformers, name)


def load_processor(path: Path, model_type: str):
    """The family's processor from a local folder. Families whose processor also holds a video
    processor get it only with torchvision installed; otherwise an image-only processor of the same
    class: tokenizer and image processor loaded by the Auto classes (the PIL image processor), the
    processor's own settings from processor_config.json."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    cls = processor_class(model_type)
    if "video_processor" not in cls.get_attributes() or torchvision_available():
        return AutoProcessor.from_pretrained(path, local_files_only=True)
    settings, _ = cls.get_processor_dict(str(path), local_files_only=True)
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in settings.items() if k in params and k not in ("image_processor", "tokenizer", "video_processor")}
    if "video_processor" in params:
        kwargs["video_processor"] = None
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    return _image_only(cls)(image_processor=image_processor, tokenizer=tokenizer, **kwargs)


def part(model, name: str):
    """The module at dotted ``name`` under the model's inner model (``model.model``)."""
    base = unwrap(model)
    module = getattr(base, "model", base)
    for attr in name.split("."):
        module = getattr(module, attr)
    return module


__all__ = ["FAMILIES", "Family", "family_of", "family_of_type", "is_projector", "is_vision", "load_processor",
           "lora_scope", "part", "read_model_type", "supported_types", "unwrap"]
