"""DISCO as MCITlib runs it (the centralised form of Guo et al.'s federated FCIT method): per-task
LoRA subspaces, mixed per sample at inference by the similarity of the question to each task's
text prototype.

Everything is :class:`~mcit.methods.hide.AnchoredExperts` (per-task experts trained alone; anchors
after each task) with routing in every layer, by text only, at temperature 0.05:
w = softmax(cos(text, prototype_i) / 0.05) over the stream's tasks (0 for tasks not trained).
The text feature is our offline sentence encoder's (all-MiniLM-L6-v2) on the question; the
reference uses the CLIP text tower's pooled output.

Sources (docs/methods.md): MCITlib at 2956dfd ``DISCO/CoIN/peft/tuners/clitmoelora.py``
(``CoINMOELoraLinear``: Σ_i w_i B_i A_i x in all layers), ``DISCO/llava/model/llava_arch.py``
(prototypes as running sums, the image similarity computed but left out, softmax(s / 0.05));
configs and schedule as HiDe's. The original (Ghy0501/FCIT at 9b10259, ICCV 2025) is federated
(50 clients, FedAvg) and clusters client text features into subspaces reused above cos 0.9;
MCITlib, and we, assign one subspace per task.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mcit.methods import register
from mcit.methods.hide import AnchoredExperts, AnchoredOptions


class DISCOOptions(AnchoredOptions):
    temperature: float = Field(0.05, gt=0, description="softmax temperature of the prototype similarities")
    modalities: Literal["both", "text", "image"] = Field("text", description="prototype similarities used (reference: text only)")


@register
class DISCO(AnchoredExperts):
    name = "disco"
    Options = DISCOOptions
    summary = "DISCO (MCITlib): per-task LoRA subspaces mixed per sample by question similarity to task prototypes."
    paper = "Guo et al., Federated Continual Instruction Tuning (DISCO), ICCV 2025"

    def set_inference(self) -> None:
        self.bank.use(list(range(self.done)))  # until a batch is routed
