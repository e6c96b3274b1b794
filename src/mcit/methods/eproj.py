"""EProj: per-task projector experts with key routing (He et al., seed 001), and ``eproj_sim``,
its similarity-informed expansion (our reading of the abstract).

At setup the vision-language projector becomes a bank of experts, each a copy of the starting
model's projector, with an image key and an instruction key; everything else is frozen. Each
task trains its expert (all its samples are routed to it). After the task a short key phase
pulls the expert's keys toward the task's frozen, normalised query features (:mod:`query`)
with a (1 - cos) loss. At inference every sample of a batch is routed to the expert whose keys
match it best (cos(image) + cos(instruction)). Each expert may hold several keys per modality
(``keys``, our extension; 1 = the paper's single key): the pull loss then draws each query to
its nearest key, k-means fashion, and an expert scores by its best-matching key, so a task
asked in several phrasings is matched by each of them; routing accuracy per task and row goes to
results.json (``method_report``). ``eproj_sim`` reuses the expert of the most similar finished
task (:mod:`mcit.similarity`) when that similarity exceeds ``threshold``, and reports how many
experts it created. The bank holds one slot per stream task, so checkpoints always fit.
"""

from __future__ import annotations

import copy

import torch
from pydantic import Field
from torch import nn

from mcit.data.format import Sample
from mcit.errors import McitError
from mcit.methods import register
from mcit.methods.base import Method, MethodOptions, TaskContext
from mcit.methods.query import FrozenQueries, key_scores, pull_keys
from mcit.methods.routing import routed_to
from mcit.models.tuning import llava_parts


class ProjectorExperts(nn.Module):
    """Experts of the projector; ``route`` (one expert per sample) or else ``current`` picks them."""

    def __init__(self, projector: nn.Module, n: int, d_image: int, d_text: int, keys: int = 1):
        super().__init__()
        self.experts = nn.ModuleList(copy.deepcopy(projector) for _ in range(n))
        ref = next(projector.parameters())
        self.image_keys = nn.Parameter(torch.zeros(n, keys, d_image, dtype=ref.dtype, device=ref.device))
        self.text_keys = nn.Parameter(torch.zeros(n, keys, d_text, dtype=ref.dtype, device=ref.device))
        self.current = 0
        self.route: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route, self.route = self.route, None
        if route is None:
            return self.experts[self.current](x)
        if route.shape[0] != x.shape[0]:
            raise McitError(f"expert routing: {route.shape[0]} choices for a batch of {x.shape[0]} images")
        out = None
        for e in route.unique().tolist():
            idx = (route == e).nonzero().squeeze(1)
            y = self.experts[e](x[idx])
            if out is None:
                out = y.new_zeros((x.shape[0], *y.shape[1:]))
            out[idx] = y
        return out


class EProjOptions(MethodOptions):
    key_samples: int = Field(500, ge=1, description="training samples whose queries the keys are pulled toward")
    key_steps: int = Field(100, ge=1, description="most rounds of the key phase (it stops when the keys settle)")
    keys: int = Field(4, ge=1, description="keys per expert and modality (1 = the paper's single key); "
                                           "each query is pulled to its nearest, an expert scores by its best")


