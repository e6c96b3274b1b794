"""HiDe-LLaVA (Guo et al., ACL 2025): per-task LoRA experts, the top layer's combined per sample by
similarity to each task's image and text anchors, the other layers' merged; and the shared base of
the anchor-routed expert methods (DISCO in :mod:`disco`).

Training, task t: every LoRA layer runs the task's own expert alone (fresh; the others neither act
nor change). After the task its anchors are the mean frozen features of its training samples:
image, the start's vision tower pooled (the reference: CLIP ViT-L/14-336 image embeddings); text,
the offline sentence encoder all-MiniLM-L6-v2 on the question (the reference: the CLIP text
tower's pooled output of the question). Inference, with t tasks finished:

- the top ``top_layers`` decoder layers (the reference: the last one): Σ_i w_i ΔW_i x with
  w = softmax(s / ``temperature``) over all the stream's tasks, s_i = ½(cos(image, anchor_i) +
  cos(text, anchor_i)) (``modalities``), s = 0 for tasks not trained yet (their experts are zero);
- every other layer: the finished experts merged, by default as the reference code does,
  scaling · (Σ_i B_i)(Σ_i A_i) (``merge: sum_product``; cross terms included), or the mean of the
  task updates (``merge: mean``, the "uniform merge" of the paper's summaries).

Sources (docs/methods.md): MCITlib at 2956dfd ``HiDe/HiDe/peft/tuners/clitmoelora.py``
(``HiDeMOELoraLinear``: the merged sums, ``layer != 31`` routed), ``HiDe/llava/model/llava_arch.py``
(anchors as running means, softmax(s / 0.1)), ``HiDe/llava/train/train_MOE.py``,
``HiDe/configs/model_configs/LLaVA/UCIT/train/task*.json`` (rank 96 over 6 experts, lr 2e-4, one
epoch, alpha 2 x rank); the authors' Ghy0501/HiDe-LLaVA at 4dd0793 (same algorithm; r 48 / 6).
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import Field

from mcit.data.format import Sample
from mcit.methods import register
from mcit.methods.base import Method, MethodOptions, TaskContext
from mcit.methods.experts import ExpertBank
from mcit.methods.routing import routed_to
from mcit.utils import stable_seed

_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


class AnchoredOptions(MethodOptions):
    rank: int | None = Field(None, ge=1, description="rank of each task's expert (default: model.lora.r)")
    temperature: float = Field(0.1, gt=0, description="softmax temperature of the anchor similarities")
    modalities: Literal["both", "text", "image"] = Field("both", description="anchor similarities used: mean of image and text, or one")
    anchor_samples: int | None = Field(None, ge=1, description="training samples per task averaged into its anchors (null: all)")
    init: Literal["normal", "peft"] = Field("normal", description="expert init: A ~ N(0, 0.01), B = 0 (reference) or PEFT's")


class AnchoredExperts(Method):
    """Per-task experts trained alone; per-sample soft routing by anchor similarity at inference."""

    Options = AnchoredOptions

    def __init__(self, options):
        super().__init__(options)
        self.done = 0

    def setup(self, model, ctx: TaskContext) -> None:
        from mcit.methods.query import FrozenQueries
        from mcit.similarity import TextEncoder

        self.n_tasks = len(ctx.tasks)
        seed = stable_seed(ctx.seed, self.name, "init")
        self.bank = ExpertBank(ctx.unwrapped, self.n_tasks, self.options.rank, init=self.options.init, seed=seed)
        self.bank.use([])
        self.encoder = ctx.encoder
        self.queries = FrozenQueries(ctx.unwrapped, self.encoder)
        self.text = TextEncoder()
        self._seed = ctx.run_seed
        self.image_anchor: torch.Tensor | None = None
        self.text_anchor: torch.Tensor | None = None

    def set_inference(self) -> None:
        """The gates for inference after ``done`` tasks (merged layers; routing is per batch)."""

    # --- training ------------------------------------------------------------------------------
    def before_task(self, task: str, samples: list[Sample], ctx: TaskContext) -> None:
        e = ctx.stage - 1
        self.bank.train_only([e])
        self.bank.merge_layers([], [])
        self.bank.use(e)

    def before_step(self, ctx: TaskContext) -> None:
        self.bank.drop_frozen_grads()

    def after_task(self, task: str, ctx: TaskContext) -> None:
        from mcit.similarity import image_features, sample_for_similarity

        e = ctx.stage - 1
        data = ctx.train_data[task]
        if self.options.anchor_samples is not None:
            data = sample_for_similarity(data, self.options.anchor_samples, self._seed, task)
        image = image_features(ctx.unwrapped, self.encoder, data).mean(0)
        text = self.text.mean([s.question for s in data])
        if self.image_anchor is None:
            self.image_anchor = torch.zeros(self.n_tasks, image.shape[0])
            self.text_anchor = torch.zeros(self.n_tasks, text.shape[0])
        self.image_anchor[e], self.text_anchor[e] = image, text
        self.done = ctx.stage
        self.bank.train_only([])
        self.set_inference()

    # --- inference -----------------------------------------------------------------------------
    def similarities(self, batch: dict, samples: list[Sample]) -> torch.Tensor:
        """(batch, tasks): s per sample and stream task; 0 for tasks not finished."""
        cos = torch.nn.functional.cosine_similarity
        parts = []
        if self.options.modalities in ("both", "image"):
            image_q, _ = self.queries(batch["input_ids"], batch["attention_mask"], self.queries.images(batch))
            parts.append(cos(image_q.float().cpu().unsqueeze(1), self.image_anchor.unsqueeze(0), dim=-1))
        if self.options.modalities in ("both", "text"):
            text_q = self.text.cached([s.question for s in samples])
            parts.append(cos(text_q.unsqueeze(1), self.text_anchor.unsqueeze(0), dim=-1))
        s = torch.stack(parts).mean(0)
        s[:, self.done :] = 0.0
        return s

    def route(self, batch: dict, ctx: TaskContext) -> torch.Tensor | None:
        if self.done == 0:
            return None
        s = self.similarities(batch, ctx.batch_samples)
        weights = torch.softmax(s / self.options.temperature, dim=-1)
        self.bank.route(weights.to(batch["input_ids"].device))
        # routing is scored by the most similar task (expert t is task t's)
        owner = [t if t < self.done else -1 for t in range(len(ctx.tasks))]
        return routed_to(s[:, : self.done].argmax(-1), owner)

    def report(self) -> dict:
        return {"tasks_done": self.done}

    def state_dict(self):  # the experts are trainable parameters: in the per-task checkpoint
        tensors = {} if self.image_anchor is None else {"image_anchor": self.image_anchor, "text_anchor": self.text_anchor}
        return tensors, {"done": self.done}

    def load_state_dict(self, tensors, meta) -> None:
        self.done = int(meta.get("done", 0))
        if "image_anchor" in tensors:
            self.image_anchor, self.text_anchor = tensors["image_anchor"], tensors["text_anchor"]
        self.bank.train_only([])
        if self.done:
            self.set_inference()


class HiDeOptions(AnchoredOptions):
    top_layers: int = Field(1, ge=1, description="decoder layers at the top whose experts are routed per sample")
    merge: Literal["sum_product", "mean"] = Field("sum_product", description="the other layers: (ΣB)(ΣA) as the "
                                                  "reference code, or the mean of the task updates")


def top_layer_names(bank: ExpertBank, top: int) -> list[str]:
    """The LoRA layers in the last ``top`` decoder layers (by the ``.layers.N.`` index in their names)."""
    index = {n: int(m.group(1)) for n in bank.layers if (m := _LAYER_INDEX.search(n))}
    if not index:
        return list(bank.layers)
    last = max(index.values())
    return [n for n, i in index.items() if i > last - top]


@register
class HiDe(AnchoredExperts):
    name = "hide"
    Options = HiDeOptions
    summary = "HiDe-LLaVA: per-task LoRA experts; the top layer mixes them by image/text anchor similarity, the rest merged."
    paper = "Guo et al., HiDe-LLaVA: Hierarchical Decoupling for Continual Instruction Tuning of MLLMs, ACL 2025"

    def setup(self, model, ctx: TaskContext) -> None:
        super().setup(model, ctx)
        self.top = top_layer_names(self.bank, self.options.top_layers)

    def set_inference(self) -> None:
        lower = [n for n in self.bank.layers if n not in self.top]
        self.bank.merge_layers(lower, list(range(self.done)), self.options.merge)
        self.bank.use(list(range(self.done)))  # until a batch is routed: the sum, as the merged layers
