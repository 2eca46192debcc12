"""Progress of a training run: a rich bar on a terminal; elsewhere (make, nohup, CI, logs) one
plain line per evaluation and every tenth of the run, with step, loss, metric, elapsed and ETA."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class RunProgress:
    def __init__(self, label: str, total: int, enabled: bool, console: Console | None = None):
        self.label, self.total, self.enabled = label, total, enabled
        self.console = console or Console(stderr=True)
        self.started = time.perf_counter()
        self.step, self.status = 0, ""
        self.bar = None
        if enabled and self.console.is_terminal:
            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[status]}"), TimeRemainingColumn(), console=self.console,
                                transient=True)
            self.task = self.bar.add_task(label, total=total, status="")
        self.every = max(total // 10, 1)

    def __enter__(self) -> RunProgress:
        if self.bar is not None:
            self.bar.start()
        elif self.enabled:
            self._line(f"started: {self.total} steps")
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif self.enabled:
            self._line(f"done: {self.step} steps")

    def advance(self, loss: float | None = None) -> None:
        self.step += 1
        if self.bar is not None:
            self.bar.update(self.task, advance=1)
        elif self.enabled and self.step % self.every == 0 and self.step < self.total:
            self._line(f"step {self.step}/{self.total}" + (f", loss {loss:.4f}" if loss is not None else ""))

    def evaluated(self, status: str) -> None:
        self.status = status
        if self.bar is not None:
            self.bar.update(self.task, status=status)
        elif self.enabled:
            self._line(f"step {self.step}/{self.total}: {status}")

    def _line(self, what: str) -> None:
        elapsed = time.perf_counter() - self.started
        eta = elapsed / self.step * (self.total - self.step) if 0 < self.step < self.total else None
        print(f"{self.label}: {what} ({elapsed:.0f} s elapsed" + (f", ETA {eta:.0f} s)" if eta is not None else ")"),
              file=sys.stderr, flush=True)
