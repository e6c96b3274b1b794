"""``fwd_prompt``: the prompt pool with its gradients projected off old tasks' input subspaces
and onto the pre-trained one (GPM bases in the input-embedding space)."""

from __future__ import annotations

import torch
from pydantic import Field

from mcit.data.format import Sample
from mcit.errors import ConfigError, McitError
from mcit.methods import register
from mcit.methods.base import TaskContext
from mcit.methods.prompt.gpm import extend_basis, project
from mcit.methods.prompt.options import PromptPoolOptions
from mcit.methods.prompt.pool_method import PromptPoolMethod, _Stop
from mcit.models.families import family_of, part, unwrap


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
        for kind in (rows[image], rows[~image]):
            if len(kind):
                basis = extend_basis(basis, kind, energy)
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

        bench = ctx.benchmark
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
        base = unwrap(ctx.unwrapped)
        lm = part(ctx.unwrapped, family_of(ctx.unwrapped).language_model)
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
                image.append(self._queries.is_image(batch["input_ids"][keep]).cpu())
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



