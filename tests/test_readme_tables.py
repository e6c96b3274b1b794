"""The README's tables of kept runs are what those runs give: a kept run changed without the
README, or a README number edited by hand, fails here."""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS_COMMAND = ("mcit compare results/methods/*__seed=* results/claims/{seqft,replay}__seed=* "
                   "--by name --format md --no-figure")


def _table_after(text: str, marker: str, header: str) -> list[str]:
    start = text.index(header, text.index(marker))
    return text[start:text.index("\n\n", start)].strip().splitlines()


def _compare_lines(runs: list[Path], by: str | None) -> list[str]:
    """What `mcit compare RUNS [--by BY] --format md` prints, as lines."""
    from mcit.report import compare, compare_text

    return compare_text(compare(runs), by, "md").strip().splitlines()


def _rows(table: list[str]) -> dict[str, list[str]]:
    """A markdown table's body rows as cells, keyed by the first cell."""
    cells = ([c.strip() for c in line.strip("|").split("|")] for line in table[2:])
    return {row[0]: row for row in cells}


def _share(params: dict) -> str:
    """A run's trainable share as the README's tables print it."""
    return f"{100 * params['trainable'] / params['total']:.2f}% ({params['trainable'] / 1e6:.3f} M)"


def _methods_runs() -> list[Path]:
    kept = sorted(d for d in (ROOT / "results" / "methods").iterdir() if d.is_dir())
    refs = [ROOT / "results" / "claims" / f"{name}__seed={s}" for name in ("seqft", "replay") for s in (0, 1, 2)]
    return kept + refs


def test_the_readme_methods_table_is_what_the_kept_runs_give():
    runs = _methods_runs()
    kept = [d.name for d in runs if d.parent.name == "methods"]
    # issue 20's six configs, seeds 0-2 each
    assert sorted(kept) == sorted(f"{n}__seed={s}" for n in ("gem", "keeplora", "modalprompt", "reglora", "same", "sefe")
                                  for s in (0, 1, 2))
    table = _table_after((ROOT / "README.md").read_text(), METHODS_COMMAND, "| name | runs | MFT |")
    assert _compare_lines(runs, "name") == table


def test_the_readme_trainable_shares_are_the_kept_runs_parameters():
    table = _table_after((ROOT / "README.md").read_text(), METHODS_COMMAND, "| method | trainable |")
    rows = _rows(table)
    assert set(rows) == {"gem", "keeplora", "modalprompt", "reglora", "same", "sefe", "seqft", "replay"}
    for name, cells in rows.items():
        folder = "claims" if name in ("seqft", "replay") else "methods"
        params = json.loads((ROOT / "results" / folder / f"{name}__seed=0" / "results.json").read_text())["parameters"]
        assert cells[1] == _share(params), name


CLAIMS = ROOT / "results" / "claims"
ALL_COMMAND = "mcit compare results/claims/*__seed=* --by name --format md --no-figure"
SEED0_COMMAND = ("mcit compare results/claims/{seqft,joint,replay,prompt_pool}__seed=0 "
                 "results/methods/{gem,reglora}__seed=0 --format md --no-figure")
# issue 23's method list, the caption-only start's five runs included
ISSUE_23 = ("seqft", "joint", "replay", "ewc", "mas", "lwf", "dgg", "dgg_g_only", "dgg_no_bernoulli",
            "dgg_no_scaling", "tir_ewc", "tir_mas", "eproj", "eproj_sim", "prompt_pool", "fwd_prompt",
            "fwd_prompt_pretrained_only", "fwd_prompt_residual_only", "seqft_caption", "ewc_caption",
            "mas_caption", "tir_ewc_caption", "tir_mas_caption")


def test_every_issue_23_method_is_kept_over_three_seeds():
    kept = {d.name for d in CLAIMS.iterdir() if d.is_dir()}
    expected = {f"{n}__seed={s}" for n in ISSUE_23 for s in (0, 1, 2)} | {"zeroshot__seed=0"}
    assert kept == expected, sorted(kept ^ expected)


def test_the_readme_default_stream_table_is_what_the_kept_runs_give():
    runs = sorted(CLAIMS.glob("*__seed=*"))
    table = _table_after((ROOT / "README.md").read_text(), ALL_COMMAND, "| name | runs | MFT |")
    assert _compare_lines(runs, "name") == table
    assert len(table) == 2 + len(ISSUE_23) + 1  # header, rule, one row per method and zero-shot


def test_the_readme_seed0_table_is_what_the_kept_runs_give():
    runs = [CLAIMS / f"{n}__seed=0" for n in ("seqft", "joint", "replay", "prompt_pool")]
    runs += [ROOT / "results" / "methods" / f"{n}__seed=0" for n in ("gem", "reglora")]
    table = _table_after((ROOT / "README.md").read_text(), SEED0_COMMAND, "| run | method | seed |")
    assert _compare_lines(runs, None) == table


def test_the_readme_seqft_matrix_is_the_kept_seed0_run():
    results = json.loads((CLAIMS / "seqft__seed=0" / "results.json").read_text())
    general = results["general"]
    text = (ROOT / "README.md").read_text()
    table = _table_after(text, "seqft's matrix (seed 0;", "| after \\ task |")
    assert table[0] == "| after \\ task | " + " | ".join(results["tasks"] + general["tasks"]) + " |"
    rows = [f"| {label} | " + " | ".join(f"{v:.1f}" for v in row + grow) + " |"
            for label, row, grow in zip(results["row_labels"], results["matrix"], general["matrix"], strict=True)]
    assert table[2:] == rows


EXPERTS = ROOT / "results" / "experts"
EXPERTS_COMMAND = ("mcit compare results/experts/*__seed=* results/claims/seqft__seed=* "
                   "--by name --format md --no-figure")


# issue 25's seven methods, HiDe with both merges
ISSUE_25 = ("olora", "moelora", "clmoe", "hide", "hide_mean", "disco", "smolora", "mrlora")


def test_every_issue_25_method_is_kept_over_three_seeds():
    kept = {d.name for d in EXPERTS.iterdir() if d.is_dir()}
    expected = {f"{n}__seed={s}" for n in ISSUE_25 for s in (0, 1, 2)}
    assert kept == expected, sorted(kept ^ expected)


def test_the_readme_experts_table_is_what_the_kept_runs_give():
    runs = sorted(EXPERTS.glob("*__seed=*")) + sorted(CLAIMS.glob("seqft__seed=*"))
    table = _table_after((ROOT / "README.md").read_text(), EXPERTS_COMMAND, "| name | runs | MFT |")
    assert _compare_lines(runs, "name") == table


def test_the_readme_experts_routing_and_trainable_columns_are_the_kept_runs():
    table = _table_after((ROOT / "README.md").read_text(), EXPERTS_COMMAND, "| method | final-row routing % |")
    rows = _rows(table)
    assert sorted(rows) == sorted(ISSUE_25)
    for name, cells in rows.items():
        results = [json.loads((EXPERTS / f"{name}__seed={s}" / "results.json").read_text()) for s in (0, 1, 2)]
        routing = []
        for r in results:
            by_row = r["method_report"].get("routing_accuracy")
            routing.append(None if not by_row else sum(by_row[str(len(r["tasks"]))].values()) / len(r["tasks"]))
        expected = "n/a" if None in routing else " / ".join(f"{v:.1f}" for v in routing)
        assert cells[1] == expected, name
        params = results[0]["parameters"]
        assert cells[2] == _share(params), name
