"""Progress of a run, drawn by tqdm: inputs done, inputs/s, patches/s and the time left."""

from __future__ import annotations

import time
from typing import Any, TextIO

from tqdm import tqdm

__all__ = ["Progress"]


class _Bar(tqdm):
    """A bar whose count may be fractional (a clip part-way through) and reads as ``3.25`` rather than
    tqdm's ``3.2500000000000004``."""

    @property
    def format_dict(self) -> dict[str, Any]:
        d = super().format_dict
        d["n_fmt"] = f"{d['n']:.2f}".rstrip("0").rstrip(".")
        return d


class Progress:
    """Inputs done out of ``total`` on ``stream`` (nothing when ``stream`` is None). ``done`` inputs count
    as finished from the start (kept from an earlier run). An input may be reported in parts, as the
    frames of a clip are encoded, so the bar and its time left move during a long clip."""

    def __init__(self, total: int, stream: TextIO | None, label: str = "", done: int = 0) -> None:
        self.tokens = self.failed = self.frames = 0
        self.start = time.perf_counter()
        self.bar = _Bar(
            total=total,
            initial=done,
            file=stream,
            disable=stream is None,
            desc=label.strip() or None,
            unit="input",
            mininterval=0.1,
            dynamic_ncols=True,
            bar_format="{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} inputs [{elapsed}, ETA {remaining}, "
            "{rate_fmt}{postfix}]",
        )

    def update(self, items: float, tokens: int, failed: int = 0, frames: int = 0) -> None:
        """``items`` more inputs done (a fraction for part of a clip), ``tokens`` more patches encoded,
        ``frames`` more frames (an image is one)."""
        self.tokens += tokens
        self.failed += failed
        self.frames += frames
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        # an image is one frame: the count says something only when clips or videos are in the run
        shown = f", {self.frames:,} frames" if self.frames > self.bar.n else ""
        postfix = f"{self.tokens / elapsed:,.0f} patches/s{shown}" + (f", {self.failed} failed" if self.failed else "")
        self.bar.set_postfix_str(postfix, refresh=False)
        self.bar.update(items)

    def close(self) -> None:
        """End the bar's line; later calls do nothing."""
        self.bar.close()
