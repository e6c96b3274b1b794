"""Benchmark the scorers: 100k VQA predictions and 1k captions.

    python benchmarks/bench_scoring.py [--n-vqa 100000] [--n-captions 1000]

Prints wall-clock times. The VQA corpus mimics VQAv2 (short answers from a small
vocabulary, 10 annotators with some disagreement, predictions with case/punctuation
noise); a second run makes every string unique, so no normalisation is served from
the cache (the worst case). The target is < 5 s for 100k VQA predictions.
"""

from __future__ import annotations

import argparse
import random
import time

from mcit.scoring import score_task
from mcit.scoring.caption import java_available
from mcit.scoring.vqa import normalize_evalai, normalize_vqa

VOCAB = (
    "yes no 2 3 1 4 white red blue black green brown tennis frisbee baseball kitchen "
    "dog cat pizza skiing surfing table bathroom man woman giraffe elephant train "
    "left right wood snow grass umbrella nothing none two three one"
).split()
NOISE = ["", ".", "!", " ", "\n", "The ", "a ", ",", "?"]


def vqa_corpus(n: int, rng: random.Random, unique: bool) -> tuple[list[str], list[list[str]]]:
    preds, refs = [], []
    for i in range(n):
        gold = rng.choice(VOCAB)
        answers = [gold if rng.random() < 0.7 else rng.choice(VOCAB) for _ in range(10)]
        pred = gold if rng.random() < 0.6 else rng.choice(VOCAB)
        pred = rng.choice(NOISE[5:7]) * (rng.random() < 0.1) + pred + rng.choice(NOISE[:5])
        if rng.random() < 0.3:
            pred = pred.capitalize()
        if unique:
            pred, answers = f"{pred} w{i}", [f"{a} w{i}" for a in answers]
        preds.append(pred)
        refs.append(answers)
    return preds, refs


WORDS = (
    "a an the man woman dog cat two three red blue green small large sitting standing "
    "riding eating holding playing on in at with near next to of under a field street "
    "table horse bike surfboard wave pizza plate kitchen room snow grass frisbee ball"
).split()


def sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
    text = " ".join(words).capitalize()
    return text + rng.choice([".", "", " .", "!"])


def timed(label: str, fn) -> float:
    t0 = time.perf_counter()
    result = fn()
    dt = time.perf_counter() - t0
    print(f"{label:<66s} {dt:6.2f} s   headline {result.headline:8.3f}")
    return dt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-vqa", type=int, default=100_000)
    parser.add_argument("--n-captions", type=int, default=1_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    for unique in (False, True):
        preds, refs = vqa_corpus(args.n_vqa, rng, unique)
        kind = "all strings unique (no cache hits)" if unique else "VQAv2-like"
        for name in ("vqa", "vqa_evalai"):
            normalize_vqa.cache_clear()
            normalize_evalai.cache_clear()
            timed(
                f"{name:<10s} {args.n_vqa} predictions, {kind}",
                lambda name=name, preds=preds, refs=refs: score_task(name, preds, refs),
            )

    refs_c = [[sentence(rng) for _ in range(5)] for _ in range(args.n_captions)]
    cands = [sentence(rng) for _ in range(args.n_captions)]
    tokenizers = ["fallback"] + (["ptb"] if java_available() else [])
    for tok in tokenizers:
        timed(
            f"caption    {args.n_captions} captions x 5 refs, tokenizer={tok}",
            lambda tok=tok: score_task("caption", cands, refs_c, {"tokenizer": tok}),
        )
    if not java_available():
        print("(java not on PATH: PTB tokenizer timing skipped)")


if __name__ == "__main__":
    main()
