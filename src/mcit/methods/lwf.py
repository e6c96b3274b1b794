"""Learning without forgetting (Li & Hoiem 2017) for instruction tuning.

Before training a task, one teacher pass runs the model as it stands (the previous tasks'
model) over the task's training sequences and keeps, for each sample, the logits at the
positions that predict answer tokens: the ``top_k`` largest per position, or all of them. No
second model is kept in memory. While training, the loss gets

    alpha * T^2 * mean over answer positions of KL(p_teacher^T || p_student^T)

where both distributions are softmaxes at temperature T over the teacher's kept vocabulary
entries, so the term is exactly zero while the student equals the teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from mcit.data.format import Sample
from mcit.errors import McitError
from mcit.methods import register
from mcit.methods.base import Method, MethodOptions, TaskContext
from mcit.methods.penalty import answer_logits


class LwFOptions(MethodOptions):
    alpha: float = Field(1.0, ge=0, description="weight of the distillation term")
    temperature: float = Field(2.0, gt=0, description="softmax temperature T of teacher and student")
    top_k: int | None = Field(
        50, ge=1, description="teacher logits kept per answer position (None: the whole vocabulary)"
    )
    first_task: bool = Field(False, description="also distil the starting model while training the first task")
    teacher_batch_size: int = Field(32, ge=1, description="samples per forward pass of the teacher pass")


@register
class LwF(Method):
    name = "lwf"
    Options = LwFOptions
    summary = "Learning without forgetting: distil the previous model's answer-token distributions (precomputed)."
    paper = "Li & Hoiem, TPAMI 2017"

    def __init__(self, options: LwFOptions):
        super().__init__(options)
        self.teacher: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def before_task(self, task: str, samples: list[Sample], ctx: TaskContext) -> None:
        self.teacher = {}
        if ctx.stage <= 1 and not self.options.first_task:
            return
        unique = list({s.id: s for s in samples}.values())
        model, encoder = ctx.unwrapped, ctx.encoder
        was_training = model.training
        model.eval()
        bs = self.options.teacher_batch_size
        with torch.no_grad():
            for i in range(0, len(unique), bs):
                chunk = unique[i : i + bs]
                batch = {k: v.to(ctx.accelerator.device) for k, v in encoder.train_batch(chunk).items()}
                logits, labels = model(**batch).logits, batch["labels"]
                for row, sample in enumerate(chunk):
                    kept = answer_logits(logits[row : row + 1], labels[row : row + 1]).float()
                    if self.options.top_k is not None and self.options.top_k < kept.shape[-1]:
                        values, index = kept.topk(self.options.top_k, dim=-1)
                        self.teacher[sample.id] = (values.cpu(), index.cpu())
                    else:
                        self.teacher[sample.id] = (kept.cpu(), None)
        model.train(was_training)

    def extra_loss(self, batch: dict, outputs, ctx: TaskContext) -> torch.Tensor | None:
        if not self.teacher or self.options.alpha == 0:
            return None
        missing = [s.id for s in ctx.batch_samples if s.id not in self.teacher]
        if missing:
            raise McitError(f"lwf: no teacher logits for samples {missing[:3]} (the teacher pass saw other data)")
        student = answer_logits(outputs.logits, batch["labels"]).float()
        device = student.device
        values = torch.cat([self.teacher[s.id][0] for s in ctx.batch_samples]).to(device)
        if values.shape[0] != student.shape[0]:
            raise McitError(
                f"lwf: {values.shape[0]} teacher positions for {student.shape[0]} student positions; "
                "the encoding changed since the teacher pass"
            )
        if self.teacher[ctx.batch_samples[0].id][1] is not None:
            index = torch.cat([self.teacher[s.id][1] for s in ctx.batch_samples]).to(device)
            student = student.gather(-1, index)
        return self.options.alpha * distillation(student, values, self.options.temperature)

    def extra_memory_bytes(self) -> int:
        return sum(v.numel() * v.element_size() + (0 if i is None else i.numel() * i.element_size())
                   for v, i in self.teacher.values())


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * mean_positions KL(softmax(teacher/T) || softmax(student/T))``; 0 for no positions."""
    if student.numel() == 0:
        return student.sum()
    log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1).mean()
    return kl * temperature**2
