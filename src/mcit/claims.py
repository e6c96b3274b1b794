"""The seed papers' claims, checked against finished runs: ``mcit claims DIR...``.

Runs are grouped by their config's ``name:`` (so an ablation, which reports its method's name,
stays apart from the method, and a sweep's seeds come together). A comparative claim (A above B
on a metric) is the per-seed paired difference A - B over the seeds both ran; a claim about one
method's metric (e.g. EProj's BWT >= 0) is that metric over its seeds. The verdict reads Student's
t 95% interval over seeds (at least two): **holds** when it lies above the claimed bound, **does
not hold** when it lies below, **inconclusive** when it spans it. With a single seed the interval
is the test-sample bootstrap's (paired for two methods), and the verdict says "1 seed".
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from mcit.errors import McitError


@dataclass(frozen=True)
class Claim:
    paper: str
    text: str
    a: str  # config name of the method the claim is about
    metric: str
    b: tuple[str, ...] = ()  # config names it is claimed above (the first that has runs); () for a bound
    bound: float = 0.0  # the claim: A - B > bound (strict), or A's metric >= bound
    note: str = ""
    # (C, D): the claim is (A - B) - (C - D) > bound, a difference of differences over the seeds
    # all four ran (e.g. a method's gain over seqft from one start against its gain from another)
    versus: tuple[str, str] | tuple[()] = ()

    @property
    def strict(self) -> bool:
        return bool(self.b)


CLAIMS = (
    Claim("DGG", "DGG above replay with the same buffer", "dgg", "MFN", ("replay",)),
    Claim("DGG", "ablation: full above m_only (alpha 0 = replay)", "dgg", "MFN", ("dgg_m_only", "replay"),
          note="m_only is alpha 0, i.e. replay"),
    Claim("DGG", "ablation: full above g_only (no replay)", "dgg", "MFN", ("dgg_g_only",)),
    Claim("DGG", "ablation: full above no_bernoulli (guidance every step)", "dgg", "MFN", ("dgg_no_bernoulli",)),
    Claim("He et al.", "TIR-EWC above EWC from the caption-only start", "tir_ewc_caption", "MFN", ("ewc_caption",),
          note="needs the caption-only start"),
    Claim("He et al.", "TIR-MAS above MAS from the caption-only start", "tir_mas_caption", "MFN", ("mas_caption",),
          note="needs the caption-only start"),
    Claim("He et al.", "EWC gains more over seqft from the multi-task start than from the caption-only start",
          "ewc", "MFN", ("seqft",), versus=("ewc_caption", "seqft_caption"), note="needs the caption-only start"),
    Claim("He et al.", "MAS gains more over seqft from the multi-task start than from the caption-only start",
          "mas", "MFN", ("seqft",), versus=("mas_caption", "seqft_caption"), note="needs the caption-only start"),
    Claim("He et al.", "EProj forgets nothing (BWT >= 0)", "eproj", "BWT"),
    Claim("Fwd-Prompt", "Fwd-Prompt above the plain prompt pool on MFN", "fwd_prompt", "MFN", ("prompt_pool",)),
    Claim("Fwd-Prompt", "Fwd-Prompt above the plain prompt pool on FWT", "fwd_prompt", "FWT", ("prompt_pool",)),
    Claim("Fwd-Prompt", "Fwd-Prompt's FWT >= 0", "fwd_prompt", "FWT"),
)

COLUMNS = ["paper", "claim", "compared", "metric", "seeds", "value", "95% interval", "interval over", "verdict"]


def verdict(low: float, high: float, bound: float, strict: bool, one_seed: bool = False) -> str:
    """holds: the interval lies above the bound (on or above it for a >= claim); does not hold: it
    lies below (on or below for a strict claim); inconclusive: it spans the bound."""
    if low > bound or (not strict and low >= bound):
        word = "holds"
    elif high < bound or (strict and high <= bound):
        word = "does not hold"
    else:
        word = "inconclusive"
    return f"{word} (1 seed)" if one_seed else word


def check(claim: Claim, rows: list[dict], run_dirs: list[Path]) -> list:
    """One table row for ``claim`` from ``rows`` (:func:`mcit.report.compare` of ``run_dirs``)."""
    from mcit.intervals import t_interval
    from mcit.report import paired_table

    by_name: dict[str, dict] = {}
    for r in rows:
        by_name.setdefault(r["name"], {})[r["seed"]] = r
    if claim.versus:
        return _difference_of_differences(claim, by_name)
    mine = by_name.get(claim.a, {})
    other = next((b for b in claim.b if b in by_name), None)
    compared = f"{claim.a} - {other or (claim.b[0] if claim.b else '')}" if claim.b else claim.a
    if other is not None and other != claim.b[0]:  # a stand-in (m_only is replay): say so
        compared += f" ({claim.note})"
    missing = [n for n in (claim.a, *([other] if other else claim.b[:1])) if n not in by_name]
    if missing:
        why = f"not run ({', '.join(missing)})" + (f": {claim.note}" if claim.note else "")
        return [claim.paper, claim.text, compared, claim.metric, "", "", "", "", why]
    if other is not None:
        ids, body = paired_table(run_dirs, "name", claim.a, other)
        row = next((r for r in body if r[0] == claim.metric), None)
        if row is None:
            return [claim.paper, claim.text, compared, claim.metric, "", "", "", "", "undefined for these runs"]
        seeds = [int(c.removeprefix("seed ")) for c in ids if c.startswith("seed ")]
        mean, t_low, t_high, b_low, b_high = row[-5:]
        boot = (b_low, b_high)
    else:
        seeds = sorted(s for s, r in mine.items() if r[claim.metric] is not None)
        values = [mine[s][claim.metric] for s in seeds]
        mean = statistics.fmean(values)
        t_low, t_high = t_interval(values) or (None, None)
        boot = tuple(mine[seeds[0]].get(f"{claim.metric}_ci") or (None, None)) if len(seeds) == 1 else (None, None)
    one = len(seeds) == 1
    low, high = boot if one else (t_low, t_high)
    if low is None or high is None:
        return [claim.paper, claim.text, compared, claim.metric, ",".join(map(str, seeds)), mean, "", "", "no interval"]
    return [claim.paper, claim.text, compared, claim.metric, ",".join(map(str, seeds)), mean, [low, high],
            "test samples (bootstrap)" if one else "seeds (Student's t)", verdict(low, high, claim.bound, claim.strict, one)]


def _difference_of_differences(claim: Claim, by_name: dict[str, dict]) -> list:
    """(A - B) - (C - D) per seed that all four ran; Student's t over seeds, or with one seed the
    bootstrap over test samples resampled alike in the four runs."""
    from mcit.intervals import contrast_bootstrap, t_interval
    from mcit.report import load_results

    names = (claim.a, claim.b[0], *claim.versus)
    compared = f"({names[0]} - {names[1]}) - ({names[2]} - {names[3]})"
    missing = [n for n in names if n not in by_name]
    if missing:
        return [claim.paper, claim.text, compared, claim.metric, "", "", "", "",
                f"not run ({', '.join(missing)})" + (f": {claim.note}" if claim.note else "")]
    seeds = sorted(s for s in set.intersection(*(set(by_name[n]) for n in names))
                   if all(by_name[n][s][claim.metric] is not None for n in names))
    if not seeds:
        return [claim.paper, claim.text, compared, claim.metric, "", "", "", "", "no seed run by all four"]
    weights = (1.0, -1.0, -1.0, 1.0)
    values = [sum(w * by_name[n][s][claim.metric] for n, w in zip(names, weights, strict=True)) for s in seeds]
    mean = statistics.fmean(values)
    if len(seeds) > 1:
        low, high = t_interval(values)
        over = "seeds (Student's t)"
    else:
        runs = [(Path(by_name[n][seeds[0]]["dir"]), w) for n, w in zip(names, weights, strict=True)]
        boot = contrast_bootstrap([[(d, load_results(d), w) for d, w in runs]], claim.metric, label="claims")
        if boot is None:
            return [claim.paper, claim.text, compared, claim.metric, str(seeds[0]), mean, "", "", "no interval"]
        (low, high), over = boot["interval"], "test samples (bootstrap)"
    return [claim.paper, claim.text, compared, claim.metric, ",".join(map(str, seeds)), mean, [low, high], over,
            verdict(low, high, claim.bound, True, len(seeds) == 1)]


def claims_table(run_dirs: list[Path]) -> list[list]:
    from mcit.report import compare

    if not run_dirs:
        raise McitError("claims: no finished runs given")
    rows = compare(run_dirs)
    return [check(c, rows, run_dirs) for c in CLAIMS]


def format_claims(body: list[list], fmt: str = "md") -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:+.2f}"
        if isinstance(v, list):
            return f"[{v[0]:+.2f}, {v[1]:+.2f}]"
        return str(v)

    cells = [[cell(v) for v in row] for row in body]
    if fmt == "csv":
        import csv
        import io

        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(COLUMNS)
        for row in body:
            w.writerow([f"{v[0]:.4f};{v[1]:.4f}" if isinstance(v, list) else (f"{v:.4f}" if isinstance(v, float) else v)
                        for v in row])
        return out.getvalue()
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(lines) + "\n"


__all__ = ["CLAIMS", "Claim", "check", "claims_table", "format_claims", "verdict"]
