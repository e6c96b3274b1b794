import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "synth" / "smoke.yaml"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache (generated data, base model) shared by the session's tests."""
    return tmp_path_factory.mktemp("mcit_cache")


@pytest.fixture(scope="session")
def smoke_cfg(cache_dir):
    from mcit.config import load_config

    def make(*overrides: str):
        return load_config(SMOKE, [f"cache_dir={cache_dir}", *overrides])

    return make


@pytest.fixture(scope="session")
def smoke_run(smoke_cfg, tmp_path_factory):
    """The smoke config run once end to end; several tests read its outputs."""
    from mcit.cli import _quiet_libraries
    from mcit.runner import run

    _quiet_libraries()
    out = tmp_path_factory.mktemp("runs") / "smoke"
    results = run(smoke_cfg(), out, show_progress=False)
    return out, results
