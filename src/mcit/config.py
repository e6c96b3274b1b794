"""Typed run configuration: YAML + ``--set a.b=c`` overrides, validated before any work.

Every section maps one-to-one to the arguments of the component it configures. Unknown keys
and bad values are errors naming the key and what is allowed.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mcit.errors import ConfigError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SynthConfig(Strict):
    """Sizes of the generated benchmark (written once per distinct setting, then cached)."""

    seed: int = 0
    train_size: int = Field(3000, ge=1)
    test_size: int = Field(200, ge=1)
    # training samples per base part: the mix a start is built from (configs/synth/start.yaml sets
    # 20000); a run from a shipped start reads only a few of them (Fwd-Prompt's pre-trained subspace)
    base_size: int = Field(500, ge=1)
    image_size: int = Field(48, ge=8)


class ScorerOverride(Strict):
    name: str
    options: dict = {}


class BenchmarkConfig(Strict):
    name: str = "synth"
    root: Path | None = None  # a prepared benchmark folder; synth: generated into the cache if None
    # the stream, in order; None (left out) = the benchmark's default stream; never empty
    tasks: list[str] | None = Field(None, min_length=1)
    # held-out general tasks, evaluated after every stage and never trained: None = the
    # benchmark's own (synth: the start's describe and box), [] = none
    general: list[str] | None = None
    synth: SynthConfig = SynthConfig()
    # before training, every image of the run's splits is decoded (a corrupt file fails up front),
    # or only its header read (a large real benchmark on slow storage), or only its existence checked
    image_check: Literal["decode", "header", "exists"] = "decode"
    max_train: int | None = Field(None, ge=1)  # cap per task (first N records)
    max_test: int | None = Field(None, ge=1)
    # task -> scorer, replacing the prepared benchmark's (e.g. the scorer a paper's numbers used)
    scorers: dict[str, ScorerOverride] = {}

    @model_validator(mode="before")
    @classmethod
    def _scorer_shorthand(cls, data):
        if isinstance(data, dict) and isinstance(data.get("scorers"), dict):
            data = dict(data)
            data["scorers"] = {t: {"name": v} if isinstance(v, str) else v for t, v in data["scorers"].items()}
        return data


class TinyModelConfig(Strict):
    image_size: int = Field(48, ge=8)
    patch_size: int = Field(8, ge=1)
    vision_hidden: int = Field(64, ge=8)
    vision_layers: int = Field(2, ge=1)
    vision_heads: int = Field(4, ge=1)
    text_hidden: int = Field(128, ge=8)
    text_layers: int = Field(2, ge=1)
    text_heads: int = Field(4, ge=1)
    max_length: int = Field(48, ge=8)  # text tokens (prompt + answer), image tokens excluded
    # positions beyond image and text tokens: room for prompt methods' placeholder tokens
    prompt_positions: int = Field(8, ge=0)
    init_seed: int = 0

    @model_validator(mode="after")
    def _divisible(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.text_hidden % self.text_heads or self.vision_hidden % self.vision_heads:
            raise ValueError("hidden sizes must be multiples of their head counts")
        return self


class LoraConfig(Strict):
    r: int = Field(8, ge=1)
    alpha: float = 16.0
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ModelConfig(Strict):
    # start: a start shipped with mcit (model.start), or one built by `mcit base build` into a
    # folder of your own (model.path), loaded as a checkpoint folder with its manifest's prompt
    # format and text budget; hf: a local checkpoint folder (model.path); tiny: a tiny LLaVA built
    # from model.tiny and trained on the base mix at the first run (cached per config and seed)
    kind: Literal["start", "hf", "tiny"] = "start"
    path: Path | None = None  # hf: a local checkpoint folder; start: a built start's folder
    start: str = "synth"  # kind start: the shipped start's name (`mcit base list`); unused with path
    tiny: TinyModelConfig = TinyModelConfig()
    tuning: Literal["full", "lora", "projector"] = "lora"
    lora: LoraConfig = LoraConfig()
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # hf: when not set, the processor's chat template gives the prompt format (if it has one)
    prompt_template: str = "USER: {question} ASSISTANT:"
    gradient_checkpointing: bool = False  # hf: trade compute for activation memory
    train_projector: bool = True  # lora: also train the vision-language projector (LLaVA-1.5 LoRA recipe)
    # hf: text tokens per sequence (tiny: tiny.max_length; start: its manifest's), at most what the
    # model's positions hold beside the image tokens
    max_length: int = Field(2048, ge=8)

    @model_validator(mode="after")
    def _path_for_hf(self):
        if self.kind == "hf" and self.path is None:
            raise ValueError("model.kind 'hf' needs model.path (a local checkpoint folder)")
        if self.kind == "tiny" and self.path is not None:
            raise ValueError("model.path is for model.kind 'hf' or 'start' (got kind 'tiny'); "
                             "set model.kind: hf")
        if "{question}" not in self.prompt_template:
            raise ValueError("model.prompt_template must contain '{question}'")
        return self

    @field_validator("start")
    @classmethod
    def _shipped(cls, v, info):
        if info.data.get("kind", "start") == "start" and info.data.get("path") is None:
            from mcit.models import shipped_starts

            starts = shipped_starts()
            if v not in starts:
                raise ValueError(f"no shipped start {v!r}; available: {', '.join(starts) or '(none)'} (mcit base list)")
        return v


class OptimConfig(Strict):
    steps: int = Field(400, ge=1)  # a stage of zero steps would silently train nothing
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    # the projector's learning rate when it trains beside LoRA adapters (LLaVA-1.5's LoRA recipe:
    # mm_projector_lr 2e-5 against lr 2e-4); None = lr
    projector_lr: float | None = Field(None, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, le=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float | None = Field(1.0, gt=0)
    grad_accum: int = Field(1, ge=1)
    # when set, a task trains for this many passes over its data (steps follow from its size)
    epochs: float | None = Field(None, gt=0)

    def steps_for(self, n_samples: int) -> int:
        """Optimiser steps for a stage of ``n_samples``: ``epochs`` passes if set, else ``steps``."""
        if self.epochs is None:
            return self.steps
        return max(1, math.ceil(self.epochs * n_samples / (self.batch_size * self.grad_accum)))


class BaseTrainingConfig(OptimConfig):
    """Instruction-pretraining of the starting model on the benchmark's base mix (tiny only)."""

    enabled: bool = True
    # base parts or task names -> sampling weight; a weight of 0 drops the part (so a config that
    # ``extends`` another can remove one: mappings merge key by key)
    mix: dict[str, float] = {"describe": 0.6, "locate": 0.4}
    steps: int = Field(3000, ge=0)
    lr: float = Field(2e-3, gt=0)

    @field_validator("mix")
    @classmethod
    def _drop_zeros(cls, mix: dict[str, float]) -> dict[str, float]:
        negative = {k: w for k, w in mix.items() if w < 0}
        if negative:
            raise ValueError(f"base.mix weights must be >= 0 (0 drops a part), got {negative}")
        return {k: w for k, w in mix.items() if w > 0}

    @model_validator(mode="after")
    def _weights(self):
        if self.enabled and not self.mix:
            raise ValueError("base.mix must map at least one part to a positive weight")
        return self


