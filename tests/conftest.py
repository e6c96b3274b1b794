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


def make_tiny(tmp_path, text_layers=1):
    """An untrained tiny LLaVA, its processor, an encoder and two samples with one image."""
    from PIL import Image

    from mcit.config import TinyModelConfig
    from mcit.data.format import Sample
    from mcit.models.encode import Encoder
    from mcit.models.tiny import build_tiny_llava, build_word_tokenizer

    Image.new("RGB", (48, 48), (10, 20, 30)).save(tmp_path / "i.png")
    tok = build_word_tokenizer(["what color is the circle ?", "red blue", "a long answer here"])
    spec = TinyModelConfig(text_hidden=32, text_heads=2, vision_hidden=16, vision_heads=2, text_layers=text_layers, vision_layers=1)
    model, processor = build_tiny_llava(spec, tok)
    enc = Encoder(processor, "USER: {question} ASSISTANT:", max_length=32)
    samples = [
        Sample("1", tmp_path / "i.png", "what color?", "red", ["red"], task="a"),
        Sample("2", tmp_path / "i.png", "what color is the circle?", "a long answer here", ["x"], task="a"),
    ]
    return model, processor, enc, samples


def kill_and_resume(cfg, out, method_cls, stage: int, step: int, monkeypatch) -> dict:
    """Run ``cfg`` into ``out``, interrupt it at (stage, step) of training, then ``--resume`` it."""
    import pytest

    from mcit.runner import run

    original = method_cls.before_step

    def killed(self, ctx):
        if ctx.stage == stage and ctx.step == step:
            raise KeyboardInterrupt
        original(self, ctx)

    monkeypatch.setattr(method_cls, "before_step", killed)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, out, show_progress=False)
    monkeypatch.undo()
    return run(cfg, out, resume=True, show_progress=False)
