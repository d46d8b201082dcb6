"""The supervised Unbound child: write its config, start it, reload it on change.

A changed config is written and applied with one `unbound-control reload`; an unchanged config
spawns nothing. Unbound runs in the foreground (`-d`) as a `Child`.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from pathlib import Path

from picell.errors import CommandFailed
from picell.system.children import Child, kill_stale
from picell.system.run import Runner


def read_upstreams(
    resolv_conf: Path = Path("/etc/resolv.conf"),
) -> tuple[ipaddress.IPv4Address, ...]:
    """IPv4 nameservers of the host's resolv.conf (observe; no process)."""
    found: list[ipaddress.IPv4Address] = []
    try:
        text = resolv_conf.read_text()
    except OSError:
        return ()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                found.append(ipaddress.IPv4Address(parts[1]))
            except ValueError:
                continue
    return tuple(found)


class Unbound:
    def __init__(
        self,
        runner: Runner,
        conf_path: Path,
        make_child: Callable[[str, list[str]], Child],
        name: str = "unbound",
    ) -> None:
        self.runner = runner
        self.conf_path = conf_path
        self.name = name
        self.pidfile = conf_path.with_suffix(".pid")
        self.make_child = make_child
        self.child: Child | None = None

    def running(self) -> bool:
        return self.child is not None and self.child.running()

    def needs(self, text: str) -> list[str]:
        """What applying `text` would change: 'config' and/or 'start'."""
        changes = []
        try:
            same = self.conf_path.read_text() == text
        except OSError:
            same = False
        if not same:
            changes.append("config")
        if not self.running():
            changes.append("start")
        return changes

    def apply(self, text: str, changes: list[str]) -> None:
        if "config" in changes:
            self.conf_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = self.conf_path.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.conf_path)
        if "start" in changes:
            if self.child is None:
                kill_stale(self.pidfile, "unbound")
                self.child = self.make_child(
                    self.name, ["unbound", "-d", "-p", "-c", str(self.conf_path)]
                )
            self.child.start()
            self.pidfile.write_text(f"{self.child.pid}\n")
        elif "config" in changes:
            self.reload()

    def reload(self) -> None:
        try:
            self.runner.run(["unbound-control", "-c", str(self.conf_path), "reload"])
        except CommandFailed:
            # Unbound may still be starting; restart it so the new config is read for sure.
            if self.child is not None:
                self.child.stop()
                self.child.start()
                self.pidfile.write_text(f"{self.child.pid}\n")

    def flush_zone(self, domain: str) -> None:
        """Forget cached answers (negative ones too) at or below `domain`: another cell
        changed what it lets us resolve there."""
        if self.running():
            self.runner.run(
                ["unbound-control", "-c", str(self.conf_path), "flush_zone", domain],
                ok_codes=(0, 1),
            )

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()
        else:
            kill_stale(self.pidfile, "unbound")  # left by a daemon killed earlier
