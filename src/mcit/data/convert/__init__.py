"""Converters from the official dataset files to mcit's task format (``mcit data prepare``),
and the checker of a prepared benchmark (``mcit data check``)."""

from mcit.data.convert.core import REGISTRY, Converter, get_converter, prepare

__all__ = ["REGISTRY", "Converter", "available_converters", "get_converter", "prepare"]

# the built-in converters register themselves on import (core never imports them: no cycle)
from mcit.data.convert import captions, choice, grounding, llava, vqa  # noqa: E402, F401


def available_converters() -> dict[str, Converter]:
    return dict(sorted(REGISTRY.items()))
