"""The cell's operations: validate, commit to the store, converge (DESIGN §2).

Each mutation runs inside one store transaction and calls the reconciler before committing: if
the apply fails, the transaction rolls back and the previous state is re-applied, so a request
either commits and converges or changes nothing. Handlers (API, CLI) call these methods and never
run system commands themselves.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from picell import validate
from picell.addressing import (
    next_peer_index,
    next_vip_index,
    peer_address,
    vip_address,
)
from picell.batch import GroupCommit
from picell.cellinit import InitRequest, check_links, plan_cell
from picell.dns.unbound import read_upstreams
from picell.errors import ApplyFailed, BadInput, Conflict
from picell.mesh.policy import host_overlap, observe_host
from picell.mesh.reach import device_endpoint_note, endpoint_warnings
from picell.reconcile import Reconciler, Report
from picell.routing.host import observe_onlink
from picell.state import State, build_state
from picell.store import cell as cell_table
from picell.store import exits as exit_table
from picell.store import journal
from picell.store import links as link_table
from picell.store import peers as peer_table
from picell.store import portmap as portmap_table
from picell.store import services as service_table
from picell.store.cell import Cell
from picell.store.db import Store
from picell.store.links import Link
from picell.store.peers import Peer
from picell.store.services import Service
from picell.system.portmap import status_of
from picell.system.run import Runner
from picell.wireguard import keys
from picell.wireguard.apply import observe_wg
from picell.wireguard.render import device_allowed_ips, render_device
from picell.worker import Worker

log = logging.getLogger(__name__)


class Coalescer(Worker):
    """Runs `action` on a thread of its own, at most once per `window_s` however often it is
    asked (`ask`, a wake): a burst of state documents from a linked cell costs a few
    reconciles, not one each. The thread never dies: a failed action is logged and the next
    request runs it again. It starts at once."""

    thread_name = "coalesce"

    def __init__(self, action: Callable[[], None], window_s: float) -> None:
        self.action = action
        self.window_s = window_s
        self.runs = 0
        super().__init__()
        self.start()

    def ask(self) -> None:
        self.wake()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            if self._stop.wait(self.window_s):  # let the burst settle
                return
            self._wake.clear()
            try:
                self.action()
                self.runs += 1
            except Exception:  # noqa: BLE001 - logged; the next request runs it again
                log.exception("coalesced converge failed")


class Control:
    def __init__(self, store: Store, runner: Runner, reconciler: Reconciler | None) -> None:
        self.store = store
        self.runner = runner
        self.reconciler = reconciler
        self.last_error: str | None = None
        # set by the daemon: converge on a thread of its own, bursts coalesced; without it
        # (tests, one-shot commands) `converge_soon` converges at once
        self.coalescer: Coalescer | None = None
        # set by the daemon (`batch_changes`): concurrent changes share one apply and commit;
        # without it each change applies and commits on its own
        self.group: GroupCommit | None = None
        # held from reading the state to applying it (and, for a change, through its commit):
        # two applies never interleave, and none applies a state older than the kernel's
        self._apply_lock = threading.RLock()
        self._flush: set[str] = set()
        self._flush_lock = threading.Lock()
        # set by the daemon: a removed service stops being shared, and linked cells hear of it
        self.on_service_removed: Callable[[sqlite3.Connection, str], None] | None = None
        self.after_change: Callable[[], None] | None = None
        # set by the daemon: why the last port-mapping round failed (None when it did not)
        self.port_mapping_error: Callable[[], str | None] = lambda: None

    # -- state ---------------------------------------------------------------------------------
    def build(self, conn: sqlite3.Connection) -> State:
        return build_state(
            cell_table.load(conn),
            peer_table.all_peers(conn),
            service_table.all_services(conn),
            read_upstreams(),
            link_table.all_links(conn),
            exit_table.slots(conn),
            observe_onlink(),
        )

    def batch_changes(self) -> GroupCommit:
        """From now on, concurrent changes are applied and committed together (the daemon)."""
        self.group = GroupCommit(self.store, self._apply, self._restore, self._apply_lock)
        return self.group

    def converge(self) -> Report | None:
        """Reconcile from the store (start-up, period, child exit)."""
        if self.reconciler is None or self.store.writing():
            return None  # inside a change: its own apply converges
        with self._apply_lock, self.store.read() as conn:
            if not cell_table.exists(conn):
                return None
            try:
                report = self.reconciler.set(self.build(conn))
            except ApplyFailed as exc:
                self.last_error = exc.message
                log.error("reconcile failed: %s", exc.message)
                raise
            self.last_error = None
            return report

    def converge_soon(self, flush: str | None = None) -> None:
        """Converge after a change another cell made (its state document), and then flush
        `flush`'s cached answers from Unbound."""
        if flush is not None:
            with self._flush_lock:
                self._flush.add(flush)
        if self.coalescer is not None:
            self.coalescer.ask()
        else:
            self.converge_and_flush()

    def converge_and_flush(self) -> None:
        try:
            self.converge()
        finally:
            with self._flush_lock:
                domains, self._flush = sorted(self._flush), set()
            if self.reconciler is not None:
                for domain in domains:
                    self.reconciler.unbound.flush_zone(domain)

    @contextmanager
    def change(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that commits only if the new state applies; it returns once
        applied. Concurrent changes share one apply (`picell.batch`); inside a change it
        nests, and the enclosing change applies."""
        if self.store.writing():
            with self.store.transaction() as conn:
                yield conn
        elif self.group is not None:
            with self.group.change() as conn:
                yield conn
        else:
            with self._apply_lock, self.store.transaction() as conn:
                yield conn
                try:
                    self._apply(conn)
                except ApplyFailed:
                    self._restore()
                    raise

    def _apply(self, conn: sqlite3.Connection) -> None:
        if self.reconciler is not None:
            self.reconciler.set(self.build(conn))

    def _restore(self) -> None:
        """After a failed apply, re-apply what the store held before. It may run while the
        failed transaction is still open, so it reads the committed state through a
        connection of its own (the write connection sees the uncommitted writes)."""
        if self.reconciler is None:
            return
        ro = sqlite3.connect(f"file:{self.store.path}?mode=ro", uri=True)
        ro.row_factory = sqlite3.Row
        try:
            self.reconciler.set(self.build(ro))
        except ApplyFailed as exc:
            log.error("restoring the previous state failed too: %s", exc.message)
        finally:
            ro.close()

    # -- cell ----------------------------------------------------------------------------------
    def init_cell(self, req: InitRequest) -> Cell:
        with self.store.transaction() as conn:
            old = cell_table.load(conn) if cell_table.exists(conn) else None
            cell = plan_cell(self.runner, req, old, conn)
            check_links(cell, link_table.all_links(conn), old)
            cell_table.save(conn, cell)
        return cell

    def cell(self) -> Cell:
        with self.store.read() as conn:
            return cell_table.load(conn)

    # -- devices -------------------------------------------------------------------------------
    def _check_name_free(self, conn: sqlite3.Connection, name: str) -> None:
        cell = cell_table.load(conn)
        if name == cell.name:
            raise Conflict(f"name: {name!r} is the cell's own name", field="name")
        if conn.execute("SELECT 1 FROM peers WHERE name = ?", (name,)).fetchone():
            raise Conflict(f"name: a device named {name!r} already exists", field="name")
        if conn.execute("SELECT 1 FROM services WHERE name = ?", (name,)).fetchone():
            raise Conflict(f"name: a service named {name!r} already exists", field="name")

    def add_peer(self, name: str, public_key: str | None = None) -> dict[str, Any]:
        name = validate.name(name)
        private = None
        if public_key:
            public = validate.wg_key(public_key)
        else:
            private = keys.generate_private()
            public = keys.public_from_private(private)
        with self.change() as conn:
            self._check_name_free(conn, name)
            cell = cell_table.load(conn)
            if public == keys.public_from_private(cell.private_key):
                raise Conflict("public_key: that is the cell's own key", field="public_key")
            index = next_peer_index(
                cell.address,
                [p.host_index for p in peer_table.all_peers(conn)],
                [s.vip_index for s in service_table.all_services(conn)],
            )
            peer = Peer(name, public, private, index, None, time.time())
            peer_table.add(conn, peer)
            told = link_table.mark_publishing(conn)  # the cells we publish our devices to
        if told and self.after_change is not None:
            self.after_change()
        return self.peer_public(cell, peer)

    def remove_peer(self, name: str) -> None:
        validate.name(name)
        with self.change() as conn:
            via = peer_table.get(conn, name).route_via
            peer_table.remove(conn, name)
            exit_table.release_unused(conn)
            told = link_table.mark_publishing(conn)
            if via is not None and link_table.find(conn, via) is not None:
                link_table.mark_pending(conn, via)  # it may stop relaying for us
                journal.append(conn, via, f"device {name} left their exit", "local owner",
                               "the device was removed")  # fmt: skip
        if (via is not None or told) and self.after_change is not None:
            self.after_change()

    def peer_public(
        self, cell: Cell, peer: Peer, live: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        info: dict[str, Any] = {
            "name": peer.name,
            "address": str(peer_address(cell.network, peer.host_index)),
            "public_key": peer.public_key,
            "fqdn": f"{peer.name}.{cell.domain}",
            "own_key": peer.private_key is None,
            "route_via": peer.route_via,
            "created_at": peer.created_at,
        }
        if live is not None:
            info.update(live)
        return info

    def list_peers(self) -> list[dict[str, Any]]:
        with self.store.read() as conn:
            cell = cell_table.load(conn)
            peers = peer_table.all_peers(conn)
        observed = observe_wg(self.runner, cell.interface)
        now = time.time()
        out = []
        for p in peers:
            seen = observed.peers.get(p.public_key) if observed else None
            hs = seen.latest_handshake if seen else 0
            live = {
                "latest_handshake": hs,
                "handshake_age_s": round(now - hs) if hs else None,
                "rx_bytes": seen.rx_bytes if seen else 0,
                "tx_bytes": seen.tx_bytes if seen else 0,
                "endpoint": seen.endpoint if seen else None,
            }
            out.append(self.peer_public(cell, p, live))
        return out

    def peer_config(self, name: str, full_tunnel: bool | None = None) -> str:
        """The device's config: full tunnel when asked, or when it is routed via an exit cell
        (its internet must enter the tunnel to leave there); split tunnel otherwise."""
        validate.name(name)
        with self.store.read() as conn:
            cell = cell_table.load(conn)
            peer = peer_table.get(conn, name)
        full = peer.route_via is not None if full_tunnel is None else full_tunnel
        return render_device(
            device_name=peer.name,
            private_key=peer.private_key,
            address=peer_address(cell.network, peer.host_index),
            dns=cell.ip,
            domain=cell.domain,
            cell_public_key=keys.public_from_private(cell.private_key),
            endpoint=cell.primary_endpoint,
            allowed_ips=device_allowed_ips(cell.network, cell.mesh_range, full),
        )

    # -- services ------------------------------------------------------------------------------
    def add_service(
        self, name: str, backend: str, port: int | None = None, protocol: str = "tcp"
    ) -> dict[str, Any]:
        name = validate.name(name)
        host, backend_port = validate.backend(backend)
        svc_port = validate.port(port, "port") if port is not None else backend_port
        if protocol not in ("tcp", "udp"):
            raise BadInput("protocol: must be tcp or udp", field="protocol")
        with self.change() as conn:
            self._check_name_free(conn, name)
            cell = cell_table.load(conn)
            if host in cell.network:
                raise BadInput(
                    f"backend: {host} lies inside the cell's VPN network {cell.network}",
                    field="backend",
                )
            index = next_vip_index(
                cell.address,
                [p.host_index for p in peer_table.all_peers(conn)],
                [s.vip_index for s in service_table.all_services(conn)],
            )
            svc = Service(name, index, host, backend_port, protocol, svc_port)
            service_table.add(conn, svc)
        return self.service_public(cell, svc)

    def remove_service(self, name: str) -> None:
        validate.name(name)
        with self.change() as conn:
            service_table.remove(conn, name)
            if self.on_service_removed is not None:
                self.on_service_removed(conn, name)
        if self.after_change is not None:
            self.after_change()

    @staticmethod
    def service_public(cell: Cell, svc: Service) -> dict[str, Any]:
        return {
            "name": svc.name,
            "fqdn": f"{svc.name}.{cell.domain}",
            "vip": str(vip_address(cell.network, svc.vip_index)),
            "port": svc.port,
            "protocol": svc.protocol,
            "backend": f"{svc.backend_host}:{svc.backend_port}",
        }

    def list_services(self) -> list[dict[str, Any]]:
        with self.store.read() as conn:
            cell = cell_table.load(conn)
            return [self.service_public(cell, s) for s in service_table.all_services(conn)]

    # -- our endpoints -------------------------------------------------------------------------
    def set_endpoints(self, endpoints: list[str]) -> Cell:
        """The owner's endpoints, best first (at most 4), set while the cell runs: they win
        over a router mapping and the host's own address. Every link is marked for a push
        (the caller wakes the sender): linked cells learn them in our signed document, and
        device configs exported afterwards carry the first."""
        if not 1 <= len(endpoints) <= 4:
            raise BadInput("endpoints: give 1 to 4 endpoints HOST:PORT", field="endpoints")
        checked = tuple(
            dict.fromkeys(
                str(validate.endpoint(e, f"endpoints[{i}]")) for i, e in enumerate(endpoints)
            )
        )
        with self.change() as conn:
            cell = cell_table.load(conn)
            new = replace(cell, endpoint=checked[0], endpoints=checked, endpoint_source="owner")
            if new != cell:
                cell_table.save(conn, new)
                for link in link_table.all_links(conn):
                    link_table.mark_pending(conn, link.name)
                    journal.append(conn, link.name, "endpoint changed", "local owner",
                                   ", ".join(checked))  # fmt: skip
        if new != cell and self.after_change is not None:
            self.after_change()  # the sender pushes at once
        return new

    # -- status --------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        cell = self.cell()
        with self.store.read() as conn:
            n_peers = len(peer_table.all_peers(conn))
            n_services = len(service_table.all_services(conn))
            links = link_table.all_links(conn)
            mapping = portmap_table.load(conn)
        last = self.reconciler.last if self.reconciler else None
        return {
            "name": cell.name,
            "domain": cell.domain,
            "address": str(cell.address),
            "network": str(cell.network),
            "endpoint": cell.primary_endpoint,
            **self.reachability(cell, links),
            "interface": cell.interface,
            "public_key": keys.public_from_private(cell.private_key),
            "listen_port": cell.listen_port,
            "dns": str(cell.ip),
            "devices": n_peers,
            "services": n_services,
            "dns_running": bool(self.reconciler and self.reconciler.unbound.running()),
            "last_reconcile": last.as_dict() if last else None,
            "last_error": self.last_error,
            "conflicts": self.link_conflicts(cell, links),
            "port_mapping": status_of(mapping, time.time()),
            "port_mapping_error": self.port_mapping_error(),
            "host_firewall": self.host_firewall(),
        }

    def host_firewall(self) -> list[dict[str, str]]:
        """Other tables' chains that drop what we need (Docker, ufw, firewalld...), and what
        was done or what the owner should run, as the last reconcile saw them (no command)."""
        if self.reconciler is None:
            return []
        return [b.as_dict() for b in self.reconciler.host_firewall.last.blockers]

    def reachability(
        self, cell: Cell | None = None, links: list[Link] | None = None
    ) -> dict[str, Any]:
        """Our endpoints and what the owner should know about them (`picell.mesh.reach`)."""
        if cell is None or links is None:
            with self.store.read() as conn:
                cell, links = cell_table.load(conn), link_table.all_links(conn)
        return {
            "endpoints": list(cell.announced),
            "endpoint_source": cell.endpoint_source,
            "endpoint_warnings": endpoint_warnings(cell, links),
            "device_endpoint_note": device_endpoint_note(cell),
        }

    def link_conflicts(self, cell: Cell, links: list[Link]) -> list[dict[str, str]]:
        """Links whose network now overlaps an address or route of the host that appeared
        after they were made (a new Docker network, a VPN): the identity policy refuses such a
        link when it is made, and `status` names it if the host changes later."""
        if not links:
            return []
        host = observe_host(self.runner, cell.interface)
        out = []
        for link in links:
            overlap = host_overlap(link.identity.network, host)
            if overlap:
                out.append(
                    {
                        "cell": link.name,
                        "network": str(link.identity.network),
                        "overlaps": overlap,
                    }
                )
        return out
