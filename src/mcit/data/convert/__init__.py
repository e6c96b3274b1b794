"""Converters from the official dataset files to mcit's task format (``mcit data prepare``),
and the checker of a prepared benchmark (``mcit data check``)."""

from mcit.data.convert.core import REGISTRY, Converter, get_converter, prepare

__all__ = ["REGISTRY", "Converter", "available_converters", "get_converter", "prepare"]

_LOADED = False


def _load_builtin() -> None:
    global _LOADED
    if not _LOADED:
        from mcit.data.convert import captions, choice, grounding, llava, vqa  # noqa: F401

        _LOADED = True


def available_converters() -> dict[str, Converter]:
    _load_builtin()
    return dict(sorted(REGISTRY.items()))
