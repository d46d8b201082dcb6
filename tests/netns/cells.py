"""Real picell cells inside test namespaces: init, serve, drive the CLI, kill, restart.

A `Cell` runs `picell serve` as a background process of its namespace (tracked by the
topology, so it is stopped at teardown) with its own data dir and a host-unique interface name.
The CLI is driven exactly as a user or script would: `picell --data-dir DIR … --json`.
A cell may run picell from another source tree (`source`, e.g. an older commit checked out for
the compatibility test): its daemon and its CLI then both import that tree's `picell`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from picell.routing.exits import exit_ifname
from tests.netns.harness import PYTHON, Bridge, Netns, Proc, Topology, wait_until

PICELL = [sys.executable, "-m", "picell"]


def python_argv(source: Path | None = None) -> list[str]:
    """The interpreter, importing `picell` from the tree `source` when given.

    `env -C` makes `source` the working directory, which `python -m`/`-c` put first on sys.path,
    ahead of PYTHONPATH and of the venv's editable install (same venv, same dependencies)."""
    return [sys.executable] if source is None else ["env", "-C", str(source), sys.executable]


class CliError(AssertionError):
    def __init__(self, argv: list[str], proc: subprocess.CompletedProcess[str]) -> None:
        super().__init__(f"{argv} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr


class Cell:
    def __init__(self, topo: Topology, ns: Netns, name: str, domain: str, address: str,
                 endpoint: str, source: Path | None = None) -> None:  # fmt: skip
        self.topo = topo
        self.source = source
        self.python = python_argv(source)
        self.picell = [*self.python, "-m", "picell"]
        self.ns = ns
        self.name = name
        self.domain = domain
        self.address = address
        self.ip = address.split("/")[0]
        self.endpoint = endpoint
        self.interface = topo.ifname("cell")
        topo.claim_wg_ifname(self.interface)  # its socket is removed even if picell is killed
        for slot in range(4):  # the exit tunnels picell may create (picell.routing.exits)
            topo.claim_wg_ifname(exit_ifname(self.interface, slot))
        self.data_dir = topo.workdir / f"data-{ns.name}"
        self.proc: Proc | None = None

    # -- CLI --
    def run(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:  # noqa: E501
        argv = [*self.picell, "--data-dir", str(self.data_dir), *args]
        proc = self.ns.run(argv, check=False, timeout=timeout)
        if check and proc.returncode != 0:
            raise CliError(argv, proc)
        return proc

    def cli(self, *args: str) -> Any:
        """Run a CLI command with --json and return the parsed answer (CliError on failure)."""
        return json.loads(self.run(*args, "--json").stdout)

    def refused(self, *args: str) -> dict[str, Any]:
        """Run a command that must be refused (exit 1); return the JSON error."""
        proc = self.run(*args, "--json", check=False)
        assert proc.returncode == 1, f"{args}: exit {proc.returncode}: {proc.stdout}{proc.stderr}"
        body: dict[str, Any] = json.loads(proc.stdout)
        return body

    # -- lifecycle --
    def init(self) -> None:
        self.run(
            *("init", "--name", self.name, "--domain", self.domain, "--address", self.address),
            *("--endpoint", self.endpoint, "--interface", self.interface),
        )

    def start(self, timeout_s: float = 30, nofile: tuple[int, int] | None = None) -> None:
        """Start `picell serve`; `nofile` (soft, hard) runs it under `prlimit --nofile`, as a
        service manager would (systemd: 1024 soft)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        limit = ["prlimit", f"--nofile={nofile[0]}:{nofile[1]}", "--"] if nofile else []
        self.proc = self.ns.popen(
            [*limit, *self.picell, "--data-dir", str(self.data_dir), "serve"],
            name=f"picell-{self.name}", env=env,
        )  # fmt: skip
        proc = self.proc

        def answers() -> bool:
            if not proc.running():
                raise RuntimeError(f"picell serve exited:\n{proc.log_text()}")
            return self.run("status", "--json", check=False).returncode == 0

        wait_until(answers, timeout_s, f"cell {self.name} did not start serving")

    def stop(self) -> None:
        """SIGTERM, as a service manager would; waits until the daemon has exited."""
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def kill(self) -> None:
        """SIGKILL: the daemon dies without stopping its children."""
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGKILL)
            proc = self.proc
            wait_until(lambda: not proc.running(), 10, "picell serve did not die")
            self.proc = None

    def picell_file(self) -> str:
        """`picell.__file__` as this cell's interpreter imports it (which source it runs)."""
        code = "import os, picell; print(os.path.realpath(picell.__file__))"
        return self.ns.run([*self.python, "-c", code]).stdout.strip()

    def log(self) -> str:
        return self.proc.log_text() if self.proc else ""

    def add_device(self, name: str, *extra: str) -> str:
        """Add a device and return its config text exactly as the owner would receive it."""
        config: str = self.cli("peers", "add", name, *extra)["config"]
        return config

    def wg_dump(self) -> list[list[str]]:
        out = self.ns.run(["wg", "show", self.interface, "dump"]).stdout
        return [line.split("\t") for line in out.splitlines()[1:]]

    def invite(self, expires: str = "24h") -> dict[str, Any]:
        """A fresh invite: {"invite": JSON, "string": copy-paste string}."""
        data: dict[str, Any] = self.cli("invite", "--expires", expires)
        return data

    def links(self) -> dict[str, dict[str, Any]]:
        return {c["name"]: c for c in self.cli("cells")}

    def journal(self, cell: str) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = self.cli("cells", "--journal", cell)
        return entries

    @property
    def unbound_conf(self) -> Path:
        return self.data_dir / "unbound" / "unbound.conf"


_POST = """
import http.client, json, sys, urllib.error, urllib.request
req = urllib.request.Request(sys.argv[1], data=sys.argv[2].encode(),
                             headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=float(sys.argv[3])) as resp:
        print(resp.status); print(resp.read().decode())
except urllib.error.HTTPError as exc:
    print(exc.code); print(exc.read().decode())
except (ConnectionResetError, http.client.RemoteDisconnected) as exc:
    print(0); print(json.dumps(str(exc)))  # shed at accept: no HTTP answer
except urllib.error.URLError as exc:  # reset while connecting: shed at accept too
    if not isinstance(exc.reason, ConnectionResetError):
        raise
    print(0); print(json.dumps(str(exc)))
"""


def post_json(ns: Netns, url: str, body: Any, timeout_s: float = 10) -> tuple[int, Any]:
    """POST JSON from inside `ns` (as another cell or an attacker would); (status, body).
    Status 0: the listener closed the connection without an answer (shed at accept)."""
    proc = ns.python(_POST, url, json.dumps(body), str(timeout_s), timeout=timeout_s + 10)
    if proc.returncode != 0:
        raise AssertionError(f"POST {url} failed: {proc.stderr}")
    status, _, text = proc.stdout.partition("\n")
    try:
        return int(status), json.loads(text)
    except ValueError:
        return int(status), text


def start_upstream_dns(ns: Netns, addr: str, records: dict[str, str], workdir: Path) -> Proc:
    """A plain Unbound in `ns` answering `records` (name -> IPv4), standing in for the internet's
    resolvers. Returns once it answers."""
    conf = workdir / f"upstream-{ns.name}.conf"
    lines = ["server:", '\tusername: ""', '\tchroot: ""', f'\tdirectory: "{workdir}"',
             '\tpidfile: ""', "\tuse-syslog: no", f"\tinterface: {addr}",
             "\taccess-control: 0.0.0.0/0 allow", '\tlocal-zone: "." static']  # fmt: skip
    lines += [f'\tlocal-data: "{n}. 60 IN A {ip}"' for n, ip in records.items()]
    conf.write_text("\n".join(lines) + "\n")
    proc = ns.popen(["unbound", "-d", "-p", "-c", str(conf)], name=f"upstream-{ns.name}")
    first = next(iter(records))
    wait_until(lambda: ns.dig(first, server=addr) == [records[first]], 15, "upstream DNS not up")
    return proc


def cell_on_bridge(
    topo: Topology,
    bridge: Bridge,
    role: str,
    number: int,
    resolver: str | None = None,
    source: Path | None = None,
    vpn: str | None = None,
) -> Cell:
    """A running cell `role` in its own namespace at 198.51.100.<number> on `bridge`: domain
    `<role>.test`, VPN network `vpn` (default 10.<60 + number>.0.1/24), endpoint port 51820;
    picell imported from `source` when given (see `python_argv`)."""
    ns = topo.add_ns(role)
    topo.attach(ns, bridge, f"198.51.100.{number}/24")
    if resolver is not None:
        ns.set_resolver(resolver)  # before the daemon starts: `ip netns exec` binds it then
    cell = Cell(topo, ns, role, f"{role}.test", vpn or f"10.{60 + number}.0.1/24",
                f"198.51.100.{number}:51820", source=source)  # fmt: skip
    cell.init()
    cell.start()
    return cell


def pids_of(ns: Netns, program: str) -> list[int]:
    """Running processes named `program` in `ns` (zombies left out), sorted."""
    found = []
    for pid in ns.pids():
        with contextlib.suppress(OSError):
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if Path(f"/proc/{pid}/comm").read_text().strip() == program and state != "Z":
                found.append(pid)  # a zombie waits for the harness's reaper: not running
    return sorted(found)


# GET argv[1] with the bearer token read from stdin (never in argv); prints the status (0: no
# answer at all) and the body
_SCRAPE = r"""
import sys, urllib.error, urllib.request
token = sys.stdin.read().strip()
request = urllib.request.Request(sys.argv[1])
if token:
    request.add_header("Authorization", "Bearer " + token)
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(request, timeout=2) as response:
        status, body = response.status, response.read()
except urllib.error.HTTPError as exc:
    status, body = exc.code, exc.read()
except OSError as exc:
    status, body = 0, repr(exc).encode()
print(status)
sys.stdout.write(body.decode("utf-8", "replace"))
"""


def scrape_metrics(ns: Netns, url: str, token: str = "") -> tuple[int, str]:
    """(status, body) of a /metrics scrape from `ns` with `token` (0: no answer at all)."""
    proc = ns.run([PYTHON, "-I", "-c", _SCRAPE, url], input=token, timeout=20)
    status, _, body = proc.stdout.partition("\n")
    return int(status), body


def sample(body: str, series: str) -> float | None:
    """The value of `series` (name and labels exactly as exposed) in a scrape's text."""
    for line in body.splitlines():
        name, _, number = line.rpartition(" ")
        if name == series:
            return float(number)
    return None
