"""What `mcit methods` prints, without importing the methods.

Every method module imports torch (2-4 s on a laptop CPU), so listing the methods by importing
them costs seconds. ``catalog.json`` beside this file holds, per built-in method, what the
listing shows: walk, summary, paper and each option's default and description. It is built
from the registered classes by ``python -m mcit.methods.catalog`` and a test rebuilds it and
fails when it differs, so it cannot drift from the code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CATALOG = Path(__file__).with_name("catalog.json")


def build_catalog() -> dict[str, Any]:
    """The catalog from the registered classes (imports every built-in method)."""
    from mcit.methods import BUILTIN, available_methods

    registry = available_methods()
    entries = {}
    for name in sorted(BUILTIN):
        cls = registry[name]
        entries[name] = {
            "walk": cls.walk,
            "summary": cls.summary,
            "paper": cls.paper,
            "options": [{"name": field_name, "default": repr(field.default), "description": field.description or ""}
                        for field_name, field in cls.Options.model_fields.items()],
        }
    return entries


def load_catalog() -> dict[str, Any]:
    return json.loads(CATALOG.read_text())


def write_catalog(path: Path = CATALOG) -> None:
    from mcit.utils import atomic_write_text

    atomic_write_text(path, json.dumps(build_catalog(), indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":  # pragma: no cover - maintenance entry point
    write_catalog()
    print(f"wrote {CATALOG}")
