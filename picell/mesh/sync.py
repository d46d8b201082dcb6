"""Per-link sharing and the link-state document (DESIGN §6, §7).

The owner's choices (`inbound`: which of our services a linked cell may use) live in the store;
each change marks the link `pending_push` and wakes the sender, which sends the whole state
document, signed, with a fresh `seq`. Receiving one mirrors it: our `outbound` for them is what
they share with us, their `exit_offered` is our `remote_exit_offered`, their
`use_as_exit_relay` our `remote_exit_relay_active`; their identity updates the link in place.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from picell import validate
from picell.errors import BadInput, Conflict, NotFound
from picell.mesh.invite import Identity
from picell.mesh.links import Links, check_conflicts
from picell.mesh.protocol import parse_envelope
from picell.store import journal
from picell.store import links as link_table
from picell.store import services as service_table
from picell.store.cell import Cell
from picell.store.links import Link


def _parse_shared(raw: Any, link: Link) -> tuple[dict[str, Any], ...]:
    if not isinstance(raw, list) or len(raw) > 1000:
        raise BadInput("body.shared_services: a list is expected", field="body.shared_services")
    out = []
    for i, item in enumerate(raw):
        field = f"body.shared_services[{i}]"
        if not isinstance(item, dict):
            raise BadInput(f"{field}: an object is expected", field=field)
        name = validate.name(str(item.get("name", "")), f"{field}.name")
        vip = validate.ipv4(str(item.get("vip")), f"{field}.vip")
        if vip not in link.vpn_subnet:
            raise BadInput(f"{field}.vip: {vip} is outside {link.vpn_subnet}", field=f"{field}.vip")
        ports = item.get("ports")
        if not isinstance(ports, list) or not ports:
            raise BadInput(f"{field}.ports: a list of ports is expected", field=f"{field}.ports")
        protocol = item.get("protocol", "tcp")
        if protocol not in ("tcp", "udp"):
            raise BadInput(f"{field}.protocol: tcp or udp", field=f"{field}.protocol")
        out.append(
            {
                "name": name,
                "vip": str(vip),
                "ports": [validate.port(p, f"{field}.ports") for p in ports],
                "protocol": protocol,
            }
        )
    return tuple(sorted(out, key=lambda s: s["name"]))


def _exit_end(raw: Any, field: str) -> tuple[str | None, int | None]:
    if raw is None:
        return None, None
    if not isinstance(raw, dict):
        raise BadInput(f"{field}: an object is expected", field=field)
    key = validate.wg_key(str(raw.get("public_key", "")), f"{field}.public_key")
    return key, validate.port(raw.get("port", ""), f"{field}.port")


def _exit_ends(body: dict[str, Any]) -> dict[str, Any]:
    """Their ends of the exit tunnels: the relay's (with an offer), the client's (with a
    request to use our exit)."""
    relay_key, relay_port = _exit_end(body.get("exit_relay"), "body.exit_relay")
    client_key, client_port = _exit_end(body.get("exit_client"), "body.exit_client")
    return {
        "remote_exit_relay_key": relay_key,
        "remote_exit_relay_port": relay_port,
        "remote_exit_client_key": client_key,
        "remote_exit_client_port": client_port,
    }


class Sync:
    def __init__(self, links: Links, wake_sender: Callable[[], None] = lambda: None) -> None:
        self.links = links
        self.control = links.control
        self.store = links.store
        self.wake_sender = wake_sender

    # -- the owner's choices -------------------------------------------------------------------
    def set_permissions(self, name: str, services: list[str]) -> dict[str, Any]:
        validate.name(name, "cell")
        wanted = tuple(sorted({validate.name(s, "services") for s in services}))
        with self.control.change() as conn:
            link = link_table.get(conn, name)
            if link.state == "unlinking":
                raise Conflict(f"cell: the link with {name} is ending", field="cell")
            known = {s.name for s in service_table.all_services(conn)}
            for svc in wanted:
                if svc not in known:
                    raise NotFound(f"services: no service named {svc!r}", field="services")
            for svc in sorted(set(wanted) - set(link.inbound)):
                journal.append(conn, name, f"shared {svc}", "local owner")
            for svc in sorted(set(link.inbound) - set(wanted)):
                journal.append(conn, name, f"unshared {svc}", "local owner")
            if wanted != tuple(sorted(link.inbound)):
                link_table.save(conn, replace(link, inbound=wanted))
                link_table.mark_pending(conn, name)
        self.wake_sender()
        return self.links.describe(name)

    def set_exit_offer(self, name: str, offered: bool) -> dict[str, Any]:
        """Offer (or withdraw) our internet exit to a linked cell; it learns at once. Relaying
        itself happens only once it also asks for it (`use_as_exit_relay`)."""
        validate.name(name, "cell")
        with self.control.change() as conn:
            link = link_table.get(conn, name)
            if link.state == "unlinking":
                raise Conflict(f"cell: the link with {name} is ending", field="cell")
            if link.exit_offered != offered:
                link_table.save(conn, replace(link, exit_offered=offered))
                link_table.mark_pending(conn, name)
                event = "offered our exit" if offered else "withdrew our exit offer"
                journal.append(conn, name, event, "local owner")
        self.wake_sender()
        return self.links.describe(name)

    def share(self, name: str, service: str) -> dict[str, Any]:
        current = self._inbound(name)
        return self.set_permissions(name, [*current, validate.name(service, "service")])

    def unshare(self, name: str, service: str) -> dict[str, Any]:
        validate.name(service, "service")
        current = self._inbound(name)
        if service not in current:
            raise NotFound(f"service: {service} is not shared with {name}", field="service")
        return self.set_permissions(name, [s for s in current if s != service])

    def _inbound(self, name: str) -> tuple[str, ...]:
        validate.name(name, "cell")
        with self.store.read() as conn:
            return link_table.get(conn, name).inbound

    def forget_service(self, conn: Any, service: str) -> None:
        """A removed service stops being shared (called inside the removal's transaction)."""
        for link in link_table.all_links(conn):
            if service in link.inbound:
                kept = tuple(s for s in link.inbound if s != service)
                link_table.save(conn, replace(link, inbound=kept))
                link_table.mark_pending(conn, link.name)
                journal.append(
                    conn, link.name, f"unshared {service}", "local owner", "the service was removed"
                )

    # -- receiving their document --------------------------------------------------------------
    def receive_state(self, payload: Any, source: str | None) -> dict[str, Any]:
        env = parse_envelope(payload, "state")
        body = env.body
        with self.control.change() as conn:
            link, cell = self.links.authenticate(conn, env, source)
            outbound = _parse_shared(body.get("shared_services", []), link)
            updated = replace(
                link,
                outbound=outbound,
                remote_exit_offered=bool(body.get("exit_offered", False)),
                remote_exit_relay_active=bool(body.get("use_as_exit_relay", False)),
                **_exit_ends(body),
                last_remote_update_at=time.time(),
                remote_seq=body["seq"],
            )
            updated = self._identity(cell, link, updated, body.get("identity"), conn)
            if link.state == "waiting":
                updated = replace(
                    updated, state="linked", linked_at=time.time(), last_push_error=None
                )
                journal.append(
                    conn,
                    link.name,
                    "linked",
                    f"cell {link.name}",
                    "confirmed by their signed state",
                )
            before = {s["name"] for s in link.outbound}
            after = {s["name"] for s in outbound}
            for svc in sorted(after - before):
                journal.append(conn, link.name, f"they shared {svc}", f"cell {link.name}")
            for svc in sorted(before - after):
                journal.append(conn, link.name, f"they unshared {svc}", f"cell {link.name}")
            if updated.remote_exit_offered != link.remote_exit_offered:
                event = (
                    "they offered their exit"
                    if updated.remote_exit_offered
                    else ("they withdrew their exit offer")
                )
                journal.append(conn, link.name, event, f"cell {link.name}")
            if updated.remote_exit_relay_active != link.remote_exit_relay_active:
                event = (
                    "they use our exit"
                    if updated.remote_exit_relay_active
                    else "they stopped using our exit"
                )
                relaying = "relaying" if link.exit_offered else "not relaying: we do not offer it"
                detail = relaying if updated.remote_exit_relay_active else ""
                journal.append(conn, link.name, event, f"cell {link.name}", detail)
            link_table.save(conn, updated)
        if before != after and self.control.reconciler is not None:
            self.control.reconciler.unbound.flush_zone(updated.domain)
        return {"ok": True, "seq": body["seq"]}

    def _identity(self, cell: Cell, link: Link, updated: Link, raw: Any, conn: Any) -> Link:
        if raw is None:
            return updated
        if not isinstance(raw, dict):
            raise BadInput("body.identity: an object is expected", field="body.identity")
        if str(raw.get("vpn_subnet", link.vpn_subnet)) != str(link.vpn_subnet):
            raise BadInput(
                "body.identity.vpn_subnet: a cell changes its network by pairing again",
                field="body.identity.vpn_subnet",
            )
        ident = Identity(
            cell_name=link.name,
            domain=validate.domain(raw.get("domain", link.domain), "body.identity.domain"),
            public_key=link.public_key,
            endpoint=str(
                validate.endpoint(raw.get("endpoint", link.endpoint), "body.identity.endpoint")
            ),
            vpn_subnet=link.vpn_subnet,
            dns_ip=validate.ipv4(str(raw.get("dns_ip", link.dns_ip)), "body.identity.dns_ip"),
            mesh_port=link.mesh_port,
        )
        if ident.dns_ip not in link.vpn_subnet:
            raise BadInput(
                "body.identity.dns_ip: outside the cell's network", field="body.identity.dns_ip"
            )
        changed = (ident.endpoint, ident.domain, ident.dns_ip) != (
            link.endpoint,
            link.domain,
            link.dns_ip,
        )
        if not changed:
            return updated
        check_conflicts(cell, link_table.all_links(conn), ident, prefix="body.identity.")
        detail = f"endpoint {ident.endpoint}, domain {ident.domain}, dns {ident.dns_ip}"
        journal.append(conn, link.name, "identity changed", f"cell {link.name}", detail)
        return replace(updated, endpoint=ident.endpoint, domain=ident.domain, dns_ip=ident.dns_ip)
