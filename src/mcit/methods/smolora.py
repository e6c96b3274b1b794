"""SMoLoRA (Wang et al., ICCV 2025): separable mixture of LoRA with a visual-understanding (VU) and
an instruction-following (IF) routing, as its official code runs.

Every LoRA layer holds ``experts`` LoRA experts of rank ``rank``; the first half are VU experts, the
second IF experts. Per forward call of a layer (input x, batch x tokens x d):

- VU: one expert per sample, argmax of a bias-free linear map of the mean of x over the call's
  tokens (the layer's own hidden states; image, text and padding alike);
- IF: one expert per sample, argmax of a bias-free linear map of an instruction embedding: the
  offline sentence encoder all-MiniLM-L6-v2 (the reference's own encoder) on the task's
  instructions (``instruction: task``: the mean over the task's training questions, the task
  given, in training and at inference, as the reference passes its task index; ``sample``: each
  sample's own question, no task id);
- y = base(x) + a · h_vu + b · h_if with h the chosen experts' outputs and, per token,
  (a, b) = softmax(fc_vu(h_vu), fc_if(h_if)), each fc a bias-free linear map to one score.

The experts and the two fc maps train through the stream; the two routers stay at their seeded
random initialisation (in the reference they are trainable only in the first task, and an argmax
passes them no gradient, so they never change either). No replay, no regulariser, no freezing.
In generation with a KV cache each decoding step is a call of one token, so its VU choice is
that token's, as in the reference.

Sources (docs/methods.md): Minato-Zackie/SMoLoRA at ba50e07 ``PEFT_SMoLoRA/peft/tuners/
smolora.py`` (``SMoLoraLinear.__init__`` and ``forward``), ``scripts/SMoLoRA/ins_gen.py`` (task
instruction embeddings, all-MiniLM-L6-v2 mean pooling), ``scripts/SMoLoRA/Train_Eval/*.sh`` (8
experts, r 128 / alpha 256, lr 1e-4, weight decay 0.01, one epoch); Prism at 7154be2
``config/methods/smolora.py`` (r 64 / 96 on UCIT, lr 2e-4).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from mcit.data.format import Sample
from mcit.methods import register
from mcit.methods.base import Method, MethodOptions, TaskContext
from mcit.methods.experts import ExpertBank
from mcit.utils import stable_seed


class SMoLoRAOptions(MethodOptions):
    experts: int = Field(8, ge=2, description="LoRA experts per layer: the first half VU, the second IF")
    rank: int = Field(1, ge=1, description="rank of each expert (the reference: total r / experts)")
    instruction: Literal["task", "sample"] = Field("task", description="IF routing input: the task's instruction "
                                                   "embedding (task id given, reference) or each sample's question")
    init: Literal["normal", "peft"] = Field("normal", description="expert init: A ~ N(0, 0.01), B = 0 (reference) or PEFT's")

    @model_validator(mode="after")
    def _even(self):
        if self.experts % 2:
            raise ValueError(f"experts must be even (half VU, half IF), got {self.experts}")
        return self


@register
class SMoLoRA(Method):
    name = "smolora"
    Options = SMoLoRAOptions
    summary = "SMoLoRA: separable LoRA experts, a visual-understanding router and an instruction router, mixed per token."
    paper = "Wang et al., SMoLoRA: Exploring and Defying Dual Catastrophic Forgetting in Continual Visual Instruction Tuning, ICCV 2025"

    def setup(self, model, ctx: TaskContext) -> None:
        from mcit.similarity import TextEncoder

        o = self.options
        seed = stable_seed(ctx.seed, "smolora-init")
        self.bank = ExpertBank(ctx.unwrapped, o.experts, o.rank, init=o.init, seed=seed)
        self.text = TextEncoder()
        dim = self.text.model.config.hidden_size
        half = o.experts // 2
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 2)
            for layer in self.bank.layers.values():
                ref = layer.lora_A[self.bank.names[0]].weight
                layer.mcit_vu_gate = nn.Linear(layer.in_features, half, bias=False).to(ref.device, ref.dtype)
                layer.mcit_if_gate = nn.Linear(dim, half, bias=False).to(ref.device, ref.dtype)
                layer.mcit_fc_vu = nn.Linear(layer.out_features, 1, bias=False).to(ref.device, ref.dtype)
                layer.mcit_fc_if = nn.Linear(layer.out_features, 1, bias=False).to(ref.device, ref.dtype)
                for gate in (layer.mcit_vu_gate, layer.mcit_if_gate):
                    gate.weight.requires_grad_(False)  # fixed: an argmax passes no gradient
                for fc in (layer.mcit_fc_vu, layer.mcit_fc_if):
                    fc.weight.requires_grad_(True)
        self.bank.combiner = self.combine
        self.instruction: torch.Tensor | None = None  # (1 or batch, dim): the IF router's input
        self._task_vectors: dict[str, torch.Tensor] = {}
        self._ctx, self._last = ctx, None
        self.eval_mask: torch.Tensor | None = None  # the attention mask of the batch being generated from
        self.started = False  # zero-shot row: the start itself (B = 0 makes every expert zero anyway)

    # --- the instruction embedding --------------------------------------------------------------
    def task_vector(self, task: str, samples: list[Sample]) -> torch.Tensor:
        if task not in self._task_vectors:
            self._task_vectors[task] = self.text.mean([s.question for s in samples]).unsqueeze(0)
        return self._task_vectors[task]

    def before_task(self, task: str, samples: list[Sample], ctx: TaskContext) -> None:
        self.started = True
        self._ctx = ctx  # sample mode reads each training batch's samples from it
        if self.options.instruction == "task":
            self.instruction = self.task_vector(task, ctx.train_data[task])

    @property
    def task_id_at_test(self) -> bool:
        # instruction: task routes a test sample by its task's instruction, as the reference passes
        # the task index (ins_type) at evaluation: task-aware inference, reported as such
        return self.options.instruction == "task"

    def route(self, batch: dict, ctx: TaskContext) -> None:
        self.eval_mask = batch["attention_mask"]
        task = ctx.oracle_task
        if self.options.instruction == "task" and task in ctx.train_data:
            self.instruction = self.task_vector(task, ctx.train_data[task])
        else:  # sample mode, or a general task (no training data to take a task instruction from)
            self.instruction = self.text.cached([s.question for s in ctx.batch_samples])

    # --- the layer's combination ----------------------------------------------------------------
    def combine(self, layer, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if not self.started:
            return output
        half = self.options.experts // 2
        if self.options.instruction == "sample" and layer.training and self._ctx.batch_samples is not self._last:
            self._last = self._ctx.batch_samples  # once per batch, not once per layer
            self.instruction = self.text.cached([s.question for s in self._last])
        xe = x.to(layer.mcit_vu_gate.weight.dtype)
        mask = self.eval_mask
        if not layer.training and mask is not None and mask.shape[:2] == xe.shape[:2]:
            # a generation prefill: each sample's own tokens, not the batch's left padding (the
            # reference evaluates one sample at a time; this gives a batch what each alone gets)
            w = mask.to(xe.dtype).unsqueeze(-1)
            pooled = (xe * w).sum(1) / w.sum(1).clamp(min=1.0)
        else:
            pooled = xe.mean(1)
        vu_choice = layer.mcit_vu_gate(pooled).argmax(-1)  # (batch,)
        ins = self.instruction.to(xe.device, xe.dtype)
        if_choice = layer.mcit_if_gate(ins).argmax(-1).expand(x.shape[0]) + half  # (batch,)
        h_vu = self._chosen(layer, x, vu_choice)
        h_if = self._chosen(layer, x, if_choice)
        scores = torch.cat([layer.mcit_fc_vu(h_vu), layer.mcit_fc_if(h_if)], dim=-1)
        w = torch.softmax(scores, dim=-1)
        return (output + w[..., :1] * h_vu + w[..., 1:] * h_if).to(output.dtype)

    def _chosen(self, layer, x: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        """Each sample's chosen expert's output."""
        out = None
        for e in choice.unique().tolist():
            delta = self.bank.expert_delta(layer, e, x)
            mask = (choice == e).to(delta.dtype).view(-1, *([1] * (delta.dim() - 1)))
            out = delta * mask if out is None else out + delta * mask
        return out

    def report(self) -> dict:
        return {"experts": self.options.experts, "instruction": self.options.instruction}

    def state_dict(self):  # experts and fc maps are trainable; the routers are rebuilt from the seed
        return {}, {"started": self.started}

    def load_state_dict(self, tensors, meta) -> None:
        self.started = bool(meta.get("started", False))
