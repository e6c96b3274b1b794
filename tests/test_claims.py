"""``mcit claims``: the seed papers' claims against hand-built runs with known answers."""

import sys

import pytest

from mcit.claims import CLAIMS, claims_table, verdict
from tests.test_intervals import _run
from tests.test_readme_tables import _table_after


def _col(p: float) -> list[float]:
    return [1.0] * round(100 * p) + [0.0] * (100 - round(100 * p))


def _method(root, name, method, accuracy, seeds=(0, 1, 2), drop=0.0):
    """Runs of one config name: every cell ``accuracy`` (+ 0.02 per seed), the first task's final
    cell ``drop`` lower (BWT = -100 drop / 1 old task)."""
    dirs = []
    for seed in seeds:
        p = accuracy + 0.02 * seed
        d = root / f"{name}__seed={seed}"
        _run(d, {0: {"a": _col(p), "b": _col(p)}, 1: {"a": _col(p), "b": _col(p)},
                 2: {"a": _col(p - drop), "b": _col(p)}}, seed=seed, method=method, name=name)
        dirs.append(d)
    return dirs


def test_verdicts_read_the_interval_against_the_bound():
    assert verdict(0.5, 2.0, 0.0, strict=True) == "holds"
    assert verdict(-2.0, -0.5, 0.0, strict=True) == "does not hold"
    assert verdict(-1.0, 1.0, 0.0, strict=True) == "inconclusive"
    assert verdict(0.0, 0.0, 0.0, strict=True) == "does not hold"  # no difference: not "above"
    assert verdict(0.0, 0.0, 0.0, strict=False) == "holds"  # BWT exactly 0: forgets nothing
    assert verdict(0.5, 2.0, 0.0, strict=True, one_seed=True) == "holds (1 seed)"


def test_claims_table_pairs_by_config_name_over_seeds(tmp_path, monkeypatch, capsys):
    runs = [*_method(tmp_path, "dgg", "dgg", 0.8), *_method(tmp_path, "replay", "replay", 0.5),
            *_method(tmp_path, "dgg_g_only", "dgg", 0.8),  # an ablation reports its method's name
            *_method(tmp_path, "eproj", "eproj", 0.6),
            *_method(tmp_path, "fwd_prompt", "prompt", 0.6, seeds=(0,), drop=0.3),
            *_method(tmp_path, "prompt_pool", "prompt", 0.4, seeds=(0,))]
    rows = {(r[1], r[3]): r for r in claims_table(runs)}
    assert len(rows) == len(CLAIMS)
    above = rows[("DGG above replay with the same buffer", "MFN")]
    assert above[2] == "dgg - replay" and above[4] == "0,1,2" and above[5] == pytest.approx(30.0)
    assert above[6] == pytest.approx([30.0, 30.0]) and above[7] == "seeds (Student's t)" and above[8] == "holds"
    m_only = rows[("ablation: full above m_only (alpha 0 = replay)", "MFN")]
    assert m_only[2] == "dgg - replay (m_only is alpha 0, i.e. replay)" and m_only[8] == "holds"
    g_only = rows[("ablation: full above g_only (no replay)", "MFN")]
    assert g_only[5] == pytest.approx(0.0) and g_only[8] == "does not hold"  # same scores: not above
    assert rows[("ablation: full above no_bernoulli (guidance every step)", "MFN")][8] == "not run (dgg_no_bernoulli)"
    assert rows[("EProj forgets nothing (BWT >= 0)", "BWT")][5] == pytest.approx(0.0)
    assert rows[("EProj forgets nothing (BWT >= 0)", "BWT")][8] == "holds"
    fwd = rows[("Fwd-Prompt above the plain prompt pool on MFN", "MFN")]
    assert fwd[4] == "0" and fwd[5] == pytest.approx(5.0)  # final row (30 + 60)/2 - 40: one seed
    assert fwd[7] == "test samples (bootstrap)" and fwd[8].endswith("(1 seed)") and fwd[6][0] < 5.0 < fwd[6][1]
    assert rows[("TIR-EWC above EWC from the caption-only start", "MFN")][8].startswith("not run")

    from mcit.cli import main

    monkeypatch.setattr(sys, "argv", ["mcit", "claims", str(tmp_path)])  # a sweep folder: its runs
    main()
    text = capsys.readouterr().out
    assert "| DGG | DGG above replay with the same buffer | dgg - replay | MFN | 0,1,2 | +30.00 | [+30.00, +30.00] |" in text


