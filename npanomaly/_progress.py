"""A minimal progress bar on stderr for long steps (feature extraction, coreset, epochs, prediction)."""

import sys
import time


class Progress:
    """``with Progress(total, "label", enabled) as bar: ... bar.update()``; silent when not enabled.

    total=None (a source of unknown length) shows the count and the time without a bar.
    """

    def __init__(self, total, label, enabled=True, stream=None, width=30):
        self.total = None if total is None else max(1, int(total))
        self.label = label
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.width = width
        self.done = 0
        self.start = time.perf_counter()
        self.last_draw = 0.0
        self.drawn = False

    def update(self, n=1):
        self.done = self.done + n if self.total is None else min(self.total, self.done + n)
        now = time.perf_counter()
        if self.enabled and (now - self.last_draw > 0.1 or self.done == self.total):
            self.last_draw = now
            self.drawn = True
            if self.total is None:
                self.stream.write(f"\r{self.label:<22} {self.done} {now - self.start:6.1f} s")
            else:
                filled = int(self.width * self.done / self.total)
                self.stream.write(f"\r{self.label:<22} [{'#' * filled}{'.' * (self.width - filled)}] "
                                  f"{self.done}/{self.total} {now - self.start:6.1f} s")
            self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.drawn:  # a bar that never drew (the first step failed) leaves no empty line before the error
            self.stream.write("\n")
            self.stream.flush()
