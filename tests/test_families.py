"""Every supported model family, from a tiny random checkpoint folder built offline: loading
without torchvision, prompts and labels, batched generation, and the smoke stream with the
model-agnostic methods, an expert method, exact resume, and refusals where a method cannot apply."""

import numpy as np
import pytest
import torch
from PIL import Image

from mcit.errors import ConfigError
from tests.family_fixtures import FAMILIES, build_family

FAMILY_OF = {"llava_next": "llava_next", "llava_onevision": "llava_onevision", "qwen2_vl": "qwen2_vl",
             "qwen2_5_vl": "qwen2_vl", "internvl": "internvl", "idefics3": "idefics3", "smolvlm": "idefics3"}
FAST = ("benchmark.tasks=[color,count]", "train.steps=4", "benchmark.max_test=8", "benchmark.max_train=32",
        "model.tuning=lora", "model.lora.r=4", "eval.max_new_tokens=4")


@pytest.fixture(scope="module")
def folders(smoke_cfg, tmp_path_factory):
    """One checkpoint folder per family (built on first use), its tokenizer over the smoke data's words."""
    from mcit.runner import load_split, prepare_benchmark

    cfg = smoke_cfg()
    bench = prepare_benchmark(cfg, cfg.cache_dir, False)
    texts = [t for split in ("train", "test") for samples in load_split(cfg, bench, cfg.benchmark.tasks, split).values()
             for s in samples for t in (s.question, s.answer, *s.references)]
    root, built = tmp_path_factory.mktemp("families"), {}

    def get(family):
        if family not in built:
            built[family] = build_family(family, root / family, texts)
        return built[family]

    return get


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two images of different sizes (different patch grids, crops and tile counts)."""
    d = tmp_path_factory.mktemp("imgs")
    for i, (h, w) in enumerate([(48, 48), (40, 72)]):
        Image.fromarray(np.random.RandomState(i).randint(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return [d / "0.png", d / "1.png"]


def _encoder(folder, smoke_cfg):
    from mcit.models.encode import Encoder
    from mcit.models.families import family_of
    from mcit.models.load import load_pretrained, prompt_template

    model, processor = load_pretrained(folder)
    cfg = smoke_cfg("model.kind=hf", f"model.path={folder}")
    return model, processor, Encoder(processor, prompt_template(cfg, processor), 48, placeholder=family_of(model).placeholder)


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_without_torchvision_and_names_its_parts(family, folders, smoke_cfg):
    from mcit.models.families import family_of, is_projector, is_vision, part, torchvision_available

    model, processor, enc = _encoder(folders(family), smoke_cfg)
    fam = family_of(model)
    assert fam.name == FAMILY_OF[family]
    assert not torchvision_available()  # this machine: the image-only path is the one under test
    assert getattr(processor, "video_processor", None) is None
    assert enc.dynamic and "{question}" in enc.prompt_template  # the processor expands images; the chat template renders
    vision = {n for n, _ in model.named_parameters() if is_vision(n)}
    projector = {n for n, _ in model.named_parameters() if is_projector(n)}
    tower = {f"model.{fam.vision}.{n}" for n, _ in part(model, fam.vision).named_parameters()}
    assert vision and projector and vision | projector == tower | projector and not vision & projector
    assert len(part(model, fam.language_model).layers) == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_cover_the_answer_only_and_images_get_the_processors_token_count(family, folders, smoke_cfg, images):
    from mcit.data.format import Sample

    _, processor, enc = _encoder(folders(family), smoke_cfg)
    samples = [Sample("a", images[0], "what color is the circle?", "red", ["red"], task="t"),
               Sample("b", images[1], "how many?", "3", ["3"], task="t")]
    batch = enc.train_batch(samples)
    image_id = enc.tokenizer.convert_tokens_to_ids(enc.image_token)
    for row, s in enumerate(samples):
        n = int(batch["attention_mask"][row].sum())
        ids, labels = batch["input_ids"][row, :n].tolist(), batch["labels"][row].tolist()
        answer = enc.tokenizer(" " + s.answer, add_special_tokens=False)["input_ids"] + [enc.tokenizer.eos_token_id]
        assert labels[: n - len(answer)] == [-100] * (n - len(answer))  # prompt, image tokens, <s>: masked
        assert labels[n - len(answer) : n] == answer == ids[n - len(answer) :]
        assert all(v == -100 for v in labels[n:])  # padding
        with Image.open(s.image) as im:
            direct = processor(text=[enc._prompt_text(s)], images=[[im.convert("RGB")]] if "Idefics3" in type(processor).__name__
                               or "SmolVLM" in type(processor).__name__ else [im.convert("RGB")], return_tensors="pt")
        assert ids.count(image_id) == direct["input_ids"][0].tolist().count(image_id) > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_generation_answers_as_one_sample_at_a_time(family, folders, smoke_cfg, images):
    from mcit.data.format import Sample

    model, _, enc = _encoder(folders(family), smoke_cfg)
    samples = [Sample(str(i), images[i % 2], q, "x", ["x"], task="t")
               for i, q in enumerate(["what color is the circle?", "how many?", "what color?"])]
    batch = enc.generation_batch(samples)
    assert (batch["attention_mask"][:, -1] == 1).all()  # left-padded
    with torch.no_grad():
        together = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, batch["input_ids"].shape[1]:]
        for i, s in enumerate(samples):
            one = enc.generation_batch([s])
            alone = model.generate(**one, max_new_tokens=4, do_sample=False)[0, one["input_ids"].shape[1]:]
            assert together[i].tolist() == alone.tolist()


def _run_cfg(smoke_cfg, folder, *extra):
    return smoke_cfg("model.kind=hf", f"model.path={folder}", *FAST, *extra)


@pytest.mark.parametrize("family", FAMILIES)
def test_smoke_stream_trains_only_the_adapters_and_resumes_exactly(family, folders, smoke_cfg, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from mcit.methods.seqft import SeqFT
    from mcit.runner import run
    from tests.conftest import kill_and_resume

    cfg = _run_cfg(smoke_cfg, folders(family), "model.train_projector=true")
    whole = run(cfg, tmp_path / "whole", show_progress=False)
    assert [len(r) for r in whole["matrix"]] == [2, 2, 2]  # zero-shot row and one per task
    saved = load_file(str(tmp_path / "whole" / "checkpoints" / "stage_02_count" / "trainable.safetensors"))
    from mcit.models.families import is_projector, is_vision

    assert saved and all("lora_" in k or is_projector(k) for k in saved)  # adapters and the projector, nothing else
    assert any(is_projector(k) for k in saved) and not any(is_vision(k) for k in saved)
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in saved.items())  # LoRA's B starts at 0: it learnt
    resumed = kill_and_resume(cfg, tmp_path / "killed", SeqFT, 2, 2, monkeypatch)
    assert resumed["matrix"] == whole["matrix"]
    again = load_file(str(tmp_path / "killed" / "checkpoints" / "stage_02_count" / "trainable.safetensors"))
    assert all(torch.equal(again[k], saved[k]) for k in saved)


TINY = ("train.steps=2", "benchmark.max_test=4", "model.gradient_checkpointing=false")


# Each method on families of every layout, Qwen2-VL (the most different) all of them; Qwen2.5-VL and
# SmolVLM share Qwen2-VL's and Idefics3's processors, layouts and image queries (their own models
# load, train, resume and generate in the tests above). The prompt pool runs on every family here.
METHODS_ON = {"llava_next": ("replay", "olora"), "llava_onevision": ("ewc", "dgg"),
              "qwen2_vl": ("replay", "ewc", "dgg", "olora"), "internvl": ("dgg", "olora"), "idefics3": ("replay", "ewc")}


@pytest.mark.parametrize("family", list(METHODS_ON))
def test_replay_ewc_dgg_and_an_expert_method_run_on_the_family(family, folders, smoke_cfg, tmp_path):
    from safetensors.torch import load_file

    from mcit.methods.prompt.pool import POOL_ATTR
    from mcit.models.families import is_projector, is_vision
    from mcit.runner import run

    for method in (*METHODS_ON[family], "prompt_pool"):
        cfg = _run_cfg(smoke_cfg, folders(family), f"method.name={method}", *TINY)
        results = run(cfg, tmp_path / method, show_progress=False)
        assert [len(r) for r in results["matrix"]] == [2, 2, 2], method
        saved = load_file(str(tmp_path / method / "checkpoints" / "stage_02_count" / "trainable.safetensors"))
        if method == "prompt_pool":  # the frozen model: only the pool trains, and its prompts learnt
            assert saved and all(k.startswith(f"{POOL_ATTR}.") or f".{POOL_ATTR}." in k for k in saved), list(saved)[:3]
            assert results["method_report"]["selections_per_entry"], "no prompt was ever selected"
            continue
        assert saved and all("lora_" in k or is_projector(k) for k in saved), method
        assert not any(is_vision(k) for k in saved), method
        if method == "olora":  # an expert per task: the first task's is frozen while the second trains
            first = load_file(str(tmp_path / method / "checkpoints" / "stage_01_color" / "trainable.safetensors"))
            e0 = [k for k in first if ".e0." in k]
            assert e0 and all(torch.equal(first[k], saved[k]) for k in e0)
            assert any(".e1." in k and ".lora_B." in k and v.abs().max() > 0 for k, v in saved.items())


@pytest.mark.parametrize("method", ["eproj", "eproj_sim"])
def test_projector_experts_refuse_other_families_in_one_line(method, folders, smoke_cfg, tmp_path):
    from mcit.runner import run

    cfg = _run_cfg(smoke_cfg, folders("qwen2_vl"), f"method.name={method}", *TINY)
    with pytest.raises(ConfigError, match=r"^method.name: .*experts routed per sample.*a qwen2_vl checkpoint's projector .* LLaVA-1.5 checkpoints only$"):
        run(cfg, tmp_path / method, show_progress=False)


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl", "internvl", "idefics3"])
def test_gradient_checkpointing_gives_the_same_lora_gradients(family, folders, smoke_cfg, images):
    from mcit.config import LoraConfig
    from mcit.data.format import Sample
    from mcit.models.load import load_pretrained
    from mcit.models.tuning import apply_tuning

    samples = [Sample("a", images[0], "what color is the circle?", "red", ["red"], task="t"),
               Sample("b", images[1], "how many?", "3", ["3"], task="t")]
    _, _, enc = _encoder(folders(family), smoke_cfg)
    batch = enc.train_batch(samples)
    grads = []
    for checkpointing in (False, True):
        model, _ = load_pretrained(folders(family), gradient_checkpointing=checkpointing)
        torch.manual_seed(0)
        model = apply_tuning(model, "lora", LoraConfig(r=4, dropout=0.0), train_projector=True)
        model.train()
        assert model.base_model.model.is_activation_checkpointing == checkpointing
        model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("lora_" in n for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_samples_image_query_does_not_depend_on_its_batch(family, folders, smoke_cfg, images):
    """The frozen image feature prompt pools and experts match by: split per sample by the family's
    own layout (patch grids, tiles, crops with padding), so a sample's is the same alone or batched."""
    from mcit.data.format import Sample
    from mcit.methods.query import FrozenQueries

    model, _, enc = _encoder(folders(family), smoke_cfg)
    queries = FrozenQueries(model, enc)
    samples = [Sample(str(i), images[i % 2], q, "x", ["x"], task="t")
               for i, q in enumerate(["what color is the circle?", "how many?", "what color?"])]
    batch = enc.generation_batch(samples)
    image_q, text_q = queries(batch["input_ids"], batch["attention_mask"], queries.images(batch))
    assert image_q.shape == (3, queries.dim) and text_q.shape[0] == 3
    assert not torch.allclose(image_q[0], image_q[1])  # two different images
    for i, s in enumerate(samples):
        one = enc.generation_batch([s])
        alone_i, alone_t = queries(one["input_ids"], one["attention_mask"], queries.images(one))
        torch.testing.assert_close(image_q[i], alone_i[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(text_q[i], alone_t[0], rtol=1e-4, atol=1e-5)


def test_an_unsupported_family_is_named_in_one_line(folders, tmp_path):
    import json
    import shutil

    from mcit.models.load import load_pretrained

    folder = tmp_path / "blip"
    shutil.copytree(folders("qwen2_vl"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "blip-2"}))
    with pytest.raises(ConfigError, match=r"^model.path: model_type 'blip-2' is not a supported family; supported: "
                                          r"idefics3, internvl, llava, llava_next, llava_onevision, qwen2_5_vl, qwen2_vl, smolvlm$"):
        load_pretrained(folder)


def test_with_torchvision_the_processor_loads_as_saved(folders, monkeypatch):
    """Where torchvision is installed the family's processor (video part included) loads through
    AutoProcessor; here it is not, so the call is recorded instead of made."""
    import transformers

    from mcit.models import families

    calls = []
    monkeypatch.setattr(families, "torchvision_available", lambda: True)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained",
                        classmethod(lambda cls, path, **kw: calls.append((path, kw)) or "loaded"))
    folder = folders("qwen2_vl")
    assert families.load_processor(folder, "qwen2_vl") == "loaded" and calls == [(folder, {"local_files_only": True})]
    monkeypatch.setattr(families, "torchvision_available", lambda: False)
    assert type(families.load_processor(folder, "qwen2_vl")).__name__ == "Qwen2VLProcessor" and len(calls) == 1


def test_two_processes_match_one_on_a_dynamic_family(folders, smoke_cfg, tmp_path):
    """Qwen2-VL (flattened patches and their grids, per-token mm_token_type_ids): each process
    encodes its share of the global batch; the matrix is one process's, the adapters within 1e-4."""
    import json
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from mcit.runner import run
    from tests.conftest import SMOKE

    overrides = ["model.kind=hf", f"model.path={folders('qwen2_vl')}", *FAST, *TINY, "threads=1",
                 f"cache_dir={smoke_cfg().cache_dir}"]
    one = run(smoke_cfg(*overrides), tmp_path / "one", show_progress=False)
    args = [sys.executable, "-m", "mcit", "run", str(SMOKE), "--num-processes", "2", "--quiet", "--out", str(tmp_path / "two")]
    for o in overrides:
        args += ["--set", o]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["environment"]["processes"] == 2 and two["matrix"] == one["matrix"]
    ckpt = "checkpoints/stage_02_count/trainable.safetensors"
    a, b = load_file(str(tmp_path / "one" / ckpt)), load_file(str(tmp_path / "two" / ckpt))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4)
