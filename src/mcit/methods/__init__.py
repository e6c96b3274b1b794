"""Method registry: ``@register`` a :class:`Method` subclass and the runner can use it by name."""

from __future__ import annotations

from mcit.errors import ConfigError
from mcit.methods.base import Method, MethodOptions, TaskContext

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} must set a name")
    if cls.name in _REGISTRY:
        raise TypeError(f"method {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


# Every built-in method and the module that registers it: an unknown name is refused, and a known
# one loaded, without importing the others (each brings torch; `mcit methods` imports them all).
BUILTIN = {
    "clmoe": "clmoe", "dgg": "dgg", "disco": "disco", "eproj": "eproj", "eproj_sim": "eproj", "ewc": "ewc", "fwd_prompt": "prompt",
    "gem": "gem", "hide": "hide", "joint": "joint", "keeplora": "keeplora", "lwf": "lwf", "mas": "mas", "modalprompt": "modalprompt", "moelora": "moelora", "mrlora": "mrlora", "olora": "olora", "prompt_pool": "prompt", "reglora": "reglora", "replay": "replay", "same": "same", "sefe": "asd", "smolora": "smolora",
    "seqft": "seqft", "tir_ewc": "tir", "tir_mas": "tir", "zeroshot": "zeroshot",
}


def available_methods() -> dict[str, type[Method]]:
    for module in sorted(set(BUILTIN.values())):
        _load(module)
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> type[Method]:
    if name not in _REGISTRY and name in BUILTIN:
        _load(BUILTIN[name])
    if name not in _REGISTRY:
        known = sorted({*BUILTIN, *_REGISTRY})
        raise ConfigError(f"method.name: unknown method {name!r}; available: {', '.join(known)}")
    return _REGISTRY[name]


def method_options(name: str) -> type[MethodOptions]:
    return get_method(name).Options


def _load(module: str) -> None:
    # importing a method's module registers it
    import importlib

    importlib.import_module(f"mcit.methods.{module}")


__all__ = ["Method", "MethodOptions", "TaskContext", "register", "get_method", "available_methods", "method_options"]
