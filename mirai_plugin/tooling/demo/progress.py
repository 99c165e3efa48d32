"""A minimal progress bar on stderr (no extra dependency)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator


class Progress:
    """Bars (``enabled``) and one-line notes (``notes``, by default as ``enabled``) on stderr."""

    def __init__(self, *, enabled: bool = True, notes: bool | None = None, width: int = 28) -> None:
        self.enabled, self.width = enabled, width
        self.notes = enabled if notes is None else notes

    def range(self, total: int, label: str) -> Iterator[int]:
        bar = self.bar(total, label)
        for i in range(total):
            yield i
            bar.update(i + 1)
        bar.close()

    def bar(self, total: int, label: str) -> Bar:
        return Bar(self, total, label)

    def note(self, text: str) -> None:
        if self.notes:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()


class Bar:
    """One stage's bar: ``update(done)`` redraws it about 50 times over the stage, ``close()`` ends its line."""

    def __init__(self, progress: Progress, total: int, label: str) -> None:
        self.progress, self.total, self.label = progress, max(1, total), label
        self.start, self.drawn, self.open = time.perf_counter(), 0, False

    def update(self, done: int) -> None:
        if not self.progress.enabled:
            return
        if done < self.total and done - self.drawn < max(1, self.total // 50):
            return
        self.drawn = done
        elapsed = time.perf_counter() - self.start
        filled = int(self.progress.width * min(done, self.total) / self.total)
        remaining = elapsed / max(done, 1) * max(self.total - done, 0)
        bar = "#" * filled + "-" * (self.progress.width - filled)
        sys.stderr.write(f"\r{self.label:<32s} [{bar}] {done}/{self.total} {elapsed:5.1f}s eta {remaining:4.0f}s")
        sys.stderr.flush()
        self.open = True

    def note(self, text: str) -> None:
        """A line above the bar (the bar is redrawn on the next update)."""
        if self.open:
            sys.stderr.write("\r\033[K")
            self.open = False
        self.progress.note(text)
        self.drawn = 0 if self.drawn == 0 else self.drawn - max(1, self.total // 50)  # redraw at the next update

    def close(self) -> None:
        if self.open:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.open = False
