"""Data parallelism: 2 CPU processes (gloo) against 1 process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import SMOKE


@pytest.mark.parametrize("method", ["seqft", "ewc", "mrlora", "seqft+accum"])
def test_two_processes_match_one(smoke_cfg, smoke_run, tmp_path, method):
    """Same matrix, and the same weights up to the order of floating-point sums: gloo's
    all-reduce adds the two halves' gradients, one process adds all 16 samples' at once, and
    the importance passes are split between the ranks and summed (measured: <= 1.2e-5 apart
    after 30 steps; the tolerance is 1e-4). ``seqft+accum``: two micro-batches per step, the first
    under ``no_sync`` with two processes (one all-reduce per step)."""
    from mcit.runner import run

    cache = smoke_cfg().cache_dir
    method, _, accum = method.partition("+")
    overrides = [f"method.name={method}", "threads=1", f"cache_dir={cache}"] + (["train.grad_accum=2"] if accum else [])
    if method == "mrlora":  # LoRA experts: frozen experts' gradients dropped, a router stage inside after_task
        overrides += ["model.tuning=lora", "method.router_epochs=2"]
    one = run(smoke_cfg(*overrides), tmp_path / "one", show_progress=False)
    args = [sys.executable, "-m", "mcit", "run", str(SMOKE), "--num-processes", "2", "--quiet",
            "--out", str(tmp_path / "two")]
    for o in overrides:
        args += ["--set", o]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("results:") == 1  # only the main process reports
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["environment"]["processes"] == 2 and one["environment"]["processes"] == 1
    assert two["matrix"] == one["matrix"]
    # routing is scored over every test sample, gathered from both processes
    assert two["method_report"].get("routing_accuracy") == one["method_report"].get("routing_accuracy")
    assert method != "mrlora" or set(one["method_report"]["routing_accuracy"]) == {"1", "2", "3"}
    ckpt = "checkpoints/stage_03_ocr"
    a, b = load_file(str(tmp_path / "one" / ckpt / "trainable.safetensors")), load_file(str(tmp_path / "two" / ckpt / "trainable.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4)
    if method == "ewc":
        ma, mb = load_file(str(tmp_path / "one" / ckpt / "method.safetensors")), load_file(str(tmp_path / "two" / ckpt / "method.safetensors"))
        assert ma.keys() == mb.keys()
        # importance estimated half on each rank, summed: as one process estimates it, at weights
        # that themselves differ in the last bits (atol 1e-4 above), hence rtol 1e-3
        for k in ma:
            torch.testing.assert_close(ma[k], mb[k], rtol=1e-3, atol=1e-6)


def test_num_processes_is_validated(monkeypatch, capsys):
    from tests.test_cli import _assert_one_line_error, _mcit

    code, _, err = _mcit(monkeypatch, capsys, "run", str(SMOKE), "--num-processes", "0")
    _assert_one_line_error(code, err, "Invalid value for '--num-processes'", "greater than or equal to 1")


def test_deepspeed_is_refused_with_the_reason():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from mcit.errors import McitError
    from mcit.runner import check_engine

    for ok in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU, DistributedType.FSDP):
        check_engine(SimpleNamespace(distributed_type=ok))
    with pytest.raises(McitError, match="DeepSpeed is not supported yet.*ddp.yaml"):
        check_engine(SimpleNamespace(distributed_type=DistributedType.DEEPSPEED))
