"""Run a task stream: start model, train each stage, evaluate every task after each, resume.

The run directory is the unit of resumption. After each stage it gets the stage's checkpoint
(trainable weights + method state), the stage's predictions and finally ``state.json``, written
last and atomically: a run killed at any point resumes from the last stage whose state.json
entry exists, and since every stage is seeded from (seed, stage) the resumed matrix equals the
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
import statistics
import time
from pathlib import Path

import torch

from mcit.config import RunConfig, dump_config
from mcit.data.benchmark import Benchmark, load_benchmark
from mcit.errors import ConfigError, McitError
from mcit.evaluate import evaluate_task
from mcit.flips import flip_counts
from mcit.methods import TaskContext, get_method
from mcit.metrics import prediction_spread
from mcit.models.encode import Encoder, num_image_tokens
from mcit.models.load import prompt_template, starting_model, text_budget
from mcit.models.tuning import apply_tuning, load_trainable_state, merged_lora, trainable_state
from mcit.progress import console
from mcit.train import train_stage
from mcit.utils import (
    atomic_write_json,
    atomic_write_text,
    default_cache_dir,
    environment_info,
    flatten,
    remove_stale_temporaries,
    seed_everything,
    stable_hash,
)

STATE = "state.json"


def config_hash(cfg: RunConfig) -> str:
    data = cfg.model_dump(mode="json")
    data.pop("name", None)
    for key in ("threads", "trackers", "log_every", "html_report"):  # how fast or how logged, not what
        data.pop(key, None)
    data["benchmark"].pop("image_check", None)  # how carefully inputs are checked, not what
    if cfg.model.kind == "start":  # a rebuilt start is another start: a run must not resume across it
        from mcit.models.start import start_digest

        data["start_weights"] = start_digest(cfg)
    return stable_hash(data)


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


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def build_method(spec: dict):
    """The method named by a validated ``method:`` config section, with its options."""
    cls = get_method(spec["name"])
    return cls(cls.Options.model_validate({k: v for k, v in spec.items() if k != "name"}))


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


def _flat(data: dict) -> dict:
    """A config as flat scalars (what every tracker accepts as hyperparameters)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(data, "/").items()}


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
    encoder = Encoder(processor, prompt_template(cfg, processor), text_budget(cfg, model, num_image_tokens(processor)))
    seed_everything(cfg.seed)  # adapters (LoRA) initialise from the global RNG: make it the run's seed
    model = apply_tuning(model, cfg.model.tuning, cfg.model.lora, cfg.model.train_projector).to(accelerator.device)
    ctx = TaskContext(model, accelerator, cfg, tasks, train, seed=cfg.seed)
    ctx.extras["encoder"] = encoder
    ctx.extras["benchmark"] = bench
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
RUN_FILES = (STATE, "config.yaml", "results.json", "report.md", "report.html", "matrix.png", "checkpoints",
             "predictions", "tracking")


