"""Routing accuracy per row and task, as every routing method reports it in ``method_report``."""

from __future__ import annotations


class RoutingTally:
    """Per row (stage) and task: of a task's test samples, how many went where they belong."""

    def __init__(self):
        self.cells: dict[str, dict[str, list[int]]] = {}  # row -> task -> [correct, total]

    def add(self, row: int, task: str, correct: int, total: int) -> None:
        cell = self.cells.setdefault(str(row), {}).setdefault(task, [0, 0])
        cell[0] += int(correct)
        cell[1] += int(total)

    def report(self) -> dict[str, dict[str, float]]:
        """Percentages per row and task (cells without samples left out)."""
        return {row: {t: round(100.0 * c / n, 2) for t, (c, n) in cells.items() if n}
                for row, cells in self.cells.items()}

    def load(self, cells: dict) -> None:
        self.cells = {row: {t: list(v) for t, v in c.items()} for row, c in cells.items()}


def routed_to(choice, owner: list[int]):
    """What ``Method.route`` returns for a choice of one expert per sample: ``(batch, tasks)``
    booleans, True where task t's expert (``owner[t]``, -1 for a task without one yet) is the
    sample's choice."""
    import torch

    owners = torch.tensor(owner, dtype=torch.long, device=choice.device)
    return choice.long().unsqueeze(1) == owners.unsqueeze(0)
