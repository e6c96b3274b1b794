"""Answer Style Diversification as a part (a config's ``asd:`` section, on any method) and
``sefe``: SEFE (Chen et al., ICML 2025), ASD plus RegLoRA. The rewriting itself, and what it
takes from SEFE's CoIN-ASD and where it departs, is :mod:`mcit.data.asd`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mcit.data.asd import AnswerStyles
from mcit.data.format import Sample
from mcit.errors import McitError
from mcit.methods import register
from mcit.methods.base import MethodOptions, TaskContext
from mcit.methods.reglora import RegLoRA, RegLoRAOptions
from mcit.progress import console


def covered_by(tokenizer):
    """``text -> bool``: the tokenizer encodes ``text`` without its unknown token (None: no check)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return None
    return lambda text: unk not in tokenizer(text, add_special_tokens=False)["input_ids"]


def missing_words(tokenizer) -> str:
    """The rewrites' fixed words the tokenizer lacks, e.g. "'yes', 'no', 'b'"."""
    known = covered_by(tokenizer)
    words = ["yes", "no", "Yes", "No", *"ABCD", "option's", "letter", "choices", "directly"]
    return ", ".join(repr(w) for w in words if known is not None and not known(w)) or "none of its fixed words"


class ASDOptions(MethodOptions):
    share: float = Field(0.2, gt=0, le=1, description="share X of each task's training samples rewritten (SEFE's X = 20%)")
    styles: list[Literal["mcq", "yn", "short"]] = Field(
        ["mcq", "yn", "short"], min_length=1,
        description="formats to rewrite into: mcq (4 options), yn (is the answer X?), short (an option task's answer text)")


class AnswerStylePart:
    """Rewrites the stage's samples, each by its own task's plan (so a replayed sample looks as it
    did in its own stage). Plans are derived from the run seed and the data, so a resumed run
    rebuilds them: no state."""

    key = "asd_part"

    def __init__(self, options: ASDOptions):
        self.options = options
        self.plans: dict[str, AnswerStyles] = {}

    def plan(self, task: str, ctx: TaskContext) -> AnswerStyles:
        if task not in self.plans:
            if ctx.benchmark is None:
                raise McitError("asd: needs the run's benchmark (each task's scorer decides its answer formats)")
            tokenizer = getattr(ctx.encoder, "tokenizer", None)
            plan = AnswerStyles(task, ctx.train_data[task], ctx.benchmark.task(task).scorer, self.options.share,
                                tuple(self.options.styles), ctx.run_seed, known=covered_by(tokenizer))
            if plan.untokenizable:
                console.print(f"[yellow]asd: {task}: {plan.untokenizable} of the chosen samples keep their format: "
                              f"their rewrites need words the tokenizer lacks ({missing_words(tokenizer)})[/]")
            self.plans[task] = plan
        return self.plans[task]

    def train_data(self, task: str, samples: list[Sample], ctx: TaskContext) -> list[Sample]:
        return [self.plan(s.task or task, ctx).rewrites.get(s.id, s) for s in samples]

    def report(self) -> dict:
        """Per task: samples rewritten into each style, and chosen ones kept (no distractors)."""
        return {task: plan.report() for task, plan in self.plans.items()}


class SEFEOptions(RegLoRAOptions, ASDOptions):
    asd: bool = Field(True, description="answer style diversification on (false: RegLoRA alone, the ablation)")


@register
class SEFE(RegLoRA):
    name = "sefe"
    Options = SEFEOptions
    summary = "SEFE: answer style diversification of a share of each task's data, plus RegLoRA's key-element penalty."
    paper = "Chen et al., SEFE: Superficial and Essential Forgetting Eliminator for MCIT, ICML 2025"

    def __init__(self, options: SEFEOptions):
        super().__init__(options)
        self.asd = AnswerStylePart(options) if options.asd else None

    def train_data(self, task: str, samples: list[Sample], ctx: TaskContext) -> list[Sample]:
        samples = super().train_data(task, samples, ctx)
        return samples if self.asd is None else self.asd.train_data(task, samples, ctx)

    def report(self) -> dict:
        out = super().report()
        return out if self.asd is None else {**out, "asd": self.asd.report()}


__all__ = ["ASDOptions", "AnswerStylePart", "SEFE", "SEFEOptions"]
