"""Run outputs: results.json, the matrix heatmap, report.md; and ``compare`` across runs."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from mcit.errors import McitError
from mcit.metrics import METRIC_NAMES as METRICS  # one list of the metrics, kept in metrics.py
from mcit.utils import atomic_write_bytes, atomic_write_json, atomic_write_text, flatten

RESULTS = "results.json"

GENERAL = ("general_final", "general_change")  # compare's columns for the held-out general tasks


def metrics_for(matrix: list[list[float]], test_sizes: list[int], schedule: str) -> dict:
    """Continual metrics of a sequential run; for joint / zero-shot (one row after the start, or
    none) only the final-row metrics are defined."""
    from mcit.metrics import continual_metrics

    if schedule == "sequential" and len(matrix) == len(matrix[0]) + 1:
        return continual_metrics(matrix, test_sizes)
    last = matrix[-1]
    total = sum(test_sizes)
    out = dict.fromkeys(METRICS)
    out["MFN"] = statistics.fmean(last)
    out["FAA_weighted"] = sum(n * a for n, a in zip(test_sizes, last, strict=True)) / total if total else None
    return out


def _figure_png(fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def heatmap_png(results: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    general = results.get("general") or {}
    tasks = list(results["tasks"])
    matrix = np.array(results["matrix"], dtype=float)
    if general.get("tasks"):  # general tasks as extra columns, after a divider
        matrix = np.hstack([matrix, np.array(general["matrix"], dtype=float)])
        tasks += [f"{t} (general)" for t in general["tasks"]]
    labels = results.get("row_labels") or [str(i) for i in range(len(matrix))]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(tasks), 1.0 + 0.55 * len(matrix)))
    ax.imshow(np.clip(matrix, 0, 100), cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(matrix)), [f"{i}: {lab}" for i, lab in enumerate(labels)])
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("after training")
    if general.get("tasks"):
        ax.axvline(len(results["tasks"]) - 0.5, color="white", linewidth=3)
    for (r, c), v in np.ndenumerate(matrix):
        ax.text(c, r, f"{v:.1f}", ha="center", va="center", color="white" if v < 60 else "black", fontsize=8)
    ax.set_title(f"{results['method']} on {results['benchmark']} (seed {results['seed']})")
    data = _figure_png(fig)
    plt.close(fig)
    return data


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def report_markdown(results: dict) -> str:
    tasks = results["tasks"]
    labels = results.get("row_labels") or [str(i) for i in range(len(results["matrix"]))]
    lines = [
        f"# {results['method']} on {results['benchmark']} (seed {results['seed']})",
        "",
        "| metric | " + " | ".join(METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
        "| value | " + " | ".join(_fmt(results["metrics"].get(m)) for m in METRICS) + " |",
        "",
        "Accuracy matrix (row = after training, column = evaluated task; headline score 0-100):",
        "",
        "| row | " + " | ".join(f"{t} ({results['scorers'][t]})" for t in tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    for i, (label, row) in enumerate(zip(labels, results["matrix"], strict=True)):
        lines.append(f"| {i}: {label} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    lines += _general_markdown(results, labels)
    lines += _collapse_markdown(results, labels)
    t = results["timing"]
    lines += [
        "",
        f"Training {t['train_s']:.1f}s over {t['steps']} steps (median {t['step_ms_median']} ms/step), "
        f"evaluation {t['eval_s']:.1f}s; peak RSS {results['memory']['peak_rss_mb']} MB; "
        f"trainable parameters {results['parameters']['trainable']:,} of {results['parameters']['total']:,}.",
        "",
        "![matrix](matrix.png)",
        "",
    ]
    return "\n".join(lines)


def _general_markdown(results: dict, labels: list[str]) -> list[str]:
    general = results.get("general") or {}
    tasks = general.get("tasks") or []
    if not tasks:
        return []
    m = general["metrics"]
    lines = [
        "",
        "Held-out general tasks (never trained; how much of the start's general ability is kept, "
        "apart from the stream's metrics):",
        "",
        "| row | " + " | ".join(f"{t} ({general['scorers'][t]})" for t in tasks) + " | mean |",
        "|---|" + "---|" * (len(tasks) + 1),
    ]
    for i, (label, row) in enumerate(zip(labels, general["matrix"], strict=True)):
        lines.append(f"| {i}: {label} | " + " | ".join(f"{v:.2f}" for v in row) + f" | {statistics.fmean(row):.2f} |")
    lines += ["", f"General: start {_fmt(m['start'])}, final {_fmt(m['final'])}, change {_fmt(m['change'])}, "
                  f"lowest {_fmt(m['lowest'])}."]
    return lines


def _collapse_markdown(results: dict, labels: list[str]) -> list[str]:
    spreads = results.get("prediction_spread") or []
    flagged = [(i, t, s) for i, row in enumerate(spreads) for t, s in row.items() if s.get("collapsed")]
    if not spreads:
        return []
    if not flagged:
        return ["", "Collapse check: no task's predictions are dominated by one answer (the most frequent "
                    "covers at most 90% in every row)."]
    lines = ["", "Collapse check: one answer covers more than 90% of these tasks' predictions, where the "
                 "references vary (the model may have collapsed):", "",
             "| row | task | answer | share | distinct predictions | references' top share |", "|---|---|---|---|---|---|"]
    for i, task, s in flagged:
        lines.append(f"| {i}: {labels[i]} | {task} | {s['top']} | {100 * s['top_share']:.1f}% | {s['distinct']} | "
                     f"{_fmt(None if s['reference_top_share'] is None else 100 * s['reference_top_share'])}% |")
    return lines


def write_run_report(out: Path, results: dict, html: bool = True) -> None:
    atomic_write_json(out / "results.json", results)
    atomic_write_bytes(out / "matrix.png", heatmap_png(results))
    atomic_write_text(out / "report.md", report_markdown(results))
    if html:
        from mcit.html_report import report_html

        atomic_write_text(out / "report.html", report_html([out]))


def find_runs(paths: list[str | Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The finished run directories among ``paths`` (each a run directory or its results.json), and
    the paths that hold none, each with the reason."""
    runs, skipped = [], []
    for path in map(Path, paths):
        run_dir = path.parent if path.name == RESULTS and path.is_file() else path
        if not path.exists():
            skipped.append((path, "does not exist"))
        elif path.is_file() and path.name != RESULTS:
            skipped.append((path, f"neither a run directory nor a {RESULTS}"))
        elif not (run_dir / RESULTS).is_file():
            why = "unfinished or failed run" if (run_dir / "state.json").is_file() else "not a run directory"
            skipped.append((path, f"no {RESULTS} ({why})"))
        elif run_dir not in runs:
            runs.append(run_dir)
    return runs, skipped


