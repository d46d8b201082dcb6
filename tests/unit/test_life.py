"""A cell's life as a service: one daemon per data dir, children that outlive the daemon and are
adopted by the next one, bounded child logs, systemd's notify protocol and unit, the generated
admin password kept root-only until the owner sets one."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from picell.api.auth import Auth
from picell.app import AlreadyRunning, Daemon, sd_notify, take_lock
from picell.control import Control
from picell.store.db import Store
from picell.system.children import Child, bound_log, process_start_time

REPO = Path(__file__).resolve().parent.parent.parent
SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


# -- one daemon per data dir --


def test_a_second_daemon_on_the_data_dir_refuses_before_opening_the_store(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    fd = take_lock(data)  # as the running daemon holds it
    try:
        assert (data / "picell.lock").read_text().split() == [str(os.getpid())]
        with pytest.raises(AlreadyRunning) as caught:
            Daemon(data)
        assert str(caught.value) == f"already running (pid {os.getpid()})"
        assert not (data / "picell.db").exists()  # the store was never opened
        assert sorted(p.name for p in data.iterdir()) == ["picell.lock"]
    finally:
        os.close(fd)
    daemon = Daemon(data)  # the lock is free again: the next daemon takes it
    try:
        assert (data / "picell.lock").read_text().split() == [str(os.getpid())]
        with pytest.raises(AlreadyRunning):
            take_lock(data)
    finally:
        daemon.close()
    os.close(take_lock(data))


def test_the_lock_is_held_by_another_process_too(tmp_path: Path) -> None:
    code = (
        "import sys, time; from pathlib import Path; from picell.app import take_lock; "
        "take_lock(Path(sys.argv[1])); print('locked', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True, cwd=REPO)  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(AlreadyRunning) as caught:
            take_lock(tmp_path)
        assert caught.value.pid == holder.pid
    finally:
        holder.kill()
        holder.wait()
    os.close(take_lock(tmp_path))  # a dead holder's lock is released by the kernel


# -- systemd notify --


def test_sd_notify_sends_one_datagram_to_notify_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False  # not under systemd: nothing to tell
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sd_notify("READY=1") is True
        assert server.recv(100) == b"READY=1"
    name = f"picell-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)  # the abstract namespace systemd may use
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd_notify("STOPPING=1") is True
        assert server.recv(100) == b"STOPPING=1"


# -- children outlive the daemon --


@pytest.fixture
def sleeper(tmp_path: Path) -> Iterator[Child]:
    child = Child("sleeper", SLEEPER, tmp_path / "sleeper.log")
    yield child
    child.stop()


def test_a_detached_child_runs_on_and_the_next_daemon_adopts_it(
    tmp_path: Path, sleeper: Child
) -> None:
    sleeper.start()
    pid = sleeper.pid
    assert pid is not None
    sleeper.detach()  # the daemon stops
    assert sleeper.running()
    exited = threading.Event()
    again = Child("sleeper", SLEEPER, tmp_path / "sleeper.log", on_exit=lambda *_: exited.set())
    assert again.adopt() and again.adopted and again.pid == pid
    again.start()  # running already: no second process
    assert again.pid == pid
    # another argv (an Unbound with another config, say) is never taken for it
    other = Child("sleeper", [*SLEEPER, "x"], tmp_path / "sleeper.log")
    assert not other.adopt()
    os.kill(pid, 9)  # an adopted child that dies is reported, like one we started
    assert exited.wait(20)
    assert not again.running()


def test_a_recycled_pid_is_not_adopted(tmp_path: Path, sleeper: Child) -> None:
    sleeper.start()
    assert sleeper.pid is not None
    started = process_start_time(sleeper.pid)
    assert started is not None
    sleeper.pidfile.write_text(f"{sleeper.pid} {started + 1}\n")  # same pid, another process
    assert not Child("sleeper", SLEEPER, tmp_path / "sleeper.log").adopt()
    sleeper.pidfile.write_text("garbage\n")
    assert not Child("sleeper", SLEEPER, tmp_path / "sleeper.log").adopt()


def test_stopping_an_adopted_child_ends_it(tmp_path: Path, sleeper: Child) -> None:
    sleeper.start()
    pid = sleeper.pid
    assert pid is not None
    sleeper.detach()
    again = Child("sleeper", SLEEPER, tmp_path / "sleeper.log")
    assert again.adopt()
    again.stop()
    # the process is gone (reaped by its parent, this test process, for good measure)
    assert sleeper._proc is not None and sleeper._proc.wait(20) is not None
    assert not again.running() and not again.pidfile.exists()


def test_child_logs_are_bounded_and_the_child_writes_on(tmp_path: Path) -> None:
    path = tmp_path / "unbound.log"
    with open(path, "ab") as fh:  # a child's O_APPEND file description
        fh.write(b"x" * 5000)
        fh.flush()
        assert not bound_log(path, max_bytes=10_000)
        fh.write(b"y" * 6000)
        fh.flush()
        assert bound_log(path, max_bytes=10_000)
        assert path.stat().st_size == 0
        assert (tmp_path / "unbound.log.1").read_bytes() == b"x" * 5000 + b"y" * 6000
        fh.write(b"after\n")  # continues at the new end, not at its old offset
        fh.flush()
    assert path.read_bytes() == b"after\n"


# -- the reconciler leaves everything running at stop, and adopts on start --


def test_reconciler_stop_leaves_children_running(control: Control) -> None:
    control.converge()
    reconciler = control.reconciler
    unbound = reconciler.unbound.child
    assert unbound.running()
    reconciler.stop()
    assert unbound.running() and unbound.detached  # type: ignore[attr-defined]


def test_a_running_unbound_is_adopted_not_started(control: Control) -> None:
    reconciler = control.reconciler
    unbound = reconciler.unbound.child
    control.converge()  # writes the config
    # a fresh daemon: same config on disk, an Unbound of the previous daemon still running
    fresh = type(reconciler)(reconciler.runner, reconciler.paths, reconciler.make_child)
    fresh.unbound.child.adoptable = True  # type: ignore[attr-defined]
    control.reconciler = fresh
    report = control.converge()
    assert not [c for c in report.changes if c.area == "dns"]
    assert fresh.unbound.child.started == 0  # type: ignore[attr-defined]
    assert fresh.unbound.running() and unbound is not fresh.unbound.child


# -- the generated admin password --


def test_a_generated_password_is_kept_root_only_until_the_owner_sets_one(tmp_path: Path) -> None:
    store = Store(tmp_path / "picell.db")
    try:
        path = tmp_path / "admin-password"
        auth = Auth(store, password_file=path)
        password = auth.ensure_password()
        assert password is not None and auth.check(password)
        assert path.read_text() == password + "\n"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert auth.ensure_password() is None and path.exists()  # kept across restarts
        auth.set_password("the owner's own password")
        assert not path.exists()
    finally:
        store.close()


# -- the systemd unit --


def render_unit(picell: str, data_dir: str) -> str:
    return subprocess.run([str(REPO / "scripts" / "service.sh"), "render", picell, data_dir],
                          check=True, capture_output=True, text=True).stdout  # fmt: skip


def test_the_unit_keeps_children_and_notifies() -> None:
    unit = render_unit("/opt/picell/.venv/bin/picell", "/var/lib/picell")
    lines = set(unit.splitlines())
    for line in ("Type=notify", "Restart=on-failure", "KillMode=process",
                 "ExecStart=/opt/picell/.venv/bin/picell serve",
                 "Environment=PICELL_DATA_DIR=/var/lib/picell",
                 "After=network-online.target time-sync.target",
                 "Wants=network-online.target time-sync.target",
                 "StandardError=journal", "WantedBy=multi-user.target"):  # fmt: skip
        assert line in lines, line
    assert "@" not in unit.replace("# @PICELL@", "").replace("@DATA_DIR@ the", "")
    bad = subprocess.run([str(REPO / "scripts" / "service.sh"), "render", "/a b/picell", "/x"],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "not supported" in bad.stderr


def test_systemd_analyze_verifies_the_rendered_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (scripts/install.sh --test installs it)")
    picell = Path(sys.executable).parent / "picell"  # an executable that exists here
    unit = tmp_path / "picell.service"
    unit.write_text(render_unit(str(picell), str(tmp_path / "data")))
    ok = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout + ok.stderr == "", ok.stdout + ok.stderr
    # the check is real: a mistake in the unit is reported
    unit.write_text(unit.read_text().replace("KillMode=process", "KillMode=proccess"))
    bad = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert "kill mode" in bad.stdout + bad.stderr
