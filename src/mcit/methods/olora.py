"""O-LoRA: a new LoRA per task in a subspace orthogonal to the earlier tasks' (Wang et al., 2023).

Each task t trains its own expert of the :class:`~mcit.methods.experts.ExpertBank` (one per stream
task, rank ``rank``); the earlier experts are frozen. The loss gets

    lambda_orth · Σ_layers Σ_{s<t} Σ_ij |(A_t A_s^T)_ij|   +   lambda_l2 · Σ_layers (||A_t|| + ||B_t||)

(the first pushes the rows of the new A, the directions the new update reads, orthogonal to every
old A's; the second is the paper's L2 term, Frobenius norms, not squared). At inference every
finished task's expert is applied (their updates summed), with no task id.

Sources (docs/methods.md): cmnfriend/O-LoRA ``src/uie_trainer_lora.py`` (the two terms as above;
``scripts/order_1.sh``: lamda_1 0.5, lamda_2 0) and MCITlib ``OLoRA/llava/train/llava_trainer.py``
(the same orthogonality sum, weight 0.05, no L2 term) with its ``CoIN/peft/tuners/clitmoelora.py``
(the rank split in one slice per task, A ~ N(0, 0.01), B = 0; in training only the current
slice is in the forward pass, at inference the slices of tasks 0..t). They differ in whether the
old experts act while a new task trains: the O-LoRA paper and code keep them in the model (the
old LoRA is merged in), MCITlib leaves them out until inference. ``old_in_training`` (default
true, the paper) chooses; our defaults otherwise are MCITlib's (weight 0.05, no L2, normal init).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mcit.methods import register
from mcit.methods.base import Method, MethodOptions, TaskContext
from mcit.methods.experts import ExpertBank
from mcit.utils import stable_seed


class OLoRAOptions(MethodOptions):
    rank: int | None = Field(None, ge=1, description="rank of each task's LoRA (default: model.lora.r)")
    lambda_orth: float = Field(0.05, ge=0, description="weight of the orthogonality loss sum |A_new A_old^T|")
    lambda_l2: float = Field(0.0, ge=0, description="weight of the L2 term on the new LoRA (norms of A and B)")
    old_in_training: bool = Field(True, description="earlier tasks' LoRAs act while a new task trains (paper); "
                                                    "false: only at inference (MCITlib)")
    init: Literal["normal", "peft"] = Field("normal", description="expert init: A ~ N(0, 0.01) (MCITlib) or PEFT's")


def orthogonality_loss(bank: ExpertBank, new: int, old: list[int]) -> torch.Tensor | None:
    """Σ over layers and old experts of the entrywise absolute sum of A_new A_old^T."""
    if not old:
        return None
    name = bank.names[new]
    terms = []
    for layer in bank.layers.values():
        a_new = layer.lora_A[name].weight
        for s in old:
            terms.append((a_new @ layer.lora_A[bank.names[s]].weight.detach().T).abs().sum())
    return torch.stack(terms).sum()


def l2_loss(bank: ExpertBank, e: int) -> torch.Tensor:
    name = bank.names[e]
    return torch.stack([layer.lora_A[name].weight.norm() + layer.lora_B[name].weight.norm()
                        for layer in bank.layers.values()]).sum()


@register
class OLoRA(Method):
    name = "olora"
    Options = OLoRAOptions
    summary = "O-LoRA: a new LoRA per task, orthogonal to the earlier tasks' A matrices; all summed at inference."
    paper = "Wang et al., Orthogonal Subspace Learning for Language Model Continual Learning, EMNLP Findings 2023"

    def __init__(self, options: OLoRAOptions):
        super().__init__(options)
        self.current = -1
        self.done = 0  # finished tasks: experts 0..done-1 act at inference

    def setup(self, model, ctx: TaskContext) -> None:
        seed = stable_seed(ctx.seed, "olora-init")
        self.bank = ExpertBank(ctx.unwrapped, len(ctx.tasks), self.options.rank, init=self.options.init, seed=seed)
        self.bank.use([])  # zero-shot row: the start itself

    def before_task(self, task, samples, ctx: TaskContext) -> None:
        self.current = ctx.stage - 1
        for e in range(self.current):
            self.bank.freeze(e)
        active = list(range(self.current + 1)) if self.options.old_in_training else [self.current]
        self.bank.use(active)

    def extra_loss(self, batch, outputs, ctx: TaskContext) -> torch.Tensor | None:
        o = self.options
        loss = None
        if o.lambda_orth:
            orth = orthogonality_loss(self.bank, self.current, list(range(self.current)))
            loss = None if orth is None else o.lambda_orth * orth
        if o.lambda_l2:
            l2 = o.lambda_l2 * l2_loss(self.bank, self.current)
            loss = l2 if loss is None else loss + l2
        return loss

    def before_step(self, ctx: TaskContext) -> None:
        self.bank.drop_frozen_grads()

    def after_task(self, task, ctx: TaskContext) -> None:
        self.done = self.current + 1
        self.bank.freeze(self.current)
        self.bank.use(list(range(self.done)))

    def report(self) -> dict:
        if self.done < 2:
            return {"tasks_done": self.done}
        # the mean |cos| between the rows of different tasks' A (0: orthogonal subspaces), per layer mean
        overlaps = []
        for layer in self.bank.layers.values():
            rows = [torch.nn.functional.normalize(layer.lora_A[self.bank.names[e]].weight.detach().float(), dim=1)
                    for e in range(self.done)]
            pairs = [(rows[i] @ rows[j].T).abs().mean() for i in range(len(rows)) for j in range(i)]
            overlaps.append(torch.stack(pairs).mean())
        return {"tasks_done": self.done, "mean_abs_cos_between_tasks": round(float(torch.stack(overlaps).mean()), 5)}

    def state_dict(self):
        return {}, {"done": self.done}  # the experts are trainable parameters: in the per-task checkpoint

    def load_state_dict(self, tensors, meta) -> None:
        self.done = int(meta.get("done", 0))
        for e in range(self.done):
            self.bank.freeze(e)
        self.bank.use(list(range(self.done)))
