"""The ``mcit`` command."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mcit.errors import McitError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Multimodal continual instruction tuning.")
data_app = typer.Typer(no_args_is_help=True, help="Write and check benchmark data.")
app.add_typer(data_app, name="data")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks measured side by side in one process.")
app.add_typer(bench_app, name="bench")
base_app = typer.Typer(no_args_is_help=True, help="Starting models: build one, list and check the shipped ones.")
app.add_typer(base_app, name="base")
out = Console()
err = Console(stderr=True)


def _drop_option(args: list[str], name: str) -> list[str]:
    """``args`` without ``name VALUE`` / ``name=VALUE``."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    # PEFT 0.21 reads transformers 5's deprecated alias on every adapter: not the user's to fix
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="YAML run config, e.g. configs/synth/seqft.yaml")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key: --set train.lr=3e-4 (repeatable)")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Run directory (default: runs/<config name>)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its last finished task")] = False,
    restart: Annotated[bool, typer.Option("--restart", help="Start the run in --out over (e.g. after a failure, with a corrected config): its earlier results are removed")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars")] = False,
    num_processes: Annotated[int, typer.Option("--num-processes", min=1, help="Data-parallel processes on this machine (gloo on CPU, NCCL on GPUs); for several machines use accelerate launch")] = 1,
):
    """Train a task stream and evaluate every task after each one."""
    from mcit.config import load_config

    if num_processes > 1 and "WORLD_SIZE" not in os.environ:
        load_config(config, set_ or [])  # a bad config fails here, once, not in every process
        from mcit.launch import launch_local

        args = sys.argv[sys.argv.index("run"):]
        raise typer.Exit(launch_local(_drop_option(args, "--num-processes"), num_processes))

    cfg = load_config(config, set_ or [])
    _quiet_libraries()
    from mcit.report import METRICS
    from mcit.runner import run as run_stream

    target = out_dir or Path("runs") / (cfg.name or config.stem)
    results = run_stream(cfg, target, resume=resume, show_progress=not quiet, restart=restart)
    if os.environ.get("RANK", "0") != "0":
        return  # one summary, from the main process
    table = Table(title=f"{results['method']} on {results['benchmark']}: {target}")
    for m in METRICS:
        table.add_column(m, justify="right")
    table.add_row(*("n/a" if results["metrics"][m] is None else f"{results['metrics'][m]:.2f}" for m in METRICS))
    out.print(table)
    out.print(f"results: {target / 'results.json'}  report: {target / 'report.md'}")


@app.command()
def methods():
    """List the methods, their options and their papers."""
    from mcit.methods.catalog import load_catalog

    configs = Path("configs") / "synth"
    out.print("Each method runs on the embedded default with `mcit run configs/synth/<config>.yaml`: the shipped "
              "start (model.kind: start), LoRA r 8 + the projector (frozen-model methods: the model frozen), "
              "2 epochs per task, general tasks describe and box held out.", highlight=False)
    catalog = load_catalog()
    for name, entry in catalog.items():
        out.print(f"[bold]{name}[/]  ({entry['walk']})  {entry['summary']}")
        if entry["paper"]:
            out.print(f"    paper: {entry['paper']}")
        shipped = sorted(p.name for p in configs.glob("*.yaml")
                         if p.stem == name or (p.stem.startswith(name + "_") and p.stem not in catalog))
        if shipped:
            out.print(f"    configs: {', '.join(shipped)}", highlight=False)
        for option in entry["options"]:
            desc = f"  {option['description']}" if option["description"] else ""
            out.print(f"    {option['name']} = {option['default']}{desc}")


@base_app.command("build")
def base_build(
    config: Annotated[Path, typer.Argument(help="Build config (model.kind: tiny, model.tiny, base), e.g. configs/synth/start.yaml")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write the start into (replaced when it exists)")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key: --set base.steps=100 (repeatable)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars")] = False,
):
    """Build a starting model: a tiny LLaVA instruction-tuned on the config's base mix, saved as a
    llava-hf folder with manifest.json (config, data hash, training figures, zero-shot row)."""
    from mcit.config import load_config

    cfg = load_config(config, set_ or [])
    _quiet_libraries()
    from mcit.models.build import build_start

    command = " ".join(["mcit base build", str(config), "--out", str(out_dir), *(f"--set {o}" for o in set_ or [])])
    manifest = build_start(cfg, out_dir, command, show_progress=not quiet)
    zs = manifest["zero_shot"]
    out.print(f"built {out_dir}: {manifest['parameters']:,} parameters, {manifest['steps']} steps, "
              f"final loss {manifest['final_loss']:.4f}, {manifest['wall_s']:.0f}s")
    out.print("zero-shot: " + "  ".join(f"{t} {v:.1f}" for t, v in zs["stream"].items())
              + ("  | general: " + "  ".join(f"{t} {v:.1f}" for t, v in zs["general"].items()) if zs["general"] else ""))