def test_archived_runs_without_predictions_keep_the_seeds_interval(tmp_path):
    """results/claims keeps each run's results.json and config.yaml only: the comparisons over
    seeds still read them, the paired test-sample bootstrap (it needs predictions/) is left empty."""
    import shutil

    from mcit.report import paired_table

    runs = [*_method(tmp_path, "dgg", "dgg", 0.8), *_method(tmp_path, "replay", "replay", 0.5),
            *_method(tmp_path, "fwd_prompt", "prompt", 0.6, seeds=(0,), drop=0.3),
            *_method(tmp_path, "prompt_pool", "prompt", 0.4, seeds=(0,))]
    ids, full = paired_table(runs, "name", "dgg", "replay")
    assert full[0][-2] is not None  # with predictions: the bootstrap interval
    for d in runs:
        shutil.rmtree(d / "predictions")
    ids, body = paired_table(runs, "name", "dgg", "replay")
    mfn = next(r for r in body if r[0] == "MFN")
    assert mfn[1:4] == pytest.approx([30.0, 30.0, 30.0]) and mfn[-4:-2] == pytest.approx([30.0, 30.0])
    assert mfn[-2:] == [None, None]
    rows = {(r[1], r[3]): r for r in claims_table(runs)}
    assert rows[("DGG above replay with the same buffer", "MFN")][8] == "holds"
    assert rows[("Fwd-Prompt above the plain prompt pool on MFN", "MFN")][8] == "no interval"


def test_difference_of_differences_compares_gains_from_two_starts(tmp_path):
    """He et al.: a regulariser gains more over seqft from the multi-task start than from the
    caption-only start. (ewc - seqft) - (ewc_caption - seqft_caption) = (80 - 50) - (60 - 50) = 20
    at every seed (each run 2 points higher per seed, so the seeds' differences are exact)."""
    runs = [*_method(tmp_path, "ewc", "ewc", 0.8), *_method(tmp_path, "seqft", "seqft", 0.5),
            *_method(tmp_path, "ewc_caption", "ewc", 0.6), *_method(tmp_path, "seqft_caption", "seqft", 0.5)]
    rows = {r[1]: r for r in claims_table(runs)}
    ewc = rows["EWC gains more over seqft from the multi-task start than from the caption-only start"]
    assert ewc[2] == "(ewc - seqft) - (ewc_caption - seqft_caption)" and ewc[4] == "0,1,2"
    assert ewc[5] == pytest.approx(20.0) and ewc[6] == pytest.approx([20.0, 20.0]) and ewc[8] == "holds"
    assert rows["MAS gains more over seqft from the multi-task start than from the caption-only start"][8] == (
        "not run (mas, mas_caption): needs the caption-only start")
    one = claims_table([d for d in runs if d.name.endswith("seed=0")])
    ewc = next(r for r in one if r[1].startswith("EWC gains"))
    assert ewc[4] == "0" and ewc[5] == pytest.approx(20.0) and ewc[7] == "test samples (bootstrap)"
    assert ewc[6][0] < 20.0 < ewc[6][1] and ewc[8] == "holds (1 seed)"


def test_contrast_bootstrap_resamples_all_runs_of_a_seed_alike(tmp_path):
    """(A - B) - (A - B) on the same runs is 0 on every resample only if the four runs share one
    draw of test samples; A - B alone spreads around its value."""
    from mcit.intervals import contrast_bootstrap
    from mcit.report import load_results

    a = _method(tmp_path, "a", "ewc", 0.8, seeds=(0,))[0]
    b = _method(tmp_path, "b", "seqft", 0.5, seeds=(0,), drop=0.3)[0]
    ra, rb = load_results(a), load_results(b)
    zero = contrast_bootstrap([[(a, ra, 1.0), (b, rb, -1.0), (a, ra, -1.0), (b, rb, 1.0)]], "MFN", resamples=200)
    assert zero["mean"] == 0.0 and zero["interval"] == [0.0, 0.0]
    diff = contrast_bootstrap([[(a, ra, 1.0), (b, rb, -1.0)]], "MFN", resamples=200)
    assert diff["mean"] == pytest.approx(ra["metrics"]["MFN"] - rb["metrics"]["MFN"])
    assert diff["interval"][0] < diff["mean"] < diff["interval"][1]


def test_the_readme_claims_table_is_what_the_kept_runs_give():
    """The README's claims table is `mcit claims results/claims`, row for row: a kept run changed
    without the README, or a README number edited by hand, fails here."""
    from pathlib import Path

    from mcit.claims import format_claims

    root = Path(__file__).resolve().parents[1]
    table = "\n".join(_table_after((root / "README.md").read_text(), "### The seed papers' claims",
                                    "| paper | claim | compared | metric |"))
    runs = sorted(d for d in (root / "results" / "claims").iterdir() if d.is_dir())
    assert len(runs) >= 40
    assert format_claims(claims_table(runs)).strip() == table.strip()