class Run:
    def __init__(self, cfg: RunConfig, out_dir: str | Path, resume: bool = False, show_progress: bool = True,
                 restart: bool = False):
        self.cfg, self.out, self.resume, self.show, self.restart = cfg, Path(out_dir), resume, show_progress, restart
        self.cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        self.hash = config_hash(cfg)

    # --- run-directory state ----------------------------------------------------------------
    def _check_out_dir(self) -> dict | None:
        if self.resume and self.restart:
            raise McitError("--resume and --restart exclude each other: continue the run, or start it over")
        state_path = self.out / STATE
        if state_path.is_file():
            state = json.loads(state_path.read_text())
            if self.restart:
                return None
            if not self.resume:
                raise McitError(f"{self.out} already holds a run ({_progress(state)}); pass --resume to continue it, "
                                "--restart to start it over, or choose another --out")
            if state.get("config_hash") != self.hash:
                raise McitError(
                    f"{self.out} was started with another config ({self._config_changes()}); resume needs the same "
                    "config and overrides, or pass --restart to start it over with this one"
                )
            return state
        if self.out.exists() and not self.out.is_dir():
            raise McitError(f"--out {self.out}: is a file, not a folder")
        strangers = [p.name for p in self.out.iterdir() if p.name not in RUN_FILES and ".tmp" not in p.name] if self.out.is_dir() else []
        if strangers and not self.resume:
            raise McitError(f"{self.out} exists and holds other files ({', '.join(sorted(strangers)[:3])}); "
                            "choose another --out")
        return None  # nothing recorded (a run that failed before its first row, or none): start afresh

    def _config_changes(self) -> str:
        """What differs between the run directory's config and this one, as 'key: old -> new'."""
        import yaml

        from mcit.config import RunConfig

        path = self.out / "config.yaml"
        if not path.is_file():
            return "its config.yaml is gone"
        try:
            old = flatten(RunConfig.model_validate(yaml.safe_load(path.read_text())).model_dump(mode="json"))
        except Exception:  # a config of another mcit version: compare the raw keys
            old = flatten(yaml.safe_load(path.read_text()) or {})
        new = flatten(self.cfg.model_dump(mode="json"))
        changes = [f"{k}: {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}" for k in dict.fromkeys([*old, *new])
                   if old.get(k) != new.get(k) and k.split(".")[0] not in ("name", "threads", "trackers", "log_every")]
        if not changes:
            return "the same keys, but another starting model (a rebuilt start)"
        return "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")

    def _clear_out_dir(self) -> None:
        """--restart, or nothing recorded: remove what an earlier attempt wrote (its files only)."""
        for name in RUN_FILES:
            path = self.out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def _save_stage(self, stage: int, label: str, state: dict, evals, method) -> None:
        """Checkpoint, predictions and state of a finished row: written by the main process only."""
        if stage > 0 and method.schedule != "none":  # every process records where it is
            state["checkpoint"] = f"checkpoints/stage_{stage:02d}_{label}"
        if self.accelerator.is_main_process:
            self._write_stage(stage, label, state, evals, method)
        self.accelerator.wait_for_everyone()

    def _write_stage(self, stage: int, label: str, state: dict, evals, method) -> None:
        from safetensors.torch import save_file

        if stage > 0 and method.schedule != "none":
            ckpt = self.out / state["checkpoint"]
            tmp = ckpt.with_name(ckpt.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file(trainable_state(self.accelerator.unwrap_model(self.model)), str(tmp / "trainable.safetensors"))
            tensors, meta = method.state_dict()
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "method.safetensors"))
            atomic_write_json(tmp / "method.json", meta)
            shutil.rmtree(ckpt, ignore_errors=True)
            tmp.rename(ckpt)
        pred_dir = self.out / "predictions" / f"row_{stage:02d}"
        for ev in evals:
            atomic_write_text(pred_dir / f"{ev.task}.jsonl", "".join(json.dumps(r) + "\n" for r in ev.predictions))
        atomic_write_json(self.out / STATE, state)

    def _restore(self, state: dict, method) -> None:
        from safetensors.torch import load_file

        ckpt = state.get("checkpoint")
        if not ckpt:
            return
        ckpt = self.out / ckpt
        load_trainable_state(self.accelerator.unwrap_model(self.model), load_file(str(ckpt / "trainable.safetensors")))
        # cloned into fresh memory: a tensor read from a checkpoint can sit at an unaligned offset, and
        # MKL's last bits follow the layout (uncloned, fwd_prompt's next basis after a resume differed
        # by 1e-15 on an idle machine)
        tensors = {k: v.clone() for k, v in load_file(str(ckpt / "method.safetensors")).items()}
        method.load_state_dict(tensors, json.loads((ckpt / "method.json").read_text()))

    # --- the run --------------------------------------------------------------------------
    def evaluate_all(self, method, ctx, row_label: str):
        evals = []
        t0 = time.perf_counter()
        model = self.accelerator.unwrap_model(self.model)  # generation runs on the bare model
        with merged_lora(model) if self.cfg.eval.merge_lora else contextlib.nullcontext():
            for name in [*self.tasks, *self.general]:
                ctx.extras["eval_task"] = name  # methods that route per sample score their routing against it
                evals.append(
                    evaluate_task(model, self.encoder, self.bench.task(name), self.test[name], self.cfg.eval,
                                  self.accelerator.device, method, ctx, accelerator=self.accelerator)
                )
        seconds = time.perf_counter() - t0
        if self.show:
            cells = "  ".join(f"{e.task} {e.headline:.1f}" for e in evals[: len(self.tasks)])
            general = "  ".join(f"{e.task} {e.headline:.1f}" for e in evals[len(self.tasks):])
            console.print(f"[bold]{row_label}[/]: {cells}" + (f"  | general: {general}" if general else "")
                          + f"  ({seconds:.1f}s)")
        return evals, seconds

    def execute(self) -> dict:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.accelerator = make_accelerator(cfg, self.out / "tracking")
        state = self._check_out_dir()
        self.accelerator.wait_for_everyone()  # every process has looked before the main one writes
        method = build_method(cfg.method)
        self.bench = prepare_benchmark(cfg, self.cache_dir, self.show)
        self.tasks = stream_tasks(cfg, self.bench)
        self.general = general_tasks(cfg, self.bench)
        # Load every file up front: a malformed line or a missing image fails before any training.
        self.train = load_split(cfg, self.bench, self.tasks, "train")
        self.test = load_split(cfg, self.bench, [*self.tasks, *self.general], "test")
        if cfg.model.kind == "hf":  # a wrong checkpoint folder fails here, before the run directory is touched
            from mcit.models.load import check_checkpoint_dir

            check_checkpoint_dir(Path(cfg.model.path).expanduser())

        self.show = self.show and self.accelerator.is_main_process
        if self.accelerator.is_main_process:  # the inputs are valid: now an earlier attempt's files may go
            if state is None:
                self._clear_out_dir()
            self.out.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.out, recursive=True, owned=True)  # what a killed attempt left
            for folder in ("base", "data", "similarity"):
                remove_stale_temporaries(self.cache_dir / folder)
            atomic_write_text(self.out / "config.yaml", dump_config(cfg))
        self.accelerator.wait_for_everyone()
        self.tracking = bool(self.accelerator.trackers) or bool(self.accelerator.log_with)
        if self.tracking:
            self.accelerator.init_trackers(cfg.name or "mcit", config=_flat(cfg.model_dump(mode="json")))
        self.model, self.encoder, ctx = prepare_model(cfg, self.bench, self.cache_dir, self.accelerator, self.train,
                                                      self.tasks, self.show)
        method.setup(self.model, ctx)
        self.model = self.accelerator.prepare(self.model)
        ctx.model = self.model

        stages = self._stages(method)
        if state is None:
            state = {"config_hash": self.hash, "tasks": self.tasks, "general": self.general, "rows": [],
                     "general_rows": [], "row_labels": [], "details": [],
                     "train_s": 0.0, "eval_s": 0.0, "method_s": 0.0, "step_ms": [], "steps": 0}
        else:
            self._restore(state, method)
            if self.show:
                console.print(f"Resuming {self.out}: {len(state['rows'])} of {len(stages) + 1} rows done")
        if not state["rows"]:
            evals, secs = self.evaluate_all(method, ctx, "row 0 (zero-shot)")
            self._record_row(state, "zero-shot", evals, secs)
            self._save_stage(0, "zero-shot", state, evals, method)

        for stage, (label, task_names) in enumerate(stages, start=1):
            if stage < len(state["rows"]):
                continue
            samples, weights, one_off = begin_stage(method, ctx, stage, label, task_names)
            steps = cfg.train.steps_for(len(samples))
            if method.schedule == "joint":  # with epochs, the joint stage's samples already span all tasks
                tasks_factor = 1 if cfg.train.epochs is not None else len(self.tasks)
                steps = int(round(method.options.steps_factor * steps * tasks_factor))
            stats = train_stage(self.model, self.encoder, samples, cfg.train, self.accelerator, ctx.seed, method, ctx,
                                weights=weights, steps=steps, desc=f"task {stage}/{len(stages)} {label}",
                                show_progress=self.show,
                                log=(state["steps"], cfg.log_every) if self.tracking else None)
            one_off += end_stage(method, ctx, label)
            state["method_s"] = state.get("method_s", 0.0) + one_off  # .get: state files from before method_s
            evals, secs = self.evaluate_all(method, ctx, f"row {stage} (after {label})")
            state["train_s"] += stats.seconds
            state["step_ms"].extend(stats.step_ms)
            state["steps"] += stats.steps
            self._record_row(state, label, evals, secs)
            self._save_stage(stage, label, state, evals, method)

        results = self._results(state, method)
        from mcit.report import write_run_report

        if self.accelerator.is_main_process:
            from mcit.intervals import run_intervals

            results["intervals"] = run_intervals(self.out, results)  # the test set's share of the uncertainty
            write_run_report(self.out, results, html=cfg.html_report)
        if self.tracking:
            self.accelerator.log({f"metrics/{k}": v for k, v in results["metrics"].items() if v is not None},
                                 step=state["steps"])
            self.accelerator.end_training()
        self.accelerator.wait_for_everyone()
        return results

    def _stages(self, method) -> list[tuple[str, list[str]]]:
        if method.schedule == "none":
            return []
        if method.schedule == "joint":
            return [("joint", list(self.tasks))]
        return [(t, [t]) for t in self.tasks]

    def _record_row(self, state: dict, label: str, evals, seconds: float) -> None:
        if self.tracking:  # one point per task per row, at the training steps done so far
            self.accelerator.log({f"eval/{e.task}": e.headline for e in evals} | {"eval/row": len(state["rows"])},
                                 step=state["steps"])
        state["rows"].append([e.headline for e in evals[: len(self.tasks)]])
        state.setdefault("general_rows", []).append([e.headline for e in evals[len(self.tasks):]])
        state["row_labels"].append(label)
        state["details"].append({e.task: e.details for e in evals})
        spread = {e.task: prediction_spread([r["prediction"] for r in e.predictions],
                                            [r["references"] for r in e.predictions]) for e in evals}
        state.setdefault("spread", []).append(spread)
        if self.show:
            for task, s in spread.items():
                if s["collapsed"]:
                    console.print(f"[yellow]warning:[/] {label}: {s['top_share']:.0%} of {task}'s predictions are "
                                  f"{s['top']!r} ({s['distinct']} distinct): the model may have collapsed",
                                  highlight=False)
        state["eval_s"] += seconds
        state.setdefault("scorer_info", {}).update({e.task: e.info for e in evals if e.info})

    def _results(self, state: dict, method) -> dict:
        from mcit.report import metrics_for

        sizes = {t: len(self.test[t]) for t in self.tasks}
        tensors, _ = method.state_dict()
        model = self.accelerator.unwrap_model(self.model)
        total_params = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return {
            "schema": 1,
            "benchmark": self.bench.name,
            "method": method.name,
            "seed": self.cfg.seed,
            "config_hash": self.hash,
            "tasks": self.tasks,
            "scorers": {t: self.bench.task(t).scorer for t in self.tasks},
            "scorer_options": {t: self.bench.task(t).scorer_options for t in self.tasks},
            "test_sizes": sizes,
            "matrix": state["rows"],
            "metrics": metrics_for(state["rows"], [sizes[t] for t in self.tasks], method.schedule),
            "timing": {
                "train_s": round(state["train_s"], 3),
                "eval_s": round(state["eval_s"], 3),
                "method_s": round(state.get("method_s", 0.0), 3),  # one-off passes: importance, teacher
                "step_ms_median": round(statistics.median(state["step_ms"]), 3) if state["step_ms"] else None,
                "steps": state["steps"],
            },
            "memory": {
                "peak_rss_mb": round(_peak_rss_mb(), 1),
                "method_state_mb": round(sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20, 3),
            },
            "environment": {**environment_info(str(self.accelerator.device)), "seed": self.cfg.seed,
                            "processes": self.accelerator.num_processes},
            "row_labels": state["row_labels"],
            "details": state["details"],
            "scorer_info": state.get("scorer_info", {}),
            "parameters": {"total": total_params, "trainable": trainable},
            "method_report": method.report(),
            "general": self._general_block(state),
            # per row, per task (stream and general): the most frequent prediction, its share, the
            # distinct predictions; 'collapsed' when one answer covers > 90% where references vary
            "prediction_spread": state.get("spread", []),
            # per task and row: test samples forgotten / recovered / learnt since the task was learnt
            # (mcit flips lists them); the main process reads its prediction files
            **(flip_counts(self.out) if self.accelerator.is_main_process else {}),
        }

    def _general_block(self, state: dict) -> dict:
        """The held-out general tasks: their score in every row, apart from the stream's metrics."""
        from mcit.metrics import general_metrics

        rows = state.get("general_rows") or [[] for _ in state["rows"]]
        return {
            "tasks": self.general,
            "scorers": {t: self.bench.task(t).scorer for t in self.general},
            "test_sizes": {t: len(self.test[t]) for t in self.general},
            "matrix": rows,
            "metrics": general_metrics(rows),
        }


