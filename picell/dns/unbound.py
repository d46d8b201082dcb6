"""The supervised Unbound child: write its config, start or adopt it, apply changes to it.

A changed config is always written (a restart reads the same). When only records or a view's
local zones changed since what this daemon last applied, the difference goes in with
`unbound-control` record commands (`picell.dns.delta`): Unbound keeps its cache and never stops
answering. Anything else, or a delta that fails, is one `unbound-control reload`. An unchanged
config spawns nothing. Unbound runs in the foreground (`-d`) as a `Child`. It keeps answering
while the daemon is stopped: the daemon leaves it running (`detach`) and the next daemon
adopts it (the Child's pid file) instead of starting a second one on the same port.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Callable
from pathlib import Path

from picell.dns import delta
from picell.errors import CommandFailed
from picell.state import DnsState
from picell.system.children import Child, kill_stale
from picell.system.run import Runner

log = logging.getLogger(__name__)


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
        # the DNS state the running Unbound holds, as far as this daemon knows (None: unknown,
        # the next change is a reload)
        self._applied: DnsState | None = None

    def running(self) -> bool:
        return self.child.running()

    def needs(self, text: str, dns: DnsState | None = None) -> list[str]:
        """What applying `text` (rendered from `dns`) would change: 'config' and/or 'start'.
        The first time, an Unbound left running by the previous daemon is adopted (not a
        change)."""
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
        if not changes:
            self._applied = dns  # it runs the file we would write: deltas start from here
        return changes

    def apply(self, text: str, changes: list[str], dns: DnsState | None = None) -> str:
        """Apply `text` (rendered from `dns`); answer how: 'delta', 'reload', 'start' or ''."""
        if changes == ["config"] and self._applied is not None and dns is not None:
            # the file first: the change commits only after this apply, so a daemon killed
            # before the commit leaves a file that differs from what its store renders, and
            # the next daemon reloads (written after the delta, it would match the old store
            # while the adopted Unbound held the new records, and be trusted)
            self._write(text)
            if self._delta(dns):
                self._applied = dns
                return "delta"
        self._applied = dns
        if "config" in changes:
            self._write(text)
        if "start" in changes:
            if not self._started:  # a daemon's first start: one we could not adopt is ended
                kill_stale(self.legacy_pidfile, "unbound")
            self._started = True
            self.child.start()
            self._note_pid()
            return "start"
        if "config" in changes:
            self.reload()
            return "reload"
        return ""

    def _delta(self, dns: DnsState | None) -> bool:
        """Apply the records that changed since the last apply; False: reload instead (the
        change is not only records, the state Unbound holds is unknown, or a command failed,
        which the reload that follows repairs)."""
        if dns is None or self._applied is None:
            return False
        commands = delta.plan(self._applied, dns)
        if not commands:  # None: not only records; []: the text differs for another reason
            return False
        for command in commands:
            try:
                out = self.runner.run(
                    ["unbound-control", "-c", str(self.conf_path), *command.args],
                    stdin=command.stdin,
                ).stdout
            except CommandFailed as exc:
                log.warning("unbound: %s failed (%s): reloading instead", command, exc.message)
                return False
            # `view_local_data` into a view that does not exist answers 0 and says so
            if not out.startswith(("ok", "added", "removed")) or "error" in out:
                log.warning("unbound: %s answered %r: reloading instead", command, out.strip())
                return False
        return True

    def _write(self, text: str) -> None:
        self.conf_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.conf_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.conf_path)

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
