"""ModalPrompt (Zeng et al., arXiv 2410.05849): one prompt per task on the frozen MLLM, chosen at
inference by the similarity of the sample's image and text to each task's learned prototypes.

Built on the prompt pool's placeholder mechanism (:mod:`prompt`): the pool holds one entry of
``length`` prompt tokens per stream task, inserted after <s>. Each task t also owns two small
heads, MLP(d → d → SiLU → d_image) and MLP(d → d → SiLU → d), and its prototypes are the mean of
the heads over its prompt tokens: p_t = mean_j head_t(prompt_t,j), one in the image-feature
space and one in the text-feature space. Training task t always inserts prompt t (no selection)
and adds (1 - mean_b cos(image_b, p_t^image)) + (1 - mean_b cos(text_b, p_t^text)) to the loss,
so the prototypes move toward the task's inputs; only prompt t and its heads receive gradients.
At inference a sample takes the finished task with the highest
0.5·cos(image, p^image) + 0.5·cos(text, p^text) (top 1, no fusion). The features are the frozen
model's own (:mod:`query`: the vision tower's pooled output; the mean input embedding of the
instruction), where the reference uses the CLIP vision tower's projected image embedding and the
CLIP text tower's pooled output of the question, and its heads map both into one 768-d space.

Sources (docs/methods.md): MCITlib at 2956dfd ``ModalPrompt/llava/model/language_model/
ModalPrompt.py`` (class ``ModalPrompt``: prompt tokens per task, ``prompt_transform`` heads,
selection with λ = 0.5, ``transfer_num`` 1), ``llava/model/llava_arch.py``,
``llava/train/llava_trainer.py``, ``scripts/ModalPrompt/Train_UCIT/Task*.sh`` and
``configs/model_configs/LLaVA/UCIT/train/*.json`` (length 10, 10 epochs, lr 2e-4).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from mcit.errors import ConfigError
from mcit.methods import register
from mcit.methods.base import TaskContext
from mcit.methods.prompt import PromptPoolMethod, PromptPoolOptions
from mcit.models.families import unwrap

HEADS_ATTR = "mcit_modal_heads"


class ModalPromptOptions(PromptPoolOptions):
    length: int = Field(10, ge=1, description="prompt tokens per task (reference: 10 on UCIT)")
    pool_size: int = Field(1, ge=1, description="ignored: one entry per stream task")
    top_k: int = Field(1, ge=1, le=1, description="prompts inserted per sample (reference: 1)")
    key_weight: float = Field(1.0, ge=0, description="weight of the two prototype losses (reference: 1)")
    similarity_weight: float = Field(0.5, ge=0, le=1, description="λ: s = λ cos(image) + (1 - λ) cos(text)")


def _head(d: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, out))


@register
class ModalPrompt(PromptPoolMethod):
    name = "modalprompt"
    Options = ModalPromptOptions
    summary = "ModalPrompt: a prompt per task on the frozen model, chosen by image and text similarity to learned task prototypes."
    paper = "Zeng et al., ModalPrompt: Dual-Modality Guided Prompt for Continual Learning of Large Multimodal Models, arXiv 2410.05849"

    def setup(self, model, ctx: TaskContext) -> None:
        if ctx.config is not None and ctx.config.train.weight_decay:
            raise ConfigError("train.weight_decay: modalprompt keeps finished tasks' prompts fixed only without "
                              "weight decay (all prompts are one tensor; AdamW would shrink the old rows); set 0")
        self.options = self.options.model_copy(update={"pool_size": len(ctx.tasks), "top_k": 1, "diversity": False,
                                                       "batchwise": False, "key_fit": "loss"})
        super().setup(model, ctx)
        base = unwrap(ctx.unwrapped)
        embed = base.get_input_embeddings()
        d, d_image = embed.weight.shape[1], self._queries.dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed * 7919 + 29)
            heads = nn.ModuleList(nn.ModuleDict({"image": _head(d, d_image), "text": _head(d, d)}) for _ in ctx.tasks)
        self.heads = heads.to(embed.weight.device, embed.weight.dtype)
        base.add_module(HEADS_ATTR, self.heads)
        for p in self.heads.parameters():
            p.requires_grad_(True)
        for p in (self.pool.image_keys, self.pool.text_keys):
            p.requires_grad_(False)  # the prototypes come from the heads; the pool's keys are unused
        self.current: int | None = None
        self.done = 0

    def prototypes(self, entries: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, text) prototypes of ``entries``: the mean of each task's heads over its prompt tokens."""
        image = torch.stack([self.heads[e]["image"](self.pool.prompts[e]).mean(0) for e in entries])
        text = torch.stack([self.heads[e]["text"](self.pool.prompts[e]).mean(0) for e in entries])
        return image, text

    def select(self, image_q: torch.Tensor, text_q: torch.Tensor, diversify: bool = False) -> torch.Tensor:
        batch = image_q.shape[0]
        if torch.is_grad_enabled() and self.current is not None:  # training: the task's own prompt
            return torch.full((batch, 1), self.current, dtype=torch.long, device=image_q.device)
        if self.done == 0:  # the zero-shot row: the first (untrained) prompt, as the pool's untrained entries
            return torch.zeros((batch, 1), dtype=torch.long, device=image_q.device)
        with torch.no_grad():
            image_p, text_p = self.prototypes(list(range(self.done)))
            cos = nn.functional.cosine_similarity
            lam = self.options.similarity_weight
            s = (lam * cos(image_q.unsqueeze(1).float(), image_p.unsqueeze(0).float(), dim=-1)
                 + (1 - lam) * cos(text_q.unsqueeze(1).float(), text_p.unsqueeze(0).float(), dim=-1))
        return s.argmax(-1, keepdim=True)

    def key_loss(self, chosen: torch.Tensor, image_q: torch.Tensor, text_q: torch.Tensor) -> torch.Tensor:
        image_p, text_p = self.prototypes([self.current])
        cos = nn.functional.cosine_similarity
        return (1 - cos(image_q, image_p.to(image_q.dtype), dim=-1).mean()) + (1 - cos(text_q, text_p.to(text_q.dtype), dim=-1).mean())

    def before_task(self, task, samples, ctx: TaskContext) -> None:
        super().before_task(task, samples, ctx)
        self.current = ctx.stage - 1

    def after_task(self, task, ctx: TaskContext) -> None:
        super().after_task(task, ctx)
        self.current = None
        self.done = ctx.stage

    def state_dict(self):
        tensors, meta = super().state_dict()
        return tensors, {**meta, "done": self.done}

    def load_state_dict(self, tensors, meta) -> None:
        super().load_state_dict(tensors, meta)
        self.done = int(meta.get("done", 0))