class EvalConfig(Strict):
    batch_size: int = Field(64, ge=1)
    max_new_tokens: int = Field(24, ge=1)  # a task's own max_new_tokens, if set, wins
    # evaluate with a plain LoRA folded into float32 weights (restored exactly after each row):
    # fewer matmuls per layer; predictions may differ from the unmerged model's in the last float
    # bits. Not with mixed_precision bf16 (the folded weight would be cast to bf16 whole).
    merge_lora: bool = False


class RunConfig(Strict):
    name: str | None = None
    seed: int = 0
    benchmark: BenchmarkConfig = BenchmarkConfig()
    model: ModelConfig = ModelConfig()
    base: BaseTrainingConfig = BaseTrainingConfig()
    train: OptimConfig = OptimConfig()
    eval: EvalConfig = EvalConfig()
    method: dict[str, Any] = {"name": "seqft"}
    # a replay part added to any sequential method (the replay method's options: per_task or size,
    # mix, ratio); null: none. The replay and dgg methods take these under method: instead.
    replay: dict[str, Any] | None = None
    # answer style diversification on any training method (share, styles; see mcit.data.asd);
    # null: none. The sefe method takes these under method: instead.
    asd: dict[str, Any] | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # bf16: training forwards and generation under bf16 autocast (weights, gradients, optimizer
    # state and the methods' gradient edits stay float32). fp16 is not offered: its loss scaling
    # would hand the gradient-editing methods scaled gradients.
    mixed_precision: Literal["no", "bf16"] = "no"
    cache_dir: Path | None = None  # default: $MCIT_CACHE or ~/.cache/mcit
    threads: int | None = Field(None, ge=1)  # torch CPU threads; None = torch's default
    # accelerate trackers: "auto" = TensorBoard when installed; or any of tensorboard, wandb, mlflow
    trackers: list[Literal["auto", "tensorboard", "wandb", "mlflow"]] = ["auto"]
    log_every: int = Field(10, ge=1)  # training steps between tracked loss / learning-rate points
    html_report: bool = True  # write report.html beside report.md (one self-contained page)

    @model_validator(mode="after")
    def _method(self):
        from mcit.methods import method_options

        method = dict(self.method)
        name = method.pop("name", None)
        if name is None:
            raise ValueError("method.name is required")
        try:
            options_model = method_options(name)
        except ConfigError as e:  # unknown method: a ValueError, so the error names where it was given
            raise ValueError(str(e)) from None
        try:
            options = options_model.model_validate(method)
        except ValidationError as e:
            raise ValueError(format_validation_error(e, prefix="method.", model=options_model, default=None)) from None
        self.__dict__["method"] = {"name": name, **options.model_dump(mode="json")}
        from mcit.methods.parts import PART_OPTIONS

        for key, options_of in PART_OPTIONS.items():
            if getattr(self, key) is None:
                continue
            part_model = options_of()
            try:
                part = part_model.model_validate(getattr(self, key))
            except ValidationError as e:
                raise ValueError(format_validation_error(e, prefix=f"{key}.", model=part_model, default=None)) from None
            self.__dict__[key] = part.model_dump(mode="json")
        return self

    @model_validator(mode="after")
    def _merge_in_float32(self):
        if self.eval.merge_lora and (self.mixed_precision != "no" or self.model.dtype != "float32"):
            raise ValueError("eval.merge_lora folds the LoRA into float32 weights; it cannot be combined with "
                             f"mixed_precision {self.mixed_precision!r} / model.dtype {self.model.dtype!r}")
        return self


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """Walk the model along ``loc`` to list the keys allowed where an unknown key appeared."""
    current: Any = model
    for part in loc[:-1]:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = field.annotation
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