# config keys that never make two runs of one group different experiments
POOLABLE_KEYS = ("seed", "name", "cache_dir", "threads", "trackers", "log_every")


def pooled_differences(rows: list[dict], key: str) -> dict[str, dict[str, list]]:
    """For each group of ``key`` with several runs, the config keys (seed and bookkeeping aside)
    whose values differ between its runs, each with its distinct values in run order."""
    import yaml

    groups: dict = {}
    for row in rows:
        groups.setdefault(row[key], []).append(row)
    out = {}
    for name, members in groups.items():
        if len(members) < 2:
            continue
        configs = []
        for m in members:
            path = Path(m["dir"]) / "config.yaml"
            configs.append(flatten(yaml.safe_load(path.read_text()) or {}) if path.is_file() else {})
        differing = {}
        for k in dict.fromkeys(k for c in configs for k in c):
            if k.split(".")[0] in POOLABLE_KEYS:
                continue
            values = list(dict.fromkeys(json.dumps(c.get(k), sort_keys=True, default=str) for c in configs))
            if len(values) > 1:
                differing[k] = [json.loads(v) for v in values]
        if differing:
            out[str(name)] = differing
    return out


def compare_cells(rows: list[dict], by: str | None, shown: tuple[str, ...]) -> tuple[list[str], list[list]]:
    """The comparison as a header and rows of values (None = undefined): per run, or per group of
    ``by`` with each metric's mean and its spread over the group's runs."""
    if by is None:
        header = ["run", "method", "seed", *shown]
        return header, [[r["run"], r["method"], r["seed"], *(r[m] for m in shown)] for r in rows]
    header = [by, "runs", *(c for m in shown for c in (m, f"{m}_std"))]
    body = [[g[by], g["runs"], *(v for m in shown for v in (g[m], g[m + "_spread"]))] for g in group_rows(rows, by)]
    return header, body


def format_compare(header: list[str], body: list[list], fmt: str, by: str | None) -> str:
    """``md``: a markdown table (2 decimals, mean ± std per group); ``csv``: every value at full
    precision, one column per metric and per spread."""
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in row] for row in body])
        return buf.getvalue()
    cols, cells = display_cells(header, body, by)
    text_columns = 2 if by is None else 1  # run and method, or the group's name: left-aligned
    align = ["---" if i < text_columns else "---:" for i in range(len(cols))]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(align) + "|", *("| " + " | ".join(r) + " |" for r in cells)]
    return "\n".join(lines) + "\n"


