"""A run's parts, assembled: the benchmark and its stream, the splits, the accelerator, the
starting model with its tuning and the methods' context, the method, and the entry and exit of
a stage. The runner's loop, ``mcit bench`` and the similarity tools build from these alike.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from mcit.config import RunConfig
from mcit.data.benchmark import Benchmark, load_benchmark
from mcit.errors import ConfigError, McitError
from mcit.methods import TaskContext, get_method
from mcit.models.encode import Encoder, num_image_tokens
from mcit.models.families import family_of
from mcit.models.load import prompt_template, starting_model, text_budget
from mcit.models.tuning import apply_tuning
from mcit.progress import console
from mcit.utils import seed_everything, stable_hash


def prepare_benchmark(cfg: RunConfig, cache_dir: Path, show_progress: bool = True) -> Benchmark:
    return _override_scorers(cfg, _benchmark(cfg, cache_dir, show_progress))


def _override_scorers(cfg: RunConfig, bench: Benchmark) -> Benchmark:
    from mcit.scoring import check_scorer

    for task, override in cfg.benchmark.scorers.items():
        spec = bench.task(task)  # raises naming the benchmark's tasks
        try:
            check_scorer(override.name, override.options)
        except McitError as e:
            raise ConfigError(f"benchmark.scorers.{task}: {e}") from None
        spec.scorer, spec.scorer_options = override.name, dict(override.options)
    return bench


def _benchmark(cfg: RunConfig, cache_dir: Path, show_progress: bool) -> Benchmark:
    b = cfg.benchmark
    if b.root is not None:
        return load_benchmark(b.root)
    if b.name != "synth":
        raise ConfigError(f"benchmark.root is required for benchmark {b.name!r} (only 'synth' is generated)")
    from mcit.data.synth import SYNTH_VERSION, generate_synth

    root = cache_dir / "data" / f"synth-v{SYNTH_VERSION}-{stable_hash(b.synth.model_dump(mode='json'))}"
    if not (root / "benchmark.json").is_file():
        if show_progress:
            console.print(f"Generating the synth benchmark into {root}")
        generate_synth(root, **b.synth.model_dump())
    return load_benchmark(root)


def stream_tasks(cfg: RunConfig, bench: Benchmark) -> list[str]:
    if cfg.benchmark.tasks:
        tasks = list(cfg.benchmark.tasks)
    elif bench.name == "synth":
        from mcit.data.synth import DEFAULT_STREAM

        tasks = [t for t in DEFAULT_STREAM if t in bench.tasks]
    else:
        tasks = list(bench.tasks)
    for t in tasks:
        if t not in bench.tasks:
            raise ConfigError(f"benchmark.tasks: benchmark {bench.name!r} ({bench.root}) has no task {t!r}; "
                              f"available: {', '.join(bench.tasks)}")
    if len(set(tasks)) != len(tasks):
        raise ConfigError(f"benchmark.tasks: a task appears twice in {tasks}")
    return tasks


def general_tasks(cfg: RunConfig, bench: Benchmark) -> list[str]:
    """The held-out general tasks: evaluated after every stage, never trained."""
    names = list(bench.general if cfg.benchmark.general is None else cfg.benchmark.general)
    stream = set(stream_tasks(cfg, bench))
    for t in names:
        if t not in bench.tasks:
            raise ConfigError(f"benchmark.general: benchmark {bench.name!r} has no task {t!r}; "
                              f"available: {', '.join(bench.tasks)}")
        if t in stream:
            raise ConfigError(f"benchmark.general: {t!r} is also in the stream (benchmark.tasks); "
                              "a general task is never trained")
    if len(set(names)) != len(names):
        raise ConfigError(f"benchmark.general: a task appears twice in {names}")
    return names


def build_method(spec: dict, replay: dict | None = None, asd: dict | None = None):
    """The method named by a validated ``method:`` config section, with its options, and the
    config's ``replay:`` and ``asd:`` parts when it has them."""
    from mcit.methods.parts import with_parts

    cls = get_method(spec["name"])
    return with_parts(cls(cls.Options.model_validate({k: v for k, v in spec.items() if k != "name"})), replay, asd)


def resolve_trackers(names: list[str]) -> list:
    """accelerate tracker names for ``trackers``: "auto" is TensorBoard if installed, else nothing."""
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "mlflow": is_mlflow_available}
    out = []
    for name in names:
        if name == "auto":
            if is_tensorboard_available():
                out.append("tensorboard")
        elif not available[name]():
            raise ConfigError(f"trackers: {name!r} is not installed (pip install {name})")
        else:
            out.append(name)
    return list(dict.fromkeys(out))


