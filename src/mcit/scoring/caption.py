"""Corpus-level caption metrics as the COCO caption evaluation computes them.

Pipeline (pycocoevalcap ``eval.py``): tokenise every reference and candidate with the
Stanford PTB tokenizer (``-preserveLines -lowerCase``), drop the punctuation tokens of
``PTB_PUNCTUATIONS``, then score with the pure-Python BLEU (n = 4, closest reference
length, corpus-level), ROUGE-L (beta = 1.2, mean over images) and CIDEr-D (n = 1..4,
sigma = 6, clipping, x10, document frequencies over the references of the scored
corpus) of pycocoevalcap itself, so numbers equal the official ones on the same tokens.

The PTB tokenizer needs Java. ``tokenizer="auto"`` uses it when ``java`` is on PATH and
otherwise a pure-Python approximation (:func:`tokenize_fallback`, documented in
``docs/scoring.md``); which one ran is returned in the info dict. METEOR (Java, slow to
start) is computed only when asked for.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

from mcit.errors import McitError

__all__ = [
    "CAPTION_METRICS",
    "PTB_PUNCTUATIONS",
    "caption_scores",
    "evaluate_captions",
    "java_available",
    "resolve_tokenizer",
    "tokenize",
    "tokenize_fallback",
    "tokenize_ptb",
]

CAPTION_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr", "ROUGE-L")
TOKENIZERS = ("auto", "ptb", "fallback")

# pycocoevalcap/tokenizer/ptbtokenizer.py. Upper-case "-LRB-" etc. never match the
# lower-cased tokenizer output, so "(" ")" "[" "]" "{" "}" survive as "-lrb-", "-rrb-",
# "-lsb-", "-rsb-", "-lcb-", "-rcb-" tokens; runs like "!!!" or "??" survive too.
PTB_PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":",
     "-", "--", "...", ";"]
)  # fmt: skip
_PTB_CLASS = "edu.stanford.nlp.process.PTBTokenizer"
_PTB_JAR = "stanford-corenlp-3.4.1.jar"
# Characters the Java tokenizer treats as line ends. The official wrapper only replaces
# "\n", so one of these inside a caption shifts every later line; we replace them by
# spaces (a documented deviation that only matters where the official code breaks).
_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\u2028\u2029]")


def java_available() -> bool:
    return shutil.which("java") is not None


def _ptb_jar() -> Path:
    import pycocoevalcap.tokenizer.ptbtokenizer as ptb_module

    return Path(ptb_module.__file__).resolve().parent / _PTB_JAR


def _drop_punctuation(line: str) -> str:
    # as the official wrapper: split on single spaces, keep tokens not in the list
    return " ".join(w for w in line.rstrip().split(" ") if w not in PTB_PUNCTUATIONS)


def tokenize_ptb(sentences: Sequence[str]) -> list[str]:
    """Tokenise with the Stanford PTB tokenizer jar shipped in pycocoevalcap, exactly
    as pycocoevalcap's ``PTBTokenizer`` (one sentence per line, lower-cased, the
    punctuation tokens removed). Raises :class:`McitError` if Java fails."""
    if not sentences:
        return []
    jar = _ptb_jar()
    if not jar.is_file():
        raise McitError(f"PTB tokenizer jar not found at {jar} (is pycocoevalcap installed?)")
    text = "\n".join(_LINE_BREAKS.sub(" ", s) for s in sentences)
    with tempfile.TemporaryDirectory(prefix="mcit-ptb-") as tmp:
        path = os.path.join(tmp, "captions.txt")
        with open(path, "wb") as f:
            f.write(text.encode("utf-8", "replace"))  # a lone surrogate becomes "?"
        cmd = ["java", "-cp", str(jar), _PTB_CLASS, "-preserveLines", "-lowerCase", path]
        try:
            proc = subprocess.run(cmd, capture_output=True, check=False, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise McitError(f"PTB tokenizer (java) could not run: {exc}") from exc
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
        raise McitError(f"PTB tokenizer (java) failed with code {proc.returncode}: {err}")
    lines = proc.stdout.decode("utf-8").split("\n")
    if len(lines) < len(sentences):
        raise McitError(f"PTB tokenizer returned {len(lines)} lines for {len(sentences)} captions")
    return [_drop_punctuation(line) for line in lines[: len(sentences)]]


# ------------------------------------------------------------ pure-Python fallback
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_UNICODE_PUNCT = str.maketrans(
    {"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'", "\u2014": " -- ",
     "\u2013": " -- ", "\u2026": "..."}
)  # fmt: skip
# a final "." stays on these (PTB's abbreviation handling); on anything else it splits
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr vs etc inc co ltd no mt ave prof gen sgt capt lt col jan feb "
    "mar apr jun jul aug sep sept oct nov dec".split()
)
# whole words PTB splits in its own way
_SPECIAL = {
    "'n'": ["'n'"], "'em": ["'em"], "'tis": ["'t", "is"], "'twas": ["'t", "was"],
    "gonna": ["gon", "na"], "gotta": ["got", "ta"], "wanna": ["wan", "na"],
    "cannot": ["can", "not"], "y'all": ["y'", "all"],
}  # fmt: skip
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
# pieces PTB splits off the front / the back of a whitespace-separated chunk
_LEAD = re.compile(r"^(``|\"|'(?!em$|n'$|til$|cause$|s$)|[(\[{$*~^|])")
_TRAIL = re.compile(r"(''|\"|\.\.\.+|--+|[!?]+|[,;:%*~^|]|[)\]}]|(?<=[a-z0-9])'|(?<=[)\]}\"'])\.)$")


def _split_chunk(chunk: str) -> list[str]:
    if chunk in _SPECIAL:
        return _SPECIAL[chunk]
    if chunk[:-1] in _SPECIAL and chunk.endswith("."):
        return _SPECIAL[chunk[:-1]] + ["."]
    head: list[str] = []
    tail: list[str] = []
    while chunk and (m := _LEAD.match(chunk)):
        head.append(m.group(0))
        chunk = chunk[m.end() :]
    while chunk and (m := _TRAIL.search(chunk)) and m.start() > 0:
        tail.insert(0, m.group(0))
        chunk = chunk[: m.start()]
    words: list[str] = []
    for i, part in enumerate(chunk.split("--")):  # "two--three" -> two -- three
        if i:
            words.append("--")
        if part:
            words.append(part)
    out: list[str] = []
    for piece in head + words + tail:
        m = _CLITIC.match(piece)
        if piece in _BRACKETS:
            out.append(_BRACKETS[piece])
        elif piece == '"':
            out.append("''")  # PTB turns " into `` or '': both are dropped
        elif piece in _SPECIAL:
            out.extend(_SPECIAL[piece])
        elif m and piece != "'s":
            out.extend([m.group(1), m.group(2)])
        else:
            out.append(piece)
    return out


def _split_final_period(token: str) -> list[str]:
    if len(token) < 2 or not token.endswith(".") or token.endswith(".."):
        return [token]
    stem = token[:-1]
    if "." in stem or stem in _ABBREVIATIONS or (len(stem) == 1 and stem.isalpha()):
        return [token]  # u.s. / p.m. / mr. / d.
    return [stem, "."]


def tokenize_fallback(sentences: Sequence[str]) -> list[str]:
    """A pure-Python approximation of PTB tokenisation + punctuation removal.

    Matches the Java tokenizer on ordinary captions (lower-casing, clitics "n't" "'s"
    "'re" ..., brackets to "-lrb-"-style tokens, quotes, trailing punctuation, final
    periods, "$" "%" "*" split off); known differences are listed in docs/scoring.md.
    """
    result = []
    for sentence in sentences:
        tokens: list[str] = []
        text = _LINE_BREAKS.sub(" ", sentence).translate(_UNICODE_PUNCT).lower()
        for chunk in text.split():
            for piece in _split_chunk(chunk):
                tokens.extend(_split_final_period(piece))
        result.append(" ".join(t for t in tokens if t not in PTB_PUNCTUATIONS))
    return result


def resolve_tokenizer(tokenizer: str = "auto") -> str:
    """``"auto"`` -> ``"ptb"`` if ``java`` is on PATH, else ``"fallback"``."""
    if tokenizer not in TOKENIZERS:
        raise McitError(
            f"caption tokenizer must be one of {', '.join(TOKENIZERS)}, got {tokenizer!r}"
        )
    if tokenizer == "auto":
        return "ptb" if java_available() else "fallback"
    if tokenizer == "ptb" and not java_available():
        raise McitError(
            "caption tokenizer 'ptb' needs Java ('java' is not on PATH); use 'fallback'"
        )
    return tokenizer


def tokenize(sentences: Sequence[str], tokenizer: str = "auto") -> tuple[list[str], dict]:
    """Tokenise with the chosen tokenizer; returns the tokens and an info dict
    ``{"tokenizer": "ptb" | "fallback", ...}`` saying which one actually ran. Under
    ``"auto"``, a Java failure falls back to the Python tokenizer with a warning and a
    ``tokenizer_note`` in the info (never silently); an explicit ``"ptb"`` raises."""
    requested = tokenizer
    tokenizer = resolve_tokenizer(tokenizer)
    if tokenizer == "ptb":
        try:
            return tokenize_ptb(sentences), {"tokenizer": "ptb"}
        except McitError as exc:
            if requested == "ptb":
                raise
            note = f"PTB tokenizer failed, used the Python fallback: {exc}"
            warnings.warn(note, RuntimeWarning, stacklevel=2)
            return tokenize_fallback(sentences), {"tokenizer": "fallback", "tokenizer_note": note}
    return tokenize_fallback(sentences), {"tokenizer": "fallback"}


# ------------------------------------------------------------------------ scoring
def _meteor(gts: dict, res: dict) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    if not java_available():
        raise McitError("METEOR needs Java ('java' is not on PATH)")
    scorer = Meteor()
    try:
        score, _ = scorer.compute_score(gts, res)
    finally:
        scorer.meteor_p.stdin.close()
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()
    return float(score)


def evaluate_captions(
    references: Mapping[str, Sequence[str]],
    candidates: Mapping[str, str],
    tokenizer: str = "auto",
    meteor: bool = False,
    per_image: dict[str, list[float]] | None = None,
) -> tuple[dict[str, float], dict]:
    """Score candidates against references (both keyed by image id).

    Returns ``(scores, info)``: scores on the official 0..1 scale (CIDEr may exceed 1)
    with keys ``BLEU-1``..``BLEU-4``, ``CIDEr``, ``ROUGE-L`` (+ ``METEOR`` if asked),
    and info ``{"tokenizer": ...}``. An empty corpus scores 0.0 everywhere. A ``per_image``
    dict is filled with each metric's score of every image alone, in key order (BLEU sentence
    by sentence, CIDEr-D with the corpus's document frequencies; METEOR left out): what a
    per-sample view (flips) needs; their mean is not the corpus score for BLEU.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if set(references) != set(candidates):
        missing = sorted(map(str, set(references) ^ set(candidates)))[:5]
        raise McitError(f"caption references and candidates have different ids, e.g. {missing}")
    keys = list(references)
    for k in keys:
        refs = references[k]
        if isinstance(refs, str) or len(refs) == 0:
            raise McitError(f"caption id {k!r}: references must be a non-empty list of strings")
        if not isinstance(candidates[k], str) or not all(isinstance(r, str) for r in refs):
            raise McitError(f"caption id {k!r}: captions must be strings")
    names = CAPTION_METRICS + (("METEOR",) if meteor else ())
    if not keys:
        return {m: 0.0 for m in names}, {"tokenizer": resolve_tokenizer(tokenizer)}

    # one tokenizer run for references and candidates (each line is independent)
    flat = [r for k in keys for r in references[k]] + [candidates[k] for k in keys]
    tokens, info = tokenize(flat, tokenizer)
    gts: dict = {}
    pos = 0
    for k in keys:
        n = len(references[k])
        gts[k] = tokens[pos : pos + n]
        pos += n
    res = {k: [tokens[pos + i]] for i, k in enumerate(keys)}

    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"BLEU-{i + 1}": float(b) for i, b in enumerate(bleu)}
    each = {f"BLEU-{i + 1}": [float(v) for v in b] for i, b in enumerate(bleu_each)}
    if any(r.split() for refs in gts.values() for r in refs):
        cider, cider_each = Cider().compute_score(gts, res)
        scores["CIDEr"], each["CIDEr"] = float(cider), [float(v) for v in cider_each]
    else:  # no reference n-gram at all: pycocoevalcap would fail on max() of nothing
        scores["CIDEr"], each["CIDEr"] = 0.0, [0.0] * len(keys)
    rouge, rouge_each = Rouge().compute_score(gts, res)
    scores["ROUGE-L"], each["ROUGE-L"] = float(rouge), [float(v) for v in rouge_each]
    if per_image is not None:
        per_image.update(each)
        per_image["bleu_stats"] = [bleu_stats(gts[k], res[k][0]) for k in keys]
    if meteor:
        scores["METEOR"] = _meteor(gts, res)
    return scores, info


