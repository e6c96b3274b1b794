"""Memory aware synapses (Aljundi et al. 2018): unsupervised importance.

Importance is the mean absolute gradient of the squared L2 norm of the model's output logits,
taken at the positions that predict the answer tokens (the outputs the task is judged on),
over a seeded sample of the finished task's training data. Importances accumulate over tasks
and the anchor is the latest parameters (``mode: online``, ``gamma: 1``), as in the paper.
"""

from typing import Literal

from pydantic import Field

from mcit.methods import register
from mcit.methods.penalty import ImportancePenalty, PenaltyOptions, answer_logits


class MASOptions(PenaltyOptions):
    mode: Literal["separate", "online"] = Field(
        "online", description="online: accumulated importance, anchor at the latest task (the paper); separate: per task"
    )


@register
class MAS(ImportancePenalty):
    name = "mas"
    Options = MASOptions
    summary = "Memory aware synapses: importance from output-norm sensitivity, same quadratic penalty as EWC."
    paper = "Aljundi et al., ECCV 2018"

    def objective(self, batch, outputs):
        return answer_logits(outputs.logits, batch["labels"]).float().pow(2).sum(-1).mean()

    def accumulate(self, grad):
        return grad.abs()
