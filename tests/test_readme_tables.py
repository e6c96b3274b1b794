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


def _methods_runs() -> list[Path]:
    kept = sorted(d for d in (ROOT / "results" / "methods").iterdir() if d.is_dir())
    refs = [ROOT / "results" / "claims" / f"{name}__seed={s}" for name in ("seqft", "replay") for s in (0, 1, 2)]
    return kept + refs


def test_the_readme_methods_table_is_what_the_kept_runs_give():
    from mcit.report import compare, compare_text

    runs = _methods_runs()
    kept = [d.name for d in runs if d.parent.name == "methods"]
    # issue 20's six configs, seeds 0-2 each
    assert sorted(kept) == sorted(f"{n}__seed={s}" for n in ("gem", "keeplora", "modalprompt", "reglora", "same", "sefe")
                                  for s in (0, 1, 2))
    table = _table_after((ROOT / "README.md").read_text(), METHODS_COMMAND, "| name | runs | MFT |")
    assert compare_text(compare(runs), "name", "md").strip().splitlines() == table


def test_the_readme_trainable_shares_are_the_kept_runs_parameters():
    table = _table_after((ROOT / "README.md").read_text(), METHODS_COMMAND, "| method | trainable |")
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in table[2:])}
    assert set(rows) == {"gem", "keeplora", "modalprompt", "reglora", "same", "sefe", "seqft", "replay"}
    for name, cells in rows.items():
        folder = "claims" if name in ("seqft", "replay") else "methods"
        params = json.loads((ROOT / "results" / folder / f"{name}__seed=0" / "results.json").read_text())["parameters"]
        assert cells[1] == f"{100 * params['trainable'] / params['total']:.2f}% ({params['trainable'] / 1e6:.3f} M)", name
