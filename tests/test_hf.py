"""model.kind: hf: a llava-hf style folder loaded through the same runner, with LoRA."""

import shutil

import pytest
import torch

from mcit.errors import ConfigError
from mcit.models.load import check_checkpoint_dir, load_pretrained, prompt_template
from mcit.runner import run
from tests.conftest import kill_and_resume

LLAVA15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


@pytest.fixture(scope="module")
def hf_dir(smoke_cfg, smoke_run, tmp_path_factory):
    """The smoke run's starting model, saved by save_pretrained: a llava-hf layout folder."""
    from mcit.models.start import base_key
    from mcit.runner import prepare_benchmark

    cfg = smoke_cfg()
    src = cfg.cache_dir / "base" / base_key(cfg, prepare_benchmark(cfg, cfg.cache_dir, False))
    out = tmp_path_factory.mktemp("hf") / "tiny-llava-hf"
    shutil.copytree(src, out)
    return out


def test_incomplete_checkpoint_folders_name_what_is_missing(hf_dir, tmp_path):
    with pytest.raises(ConfigError, match="not a folder"):
        check_checkpoint_dir(tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"missing: model config \(config.json\); weights .*; tokenizer .*; image processor"):
        check_checkpoint_dir(tmp_path)
    partial = tmp_path / "partial"
    shutil.copytree(hf_dir, partial)
    (partial / "model.safetensors").rename(partial / "model-00001-of-00002.safetensors")
    (partial / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}')
    with pytest.raises(ConfigError, match="missing: weight shard model-00002-of-00002.safetensors"):
        check_checkpoint_dir(partial)
    check_checkpoint_dir(hf_dir)


def test_hf_lora_run_trains_evaluates_and_resumes(hf_dir, smoke_cfg, smoke_run, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from mcit.methods.seqft import SeqFT

    cfg = smoke_cfg("model.kind=hf", f"model.path={hf_dir}", "model.tuning=lora", "model.lora.r=4",
                    "model.train_projector=true", "train.lr=0.01")
    whole = run(cfg, tmp_path / "whole", show_progress=False)
    assert whole["matrix"][0] == smoke_run[1]["matrix"][0]  # the same starting model, loaded the hf way
    saved = load_file(str(tmp_path / "whole" / "checkpoints" / "stage_03_ocr" / "trainable.safetensors"))
    # and the adapters learnt something: LoRA's B factors start at zero
    assert max(v.abs().max().item() for k, v in saved.items() if "lora_B" in k) > 0
    assert any("lora_A" in k for k in saved) and any("multi_modal_projector" in k and "lora" not in k for k in saved)
    assert not any("vision_tower" in k for k in saved)
    assert whole["parameters"]["trainable"] == sum(t.numel() for t in saved.values())
    resumed = kill_and_resume(cfg, tmp_path / "killed", SeqFT, 2, 4, monkeypatch)
    assert resumed["matrix"] == whole["matrix"]
    again = load_file(str(tmp_path / "killed" / "checkpoints" / "stage_03_ocr" / "trainable.safetensors"))
    assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)


def test_prompt_format_from_the_chat_template(hf_dir, smoke_cfg):
    from mcit.models.encode import Encoder

    model, processor = load_pretrained(hf_dir)
    cfg = smoke_cfg("model.kind=hf", f"model.path={hf_dir}")
    assert prompt_template(cfg, processor) == cfg.model.prompt_template  # no chat template: the configured one
    processor.chat_template = LLAVA15_TEMPLATE
    template = prompt_template(cfg, processor)
    assert template == "USER: <image>\n{question} ASSISTANT:"
    explicit = smoke_cfg("model.kind=hf", f"model.path={hf_dir}", "model.prompt_template=Q: {question} A:")
    assert prompt_template(explicit, processor) == "Q: {question} A:"  # a configured template wins
    from mcit.data.format import Sample

    s = Sample("1", None, "what color?", "red", ["red"])
    a = Encoder(processor, template, 48).prompt_ids(s)
    b = Encoder(processor, "USER: {question} ASSISTANT:", 48).prompt_ids(s)
    assert a == b  # the chat template's placement of <image> is what the default template does


def test_gradient_checkpointing_with_lora_gives_the_same_gradients(hf_dir, smoke_cfg):
    from mcit.config import LoraConfig
    from mcit.models.encode import Encoder
    from mcit.models.tuning import apply_tuning
    from mcit.runner import load_split, prepare_benchmark

    cfg = smoke_cfg()
    bench = prepare_benchmark(cfg, cfg.cache_dir, False)
    samples = load_split(cfg, bench, ["color"], "train")["color"][:4]
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model, processor = load_pretrained(hf_dir, gradient_checkpointing=checkpointing)
        model = apply_tuning(model, "lora", LoraConfig(r=4))
        model.train()
        inner = model.base_model.model
        flag = getattr(type(inner), "is_activation_checkpointing", None)
        assert (inner.is_activation_checkpointing if flag is not None else inner.is_gradient_checkpointing) == checkpointing
        batch = Encoder(processor, cfg.model.prompt_template, 48).train_batch(samples)
        model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6)


def test_a_wrong_checkpoint_folder_fails_before_the_run_directory_is_touched(smoke_cfg, tmp_path):
    from mcit.runner import run

    cfg = smoke_cfg("model.kind=hf", f"model.path={tmp_path / 'nope'}")
    with pytest.raises(ConfigError, match="model.path: .*nope is not a folder"):
        run(cfg, tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run").exists()
