"""Link operations (DESIGN §5): invites, connect, accept a pairing, disconnect, unlink, import.

Every change goes through `Control.change()` (one transaction, reconciled before commit). The
pairing call to the other cell happens before anything is stored: if the other cell refuses,
nothing changes on either side; if it cannot be reached, our side is stored as `waiting` and the
other owner can import our invite by hand (either order completes the link).
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from picell import validate
from picell.constants import INVITE_MAX_TTL_S, INVITE_MIN_TTL_S, LINK_ONLINE_S
from picell.control import Control
from picell.errors import BadInput, Conflict, Forbidden, NotFound
from picell.mesh import client
from picell.mesh.crypto import mac, mac_ok, new_token, pairing_key, short_auth_string, token_hash
from picell.mesh.document import shared_services
from picell.mesh.invite import Identity, Invite, Pairing, parse_identity, parse_invite
from picell.mesh.protocol import check_envelope, envelope_from, parse_envelope
from picell.store import cell as cell_table
from picell.store import invites as invite_table
from picell.store import journal, outbox
from picell.store import links as link_table
from picell.store import services as service_table
from picell.store.cell import Cell
from picell.store.links import Link
from picell.wireguard import keys
from picell.wireguard.apply import observe_wg

REFUSED = "pairing refused: the token is unknown, used or expired, or the MAC does not verify"


def identity_of(cell: Cell) -> Identity:
    return Identity(
        cell_name=cell.name,
        domain=cell.domain,
        public_key=keys.public_from_private(cell.private_key),
        endpoint=cell.endpoint,
        vpn_subnet=cell.network,
        dns_ip=cell.ip,
        mesh_port=cell.mesh_port,
    )


def _domains_clash(a: str, b: str) -> bool:
    return a == b or a.endswith("." + b) or b.endswith("." + a)


def check_conflicts(
    cell: Cell, links: list[Link], other: Identity, prefix: str = "invite."
) -> None:
    """Refuse a link that would collide, naming the cell in conflict. The link with the same
    public key (a re-pairing) is not a conflict with itself."""
    name = other.cell_name
    if other.public_key == keys.public_from_private(cell.private_key):
        raise Conflict(
            f"{prefix}public_key: that is this cell's own invite", field=f"{prefix}public_key"
        )
    if other.vpn_subnet.overlaps(cell.network):
        raise Conflict(
            f"{prefix}vpn_subnet: cell {name}'s network {other.vpn_subnet} overlaps this cell's "
            f"network {cell.network}",
            field=f"{prefix}vpn_subnet",
        )
    if _domains_clash(other.domain, cell.domain):
        raise Conflict(
            f"{prefix}domain: cell {name}'s domain {other.domain} clashes with this cell's "
            f"domain {cell.domain}",
            field=f"{prefix}domain",
        )
    if name == cell.name:
        raise Conflict(
            f"{prefix}cell_name: {name} is this cell's own name", field=f"{prefix}cell_name"
        )
    for link in links:
        if link.public_key == other.public_key:
            continue
        if link.name == name:
            raise Conflict(
                f"{prefix}cell_name: a cell named {name} is already linked with another key",
                field=f"{prefix}cell_name",
            )
        if other.vpn_subnet.overlaps(link.vpn_subnet):
            raise Conflict(
                f"{prefix}vpn_subnet: cell {name}'s network {other.vpn_subnet} overlaps the "
                f"network {link.vpn_subnet} of linked cell {link.name}",
                field=f"{prefix}vpn_subnet",
            )
        if _domains_clash(other.domain, link.domain):
            raise Conflict(
                f"{prefix}domain: cell {name}'s domain {other.domain} clashes with the domain of "
                f"linked cell {link.name}",
                field=f"{prefix}domain",
            )


def _link_from(other: Identity, existing: Link | None, state: str) -> Link:
    """The link row for `other`: a new one, or `existing` updated in place (a re-pairing)."""
    fields: dict[str, Any] = {
        "name": other.cell_name,
        "endpoint": other.endpoint,
        "vpn_subnet": other.vpn_subnet,
        "dns_ip": other.dns_ip,
        "domain": other.domain,
        "mesh_port": other.mesh_port,
        "remote_api_url": f"http://{other.dns_ip}:{other.mesh_port}",
        "state": state,
    }
    if existing is None:
        link = Link(public_key=other.public_key, created_at=time.time(), **fields)
    else:
        link = replace(existing, **fields)
    return replace(
        link,
        linked_at=link.linked_at or (time.time() if state == "linked" else None),
        last_push_error=None if state == "linked" else link.last_push_error,
    )


def _parse_ttl(expires_s: float) -> float:
    if not INVITE_MIN_TTL_S <= expires_s <= INVITE_MAX_TTL_S:
        raise BadInput(
            f"expires: must lie between {INVITE_MIN_TTL_S:.0f} s and {INVITE_MAX_TTL_S:.0f} s",
            field="expires",
        )
    return expires_s


class Links:
    def __init__(self, control: Control, wake_sender: Callable[[], None] = lambda: None) -> None:
        self.control = control
        self.store = control.store
        self.wake_sender = wake_sender
        self.rejected: Counter[str] = Counter()  # refused cross-cell messages, by route and status

    # -- invites -------------------------------------------------------------------------------
    def invite(self, expires_s: float) -> Invite:
        ttl = _parse_ttl(expires_s)
        token = new_token()
        expires_at = round(time.time() + ttl)
        with self.store.transaction() as conn:
            cell = cell_table.load(conn)
            invite_table.add(conn, token_hash(token), pairing_key(token), expires_at)
        return Invite(identity_of(cell), Pairing(cell.pair_port, token, expires_at))

    # -- connect (this cell imports the other's invite) ----------------------------------------
    def connect(self, text: str, trust_domain: bool = False) -> dict[str, Any]:
        inv = parse_invite(text)
        if inv.pairing is None:
            raise BadInput(
                "invite.pairing: missing; ask for a fresh invite", field="invite.pairing"
            )
        if inv.pairing.expires_at < time.time():
            raise BadInput(
                "invite.pairing.expires_at: the invite has expired; ask for a fresh one",
                field="invite.pairing.expires_at",
            )
        other = inv.identity
        with self.store.read() as conn:
            cell = cell_table.load(conn)
            check_conflicts(cell, link_table.all_links(conn), other)
        key = pairing_key(inv.pairing.token)
        request = {"identity": identity_of(cell).as_dict(), "nonce": secrets.token_hex(16)}
        host = validate.endpoint(other.endpoint).host
        try:
            status, data = client.pair(
                host, inv.pairing.port, {**request, "mac": mac(key, request)}
            )
        except client.Unreachable as exc:
            self._store(other, "waiting", "connect", f"pairing port unreachable: {exc}")
            return self.describe(other.cell_name)
        if status != 200 or not isinstance(data, dict):
            message = data.get("message") if isinstance(data, dict) else None
            raise Forbidden(
                f"cell {other.cell_name} refused the pairing: {message or f'HTTP {status}'}",
                field="invite",
            )
        answer = {"identity": data.get("identity"), "nonce": request["nonce"], "role": "accepted"}
        if data.get("nonce") != request["nonce"] or not mac_ok(key, answer, data.get("mac", "")):
            raise Forbidden(
                f"cell {other.cell_name}'s answer does not verify: not the invite's cell",
                field="invite",
            )
        confirmed = parse_identity(data.get("identity"), "answer.")
        if confirmed.public_key != other.public_key:
            raise Forbidden("answer.public_key: differs from the invite's", field="invite")
        self._store(confirmed, "linked", "linked", "paired with their pairing listener")
        return self.describe(confirmed.cell_name)

    def _store(self, other: Identity, state: str, event: str, detail: str) -> None:
        with self.control.change() as conn:
            cell = cell_table.load(conn)
            check_conflicts(cell, link_table.all_links(conn), other)
            existing = link_table.by_key(conn, other.public_key)
            if existing is not None and existing.state == "linked" and state == "waiting":
                state = "linked"  # re-pairing an established link: keep it established
            link = _link_from(other, existing, state)
            if state == "waiting":
                link = replace(link, last_push_error=f"waiting for the other cell: {detail}")
            link_table.save(conn, link)
            outbox.drop(conn, other.public_key)  # a pending unlink would end the new link
            journal.append(conn, other.cell_name, event, "local owner", detail)
        self.wake_sender()  # a new link gets our state at once

    # -- accept (the other cell redeems our invite on the pairing listener) --------------------
    def accept(self, payload: Any) -> dict[str, Any]:
        if not isinstance(payload, dict):
            raise BadInput("body: a JSON object is expected", field="body")
        nonce, claimed = payload.get("nonce"), payload.get("mac")
        if not isinstance(nonce, str) or not 16 <= len(nonce) <= 64:
            raise BadInput("nonce: 16-64 characters expected", field="nonce")
        if not isinstance(claimed, str):
            raise BadInput("mac: missing", field="mac")
        other = parse_identity(payload.get("identity"), "identity.")
        signed = {"identity": payload["identity"], "nonce": nonce}
        with self.control.change() as conn:
            match = next(
                (
                    inv
                    for inv in invite_table.candidates(conn, time.time())
                    if mac_ok(inv.mac_key, signed, claimed)
                ),
                None,
            )
            if match is None or not invite_table.consume(conn, match.id, other.cell_name):
                raise Forbidden(REFUSED, field="mac")
            cell = cell_table.load(conn)
            check_conflicts(cell, link_table.all_links(conn), other, prefix="identity.")
            link_table.save(
                conn, _link_from(other, link_table.by_key(conn, other.public_key), "linked")
            )
            outbox.drop(conn, other.public_key)
            journal.append(conn, other.cell_name, "linked", f"cell {other.cell_name}",
                           "they redeemed our invite")  # fmt: skip
        self.wake_sender()
        answer = {"identity": identity_of(cell).as_dict(), "nonce": nonce}
        return {**answer, "mac": mac(match.mac_key, {**answer, "role": "accepted"})}

    # -- disconnect and unlink -----------------------------------------------------------------
    def disconnect(self, name: str) -> None:
        validate.name(name, "cell")
        with self.control.change() as conn:
            link = link_table.get(conn, name)
            if link.state == "unlinking":
                return
            if link.state == "waiting":
                # the other cell never confirmed: it holds no side to tear down
                link_table.delete(conn, name)
                journal.append(conn, name, "unlinked", "local owner", "before it was confirmed")
                return
            cell = cell_table.load(conn)
            seq = link.local_seq + 1
            envelope = envelope_from(cell, link, "unlink", seq)
            link_table.save(conn, replace(link, state="unlinking", local_seq=seq))
            outbox.put(conn, link.public_key, "unlink", json.dumps(envelope))
            journal.append(conn, name, "unlinked", "local owner", "telling the other cell")
        self.wake_sender()

    def receive_unlink(self, payload: Any, source: str | None) -> dict[str, Any]:
        """Forget the link at the other cell's word. Only the store changes here: the caller
        converges after the answer left, since removing the peer first would strand it."""
        env = parse_envelope(payload, "unlink")
        with self.store.transaction() as conn:
            link, cell = self.authenticate(conn, env, source)
            link_table.delete(conn, link.name)
            outbox.drop(conn, link.public_key)
            journal.append(conn, link.name, "unlinked", f"cell {link.name}",
                           "the other cell ended the link")  # fmt: skip
        return {"ok": True, "cell": cell.name}

    def authenticate(
        self, conn: sqlite3.Connection, env: Any, source: str | None
    ) -> tuple[Link, Cell]:
        cell = cell_table.load(conn)
        link = link_table.by_key(conn, env.from_public_key)
        if link is None:
            raise NotFound(
                "body.from_public_key: no link with that cell", field="body.from_public_key"
            )
        try:
            src = ipaddress.IPv4Address(source) if source else None
        except ValueError:
            src = None
        check_envelope(env, link, src, cell.private_key, keys.public_from_private(cell.private_key))
        return link, cell

    def unlink_delivered(self, public_key: str, outcome: str) -> None:
        with self.control.change() as conn:
            link = link_table.by_key(conn, public_key)
            if link is not None and link.state == "unlinking":
                link_table.delete(conn, link.name)
                journal.append(conn, link.name, "unlink delivered", "local owner", outcome)

    # -- status --------------------------------------------------------------------------------
    def describe(self, name: str) -> dict[str, Any]:
        return next(c for c in self.overview() if c["name"] == name)

    def overview(self) -> list[dict[str, Any]]:
        with self.store.read() as conn:
            cell = cell_table.load(conn)
            links = link_table.all_links(conn)
            services = service_table.all_services(conn)
            pending = {m.link_key: m for m in outbox.all_messages(conn)}
        observed = observe_wg(self.control.runner, cell.interface) if links else None
        our_public = keys.public_from_private(cell.private_key)
        now = time.time()
        out = []
        for link in links:
            seen = observed.peers.get(link.public_key) if observed else None
            hs = seen.latest_handshake if seen else 0
            age = round(now - hs) if hs else None
            msg = pending.get(link.public_key)
            out.append(
                {
                    "name": link.name,
                    "state": link.state,
                    "domain": link.domain,
                    "vpn_subnet": str(link.vpn_subnet),
                    "dns_ip": str(link.dns_ip),
                    "endpoint": link.endpoint,
                    "public_key": link.public_key,
                    "auth_string": short_auth_string(our_public, link.public_key),
                    "handshake_age_s": age,
                    "online": age is not None and age < LINK_ONLINE_S,
                    "rx_bytes": seen.rx_bytes if seen else 0,
                    "tx_bytes": seen.tx_bytes if seen else 0,
                    "inbound": shared_services(cell, services, link.inbound),
                    "outbound": list(link.outbound),
                    "exit_offered": link.exit_offered,
                    "remote_exit_offered": link.remote_exit_offered,
                    # we use their exit (devices routed via them); they use ours
                    "exit_relay_active": link.exit_relay_active,
                    "remote_exit_relay_active": link.remote_exit_relay_active,
                    "relaying": link.state == "linked"
                    and link.exit_offered
                    and link.remote_exit_relay_active,
                    "pending_push": link.pending_push,
                    "last_push_status": link.last_push_status,
                    "last_push_at": link.last_push_at,
                    "last_push_error": link.last_push_error,
                    "last_remote_update_at": link.last_remote_update_at,
                    "linked_at": link.linked_at,
                    "pending_message": msg.kind if msg else None,
                    "pending_error": msg.last_error if msg else None,
                }
            )
        return out

    def journal_entries(self, name: str | None) -> list[dict[str, Any]]:
        if name is not None:
            validate.name(name, "cell")
        with self.store.read() as conn:
            return journal.entries(conn, name)