def model_key(cfg: RunConfig, bench: Benchmark) -> str:
    """What identifies the starting model (for caches of things computed with it)."""
    from mcit.models.start import base_key

    if cfg.model.kind == "tiny":
        return f"tiny:{base_key(cfg, bench)}"
    if cfg.model.kind == "start":  # the weights' digest: a rebuilt start must not reuse old caches
        from mcit.models.start import start_digest

        return f"start:{cfg.model.start}:{start_digest(cfg)[:16]}"
    return f"hf:{Path(cfg.model.path).resolve()}"


def stream_similarity(cfg: RunConfig, samples: int = 1000, show_progress: bool = True):
    """(tasks, T x T similarity matrix) of the config's stream, with the starting model's vision tower."""
    from mcit.similarity import TaskEmbeddings, similarity_matrix

    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    bench = prepare_benchmark(cfg, cache_dir, show_progress)
    tasks = stream_tasks(cfg, bench)
    train = load_split(cfg, bench, tasks, "train")
    accelerator = make_accelerator(cfg)
    model, encoder, _ = prepare_model(cfg, bench, cache_dir, accelerator, train, tasks, show_progress)
    emb = TaskEmbeddings(model, encoder, cache_dir, model_key(cfg, bench), samples, cfg.seed)
    return tasks, similarity_matrix([emb.get(t, train[t]) for t in tasks])


def run(cfg: RunConfig, out_dir: str | Path, resume: bool = False, show_progress: bool = True,
        restart: bool = False) -> dict:
    return Run(cfg, out_dir, resume, show_progress, restart).execute()


def _progress(state: dict) -> str:
    done = max(0, len(state.get("rows", [])) - 1)
    return f"{done} of {len(state.get('tasks', []))} tasks finished"