def make_accelerator(cfg: RunConfig, tracking_dir: Path | None = None):
    """The run's Accelerator; with ``tracking_dir``, the configured trackers log there."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    # Some trainable parameters get no gradient on a given batch (p.grad is None): DDP must allow it.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    trackers = resolve_trackers(cfg.trackers) if tracking_dir is not None else []
    accelerator = Accelerator(cpu=cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()),
                              mixed_precision=cfg.mixed_precision, kwargs_handlers=[ddp], log_with=trackers or None,
                              project_dir=str(tracking_dir) if trackers else None)
    check_engine(accelerator)
    return accelerator


def check_engine(accelerator) -> None:
    """Refuse the accelerate engines the runner cannot drive correctly, before any work is done."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise McitError(
            "accelerate config: DeepSpeed is not supported yet. ZeRO owns the optimizer and partitions "
            "gradients, while mcit builds one optimizer per task and its methods read and edit each "
            "parameter's full gradient between backward and step (DGG, Fwd-Prompt, importance "
            "estimation). Use configs/accelerate/ddp.yaml (verified) or fsdp.yaml."
        )


def load_split(cfg: RunConfig, bench: Benchmark, tasks: list[str], split: str) -> dict:
    """Every task's samples of one split, capped by ``benchmark.max_train`` / ``max_test``; every
    image they use opened (``benchmark.image_check``) so a corrupt one fails before any training."""
    from mcit.data.check import verify_images

    limit = cfg.benchmark.max_train if split == "train" else cfg.benchmark.max_test
    samples = {t: bench.task(t).load(split, bench.image_root)[:limit] for t in tasks}
    if cfg.benchmark.image_check != "exists":
        files = {getattr(bench.task(t), split): samples[t] for t in tasks}
        verify_images(files, full=cfg.benchmark.image_check == "decode")
    return samples


def prepare_model(cfg: RunConfig, bench: Benchmark, cache_dir: Path, accelerator, train: dict, tasks: list[str],
                  show_progress: bool = True):
    """The starting model with its tuning mode applied, its encoder, and the methods' context."""
    with accelerator.main_process_first():  # the main process builds and caches a tiny base; the others load it
        model, processor = starting_model(cfg, bench, cache_dir, accelerator, show_progress and accelerator.is_main_process)
    encoder = Encoder(processor, prompt_template(cfg, processor), text_budget(cfg, model, num_image_tokens(processor)),
                      placeholder=family_of(model).placeholder)
    seed_everything(cfg.seed)  # adapters (LoRA) initialise from the global RNG: make it the run's seed
    model = apply_tuning(model, cfg.model.tuning, cfg.model.lora, cfg.model.train_projector).to(accelerator.device)
    ctx = TaskContext(model, accelerator, cfg, tasks, train, seed=cfg.seed, encoder=encoder, benchmark=bench,
                      run_seed=cfg.seed)
    return model, encoder, ctx


def begin_stage(method, ctx: TaskContext, stage: int, label: str, task_names: list[str]):
    """Point ``ctx`` at a stage and let the method prepare it: (samples, weights, before_task seconds).

    Stage ``k`` is seeded with ``seed x 1000 + k``, which is what makes a resumed stage replay exactly.
    """
    ctx.stage, ctx.task, ctx.step, ctx.seed = stage, label, 0, ctx.config.seed * 1000 + stage
    seed_everything(ctx.seed)
    samples = [s for t in task_names for s in method.train_data(t, ctx.train_data[t], ctx)]
    weights = method.sample_weights(samples, ctx)
    t0 = time.perf_counter()
    method.before_task(label, samples, ctx)
    return samples, weights, time.perf_counter() - t0


def end_stage(method, ctx: TaskContext, label: str) -> float:
    """The method's end-of-task work (importance, snapshots, buffer); its seconds."""
    t0 = time.perf_counter()
    method.after_task(label, ctx)
    return time.perf_counter() - t0


# what a run writes into its directory: --restart removes these and nothing else


def model_key(cfg: RunConfig, bench: Benchmark) -> str:
    """What identifies the starting model (for caches of things computed with it)."""
    from mcit.models.start import base_key

    if cfg.model.kind == "tiny":
        return f"tiny:{base_key(cfg, bench)}"
    if cfg.model.kind == "start":  # the weights' digest: a rebuilt start must not reuse old caches
        from mcit.models.start import start_digest, start_name

        return f"start:{start_name(cfg)}:{start_digest(cfg)[:16]}"
    return f"hf:{Path(cfg.model.path).resolve()}"
