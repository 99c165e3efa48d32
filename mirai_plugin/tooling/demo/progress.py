"""A minimal progress bar on stderr (no extra dependency)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator


class Progress:
    def __init__(self, *, enabled: bool = True, width: int = 28) -> None:
        self.enabled, self.width = enabled, width

    def range(self, total: int, label: str) -> Iterator[int]:
        start = time.perf_counter()
        for i in range(total):
            yield i
            if self.enabled and (i + 1 == total or (i + 1) % max(1, total // 50) == 0):
                self._draw(label, i + 1, total, time.perf_counter() - start)
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()

    def _draw(self, label: str, done: int, total: int, elapsed: float) -> None:
        filled = int(self.width * done / total)
        remaining = elapsed / done * (total - done)
        bar = "#" * filled + "-" * (self.width - filled)
        sys.stderr.write(f"\r{label:<32s} [{bar}] {done}/{total} {elapsed:5.1f}s eta {remaining:4.0f}s")
        sys.stderr.flush()

    def note(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