@base_app.command("list")
def base_list():
    """The starts shipped with mcit (model.kind: start, model.start: NAME)."""
    from mcit.models.start import read_manifest, shipped_starts

    for name, path in shipped_starts().items():
        m = read_manifest(path)
        zs = m.get("zero_shot", {}).get("stream", {})
        mean = sum(zs.values()) / len(zs) if zs else float("nan")
        out.print(f"[bold]{name}[/]  {m.get('parameters', 0):,} parameters, {m.get('steps')} steps; "
                  f"zero-shot mean {mean:.1f} on {', '.join(zs)}", highlight=False)
        out.print(f"    {path}", highlight=False, soft_wrap=True)
        out.print(f"    built by: {m.get('command')}", highlight=False, soft_wrap=True)


@base_app.command("check")
def base_check(
    start: Annotated[str, typer.Argument(help="A shipped start's name or a start folder")],
):
    """Check a start's files against the SHA-256 digests in its manifest."""
    from mcit.models.start import resolve_start, shipped_starts, verify_start

    path = Path(start) if start not in shipped_starts() else resolve_start(start)
    manifest = verify_start(path)
    out.print(f"{path}: {len(manifest['files'])} files match the manifest", highlight=False, soft_wrap=True)


@data_app.command("synth")
def data_synth(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write the benchmark into")],
    seed: Annotated[int, typer.Option("--seed", help="The benchmark's seed")] = 0,
    train_size: Annotated[int, typer.Option("--train-size", min=1, help="Training samples per stream task")] = 3000,
    test_size: Annotated[int, typer.Option("--test-size", min=1, help="Test samples per task")] = 200,
    base_size: Annotated[int, typer.Option("--base-size", min=1, help="Training samples per base part")] = 500,
    image_size: Annotated[int, typer.Option("--image-size", min=8, help="Image side in pixels")] = 48,
):
    """Write the embedded synthetic benchmark (LLaVA JSON + PNG) to disk."""
    from mcit.data.synth import generate_synth

    with out.status("generating") as status:
        generate_synth(out_dir, seed, train_size, test_size, base_size, image_size,
                       progress=lambda part: status.update(f"generating {part}"))
    out.print(f"wrote {out_dir / 'benchmark.json'}")


