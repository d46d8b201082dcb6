"""Reconcile cost with 1, 50 and 250 devices and 50 services, on the real system.

Measures, inside a scratch network namespace with real wireguard-go, nftables and Unbound:
- "change": one device added (or removed) and the reconcile that converges it: wall time and
  processes spawned;
- "no-op": a reconcile with nothing to do: wall time, processes, write commands, and WireGuard
  handshake resets of a device that really handshook with the cell (a second wireguard-go in the
  same namespace, over loopback);
- "full apply": all N devices onto an interface without peers, picell (`wg syncconf`, one
  process) against the baseline a naive control plane uses (`wg set` once per peer), measured
  in the same run; the ratio is picell / baseline.

Run as root from the repo root:  .venv/bin/python bench/reconcile.py [--reps 20] [--json]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._netns import run_in_netns, scratch_netns  # noqa: E402
from bench._stats import quantiles  # noqa: E402
from picell.cellinit import InitRequest  # noqa: E402
from picell.control import Control  # noqa: E402
from picell.paths import Paths  # noqa: E402
from picell.reconcile import Reconciler  # noqa: E402
from picell.store import peers as peer_table  # noqa: E402
from picell.store import services as service_table  # noqa: E402
from picell.store.db import Store  # noqa: E402
from picell.store.peers import Peer  # noqa: E402
from picell.store.services import Service  # noqa: E402
from picell.system.children import Child  # noqa: E402
from picell.system.run import Runner  # noqa: E402
from picell.wireguard import keys  # noqa: E402
from picell.wireguard.apply import apply_wg  # noqa: E402
from picell.wireguard.render import render_interface  # noqa: E402


def inner(reps: int, sizes: list[int]) -> dict[str, Any]:

    tag = secrets.token_hex(2)
    cell_if, dev_if, spare_if = f"pcbc{tag}", f"pcbd{tag}", f"pcbs{tag}"
    results: dict[str, Any] = {"sizes": {}}
    with tempfile.TemporaryDirectory(prefix="picell-bench-") as tmp:
        paths = Paths(Path(tmp))
        paths.run_dir.mkdir()
        paths.unbound_dir.mkdir()
        children: list[Child] = []

        def make_child(name: str, argv: list[str]) -> Child:
            children.append(Child(name, argv, paths.run_dir / f"{name}.log"))
            return children[-1]

        store = Store(paths.db)
        runner = Runner()
        reconciler = Reconciler(runner, paths, make_child)
        control = Control(store, runner, reconciler)
        control.init_cell(
            InitRequest(name="bench", domain="bench.test", address="10.61.0.1/23",
                        endpoint="127.0.0.1:51999", interface=cell_if, listen_port=51999)
        )  # fmt: skip
        spawned = [
            subprocess.Popen(
                ["wireguard-go", "-f", name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )  # fmt: skip
            for name in (dev_if, spare_if)
        ]
        try:
            dev_private = keys.generate_private()
            dev_public = keys.public_from_private(dev_private)
            with store.transaction() as conn:
                peer_table.add(conn, Peer("real", dev_public, None, 2, None, time.time()))
                local = ipaddress.IPv4Address("127.0.0.1")
                for i in range(50):
                    service_table.add(conn, Service(f"svc{i}", i + 1, local, 8000 + i, "tcp", 80))
            control.converge()
            _connect_device(runner, dev_if, dev_private, control.status()["public_key"])
            added = 1
            for n in sizes:
                with store.transaction() as conn:
                    for i in range(added, n):
                        key = keys.public_from_private(keys.generate_private())
                        peer_table.add(conn, Peer(f"d{i}", key, None, i + 2, None, time.time()))
                added = max(added, n)
                control.converge()
                results["sizes"][n] = _measure(control, store, runner, cell_if, spare_if, reps, n)
        finally:
            for proc in spawned:
                proc.terminate()
                proc.wait()
            reconciler.stop()
            store.close()
    return results


def _connect_device(runner: Any, dev_if: str, private: str, cell_public: str) -> None:
    with tempfile.NamedTemporaryFile("w", delete=False) as fh:
        os.chmod(fh.name, 0o600)
        fh.write(private)
    deadline = time.monotonic() + 10
    while not Path(f"/var/run/wireguard/{dev_if}.sock").exists():
        if time.monotonic() > deadline:
            raise RuntimeError("device wireguard-go did not start")
        time.sleep(0.05)
    runner.run(["ip", "link", "set", dev_if, "up"])
    runner.run(["wg", "set", dev_if, "private-key", fh.name, "peer", cell_public,
                "endpoint", "127.0.0.1:51999", "allowed-ips", "10.61.0.1/32",
                "persistent-keepalive", "1"])  # fmt: skip
    os.unlink(fh.name)


def _handshake(runner: Any, ifname: str, key: str) -> int:
    for line in runner.run(["wg", "show", ifname, "dump"]).stdout.splitlines()[1:]:
        fields = line.split("\t")
        if fields[0] == key:
            return int(fields[4])
    return 0


def _measure(
    control: Any, store: Any, runner: Any, ifname: str, spare_if: str, reps: int, n: int
) -> Any:

    real_key = next(p["public_key"] for p in control.list_peers() if p["name"] == "real")
    deadline = time.monotonic() + 15
    while _handshake(runner, ifname, real_key) == 0:
        if time.monotonic() > deadline:
            dump = runner.run(["wg", "show", "all", "dump"]).stdout
            raise RuntimeError(f"the device never handshook with the cell:\n{dump}")
        time.sleep(0.1)

    change_s, change_procs = [], []
    for _ in range(reps):
        key = keys.public_from_private(keys.generate_private())
        for op in ("add", "remove"):
            with store.transaction() as conn:
                if op == "add":
                    peer_table.add(conn, Peer("extra", key, None, 500, None, time.time()))
                else:
                    peer_table.remove(conn, "extra")
            t0 = time.perf_counter()
            report = control.converge()
            change_s.append(time.perf_counter() - t0)
            change_procs.append(len(report.commands))

    handshake_before = _handshake(runner, ifname, real_key)
    noop_s, noop_procs, noop_writes = [], [], 0
    for _ in range(reps):
        t0 = time.perf_counter()
        report = control.converge()
        noop_s.append(time.perf_counter() - t0)
        noop_procs.append(len(report.commands))
        noop_writes += len(report.write_commands)
    resets = int(_handshake(runner, ifname, real_key) != handshake_before)

    # full apply of all N peers onto a second, empty interface (so the real session above is
    # not disturbed): picell's one `wg syncconf` against one `wg set` per peer
    state = replace(control.build(store.conn), interface=spare_if, listen_port=52999)
    text = render_interface(state.wg)
    conf = Path(tempfile.mkdtemp()) / "wg.conf"
    empty = conf.with_name("empty.conf")
    empty.write_text(f"[Interface]\nPrivateKey = {state.private_key}\nListenPort = 52999\n")
    full_s, naive_s = [], []
    for _ in range(max(3, reps // 4)):
        runner.run(["wg", "syncconf", spare_if, str(empty)])
        t0 = time.perf_counter()
        apply_wg(runner, state.interface, text, conf)
        full_s.append(time.perf_counter() - t0)
        runner.run(["wg", "syncconf", spare_if, str(empty)])
        t0 = time.perf_counter()
        for peer in state.peers:
            runner.run(["wg", "set", spare_if, "peer", peer.public_key,
                        "allowed-ips", ",".join(str(a) for a in peer.allowed_ips)])  # fmt: skip
        naive_s.append(time.perf_counter() - t0)
    shutil.rmtree(conf.parent)
    return {
        "devices": n,
        "services": 50,
        "change_s": quantiles(change_s),
        "change_processes": sorted(set(change_procs)),
        "noop_s": quantiles(noop_s),
        "noop_processes": sorted(set(noop_procs)),
        "noop_write_commands": noop_writes,
        "noop_handshake_resets": resets,
        "full_apply_s": quantiles(full_s),
        "baseline_wg_set_per_peer_s": quantiles(naive_s),
        "full_apply_ratio": statistics.median(full_s) / statistics.median(naive_s),
    }


def show(results: dict[str, Any]) -> None:
    ms = 1000.0
    print(f"{'devices':>7} {'change ms med/p95':>18} {'procs':>6} {'no-op ms med/p95':>17} "
          f"{'procs':>6} {'writes':>6} {'resets':>6} {'full ms':>8} {'wg set/peer ms':>14} "
          f"{'ratio':>6}")  # fmt: skip
    for n, r in results["sizes"].items():
        print(
            f"{n:>7} {r['change_s']['median'] * ms:>8.1f}/{r['change_s']['p95'] * ms:<9.1f} "
            f"{','.join(map(str, r['change_processes'])):>6} "
            f"{r['noop_s']['median'] * ms:>7.1f}/{r['noop_s']['p95'] * ms:<9.1f} "
            f"{','.join(map(str, r['noop_processes'])):>6} {r['noop_write_commands']:>6} "
            f"{r['noop_handshake_resets']:>6} {r['full_apply_s']['median'] * ms:>8.1f} "
            f"{r['baseline_wg_set_per_peer_s']['median'] * ms:>14.1f} "
            f"{r['full_apply_ratio']:>6.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--sizes", default="1,50,250")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--inner", help=argparse.SUPPRESS)  # file for the results
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.inner:
        Path(args.inner).write_text(json.dumps(inner(args.reps, sizes)))
        return
    with scratch_netns("pcbr") as ns, tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        argv = [sys.executable, __file__, "--inner", str(out), "--reps", str(args.reps)]
        if run_in_netns(ns, [*argv, "--sizes", args.sizes]) != 0:
            sys.exit("the benchmark failed inside its namespace")
        results = json.loads(out.read_text())
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        show(results)


if __name__ == "__main__":
    main()
