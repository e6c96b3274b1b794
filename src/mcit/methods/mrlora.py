"""MR-LoRA (Zhao et al., MLLM-CL, 2025): one LoRA expert per task trained in isolation, and a router
LoRA that names the task, so inference runs in two stages (route, then answer).

Experts: the :class:`~mcit.methods.experts.ExpertBank` holds one expert per stream task plus one
router expert. Task t trains only its own expert (fresh, gate = that expert alone: no earlier
expert acts, none changes). After the task, the router expert is trained anew on
``router_samples`` training samples of every task seen so far (a few-shot replay set, chosen
seeded and kept across tasks), each answering its own prompt with its task's label: the task's
1-based index as digits ("1", "2", ...), which every tokenizer has. At inference the router
expert reads the sample's prompt once, the label whose first token it rates highest among the
finished tasks' labels wins (constrained decoding), and the sample is answered by that task's
expert (a one-hot gate per sample, inside the batch). Routing accuracy per row and task goes to
``method_report``.

Sources (docs/methods.md): bjzhb666/MLLM-CL at 80bf389: ``ETrain/Eval/LLaVA/CoIN/
model_agents_select_lora.py`` (the routing prompt, greedy letter answer, ``choose_ans``),
``scripts/LLaVA/Train_dom_single/1x_*.sh`` (experts: r 128, alpha 256, lr 2e-5, 1-3 epochs, each
from the start) and ``0_train_router.sh`` (router: lr 5e-6, 40 epochs, 20 samples per task from
``task5Router_train20.json``). Departures: the reference prepends a routing instruction that
describes each expert in words and parses a free generated letter (a random expert when the
output is not a letter); we keep the sample's own prompt and choose among the finished tasks'
labels by the router's next-token scores, which needs no hand-written descriptions and cannot
produce an invalid choice. The reference trains its router once on all tasks; we retrain it after
every task on the tasks seen so far (a continual stream cannot see later tasks). Each reference
expert also trains its own projector copy; our experts share the run's projector, which
``configs/synth/mrlora.yaml`` keeps frozen (``model.train_projector: false``) so that no task
changes another's model.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Literal

import torch
from pydantic import Field

from mcit.data.format import Sample
from mcit.errors import ConfigError
from mcit.methods import register
from mcit.methods.base import Method, MethodOptions, TaskContext
from mcit.methods.experts import ExpertBank
from mcit.methods.routing import routed_to
from mcit.models.tuning import only_trainable
from mcit.utils import stable_hash, stable_seed


class MRLoRAOptions(MethodOptions):
    rank: int | None = Field(None, ge=1, description="rank of each expert and of the router (default: model.lora.r)")
    router_samples: int = Field(20, ge=1, description="training samples per task in the router's few-shot set")
    router_epochs: float = Field(40, gt=0, description="passes over the few-shot set each time the router trains")
    router_lr_scale: float = Field(0.25, gt=0, description="router lr = this x train.lr (reference: 5e-6 vs 2e-5)")
    init: Literal["normal", "peft"] = Field("peft", description="expert init: PEFT's (reference: LLaVA's LoRA) or N(0, 0.01)")


def task_label(index: int) -> str:
    """The router's answer for the task at 0-based ``index``: its 1-based number."""
    return str(index + 1)


def label_tokens(tokenizer, labels: list[str]) -> tuple[list[int], torch.Tensor]:
    """(the token ids every label starts with, each label's first token after them), encoded as the
    encoder encodes a training answer (a leading space: a SentencePiece or byte-level BPE tokenizer
    gives "1" and " 1" different ids)."""
    ids = [tokenizer(" " + label, add_special_tokens=False)["input_ids"] for label in labels]
    common = 0
    while all(len(i) > common + 1 for i in ids) and len({i[common] for i in ids}) == 1:
        common += 1
    nexts = [i[common] if len(i) > common else None for i in ids]
    if None in nexts or len(set(nexts)) != len(nexts):
        raise ConfigError(f"method.name: mrlora: the tokenizer does not tell the task labels {labels} apart by one "
                          f"token after their shared start ({ids})")
    return ids[0][:common], torch.tensor(nexts)


