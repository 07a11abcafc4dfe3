"""Progress on rank 0 (a bar on a terminal, a line every few seconds in a batch log); per-rank log files."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

BAR_WIDTH = 30
REDRAW_S = 0.1  # a terminal bar redraws at most ~10 times a second


class Progress:
    """Progress on rank 0: a bar on a terminal, one line every few seconds in a batch log."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        enabled: bool = True,
        interval_s: float = 5.0,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.interval_s = interval_s
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty and isatty())
        self.tty = tty
        self._clock = clock
        self.job = ""
        self.total = 0
        self.unit = "step"
        self.done = 0
        self._t0 = 0.0
        self._last = -math.inf
        self._bar_open = False

    def start(self, job: str, total: int, unit: str = "step") -> None:
        """Begin counting `total` units of `job`."""
        if not self.enabled:
            return
        self._end_bar()
        self.job, self.total, self.unit, self.done = job, max(0, int(total)), unit, 0
        self._t0 = self._clock()
        if self.tty:
            self._last = -math.inf
            self._draw(self._t0)
        else:
            self._last = self._t0  # the first batch line comes one interval after the start

    def update(self, n: int = 1) -> None:
        """Count `n` more units done; redraw the bar or print a line when it is time."""
        if not self.enabled:
            return
        self.done += n
        now = self._clock()
        if self.tty:
            if now - self._last >= REDRAW_S or self.done >= self.total:
                self._draw(now)
        elif now - self._last >= self.interval_s:
            self._write(self._line(now) + "\n")
            self._last = now

    def finish(self, message: str | None = None) -> None:
        """End the job: close the bar, then one line: `message` (default "JOB: done") followed by
        the count, time and rate in parentheses."""
        if not self.enabled:
            return
        now = self._clock()
        if self.tty:
            self._draw(now)
            self._end_bar()
        elapsed = now - self._t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        summary = f"{self.done}/{self.total} {self.unit} in {_hms(elapsed)}, {rate:.2f} {self.unit}/s"
        if self.total == 0:  # a resumed job that had only composing or exporting left
            summary = f"no {self.unit} left to render, {_hms(elapsed)}"
        self._write(f"{message or self.job + ': done'} ({summary})\n")

    # -- drawing ---------------------------------------------------------------------------

    def _rate_eta(self, now: float) -> tuple[float, str]:
        elapsed = now - self._t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = max(0, self.total - self.done)
        eta = _hms(left / rate) if rate > 0 else ("0:00:00" if left == 0 else "?")
        return rate, eta

    def _line(self, now: float) -> str:
        rate, eta = self._rate_eta(now)
        return f"{self.job}: {self.unit} {self.done}/{self.total}, {rate:.2f} {self.unit}/s, ETA {eta}"

    def _draw(self, now: float) -> None:
        rate, eta = self._rate_eta(now)
        filled = BAR_WIDTH * min(self.done, self.total) // self.total if self.total else BAR_WIDTH
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        text = f"{self.job} [{bar}] {self.done}/{self.total} {self.unit} {rate:.2f} {self.unit}/s ETA {eta}"
        self._write("\r" + text + "\033[K")  # erase what a longer previous bar left
        self._last = now
        self._bar_open = True

    def _end_bar(self) -> None:
        if self._bar_open:
            self._write("\n")
            self._bar_open = False

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


def _hms(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _RankLogHandler(logging.FileHandler):
    """The per-rank log file; a marker type so a second setup replaces it instead of adding one."""


def rank_log_name(rank: int, array_task: int | None = None) -> str:
    """rank-NNNN.log; rank-NNNN.task-I.log for task I of a job array, whose tasks may share OUT from other nodes."""
    return f"rank-{rank:04d}.log" if array_task is None else f"rank-{rank:04d}.task-{array_task}.log"


def setup_rank_logging(out_dir: str | Path, rank: int, node: str, *, debug: bool = False,
                       array_task: int | None = None) -> logging.Logger:
    """Send the `hpcrender` loggers of this process to OUT/logs/rank_log_name(...) (appended, UTC stamps)."""
    logs = Path(out_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("hpcrender")
    for handler in list(logger.handlers):
        if isinstance(handler, _RankLogHandler):
            logger.removeHandler(handler)
            handler.close()
    level = logging.DEBUG if debug else logging.INFO
    handler = _RankLogHandler(logs / rank_log_name(rank, array_task), mode="a", encoding="utf-8")
    formatter = logging.Formatter(
        f"%(asctime)s.%(msecs)03dZ rank {rank} {node} %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
    )
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    handler.setLevel(level)
    logger.addHandler(handler)
    logger.setLevel(level)
    return logger
