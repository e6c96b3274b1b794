"""One self-contained HTML page per run or per study: no script, no network, no CDN.

The page holds the accuracy matrix (an HTML table coloured like the heatmap, general tasks after
a divider), each task's score across the rows (an inline SVG drawn by matplotlib), the metrics,
the collapse check, a browser of each task's flips (forgotten / recovered / learnt samples, with
the image inlined once as a small thumbnail however often it appears) and the run's config,
environment and scorers. A study (several runs) adds the comparison table (``--by``), the
stability/plasticity plot and the paired differences between groups over shared seeds.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import statistics
from pathlib import Path

from mcit.flips import CATEGORIES, run_rows, task_flips
from mcit.report import (
    GENERAL,
    METRICS,
    compare,
    compare_cells,
    display_cells,
    heatmap_png,
    load_results,
    report_markdown,
)
from mcit.utils import atomic_write_bytes, atomic_write_json, atomic_write_text

FLIPS_SHOWN = 12  # samples per category and task in the browser (the largest changes)
THUMB = 64  # thumbnail side in pixels

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1180px;padding:16px;color:#222}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}td.div{border-left:3px solid #333}
.matrix td{min-width:56px;font-variant-numeric:tabular-nums}
details{margin:6px 0}summary{cursor:pointer;font-weight:600}
.flip td{vertical-align:top;text-align:left;font-size:13px}.thumb{display:inline-block;width:64px;height:64px;
background-size:contain;background-repeat:no-repeat;image-rendering:pixelated}
.bad{color:#a00}.good{color:#060}pre{background:#f7f7f7;padding:8px;overflow:auto;font-size:12px}
.note{color:#555;font-size:13px}svg{max-width:100%;height:auto}
"""


def _e(v) -> str:
    return html.escape(str(v))


def _num(v, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _color(v: float) -> tuple[str, str]:
    """Background (viridis, 0..100) and a readable text colour for a score."""
    from matplotlib import colormaps

    r, g, b, _ = colormaps["viridis"](max(0.0, min(1.0, v / 100)))
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}", "#fff" if v < 60 else "#000"


class Page:
    """An HTML document being written, with each distinct image inlined once (a CSS class)."""

    def __init__(self, title: str):
        self.title, self.parts, self.images = title, [], {}

    def add(self, text: str) -> None:
        self.parts.append(text)

    def thumb(self, path: str | None) -> str:
        if not path or not Path(path).is_file():
            return ""
        key = hashlib.sha1(path.encode()).hexdigest()[:12]
        if key not in self.images:
            from PIL import Image

            with Image.open(path) as im:
                im = im.convert("RGB")
                im.thumbnail((THUMB, THUMB))
                buf = io.BytesIO()
                im.save(buf, "PNG", optimize=True)
            self.images[key] = base64.b64encode(buf.getvalue()).decode()
        return f'<span class="thumb i{key}"></span>'

    def html(self) -> str:
        images = "".join(f".i{k}{{background-image:url(data:image/png;base64,{v})}}" for k, v in self.images.items())
        return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{_e(self.title)}</title>"
                f"<meta name=viewport content='width=device-width,initial-scale=1'><style>{CSS}{images}</style>"
                f"</head><body>{''.join(self.parts)}</body></html>\n")


def _svg(fig) -> str:
    """The figure as inline SVG, the same bytes for the same figure (no date, fixed element ids)."""
    import re

    import matplotlib
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": "mcit"}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    return re.sub(r"<metadata>.*?</metadata>", "", text[text.index("<svg"):], flags=re.S)


