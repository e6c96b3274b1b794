"""Run outputs: results.json, the matrix heatmap, report.md; and ``compare`` across runs."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from mcit.errors import McitError
from mcit.metrics import METRIC_NAMES as METRICS  # one list of the metrics, kept in metrics.py
from mcit.metrics import metrics_for  # noqa: F401 (re-exported)
from mcit.utils import atomic_write_bytes, flatten

RESULTS = "results.json"

GENERAL = ("general_final", "general_change")  # compare's columns for the held-out general tasks


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


def _span(interval) -> str:
    return "n/a" if interval is None else f"[{interval[0]:.2f}, {interval[1]:.2f}]"


def report_markdown(results: dict) -> str:
    tasks = results["tasks"]
    labels = results.get("row_labels") or [str(i) for i in range(len(results["matrix"]))]
    lines = [
        f"# {results['method']} on {results['benchmark']} (seed {results['seed']})",
        "",
        "| metric | " + " | ".join(METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
        "| value | " + " | ".join(_fmt(results["metrics"].get(m)) for m in METRICS) + " |",
    ]
    intervals = results.get("intervals")
    if intervals:
        lines.append("| 95% interval | " + " | ".join(_span(intervals["metrics"].get(m)) for m in METRICS) + " |")
    lines += [
        "",
        "Accuracy matrix (row = after training, column = evaluated task; headline score 0-100"
        + ("; [95% interval] over test-set resamples" if intervals else "") + "):",
        "",
        "| row | " + " | ".join(f"{t} ({results['scorers'][t]})" for t in tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    for i, (label, row) in enumerate(zip(labels, results["matrix"], strict=True)):
        spans = intervals["matrix"][i] if intervals else [None] * len(row)
        lines.append(f"| {i}: {label} | " + " | ".join(f"{v:.2f}" + (f" {_span(c)}" if c else "")
                                                        for v, c in zip(row, spans, strict=True)) + " |")
    if intervals:
        lines += ["", f"Intervals: {intervals['method']}; the spread over training seeds is `mcit compare --by`'s."]
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


def compare_cells(rows: list[dict], by: str | None, shown: tuple[str, ...]) -> tuple[list[str], list[list], list[str]]:
    """The comparison as (identity columns, rows, metrics): each row is its identity values then,
    per metric, (value, spread over the group's runs or None, 95% interval or None). Per run the
    interval is the test-set bootstrap's; per group of ``by``, Student's t over its runs (seeds)."""
    from mcit.intervals import t_interval

    if by is None:
        body = [[r["run"], r["method"], r["seed"], *((r[m], None, r.get(f"{m}_ci")) for m in shown)] for r in rows]
        return ["run", "method", "seed"], body, list(shown)
    body = []
    for g in group_rows(rows, by):
        members = [r for r in rows if r[by] == g[by]]
        cells = [(g[m], g[m + "_spread"], t_interval([r[m] for r in members if r[m] is not None])) for m in shown]
        body.append([g[by], g["runs"], *cells])
    return [by, "runs"], body, list(shown)


def shown_metrics(rows: list[dict]) -> tuple[str, ...]:
    """compare's metric columns: the stream's, then the general tasks' where any run has them."""
    return (*METRICS, *(GENERAL if any(r[g] is not None for r in rows for g in GENERAL) else ()))


def compare_text(rows: list[dict], by: str | None, fmt: str) -> str:
    """``mcit compare --format md|csv`` of these rows (README tables are pasted from it)."""
    return format_compare(*compare_cells(rows, by, shown_metrics(rows)), fmt, by)


def format_compare(ids: list[str], body: list[list], metrics: list[str], fmt: str, by: str | None) -> str:
    """``md``: a markdown table (2 decimals; a group's metric as mean ± std [95% interval]);
    ``csv``: every value at full precision, a column for each metric, spread and interval bound."""
    if fmt == "csv":
        import csv
        import io

        header = [*ids, *(c for m in metrics for c in (m, *((f"{m}_std",) if by else ()), f"{m}_ci_low", f"{m}_ci_high"))]
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        for row in body:
            out = list(row[: len(ids)])
            for value, spread, ci in row[len(ids):]:
                out += [value, *((spread,) if by else ()), *(ci or (None, None))]
            writer.writerow(["" if v is None else v for v in out])
        return buf.getvalue()
    cols, cells = display_cells(ids, body, metrics)
    align = ["---" if i < len(ids) - (0 if by else 1) else "---:" for i in range(len(cols))]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(align) + "|", *("| " + " | ".join(r) + " |" for r in cells)]
    return "\n".join(lines) + "\n"


