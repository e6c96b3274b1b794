"""Prompt-pool methods on a frozen MLLM: ``prompt_pool`` (L2P-style) and ``fwd_prompt``
(Zheng et al., arXiv 2401.09181; our reconstruction, see docs/methods below).

The pool has ``pool_size`` entries, each an image key (vision width), a text key and a prompt
value (``length`` x the language model's width). For every sample, a frozen query is formed
from its image (the vision tower's pooled feature) and its instruction (mean input embedding
of its text tokens); the ``top_k`` entries with the highest cos(image) + cos(text) are
selected and their prompts replace ``top_k x length`` placeholder positions right after <s>
(the encoder's ``prefix_tokens``), so training, batched generation and the KV cache all see an
ordinary, longer prompt. With ``depth`` n > 1 (deep prompts, as in P-tuning v2 / VPT-deep),
each entry also holds prompts for the inputs of decoder layers 1..n-1, which overwrite the same
placeholder columns of those layers' hidden states in a prefill (decoding steps read them from
the KV cache). A key-matching loss (1 - cos) pulls the selected keys toward their
queries (a training sample's query leaves its answer out: generation has none). While training,
selection is L2P's batch-wise one (``batchwise``: the whole batch takes the ``top_k`` entries its
samples selected most) and diversified one (``diversity``): entries that earlier tasks selected
look farther away and unused entries come first, so each task trains entries of its own and
keys them to its queries. ``key_fit: exact`` then sets those entries' keys to the key loss's
exact minimiser over the task's queries (spherical k-means with ``keys`` per entry). Only the pool trains; the MLLM is frozen; no replay.

``fwd_prompt`` adds gradient projection on the prompt values (GPM-style, in the language
model's input-embedding space of width d):

- after each task, the input embeddings of ``basis_samples`` of its training samples (text and
  image tokens, placeholders excluded) extend an orthonormal old-task basis U_old until it
  captures ``energy`` of their squared norm; with ``balance`` the image-token rows and the
  text-token rows each reach ``energy`` of their own norm (in the tiny model image-token
  embeddings are ~80x the norm of text ones, so unbalanced, 2-3 image directions capture 95%
  and no task's text subspace enters the basis; balanced, the projection constrains the
  prompts, which on the embedded stream cost more plasticity than it saved: off by default);
- once, before the first task, U_pre spans the base model's input embeddings on its
  pre-training mix (``pretrained_energy``);
- each step, g_res = g - g U_old U_oldᵀ (``residual``), then
  g' = P_old⊥(g_res + ``pretrained`` · g_res U_pre U_preᵀ): the pre-trained component of the
  residual is reinforced, and the result is projected off U_old again so that it stays
  orthogonal to every old task's subspace.

With deep prompts each prompted layer input has its own U_old and U_pre, built the same way from
that layer's input hidden states (GPM's per-layer bases), and each layer's prompts are projected
with them.

The residual projection protects an old task only through entries its samples still select.
With diversified selection (the default) each task trains entries of its own, so there is
little for it to protect; with ``diversity: false`` every task trains the same entries, and
there balanced bases halve the forgetting (configs/synth/broad_start/shared/, README).

The public record confirms the two projections and the pool; the energy criterion, the
weighting, the re-projection and the deep prompts are our reconstruction.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from mcit.data.format import Sample
from mcit.errors import ConfigError, McitError
from mcit.methods import register
from mcit.methods.base import Method, MethodOptions, TaskContext
from mcit.methods.query import FrozenQueries, key_scores, pull_keys
from mcit.methods.routing import RoutingTally
from mcit.models.encode import IGNORE_INDEX
from mcit.models.tuning import llava_parts

POOL_ATTR = "mcit_prompt_pool"  # the pool's name inside the model: its parameters checkpoint with the model's


class PromptPoolOptions(MethodOptions):
    pool_size: int = Field(10, ge=1, description="entries in the pool")
    length: int = Field(4, ge=1, description="prompt tokens per entry")
    top_k: int = Field(2, ge=1, description="entries selected per sample")
    key_weight: float = Field(0.5, ge=0, description="weight of the key-matching loss (1 - cos)")
    init_std: float | None = Field(None, gt=0, description="prompt init std (default: the token embeddings' std)")
    diversity: bool = Field(True, description="L2P's diversified selection while training: each entry's match "
                                              "distance times its share of earlier tasks' selections")
    batchwise: bool = Field(True, description="L2P's batch-wise selection while training: the whole batch takes "
                                              "the top_k entries its samples selected most, so a task trains the "
                                              "entries its queries select together at test time")
    keys: int = Field(1, ge=1, description="keys per entry and modality; an entry scores by its best-matching key")
    key_fit: Literal["loss", "exact"] = Field(
        "loss", description="loss: the key-matching loss trains the selected keys by gradient (L2P); exact: as loss "
        "while a task trains, then the keys of the top_k entries it selected most (unless an earlier task keyed "
        "them) are set to minimise that loss over its queries exactly (spherical k-means, as eproj's key phase)"
    )
    key_samples: int = Field(500, ge=1, description="training samples of a task whose queries an exact key fit uses")
    depth: int = Field(1, ge=1, description="language-model layers whose input carries the prompts: 1 = the input "
                                            "embeddings only; n > 1 also gives each of the first n-1 decoder layers "
                                            "after the embeddings prompts of their own (deep prompts)")

    @model_validator(mode="after")
    def _k(self):
        if self.top_k > self.pool_size:
            raise ValueError(f"top_k ({self.top_k}) must not exceed pool_size ({self.pool_size})")
        return self


class PromptPool(nn.Module):
    def __init__(self, size: int, length: int, d_text: int, d_image: int, std: float, generator: torch.Generator,
                 depth: int = 1, keys: int = 1):
        super().__init__()
        shape = (size,) if keys == 1 else (size, keys)  # one key per entry keeps the earlier (size, d) layout
        self.prompts = nn.Parameter(torch.randn(size, length, d_text, generator=generator) * std)
        self.text_keys = nn.Parameter(torch.randn(*shape, d_text, generator=generator))
        self.image_keys = nn.Parameter(torch.randn(*shape, d_image, generator=generator))
        # Deep prompts: entry x decoder layer 1..depth-1 x length x d (drawn after the keys, so
        # depth 1 keeps the pool of earlier versions bit for bit).
        self.layer_prompts = (
            nn.Parameter(torch.randn(size, depth - 1, length, d_text, generator=generator) * std) if depth > 1 else None
        )

    def values(self, layer: int) -> torch.Tensor:
        """The prompts (entries x length x d) placed at the input of language-model layer ``layer``
        (0 = the input embeddings)."""
        return self.prompts if layer == 0 else self.layer_prompts[:, layer - 1]


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass early."""


