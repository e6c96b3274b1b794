"""Parts a config adds to any method: ``replay:`` (a buffer of finished tasks' samples mixed into
each stage) and ``asd:`` (answer style diversification: a share of every task's samples rewritten
into other answer formats).

A part has any of ``train_data(task, samples, ctx)``, ``sample_weights(samples)``,
``after_task(task, ctx)``, ``state()`` / ``load(meta)`` and ``report()``, and a ``key`` naming
its state in ``method.json`` and its entry in ``method_report``. :class:`WithParts` runs the
method's own hooks, then its parts' in the order given (replay before asd, so replayed samples
are rewritten as in their own stage); every other hook is the method's.
"""

from __future__ import annotations

from mcit.errors import ConfigError
from mcit.methods.base import Method


def _replay_options():
    from mcit.methods.replay import ReplayOptions

    return ReplayOptions


def _asd_options():
    from mcit.methods.asd import ASDOptions

    return ASDOptions


# each top-level config section that adds a part, and its options model (imported when used)
PART_OPTIONS = {"replay": _replay_options, "asd": _asd_options}


class WithParts(Method):
    """A method with parts added by the config. Checkpoints keep the method's state as it was,
    with each stateful part's under its key (``replay_part``)."""

    def __init__(self, inner: Method, parts: list):
        super().__init__(inner.options)
        self.inner, self.parts = inner, list(parts)
        self.name, self.walk, self.summary, self.paper = inner.name, inner.walk, inner.summary, inner.paper

    def part(self, key: str):
        return next((p for p in self.parts if p.key == key), None)

    @property
    def replay(self):  # the replay part, when there is one (tests and reports read its buffer)
        return self.part("replay_part")

    def stages(self, tasks):
        return self.inner.stages(tasks)

    def stage_steps(self, n_samples, n_tasks, optim):
        return self.inner.stage_steps(n_samples, n_tasks, optim)

    def setup(self, model, ctx):
        self.inner.setup(model, ctx)

    def train_data(self, task, samples, ctx):
        samples = self.inner.train_data(task, samples, ctx)
        for p in self.parts:
            if hasattr(p, "train_data"):
                samples = p.train_data(task, samples, ctx)
        return samples

    def sample_weights(self, samples, ctx):
        """The weights of the part that draws batches (replay's mix), else the method's own."""
        for p in self.parts:
            if hasattr(p, "sample_weights"):
                return p.sample_weights(samples)
        return self.inner.sample_weights(samples, ctx)

    def before_task(self, task, samples, ctx):
        self.inner.before_task(task, samples, ctx)

    def extra_loss(self, batch, outputs, ctx):
        return self.inner.extra_loss(batch, outputs, ctx)

    def before_step(self, ctx):
        self.inner.before_step(ctx)

    def after_task(self, task, ctx):
        self.inner.after_task(task, ctx)
        for p in self.parts:
            if hasattr(p, "after_task"):
                p.after_task(task, ctx)

    @property
    def task_id_at_test(self) -> bool:
        return self.inner.task_id_at_test

    def route(self, batch, ctx):
        return self.inner.route(batch, ctx)

    def eval_summary(self):
        return self.inner.eval_summary()

    def state_dict(self):
        tensors, meta = self.inner.state_dict()
        return tensors, {**meta, **{p.key: p.state() for p in self.parts if hasattr(p, "state")}}

    def load_state_dict(self, tensors, meta) -> None:
        meta = dict(meta)
        for p in self.parts:
            if hasattr(p, "load"):
                p.load(meta.pop(p.key, {}))
        self.inner.load_state_dict(tensors, meta)

    def report(self):
        return {**self.inner.report(), **{p.key: p.report() for p in self.parts if hasattr(p, "report")}}

    def extra_memory_bytes(self) -> int:
        return self.inner.extra_memory_bytes()


def with_parts(method: Method, replay: dict | None = None, asd: dict | None = None) -> Method:
    """``method`` with the config's ``replay:`` and ``asd:`` parts, or as it is without any;
    refused (one line) where a part means nothing or the method has it already."""
    from mcit.methods.asd import AnswerStylePart
    from mcit.methods.replay import ReplayPart

    parts = []
    if replay:
        if isinstance(getattr(method, "replay", None), ReplayPart):  # Replay and DGG hold one
            raise ConfigError(f"replay: method {method.name!r} replays already; set its own options under method:")
        if method.walk != "sequential":
            raise ConfigError(f"replay: method {method.name!r} does not train task after task ({method.walk}); "
                              "there is nothing to replay")
        parts.append(ReplayPart(_replay_options().model_validate(replay)))
    if asd:
        if isinstance(getattr(method, "asd", None), AnswerStylePart):  # SEFE holds one
            raise ConfigError(f"asd: method {method.name!r} diversifies answer styles already; set its own "
                              "options under method:")
        if method.walk == "none":
            raise ConfigError(f"asd: method {method.name!r} does not train; there is no data to rewrite")
        parts.append(AnswerStylePart(_asd_options().model_validate(asd)))
    return WithParts(method, parts) if parts else method


__all__ = ["PART_OPTIONS", "WithParts", "with_parts"]