def _matrix_table(results: dict) -> str:
    tasks, general = results["tasks"], results.get("general") or {}
    gtasks = general.get("tasks") or []
    labels = results.get("row_labels") or [str(i) for i in range(len(results["matrix"]))]
    head = "".join(f"<th>{_e(t)}</th>" for t in tasks) + "".join(
        f"<th class=div>{_e(t)} (general)</th>" if i == 0 else f"<th>{_e(t)} (general)</th>" for i, t in enumerate(gtasks))
    rows = []
    grows = general.get("matrix") or [[] for _ in results["matrix"]]
    iv = results.get("intervals") or {}
    spans = [[*a, *b] for a, b in zip(iv.get("matrix") or [[] for _ in grows],
                                      (iv.get("general") or {}).get("matrix") or [[] for _ in grows], strict=True)]
    for i, (label, row, grow) in enumerate(zip(labels, results["matrix"], grows, strict=True)):
        cells = []
        for j, v in enumerate([*row, *grow]):
            bg, fg = _color(v)
            cls = " class=div" if j == len(row) and gtasks else ""
            span = spans[i][j] if j < len(spans[i]) else None
            title = f" title='95% interval [{span[0]:.2f}, {span[1]:.2f}]'" if span else ""
            cells.append(f"<td{cls}{title} style='background:{bg};color:{fg}' data-value='{v:.2f}'>{v:.1f}</td>")
        rows.append(f"<tr><th class=l>{i}: {_e(label)}</th>{''.join(cells)}</tr>")
    return f"<table class=matrix id=matrix><tr><th class=l>after training \\ task</th>{head}</tr>{''.join(rows)}</table>"