@register
class EProj(Method):
    name = "eproj"
    Options = EProjOptions
    summary = "EProj: one projector expert per task (everything else frozen), chosen per sample by key matching."
    paper = "He et al., Continual Instruction Tuning for Large Multimodal Models, arXiv 2311.16206"

    def __init__(self, options):
        super().__init__(options)
        self.expert_of: dict[str, int] = {}
        self.n_used = 0

    def setup(self, model, ctx: TaskContext) -> None:
        base, tower, embed = llava_parts(ctx.unwrapped)
        inner = base.model
        for p in base.parameters():
            p.requires_grad_(False)
        self.bank = ProjectorExperts(inner.multi_modal_projector, len(ctx.tasks), tower.config.hidden_size,
                                     embed.weight.shape[1], self.options.keys)
        inner.multi_modal_projector = self.bank
        for p in self.bank.parameters():
            p.requires_grad_(True)  # experts without a gradient this task (p.grad None) are not stepped
        self.bank.image_keys.requires_grad_(False)  # keys move only in the key phase
        self.bank.text_keys.requires_grad_(False)
        self.encoder = ctx.encoder
        self.queries = FrozenQueries(ctx.unwrapped, self.encoder)

    # --- which expert a task trains ------------------------------------------------------------
    def choose_expert(self, task: str, ctx: TaskContext) -> int:
        self.n_used += 1
        return self.n_used - 1

    def before_task(self, task: str, samples: list[Sample], ctx: TaskContext) -> None:
        if task not in self.expert_of:
            self.expert_of[task] = self.choose_expert(task, ctx)
        self.bank.current = self.expert_of[task]

    def after_task(self, task: str, ctx: TaskContext) -> None:
        e = self.expert_of[task]
        owners = [t for t, x in self.expert_of.items() if x == e]  # a reused expert keys on all its tasks
        samples = [s for t in owners for s in self._sample(ctx.train_data[t], ctx, t)]
        image_q, text_q = self.queries.batched(samples, self.encoder, self.bank.image_keys.device)
        self.fit_keys(e, image_q, text_q)

    def fit_keys(self, e: int, image_q: torch.Tensor, text_q: torch.Tensor) -> None:
        """The key phase: per modality, the keys that minimise the pull loss
        mean over queries of (1 - cos(query, its nearest key)), found exactly by alternating the
        two steps that each lower it (spherical k-means): assign every query to its nearest key,
        then set each key to the mean direction of its queries, until no assignment changes or
        ``key_steps`` rounds. With one key that is the queries' mean direction, in one round.
        (Gradient steps on the same loss wander off an optimum where the queries are all alike,
        as a tiny vision tower's pooled features are: Adam rescales float noise to full steps.)"""
        with torch.no_grad():
            self.bank.image_keys[e] = pull_keys(image_q, self.options.keys, self.options.key_steps)
            self.bank.text_keys[e] = pull_keys(text_q, self.options.keys, self.options.key_steps)

    def _sample(self, data: list[Sample], ctx: TaskContext, task: str) -> list[Sample]:
        from mcit.similarity import sample_for_similarity

        return sample_for_similarity(data, self.options.key_samples, ctx.run_seed, task)

    # --- inference ---------------------------------------------------------------------------
    def route(self, batch: dict, ctx: TaskContext) -> torch.Tensor | None:
        if self.n_used == 0:
            self.bank.route = torch.zeros(batch["input_ids"].shape[0], dtype=torch.long,
                                          device=batch["input_ids"].device)  # zero-shot: the base projector
            return None
        image_q, text_q = self.queries(batch["input_ids"], batch["attention_mask"], self.queries.images(batch))
        scores = key_scores(image_q, text_q, self.bank.image_keys[: self.n_used], self.bank.text_keys[: self.n_used])
        choice = scores.argmax(-1)
        self.bank.route = choice
        return None if ctx is None else routed_to(choice, [self.expert_of.get(t, -1) for t in ctx.tasks])

    def report(self) -> dict:
        return {
            "experts_created": self.n_used,
            "expert_of_task": dict(self.expert_of),
        }

    # --- checkpoints -------------------------------------------------------------------------
    def state_dict(self):
        keys = {"image_keys": self.bank.image_keys.detach(), "text_keys": self.bank.text_keys.detach()}
        return keys, {"expert_of": self.expert_of, "n_used": self.n_used}

    def load_state_dict(self, tensors, meta) -> None:
        with torch.no_grad():  # the experts themselves come back with the model's trainable weights
            self.bank.image_keys.copy_(tensors["image_keys"])
            self.bank.text_keys.copy_(tensors["text_keys"])
        self.expert_of = dict(meta.get("expert_of", {}))
        self.n_used = int(meta.get("n_used", 0))


class EProjSimOptions(EProjOptions):
    threshold: float = Field(0.5, gt=0, lt=1, description="reuse the most similar task's expert above this similarity")
    similarity_samples: int = Field(1000, ge=1, description="training samples per task embedded for the similarity")


@register
class EProjSim(EProj):
    name = "eproj_sim"
    Options = EProjSimOptions
    summary = "EProj with similarity-informed expansion: reuse the most similar task's expert above a threshold."
    paper = "He et al., Continual Instruction Tuning for Large Multimodal Models, arXiv 2311.16206 (our reading)"

    def __init__(self, options):
        super().__init__(options)
        self.similarities: dict[str, dict[str, float]] = {}
        self._embeddings = None

    def choose_expert(self, task: str, ctx: TaskContext) -> int:
        done = list(self.expert_of)
        if not done:
            return super().choose_expert(task, ctx)
        from mcit.similarity import for_run, similarity_to_finished

        if self._embeddings is None:
            self._embeddings = for_run(ctx, self.options.similarity_samples)
        row = similarity_to_finished(self._embeddings, done, task, ctx)
        self.similarities[task] = {t: round(s, 4) for t, s in zip(done, row, strict=True)}
        best = max(range(len(row)), key=row.__getitem__)
        if row[best] > self.options.threshold:
            return self.expert_of[done[best]]
        return super().choose_expert(task, ctx)

    def report(self) -> dict:
        return {**super().report(), "similarities": self.similarities}

    def state_dict(self):
        tensors, meta = super().state_dict()
        return tensors, {**meta, "similarities": self.similarities}

    def load_state_dict(self, tensors, meta) -> None:
        super().load_state_dict(tensors, meta)
        self.similarities = dict(meta.get("similarities", {}))
