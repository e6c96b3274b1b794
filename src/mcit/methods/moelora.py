"""MoE-LoRA as CoIN runs it (Chen et al., CoIN, 2024): LoRA experts behind a learned router.

Every LoRA layer holds ``experts`` LoRA experts of rank ``rank`` and a bias-free linear router on
the layer's input; each token's output adds Σ_e softmax(router(x))_e · scaling · B_e A_e x. All
experts and the routers train through the whole stream (no task id, no freezing): the method's
bet is that tasks settle into different experts by themselves. ``top_k`` keeps each token's k
most probable experts (renormalised); the reference is dense (``top_k: null``).

Sources (docs/methods.md): MCITlib ``MoELoRA/CoIN/peft/tuners/clitmoelora.py``
(``CoINMOELoraLinear.forward``: dense token-level softmax router ``lora_router``, nn.Linear
without bias; the total rank split evenly over the experts; A ~ N(0, 0.01), B = 0; scaling
alpha / total rank) and ``MoELoRA/configs/model_configs/LLaVA/UCIT/train/task*.json`` (6 experts,
total rank 18, lr 2e-4, alpha = 2 x rank in ``scripts``). Our embedded config keeps the base
LoRA's total rank: 4 experts of rank 2 (r 8), scaling alpha / r as the base LoRA.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mcit.methods import register
from mcit.methods.base import Method, MethodOptions, TaskContext
from mcit.methods.experts import ExpertBank
from mcit.utils import stable_seed


class MoELoRAOptions(MethodOptions):
    experts: int = Field(4, ge=1, description="LoRA experts per layer")
    rank: int = Field(2, ge=1, description="rank of each expert (the reference splits its total rank evenly)")
    top_k: int | None = Field(None, ge=1, description="keep each token's k most probable experts (null: dense, the reference)")
    init: Literal["normal", "peft"] = Field("normal", description="expert init: A ~ N(0, 0.01) (reference) or PEFT's")


@register
class MoELoRA(Method):
    name = "moelora"
    Options = MoELoRAOptions
    summary = "MoE-LoRA (CoIN): LoRA experts behind a learned token-level router, all trained through the stream."
    paper = "Chen et al., CoIN: A Benchmark of Continual Instruction tuNing for Multimodel Large Language Model, NeurIPS 2024 D&B"

    def setup(self, model, ctx: TaskContext) -> None:
        o = self.options
        seed = stable_seed(ctx.seed, "moelora-init")
        self.bank = ExpertBank(ctx.unwrapped, o.experts, o.rank, init=o.init, router=True, seed=seed)
        self.bank.router(o.top_k)

    def route(self, batch, ctx: TaskContext) -> None:
        # the router needs no routing; its gates are summed while a test set is answered
        self.bank.record = True

    def eval_summary(self) -> dict | None:
        # the mean gate per expert over every layer and token of the test set just answered, which
        # evaluation files under method_report["mean_gate"][row][task] (do tasks settle into experts?)
        self.bank.record = False
        gates = self.bank.take_gates()
        return None if gates is None else {"mean_gate": gates}

    def report(self) -> dict:
        return {"experts": self.options.experts}

    # experts and routers are trainable parameters: in the per-task checkpoint