def bleu_stats(references: Sequence[str], candidate: str) -> list[int]:
    """One image's BLEU sufficient statistics as pycocoevalcap's BleuScorer computes them
    (tokenised text): [candidate length, closest reference length, guessed 1..4-grams, correct
    1..4-grams]. Summed over any set of images they give that set's corpus BLEU (:func:`corpus_bleu`)."""
    from pycocoevalcap.bleu.bleu_scorer import cook_refs, cook_test

    cooked = cook_refs(list(references))
    test = cook_test(candidate, cooked)
    testlen = test["testlen"]
    reflen = min((abs(n - testlen), n) for n in cooked[0])[1]  # BleuScorer's "closest" option
    return [testlen, reflen, *test["guess"], *test["correct"]]


def corpus_bleu(totals: Sequence[float]) -> list[float]:
    """BLEU-1..4 (0..1) from summed :func:`bleu_stats`, with pycocoevalcap's smoothing constants:
    its corpus score, bit for bit, when the sums cover its images."""
    small, tiny = 1e-9, 1e-15
    testlen, reflen, guess, correct = totals[0], totals[1], totals[2:6], totals[6:10]
    bleus, bleu = [], 1.0
    for k in range(4):
        bleu *= float(correct[k] + tiny) / (guess[k] + small)
        bleus.append(bleu ** (1.0 / (k + 1)))
    ratio = (testlen + tiny) / (reflen + small)
    if ratio < 1:
        bleus = [b * math.exp(1 - 1 / ratio) for b in bleus]
    return bleus


def caption_scores(
    references: Mapping[str, Sequence[str]],
    candidates: Mapping[str, str],
    tokenizer: str = "auto",
) -> dict[str, float]:
    """``BLEU-1``..``BLEU-4``, ``CIDEr`` (CIDEr-D) and ``ROUGE-L`` on the official 0..1
    scale; see :func:`evaluate_captions` for which tokenizer ran."""
    return evaluate_captions(references, candidates, tokenizer)[0]