def display_cells(ids: list[str], body: list[list], metrics: list[str]) -> tuple[list[str], list[list[str]]]:
    """Header and rows as display strings: values at 2 decimals, then ± the spread over a group's
    runs, then the 95% interval, where there are."""
    def cell(value, spread, ci) -> str:
        if value is None:
            return "n/a"
        text = f"{value:.2f}" + (f" ± {spread:.2f}" if spread is not None else "")
        return text + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")

    return [*ids, *metrics], [[str(v) for v in row[: len(ids)]] + [cell(*c) for c in row[len(ids):]] for row in body]


PAIRED_METRICS = ("MFN", "MFT", "BWT", "FWT", "forgetting")


def paired_table(run_dirs: list[Path], by: str, a: str, b: str) -> tuple[list[str], list[list]]:
    """Group ``a`` against group ``b`` (of ``by``) over the seeds both ran: per metric, the
    per-seed differences A - B, their mean, Student's t 95% interval over seeds, and the 95%
    interval of a paired bootstrap over test samples (both runs of a seed resampled alike)."""
    from mcit.intervals import paired_bootstrap, t_interval

    rows = compare(run_dirs)
    groups: dict = {}
    for r in rows:
        seen = groups.setdefault(str(r[by]), {})
        if r["seed"] in seen and str(r[by]) in (a, b):  # which of the two would be paired? refuse to guess
            raise McitError(f"--paired: {by} {r[by]!r} has two runs of seed {r['seed']} ({seen[r['seed']]['dir']}, "
                            f"{r['dir']}); pair by run (--by run) or pass one run per seed")
        seen.setdefault(r["seed"], r)
    for name in (a, b):
        if name not in groups:
            raise McitError(f"--paired: no runs with {by} {name!r}; there are: {', '.join(groups)}")
    seeds = sorted(set(groups[a]) & set(groups[b]))
    if not seeds:
        raise McitError(f"--paired: {a!r} and {b!r} share no seed ({sorted(groups[a])} against {sorted(groups[b])})")
    pairs = [(Path(groups[a][s]["dir"]), load_results(groups[a][s]["dir"]),
              Path(groups[b][s]["dir"]), load_results(groups[b][s]["dir"])) for s in seeds]
    ids = ["metric", *(f"seed {s}" for s in seeds), "mean", "t 95% low", "t 95% high", "bootstrap low", "bootstrap high"]
    body = []
    for m in PAIRED_METRICS:
        diffs = [groups[a][s][m] - groups[b][s][m] for s in seeds
                 if groups[a][s][m] is not None and groups[b][s][m] is not None]
        if len(diffs) != len(seeds):
            continue  # undefined for one of the methods (e.g. joint's BWT)
        t = t_interval(diffs) or [None, None]
        boot = paired_bootstrap(pairs, m)
        body.append([m, *diffs, statistics.fmean(diffs), *t, *(boot["interval"] if boot else (None, None))])
    return ids, body


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


def _config_name(run_dir: str | Path, method: str) -> str:
    """The run's config ``name:`` (an ablation's own, shared by its seeds), else its method."""
    try:
        return str(config_value(run_dir, "name") or method)
    except McitError:  # an old run without config.yaml, or without a name
        return method


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
        intervals = r.get("intervals") or {}
        spans = {**{f"{m}_ci": v for m, v in (intervals.get("metrics") or {}).items()},
                 **{f"general_{k}_ci": (intervals.get("general") or {}).get(k) for k in ("final", "change")}}
        rows.append({"run": Path(d).name, "name": _config_name(d, r["method"]), "dir": str(d), "method": r["method"],
                     "seed": r["seed"], "tasks": T,
                     **{m: r["metrics"].get(m) for m in METRICS}, "old_final": old, "new": r["metrics"].get("MFT"),
                     **{g: general.get(g.removeprefix("general_")) for g in GENERAL}, **spans})
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
        values = [row[m] if row[m] is not None else 0 for m in shown]
        spans = [row.get(f"{m}_ci") for m in shown]
        err = [[max(0.0, v - s[0]) if s else 0 for v, s in zip(values, spans, strict=True)],
               [max(0.0, s[1] - v) if s else 0 for v, s in zip(values, spans, strict=True)]]
        ax.bar(xs, values, width, label=row["run"], yerr=err if any(spans) else None, capsize=2)
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
