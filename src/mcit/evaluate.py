"""Batched greedy generation (KV cache) and scoring of one task."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from mcit.data.benchmark import TaskSpec
from mcit.data.format import Sample


@dataclass
class TaskEval:
    task: str
    scorer: str
    headline: float
    details: dict
    predictions: list[dict]  # {"id", "prediction", "references", "score"}
    info: dict
    routed: list[list[bool]] | None = None  # per sample: the stream's tasks a routing method routed it to
    summary: dict | None = None  # the method's eval_summary() after this task


@torch.no_grad()
def generate(model, encoder, samples: list[Sample], batch_size: int, max_new_tokens: int, device, method=None, ctx=None,
             sort_by_length: bool = True, routes: list | None = None) -> list[str]:
    """Greedy answers for ``samples``, in their order. Batches are formed from samples sorted by
    prompt length (stable), so that a batch pads its prompts little; each sample's answer does not
    depend on the batch it lands in (left padding is masked), which a test checks. ``routes``, when
    given, receives per sample what the method's ``route`` chose (None for a method that does not
    route)."""
    tokenizer = encoder.tokenizer
    model.eval()
    order = list(range(len(samples)))
    if sort_by_length:
        order.sort(key=lambda i: len(encoder.prompt_ids(samples[i])))
    predictions: list[str] = [""] * len(samples)
    chosen: list[list[bool] | None] = [None] * len(samples)
    for start in range(0, len(samples), batch_size):
        rows = order[start : start + batch_size]
        chunk = [samples[i] for i in rows]
        batch = {k: v.to(device) for k, v in encoder.generation_batch(chunk).items()}
        if method is not None:
            if ctx is not None:
                ctx.batch_samples = chunk  # routing by the samples' text (e.g. a sentence encoder)
            routed = method.route(batch, ctx)
            if routed is not None:
                for i, r in zip(rows, routed.bool().tolist(), strict=True):
                    chosen[i] = r
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = out[:, batch["input_ids"].shape[1] :]
        for i, text in zip(rows, tokenizer.batch_decode(new_tokens, skip_special_tokens=True), strict=True):
            predictions[i] = text.strip()
    if routes is not None:
        routes.extend(chosen)
    return predictions


def evaluate_task(model, encoder, spec: TaskSpec, samples: list[Sample], eval_cfg, device, method=None, ctx=None,
                  accelerator=None) -> TaskEval:
    """Generate and score one task. With several processes each generates for every world-th
    sample and the predictions are gathered back into order, so every process scores the same."""
    from mcit.scoring import score_task

    max_new = spec.max_new_tokens or eval_cfg.max_new_tokens
    world = accelerator.num_processes if accelerator is not None else 1
    routes: list = []
    with nullcontext() if accelerator is None else accelerator.autocast():
        share = samples if world == 1 else samples[accelerator.process_index :: world]
        local = generate(model, encoder, share, eval_cfg.batch_size, max_new, device, method, ctx, routes=routes)
    if world == 1:
        preds = local
    else:
        from accelerate.utils import gather_object

        # rank 0's (prediction, route) pairs, then rank 1's, ...: routing is scored over every sample
        flat = gather_object(list(zip(local, routes, strict=True)))
        pairs, start = [("", None)] * len(samples), 0
        for r in range(world):
            n = len(samples[r::world])
            pairs[r::world] = flat[start : start + n]
            start += n
        preds, routes = [p for p, _ in pairs], [c for _, c in pairs]
    result = score_task(spec.scorer, preds, [s.references for s in samples], spec.scorer_options)
    per_sample = result.per_sample or [None] * len(preds)
    rows = [
        {"id": s.id, "prediction": p, "references": s.references, "score": sc,
         "question": s.question, "image": None if s.image is None else str(s.image)}
        for s, p, sc in zip(samples, preds, per_sample, strict=True)
    ]
    if result.per_image is not None:  # captions: each image's own scores (flips, resampling images)
        for row, image in zip(rows, result.per_image, strict=True):
            row["image_score"] = image["score"]
            row["caption_stats"] = {k: image[k] for k in ("CIDEr", "ROUGE-L", "bleu")}
    routed = None if any(c is None for c in routes) else routes
    return TaskEval(spec.name, result.scorer, float(result.headline), dict(result.details), rows, dict(result.info),
                    routed)