@data_app.command("prepare")
def data_prepare(
    name: Annotated[str, typer.Argument(help="Dataset: see `mcit data list`")],
    src: Annotated[Path, typer.Option("--src", help="Folder holding the official annotation files")],
    out_dir: Annotated[Path, typer.Option("--out", help="Prepared benchmark folder (tasks are merged into it)")],
    images: Annotated[Path | None, typer.Option("--images", help="Image folder (default: the dataset's usual place under --src)")] = None,
    task_map: Annotated[Path | None, typer.Option("--task-map", help="vqav2_10: JSON question_id -> task, for VQACL's exact split")] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="refcoco: allow loading the refs pickle")] = False,
    skip_missing: Annotated[bool, typer.Option("--skip-missing", help="Leave out records whose image is missing (counted) instead of failing")] = False,
    option: Annotated[list[str] | None, typer.Option("--option", help="Converter option KEY=VALUE (repeatable; see `mcit data list`)")] = None,
):
    """Convert a dataset from its official files into mcit's task format (images are referenced, not copied)."""
    from mcit.data.convert import prepare

    opts = {}
    for pair in option or []:
        if "=" not in pair:
            raise McitError(f"--option: expected KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        opts[key.strip()] = value
    if task_map is not None:
        if name != "vqav2_10":
            raise McitError(f"--task-map applies to vqav2_10 only, not {name!r}")
        opts["task_map"] = str(task_map)
    if trust_pickle:
        if name != "refcoco":
            raise McitError(f"--trust-pickle applies to refcoco only, not {name!r}")
        opts["trust_pickle"] = "true"
    with out.status(f"converting {name}") as status:
        report = prepare(name, src, out_dir, images, opts, skip_missing,
                         progress=lambda n: status.update(f"converting {name}: {n} records"))
    table = Table(title=f"{name} -> {out_dir} (images: {report['image_root']})")
    for col in ("task", "train", "test", "train images", "test images"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for task, counts in report["counts"].items():
        imgs = report["images"][task]
        table.add_row(task, str(counts["train"]), str(counts["test"]), str(imgs["train"]), str(imgs["test"]))
    out.print(table)
    for reason, n in report["skipped"].items():
        out.print(f"left out: {n} ({reason})")
    for path in report["missing_examples"]:
        out.print(f"  missing: {path}")
    out.print(f"wrote {out_dir / 'benchmark.json'}; check it with: mcit data check {out_dir}")


@data_app.command("check")
def data_check(
    root: Annotated[Path, typer.Argument(help="A prepared benchmark folder (holding benchmark.json)")],
    full: Annotated[bool, typer.Option("--full", help="Decode every image, not only its header")] = False,
):
    """Validate a prepared benchmark: records, images, scorers. Exits non-zero on any problem."""
    from mcit.data.check import check_benchmark

    with out.status("checking") as status:
        report = check_benchmark(root, full, progress=lambda what: status.update(f"checking {what}"))
    table = Table(title=f"mcit data check {root}")
    for col in ("task", "split", "records", "images", "missing", "unreadable", "empty", "scorer", "self-score", "ok"):
        table.add_column(col, justify="left" if col in ("task", "split", "scorer") else "right")
    for r in report.rows:
        table.add_row(r.task, r.split, str(r.records), str(r.images), str(r.missing), str(r.unreadable), str(r.empty),
                      r.scorer + ("" if r.scorer_ok else " (fails)"),
                      "n/a" if r.self_score is None else f"{r.self_score:.1f}", "yes" if r.ok else "[red]NO[/]")
    out.print(table)
    for p in report.problems:
        out.print(f"[red]problem:[/] {p}", highlight=False, soft_wrap=True)
    if report.more_problems:
        out.print(f"... and {report.more_problems} more problems")
    if not report.ok:
        raise typer.Exit(1)
    out.print("all checks passed")


@data_app.command("list")
def data_list():
    """The datasets `mcit data prepare` converts: files expected, tasks, scorers, options."""
    from mcit.data.convert import available_converters

    for name, conv in available_converters().items():
        tasks = conv.tasks({k: o.default for k, o in conv.options.items()})
        out.print(f"[bold]{name}[/]  {conv.summary}", highlight=False)
        out.print(f"    files: {conv.files}", highlight=False)
        out.print("    tasks: " + ", ".join(f"{t} ({i.scorer})" for t, i in tasks.items()), highlight=False)
        for key, o in conv.options.items():
            out.print(f"    --option {key}=...  {o.help} (default {o.default!r})", highlight=False)


def _step_table(report: dict, title: str) -> None:
    table = Table(title=title)
    for col in ("method", "ms/step", "ratio", "IQR ms", "one-off s", "% of task", "state MB", "trainable M", "CUDA MB"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in report["rows"]:
        table.add_row(r["method"], f"{r['step_ms_median']:.1f}", f"{r['ratio']:.3f}x",
                      f"{r['step_ms_iqr'][0]:.1f}-{r['step_ms_iqr'][1]:.1f}", f"{r['one_off_s']:.2f}",
                      f"{100 * r['one_off_fraction']:.1f}%", f"{r['method_state_mb']:.2f}",
                      f"{r['trainable_params'] / 1e6:.3f}",
                      "n/a" if r["cuda_peak_mb"] is None else f"{r['cuda_peak_mb']:.0f}")
    (out if out.is_terminal else Console(width=max(out.width, 250))).print(table)  # a pipe: never cut a number


def _bench_config(config: Path, set_: list[str] | None):
    from mcit.config import load_config

    if not config.is_file():
        raise McitError(f"--config: {config} does not exist")
    cfg = load_config(config, set_ or [])
    _quiet_libraries()
    return cfg


_BENCH_CONFIG = typer.Option("--config", help="Run config giving model, data and train settings")
_BENCH_SET = typer.Option("--set", help="Override a config key (repeatable)")
_BENCH_STEPS = typer.Option("--steps", min=1, help="Timed steps per method")
_BENCH_CHUNK = typer.Option("--chunk", min=1, help="Steps per method before switching to the next")
_BENCH_QUIET = typer.Option("--quiet", help="No progress bars")


@bench_app.command("overhead")
def bench_overhead(
    methods_: Annotated[str, typer.Option("--methods", help="Comma-separated; the first is the baseline")] = "seqft,replay,ewc,mas,lwf",
    config: Annotated[Path, _BENCH_CONFIG] = Path("configs/synth/seqft.yaml"),
    set_: Annotated[list[str] | None, _BENCH_SET] = None,
    steps: Annotated[int, _BENCH_STEPS] = 100,
    chunk: Annotated[int, _BENCH_CHUNK] = 5,
    out_json: Annotated[Path, typer.Option("--out", help="JSON file to write")] = Path("bench_overhead.json"),
    quiet: Annotated[bool, _BENCH_QUIET] = False,
):
    """Median training-step time of each method against the first (seqft), interleaved."""
    from mcit.bench import overhead
    from mcit.utils import atomic_write_json

    cfg = _bench_config(config, set_)
    names = [m.strip() for m in methods_.split(",") if m.strip()]
    report = overhead(cfg, names, steps=steps, chunk=chunk, show_progress=not quiet)
    _step_table(report, f"step time vs {report['baseline']} ({report['steps']} interleaved steps each, "
                        f"batch {report['batch_size']}, {report['environment'].get('device')})")
    atomic_write_json(out_json, report)
    out.print(f"wrote {out_json}")


@bench_app.command("framework")
def bench_framework(
    methods_: Annotated[str, typer.Option("--methods", help="Comma-separated mcit methods beside seqft")] = "replay,ewc,dgg",
    config: Annotated[Path, _BENCH_CONFIG] = Path("configs/synth/seqft.yaml"),
    set_: Annotated[list[str] | None, _BENCH_SET] = None,
    steps: Annotated[int, _BENCH_STEPS] = 100,
    chunk: Annotated[int, _BENCH_CHUNK] = 5,
    eval_samples: Annotated[int, typer.Option("--eval-samples", min=1, help="Test samples of task 2 to generate for")] = 64,
    eval_rounds: Annotated[int, typer.Option("--eval-rounds", min=1, help="Timed passes of each evaluator")] = 3,
    eval_task: Annotated[str | None, typer.Option("--eval-task", help="Task whose test samples are answered "
                                                                      "(default: the stream's second)")] = None,
    out_json: Annotated[Path, typer.Option("--out", help="JSON file to write")] = Path("bench_framework.json"),
    quiet: Annotated[bool, _BENCH_QUIET] = False,
):
    """mcit against a bare PyTorch + PEFT loop (same batches, interleaved), and batched evaluation
    against per-sample generation (same predictions)."""
    from mcit.bench import framework
    from mcit.utils import atomic_write_json

    cfg = _bench_config(config, set_)
    names = [m.strip() for m in methods_.split(",") if m.strip()]
    report = framework(cfg, names, steps=steps, chunk=chunk, eval_samples=eval_samples, eval_rounds=eval_rounds,
                       eval_task=eval_task, show_progress=not quiet)
    _step_table(report, f"step time vs a bare PyTorch loop ({report['steps']} interleaved steps each, "
                        f"batch {report['batch_size']}, {report['environment'].get('device')})")
    ev = report["evaluation"]
    out.print(f"evaluation of {ev['task']} ({ev['samples']} samples, {ev['rounds']} rounds): per-sample "
              f"{ev['samples_per_s']['per_sample']:.1f} samples/s, batched (batch {ev['batch_size']}) "
              f"{ev['samples_per_s']['batched']:.1f} samples/s: {ev['speedup']:.2f}x, "
              f"{ev['identical_predictions']}/{ev['samples']} predictions identical", highlight=False)
    atomic_write_json(out_json, report)
    out.print(f"wrote {out_json}")


@app.command()
def similarity(
    config: Annotated[Path, typer.Argument(help="Run config naming the benchmark, its stream and the model")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config key (repeatable)")] = None,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Training samples per task to embed")] = 1000,
    figure: Annotated[Path, typer.Option("--figure", help="PNG heatmap to write")] = Path("similarity.png"),
):
    """The task-similarity matrix of a benchmark's stream (He et al.: image x instruction x answer)."""
    from mcit.config import load_config
    from mcit.utils import atomic_write_bytes

    cfg = load_config(config, set_ or [])
    _quiet_libraries()
    from mcit.similarity import stream_similarity

    tasks, matrix = stream_similarity(cfg, samples)
    table = Table(title=f"task similarity, {len(tasks)} tasks, {samples} samples each (row vs column)")
    table.add_column("task")
    for t in tasks:
        table.add_column(t, justify="right")
    for i, t in enumerate(tasks):
        table.add_row(t, *(f"{matrix[i, j]:.3f}" for j in range(len(tasks))))
    out.print(table)
    from mcit.similarity import similarity_png

    atomic_write_bytes(figure, similarity_png(tasks, matrix))
    out.print(f"figure: {figure}")


@app.command()
def flips(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (finished or not)")],
    task: Annotated[str | None, typer.Option("--task", help="One task (default: every task of the stream and the general ones)")] = None,
    rows: Annotated[str | None, typer.Option("--rows", help="A,B: compare row A with row B (default: right after the task was learnt, and the last row)")] = None,
    limit: Annotated[int, typer.Option("--limit", min=0, help="Samples shown per category (largest changes first)")] = 5,
):
    """The test samples whose score changed between two rows: forgotten, recovered, learnt."""
    from mcit.flips import CATEGORIES, run_tasks, task_flips

    pair = None
    if rows is not None:
        parts = rows.split(",")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise McitError(f"--rows: expected two row numbers A,B (e.g. 1,5), got {rows!r}")
        pair = (int(parts[0]), int(parts[1]))
    stream, general = run_tasks(run_dir)
    for name in [task] if task else [*stream, *general]:
        result = task_flips(run_dir, name, pair)
        a, b = result.rows
        counts = ", ".join(f"{len(result.flips[c])} {c}" for c in CATEGORIES)
        out.print(f"[bold]{name}[/] rows {a} -> {b} ({result.samples} samples): {counts}", highlight=False)
        if result.skipped_rows:
            out.print(f"  rows without predictions, left out: {', '.join(map(str, result.skipped_rows))}")
        for c in CATEGORIES:
            for f in result.flips[c][:limit]:
                out.print(f"  {c:9} {f.id}: {f.question!r}" if f.question else f"  {c:9} {f.id}", highlight=False)
                out.print(f"            {f.prediction_before!r} ({f.before:.2f}) -> {f.prediction_after!r} ({f.after:.2f}); "
                          f"references: {', '.join(map(repr, f.references[:3]))}", highlight=False, soft_wrap=True)


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="One run directory (its page), or several (a study)")],
    html_out: Annotated[Path, typer.Option("--html", help="The HTML file to write (self-contained: open it from disk)")],
    by: Annotated[str | None, typer.Option("--by", help="A study's groups: 'method', 'name' (the config's name: ablations apart, seeds together) or 'run' (mean ± std, paired differences)")] = None,
):
    """One self-contained HTML page: matrix, learning curves, metrics, what was forgotten sample by
    sample, config and environment; for several runs, their comparison too."""
    from mcit.html_report import report_html
    from mcit.report import find_runs
    from mcit.utils import atomic_write_text

    _check_by(by)
    found, skipped = find_runs(runs)
    if not found:
        raise McitError(f"report: none of the {len(runs)} paths holds a finished run ({skipped[0][0]}: {skipped[0][1]})")
    for path, why in skipped:
        err.print(f"skipped {path}: {why}", highlight=False, soft_wrap=True)
    atomic_write_text(html_out, report_html(found, by))
    out.print(f"wrote {html_out} ({html_out.stat().st_size / 1e6:.2f} MB)")


