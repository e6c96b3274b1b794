"""``prompt_pool``: the L2P-style pool on a frozen MLLM (placement, selection, key fitting)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mcit.data.format import Sample
from mcit.errors import ConfigError, McitError
from mcit.methods import register
from mcit.methods.base import Method, TaskContext
from mcit.methods.prompt.options import PromptPoolOptions
from mcit.methods.prompt.pool import POOL_ATTR, PromptPool, _best_cos
from mcit.methods.query import FrozenQueries, key_scores, pull_keys
from mcit.models.encode import IGNORE_INDEX
from mcit.models.families import family_of, part, unwrap


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass early."""


@dataclass(frozen=True)
class _Pass:
    """What one call of the inner model carries from the pool's selection hook to its placing hooks.

    The selection hook (a pre-hook of the inner model) makes a new one per call and nothing else
    writes it, so no state outlives its pass except what is taken out on purpose (the key loss).

    chosen   -- the selected entries per sample (B x top_k); None on a decoding step (the prompts
                are in the KV cache) and outside any pass;
    cols     -- the placeholder columns per sample (B x P);
    key_loss -- the key-matching loss of a training pass, for ``extra_loss`` to take.
    """

    chosen: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    key_loss: torch.Tensor | None = None


@register
class PromptPoolMethod(Method):
    name = "prompt_pool"
    Options = PromptPoolOptions
    summary = "L2P-style multimodal prompt pool on a frozen MLLM: key-matched prompts prepended to the input."
    paper = "Wang et al., Learning to Prompt (L2P), CVPR 2022; the baseline of Fwd-Prompt"

    def __init__(self, options: PromptPoolOptions):
        super().__init__(options)
        self.pool: PromptPool | None = None
        # Hooks talk through three slots, each with one writer:
        self._pass = _Pass()  # the current inner-model call's selection (the selection hook)
        self._placed = False  # layer 0's prompts are in this pass's embeddings (the embedding hook)
        # handed into the next pass, taken there: the outer forward's labels (answer positions stay
        # out of the query), and the selection route() made for the next generation batch
        self._next_labels: torch.Tensor | None = None
        self._next_route: torch.Tensor | None = None
        self.last_selection: torch.Tensor | None = None  # for tests and routing statistics
        self.usage: torch.Tensor | None = None  # selections per entry while training finished tasks
        self.usage_by_task: dict[str, list[int]] = {}
        self._task_usage: torch.Tensor | None = None
        self.entries_of: dict[str, list[int]] = {}  # task -> the top_k entries it selected most while training
        self.keyed: list[int] = []  # entries whose keys an exact fit has set (never refitted)

    # --- setup: freeze, add the pool, hook the model ------------------------------------------
    @property
    def n_prefix(self) -> int:
        return self.options.top_k * self.options.length

    def setup(self, model, ctx: TaskContext) -> None:
        base = unwrap(ctx.unwrapped)
        embed = base.get_input_embeddings()
        self._queries = FrozenQueries(ctx.unwrapped, ctx.encoder)
        layers = self.decoder_layers(ctx) if self.options.depth > 1 else None
        if layers is not None and self.options.depth > len(layers):
            raise ConfigError(f"method.depth: {self.options.depth} exceeds the language model's {len(layers)} layers "
                              f"(prompted inputs: the embeddings and decoder layers 1..{len(layers) - 1})")
        for p in base.parameters():
            p.requires_grad_(False)
        d_text, d_image = embed.weight.shape[1], self._queries.dim
        std = self.options.init_std or float(embed.weight.detach().float().std())
        gen = torch.Generator().manual_seed(ctx.seed * 7919 + 17)
        o = self.options
        pool = PromptPool(o.pool_size, o.length, d_text, d_image, std, gen, o.depth, o.keys)
        self.pool = pool.to(embed.weight.device, embed.weight.dtype)
        base.add_module(POOL_ATTR, self.pool)
        self.encoder = ctx.encoder
        self.encoder.prefix_tokens = self.n_prefix
        self.pad_id = self.encoder.tokenizer.pad_token_id
        self._embed = embed
        # On the inner model (LlavaModel, Qwen2VLModel, ...): generate() may call the outer model's
        # forward directly (no hooks), but the outer forward always calls the inner model as a module.
        inner = getattr(base, "model", None)
        if inner is None:
            raise McitError("prompt methods need a model with an inner .model (the transformers layout)")
        base.register_forward_pre_hook(self._labels_hook, with_kwargs=True)
        inner.register_forward_pre_hook(self._select_hook, with_kwargs=True)
        embed.register_forward_hook(self._insert_hook)
        if layers is not None:
            for layer in range(1, self.options.depth):
                layers[layer].register_forward_pre_hook(self._layer_hook(layer), with_kwargs=True)

    @staticmethod
    def decoder_layers(ctx: TaskContext) -> nn.ModuleList:
        lm = part(ctx.unwrapped, family_of(ctx.unwrapped).language_model)
        layers = getattr(lm, "layers", None)
        if layers is None:
            raise McitError("method.depth > 1 needs a language model with .layers (Llama-like decoders)")
        return layers

    # --- selection and insertion --------------------------------------------------------------
    def queries(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, images: dict):
        """The frozen (image, text) query features of a batch (``images``: its image inputs)."""
        return self._queries(input_ids, attention_mask, images)

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

    def route(self, batch: dict, ctx: TaskContext) -> torch.Tensor | None:
        """Select the prompts of a generation batch (generate() may hand the model precomputed image
        features instead of pixels, so the selection is made here, from the batch itself). A sample
        is routed to a task when it selects only entries that task selected most while training."""
        image_q, text_q = self.queries(batch["input_ids"], batch["attention_mask"], self._queries.images(batch))
        routed = self._next_route = self.select(image_q, text_q)
        if ctx is None:
            return None
        own = torch.zeros(len(ctx.tasks), self.options.pool_size, dtype=torch.bool, device=routed.device)
        for t, task in enumerate(ctx.tasks):
            own[t, self.entries_of.get(task, [])] = True
        return own[:, routed].all(-1).T  # (batch, tasks)

    def _labels_hook(self, module, args, kwargs):
        self._next_labels = kwargs.get("labels")

    def _select_hook(self, module, args, kwargs):
        self._pass, self._placed = _Pass(), False  # nothing of the last pass survives a failed selection
        self._pass = self._select(args, kwargs)
        return None

    def _select(self, args, kwargs) -> _Pass:
        """The selection of one inner-model call (its kwargs as the hook sees them)."""
        labels, self._next_labels = self._next_labels, None
        # LLaVA-NeXT's outer forward passes input_ids positionally
        input_ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else (args[0] if args else None)
        pixel_values = kwargs.get("pixel_values")
        mask = kwargs.get("attention_mask")
        if input_ids is None or input_ids.shape[1] <= self.n_prefix:
            return _Pass()  # a decoding step: the prompts are in the KV cache already
        if mask is None:
            mask = torch.ones_like(input_ids)
        cols = self._placeholders(input_ids, mask)
        training = torch.is_grad_enabled() and pixel_values is not None
        if pixel_values is not None:
            # A training batch's answer tokens stay out of the query: generation has none.
            answer = labels != IGNORE_INDEX if labels is not None and labels.shape == input_ids.shape else None
            image_q, text_q = self._queries(input_ids, mask, self._queries.images(kwargs), exclude=answer)
            chosen = self.select(image_q, text_q, diversify=training and self.options.diversity)
            if training and self.options.batchwise:
                chosen = self.batchwise(chosen)
            if training and self._task_usage is not None:
                self._task_usage += torch.bincount(chosen.flatten(), minlength=self.options.pool_size)
        elif self._next_route is not None and self._next_route.shape[0] == input_ids.shape[0]:
            chosen, self._next_route = self._next_route, None
        else:
            raise McitError("prompt methods: a prefill without pixel_values and without route(batch) before it")
        self.last_selection = chosen
        key_loss = None
        if pixel_values is not None and torch.is_grad_enabled() and self.options.key_weight > 0:
            key_loss = self.key_loss(chosen, image_q, text_q)
        return _Pass(chosen, cols, key_loss)

    def key_loss(self, chosen: torch.Tensor, image_q: torch.Tensor, text_q: torch.Tensor) -> torch.Tensor:
        """L2P's key-matching loss of a training batch: Σ over its chosen entries of (1 - cos), batch mean."""
        return ((1 - _best_cos(self.pool.image_keys[chosen], image_q))
                + (1 - _best_cos(self.pool.text_keys[chosen], text_q))).sum(1).mean()

    def _insert_hook(self, module, args, output):
        """The embeddings of a pass's prefill get layer 0's prompts, once per pass (the queries'
        own embedding calls come before the selection; generate's later ones find it placed)."""
        if self._pass.chosen is None or self._placed:
            return None
        self._placed = True
        return self._place(output, 0, self._pass.chosen, self._pass.cols)

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
            if not self._placed:  # a decoding step, or no prefill through the embeddings
                return None
            chosen, cols = self._pass.chosen, self._pass.cols  # every call: activation checkpointing re-runs layers
            if args:
                return (self._place(args[0], layer, chosen, cols), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": self._place(kwargs["hidden_states"], layer, chosen, cols)}

        return hook

    # --- training ---------------------------------------------------------------------------
    def extra_loss(self, batch: dict, outputs, ctx: TaskContext) -> torch.Tensor | None:
        loss = self._pass.key_loss
        if loss is None:
            return None
        self._pass = _Pass(self._pass.chosen, self._pass.cols)  # taken once
        return self.options.key_weight * loss

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
        samples = sample_for_similarity(ctx.train_data[task], self.options.key_samples, ctx.run_seed, task)
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
        }

    def state_dict(self):
        tensors = {} if self.usage is None else {"usage": self.usage.cpu().contiguous()}
        return tensors, {"prefix_tokens": self.n_prefix, "usage_by_task": self.usage_by_task,
                         "entries_of": self.entries_of, "keyed": self.keyed}

    def load_state_dict(self, tensors, meta) -> None:
        usage = tensors.get("usage")
        self.usage = None if usage is None else usage.to(self.pool.prompts.device)
        self.usage_by_task = {t: list(v) for t, v in meta.get("usage_by_task", {}).items()}
        self.entries_of = {t: list(v) for t, v in meta.get("entries_of", {}).items()}
        self.keyed = list(meta.get("keyed", []))
