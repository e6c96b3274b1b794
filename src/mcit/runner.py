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
from mcit.config import RunConfig, dump_config
from mcit.errors import McitError
from mcit.evaluate import evaluate_task
from mcit.flips import flip_counts
from mcit.methods.routing import RoutingTally
from mcit.metrics import prediction_spread
from mcit.models.tuning import load_trainable_state, merged_lora, trainable_state
from mcit.progress import console
from mcit.train import train_stage
from mcit.utils import (
    atomic_write_json,
    atomic_write_text,
    default_cache_dir,
    environment_info,
    flatten,
    remove_stale_temporaries,
    stable_hash,
)

STATE = "state.json"


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
    if data.get("replay") is None:
        data.pop("replay", None)
    if cfg.model.kind == "start":  # a rebuilt start is another start: a run must not resume across it
        from mcit.models.start import start_digest

        data["start_weights"] = start_digest(cfg)
    return stable_hash(data)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _flat(data: dict) -> dict:
    """A config as flat scalars (what every tracker accepts as hyperparameters)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(data, "/").items()}


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
        if stage > 0 and method.walk != "none":  # every process records where it is
            state["checkpoint"] = f"checkpoints/stage_{stage:02d}_{label}"
        if self.accelerator.is_main_process:
            self._write_stage(stage, label, state, evals, method)
        self.accelerator.wait_for_everyone()

    def _write_stage(self, stage: int, label: str, state: dict, evals, method) -> None:
        from safetensors.torch import save_file

        if stage > 0 and method.walk != "none":
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
        method = build_method(cfg.method, cfg.replay)  # a refused combination fails before the run directory
        self.accelerator = make_accelerator(cfg, self.out / "tracking")
        state = self._check_out_dir()
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

        stages = method.stages(self.tasks)
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

        results = self._results(state, method)
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

    @staticmethod
    def _method_report(state: dict, method) -> dict:
        """The method's own report, with what evaluation observed of it: routing accuracy per row
        and task (percent of a task's test samples routed to its parameters) and the method's
        per-task evaluation summaries."""
        report = dict(method.report())
        if method.task_id_at_test:
            report["task_id_at_test"] = True
        if state.get("routing"):
            tally = RoutingTally()
            tally.load(state["routing"])
            report["routing_accuracy"] = tally.report()
        report.update(state.get("eval_summaries", {}))
        return report

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
            "metrics": metrics_for(state["rows"], [sizes[t] for t in self.tasks], method.walk),
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
            "method_report": self._method_report(state, method),
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


def run(cfg: RunConfig, out_dir: str | Path, resume: bool = False, show_progress: bool = True,
        restart: bool = False) -> dict:
    return Run(cfg, out_dir, resume, show_progress, restart).execute()


def _progress(state: dict) -> str:
    done = max(0, len(state.get("rows", [])) - 1)
    return f"{done} of {len(state.get('tasks', []))} tasks finished"
