"""The research wing: the model-level benchmark and the one-GPU interference study. It builds on the core and
the core never imports it (its commands join the CLI through an entry point: research/commands.py)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


@contextmanager
def progress_bar(label: str, total: int, show: bool = True) -> Iterator[Callable[..., None]]:
    """A rich bar over ``total`` steps on stderr (stdout stays free for ``--json``); yields
    ``step(description, advance=1, **update)``. Draws nothing unless ``show``."""
    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  TextColumn("{task.description}"), console=Console(stderr=True), disable=not show) as bar:
        task = bar.add_task("", total=total)
        yield lambda description, advance=1, **update: bar.update(task, description=description, advance=advance,
                                                                  **update)
