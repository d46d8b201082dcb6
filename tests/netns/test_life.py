"""A cell's life as a service: one daemon per data dir; tunnels, flows and DNS that outlive a
stopped daemon, adopted again by the next one; the systemd unit's command line serving a cell
and telling systemd it is ready.

Topology (module scope):

      ┌──────────────────── switch ns: br-inet 198.51.100.0/24 ────────────────────┐
      │                  │                  │                 │                     │
  alpha ns .1         beta ns .2         phone ns .11     laptop ns .12        net ns .53
  picell alpha        picell beta        alpha's device   beta's device        upstream DNS
  10.61.0.1/24        10.62.0.1/24       (wg-quick)       (wg-quick)
  alpha.test          beta.test
   │ veth 203.0.113.1/24                                            gamma ns .3 (test of
  lan ns 203.0.113.5: HTTP :80 (service files), echo :7 (echo)      the systemd unit's ExecStart)

alpha shares files and echo with beta.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.netns.cells import Cell, cell_on_bridge, pids_of, start_upstream_dns
from tests.netns.harness import Bridge, Netns, Topology, wait_until

REPO = Path(__file__).resolve().parent.parent.parent


@dataclass
class World:
    topo: Topology
    inet: Bridge
    alpha: Cell
    beta: Cell
    phone: Netns
    laptop: Netns
    vips: dict[str, str]


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Topology() as topo:
        inet = topo.bridge("inet")
        nss = {r: topo.add_ns(r) for r in ("phone", "laptop", "net", "lan")}
        for role, ip in (("phone", "11"), ("laptop", "12"), ("net", "53")):
            topo.attach(nss[role], inet, f"198.51.100.{ip}/24")
        start_upstream_dns(nss["net"], "198.51.100.53", {"www.example.net": "192.0.2.80"},
                           topo.workdir)  # fmt: skip
        alpha = cell_on_bridge(topo, inet, "alpha", 1, resolver="198.51.100.53")
        beta = cell_on_bridge(topo, inet, "beta", 2, resolver="198.51.100.53")
        topo.link(alpha.ns, "203.0.113.1/24", nss["lan"], "203.0.113.5/24")
        nss["lan"].run(["ip", "route", "replace", "default", "via", "203.0.113.1"])
        nss["lan"].serve_http("203.0.113.5", 80, "alpha files")
        nss["lan"].serve_tcp_echo("203.0.113.5", 7)
        alpha.cli("services", "add", "files", "--backend", "203.0.113.5:80")
        alpha.cli("services", "add", "echo", "--backend", "203.0.113.5:7")
        vips = {s["name"]: s["vip"] for s in alpha.cli("services", "list")}
        nss["phone"].device(alpha.add_device("phone"), hint="phone").up()
        nss["laptop"].device(beta.add_device("laptop"), hint="laptop").up()
        alpha.cli("connect", beta.invite()["string"])
        alpha.cli("share", "beta", "files")
        alpha.cli("share", "beta", "echo")
        wait_until(lambda: nss["laptop"].http_get("http://files.alpha.test/") == "alpha files",
                   30, "beta's laptop cannot use alpha's shared files")  # fmt: skip
        yield World(topo, inet, alpha, beta, nss["phone"], nss["laptop"], vips)


def sigterm(cell: Cell) -> int:
    """Stop the daemon with SIGTERM as a service manager would; its exit code (no SIGKILL)."""
    assert cell.proc is not None
    proc = cell.proc
    os.kill(proc.pid, signal.SIGTERM)
    wait_until(lambda: not proc.running(), 30, f"{cell.name}'s daemon did not exit on SIGTERM")
    cell.proc = None
    code = proc.popen.wait()
    return code


def all_works(w: World) -> bool:
    """alpha's device reaches a service by address and by name; beta's device reaches the
    service alpha shares with it by name."""
    return (
        w.phone.http_get(f"http://{w.vips['files']}/") == "alpha files"
        and w.phone.dig("files.alpha.test") == [w.vips["files"]]
        and w.laptop.dig("files.alpha.test") == [w.vips["files"]]
        and w.laptop.http_get("http://files.alpha.test/") == "alpha files"
    )


def test_a_second_serve_exits_naming_the_running_daemon(world: World) -> None:
    alpha = world.alpha
    assert alpha.proc is not None
    sock = alpha.data_dir / "admin.sock"
    before = sock.stat().st_ino
    second = alpha.run("serve", check=False, timeout=60)
    assert second.returncode == 1, second.stdout + second.stderr
    assert f"already running (pid {alpha.proc.pid})" in second.stderr
    assert "Traceback" not in second.stderr and "reconcile" not in second.stderr
    # the running daemon is unaffected: same admin socket, the CLI answers, devices work
    assert alpha.proc.running()
    assert sock.stat().st_ino == before
    assert alpha.cli("status")["name"] == "alpha"
    wait_until(lambda: all_works(world), 20, "the devices lost alpha after a second serve")


def test_tunnels_flows_and_dns_outlive_a_stopped_daemon_which_adopts_them_again(
    world: World,
) -> None:
    alpha, phone = world.alpha, world.phone
    wait_until(lambda: all_works(world), 20, "not working before the stop")
    wg_go = pids_of(alpha.ns, "wireguard-go")
    unbound = pids_of(alpha.ns, "unbound")
    assert len(wg_go) == 1 and len(unbound) == 1, (wg_go, unbound)
    routes = alpha.ns.run(["ip", "route", "show", "10.62.0.0/24"]).stdout
    assert alpha.interface in routes  # beta's network through the tunnel
    session = phone.tcp_echo_session("echo.alpha.test", 7)
    linked = world.laptop.tcp_echo_session("echo.alpha.test", 7)
    try:
        assert sigterm(alpha) == 0
        stopped = time.monotonic()
        assert not (alpha.data_dir / "admin.sock").exists()
        # everything picell put in place is still there and still serves
        assert pids_of(alpha.ns, "wireguard-go") == wg_go
        assert pids_of(alpha.ns, "unbound") == unbound
        alpha.ns.run(["nft", "list", "table", "inet", "picell"])
        assert alpha.ns.run(["ip", "route", "show", "10.62.0.0/24"]).stdout == routes
        wait_until(lambda: session.alive(since=stopped + 1), 20, "the flow died with the daemon")
        wait_until(lambda: linked.alive(since=stopped + 1), 20,
                   "the linked device's flow died with the daemon")  # fmt: skip
        wait_until(lambda: all_works(world), 20, "devices lost services with the daemon")
        assert alpha.run("status", check=False).returncode != 0  # stopped, truly

        alpha.start()
        started = time.monotonic()
        # adopted, not restarted: the same processes, one of each
        assert pids_of(alpha.ns, "wireguard-go") == wg_go
        assert pids_of(alpha.ns, "unbound") == unbound
        changes = alpha.cli("status")["last_reconcile"]["changes"]
        assert not [c for c in changes if c.startswith(("interface:", "dns:"))], changes
        assert "adopted" in alpha.log()
        wait_until(lambda: all_works(world), 20, "devices lost services after the restart")
        wait_until(lambda: session.alive(since=started + 1), 20, "the flow died at the restart")
        wait_until(lambda: linked.alive(since=started + 1), 20, "the linked flow died")
        assert alpha.cli("reconcile")["changed"] is False
    finally:
        session.stop()
        linked.stop()
        if alpha.proc is None:
            alpha.start()
    # an adopted child is supervised like one the daemon started: killed, it is restarted
    os.kill(unbound[0], signal.SIGKILL)
    wait_until(lambda: pids_of(alpha.ns, "unbound") not in ([], unbound), 30,
               "the adopted Unbound was not restarted")  # fmt: skip
    assert len(pids_of(alpha.ns, "unbound")) == 1
    wait_until(lambda: all_works(world), 30, "DNS did not come back")


def test_the_units_command_serves_a_cell_and_tells_systemd_it_is_ready(world: World) -> None:
    """What scripts/picell.service runs (ExecStart, Environment), run as systemd would, with a
    notify socket of our own: the cell answers and READY=1 arrives."""
    topo = world.topo
    ns = topo.add_ns("gamma")
    topo.attach(ns, world.inet, "198.51.100.3/24")
    gamma = Cell(topo, ns, "gamma", "gamma.test", "10.63.0.1/24", "198.51.100.3:51820")
    gamma.init()  # the owner's settings; the unit serves whatever the data dir holds
    unit = subprocess.run(
        [str(REPO / "scripts" / "service.sh"), "render", "/usr/local/bin/picell",
         str(gamma.data_dir)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    fields = [line.split("=", 1) for line in unit.splitlines() if "=" in line]
    env = dict(v.split("=", 1) for k, v in fields if k == "Environment")
    exec_start = next(v for k, v in fields if k == "ExecStart").split()
    assert exec_start[0] == "/usr/local/bin/picell" and env == {
        "PICELL_DATA_DIR": str(gamma.data_dir)
    }
    # /usr/local/bin/picell is the venv's console script (`picell = picell.cli:app`): the same
    # entry point as `python -m picell`, which imports this tree
    notify = topo.workdir / "gamma-notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(notify))
        server.settimeout(0.2)
        proc = ns.popen(
            [sys.executable, "-m", "picell", *exec_start[1:]],
            name="gamma-unit",
            env=dict(os.environ, **env, NOTIFY_SOCKET=str(notify), PYTHONUNBUFFERED="1"),
        )
        gamma.proc = proc
        got: list[bytes] = []

        def ready() -> bool:
            if not proc.running():
                raise AssertionError(f"the unit's command exited:\n{proc.log_text()}")
            with contextlib.suppress(TimeoutError):
                got.append(server.recv(100))
            return b"READY=1" in got

        wait_until(ready, 60, "no READY=1 from the unit's command")
        status = json.loads(gamma.run("status", "--json").stdout)
        assert status["name"] == "gamma" and status["last_reconcile"] is not None
        assert sigterm(gamma) == 0
        with contextlib.suppress(TimeoutError):
            while True:
                got.append(server.recv(100))
        assert b"STOPPING=1" in got
