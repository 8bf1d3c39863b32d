"""Progress of a run on a text stream."""

from __future__ import annotations

import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """A one-line progress bar on a text stream: items, items/s, frames (when clips and videos are in the
    run), tokens/s, ETA."""

    def __init__(self, total: int, stream: TextIO | None, label: str = "") -> None:
        self.total, self.stream, self.label = total, stream, label
        self.items = self.tokens = self.failed = self.frames = 0
        self.start = self._last = time.perf_counter()

    def update(self, items: int, tokens: int, failed: int = 0, frames: int = 0) -> None:
        self.items += items
        self.tokens += tokens
        self.failed += failed
        self.frames += frames
        now = time.perf_counter()
        if self.stream is not None and (now - self._last >= 0.1 or self.items >= self.total):
            self._last = now
            self._render(now)

    def _render(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        done = self.items / max(self.total, 1)
        bar = "#" * round(24 * done) + "." * (24 - round(24 * done))
        rate = self.items / elapsed
        eta = f"{(self.total - self.items) / rate:.0f}s" if rate > 0 and self.items < self.total else "-"
        failed = f" | {self.failed} failed" if self.failed else ""
        # an image is one frame: the count says something only when clips or videos are in the run
        frames = f" | {self.frames:,} frames" if self.frames > self.items else ""
        self.stream.write(
            f"\r{self.label}[{bar}] {self.items}/{self.total} | {rate:.2f} items/s{frames} | "
            f"{self.tokens / elapsed:,.0f} tokens/s | ETA {eta}{failed}   "
        )
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line, once; later calls do nothing."""
        if self.stream is not None:
            if self.items < self.total:
                self._render(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()
            self.stream = None