@app.command()
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (or their results.json); unfinished ones are skipped and listed")],
    figure: Annotated[Path | None, typer.Option("--figure", help="PNG to write (default: compare.png beside the runs, in their common folder)")] = None,
    no_figure: Annotated[bool, typer.Option("--no-figure", help="Write no figure")] = False,
    by: Annotated[str | None, typer.Option("--by", help="Group runs (e.g. over seeds) by 'method', 'name' (the config's name: ablations apart) or 'run': mean and spread")] = None,
    tradeoff: Annotated[str | None, typer.Option("--tradeoff", help="Plot stability/plasticity against this config key, e.g. method.alpha")] = None,
    format_: Annotated[str, typer.Option("--format", help="table (for the terminal), md (markdown) or csv (full precision)")] = "table",
    strict: Annotated[bool, typer.Option("--strict", help="Fail when a path holds no finished run instead of skipping it")] = False,
    paired: Annotated[str | None, typer.Option("--paired", help="A,B: two groups of --by (default method) compared seed by seed: differences of each metric, their mean and 95% intervals")] = None,
):
    """A table of the metrics of several runs, and one figure."""
    from mcit.report import find_runs

    _check_by(by)
    if format_ not in ("table", "md", "csv"):
        raise McitError(f"--format: expected 'table', 'md' or 'csv', got {format_!r}")
    found, skipped = find_runs(runs)
    if skipped and strict:
        raise McitError(f"--strict: {len(skipped)} of {len(runs)} paths hold no finished run ({skipped[0][0]}: {skipped[0][1]})")
    if not found:
        raise McitError(f"compare: none of the {len(runs)} paths holds a finished run ({skipped[0][0]}: {skipped[0][1]})")
    for path, why in skipped:
        err.print(f"skipped {path}: {why}", highlight=False, soft_wrap=True)
    if no_figure:
        figure = None
    elif figure is None:
        figure = Path(os.path.commonpath([d.resolve().parent for d in found])) / ("tradeoff.png" if tradeoff else "compare.png")
    _compare(found, figure, by, tradeoff, format_)
    if paired:
        _paired(found, by or "method", paired, format_)