Sources = dict[tuple, str]  # a key path -> where its value was given ("file.yaml:12", "--set a.b=1")


def format_validation_error(e: ValidationError, prefix: str = "", model: type[BaseModel] | None = None,
                            sources: Sources | None = None, default: str | None = "config") -> str:
    """One line for every problem, each named by where its key was given: a file and line, or the
    ``--set`` override (the closest enclosing key that has a source, else ``default``)."""
    parts = []
    for err in e.errors():
        loc = tuple(str(p) for p in err["loc"])
        key = prefix + ".".join(loc)
        if not loc:  # a whole-model check; its message names its own keys
            text = err["msg"].removeprefix("Value error, ")
            named = re.match(r"([\w.]+):", text)
            loc = tuple(named.group(1).split(".")) if named else loc
        elif err["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, err["loc"]) if model else None
            hint = f"; allowed: {', '.join(allowed)}" if allowed else ""
            text = f"{key}: unknown key{hint}"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if "input" in err and err["type"] != "value_error" and not isinstance(err["input"], dict):
                msg += f" (got {err['input']!r})"
            text = f"{key}: {msg}"
        parts.append((_source_of(loc, sources or {}, default), text))
    if default is None and not sources:  # a nested model's errors: the caller names the source
        return "; ".join(text for _, text in parts)
    if len({src for src, _ in parts}) == 1:
        return f"{parts[0][0]}: " + "; ".join(text for _, text in parts)
    return "; ".join(f"{src}: {text}" for src, text in parts)


def _source_of(loc: tuple, sources: Sources, default: str) -> str:
    for n in range(len(loc), 0, -1):
        if loc[:n] in sources:
            return sources[loc[:n]]
    return default


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=3e-4")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {item!r}: malformed key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict, overrides: list[str], sources: Sources | None = None) -> dict:
    for item in overrides:
        parts, value = _parse_override(item)
        node = data
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
        if sources is not None:
            for k in [k for k in sources if k[: len(parts)] == tuple(parts)]:
                del sources[k]  # what the override replaced no longer comes from the file
            sources[tuple(parts)] = f"--set {item}"
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    sources: Sources = {}
    data: dict = _read_yaml(Path(path), (), sources) if path is not None else {}
    data = apply_overrides(data, overrides or [], sources)
    return config_from_dict(data, source=str(path) if path else "config", sources=sources)


def _read_yaml(path: Path, chain: tuple[Path, ...], sources: Sources | None = None) -> dict:
    """A config file's mapping, with ``extends: FILE`` (relative to it) merged underneath; each
    key's file and line go into ``sources`` (a key of this file wins over its parent's)."""
    if not path.is_file():
        where = f" (extended by {chain[-1]})" if chain else ""
        raise ConfigError(f"{path}: config file not found{where}")
    if path.resolve() in chain:
        raise ConfigError(f"{path}: 'extends' forms a cycle: {' -> '.join(map(str, chain))} -> {path}")
    text = path.read_text()
    try:
        data = yaml.safe_load(text) or {}
        lines = _key_lines(yaml.compose(text))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    parent = data.pop("extends", None)
    if parent is not None and not isinstance(parent, str):
        raise ConfigError(f"{path}: 'extends' must be one file path (relative to this file)")
    if parent is not None:
        data = _deep_merge(_read_yaml(path.parent / parent, (*chain, path.resolve()), sources), data)
    if sources is not None:
        sources.update({k: f"{path}:{line}" for k, line in lines.items() if k != ("extends",)})
    return data


def _key_lines(node, prefix: tuple = ()) -> dict[tuple, int]:
    """Every key path of a composed YAML mapping, with the line (1-based) it is written on."""
    out = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = (*prefix, str(key.value))
            out[path] = key.start_mark.line + 1
            out.update(_key_lines(value, path))
    return out


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def config_from_dict(data: dict, source: str = "config", sources: Sources | None = None) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, model=RunConfig, sources=sources, default=source)) from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
