"""Models: build or load a LLaVA + processor, apply a tuning mode, encode samples."""

from pathlib import Path

MANIFEST = "manifest.json"
# the starts shipped with the package (package data): one llava-hf folder with a manifest each
STARTS_DIR = Path(__file__).resolve().parent.parent / "starts"


def shipped_starts() -> dict[str, Path]:
    """Every start shipped with the package, by name (no torch import: config validation uses it)."""
    if not STARTS_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(STARTS_DIR.iterdir()) if (p / MANIFEST).is_file()}
