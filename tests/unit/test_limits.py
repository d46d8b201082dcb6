"""What keeps the daemon alive under pressure: repeated events logged once per interval with a
count, threads whose step raises going on after a backoff (the reconcile loop, child watchers),
and the open-files limit raised at start."""

from __future__ import annotations

import errno
import logging
import resource
import sys
import threading
from pathlib import Path

import pytest

from picell.app import Daemon
from picell.system.children import Child
from picell.system.limits import RepeatFilter, RepeatLog, raise_nofile, run_forever
from tests.netns.harness import wait_until

log = logging.getLogger("tests.limits")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def test_repeat_log_writes_the_first_event_and_then_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    repeats = RepeatLog(log, interval_s=10, clock=clock)
    with caplog.at_level(logging.WARNING):
        logged = [repeats.note("shed", logging.WARNING, "shed one") for _ in range(100_000)]
        repeats.note("other", logging.WARNING, "another kind")
        repeats.flush()  # the interval has not ended: nothing yet
        assert messages(caplog) == ["shed one", "another kind"]
        clock.now = 10.0
        repeats.flush()
        repeats.flush()  # reported once
    assert logged.count(True) == 1
    assert messages(caplog)[2:] == ["shed one (99999 more like this in the last 10 s)"]
    assert repeats.totals == {"shed": 100_000, "other": 1}


def test_repeat_log_reports_the_count_when_the_next_window_opens(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    repeats = RepeatLog(log, interval_s=10, clock=clock)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            repeats.note("k", logging.WARNING, "event")
        clock.now = 11.0
        repeats.note("k", logging.WARNING, "event")
    assert messages(caplog) == ["event", "event (2 more like this in the last 10 s)", "event"]


def test_repeat_filter_drops_repeats_of_a_template_and_counts_them() -> None:
    clock = Clock()
    flt = RepeatFilter(interval_s=10, clock=clock)

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 1, msg, None, None)

    passed = [flt.filter(record("Invalid HTTP request received.")) for _ in range(1000)]
    assert passed.count(True) == 1
    assert flt.filter(record("something else"))
    clock.now = 10.0
    last = record("Invalid HTTP request received.")
    assert flt.filter(last)
    assert (
        last.getMessage() == "Invalid HTTP request received. [999 more like this before, not shown]"
    )


def test_a_step_that_raises_is_logged_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    def step() -> bool:
        calls.append(1)
        if len(calls) <= 5:
            raise OSError(errno.EMFILE, "Too many open files")
        return len(calls) == 8  # three good rounds, then the work is over

    stop = threading.Event()
    with caplog.at_level(logging.ERROR):
        run_forever("reconcile", step, stop, backoff_s=(0.0,))
    assert len(calls) == 8
    errors = [r for r in caplog.records if "Too many open files" in r.getMessage()]
    assert len(errors) == 1 and errors[0].exc_info is not None  # once, with its traceback


def test_run_forever_stops_when_told() -> None:
    stop = threading.Event()
    rounds: list[int] = []

    def step() -> None:
        rounds.append(1)
        if len(rounds) == 3:
            stop.set()
        raise RuntimeError("a bug")

    run_forever("sender", step, stop, backoff_s=(0.0,))
    assert len(rounds) == 3


def test_reconcile_thread_survives_an_oserror(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = Daemon(tmp_path / "data")
    calls: list[int] = []

    def converge() -> None:
        calls.append(1)
        if len(calls) <= 2:
            raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(daemon.control, "converge", converge)
    monkeypatch.setattr("picell.app.CHILD_RESTART_BACKOFF_S", (0.0,))
    thread = threading.Thread(target=daemon._loop, name="reconcile", daemon=True)
    try:
        with caplog.at_level(logging.ERROR):
            thread.start()
            for _ in range(4):  # wake it as a child exit would; it must keep converging
                daemon._wake.set()
                n = len(calls)
                wait_until(lambda n=n: len(calls) > n, 10, "the reconcile thread stopped")  # type: ignore[misc]
            assert thread.is_alive()
            assert daemon._failures == 0  # the last rounds succeeded
    finally:
        daemon._stop.set()
        daemon._wake.set()
        thread.join(10)
        daemon.store.close()
    assert not thread.is_alive()
    failures = [m for m in messages(caplog) if "reconcile failed: OSError" in m]
    assert len(failures) == 1  # the second failure fell in the same interval: counted


def test_a_child_watcher_survives_a_failing_on_exit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    told: list[int] = []

    def on_exit(name: str, code: int) -> None:
        told.append(code)
        raise RuntimeError("the daemon is shutting down")

    child = Child("sleeper", [sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "c.log",
                  on_exit=on_exit)  # fmt: skip
    with caplog.at_level(logging.ERROR):
        child.start()
        wait_until(lambda: told == [3], 10, "the watcher did not tell the daemon")
        wait_until(
            lambda: any("telling the daemon failed" in m for m in messages(caplog)),
            10,
            "the failure was not logged",
        )
    assert child.restarts == 1 and told == [3]  # told once, not retried in a loop


def test_open_files_soft_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    try:
        before, after = raise_nofile()
        assert before == min(1024, hard)
        assert after == hard == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
