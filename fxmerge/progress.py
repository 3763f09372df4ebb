"""Progress of long work on stderr: a tqdm bar on a terminal, a line every `interval`
seconds (and at the end) otherwise, nothing when quiet."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
INTERVAL = 30.0  # seconds between lines when stderr is not a terminal


def _fmt(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """`update()` once per finished item of `total`. `enabled`: None shows progress (a
    bar on a terminal, periodic lines elsewhere), False is quiet, True forces it."""

    def __init__(self, total: int, desc: str, unit: str = "item",
                 enabled: bool | None = None, interval: float = INTERVAL) -> None:
        self.total, self.desc, self.unit, self.done = total, desc, unit, 0
        self.interval, self.started = interval, time.monotonic()
        self.last = self.started
        self.printed: float | None = None  # when the last line was printed
        self.on = enabled is not False
        self.bar = None
        if self.on and os.isatty(2):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr)

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if note:
                self.bar.set_postfix_str(note)
        elif self.on:
            now = time.monotonic()
            if now - self.last >= self.interval or self.done >= self.total:
                self.last = self.printed = now
                self._line(note)

    def _line(self, note: str = "") -> None:
        elapsed = time.monotonic() - self.started
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        pct = f" ({self.done / self.total:.0%})" if self.total else ""
        print(f"{self.desc}: {self.done}/{self.total} {self.unit}s{pct}, {_fmt(elapsed)} "
              f"elapsed, {_fmt(eta)} left" + (f"; {note}" if note else ""),
              file=sys.stderr, flush=True)

    def close(self) -> None:
        """Close the bar; off a terminal, a last line where work stopped short of `total`."""
        if self.bar is not None:
            self.bar.close()
        elif self.on and 0 < self.done < self.total and self.last != self.printed:
            self._line()


def progress(items: Iterable[T], desc: str, unit: str = "item", enabled: bool | None = None,
             total: int | None = None) -> Iterator[T]:
    """`items`, reporting progress as each is consumed (see `Progress`)."""
    items = list(items) if total is None and not hasattr(items, "__len__") else items
    bar = Progress(len(items) if total is None else total, desc, unit, enabled)
    try:
        for item in items:
            yield item
            bar.update()
    finally:
        bar.close()
