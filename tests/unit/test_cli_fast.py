"""The CLI's fast path (`picell.cli.fast`) against the Typer CLI on the same admin answers.

A fake daemon (an HTTP server on a unix socket, answering from a table) serves both clients the
answers the admin API's own models make. Each case runs the Typer CLI (CliRunner, httpx over
the socket) and the fast path (in process), and compares stdout, stderr and the exit code,
byte for byte: success, `--json`, a refusal naming its field, a 5xx that is not JSON, a stopped
daemon. Both must also send the same requests. Then what the fast path hands to Typer, and that
`python -m picell status` really skips Typer, httpx and pydantic.
"""

from __future__ import annotations

import json
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from picell.api import models as m
from picell.cli import fast
from picell.cli.commands import app

NOW = 1_780_000_000.0
Answer = tuple[int, bytes, bool]  # status, body, sent chunked


def answer(value: BaseModel | list[BaseModel] | Any, status: int = 200) -> Answer:
    """What the daemon sends: the model's JSON (FastAPI's response_model), compact UTF-8."""
    data = m.dump(value) if isinstance(value, BaseModel | list) else value
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return status, text.encode(), False


class Daemon(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    routes: dict[tuple[str, str], Answer]
    seen: list[tuple[str, str, Any]]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Daemon

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        self.server.seen.append((self.command, self.path, json.loads(raw) if raw else None))
        status, body, chunked = self.server.routes.get(
            (self.command, self.path), (404, b'{"code":"not_found","message":"nope"}', False)
        )
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(body), 100):
                part = body[i : i + 100]
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    do_GET = do_POST = do_DELETE = do_PUT = answer


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    server = Daemon(str(tmp_path / "admin.sock"), Handler)
    server.routes, server.seen = {}, []
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """`status` shows a port mapping's seconds left: both clients read the same clock."""
    monkeypatch.setattr(time, "time", lambda: NOW)


Run = tuple[int, str, str]