@register
class MRLoRA(Method):
    name = "mrlora"
    Options = MRLoRAOptions
    summary = "MR-LoRA: a LoRA expert per task trained alone; a router LoRA names the task, then its expert answers."
    paper = "Zhao et al., MLLM-CL: Continual Learning for Multimodal Large Language Models (MR-LoRA), arXiv 2506.05453"

    def __init__(self, options: MRLoRAOptions):
        super().__init__(options)
        self.done = 0
        self.router_steps: list[int] = []

    def setup(self, model, ctx: TaskContext) -> None:
        self.n_tasks = len(ctx.tasks)
        seed = stable_seed(ctx.seed, "mrlora-init")
        self.bank = ExpertBank(ctx.unwrapped, self.n_tasks + 1, self.options.rank, init=self.options.init, seed=seed)
        self.router = self.n_tasks
        self.bank.use([])
        self.encoder = ctx.encoder
        self.common, self.label_tokens = label_tokens(self.encoder.tokenizer, [task_label(i) for i in range(self.n_tasks)])
        self._seed = ctx.run_seed

    def before_task(self, task: str, samples: list[Sample], ctx: TaskContext) -> None:
        e = ctx.stage - 1
        self.bank.train_only([e])  # the router and the other tasks' experts, later ones included, frozen
        self.bank.use(e)

    def before_step(self, ctx: TaskContext) -> None:
        self.bank.drop_frozen_grads()

    # --- the router -----------------------------------------------------------------------------
    def router_set(self, ctx: TaskContext) -> list[Sample]:
        """The few-shot set: ``router_samples`` seeded samples of every finished task, labelled."""
        out = []
        for i, task in enumerate(ctx.tasks[: self.done]):
            data = ctx.train_data[task]
            pick = random.Random(int(stable_hash([self._seed, task, "mrlora-router"]), 16)).sample(
                range(len(data)), min(self.options.router_samples, len(data)))
            label = task_label(i)
            out.extend(dataclasses.replace(data[j], answer=label, references=[label]) for j in sorted(pick))
        return out

    def train_router(self, ctx: TaskContext) -> int:
        from mcit.train import train_stage

        samples = self.router_set(ctx)
        cfg = ctx.config.train
        optim = cfg.model_copy(update={"lr": cfg.lr * self.options.router_lr_scale, "epochs": self.options.router_epochs,
                                       "projector_lr": None})
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # trained anew each time, seeded
            torch.manual_seed(stable_seed(self._seed, self.done, "mrlora-router-init"))
            for layer in self.bank.layers.values():
                name = self.bank.names[self.router]
                layer.reset_lora_parameters(name, True)
        # only the router expert may change: every other parameter is held for the router's stage
        self.bank.use(self.router)
        with only_trainable(ctx.unwrapped, self.bank.expert_parameters(self.router)):
            stats = train_stage(ctx.model, self.encoder, samples, optim, ctx.accelerator,
                                stable_seed(self._seed, self.done, "mrlora-router"),
                                desc=f"router after task {self.done}", show_progress=False)
        return stats.steps

    def after_task(self, task: str, ctx: TaskContext) -> None:
        self.done = ctx.stage
        self.router_steps.append(self.train_router(ctx))
        self.bank.use([])

    @torch.no_grad()
    def choose(self, batch: dict, model) -> torch.Tensor:
        """Each sample's task (0-based): the router reads the prompt (and the labels' shared leading
        tokens, if any) and the finished task whose label's next token it rates highest wins."""
        self.bank.use(self.router)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        # the image inputs as they are; per-token inputs (Qwen2-VL's mm_token_type_ids) follow the ids
        rest = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels")}
        if self.common:  # left-padded prompts: the shared tokens go at the end of every row
            extra = torch.tensor(self.common, dtype=ids.dtype, device=ids.device).expand(ids.shape[0], -1)
            ids, mask = torch.cat([ids, extra], 1), torch.cat([mask, torch.ones_like(extra)], 1)
            rest = {k: torch.cat([v, torch.zeros_like(extra)], 1) if k.endswith("token_type_ids") else v
                    for k, v in rest.items()}
        logits = model(input_ids=ids, attention_mask=mask, **rest).logits[:, -1, :]
        labels = self.label_tokens[: self.done].to(logits.device)
        return logits[:, labels].argmax(-1)

    def route(self, batch: dict, ctx: TaskContext) -> torch.Tensor | None:
        if self.done == 0:
            self.bank.use([])
            return None
        choice = self.choose(batch, ctx.unwrapped)
        self.bank.route(torch.nn.functional.one_hot(choice, self.bank.n).float())
        return routed_to(choice, [t if t < self.done else -1 for t in range(len(ctx.tasks))])

    def report(self) -> dict:
        return {"tasks_done": self.done, "router_steps": self.router_steps}

    def state_dict(self):  # experts and router are trainable parameters: in the per-task checkpoint
        return {}, {"done": self.done, "router_steps": self.router_steps}

    def load_state_dict(self, tensors, meta) -> None:
        self.done = int(meta.get("done", 0))
        self.router_steps = list(meta.get("router_steps", []))
