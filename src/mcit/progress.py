"""Progress bars (rich) that can be switched off for tests and non-interactive logs."""

from __future__ import annotations

import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


class _Bar:
    def __init__(self, progress: Progress | None, task_id):
        self.progress, self.task_id = progress, task_id

    def advance(self, n: int = 1, loss: float | None = None) -> None:
        if self.progress is None:
            return
        fields = {"loss": f"loss {loss:.3f}"} if loss is not None else {}
        self.progress.update(self.task_id, advance=n, **fields)


class _LogBar:
    """Without a terminal (CI, ``nohup``) a bar cannot redraw: print a line every 10%."""

    def __init__(self, desc: str, total: int):
        self.desc, self.total, self.done, self.start = desc, total, 0, time.perf_counter()
        self.next_mark = max(1, total // 10)

    def advance(self, n: int = 1, loss: float | None = None) -> None:
        self.done += n
        if self.done >= self.next_mark or self.done == self.total:
            self.next_mark += max(1, self.total // 10)
            extra = f" loss {loss:.3f}" if loss is not None else ""
            console.print(f"{self.desc}: {self.done}/{self.total}{extra} ({time.perf_counter() - self.start:.0f}s)",
                          highlight=False)


@contextmanager
def progress_bar(desc: str, total: int, enabled: bool = True):
    if not enabled:
        yield _Bar(None, None)
        return
    if not console.is_terminal:
        yield _LogBar(desc, total)
        return
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=False) as progress:
        yield _Bar(progress, progress.add_task(desc, total=total, loss=""))
