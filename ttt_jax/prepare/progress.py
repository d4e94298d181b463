"""A one-line progress report for ``ttt-jax prepare``: input MB done, MB/s and ETA.

(``ttt_jax.logging.Progress`` counts training steps and imports JAX; this counts bytes.)
"""

from __future__ import annotations

import time

MB = 1e6
# Seconds between two redraws of the line.
_EVERY = 0.5


class ProgressLine:
    """``\\r``-updated line on ``stream``; :meth:`close` ends it with a summary."""

    def __init__(self, total_bytes: int, stream, enabled: bool = True):
        self.total, self.stream, self.enabled = total_bytes, stream, enabled
        self.start = self.last = time.perf_counter()
        self.done = self.docs = self.tokens = 0
        self.closed = False

    def _line(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.done / elapsed
        left = max(self.total - self.done, 0)
        eta = f"{left / rate:,.0f}s" if rate > 0 else "?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (f"prepare: {self.done / MB:,.1f}/{self.total / MB:,.1f} MB ({pct:.0f}%) "
                f"{rate / MB:,.1f} MB/s ETA {eta}; {self.docs:,} documents, "
                f"{self.tokens:,} tokens")

    def update(self, done: int, docs: int, tokens: int) -> None:
        self.done, self.docs, self.tokens = done, docs, tokens
        now = time.perf_counter()
        if self.enabled and now - self.last >= _EVERY:
            self.last = now
            self.stream.write("\r" + self._line() + " ")
            self.stream.flush()

    def close(self, complete: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        if self.enabled:
            if complete:
                self.done = max(self.done, self.total)
            self.stream.write("\r" + self._line() + f" in "
                              f"{time.perf_counter() - self.start:,.1f}s\n")
            self.stream.flush()