@register
class PromptPoolMethod(Method):
    name = "prompt_pool"
    Options = PromptPoolOptions
    summary = "L2P-style multimodal prompt pool on a frozen MLLM: key-matched prompts prepended to the input."
    paper = "Wang et al., Learning to Prompt (L2P), CVPR 2022; the baseline of Fwd-Prompt"

    def __init__(self, options: PromptPoolOptions):
        super().__init__(options)
        self.pool: PromptPool | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (selected entries B x k, placeholder cols B x P)
        self._key_loss: torch.Tensor | None = None
        self._routed: torch.Tensor | None = None  # the selection route() made for the next generation batch
        self._labels: torch.Tensor | None = None  # the labels of the forward in progress (answer positions)
        self.last_selection: torch.Tensor | None = None  # for tests and routing statistics
        self.usage: torch.Tensor | None = None  # selections per entry while training finished tasks
        self.usage_by_task: dict[str, list[int]] = {}
        self._task_usage: torch.Tensor | None = None
        self._deep: tuple[torch.Tensor, torch.Tensor] | None = None  # (chosen, cols) for the deep layers' hooks
        self.entries_of: dict[str, list[int]] = {}  # task -> the top_k entries it selected most while training
        self.keyed: list[int] = []  # entries whose keys an exact fit has set (never refitted)
        self.routing = RoutingTally()  # per row and task: samples that select only their task's own entries

    # --- setup: freeze, add the pool, hook the model ------------------------------------------
    @property
    def n_prefix(self) -> int:
        return self.options.top_k * self.options.length

    def setup(self, model, ctx: TaskContext) -> None:
        base, tower, embed = llava_parts(ctx.unwrapped)
        layers = self.decoder_layers(ctx) if self.options.depth > 1 else None
        if layers is not None and self.options.depth > len(layers):
            raise ConfigError(f"method.depth: {self.options.depth} exceeds the language model's {len(layers)} layers "
                              f"(prompted inputs: the embeddings and decoder layers 1..{len(layers) - 1})")
        for p in base.parameters():
            p.requires_grad_(False)
        d_text, d_image = embed.weight.shape[1], tower.config.hidden_size
        std = self.options.init_std or float(embed.weight.detach().float().std())
        gen = torch.Generator().manual_seed(ctx.seed * 7919 + 17)
        o = self.options
        pool = PromptPool(o.pool_size, o.length, d_text, d_image, std, gen, o.depth, o.keys)
        self.pool = pool.to(embed.weight.device, embed.weight.dtype)
        base.add_module(POOL_ATTR, self.pool)
        self.encoder = ctx.extras["encoder"]
        self.encoder.prefix_tokens = self.n_prefix
        self.pad_id = self.encoder.tokenizer.pad_token_id
        self._embed = embed
        self._queries = FrozenQueries(ctx.unwrapped, self.encoder)
        # On the inner LlavaModel: generate() may call the outer model's forward directly (no hooks),
        # but the outer forward always calls the inner model as a module.
        inner = getattr(base, "model", None)
        if inner is None or not hasattr(inner, "language_model"):
            raise McitError("prompt methods need a LLaVA model (LlavaForConditionalGeneration with .model)")
        base.register_forward_pre_hook(self._labels_hook, with_kwargs=True)
        inner.register_forward_pre_hook(self._select_hook, with_kwargs=True)
        embed.register_forward_hook(self._insert_hook)
        if layers is not None:
            for layer in range(1, self.options.depth):
                layers[layer].register_forward_pre_hook(self._layer_hook(layer), with_kwargs=True)

    @staticmethod
    def decoder_layers(ctx: TaskContext) -> nn.ModuleList:
        base, _, _ = llava_parts(ctx.unwrapped)
        lm = base.model.language_model
        layers = getattr(lm, "layers", None)
        if layers is None:
            raise McitError("method.depth > 1 needs a language model with .layers (Llama-like decoders)")
        return layers

    # --- selection and insertion --------------------------------------------------------------
    def queries(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor):
        """The frozen (image, text) query features of a batch."""
        return self._queries(input_ids, attention_mask, pixel_values)

    def select(self, image_q: torch.Tensor, text_q: torch.Tensor, diversify: bool = False) -> torch.Tensor:
        """Top-k entries per sample by cos(image, key) + cos(text, key); ties go to the lower index.

        ``diversify`` (training, L2P's diversified selection): the match distance 2 - score is
        multiplied by each entry's share h of the selections made while training earlier tasks,
        and entries no earlier task selected (h = 0) rank above all others, by their own match:
        a new task takes the entries earlier tasks left unused, and shares the others only when
        it must. (A small floor on h instead lets a well-keyed old entry, at distance ~0.01,
        beat every unused one.)"""
        score = key_scores(image_q, text_q, self.pool.image_keys, self.pool.text_keys)
        if diversify and self.usage is not None:  # kept on the pool's device, non-zero: no sync per step
            share = (self.usage / self.usage.sum()).to(score.dtype)
            # used: -(2 - s) h in [-4, 0]; unused: 4 - (2 - s) in [0, 4]
            score = torch.where(share > 0, -(2 - score) * share, 2 + score)
        score = score - 1e-6 * torch.arange(score.shape[1], device=score.device)  # deterministic tie-break
        return score.topk(self.options.top_k, dim=-1).indices.sort(dim=-1).values

    def batchwise(self, chosen: torch.Tensor) -> torch.Tensor:
        """L2P's batch-wise selection: every sample of a training batch takes the ``top_k`` entries
        the batch's samples selected most (ties to the lower index)."""
        counts = torch.bincount(chosen.flatten(), minlength=self.options.pool_size)
        rank = counts * self.options.pool_size - torch.arange(self.options.pool_size, device=counts.device)
        top = rank.topk(self.options.top_k).indices.sort().values
        return top.unsqueeze(0).expand(chosen.shape[0], -1)

    def _placeholders(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        slots = (input_ids == self.pad_id) & mask.bool()
        counts = slots.sum(1)
        if not bool((counts == self.n_prefix).all()):
            raise McitError(f"prompt placeholders: expected {self.n_prefix} per row, got {counts.tolist()}")
        return slots.nonzero()[:, 1].view(-1, self.n_prefix)

    def route(self, batch: dict, ctx: TaskContext) -> None:
        """Select the prompts of a generation batch (generate() may hand the model precomputed image
        features instead of pixels, so the selection is made here, from the batch itself)."""
        image_q, text_q = self.queries(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        self._routed = self.select(image_q, text_q)
        task = ctx.extras.get("eval_task") if ctx is not None else None
        if task in self.entries_of:  # routing: how many samples select only their task's own entries
            own = torch.zeros(self.options.pool_size, dtype=torch.bool, device=self._routed.device)
            own[self.entries_of[task]] = True
            self.routing.add(ctx.stage, task, int(own[self._routed].all(1).sum()), self._routed.shape[0])

    def _labels_hook(self, module, args, kwargs):
        self._labels = kwargs.get("labels")

    def _select_hook(self, module, args, kwargs):
        self._pending, self._key_loss, self._deep = None, None, None
        labels, self._labels = self._labels, None
        input_ids, pixel_values = kwargs.get("input_ids"), kwargs.get("pixel_values")
        mask = kwargs.get("attention_mask")
        if input_ids is None or input_ids.shape[1] <= self.n_prefix:
            return None  # a decoding step: the prompts are in the KV cache already
        if mask is None:
            mask = torch.ones_like(input_ids)
        cols = self._placeholders(input_ids, mask)
        training = torch.is_grad_enabled() and pixel_values is not None
        if pixel_values is not None:
            # A training batch's answer tokens stay out of the query: generation has none.
            answer = labels != IGNORE_INDEX if labels is not None and labels.shape == input_ids.shape else None
            image_q, text_q = self._queries(input_ids, mask, pixel_values, exclude=answer)
            chosen = self.select(image_q, text_q, diversify=training and self.options.diversity)
            if training and self.options.batchwise:
                chosen = self.batchwise(chosen)
            if training and self._task_usage is not None:
                self._task_usage += torch.bincount(chosen.flatten(), minlength=self.options.pool_size)
        elif self._routed is not None and self._routed.shape[0] == input_ids.shape[0]:
            chosen, self._routed = self._routed, None
        else:
            raise McitError("prompt methods: a prefill without pixel_values and without route(batch) before it")
        self.last_selection = chosen
        self._pending = (chosen, cols)
        if pixel_values is None:
            return None
        if torch.is_grad_enabled() and self.options.key_weight > 0:
            self._key_loss = self.key_loss(chosen, image_q, text_q)
        return None

    def key_loss(self, chosen: torch.Tensor, image_q: torch.Tensor, text_q: torch.Tensor) -> torch.Tensor:
        """L2P's key-matching loss of a training batch: Σ over its chosen entries of (1 - cos), batch mean."""
        return ((1 - _best_cos(self.pool.image_keys[chosen], image_q))
                + (1 - _best_cos(self.pool.text_keys[chosen], text_q))).sum(1).mean()

    def _insert_hook(self, module, args, output):
        if self._pending is None:
            return None
        chosen, cols = self._pending
        self._pending = None
        self._deep = (chosen, cols) if self.options.depth > 1 else None
        return self._place(output, 0, chosen, cols)

    def _place(self, hidden: torch.Tensor, layer: int, chosen: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``hidden`` (B x L x d) with the chosen entries' prompts of ``layer`` at the placeholder columns."""
        values = self.pool.values(layer)[chosen].reshape(chosen.shape[0], self.n_prefix, -1).to(hidden.dtype)
        rows = torch.arange(chosen.shape[0], device=hidden.device).unsqueeze(1).expand_as(cols)
        hidden = hidden.clone()
        hidden[rows, cols] = values
        return hidden

    def _layer_hook(self, layer: int):
        """A decoder layer's pre-hook: its input's placeholder columns get the layer's own prompts (a
        prefill only: decoding steps find the prompts' keys and values in the KV cache)."""

        def hook(module, args, kwargs):
            if self._deep is None:
                return None
            chosen, cols = self._deep  # kept until the next forward: activation checkpointing re-runs layers
            if args:
                return (self._place(args[0], layer, chosen, cols), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": self._place(kwargs["hidden_states"], layer, chosen, cols)}

        return hook

    # --- training ---------------------------------------------------------------------------
    def extra_loss(self, batch: dict, outputs, ctx: TaskContext) -> torch.Tensor | None:
        loss, self._key_loss = self._key_loss, None
        return None if loss is None else self.options.key_weight * loss

    def before_task(self, task: str, samples: list[Sample], ctx: TaskContext) -> None:
        self._task_usage = torch.zeros(self.options.pool_size, dtype=torch.long, device=self.pool.prompts.device)

    def after_task(self, task: str, ctx: TaskContext) -> None:
        counts, self._task_usage = self._task_usage, None
        if counts is None:
            return
        if getattr(ctx.accelerator, "num_processes", 1) > 1:  # every rank selected for its share of the batch
            counts = ctx.accelerator.reduce(counts, "sum")
        self.usage_by_task[task] = [int(c) for c in counts.tolist()]
        if sum(self.usage_by_task[task]):  # usage stays None or non-zero: select() divides by its sum
            self.usage = counts.double() if self.usage is None else self.usage + counts.double()
        order = sorted(range(len(counts)), key=lambda e: (-self.usage_by_task[task][e], e))
        self.entries_of[task] = sorted(e for e in order[: self.options.top_k] if self.usage_by_task[task][e] > 0)
        if self.options.key_fit == "exact":
            self.fit_keys(task, ctx)

    def fit_keys(self, task: str, ctx: TaskContext) -> None:
        """Set the keys of the task's entries (those no earlier task keyed) to the minimiser of the
        key-matching loss over its queries: per modality, the ``keys`` directions of spherical
        k-means (one key: the queries' mean direction). Every entry of the task gets the same keys,
        so its queries select them together."""
        from mcit.similarity import sample_for_similarity

        entries = [e for e in self.entries_of[task] if e not in self.keyed]
        if not entries:
            return
        samples = sample_for_similarity(ctx.train_data[task], self.options.key_samples, ctx.config.seed, task)
        image_q, text_q = self._queries.batched(samples, self.encoder, self.pool.prompts.device)
        rounds = 100
        with torch.no_grad():
            for keys, q in ((self.pool.image_keys, image_q), (self.pool.text_keys, text_q)):
                fitted = pull_keys(q, self.options.keys, rounds).to(keys.dtype)
                for e in entries:
                    keys[e] = fitted[0] if keys.dim() == 2 else fitted
        self.keyed += entries

    def report(self) -> dict:
        return {
            "selections_per_entry": self.usage_by_task,
            "entries_of_task": self.entries_of,
            # per row, the % of each trained task's test samples that select only that task's entries
            "routing_accuracy": self.routing.report(),
        }

    def state_dict(self):
        tensors = {} if self.usage is None else {"usage": self.usage.cpu().contiguous()}
        return tensors, {"prefix_tokens": self.n_prefix, "usage_by_task": self.usage_by_task,
                         "entries_of": self.entries_of, "keyed": self.keyed, "routing": self.routing.cells}

    def load_state_dict(self, tensors, meta) -> None:
        usage = tensors.get("usage")
        self.usage = None if usage is None else usage.to(self.pool.prompts.device)
        self.usage_by_task = {t: list(v) for t, v in meta.get("usage_by_task", {}).items()}
        self.entries_of = {t: list(v) for t, v in meta.get("entries_of", {}).items()}
        self.keyed = list(meta.get("keyed", []))
        self.routing.load(meta.get("routing", {}))


def _best_cos(keys: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """cos(query, key) of each selected entry (B x k x d keys), or of its best key (B x k x P x d)."""
    q = q.to(keys.dtype).unsqueeze(1)
    if keys.dim() == 4:
        return nn.functional.cosine_similarity(keys, q.unsqueeze(2), dim=-1).amax(-1)
    return nn.functional.cosine_similarity(keys, q, dim=-1)


def extend_basis(basis: torch.Tensor | None, rows: torch.Tensor, energy: float) -> torch.Tensor:
    """GPM: add to the orthonormal ``basis`` (d x r) the fewest singular directions of ``rows``
    (n x d) beyond it so that the basis captures ``energy`` of the rows' squared norm."""
    rows = rows.double()
    d = rows.shape[1]
    total = float((rows**2).sum())
    if basis is None or basis.shape[1] == 0:
        basis = rows.new_zeros(d, 0)
    basis = basis.double()
    inside = rows @ basis
    captured = float((inside**2).sum())
    residual = rows - inside @ basis.T
    need = energy * total - captured
    if need <= 0 or basis.shape[1] >= d:
        return basis
    _, s, vh = torch.linalg.svd(residual, full_matrices=False)
    cum = torch.cumsum(s**2, 0)
    r = min(int(torch.searchsorted(cum, torch.tensor(need, dtype=cum.dtype)).item()) + 1, d - basis.shape[1], len(s))
    q, _ = torch.linalg.qr(torch.cat([basis, vh[:r].T], dim=1))
    return q


def project(grad: torch.Tensor, old: torch.Tensor | None, pre: torch.Tensor | None, residual: bool,
            pretrained: float) -> torch.Tensor:
    """Fwd-Prompt's projection of prompt gradients (rows in the embedding space), see the module doc."""
    shape, g = grad.shape, grad.reshape(-1, grad.shape[-1]).double()

    def off_old(x):
        return x - (x @ old) @ old.T if old is not None and old.shape[1] else x

    g = off_old(g) if residual else g
    if pretrained and pre is not None and pre.shape[1]:
        g = g + pretrained * (g @ pre) @ pre.T
        g = off_old(g) if residual else g
    return g.to(grad.dtype).reshape(shape)


class FwdPromptOptions(PromptPoolOptions):
    residual: bool = Field(True, description="project prompt gradients off the old tasks' input subspace")
    pretrained: float = Field(1.0, ge=0, description="weight of the pre-trained-subspace component (0 = off)")
    energy: float = Field(0.95, gt=0, le=1, description="energy threshold of each task's basis (GPM)")
    pretrained_energy: float = Field(0.9, gt=0, le=1, description="energy threshold of the pre-trained basis")
    basis_samples: int = Field(64, ge=1, description="training samples per task whose input embeddings form its basis")
    balance: bool = Field(
        False, description="image-token and text-token rows each reach the energy threshold on their own (else "
        "the far larger image-token embeddings fill the energy budget with a few image directions)"
    )
    pretrained_data: list[str] | None = Field(
        None, description="base-mix parts or tasks for the pre-trained subspace (default: the config's base.mix)"
    )


@register
class FwdPrompt(PromptPoolMethod):
    name = "fwd_prompt"
    Options = FwdPromptOptions
    summary = ("Fwd-Prompt: prompt pool whose gradients are projected off old tasks' input subspaces "
               "and onto the pre-trained subspace (our reconstruction).")
    paper = "Zheng et al., Beyond Anti-Forgetting: Multimodal Continual Instruction Tuning with Positive Forward Transfer, arXiv 2401.09181"

    def __init__(self, options: FwdPromptOptions):
        super().__init__(options)
        # One basis per prompted layer input (0 = the input embeddings; deep prompts add layers).
        self.old_bases: list[torch.Tensor | None] = [None] * options.depth
        self.pre_bases: list[torch.Tensor | None] = [None] * options.depth

    def before_task(self, task: str, samples: list[Sample], ctx: TaskContext) -> None:
        super().before_task(task, samples, ctx)
        if self.pre_bases[0] is None and self.options.pretrained > 0:
            rows, image = self.embeddings(self._pretrained_samples(ctx), ctx)
            self.pre_bases = [self._extend(None, r, image, self.options.pretrained_energy) for r in rows]

    def after_task(self, task: str, ctx: TaskContext) -> None:
        super().after_task(task, ctx)
        if self.options.residual:
            rows, image = self.embeddings(self._sample(ctx.train_data[task], ctx), ctx)
            self.old_bases = [self._extend(b, r, image, self.options.energy) for b, r in zip(self.old_bases, rows, strict=True)]

    def _extend(self, basis: torch.Tensor | None, rows: torch.Tensor, image: torch.Tensor, energy: float) -> torch.Tensor:
        """Extend ``basis`` by ``rows`` (GPM); with ``balance``, image rows first, then text rows,
        each part to ``energy`` of its own squared norm."""
        if not self.options.balance:
            return extend_basis(basis, rows, energy)
        for part in (rows[image], rows[~image]):
            if len(part):
                basis = extend_basis(basis, part, energy)
        return basis

    def before_step(self, ctx: TaskContext) -> None:
        pool = self.pool
        if pool.prompts.grad is not None:
            pool.prompts.grad = project(pool.prompts.grad, self.old_bases[0], self.pre_bases[0],
                                        self.options.residual, self.options.pretrained)
        if pool.layer_prompts is not None and pool.layer_prompts.grad is not None:
            grad = pool.layer_prompts.grad  # each layer's slice projected in place: no copy per step
            for layer in range(1, self.options.depth):
                grad[:, layer - 1] = project(grad[:, layer - 1], self.old_bases[layer], self.pre_bases[layer],
                                             self.options.residual, self.options.pretrained)

    # --- the embeddings the prompts interact with ---------------------------------------------
    def _sample(self, data: list[Sample], ctx: TaskContext) -> list[Sample]:
        g = torch.Generator().manual_seed(ctx.seed * 1009 + 1)
        n = min(self.options.basis_samples, len(data))
        return [data[i] for i in torch.randperm(len(data), generator=g)[:n].tolist()]

    def _pretrained_samples(self, ctx: TaskContext) -> list[Sample]:
        from mcit.models.start import base_mix, start_mix

        bench = ctx.extras.get("benchmark")
        parts = self.options.pretrained_data or list(start_mix(ctx.config))
        if bench is None:
            raise McitError("fwd_prompt needs the benchmark in the run context for its pre-trained subspace")
        missing = [p for p in parts if p not in bench.base and p not in bench.tasks]
        if missing:
            raise ConfigError(
                f"method.pretrained_data: {missing} are neither base-mix parts ({', '.join(bench.base) or 'none'}) "
                f"nor tasks of benchmark {bench.name!r}; name the general data the base model saw"
            )
        cfg = ctx.config.model_copy(update={"base": ctx.config.base.model_copy(update={"mix": dict.fromkeys(parts, 1.0)})})
        samples, _ = base_mix(cfg, bench)
        return self._sample(samples, ctx)

    @torch.no_grad()
    def embeddings(self, samples: list[Sample], ctx: TaskContext,
                   batch_size: int = 16) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The inputs of every prompted language-model layer (the input embeddings, then the deep
        layers' hidden states) at the text and image tokens of ``samples`` (attended; placeholders
        and padding excluded), as rows: one tensor per layer, and which rows are image tokens."""
        base, _, _ = llava_parts(ctx.unwrapped)
        lm = base.model.language_model if hasattr(base.model, "language_model") else base.language_model
        depth = self.options.depth
        captured: list[torch.Tensor] = []

        def grab(layer):
            def hook(module, args, kwargs):
                hidden = kwargs["inputs_embeds"] if layer == 0 else (args[0] if args else kwargs["hidden_states"])
                captured.append(hidden.detach())
                if layer == depth - 1:
                    raise _Stop
            return hook

        handles = [lm.register_forward_pre_hook(grab(0), with_kwargs=True)]
        if depth > 1:  # registered after the prompt hooks, so a layer's input is captured with its prompts
            layers = self.decoder_layers(ctx)
            handles += [layers[layer].register_forward_pre_hook(grab(layer), with_kwargs=True) for layer in range(1, depth)]
        rows: list[list[torch.Tensor]] = [[] for _ in range(depth)]
        image: list[torch.Tensor] = []
        was_training = base.training
        base.eval()
        try:
            for start in range(0, len(samples), batch_size):
                batch = self.encoder.generation_batch(samples[start : start + batch_size])
                batch = {k: v.to(self._embed.weight.device) for k, v in batch.items()}
                try:
                    base(**batch)
                except _Stop:
                    pass
                keep = batch["attention_mask"].bool() & (batch["input_ids"] != self.pad_id)
                image.append((batch["input_ids"][keep] == self._queries.image_id).cpu())
                for layer, hidden in enumerate(captured):
                    rows[layer].append(hidden[keep].float().cpu())
                captured.clear()
        finally:
            for handle in handles:
                handle.remove()
            base.train(was_training)
        return [torch.cat(r) for r in rows], torch.cat(image)

    # --- checkpoints --------------------------------------------------------------------------
    @staticmethod
    def _basis_key(kind: str, layer: int) -> str:
        return kind if layer == 0 else f"{kind}.{layer}"  # layer 0 keeps the key of depth-1 checkpoints

    def state_dict(self):
        tensors, meta = super().state_dict()
        for kind, bases in (("old_basis", self.old_bases), ("pre_basis", self.pre_bases)):
            for layer, basis in enumerate(bases):
                if basis is not None:
                    tensors[self._basis_key(kind, layer)] = basis.contiguous()
        rank = lambda b: 0 if b is None else b.shape[1]  # noqa: E731
        return tensors, {**meta, "old_rank": [rank(b) for b in self.old_bases],
                         "pre_rank": [rank(b) for b in self.pre_bases]}

    def load_state_dict(self, tensors, meta) -> None:
        super().load_state_dict(tensors, meta)
        depth = self.options.depth
        self.old_bases = [tensors.get(self._basis_key("old_basis", layer)) for layer in range(depth)]
        self.pre_bases = [tensors.get(self._basis_key("pre_basis", layer)) for layer in range(depth)]


__all__ = ["FwdPrompt", "PromptPool", "PromptPoolMethod", "extend_basis", "project"]
