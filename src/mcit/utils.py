"""Small shared helpers: atomic writes, seeding, hashing, environment."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the writer's pid in the name: a later run removes what a killed writer left (remove_stale_temporaries)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; a run's files are for the whole group to read
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def temporary_sibling(path: Path) -> Path:
    """A folder name beside ``path`` to build it in before renaming it into place."""
    import time

    return path.with_name(f"{path.name}.tmp{os.getpid()}-{time.time_ns()}")


_WRITER_PID = re.compile(r"\.tmp(\d+)-\d+$|\.(\d+)\.[^.]+\.tmp$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(folder: str | Path, recursive: bool = False, owned: bool = False) -> list[Path]:
    """Remove the temporary files and folders that killed writers left in ``folder`` (those whose
    writer's pid no longer runs; with ``owned``, those without a pid too: the caller is the only
    writer of the folder). Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.rglob("*.tmp*") if recursive else folder.glob("*.tmp*")):
        m = _WRITER_PID.search(path.name)
        if m is None and not (owned and path.name.endswith(".tmp")):
            continue
        if m is not None and _alive(int(m.group(1) or m.group(2))):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def stable_hash(obj: Any, length: int = 12) -> str:
    """A short hash of a JSON-serialisable object, independent of dict order."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def stable_seed(*parts: Any) -> int:
    """A seed in [0, 2**31) derived from ``parts`` (e.g. the run seed and a purpose), the same on every machine."""
    return int(stable_hash(list(parts)), 16) % 2**31


def flatten(data: dict, sep: str = ".", prefix: str = "") -> dict:
    """A nested dict as one level of ``a.b.c`` keys (lists and scalars are leaves)."""
    out = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, sep, f"{key}{sep}"))
        else:
            out[key] = v
    return out


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def git_commit(cwd: str | Path | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment_info(device: str) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    import mcit

    return {
        "mcit": mcit.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "device": device,
        "git": git_commit(Path(__file__).resolve().parent),
    }


def default_cache_dir() -> Path:
    env = os.environ.get("MCIT_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mcit"
