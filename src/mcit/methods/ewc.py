"""Elastic weight consolidation (Kirkpatrick et al. 2017) and online EWC (``mode: online``).

Importance is the diagonal empirical Fisher: the mean of squared gradients of the task loss
over a seeded sample of the finished task's training data (per sample with ``batch_size: 1``).
"""

from mcit.methods import register
from mcit.methods.penalty import ImportancePenalty


@register
class EWC(ImportancePenalty):
    name = "ewc"
    summary = "Elastic weight consolidation: diagonal-Fisher-weighted pull toward old optima (mode online = online EWC)."
    paper = "Kirkpatrick et al., PNAS 2017; online EWC: Schwarz et al., ICML 2018"

    def objective(self, batch, outputs):
        return outputs.loss

    def accumulate(self, grad):
        return grad.pow(2)
