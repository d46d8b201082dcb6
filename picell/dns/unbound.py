"""The supervised Unbound child: write its config, start or adopt it, reload it on change.

A changed config is written and applied with one `unbound-control reload`; an unchanged config
spawns nothing. Unbound runs in the foreground (`-d`) as a `Child`. It keeps answering while the
daemon is stopped: the daemon leaves it running (`detach`) and the next daemon adopts it (the
Child's pid file) instead of starting a second one on the same port.
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
        # where daemons before adoption kept Unbound's pid: still written, so that an older
        # daemon started on this data dir (a downgrade) ends ours and starts its own
        self.legacy_pidfile = conf_path.with_suffix(".pid")
        self.child = make_child(self.name, ["unbound", "-d", "-p", "-c", str(self.conf_path)])
        self._adopt_tried = False
        self._started = False  # this daemon started or adopted it once

    def running(self) -> bool:
        return self.child.running()

    def needs(self, text: str) -> list[str]:
        """What applying `text` would change: 'config' and/or 'start'. The first time, an
        Unbound left running by the previous daemon is adopted (not a change)."""
        if not self._adopt_tried:
            self._adopt_tried = True
            if self.child.adopt():
                self._started = True
                self._note_pid()
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
            if not self._started:  # a daemon's first start: one we could not adopt is ended
                kill_stale(self.legacy_pidfile, "unbound")
            self._started = True
            self.child.start()
            self._note_pid()
        elif "config" in changes:
            self.reload()

    def reload(self) -> None:
        try:
            self.runner.run(["unbound-control", "-c", str(self.conf_path), "reload"])
        except CommandFailed:
            # Unbound may still be starting; restart it so the new config is read for sure.
            self.child.stop()
            self.child.start()
            self._note_pid()

    def _note_pid(self) -> None:
        if self.child.pid is not None:
            self.legacy_pidfile.write_text(f"{self.child.pid}\n")

    def flush_zone(self, domain: str) -> None:
        """Forget cached answers (negative ones too) at or below `domain`: another cell
        changed what it lets us resolve there."""
        if self.running():
            self.runner.run(
                ["unbound-control", "-c", str(self.conf_path), "flush_zone", domain],
                ok_codes=(0, 1),
            )

    def detach(self) -> None:
        """The daemon stops: Unbound keeps answering; the next daemon adopts it."""
        self.child.detach()

    def stop(self) -> None:
        """This resolver is no longer wanted: end it."""
        if not self.child.running():
            self.child.adopt()  # one left by an earlier daemon is ended too
        self.child.stop()
