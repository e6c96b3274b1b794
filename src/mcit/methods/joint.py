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
    schedule = "joint"
    summary = "Multi-task training once on the union of all tasks (upper bound); one matrix row after training."