def _curves_svg(results: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = results.get("row_labels") or [str(i) for i in range(len(results["matrix"]))]
    general = results.get("general") or {}
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    xs = range(len(labels))
    for j, task in enumerate(results["tasks"]):
        ax.plot(xs, [row[j] for row in results["matrix"]], "o-", label=task)
    for j, task in enumerate(general.get("tasks") or []):
        ax.plot(xs, [row[j] for row in general["matrix"]], "s--", label=f"{task} (general)")
    ax.set_xticks(list(xs), [f"{i}: {lab}" for i, lab in enumerate(labels)], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("score")
    ax.set_title("each task's score after every stage")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _svg(fig)


def _metrics_table(results: dict) -> str:
    m = results["metrics"]
    g = (results.get("general") or {}).get("metrics") or {}
    names = [*METRICS, *(f"general_{k}" for k in ("start", "final", "change") if g)]
    values = [m.get(k) for k in METRICS] + [g.get(k.removeprefix("general_")) for k in names[len(METRICS):]]
    iv = results.get("intervals") or {}
    spans = [(iv.get("metrics") or {}).get(k) for k in METRICS] + [
        (iv.get("general") or {}).get(k.removeprefix("general_")) for k in names[len(METRICS):]]
    span_row = ("<tr class=note>" + "".join(f"<td>{'' if s is None else f'[{s[0]:.2f}, {s[1]:.2f}]'}</td>" for s in spans)
                + "</tr>") if iv else ""
    return ("<table id=metrics><tr>" + "".join(f"<th>{_e(n)}</th>" for n in names) + "</tr><tr>"
            + "".join(f"<td>{_num(v)}</td>" for v in values) + f"</tr>{span_row}</table>"
            + (f"<p class=note>[95% intervals]: {_e(iv['method'])}.</p>" if iv else ""))


def _collapse(results: dict) -> str:
    labels = results.get("row_labels") or []
    flagged = [(i, t, s) for i, row in enumerate(results.get("prediction_spread") or [])
               for t, s in row.items() if s.get("collapsed")]
    if not flagged:
        return "<p class=note>Collapse check: no task's predictions are dominated by one answer.</p>"
    rows = "".join(f"<tr><td class=l>{i}: {_e(labels[i] if i < len(labels) else i)}</td><td class=l>{_e(t)}</td>"
                   f"<td class=l>{_e(s['top'])}</td><td>{100 * s['top_share']:.1f}%</td><td>{s['distinct']}</td></tr>"
                   for i, t, s in flagged)
    return ("<p class=bad>Collapse check: one answer covers more than 90% of these predictions:</p><table>"
            "<tr><th class=l>row</th><th class=l>task</th><th class=l>answer</th><th>share</th><th>distinct</th></tr>"
            f"{rows}</table>")


def _flips(page: Page, run_dir: Path, results: dict) -> str:
    general = (results.get("general") or {}).get("tasks") or []
    if run_rows(run_dir) < 2:
        return "<p class=note>One row only: nothing to compare.</p>"
    out = []
    for task in [*results["tasks"], *general]:
        result = task_flips(run_dir, task)
        a, b = result.rows
        counts = ", ".join(f"{len(result.flips[c])} {c}" for c in CATEGORIES)
        body = []
        for c in CATEGORIES:
            for f in result.flips[c][:FLIPS_SHOWN]:
                refs = "; ".join(_e(r) for r in f.references[:3]) + (" …" if len(f.references) > 3 else "")
                cls = "bad" if c == "forgotten" else "good"
                body.append(f"<tr><td>{page.thumb(f.image)}</td><td class={cls}>{c}</td><td>{_e(f.question or f.id)}"
                            f"<br><span class=note>references: {refs}</span></td>"
                            f"<td>{_e(f.prediction_before)} <span class=note>({f.before:.2f})</span></td>"
                            f"<td>{_e(f.prediction_after)} <span class=note>({f.after:.2f})</span></td></tr>")
        table = ("<table class=flip><tr><th></th><th>kind</th><th>instruction</th>"
                 f"<th>row {a}</th><th>row {b}</th></tr>{''.join(body)}</table>") if body else ""
        out.append(f"<details data-task='{_e(task)}'><summary>{_e(task)}: rows {a} → {b}, {result.samples} samples: "
                   f"{counts}</summary>{table}</details>")
    return "".join(out)


def _run_section(page: Page, run_dir: Path, results: dict, level: int = 2) -> None:
    h = f"h{level}"
    page.add(f"<{h}>Accuracy matrix</{h}>{_matrix_table(results)}")
    page.add(f"<{h}>Metrics</{h}>{_metrics_table(results)}")
    page.add(f"<{h}>Learning curves</{h}>{_curves_svg(results)}")
    page.add(f"<{h}>Collapse check</{h}>{_collapse(results)}")
    page.add(f"<{h}>What changed, sample by sample</{h}><p class=note>Per task, the test samples whose score changed "
             f"between the row right after the task was learnt (row 0 for general tasks) and the last row; the "
             f"{FLIPS_SHOWN} largest changes of each kind (mcit flips lists them all).</p>{_flips(page, run_dir, results)}")
    scorers = "".join(f"<tr><td class=l>{_e(t)}</td><td class=l>{_e(s)}</td><td class=l>"
                      f"{_e(json.dumps((results.get('scorer_options') or {}).get(t, {})))}</td><td class=l>"
                      f"{_e(json.dumps((results.get('scorer_info') or {}).get(t, {})))}</td></tr>"
                      for t, s in {**results["scorers"], **(results.get("general") or {}).get("scorers", {})}.items())
    page.add(f"<{h}>Scorers</{h}><table><tr><th class=l>task</th><th class=l>scorer</th><th class=l>options</th>"
             f"<th class=l>notes</th></tr>{scorers}</table>")
    env = "".join(f"<tr><td class=l>{_e(k)}</td><td class=l>{_e(v)}</td></tr>"
                  for k, v in {**results.get("environment", {}), **results.get("timing", {})}.items())
    page.add(f"<{h}>Environment and timing</{h}><table>{env}</table>")
    config = run_dir / "config.yaml"
    if config.is_file():
        page.add(f"<{h}>Config</{h}><pre>{_e(config.read_text())}</pre>")


def _tradeoff_svg(rows: list[dict], by: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r[by] for r in rows):
        pts = [(r["new"], r["old_final"]) for r in rows if r[by] == name and r["new"] is not None]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=str(name))
    ax.set_xlabel("new task, just learnt (MFT: plasticity)")
    ax.set_ylabel("old tasks, final (stability)")
    ax.set_title("stability / plasticity, one point per run")
    ax.legend(fontsize=7)
    return _svg(fig)


def paired_differences(rows: list[dict], by: str, metric: str = "MFN") -> list[dict]:
    """For each ordered pair of groups, the per-seed differences of ``metric`` over the seeds both
    have: their mean, sample std and count."""
    groups: dict = {}
    for r in rows:
        if r[metric] is not None:
            groups.setdefault(r[by], {})[r["seed"]] = r[metric]
    out = []
    names = list(groups)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            seeds = sorted(set(groups[a]) & set(groups[b]))
            if not seeds:
                continue
            diffs = [groups[a][s] - groups[b][s] for s in seeds]
            out.append({"a": a, "b": b, "metric": metric, "seeds": seeds, "mean": statistics.fmean(diffs),
                        "std": statistics.stdev(diffs) if len(diffs) > 1 else None})
    return out


def report_html(run_dirs: list[Path], by: str | None = None) -> str:
    """The page for one run, or a study of several (grouped by ``by`` when given)."""
    run_dirs = [Path(d) for d in run_dirs]
    if len(run_dirs) == 1:
        results = load_results(run_dirs[0])
        page = Page(f"mcit: {results['method']} on {results['benchmark']}")
        page.add(f"<h1>{_e(results['method'])} on {_e(results['benchmark'])}, seed {results['seed']}</h1>"
                 f"<p class=note>{_e(run_dirs[0])} · config {results['config_hash']} · "
                 f"{len(results['tasks'])} tasks</p>")
        _run_section(page, run_dirs[0], results)
        return page.html()
    rows = compare(run_dirs)
    key = by or "run"
    page = Page(f"mcit: study of {len(run_dirs)} runs")
    page.add(f"<h1>Study of {len(run_dirs)} runs</h1>")
    shown = (*METRICS, *(GENERAL if any(r[g] is not None for r in rows for g in GENERAL) else ()))
    ids, body, metrics = compare_cells(rows, by, shown)
    cols, cells = display_cells(ids, body, metrics)
    table = ("<table id=compare><tr>" + "".join(f"<th>{_e(c)}</th>" for c in cols) + "</tr>"
             + "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in row) + "</tr>" for row in cells) + "</table>")
    page.add(f"<h2>Comparison{' (mean ± std by ' + _e(by) + ')' if by else ''}</h2>{table}")
    page.add(f"<h2>Stability and plasticity</h2>{_tradeoff_svg(rows, key)}")
    if by:
        pairs = paired_differences(rows, by)
        body_rows = "".join(f"<tr><td class=l>{_e(p['a'])} − {_e(p['b'])}</td><td>{_num(p['mean'])}</td>"
                            f"<td>{_num(p['std'])}</td><td>{', '.join(map(str, p['seeds']))}</td></tr>" for p in pairs)
        page.add("<h2>Paired differences (MFN, per shared seed)</h2><table id=paired><tr><th class=l>pair</th>"
                 f"<th>mean</th><th>std</th><th>seeds</th></tr>{body_rows}</table>")
    for d, r in zip(run_dirs, rows, strict=True):
        results = load_results(d)
        page.add(f"<details><summary>{_e(r['run'])}: {_e(results['method'])}, seed {results['seed']}, "
                 f"MFN {_num(results['metrics'].get('MFN'))}</summary>")
        _run_section(page, d, results, level=3)
        page.add("</details>")
    return page.html()


__all__ = ["paired_differences", "report_html"]


def write_run_report(out: Path, results: dict, html: bool = True) -> None:
    atomic_write_json(out / "results.json", results)
    atomic_write_bytes(out / "matrix.png", heatmap_png(results))
    atomic_write_text(out / "report.md", report_markdown(results))
    if html:
        atomic_write_text(out / "report.html", report_html([out]))
