"""Joint multi-task training on the union of the stream's tasks (the upper bound)."""

from pydantic import Field

from mcit.methods import register
from mcit.methods.base import Method, MethodOptions


class JointOptions(MethodOptions):
    steps_factor: float = Field(
        1.0, gt=0, description="training steps = steps_factor x train.steps x number of tasks"
    )


@register
class Joint(Method):
    name = "joint"
    Options = JointOptions
    walk = "joint"
    summary = "Multi-task training once on the union of all tasks (upper bound); one matrix row after training."

    def stage_steps(self, n_samples: int, n_tasks: int, optim) -> int:
        # train.steps per task (with epochs, the joint stage's samples already span every task)
        steps = optim.steps_for(n_samples)
        return int(round(self.options.steps_factor * steps * (1 if optim.epochs is not None else n_tasks)))