def display_cells(header: list[str], body: list[list], by: str | None) -> tuple[list[str], list[list[str]]]:
    """Header and rows as display strings: values at 2 decimals, a group's metric as mean ± std."""
    def fmt(v) -> str:
        return "n/a" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    if by is None:
        return header, [[fmt(v) for v in row] for row in body]
    metrics = header[2::2]
    rows = [[fmt(row[0]), fmt(row[1]), *("n/a" if row[2 + 2 * i] is None else f"{row[2 + 2 * i]:.2f} ± {row[3 + 2 * i]:.2f}"
                                         for i in range(len(metrics)))] for row in body]
    return header[:2] + metrics, rows


def load_results(run_dir: str | Path) -> dict:
    path = Path(run_dir) / RESULTS
    if not path.is_file():
        raise McitError(f"{run_dir}: no results.json (is it a finished run directory?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise McitError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None


def config_value(run_dir: str | Path, key: str):
    """A dotted key (e.g. ``method.alpha``) of a run's resolved ``config.yaml``."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise McitError(f"{run_dir}: no config.yaml (is it a run directory?)")
    value = yaml.safe_load(path.read_text())
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise McitError(f"{path}: no key {key!r}")
        value = value[part]
    return value


def compare(run_dirs: list[str | Path], out_png: str | Path | None = None) -> list[dict]:
    """One row per run: its name, method, seed and metrics; optionally a bar figure of MFN/BWT.

    Rows also carry ``old_final`` (mean final score on all but the last task: stability) and
    ``new`` (mean score on each task right after learning it, = MFT: plasticity).
    """
    rows = []
    for d in run_dirs:
        r = load_results(d)
        A = r["matrix"]
        T = len(r["tasks"])
        old = statistics.fmean(A[-1][:-1]) if len(A) == T + 1 and T > 1 else None
        general = (r.get("general") or {}).get("metrics") or {}
        rows.append({"run": Path(d).name, "dir": str(d), "method": r["method"], "seed": r["seed"], "tasks": T,
                     **{m: r["metrics"].get(m) for m in METRICS}, "old_final": old, "new": r["metrics"].get("MFT"),
                     **{g: general.get(g.removeprefix("general_")) for g in GENERAL}})
    if out_png is not None and rows:
        atomic_write_bytes(out_png, compare_png(rows))
    return rows


def group_rows(rows: list[dict], key: str = "method") -> list[dict]:
    """Rows grouped by ``key`` (e.g. the method over seeds): mean, and spread = sample std (0 for one run)."""
    groups: dict = {}
    for row in rows:
        groups.setdefault(row[key], []).append(row)
    out = []
    for name, members in groups.items():
        agg = {key: name, "runs": len(members), "seeds": sorted(m["seed"] for m in members)}
        for m in (*METRICS, "old_final", "new", *GENERAL):
            values = [r[m] for r in members if r[m] is not None]
            agg[m] = statistics.fmean(values) if values else None
            agg[m + "_spread"] = statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)
        out.append(agg)
    return out


def tradeoff_png(rows: list[dict], key: str) -> bytes:
    """Stability (old tasks' final score) and plasticity (new task's score) against a config value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted((float(config_value(r["dir"], key)), r["old_final"], r["new"]) for r in rows)
    if any(o is None or n is None for _, o, n in points):
        raise McitError("--tradeoff needs continual runs of at least two tasks (joint/zero-shot runs have no diagonal)")
    fig, ax = plt.subplots(figsize=(5.5, 4))
    xs = [x for x, _, _ in points]
    ax.plot(xs, [o for _, o, _ in points], "o-", label="old tasks, final (stability)")
    ax.plot(xs, [n for _, _, n in points], "s-", label="new task, just learnt (plasticity)")
    ax.set_xlabel(key)
    return _scores_figure(fig, ax, "stability / plasticity", 8)


def compare_png(rows: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ["MFT", "MFN", "MAA", "BWT", "FWT"]
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(shown), 4))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        xs = [j + i * width for j in range(len(shown))]
        ax.bar(xs, [row[m] if row[m] is not None else 0 for m in shown], width, label=row["run"])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shown))], shown)
    ax.axhline(0, color="black", linewidth=0.8)
    return _scores_figure(fig, ax, "mcit compare", 7)


def _scores_figure(fig, ax, title: str, legend_size: int) -> bytes:
    import matplotlib.pyplot as plt

    ax.set_ylabel("score (0-100)")
    ax.legend(fontsize=legend_size, loc="best")
    ax.set_title(title)
    data = _figure_png(fig)
    plt.close(fig)
    return data
