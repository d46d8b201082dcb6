"""The reconciler: converge the system to a desired `State` (build → render → apply → observe).

`Reconciler.set(state)` observes WireGuard, addresses, routes, the nft table and the other
tables' chains (five read commands, one more per other table that may drop what we need),
applies only what differs (at most `wg syncconf`, one `ip -batch`, one `nft -f`, Unbound's
changed records as `unbound-control` deltas (a remove and an add per view whose records
changed, one per view zone changed) or else one `unbound-control reload`, and our accept rules
in Docker's DOCKER-USER when they are missing), and returns a `Report`. Called twice with the
same state the second call changes nothing, reports changed=False and resets no WireGuard
session. The number of processes it spawns does not depend on the number of devices or
services.

What the observers could not read (`anomalies`) is drift that the apply repairs, and what the
reconciler must not repair itself (`warnings`: a linked network the host routes itself, no
uplink to lend) is reported; both are logged when they change, never raised.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from picell.constants import EXIT_MAX_SLOTS
from picell.dns.render import render_exit_resolver, render_unbound
from picell.dns.unbound import Unbound
from picell.errors import ApplyFailed, CommandFailed
from picell.firewall.apply import (
    apply_grant_delta,
    apply_ruleset,
    cut_flows,
    cut_relay_flows,
    has_flows,
    list_flows,
    observe_table,
    plan_revocations,
)
from picell.firewall.host import HostFirewall
from picell.firewall.render import grant_elements, render_grant_delta, render_ruleset
from picell.mesh.relay import RelayRule
from picell.metrics import Metrics
from picell.paths import Paths
from picell.routing.apply import (
    apply_link,
    foreign_in_main,
    observe_links,
    observe_routes,
    ours_in_main,
    plan_link,
    route_conflicts,
)
from picell.routing.exits import (
    TableRoute,
    exit_ifname,
    exit_table_routes,
    foreign_in_exit_tables,
    observe_rules,
    plan_exit_link,
    plan_exit_routing,
)
from picell.routing.host import default_uplinks
from picell.state import ExitTunnel, Grant, State, WgDevice
from picell.system.children import Child, write_sysctl
from picell.system.run import Runner
from picell.wireguard.apply import (
    ObservedWg,
    adopt_userspace,
    apply_wg,
    interface_exists,
    kernel_wireguard,
    observe_wg,
    start_userspace,
    wg_needs_sync,
)
from picell.wireguard.follow import EndpointFollower
from picell.wireguard.render import render_interface

log = logging.getLogger(__name__)

# Commands that only read the system; everything else a reconcile spawns is a write.
READ_COMMANDS = {("wg", "show"), ("nft", "-j"), ("ip", "-j"), ("conntrack", "-L")}
# Besides the constant set above, a reconcile that revokes grants runs one `conntrack -L`, and
# one `conntrack -D` per revoked grant that has tracked flows.


@dataclass(frozen=True)
class Change:
    """One difference between desired and observed state, as applied."""

    area: str  # interface, wireguard, address, firewall, dns, sysctl
    kind: str  # add, remove, update, create, start
    target: str

    def __str__(self) -> str:
        return f"{self.area}: {self.kind} {self.target}"


@dataclass
class Report:
    changes: list[Change] = field(default_factory=list)
    commands: list[tuple[str, ...]] = field(default_factory=list)
    uplink: tuple[str, ...] = ()  # where an exit lends: configured, or the default route's
    warnings: list[str] = field(default_factory=list)  # what we must not repair ourselves
    anomalies: list[str] = field(default_factory=list)  # observations we could not read

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    @property
    def write_commands(self) -> list[tuple[str, ...]]:
        return [c for c in self.commands if tuple(c[:2]) not in READ_COMMANDS]

    def as_dict(self) -> dict[str, object]:
        return {
            "changed": self.changed,
            "changes": [str(c) for c in self.changes],
            "commands": [list(c) for c in self.commands],
            "processes": len(self.commands),
            "write_commands": len(self.write_commands),
            "uplink": list(self.uplink),
            "warnings": list(self.warnings),
            "anomalies": list(self.anomalies),
        }


class Reconciler:
    def __init__(
        self,
        runner: Runner,
        paths: Paths,
        make_child: Callable[[str, list[str]], Child],
    ) -> None:
        self.runner = runner
        self.paths = paths
        self.make_child = make_child
        self.unbound = Unbound(runner, paths.unbound_conf, make_child)
        self.wg_child: Child | None = None
        self.exit_children: dict[str, Child] = {}  # wireguard-go of exit tunnels, by interface
        self.exit_resolvers: dict[int, Unbound] = {}  # resolvers of routed devices, by slot
        # peer endpoints as we last applied them, by interface
        self._endpoints: dict[str, dict[str, str]] = {}
        self.observed: dict[str, ObservedWg] = {}  # the last `wg show` of each interface
        self.clock: Callable[[], float] = time.time
        # which endpoint each linked cell's peer gets (tests replace `clock`: read it late)
        self.endpoints = EndpointFollower(lambda: self.clock())
        self._grants: set[Grant] = set()  # grants as we last applied them
        self._relay_rules: set[RelayRule] = set()  # relayed flows as we last applied them
        self._nft_seen: tuple[str, str] | None = None  # (digest, kernel fingerprint) we applied
        self._lock = threading.Lock()
        self.host_firewall = HostFirewall(runner)  # other tables in our way (Docker, ufw...)
        self.last: Report | None = None
        self.applied: Counter[str] = Counter()  # write transactions since start, by kind
        self.anomalies: Counter[str] = Counter()  # unreadable observations since start, by tool
        self._notes: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())  # last logged
        self._adopt_tried: set[str] = set()
        self._swept_resolvers = False  # interfaces whose wireguard-go we looked for
        self.metrics = Metrics()  # the daemon puts its own in (picell/metrics.py)
        self._state: State | None = None  # the last state applied (drift: same state, changes)

    @property
    def grants(self) -> frozenset[Grant]:
        """The grants as last applied (the metrics read them)."""
        return frozenset(self._grants)

    def set(self, state: State) -> Report:
        with self._lock:
            self.runner.take_history()
            report = Report()
            started, self.endpoints.tries = time.monotonic(), 0
            try:
                self._converge(state, report)
            except CommandFailed as exc:
                self.metrics.reconciled(time.monotonic() - started, None, False)
                raise ApplyFailed(f"applying the cell's state failed: {exc.message}") from exc
            finally:
                report.commands = self.runner.take_history()
            if report.changed:
                log.info("reconcile: %s", "; ".join(str(c) for c in report.changes))
            self._log_notes(report)
            same = state == self._state and not self.endpoints.tries
            self.metrics.reconciled(time.monotonic() - started, report, same)
            self.last, self._state = report, state
            return report

    def _converge(self, state: State, report: Report) -> None:
        ifname = state.interface
        if not interface_exists(ifname):
            self._create_interface(ifname)
            report.changes.append(Change("interface", "create", ifname))
        elif self.wg_child is None:
            self.wg_child = self._adopt_interface(ifname)

        self._sync_wg(state.wg, self.paths.wg_conf, report)
        self._converge_exit_interfaces(state, report)

        routes = observe_routes(self.runner)
        observed_links, link_anomalies = observe_links(self.runner)
        report.anomalies += [*routes.anomalies, *link_anomalies]
        linked = tuple(link.routed for link in state.links)
        lines = plan_link(
            ifname,
            state.address,
            observed_links.get(ifname),
            linked,
            ours_in_main(routes, ifname),
            frozenset(r.dst for r in foreign_in_main(routes, ifname)),
        )
        report.warnings += route_conflicts(linked, routes, ifname)
        report.warnings += foreign_in_exit_tables(routes)
        for tunnel in state.exits:
            if tunnel.wg is not None:
                lines += plan_exit_link(
                    tunnel.interface, state.address.ip, tunnel.mtu,
                    observed_links.get(tunnel.interface),
                )  # fmt: skip
        want_routes, want_rules = _exit_routing(state.exits)
        table_routes, odd_routes = exit_table_routes(routes)
        if want_rules or table_routes or odd_routes:  # rules are read only where exits are/were
            lines += plan_exit_routing(
                want_routes, table_routes, want_rules, observe_rules(self.runner), odd_routes
            )
        if lines:
            apply_link(self.runner, lines)
            report.changes += [Change("address", "update", line) for line in lines]

        report.uplink = (
            (state.uplink,) if state.uplink else default_uplinks(routes, state.wg_interfaces)
        )
        if not report.uplink:
            report.warnings.append(
                "no default route and no configured uplink: the home exit and the relay lend "
                "nothing (fail closed)"
            )

        for key, value in (
            ("net.ipv4.ip_forward", "1"),  # LAN-backed services are forwarded
            (f"net.ipv4.conf.{ifname}.route_localnet", "1"),  # DNAT to 127.0.0.1 backends
            # an exit tunnel carries sources (the internet's, or a linked cell's devices) that
            # the main table routes elsewhere: check them loosely
            *((f"net.ipv4.conf.{t.interface}.rp_filter", "2") for t in state.exits if t.wg),
        ):
            if write_sysctl(key, value):
                report.changes.append(Change("sysctl", "update", f"{key}={value}"))

        text, digest = render_ruleset(state, report.uplink)
        want_grants = grant_elements(state)
        observed = observe_table(self.runner)
        if observed is not None:
            report.anomalies += observed.anomalies
        in_sync = (
            observed is not None
            and not observed.anomalies  # what we cannot read, we replace whole
            and observed.digest == digest
            and self._nft_seen == (digest, observed.fingerprint)
        )
        if not in_sync:
            apply_ruleset(self.runner, text, self.paths.nft_file)
            self.applied["nft table"] += 1
            after = observe_table(self.runner)
            self._nft_seen = (digest, after.fingerprint) if after else None
            report.changes.append(
                Change("firewall", "create" if observed is None else "update", "inet picell")
            )
        elif observed is not None and observed.grants != want_grants:
            apply_grant_delta(self.runner, render_grant_delta(observed.grants, want_grants))
            self.applied["nft grant delta"] += 1
            report.changes.append(Change("firewall", "update", "grants"))
        host = self.host_firewall.converge(state)  # never raises: what fails is reported
        report.changes += [Change("host firewall", "add", rule) for rule in host.added]
        report.warnings += host.warnings
        report.anomalies += host.anomalies
        revoked = plan_revocations(self._grants, state.grants)
        # a revoked grant: its established flows stop too. One `conntrack -L` first, so a
        # burst of revocations costs one process, plus a `-D` per grant that has flows
        flows = list_flows(self.runner) if revoked else None
        for grant in revoked:
            if has_flows(grant, flows):
                cut_flows(self.runner, grant)
                report.changes.append(Change("conntrack", "remove", grant.element))
        self._grants = set(state.grants)
        for rule in sorted(self._relay_rules - set(state.relay.rules)):
            cut_relay_flows(self.runner, rule)  # a withdrawn relay: its path ends at once
            report.changes.append(Change("conntrack", "remove", f"relay {rule.label}"))
        self._relay_rules = set(state.relay.rules)

        conf = render_unbound(state.dns, self.paths.unbound_dir, self.paths.unbound_control)
        dns_changes = self.unbound.needs(conf, state.dns)
        if dns_changes:
            how = self.unbound.apply(conf, dns_changes, state.dns)
            # a record delta keeps Unbound answering (and its cache); "unbound" counts the rest
            self.applied["unbound records" if how == "delta" else "unbound"] += 1
            kinds = ["records"] if how == "delta" else dns_changes
            report.changes += [Change("dns", k, "unbound") for k in kinds]
        self._converge_exit_resolvers(state, report)

    def _sync_wg(self, dev: WgDevice, conf_path: Path, report: Report) -> None:
        observed = observe_wg(self.runner, dev.interface)
        if observed is not None:
            report.anomalies += [f"{dev.interface}: {a}" for a in observed.anomalies]
            self.observed[dev.interface] = observed
        else:
            self.observed.pop(dev.interface, None)
        applied = self._endpoints.setdefault(dev.interface, {})
        dev, retry = self.endpoints.follow(dev, observed, applied)
        changes = wg_needs_sync(dev, observed, applied)
        if changes:
            apply_wg(self.runner, dev.interface, render_interface(dev), conf_path)
            self.applied["wg syncconf"] += 1
            applied.update({p.public_key: p.endpoint for p in dev.peers if p.endpoint})
            for gone in set(applied) - {p.public_key for p in dev.peers}:
                del applied[gone]
            report.changes += [Change("wireguard", k, t) for k, t in changes]
        for peer in retry:  # stale, tried already: the next candidate, a name resolved anew
            assert peer.endpoint is not None
            self.runner.run(["wg", "set", dev.interface, "peer", peer.public_key, "endpoint",
                             peer.endpoint], ok_codes=(0, 1))  # fmt: skip
            applied[peer.public_key] = peer.endpoint
            report.changes.append(Change("wireguard", "endpoint", f"{peer.name} {peer.endpoint}"))

    def _log_notes(self, report: Report) -> None:
        """Count anomalies; log warnings and anomalies when they change, not every period."""
        self.anomalies.update(a.split(":", 1)[0] for a in report.anomalies)
        notes = (tuple(report.warnings), tuple(sorted(set(report.anomalies))))
        if notes != self._notes:
            for warning in notes[0]:
                log.warning("reconcile: %s", warning)
            if notes[1]:
                log.warning("reconcile: unexpected observations (drift, repaired): %s",
                            "; ".join(notes[1]))  # fmt: skip
        self._notes = notes

    def _converge_exit_interfaces(self, state: State, report: Report) -> None:
        """One WireGuard interface per exit tunnel that is up; any other of our exit names that
        exists (a withdrawn offer, a daemon killed earlier) is removed."""
        wanted = {t.interface: t.wg for t in state.exits if t.wg is not None}
        for slot in range(EXIT_MAX_SLOTS + 1):
            name = exit_ifname(state.interface, slot)
            if name not in wanted and interface_exists(name):
                self._remove_interface(name)
                report.changes.append(Change("interface", "remove", name))
        for name, dev in sorted(wanted.items()):
            if interface_exists(name) and name not in self.exit_children:
                child = self._adopt_interface(name)
                if child is not None:
                    self.exit_children[name] = child
            if not interface_exists(name):
                child = self.exit_children.pop(name, None)
                if child is not None:
                    child.stop()
                if not kernel_wireguard(self.runner, name):
                    self.exit_children[name] = start_userspace(name, self.make_child)
                self._endpoints.pop(name, None)
                report.changes.append(Change("interface", "create", name))
            self._sync_wg(dev, self.paths.run_dir / f"wg-{name}.conf", report)

    def _adopt_interface(self, name: str) -> Child | None:
        """Once per daemon and interface: the wireguard-go the previous daemon left serving
        it (the tunnel outlived the daemon), supervised again; None for a kernel interface."""
        if name in self._adopt_tried:
            return None
        self._adopt_tried.add(name)
        return adopt_userspace(name, self.make_child)

    def _remove_interface(self, name: str) -> None:
        child = self.exit_children.pop(name, None) or self._adopt_interface(name)
        if child is not None:
            child.stop()  # wireguard-go takes its interface with it
        if interface_exists(name):
            self.runner.run(["ip", "link", "del", "dev", name], ok_codes=(0, 1))
        self._endpoints.pop(name, None)

    def _converge_exit_resolvers(self, state: State, report: Report) -> None:
        """A resolver per exit cell our devices use: their internet lookups go to that cell's
        resolver through the link, never to our upstreams (no DNS leak)."""
        wanted = {t.slot: t for t in state.exits if not t.relay}
        if not self._swept_resolvers:  # resolvers an earlier daemon left for exits now gone
            self._swept_resolvers = True
            for slot in range(EXIT_MAX_SLOTS + 1):
                if slot not in wanted and slot not in self.exit_resolvers:
                    self._exit_resolver(slot).stop()
        for slot in sorted(set(self.exit_resolvers) - set(wanted)):
            self.exit_resolvers.pop(slot).stop()
            report.changes.append(Change("dns", "remove", f"exit resolver {slot}"))
        for slot, tunnel in sorted(wanted.items()):
            resolver = self.exit_resolvers.get(slot)
            if resolver is None:
                resolver = self.exit_resolvers[slot] = self._exit_resolver(slot)
            conf = render_exit_resolver(
                state, tunnel, self.paths.unbound_dir, self.paths.unbound_dir / f"exit{slot}.sock"
            )
            changes = resolver.needs(conf)
            if changes:
                resolver.apply(conf, changes)
                self.applied["unbound"] += 1
                report.changes += [Change("dns", k, f"exit resolver {slot}") for k in changes]

    def _exit_resolver(self, slot: int) -> Unbound:
        conf_path = self.paths.unbound_dir / f"exit{slot}.conf"
        return Unbound(self.runner, conf_path, self.make_child, f"unbound-exit{slot}")

    def _create_interface(self, ifname: str) -> None:
        if self.wg_child is not None:
            self.wg_child.stop()  # its interface is gone; a fresh one replaces it
            self.wg_child = None
        if not kernel_wireguard(self.runner, ifname):
            self.wg_child = start_userspace(ifname, self.make_child)
        self._nft_seen = None  # rules naming the interface are re-applied with it
        self._endpoints.pop(ifname, None)

    def stop(self) -> None:
        """The daemon stops: everything it put in place stays (tunnels, DNS, rules, routes);
        its children keep running, unsupervised, until the next daemon adopts them."""
        self.unbound.detach()
        for resolver in self.exit_resolvers.values():
            resolver.detach()
        for child in self.exit_children.values():
            child.detach()
        if self.wg_child is not None:
            self.wg_child.detach()


def _exit_routing(
    exits: tuple[ExitTunnel, ...],
) -> tuple[frozenset[TableRoute], frozenset[tuple[int, int]]]:
    """Each exit's table ends in a blackhole (fail closed); the relay routes the networks it
    relays for back into its tunnel, an exit in use sends everything into its tunnel."""
    routes, rules = set(), set()
    for t in exits:
        rules.add((t.mark, t.table))
        routes.add(TableRoute(t.table, "default", None))
        if t.wg is None:
            continue
        if t.relay:
            routes |= {TableRoute(t.table, str(n), t.interface) for n in t.relayed}
        else:
            routes.add(TableRoute(t.table, "default", t.interface))
    return frozenset(routes), frozenset(rules)
