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


def available_methods() -> dict[str, type[Method]]:
    _load_builtin()
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> type[Method]:
    _load_builtin()
    if name not in _REGISTRY:
        raise ConfigError(f"method.name: unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def method_options(name: str) -> type[MethodOptions]:
    return get_method(name).Options


def _load_builtin() -> None:
    # Importing the modules registers them; done lazily so that config parsing stays light.
    from mcit.methods import dgg, eproj, ewc, joint, lwf, mas, prompt, replay, seqft, tir, zeroshot  # noqa: F401


__all__ = ["Method", "MethodOptions", "TaskContext", "register", "get_method", "available_methods", "method_options"]
