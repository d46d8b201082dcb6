"""Self-check of the network-namespace harness, with no picell involved.

A hand-configured wireguard-go "server" and a "device" importing a phone-style config text
through the real wg-quick::

                      pc<tag>switch
              +-----------------------------+
              |           br-inet           |   198.51.100.0/24
              +------+---------------+------+
                     |               |
            198.51.100.1/24     198.51.100.2/24
          +----------+-------+   +---+--------------+
          | pc<tag>srv       |   | pc<tag>dev       |
          | wireguard-go     |   | wg-quick up      |
          |  wgsrv<tag>N     |   |  wgdev<tag>N     |
          |  10.99.0.1/24  <=====> 10.99.0.2/32     |
          |  udp 51820       |   |  DNS 10.99.0.1   |
          | unbound :53      |   |  (resolv.conf of |
          | http :8080       |   |   the namespace) |
          | echo :7000       |   |                  |
          +------------------+   +------------------+

Must run as root; it never skips.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.netns.harness import (
    ETC_NETNS,
    STATE_DIR,
    WG_SOCKET_DIR,
    CommandError,
    Device,
    Netns,
    Proc,
    Topology,
    check_test_address,
    pid_alive,
    reap_stale,
    run,
    wait_until,
    wg_keypair,
)

SRV_IP = "198.51.100.1"
DEV_IP = "198.51.100.2"
WG_PORT = 51820
SRV_VPN_IP = "10.99.0.1"
HTTP_PORT = 8080
ECHO_PORT = 7000


@dataclass
class Tunnel:
    topo: Topology
    srv: Netns
    dev: Netns
    srv_if: str
    srv_wg: Proc
    dev_pub: str
    device: Device


def write_private(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    return path


def device_config(private_key: str, server_public_key: str) -> str:
    """The config text a phone would receive."""
    return (
        "[Interface]\n"
        f"PrivateKey = {private_key}\n"
        "Address = 10.99.0.2/32\n"
        f"DNS = {SRV_VPN_IP}\n"
        "\n"
        "[Peer]\n"
        f"PublicKey = {server_public_key}\n"
        f"Endpoint = {SRV_IP}:{WG_PORT}\n"
        "AllowedIPs = 10.99.0.0/24\n"
        "PersistentKeepalive = 25\n"
    )


def build_tunnel(topo: Topology) -> Tunnel:
    inet = topo.bridge("inet")
    srv = topo.add_ns("srv")
    dev = topo.add_ns("dev")
    topo.attach(srv, inet, f"{SRV_IP}/24")
    topo.attach(dev, inet, f"{DEV_IP}/24", gw=SRV_IP)

    srv_priv, srv_pub = wg_keypair()
    dev_priv, dev_pub = wg_keypair()
    srv_if = topo.ifname("wgsrv")
    srv_wg = srv.wireguard_go(srv_if)
    key = write_private(topo.workdir / "srv.key", srv_priv)
    srv.run(["wg", "set", srv_if, "private-key", str(key), "listen-port", str(WG_PORT),
             "peer", dev_pub, "allowed-ips", "10.99.0.2/32"])  # fmt: skip
    srv.run(["ip", "addr", "add", f"{SRV_VPN_IP}/24", "dev", srv_if])
    srv.run(["ip", "link", "set", srv_if, "up"])

    device = dev.device(device_config(dev_priv, srv_pub), hint="wgdev")
    device.up()
    return Tunnel(topo, srv, dev, srv_if, srv_wg, dev_pub, device)


@dataclass
class Leftovers:
    namespaces: list[str]
    pids: list[int]
    ifnames: list[str]


def snapshot(topo: Topology) -> Leftovers:
    pids = [p.pid for p in topo.procs]
    pids += [d.pid for d in topo.devices if d.pid is not None]
    return Leftovers([ns.name for ns in topo.namespaces], pids, list(topo.wg_ifnames))


def assert_all_removed(before: Leftovers) -> None:
    listed = run(["ip", "netns", "list"]).stdout.split()
    assert not set(before.namespaces) & set(listed), listed
    for name in before.namespaces:
        assert not (ETC_NETNS / name).exists(), name
        assert not (Path("/run/netns") / name).exists(), name
    for pid in before.pids:
        assert not pid_alive(pid), f"process {pid} still alive"
        assert not Path(f"/proc/{pid}").exists(), f"process {pid} left as a zombie"
    for ifname in before.ifnames:
        assert not (WG_SOCKET_DIR / f"{ifname}.sock").exists(), ifname
    wg_go = run(["pgrep", "-x", "wireguard-go"], check=False).stdout.split()
    assert not set(map(int, wg_go)) & set(before.pids)


@pytest.fixture(scope="module")
def tunnel() -> Iterator[Tunnel]:
    topo = Topology()
    try:
        yield build_tunnel(topo)
    finally:
        before = snapshot(topo)
        topo.close()
    assert_all_removed(before)


def unbound_config(workdir: Path) -> str:
    return "\n".join(
        [
            "server:",
            f"  interface: {SRV_VPN_IP}",
            "  access-control: 10.99.0.0/24 allow",
            "  do-daemonize: no",
            '  username: ""',
            '  chroot: ""',
            f'  directory: "{workdir}"',
            '  pidfile: ""',
            "  use-syslog: no",
            "  do-ip6: no",
            '  module-config: "iterator"',
            '  local-zone: "selfcheck.test." static',
            f'  local-data: "www.selfcheck.test. IN A {SRV_VPN_IP}"',
            "remote-control:",
            "  control-enable: no",
            "",
        ]
    )


# ------------------------------------------------------------------------------------------


def test_topology_basics(tunnel: Tunnel) -> None:
    topo, srv, dev = tunnel.topo, tunnel.srv, tunnel.dev
    for ns in topo.namespaces:
        assert ns.name.startswith(f"pc{topo.tag}") and len(ns.name) <= 15
    assert {ns.role for ns in topo.namespaces} == {"switch", "srv", "dev"}
    for ifname in topo.wg_ifnames:
        assert topo.tag in ifname and len(ifname) <= 15
    assert "lo: <LOOPBACK,UP" in dev.run(["ip", "-o", "link"]).stdout
    assert f"default via {SRV_IP}" in dev.run(["ip", "route", "show", "default"]).stdout
    assert dev.ping(SRV_IP)
    # A direct veth, next to the bridge.
    if_srv, if_dev = topo.link(srv, "203.0.113.1/30", dev, "203.0.113.2/30")
    assert len(if_srv) <= 15 and len(if_dev) <= 15
    assert dev.ping("203.0.113.1")
    with pytest.raises(ValueError):
        topo.attach(dev, topo.bridges[0], "10.1.2.3/24")
    with pytest.raises(ValueError):
        check_test_address("10.0.0.1/24")
    with pytest.raises(ValueError):
        check_test_address("192.168.1.1/24")
    check_test_address("203.0.113.7/24")


def test_device_pings_server_through_tunnel(tunnel: Tunnel) -> None:
    wait_until(lambda: tunnel.dev.ping(SRV_VPN_IP), 10, "no ping through the tunnel")
    assert tunnel.device.latest_handshake() > 0
    assert tunnel.device.pid is not None and pid_alive(tunnel.device.pid)
    assert Path(f"/proc/{tunnel.device.pid}/comm").read_text().strip() == "wireguard-go"


def test_dns_line_becomes_namespace_resolver(tunnel: Tunnel) -> None:
    assert tunnel.dev.resolv_conf() == f"nameserver {SRV_VPN_IP}\n"
    seen = tunnel.dev.run(["cat", "/etc/resolv.conf"]).stdout
    assert seen == f"nameserver {SRV_VPN_IP}\n"
    # The host's resolver and the server's namespace are untouched.
    assert SRV_VPN_IP not in Path("/etc/resolv.conf").read_text()
    assert tunnel.srv.resolv_conf() == "nameserver 127.0.0.1\n"  # the harness's default


def test_dns_and_http_helpers_through_tunnel(tunnel: Tunnel) -> None:
    srv, dev, topo = tunnel.srv, tunnel.dev, tunnel.topo
    conf = topo.workdir / "unbound.conf"
    conf.write_text(unbound_config(topo.workdir))
    unbound = srv.popen(["unbound", "-d", "-c", str(conf)], name="unbound")
    wait_until(
        lambda: dev.dig("www.selfcheck.test") == [SRV_VPN_IP],
        10,
        f"unbound did not answer: {unbound.log_text()}",
    )
    assert dev.dig_status("nope.selfcheck.test") == "NXDOMAIN"
    assert dev.dig("www.selfcheck.test", server=SRV_VPN_IP) == [SRV_VPN_IP]

    srv.serve_http(SRV_VPN_IP, HTTP_PORT, "hello from srv\n")
    assert dev.tcp_connect(SRV_VPN_IP, HTTP_PORT)
    assert not dev.tcp_connect(SRV_VPN_IP, HTTP_PORT + 1, timeout_s=1)
    # Name resolved by Python inside dev through the namespace's resolv.conf.
    assert dev.http_get(f"http://www.selfcheck.test:{HTTP_PORT}/x") == "hello from srv\n"
    assert dev.http_get(f"http://{SRV_VPN_IP}:{HTTP_PORT + 1}/", timeout_s=1) is None
    unbound.stop()
    assert dev.dig_status("www.selfcheck.test") == "TIMEOUT"


def test_tcp_echo_session_stops_on_partition_and_resumes(tunnel: Tunnel) -> None:
    topo, srv, dev = tunnel.topo, tunnel.srv, tunnel.dev
    srv.serve_tcp_echo(SRV_VPN_IP, ECHO_PORT)
    session = dev.tcp_echo_session(SRV_VPN_IP, ECHO_PORT)
    start = time.monotonic()
    wait_until(lambda: session.alive(since=start), 5, "echo session not alive")

    # Cut the underlay between the two WireGuard endpoints on the bridge.
    topo.partition(SRV_IP, DEV_IP)
    try:
        assert not dev.ping(SRV_IP, timeout_s=1)
        wait_until(lambda: session.silent_for(1.0), 5, "echo kept flowing across a partition")
        cut = time.monotonic()
        assert not session.alive(since=cut)
        assert session.running()  # the connection is starved, not closed
    finally:
        topo.heal()
    # TCP retransmits with backoff: the same connection resumes within a few seconds.
    wait_until(lambda: session.alive(since=cut), 20, "echo did not resume after heal")
    assert dev.ping(SRV_IP)
    session.stop()


def test_set_resolver_is_restored_after_device_down(tunnel: Tunnel) -> None:
    dev, device = tunnel.dev, tunnel.device
    pid = device.pid
    assert pid is not None
    device.down()
    assert not pid_alive(pid)
    assert dev.resolv_conf() == "nameserver 127.0.0.1\n"  # the default from before up()
    assert not (WG_SOCKET_DIR / f"{device.ifname}.sock").exists()
    assert dev.run(["ip", "link", "show", device.ifname], check=False).returncode != 0

    dev.set_resolver("192.0.2.53")
    device.up()
    assert dev.resolv_conf() == f"nameserver {SRV_VPN_IP}\n"
    wait_until(lambda: dev.ping(SRV_VPN_IP), 10, "no ping after device up again")
    device.down()
    assert dev.resolv_conf() == "nameserver 192.0.2.53\n"
    device.up()


def test_teardown_removes_everything_even_on_failure() -> None:
    topo = Topology()
    before: Leftovers | None = None
    with pytest.raises(RuntimeError, match="boom"):
        with topo:
            t = build_tunnel(topo)
            wait_until(lambda: t.dev.ping(SRV_VPN_IP), 10, "no ping through the tunnel")
            t.dev.popen(["sleep", "600"])
            t.srv.serve_http(SRV_VPN_IP, HTTP_PORT, "x")
            # A config wg-quick rejects after starting wireguard-go: still cleaned up.
            bad = t.dev.device(device_config("not-a-key", "not-a-key-either"), hint="wgbad")
            with pytest.raises(CommandError):
                bad.up()
            assert bad.pid is not None
            before = snapshot(topo)
            raise RuntimeError("boom")
    assert before is not None and len(before.pids) >= 5
    assert_all_removed(before)
    assert not (STATE_DIR / f"{topo.tag}.json").exists()
    assert not topo.workdir.exists()


def test_reap_stale_after_owner_killed(tmp_path: Path) -> None:
    """A run killed with SIGKILL leaves namespaces behind; the next one removes them."""
    code = (
        "import os, signal, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})\n"
        "from tests.netns.harness import Topology\n"
        "t = Topology()\n"
        "ns = t.add_ns('orphan')\n"
        "ns.popen(['sleep', '600'])\n"
        "print(ns.name, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    name = proc.stdout.strip()
    assert proc.returncode == -9 and name, proc.stderr
    assert name in run(["ip", "netns", "list"]).stdout
    assert name in reap_stale()
    assert name not in run(["ip", "netns", "list"]).stdout
    assert not (ETC_NETNS / name).exists()


def test_atexit_closes_a_forgotten_topology(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})\n"
        "from tests.netns.harness import Topology\n"
        "t = Topology()\n"
        "ns = t.add_ns('forgot')\n"
        "ns.popen(['sleep', '600'])\n"
        "print(ns.name, flush=True)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    name = proc.stdout.strip()
    assert proc.returncode == 0 and name, proc.stderr
    assert name not in run(["ip", "netns", "list"]).stdout
    assert not (ETC_NETNS / name).exists()
