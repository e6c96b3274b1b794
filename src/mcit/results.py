"""A finished run's results.json, assembled from its recorded state (the report modules present it)."""

from __future__ import annotations

import resource
import statistics

from mcit.flips import flip_counts
from mcit.methods.routing import RoutingTally
from mcit.utils import environment_info


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def method_report(state: dict, method) -> dict:
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


def general_block(state: dict, general: list[str], bench, test: dict) -> dict:
    """The held-out general tasks: their score in every row, apart from the stream's metrics."""
    from mcit.metrics import general_metrics

    rows = state.get("general_rows") or [[] for _ in state["rows"]]
    return {
        "tasks": general,
        "scorers": {t: bench.task(t).scorer for t in general},
        "test_sizes": {t: len(test[t]) for t in general},
        "matrix": rows,
        "metrics": general_metrics(rows),
    }


def assemble_results(run, state: dict, method, model, main_process: bool) -> dict:
    """results.json of ``run`` (a :class:`mcit.runner.Run` after its stages) from its ``state``;
    ``model``: the bare model (parameter counts)."""
    from mcit.report import metrics_for

    cfg, bench, tasks = run.cfg, run.bench, run.tasks
    sizes = {t: len(run.test[t]) for t in tasks}
    tensors, _ = method.state_dict()
    return {
        "schema": 1,
        "benchmark": bench.name,
        "method": method.name,
        "seed": cfg.seed,
        "config_hash": run.hash,
        "tasks": tasks,
        "scorers": {t: bench.task(t).scorer for t in tasks},
        "scorer_options": {t: bench.task(t).scorer_options for t in tasks},
        "test_sizes": sizes,
        "matrix": state["rows"],
        "metrics": metrics_for(state["rows"], [sizes[t] for t in tasks], method.walk),
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
        "environment": {**environment_info(str(run.accelerator.device)), "seed": cfg.seed,
                        "processes": run.accelerator.num_processes},
        "row_labels": state["row_labels"],
        "details": state["details"],
        "scorer_info": state.get("scorer_info", {}),
        "parameters": {"total": sum(p.numel() for p in model.parameters()),
                       "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)},
        "method_report": method_report(state, method),
        "general": general_block(state, run.general, bench, run.test),
        # per row, per task (stream and general): the most frequent prediction, its share, the
        # distinct predictions; 'collapsed' when one answer covers > 90% where references vary
        "prediction_spread": state.get("spread", []),
        # per task and row: test samples forgotten / recovered / learnt since the task was learnt
        # (mcit flips lists them); the main process reads its prediction files
        **(flip_counts(run.out) if main_process else {}),
    }


__all__ = ["assemble_results", "general_block", "method_report"]
