"""Run a task stream: start model, train each stage, evaluate every task after each, resume.

The loop only: the run's parts come from :mod:`mcit.assembly`, its directory (state, stage
checkpoints, predictions, resume) is :class:`mcit.rundir.RunDirectory`, and results.json is put
together by :mod:`mcit.results`. Since every stage is seeded from (seed, stage), a run resumed
from its last recorded stage gives the uninterrupted run's matrix.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from mcit.assembly import (  # noqa: F401 (re-exported: the run's parts, for scripts importing them from here)
    begin_stage,
    build_method,
    check_engine,
    end_stage,
    general_tasks,
    load_split,
    make_accelerator,
    model_key,
    prepare_benchmark,
    prepare_model,
    resolve_trackers,
    stream_tasks,
)
from mcit.config import RunConfig
from mcit.evaluate import evaluate_task
from mcit.methods.routing import RoutingTally
from mcit.metrics import prediction_spread
from mcit.models.tuning import merged_lora
from mcit.progress import console
from mcit.results import assemble_results
from mcit.rundir import RunDirectory
from mcit.train import train_stage
from mcit.utils import default_cache_dir, flatten, stable_hash


def config_hash(cfg: RunConfig) -> str:
    data = cfg.model_dump(mode="json")
    data.pop("name", None)
    for key in ("threads", "trackers", "log_every", "html_report"):  # how fast or how logged, not what
        data.pop(key, None)
    data["benchmark"].pop("image_check", None)  # how carefully inputs are checked, not what
    # options added after runs were made: at their defaults (the behaviour before they existed)
    # they are not hashed, so those run directories still resume
    if data.get("mixed_precision") == "no":
        data.pop("mixed_precision")
    if data["eval"].get("merge_lora") is False:
        data["eval"].pop("merge_lora")
    for part in ("replay", "asd"):
        if data.get(part) is None:
            data.pop(part, None)
    if cfg.model.kind == "start":  # a rebuilt start is another start: a run must not resume across it
        from mcit.models.start import start_digest

        data["start_weights"] = start_digest(cfg)
    return stable_hash(data)


def _flat(data: dict) -> dict:
    """A config as flat scalars (what every tracker accepts as hyperparameters)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(data, "/").items()}



class Run:
    def __init__(self, cfg: RunConfig, out_dir: str | Path, resume: bool = False, show_progress: bool = True,
                 restart: bool = False):
        self.cfg, self.out, self.resume, self.show, self.restart = cfg, Path(out_dir), resume, show_progress, restart
        self.cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        self.hash = config_hash(cfg)
        self.dir = RunDirectory(self.out)

    def _save_stage(self, stage: int, label: str, state: dict, evals, method) -> None:
        """Checkpoint, predictions and state of a finished row: written by the main process only."""
        if stage > 0 and method.walk != "none":  # every process records where it is
            state["checkpoint"] = f"checkpoints/stage_{stage:02d}_{label}"
        if self.accelerator.is_main_process:
            self.dir.write_stage(stage, state, evals, method, self.accelerator.unwrap_model(self.model))
        self.accelerator.wait_for_everyone()

    # --- the run --------------------------------------------------------------------------
    def evaluate_all(self, method, ctx, row_label: str):
        evals = []
        t0 = time.perf_counter()
        model = self.accelerator.unwrap_model(self.model)  # generation runs on the bare model
        with merged_lora(model) if self.cfg.eval.merge_lora else contextlib.nullcontext():
            for name in [*self.tasks, *self.general]:
                ctx.oracle_task = name if method.task_id_at_test else None  # task-aware methods only
                e = evaluate_task(model, self.encoder, self.bench.task(name), self.test[name], self.cfg.eval,
                                  self.accelerator.device, method, ctx, accelerator=self.accelerator)
                e.summary = method.eval_summary()
                evals.append(e)
            ctx.oracle_task = None
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
        method = build_method(cfg.method, cfg.replay, cfg.asd)  # a refused combination fails before the run directory
        self.accelerator = make_accelerator(cfg, self.out / "tracking")
        state = self.dir.check(cfg, self.hash, self.resume, self.restart)
        self.accelerator.wait_for_everyone()  # every process has looked before the main one writes
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
            self.dir.open(cfg, state is None, self.cache_dir)
        self.accelerator.wait_for_everyone()
        self.tracking = bool(self.accelerator.trackers) or bool(self.accelerator.log_with)
        if self.tracking:
            self.accelerator.init_trackers(cfg.name or "mcit", config=_flat(cfg.model_dump(mode="json")))
        self.model, self.encoder, ctx = prepare_model(cfg, self.bench, self.cache_dir, self.accelerator, self.train,
                                                      self.tasks, self.show)
        method.setup(self.model, ctx)
        self.model = self.accelerator.prepare(self.model)
        ctx.model = self.model

        stages = method.stages(self.tasks)
        if state is None:
            state = {"config_hash": self.hash, "tasks": self.tasks, "general": self.general, "rows": [],
                     "general_rows": [], "row_labels": [], "details": [],
                     "train_s": 0.0, "eval_s": 0.0, "method_s": 0.0, "step_ms": [], "steps": 0}
        else:
            self.dir.restore(state, method, self.accelerator.unwrap_model(self.model))
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
            steps = method.stage_steps(len(samples), len(task_names), cfg.train)
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

        results = assemble_results(self, state, method, self.accelerator.unwrap_model(self.model),
                                   self.accelerator.is_main_process)
        from mcit.html_report import write_run_report

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
        row = str(len(state["rows"]) - 1)
        learned = self.tasks[: len(state["rows"]) - 1]  # row r follows the training of the first r tasks
        tally = RoutingTally()
        tally.load(state.get("routing", {}))
        for e in evals:
            if e.routed is not None and e.task in learned:  # routing to the task's own parameters
                own = self.tasks.index(e.task)
                tally.add(int(row), e.task, sum(bool(r[own]) for r in e.routed), len(e.routed))
            for key, value in (e.summary or {}).items():
                state.setdefault("eval_summaries", {}).setdefault(key, {}).setdefault(row, {})[e.task] = value
        if tally.cells:
            state["routing"] = tally.cells


def run(cfg: RunConfig, out_dir: str | Path, resume: bool = False, show_progress: bool = True,
        restart: bool = False) -> dict:
    return Run(cfg, out_dir, resume, show_progress, restart).execute()