@app.command()
def claims(
    paths: Annotated[list[Path], typer.Argument(help="Run directories, or folders of them (a sweep's --out)")],
    format_: Annotated[str, typer.Option("--format", help="md (markdown, the default) or csv")] = "md",
):
    """The seed papers' claims against finished runs: per claim the paired difference (or the
    metric) over the seeds run, its 95% interval and a verdict. Runs are grouped by their config's
    name (ablations apart, seeds together)."""
    from mcit.claims import claims_table, format_claims
    from mcit.report import RESULTS, find_runs

    if format_ not in ("md", "csv"):
        raise McitError(f"--format: expected 'md' or 'csv', got {format_!r}")
    expanded = []
    for p in paths:  # a folder of runs (no results.json or state.json of its own): its run directories
        if p.is_dir() and not (p / RESULTS).is_file() and not (p / "state.json").is_file():
            expanded += sorted(d for d in p.iterdir() if d.is_dir())
        else:
            expanded.append(p)
    found, skipped = find_runs(expanded)
    for path, why in skipped:
        err.print(f"skipped {path}: {why}", highlight=False, soft_wrap=True)
    if not found:
        raise McitError(f"claims: none of {', '.join(map(str, paths))} holds a finished run")
    typer.echo(format_claims(claims_table(found), format_), nl=False)


