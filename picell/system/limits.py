"""What keeps the daemon alive and its log small under pressure: the open-files limit, logging of
repeated events once per interval with a count, and threads that never die of an exception.

- `raise_nofile()`: the soft RLIMIT_NOFILE raised to the hard limit (systemd gives services a
  soft 1,024, which a few hundred idle connections and our children's pipes can exhaust).
- `RepeatLog`: an event that may happen thousands of times a second (a shed connection, an
  `accept()` error) is counted; the first occurrence is logged at once, the rest once per interval
  as one line with a count.
- `RepeatFilter`: the same for other libraries' records (uvicorn's "Invalid HTTP request",
  asyncio's accept errors), installed on the daemon's log handlers.
- `run_forever()`: the body of a long-lived thread; an exception is logged (with its traceback,
  rate-limited), the step retried after a growing backoff, and the thread goes on.

It must not hold policy: which events are counted, and what a step does, is the caller's business.
"""

from __future__ import annotations

import logging
import resource
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from picell.constants import REPEAT_LOG_INTERVAL_S, THREAD_BACKOFF_S

log = logging.getLogger(__name__)


def raise_nofile() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard one; returns (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft >= hard:
        return soft, soft
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:  # a container may forbid it: run with what we have
        log.warning("open files: cannot raise the limit from %d to %d (%s)", soft, target, exc)
        return soft, soft
    return soft, target


@dataclass
class _Window:
    started: float
    suppressed: int = 0


class RepeatLog:
    """Counts events by key; logs the first of each interval at once and the rest as one line.

    `note()` may be called from any thread. `flush()` writes the counts of windows that have
    ended (call it periodically, so that the last burst of a flood is reported too).
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = REPEAT_LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.clock = clock
        self.totals: dict[str, int] = {}  # since start, by key (status and tests read them)
        self._windows: dict[str, _Window] = {}
        self._messages: dict[str, tuple[int, str]] = {}
        self._lock = threading.Lock()

    def note(self, key: str, level: int, message: str, *, exc_info: bool = False) -> bool:
        """Count one event `key`; True when this call logged it (the first of an interval)."""
        now = self.clock()
        with self._lock:
            self.totals[key] = self.totals.get(key, 0) + 1
            window = self._windows.get(key)
            if window is not None and now - window.started < self.interval_s:
                window.suppressed += 1
                self._messages[key] = (level, message)
                return False
            pending = window.suppressed if window is not None else 0
            self._windows[key] = _Window(now)
            self._messages[key] = (level, message)
        if pending:
            self._report(key, level, message, pending)
        self.logger.log(level, "%s", message, exc_info=exc_info)
        return True

    def flush(self) -> None:
        """Log the count of every window that has ended with events left unreported."""
        now = self.clock()
        due: list[tuple[str, int]] = []
        with self._lock:
            for key, window in list(self._windows.items()):
                if now - window.started >= self.interval_s:
                    if window.suppressed:
                        due.append((key, window.suppressed))
                    del self._windows[key]  # the next event starts a fresh window
        for key, count in due:
            level, message = self._messages[key]
            self._report(key, level, message, count)

    def _report(self, key: str, level: int, message: str, count: int) -> None:
        self.logger.log(
            level, "%s (%d more like this in the last %.0f s)", message, count, self.interval_s
        )


class RepeatFilter(logging.Filter):
    """A handler filter: a record whose logger and message template were already written in the
    current interval is dropped and counted; the next one written carries the count."""

    def __init__(
        self, interval_s: float = REPEAT_LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.clock = clock
        self._windows: dict[tuple[str, str], _Window] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = self.clock()
        with self._lock:
            if len(self._windows) > 1000:  # templates are few; forget old ones rather than grow
                self._windows = {
                    k: w for k, w in self._windows.items() if now - w.started < self.interval_s
                }
            window = self._windows.get(key)
            if window is not None and now - window.started < self.interval_s:
                window.suppressed += 1
                return False
            pending = window.suppressed if window is not None else 0
            self._windows[key] = _Window(now)
        if pending:
            record.msg = f"{record.msg} [{pending} more like this before, not shown]"
        return True


def install_repeat_filter(logger: logging.Logger | None = None) -> RepeatFilter:
    """Put one `RepeatFilter` on every handler of `logger` (the root logger by default)."""
    flt = RepeatFilter()
    for handler in (logger or logging.getLogger()).handlers:
        handler.addFilter(flt)
    return flt


def backoff_delay(failures: int, backoff_s: Sequence[float] = THREAD_BACKOFF_S) -> float:
    """The wait after `failures` consecutive failures (>= 1): grows, then stays at the last."""
    return backoff_s[min(max(failures, 1), len(backoff_s)) - 1]


def run_forever(
    name: str,
    step: Callable[[], bool | None],
    stop: threading.Event,
    *,
    backoff_s: Sequence[float] = THREAD_BACKOFF_S,
    repeats: RepeatLog | None = None,
) -> None:
    """Call `step` until `stop` is set or `step` returns True (its work is over).

    Any exception (an `OSError(EMFILE)` as much as a bug) is logged with its traceback, at most
    once per interval per thread and exception type, then `step` runs again after a backoff that
    grows with consecutive failures: a thread of the daemon never dies of an exception.
    """
    repeats = repeats or RepeatLog(log)
    failures = 0
    while not stop.is_set():
        try:
            if step():
                return
        except Exception as exc:  # noqa: BLE001 - the point: nothing may end this thread
            failures += 1
            delay = backoff_delay(failures, backoff_s)
            repeats.note(
                f"{name} {type(exc).__name__}",
                logging.ERROR,
                f"{name}: {type(exc).__name__}: {exc}; going on in {delay:g} s",
                exc_info=True,
            )
            stop.wait(delay)
        else:
            failures = 0
