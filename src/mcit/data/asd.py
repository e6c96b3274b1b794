"""Answer Style Diversification (ASD, the data half of SEFE): a share of each task's training
samples rewritten into other answer formats, so that a later task's format does not overwrite
what the model knows ("superficial forgetting", Chen et al., ICML 2025).

SEFE's CoIN-ASD converts X% of each task's data (``train_x20.json``: X = 20) into the other
formats of five: yes/no, multiple choice, short answer, brief and detailed explanation. It had an
LLM write the distractors of the yes/no and multiple-choice versions and the explanations
(``CoIN-ASD/prompts/<Task>/{yn,mcq,brief,detail}.txt``); the code that assembles the samples is
not released. Here, without an LLM at run time:

* ``mcq`` (for a short-answer task): the question's stem with four lettered options, the answer
  and three distractors, and LLaVA's letter instruction; the target is the answer's letter.
* ``yn`` (any convertible task): "Is the answer X?" with X the answer or one distractor, half
  each; the target is "Yes" or "No".
* ``short`` (for a multiple-choice task): the stem without its options, LLaVA's short-answer
  instruction; the target is the correct option's text.

Distractors are other answers of the same task's training set (its answer vocabulary), never one
equal to a reference after lower-casing and dropping a final period (a ``contains`` or
``numeric`` scorer may still accept a near form): as CoIN-ASD's ImageNet versions use other
class names. The explanation
styles need a generator model and are not offered; tasks scored as captions or boxes are left as
they are (CoIN-ASD gave its Grounding and ImageNet tasks only explanation styles).

Everything is seeded by (seed, task, sample id): a sample gets the same rewrite in every stage it
is trained in (its own and, through a replay buffer, later ones), and a resumed run the same data.

A rewrite must be expressible by the model: given ``known`` (does the tokenizer cover this text?),
a rewrite with a word the tokenizer maps to its unknown token is not used (the sample tries its
next style, else keeps its format; ``untokenizable`` counts them). A real LLM's tokenizer covers
everything; the shipped miniature's word-level vocabulary has no "yes", "no" or option letters
B-D, and training on ``<unk>`` targets teaches the model to answer nothing.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import replace

from mcit.data.format import Sample
from mcit.utils import stable_hash

SHORT_ANSWER = "Answer the question using a single word or phrase."
CHOICE_ANSWER = "Answer with the option's letter from the given choices directly."
YES_NO = "Please answer yes or no."
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
STYLES = ("mcq", "yn", "short")
# scorers of short answers (their tasks get mcq and yn) and of option letters (short and yn)
SHORT_SCORERS = ("vqa", "vqa_evalai", "exact", "contains", "numeric")
CHOICE_SCORERS = ("choice",)
N_OPTIONS = 4  # CoIN-ASD's mcq: the answer and three distractors

# response-format instructions a question may end with; the stem is the question without them
_INSTRUCTIONS = (SHORT_ANSWER, CHOICE_ANSWER, YES_NO, "Answer with a single word.", "Answer with one word.")
_OPTION_LINE = re.compile(r"^\s*([A-Z])[.)]\s*(.+?)\s*$")


def _norm(text: str) -> str:
    return text.strip().lower().rstrip(".").strip()


def stem(question: str) -> str:
    """The question without a trailing response-format instruction."""
    q = question.strip()
    changed = True
    while changed:
        changed = False
        for ins in _INSTRUCTIONS:
            if q.endswith(ins):
                q, changed = q[: -len(ins)].rstrip(), True
    return q


def parse_choice(question: str, answer: str) -> tuple[str, list[str], int] | None:
    """(stem, option texts, index of the answer) of a multiple-choice sample (options on lines
    "A. text" in letter order, the target one of their letters), or None."""
    lines = stem(question).split("\n")
    k = len(lines)
    while k > 0 and _OPTION_LINE.match(lines[k - 1]):
        k -= 1
    found = [_OPTION_LINE.match(line) for line in lines[k:]]
    letters = [m.group(1) for m in found]
    if len(found) < 2 or letters != list(LETTERS[: len(found)]):
        return None
    target = answer.strip().rstrip(".").upper()
    if target not in letters:
        return None
    return "\n".join(lines[:k]).strip(), [m.group(2) for m in found], letters.index(target)


def styles_for(scorer: str, sample: Sample) -> tuple[str, ...]:
    """The styles a sample of a task with ``scorer`` can be rewritten into (its own excluded)."""
    if scorer in CHOICE_SCORERS:
        return ("short", "yn") if parse_choice(sample.question, sample.answer) else ()
    if scorer in SHORT_SCORERS:
        return ("mcq", "yn")
    return ()


class AnswerStyles:
    """The rewrite plan of one task: which samples change, into what.

    ``share`` of the task's samples (rounded; the first of a seeded permutation) are rewritten,
    each into one of ``styles`` available to it, in turn so that they come in equal shares (the
    paper's "other formats in equal proportion"). Samples without enough distractors keep their
    format (counted in ``kept``)."""

    def __init__(self, task: str, samples: list[Sample], scorer: str, share: float, styles: tuple[str, ...],
                 seed: int, known: Callable[[str], bool] | None = None):
        self.task, self.scorer = task, scorer
        key = int(stable_hash([seed, task, "asd"]), 16)
        order = [s.id for s in samples]
        random.Random(key).shuffle(order)
        chosen = set(order[: round(share * len(samples))])
        self.vocabulary = self._vocabulary(samples)
        self.rewrites: dict[str, Sample] = {}
        self.counts = {s: 0 for s in styles}
        self.kept = 0
        self.untokenizable = 0  # chosen samples kept because every rewrite had words the tokenizer lacks
        turn = 0
        for s in samples:  # in data order: the style rotation is reproducible
            if s.id not in chosen:
                continue
            available = [st for st in styles if st in styles_for(scorer, s)]
            rng = random.Random(int(stable_hash([seed, task, s.id, "asd"]), 16))
            new, unexpressible = None, False
            for k in range(len(available)):
                style = available[(turn + k) % len(available)]
                new = self.rewrite(s, style, rng)
                if new is not None and known is not None and not (known(new.question) and known(new.answer)):
                    new, unexpressible = None, True
                if new is not None:
                    break
            turn += 1
            if new is None:
                self.kept += 1
                self.untokenizable += unexpressible
                continue
            self.counts[style] += 1
            self.rewrites[s.id] = new

    def _vocabulary(self, samples: list[Sample]) -> list[str]:
        """The task's answers as text, in first-seen order, one per normalised form (for a
        multiple-choice task: its options' texts)."""
        seen: dict[str, str] = {}
        for s in samples:
            parsed = parse_choice(s.question, s.answer) if self.scorer in CHOICE_SCORERS else None
            for text in (parsed[1] if parsed else [s.answer]):
                seen.setdefault(_norm(text), text.strip())
        return list(seen.values())

    def distractors(self, accepted: list[str], k: int, rng: random.Random) -> list[str] | None:
        """``k`` answers of the task that none of ``accepted`` matches, or None if it has fewer."""
        bad = {_norm(a) for a in accepted}
        pool = [v for v in self.vocabulary if _norm(v) not in bad]
        if len(pool) < k:
            return None
        return rng.sample(pool, k)

    def rewrite(self, s: Sample, style: str, rng: random.Random) -> Sample | None:
        if style == "short":
            parsed = parse_choice(s.question, s.answer)
            if parsed is None:
                return None
            text, options, right = parsed
            return self._sample(s, style, f"{text}\n{SHORT_ANSWER}", options[right], [options[right]])
        parsed = parse_choice(s.question, s.answer) if self.scorer in CHOICE_SCORERS else None
        if parsed is not None:  # yn of a multiple-choice sample: its options are its distractors
            text, options, right = parsed
            answer, wrong = options[right], [o for i, o in enumerate(options) if i != right]
        else:
            text, answer = stem(s.question), s.answer
            wrong = None
        accepted = [answer] if parsed is not None else [answer, *s.references]
        if style == "mcq":
            others = self.distractors(accepted, N_OPTIONS - 1, rng)
            if others is None:
                return None
            options = [answer, *others]
            rng.shuffle(options)
            block = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
            letter = LETTERS[options.index(answer)]
            return self._sample(s, style, f"{text}\n{block}\n{CHOICE_ANSWER}", letter, [letter])
        if style == "yn":
            if rng.random() < 0.5:
                asked, target = answer, "Yes"
            else:
                pick = [rng.choice(wrong)] if wrong else self.distractors(accepted, 1, rng)
                if pick is None:
                    return None
                asked, target = pick[0], "No"
            return self._sample(s, style, f"{text}\nIs the answer {asked}? {YES_NO}", target, [target])
        raise ValueError(f"unknown answer style {style!r}; expected one of {', '.join(STYLES)}")

    @staticmethod
    def _sample(s: Sample, style: str, question: str, answer: str, references: list[str]) -> Sample:
        return replace(s, id=f"{s.id}#asd-{style}", question=question, answer=answer, references=references)

    def report(self) -> dict:
        return {**self.counts, "kept": self.kept, "untokenizable": self.untokenizable}


__all__ = ["CHOICE_SCORERS", "SHORT_SCORERS", "STYLES", "AnswerStyles", "parse_choice", "stem", "styles_for"]