def _paired(run_dirs: list[Path], by: str, spec: str, fmt: str) -> None:
    from mcit.report import paired_table

    names = [n.strip() for n in spec.split(",")]
    if len(names) != 2 or not all(names):
        raise McitError(f"--paired: expected two groups A,B (e.g. dgg,replay), got {spec!r}")
    ids, body = paired_table(run_dirs, by, names[0], names[1])
    if fmt == "csv":
        sys.stdout.write(",".join(ids) + "\n" + "".join(",".join("" if v is None else str(v) for v in r) + "\n" for r in body))
        return
    shown = [[str(v) if not isinstance(v, float) else f"{v:.2f}" for v in r] for r in body]
    if fmt == "md":
        sys.stdout.write("\n| " + " | ".join(ids) + " |\n|" + "---|" * len(ids) + "\n"
                         + "".join("| " + " | ".join(r) + " |\n" for r in shown))
        return
    table = Table(title=f"{names[0]} - {names[1]}, paired by seed")
    for i, col in enumerate(ids):
        table.add_column(col, justify="left" if i == 0 else "right")
    for r in shown:
        table.add_row(*r)
    (out if out.is_terminal else Console(width=max(out.width, 250))).print(table)


def _check_by(by: str | None) -> None:
    if by not in (None, "method", "name", "run"):
        raise McitError(f"--by: expected 'method', 'name' or 'run', got {by!r}")


