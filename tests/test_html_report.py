"""report.html: well-formed, self-contained, holding the numbers; rendered in headless Chromium."""

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from mcit.html_report import paired_differences, report_html
from tests.conftest import ROOT

ARTIFACTS = ROOT / "test-artifacts"  # screenshots the tests leave for a human to look at (gitignored)
VOID = {"meta", "br", "img", "hr", "input", "link"}


class _Structure(HTMLParser):
    """Checks that every element is closed in order, and collects ids and external references."""

    def __init__(self):
        super().__init__()
        self.stack, self.ids, self.external, self.errors = [], set(), [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        for key in ("src", "href"):
            if attrs.get(key) and not attrs[key].startswith(("data:", "#")):
                self.external.append(attrs[key])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()


def _parse(text: str) -> _Structure:
    p = _Structure()
    p.feed(text)
    p.close()
    return p


@pytest.fixture(scope="module")
def flipped_run(smoke_run, tmp_path_factory):
    """A copy of the smoke run in which one color sample is known to be forgotten."""
    out, _ = smoke_run
    run = tmp_path_factory.mktemp("html") / "run"
    shutil.copytree(out, run)
    first, last = run / "predictions" / "row_01" / "color.jsonl", run / "predictions" / "row_03" / "color.jsonl"
    rows = [json.loads(line) for line in first.read_text().splitlines()]
    rows[0].update(prediction=rows[0]["references"][0], score=1.0)
    first.write_text("".join(json.dumps(r) + "\n" for r in rows))
    later = [json.loads(line) for line in last.read_text().splitlines()]
    later[0].update(prediction="FORGOTTENANSWER", score=0.0)
    last.write_text("".join(json.dumps(r) + "\n" for r in later))
    return run, rows[0]


def test_run_writes_a_well_formed_self_contained_page(smoke_run):
    out, results = smoke_run
    text = (out / "report.html").read_text()
    page = _parse(text)
    assert not page.errors and not page.stack, (page.errors, page.stack)
    assert not page.external  # no network: every image and style is inline
    assert "<script" not in text and "url(http" not in text and "@import" not in text
    assert report_html([out]) == text  # the same run gives the same page, byte for byte
    assert {"matrix", "metrics"} <= page.ids
    for title in ("Accuracy matrix", "Learning curves", "What changed, sample by sample", "Scorers", "Config"):
        assert f">{title}</h2>" in text, title
    for row in results["matrix"]:
        for v in row:
            assert f"data-value='{v:.2f}'" in text
    assert f"<td>{results['metrics']['MFN']:.2f}</td>" in text
    assert text.count("<svg") == 1  # the learning curves


def test_html_can_be_turned_off(smoke_cfg, tmp_path):
    from mcit.runner import run

    run(smoke_cfg("html_report=false", "benchmark.tasks=[color]", "train.steps=2"), tmp_path / "r", show_progress=False)
    assert (tmp_path / "r" / "report.md").is_file() and not (tmp_path / "r" / "report.html").exists()


def test_a_forgotten_sample_is_in_the_page_with_its_image(flipped_run):
    run, sample = flipped_run
    text = report_html([run])
    assert "FORGOTTENANSWER" in text and sample["question"] in text
    color = re.search(r"<details data-task='color'><summary>color: rows 1 → 3, 16 samples: (\d+) forgotten", text)
    assert color and int(color.group(1)) >= 1
    assert re.search(r"\.i[0-9a-f]{12}\{background-image:url\(data:image/png;base64,", text)  # the thumbnail


def test_a_study_page_compares_and_pairs_seeds(smoke_run, smoke_cfg, tmp_path):
    from mcit.runner import run

    out, first = smoke_run
    other = run(smoke_cfg("seed=1"), tmp_path / "seed1", show_progress=False)
    zero = run(smoke_cfg("method.name=zeroshot"), tmp_path / "zs", show_progress=False)
    text = report_html([out, tmp_path / "seed1", tmp_path / "zs"], by="method")
    page = _parse(text)
    assert not page.errors and {"compare", "paired"} <= page.ids
    mean = (first["metrics"]["MFN"] + other["metrics"]["MFN"]) / 2
    assert f"{mean:.2f} ± " in text
    assert f"seqft − zeroshot</td><td>{first['metrics']['MFN'] - zero['metrics']['MFN']:.2f}</td>" in text
    assert text.count("<details><summary>") == 3  # one section per run


def test_paired_differences_known_answers():
    rows = [{"method": "a", "seed": 0, "MFN": 50.0}, {"method": "a", "seed": 1, "MFN": 60.0},
            {"method": "b", "seed": 0, "MFN": 40.0}, {"method": "b", "seed": 1, "MFN": 56.0},
            {"method": "b", "seed": 2, "MFN": 10.0}, {"method": "c", "seed": 7, "MFN": 1.0}]
    (pair,) = paired_differences(rows, "method")
    assert (pair["a"], pair["b"], pair["seeds"], pair["mean"]) == ("a", "b", [0, 1], 7.0)
    assert pair["std"] == pytest.approx((2 * 3.0**2) ** 0.5)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail("headless Chromium is needed for this test: install Debian's chromium (apt-get install chromium)")


def test_the_page_renders_in_headless_chromium(flipped_run, tmp_path):
    """Load the page from disk in Chromium, let it render, and read back its DOM and a screenshot."""
    run, _ = flipped_run
    page = tmp_path / "report.html"
    page.write_text(report_html([run]))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=3000"]
    dom = subprocess.run([_chromium(), *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    assert dom.returncode == 0, dom.stderr[-2000:]
    results = json.loads((run / "results.json").read_text())
    for v in results["matrix"][-1]:
        assert f'data-value="{v:.2f}"' in dom.stdout  # the browser's DOM holds the matrix
    assert "FORGOTTENANSWER" in dom.stdout and '<details data-task="color">' in dom.stdout
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    proc = subprocess.run([_chromium(), *flags, "--window-size=1280,1600", f"--screenshot={shot}", page.as_uri()],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    assert proc.returncode == 0 and shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20_000