def run_typer(data_dir: Path, args: list[str]) -> Run:
    result = CliRunner().invoke(app, ["--data-dir", str(data_dir), *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def run_fast(data_dir: Path, args: list[str], capsys: pytest.CaptureFixture[str]) -> Run:
    capsys.readouterr()
    code = fast.main(["--data-dir", str(data_dir), *args])
    assert code is not None, f"the fast path did not take {args}"
    out = capsys.readouterr()
    return code, out.out, out.err


def same(daemon: Daemon, args: list[str], capsys: pytest.CaptureFixture[str]) -> Run:
    """Both clients on `args`: the same output and requests; the fast path's run."""
    data_dir = Path(daemon.server_address).parent  # type: ignore[arg-type]
    daemon.seen.clear()
    typer_run = run_typer(data_dir, args)
    typer_seen = list(daemon.seen)
    daemon.seen.clear()
    fast_run = run_fast(data_dir, args, capsys)
    assert fast_run == typer_run
    assert daemon.seen == typer_seen
    return fast_run


# -- answers as the daemon's models make them --------------------------------------------------
def status(**changes: Any) -> m.StatusOut:
    base: dict[str, Any] = dict(
        name="alpha", domain="alpha.test", address="10.61.0.1/24", network="10.61.0.0/24",
        endpoint="192.0.2.1:51820", interface="pa0", public_key="K" * 43 + "=",
        listen_port=51820, dns="10.61.0.1", devices=2, services=1, dns_running=True,
        last_reconcile=None, last_error=None,
    )  # fmt: skip
    return m.StatusOut(**{**base, **changes})


RICH_STATUS = status(
    endpoints=["192.0.2.1:51820", "cell.example:51820"],
    endpoint_warnings=["192.0.2.1 is not reachable from outside"],
    device_endpoint_note="devices dial the first",
    last_error="wireguard-go did not start",
    dns_running=False,
    conflicts=[m.LinkConflict(cell="beta", network="172.17.0.0/16", overlaps="docker0")],
    port_mapping=m.PortMappingOut(
        protocol="pcp",
        external_address="198.51.100.7",
        external_port=40000,
        pair_external_port=40001,
        expires_at=NOW + 3599.6,
        warning="double NAT",
    ),  # fmt: skip
    host_firewall=[
        m.HostFirewallOut(
            owner="docker",
            table="ip filter",
            chain="FORWARD",
            hook="forward",
            what="drops forwarded traffic",
            action="accept rules added",
        )
    ],  # fmt: skip
    key_rotation=m.KeyRotationOut(in_flight=True, waiting_for=["beta", "gamma"]),
    restored_at=NOW - 86400,
    last_reconcile=m.ReportOut(
        changed=True, changes=["x"], warnings=["host firewall: said", "a route over a link"]
    ),
    unknown_to_this_cli={"kept": ["as", "is"]},
)


def link(**changes: Any) -> m.CellOut:
    base: dict[str, Any] = dict(
        name="beta", state="linked", domain="beta.test", vpn_subnet="10.62.0.0/24",
        dns_ip="10.62.0.1", endpoint="198.51.100.2:51820", public_key="B" * 43 + "=",
        auth_string="1234 5678", handshake_age_s=None, online=False, rx_bytes=0, tx_bytes=0,
        inbound=[], outbound=[], exit_offered=False, remote_exit_offered=False,
        exit_relay_active=False, remote_exit_relay_active=False, relaying=False, pending_push=0,
        last_push_status=None, last_push_at=None, last_push_error=None,
        last_remote_update_at=None, linked_at=None, pending_message=None, pending_error=None,
    )  # fmt: skip
    return m.CellOut(**{**base, **changes})


RICH_LINK = link(
    handshake_age_s=7, online=True, rx_bytes=1234, tx_bytes=99, seen_at="203.0.113.9:51820",
    endpoints=["198.51.100.2:51820", "beta.example:51820"],
    inbound=[m.SharedServiceOut(name="web", vip="10.61.0.100", ports=[80, 443]),
             m.SharedServiceOut(name="dns")],
    outbound=[m.SharedServiceOut(name="nas", vip="10.62.0.100", ports=[445])],
    exit_offered=True, remote_relay_offered=True, relaying=True, path="via gamma",
    relay_note="waiting for gamma", orphan=True, orphan_reason="it forgot us",
    rekey_state="pending", last_push_status="ok", last_push_at=NOW - 5,
    last_remote_update_at=NOW - 3, last_push_error="push failed once",
    pending_message="unlink", pending_error="timed out",
)  # fmt: skip

PEERS = [
    m.PeerLive(name="phone", address="10.61.0.2", public_key="P" * 43 + "=",
               fqdn="phone.alpha.test", own_key=False, route_via=None, created_at=NOW,
               handshake_age_s=12, rx_bytes=5,
               tx_bytes=6),
    m.PeerLive(name="laptop", address="10.61.0.3", public_key="L" * 43 + "=",
               fqdn="laptop.alpha.test", own_key=True, route_via="gamma", created_at=NOW),
]  # fmt: skip
SERVICES = [
    m.ServiceOut(name="web", fqdn="web.alpha.test", vip="10.61.0.100", port=80, protocol="tcp",
                 backend="192.0.2.10:8080"),
    m.ServiceOut(name="dns2", fqdn="dns2.alpha.test", vip="10.61.0.101", port=53, protocol="udp",
                 backend="192.0.2.10:5353"),
]  # fmt: skip
INVITE = m.InviteCreated(
    id=4, expires_at=NOW + 86400, string="picell1:abc", svg="<svg/>",
    invite=m.InviteJson(cell_name="alpha", domain="alpha.test", public_key="K" * 43 + "=",
                        endpoint="192.0.2.1:51820", vpn_subnet="10.61.0.0/24", dns_ip="10.61.0.1",
                        mesh_port=3000,
                        pairing=m.PairingOut(port=51821, token="t0k", expires_at=NOW + 86400)),
)  # fmt: skip
INVITES = [
    m.InviteRow(id=1, created_at=NOW - 99, expires_at=NOW + 9, used_at=None, used_by=None,
                state="open"),
    m.InviteRow(id=2, created_at=NOW - 99, expires_at=NOW - 9, used_at=None, used_by=None,
                state="expired"),
    m.InviteRow(id=13, created_at=NOW - 99, expires_at=NOW + 9, used_at=NOW - 1, used_by="beta",
                state="used"),
]  # fmt: skip
JOURNAL = [
    m.JournalEntryOut(id=1, at=NOW, link="beta", event="linked", actor="owner", detail=None),
    m.JournalEntryOut(id=2, at=NOW + 1, link="beta", event="share", actor="owner", detail="web"),
]
REFUSED = answer({"code": "not_found", "message": "no service named web2", "field": "service"}, 404)


# -- the cases ---------------------------------------------------------------------------------
READS = [
    (["status"], ("GET", "/api/status"), answer(RICH_STATUS)),
    (["status"], ("GET", "/api/status"), answer(status())),
    (["cells"], ("GET", "/api/cells"), answer([RICH_LINK, link(name="gamma", state="pending")])),
    (["cells", "list"], ("GET", "/api/cells"), answer([])),
    (["cells", "--journal", "beta"], ("GET", "/api/cells/journal?cell=beta"), answer(JOURNAL)),
    (["cells", "--journal=beta"], ("GET", "/api/cells/journal?cell=beta"), answer([])),
    (["peers", "list"], ("GET", "/api/peers"), answer(PEERS)),
    (["peers", "list"], ("GET", "/api/peers"), answer([])),
    (["services", "list"], ("GET", "/api/services"), answer(SERVICES)),
    (["services", "list"], ("GET", "/api/services"), answer([])),
    (["invites"], ("GET", "/api/cells/invites"), answer(INVITES)),
    (["invite"], ("POST", "/api/cells/invites"), answer(INVITE, 201)),
    (["invite", "--expires", "30m"], ("POST", "/api/cells/invites"), answer(INVITE, 201)),
    (["share", "beta", "web"], ("POST", "/api/cells/beta/shares/web"), answer(RICH_LINK)),
    (["unshare", "beta", "web"], ("DELETE", "/api/cells/beta/shares/web"), answer(link())),
]


REFUSALS = [
    (["share", "beta", "web2"], ("POST", "/api/cells/beta/shares/web2"), REFUSED),
    (["unshare", "zeta", "web"], ("DELETE", "/api/cells/zeta/shares/web"),
     answer({"code": "not_found", "message": "no linked cell named zeta", "field": "cell"}, 404)),
    (["invite", "--expires", "1s"], ("POST", "/api/cells/invites"),
     answer({"code": "invalid", "message": "expires_s: too short", "field": "expires_s"}, 422)),
    (["status"], ("GET", "/api/status"), (500, b"Internal Server Error", False)),
    (["peers", "list"], ("GET", "/api/peers"), answer({}, 409)),
]  # fmt: skip
CASES = READS + REFUSALS
CASE_IDS = [" ".join(r[0]) + f" {r[2][0]}" for r in CASES]


@pytest.mark.parametrize("as_json", [[], ["--json"]], ids=["human", "json"])
@pytest.mark.parametrize(("args", "route", "reply"), CASES, ids=CASE_IDS)
def test_same_output_as_the_typer_cli(
    daemon: Daemon, capsys: pytest.CaptureFixture[str], as_json: list[str],
    args: list[str], route: tuple[str, str], reply: Answer,
) -> None:  # fmt: skip
    """Answers and refusals (a 4xx naming its field, a 5xx that is not JSON, an empty body)."""
    daemon.routes[route] = reply
    code, out, err = same(daemon, [*args, *as_json], capsys)
    if reply[0] >= 400:
        assert code == 1 and (out if as_json else err).strip()
    else:
        assert code == 0 and out and not err
        assert not as_json or json.loads(out) == json.loads(reply[1])


@pytest.mark.parametrize("as_json", [[], ["--json"]], ids=["human", "json"])
@pytest.mark.parametrize("how", ["no socket", "nobody listens"])
def test_same_words_for_a_stopped_daemon(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], as_json: list[str], how: str
) -> None:
    if how == "nobody listens":  # a daemon killed -9 leaves its socket file behind
        with socket.socket(socket.AF_UNIX) as dead:
            dead.bind(str(tmp_path / "admin.sock"))
    for args in (["status"], ["share", "beta", "web"], ["cells"]):
        typer_run = run_typer(tmp_path, [*args, *as_json])
        assert run_fast(tmp_path, [*args, *as_json], capsys) == typer_run
        assert typer_run[0] == 1 and "the picell daemon is not running" in "".join(typer_run[1:])


def test_a_chunked_answer_reads_the_same(
    daemon: Daemon, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.routes[("GET", "/api/cells")] = (200, answer([RICH_LINK] * 3)[1], True)
    assert same(daemon, ["cells"], capsys)[1].count("authentication string") == 3


def test_the_environment_names_the_data_dir(
    daemon: Daemon, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon.routes[("GET", "/api/status")] = answer(status())
    monkeypatch.setenv("PICELL_DATA_DIR", str(Path(daemon.server_address).parent))  # type: ignore[arg-type]
    assert fast.main(["status"]) == 0
    assert capsys.readouterr().out.startswith("name: alpha\n")


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--help"],
        ["status", "--help"],
        ["status", "extra"],
        ["--json", "status"],
        ["share", "beta", "web", "nas"],  # several services: one change, the Typer CLI's
        ["share", "beta"],
        ["share", "beta", "web", "--device", "phone"],
        ["share", "beta", "we b"],
        ["unshare", "beta/x", "web"],
        ["invite", "--qr"],
        ["invite", "--expires", "soon"],
        ["invite", "--expires"],
        ["invites", "revoke", "3"],
        ["peers"],
        ["peers", "add", "tablet"],
        ["peers", "--json", "list"],
        ["services", "add"],
        ["cells", "publish-devices", "beta", "on"],
        ["cells", "--journal", "a b"],
        ["connect", "x"],
        ["reconcile"],
        ["serve"],
        ["--data-dir"],
        ["--data-dir", "--json", "status"],
    ],  # fmt: skip
)
def test_other_commands_go_to_the_typer_cli(args: list[str], tmp_path: Path) -> None:
    """None: `picell.cli.main` runs Typer, which says what is wrong (before any request)."""
    assert fast.main(args) is None


def test_an_unreadable_answer(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    """A GET it cannot read goes to the Typer CLI (which asks again and names the fault); a
    change is never sent twice: the fast path says so itself."""
    data_dir = str(Path(daemon.server_address).parent)  # type: ignore[arg-type]
    daemon.routes[("GET", "/api/status")] = answer({"name": "alpha"})
    daemon.routes[("POST", "/api/cells/beta/shares/web")] = answer({"name": "beta"})
    assert fast.main(["--data-dir", data_dir, "status"]) is None
    assert fast.main(["--data-dir", data_dir, "share", "beta", "web"]) == 1
    assert capsys.readouterr().err == "error: unexpected answer from the daemon\n"
    assert [s[:2] for s in daemon.seen] == [
        ("GET", "/api/status"), ("POST", "/api/cells/beta/shares/web")
    ]  # fmt: skip


def test_status_imports_no_typer_httpx_nor_pydantic(daemon: Daemon) -> None:
    """`python -m picell status`, as the console script runs it: the whole point of the path."""
    daemon.routes[("GET", "/api/status")] = answer(status())
    data_dir = str(Path(daemon.server_address).parent)  # type: ignore[arg-type]
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "picell", "--data-dir", data_dir, "status"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.startswith("name: alpha\n"), proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()}
    assert "picell.cli.fast" in imported
    assert not imported & {"typer", "click", "httpx", "pydantic", "picell.api.models", "ssl"}