def _compare(run_dirs: list[Path], figure: Path | None, by: str | None, tradeoff: str | None, fmt: str = "table") -> None:
    from mcit.report import compare as compare_runs
    from mcit.report import (
        compare_cells,
        compare_text,
        display_cells,
        pooled_differences,
        shown_metrics,
        tradeoff_png,
    )
    from mcit.utils import atomic_write_bytes

    rows = compare_runs(run_dirs, None if tradeoff else figure)
    if tradeoff and figure:
        atomic_write_bytes(figure, tradeoff_png(rows, tradeoff))
    if by is not None:
        for group, keys in pooled_differences(rows, by).items():
            what = "; ".join(f"{k} = {' | '.join(map(str, v))}" for k, v in keys.items())
            err.print(f"warning: --by {by} pools runs of {group!r} whose configs differ beyond the seed: {what}",
                      highlight=False, soft_wrap=True)
    if fmt != "table":
        sys.stdout.write(compare_text(rows, by, fmt))
        if figure:
            err.print(f"figure: {figure}", highlight=False)
        return
    ids, body, metrics = compare_cells(rows, by, shown_metrics(rows))
    table = Table(title="mcit compare" + (f" (mean ± std [95% t-interval] over runs, by {by})" if by
                                          else " (value [95% interval over test-set resamples])"))
    cols, cells = display_cells(ids, body, metrics)
    for i, col in enumerate(cols):
        table.add_column(col, justify="left" if i < (1 if by else 2) else "right")
    for row in cells:
        table.add_row(*row)
    # on a pipe or a file, never cut a value to fit 80 columns
    (out if out.is_terminal else Console(width=max(out.width, 250))).print(table)
    if figure:
        out.print(f"figure: {figure}", highlight=False)


@app.command()
def sweep(
    configs: Annotated[list[Path], typer.Argument(help="Run configs, run one after another")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the runs (one per config and grid point) and the comparison")],
    grid: Annotated[list[str] | None, typer.Option("--grid", help="KEY=V1,V2,...: run every config at each value (repeatable: all combinations)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key in every run (repeatable)")] = None,
    by: Annotated[str | None, typer.Option("--by", help="Group the comparison by 'method', 'name' or 'run'")] = None,
    tradeoff: Annotated[str | None, typer.Option("--tradeoff", help="Plot stability/plasticity against this config key")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars")] = False,
):
    """Several configs, and a grid of overrides over them, run into one folder and compared.
    Every config is validated first; run it again to continue a sweep that was stopped."""
    from mcit.sweep import plan_sweep, run_sweep

    _check_by(by)
    runs = plan_sweep(configs, grid, set_)
    _quiet_libraries()
    out.print(f"sweep: {len(runs)} runs into {out_dir}")

    def started(i, r, target):
        out.print(f"[{i + 1}/{len(runs)}] {r.name}: {r.config} {' '.join('--set ' + o for o in r.overrides)}".rstrip())

    dirs = run_sweep(runs, out_dir, show_progress=not quiet, on_start=started)
    _compare(dirs, out_dir / ("tradeoff.png" if tradeoff else "compare.png"), by, tradeoff)


def main() -> None:
    debug = os.environ.get("MCIT_DEBUG") == "1"
    try:
        code = app(standalone_mode=False, prog_name="mcit")  # click returns typer.Exit's code here instead of raising
        if isinstance(code, int) and code:
            sys.exit(code)
    except McitError as e:
        if debug:
            raise
        Console(stderr=True).print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Exit, SystemExit) as e:
        sys.exit(getattr(e, "exit_code", getattr(e, "code", 0)))
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted; continue with --resume")
        sys.exit(130)
    except Exception as e:
        # a usage error from click (typer carries its own copy of click: match by shape, not class)
        if hasattr(e, "format_message") and hasattr(e, "exit_code") and not debug:
            Console(stderr=True).print(f"[red]error:[/] {_usage_error(e)}", highlight=False, soft_wrap=True)
            sys.exit(e.exit_code)
        if type(e).__name__ == "Abort":
            sys.exit(1)
        raise


def _usage_error(e) -> str:
    """Click's message in one line, naming the command and the option or argument at fault."""
    ctx = getattr(e, "ctx", None)
    where = f"{ctx.command_path}: " if ctx is not None else ""
    message = e.format_message()
    param = getattr(e, "param", None)
    if param is not None:
        names = "/".join(getattr(param, "opts", None) or [param.name.upper()])
        if names not in message and names.lower() not in message.lower():
            message = f"{names}: {message}"
    hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
    return where + " ".join(message.split()) + hint


if __name__ == "__main__":
    main()
