"""Link operations (DESIGN §5): invites, connect, accept a pairing, disconnect, unlink, import.

Every change goes through `Control.change()` (one transaction, reconciled before commit). The
pairing call to the other cell happens before anything is stored: if the other cell refuses,
nothing changes on either side; if it cannot be reached, our side is stored as `waiting` and the
other owner can import our invite by hand (either order completes the link).

Every identity that arrives (an invite we import, a redemption on our pairing listener, the
other cell's answer) is a `wire.Identity` and passes `admit`: the identity policy
(`mesh.policy`), the conflicts with our cell and our other links, and a common protocol version.
A redeemer on the pairing port learns only that it was refused: the reason goes to our journal,
and a refused redemption spends the token, so an invite holder cannot map our links.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from picell import validate
from picell.constants import INVITE_MAX_TTL_S, INVITE_MIN_TTL_S
from picell.control import Control
from picell.errors import BadInput, Forbidden, NotFound, PicellError
from picell.mesh import client, mapping, policy, relay, wire
from picell.mesh.crypto import (
    link_key,
    mac,
    mac_ok,
    new_token,
    pairing_key,
    token_hash,
)
from picell.mesh.invite import parse_invite
from picell.mesh.overview import link_overview
from picell.mesh.protocol import Envelope, check_envelope, envelope_from, parse_envelope
from picell.mesh.wire import Identity, Invite, Pairing
from picell.store import cell as cell_table
from picell.store import invites as invite_table
from picell.store import journal, outbox
from picell.store import links as link_table
from picell.store import portmap as portmap_table
from picell.store.cell import Cell
from picell.store.links import Link, LinkIdentity, LinkState
from picell.wireguard import keys

REFUSED = "pairing refused"  # all a redeemer on our pairing port ever learns


class Keep:
    """`_link_from`'s "no word on `seen_as`": keep the link's own."""


KEEP = Keep()


def _signed_mapping(signed: dict[str, Any], payload: Any) -> dict[str, Any]:
    """`signed` with the sender's `mapped_subnet` as sent, when it sent one: the MAC covers it
    (a cell that maps nothing sends none, so cells before translation verify as before)."""
    if isinstance(payload, dict) and "mapped_subnet" in payload:
        return {**signed, "mapped_subnet": payload["mapped_subnet"]}
    return signed


def seen_as(cell: Cell, announced: ipaddress.IPv4Network | None, field: str) -> Any:
    """The other cell's word on where it presents our network, checked (`mesh.mapping`)."""
    return mapping.check_seen_as(announced, cell.network, policy.LINKABLE_RANGES, field)


def identity_of(cell: Cell) -> Identity:
    return Identity(
        version=min(wire.SUPPORTED_VERSIONS),
        versions=list(wire.SUPPORTED_VERSIONS),
        cell_name=cell.name,
        domain=cell.domain,
        public_key=keys.public_from_private(cell.private_key),
        # every endpoint we announce (IPv4 and IPv6, the owner's, the router's, the host's),
        # best first; `endpoint` repeats the first for cells that read only it
        endpoint=cell.primary_endpoint,
        endpoints=list(cell.announced),
        vpn_subnet=cell.network,
        dns_ip=cell.ip,
        mesh_port=cell.mesh_port,
    )


def announced_endpoints(endpoint: str, endpoints: Sequence[str] | None) -> tuple[str, ...]:
    """The endpoints a cell announced, as a link stores them (LinkIdentity.endpoints): `endpoint`
    first, at most `ENDPOINTS_MAX`, () when it announced only `endpoint` (LinkIdentity.candidates
    falls back to it)."""
    found = tuple(dict.fromkeys((endpoint, *(endpoints or ()))))[: wire.ENDPOINTS_MAX]
    return found if len(found) > 1 else ()


def _tell_linked(conn: sqlite3.Connection, but: str) -> None:
    """Mark every other linked cell for a push: our `wanted` list (links waiting, stale or
    relayed) changed, and a cell that introduces or relays for us should hear it now, not with
    its next heartbeat (a first introduction took 80 s, a quick re-link through a relay 47 s:
    docs/BENCHMARKS.md, "Introductions and relay")."""
    for other in link_table.all_links(conn):
        if other.name != but and other.state == LinkState.LINKED:
            link_table.mark_pending(conn, other.name)


def _link_from(
    other: Identity,
    existing: Link | None,
    state: LinkState,
    mapped: ipaddress.IPv4Network | None = None,
    seen_as: ipaddress.IPv4Network | None | Keep = KEEP,
) -> Link:
    """The link row for `other`: a new one, or `existing` updated in place (a re-pairing).
    `mapped`: where we present its network (`Links.admit`); `seen_as`: where it presents ours,
    as its pairing message said (KEEP: no word from it, keep what we had)."""
    identity = LinkIdentity(
        endpoint=other.endpoint,
        endpoints=announced_endpoints(other.endpoint, other.endpoints),
        vpn_subnet=other.vpn_subnet,
        dns_ip=other.dns_ip,
        domain=other.domain,
        mesh_port=other.mesh_port,
        api_url=f"http://{other.dns_ip}:{other.mesh_port}",
        versions=other.speaks(),
        mapped=mapped,
    )
    if existing is None:
        link = Link(other.cell_name, other.public_key, identity, state, created_at=time.time())
    else:
        state = existing.state.to(state, existing.name)
        link = replace(existing, name=other.cell_name, state=state, identity=identity)
    if not isinstance(seen_as, Keep):
        link = replace(link, mirror=replace(link.mirror, seen_as=seen_as))
    return replace(
        link,
        linked_at=link.linked_at or (time.time() if state == LinkState.LINKED else None),
        sync=replace(link.sync, last_push_error=None) if state == LinkState.LINKED else link.sync,
    )


def _parse_ttl(expires_s: float) -> float:
    if not INVITE_MIN_TTL_S <= expires_s <= INVITE_MAX_TTL_S:
        raise BadInput(
            f"expires: must lie between {INVITE_MIN_TTL_S:.0f} s and {INVITE_MAX_TTL_S:.0f} s",
            field="expires",
        )
    return expires_s


def invite_proof(token: str, our_public: str, their_public: str) -> str:
    """Our proof, sent in our state documents, that we imported the invite holding `token`."""
    return mac(pairing_key(token), {"from_public_key": our_public, "to_public_key": their_public})


def _key_proof(our_private: str, their_public: str, signed: dict[str, Any]) -> str:
    """A MAC with the link key: only the holder of the identity's private key can make it."""
    return mac(link_key(our_private, their_public), signed)


def _pair_any(other: Identity, port: int, request: dict[str, Any]) -> tuple[int, Any]:
    """The pairing call to the first of the other cell's endpoint hosts that answers (an IPv4
    home behind NAT may announce an IPv6 address that is reachable, or the reverse). Only "no
    answer" moves on to the next host: any answer, even an unusable one, ends the attempt."""
    hosts = dict.fromkeys(validate.endpoint(e).host for e in other.candidates())
    failures = []
    for host in hosts:
        try:
            return client.pair(host, port, request)
        except client.BadAnswer:
            raise
        except client.Unreachable as exc:
            failures.append(str(exc))
    raise client.Unreachable("; ".join(failures))


class Links:
    def __init__(self, control: Control, wake_sender: Callable[[], None] = lambda: None) -> None:
        self.control = control
        self.store = control.store
        self.wake_sender = wake_sender
        self.rejected: Counter[str] = Counter()  # refused cross-cell messages, by route and status
        self.wanted = relay.Wanted()  # what linked cells asked us to introduce or relay

    # -- the identity policy, at every door ----------------------------------------------------
    def admit(
        self,
        conn: sqlite3.Connection,
        cell: Cell,
        other: Identity,
        prefix: str,
        *,
        trusted_domain: bool = False,
        host: policy.HostNets | None = None,
    ) -> ipaddress.IPv4Network | None:
        """Refuse `other` unless the policy, our links and a common version allow it; answer
        where we present its network (`policy.plan_mapping`; None: as it is)."""
        existing = link_table.by_key(conn, other.public_key)
        if existing is None or existing.identity.domain != other.domain:
            policy.check_domain(other.domain, f"{prefix}domain", trusted=trusted_domain)
        if existing is None or existing.identity.vpn_subnet != other.vpn_subnet:
            policy.check_network(other.vpn_subnet, f"{prefix}vpn_subnet", other.cell_name)
        links = link_table.all_links(conn)
        policy.check_conflicts(cell, links, other, prefix)
        wire.common_version(other.speaks(), other.cell_name, f"{prefix}versions")
        if host is None:
            host = policy.observe_host(self.control.runner, cell.interface)
        return policy.plan_mapping(cell, links, other, host, prefix)

    # -- invites -------------------------------------------------------------------------------
    def invite(self, expires_s: float) -> Invite:
        ttl = _parse_ttl(expires_s)
        token = new_token()
        expires_at = round(time.time() + ttl)
        with self.store.transaction() as conn:
            cell = cell_table.load(conn)
            mapping = portmap_table.load(conn)
            invite_table.add(conn, token_hash(token), pairing_key(token), expires_at)
        port = cell.pair_port
        if (
            mapping is not None
            and mapping.pair_external_port
            and cell.mapped_endpoint
            and cell.primary_endpoint == cell.mapped_endpoint
        ):
            port = mapping.pair_external_port  # the router's port for our pairing listener
        return Invite(
            **identity_of(cell).model_dump(),
            pairing=Pairing(port=port, token=token, expires_at=expires_at),
        )

    # -- connect (this cell imports the other's invite) ----------------------------------------
    def connect(
        self, text: str, *, trust_domain: bool = False, via: str | None = None
    ) -> dict[str, Any]:
        """Import another cell's invite. With `via` (a linked cell offering us its relay) the
        link travels through that cell's relay (`mesh.relay`): no pairing call (its port is
        unreachable behind CGNAT); the link completes over UDP alone once the other owner
        imported our invite too."""
        if via is not None:
            validate.name(via, "via")
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
        other = Identity(**{k: getattr(inv, k) for k in Identity.model_fields})
        with self.store.read() as conn:
            cell = cell_table.load(conn)
            # the host is read once: the check before pairing and the one at storing share it
            nets = policy.observe_host(self.control.runner, cell.interface)
            mapped = self.admit(conn, cell, other, "invite.", trusted_domain=trust_domain,
                                host=nets)  # fmt: skip
            if via is not None:
                relay.check_via(link_table.all_links(conn), via, other.public_key)
        our_public = keys.public_from_private(cell.private_key)
        proof = invite_proof(inv.pairing.token, our_public, other.public_key)
        if via is not None:
            self._store(other, LinkState.WAITING, "connect", f"linking through {via}'s relay",
                        (trust_domain, nets), proof, via)  # fmt: skip
            return self.describe(other.cell_name)
        key = pairing_key(inv.pairing.token)
        signed: dict[str, Any] = {"identity": identity_of(cell).as_dict(),
                                  "nonce": secrets.token_hex(16)}  # fmt: skip
        if mapped is not None:  # "we see you as": they translate their side with it
            signed["mapped_subnet"] = str(mapped)
        request = {
            **signed,
            "mac": mac(key, signed),
            "key_proof": _key_proof(cell.private_key, other.public_key, signed),
        }
        name = other.cell_name
        try:
            status, data = _pair_any(other, inv.pairing.port, request)
        except client.BadAnswer as exc:  # it answered, with something unusable: no link
            raise Forbidden(f"cell {name}'s pairing answer is unusable: {exc}",
                            field="invite") from None  # fmt: skip
        except client.Unreachable as exc:
            self._store(other, LinkState.WAITING, "connect", f"pairing port unreachable: {exc}",
                        (trust_domain, nets), proof)  # fmt: skip
            return self.describe(other.cell_name)
        if status != 200:
            raise Forbidden(
                f"{name} refused the link; its owner sees why in {name}'s journal (HTTP {status})",
                field="invite",
            )
        answer = wire.parse(wire.PairingAnswer, data, "answer")
        signed_answer = _signed_mapping(
            {"identity": data["identity"], "nonce": answer.nonce, "role": "accepted"}, data
        )
        if answer.nonce != signed["nonce"] or not mac_ok(key, signed_answer, answer.mac):
            raise Forbidden(
                f"cell {name}'s answer does not verify: not the invite's cell", field="invite"
            )
        confirmed = answer.identity
        same = ("public_key", "cell_name", "domain", "vpn_subnet")
        for f in same:
            if getattr(confirmed, f) != getattr(other, f):
                raise Forbidden(f"answer.{f}: differs from the invite's", field=f"answer.{f}")
        theirs = seen_as(cell, answer.mapped_subnet, "answer.mapped_subnet")
        self._store(confirmed, LinkState.LINKED, "linked", "paired with their pairing listener",
                    (trust_domain, nets), proof, seen=theirs)  # fmt: skip
        return self.describe(confirmed.cell_name)

    def _store(
        self,
        other: Identity,
        state: LinkState,
        event: str,
        detail: str,
        checked: tuple[bool, policy.HostNets],
        proof: str,
        via: str | None = None,
        seen: ipaddress.IPv4Network | None | Keep = KEEP,
    ) -> None:
        """Store our side of the link, admitting `other` again inside the write transaction
        (a link made meanwhile may conflict) with the owner's word and the host as read."""
        trust_domain, host = checked
        with self.control.change() as conn:
            cell = cell_table.load(conn)
            mapped = self.admit(conn, cell, other, "invite.", trusted_domain=trust_domain,
                                host=host)  # fmt: skip
            existing = link_table.by_key(conn, other.public_key)
            if existing is not None and existing.state == LinkState.LINKED:
                state = LinkState.LINKED  # re-pairing an established link: keep it established
            link = _link_from(other, existing, state, mapped, seen)
            if via is not None:  # checked again: the relay's offer may have gone meanwhile
                relay.check_via(link_table.all_links(conn), via, other.public_key)
                link = replace(link, choices=replace(link.choices, via=via))
                link_table.mark_pending(conn, via)  # it hears at once what we ask of it
            marks = replace(link.sync, invite_proof=proof)
            if state == LinkState.WAITING:
                marks = replace(marks, last_push_error=f"waiting for the other cell: {detail}")
            link = replace(link, sync=marks)
            link_table.save(conn, link)
            if state == LinkState.WAITING:
                _tell_linked(conn, link.name)  # its key joins our `wanted`: introductions now
            outbox.drop(conn, other.public_key)  # a pending unlink would end the new link
            journal.append(conn, other.cell_name, event, "local owner", detail)
        self.wake_sender()  # a new link gets our state at once

    # -- accept (the other cell redeems our invite on the pairing listener) --------------------
    def accept(self, payload: Any) -> dict[str, Any]:
        request = wire.parse(wire.PairingRequest, payload, "body")
        other = request.identity
        signed = _signed_mapping({"identity": payload["identity"], "nonce": request.nonce},
                                 payload)  # fmt: skip
        refusal: PicellError | None = None
        with self.control.change() as conn:
            match = next(
                (
                    inv
                    for inv in invite_table.candidates(conn, time.time())
                    if mac_ok(inv.mac_key, signed, request.mac)
                ),
                None,
            )
            if match is None or not invite_table.consume(conn, match.id, other.cell_name):
                raise Forbidden(REFUSED, field="mac")
            cell = cell_table.load(conn)
            try:
                mapped = self.admit(conn, cell, other, "identity.")  # never a trusted domain
                theirs = seen_as(cell, request.mapped_subnet, "mapped_subnet")
                existing = link_table.by_key(conn, other.public_key)
                if existing is not None:
                    proof = _key_proof(cell.private_key, other.public_key, signed)
                    if request.key_proof is None or not secrets.compare_digest(
                        proof, request.key_proof
                    ):
                        raise Forbidden(
                            f"key_proof: the key of linked cell {existing.name} was offered "
                            "without proof that the redeemer holds it",
                            field="key_proof",
                        )
                link = _link_from(other, existing, LinkState.LINKED, mapped, theirs)
            except PicellError as exc:
                refusal = exc
                journal.append(conn, other.cell_name, "pairing refused",
                               f"cell {other.cell_name}", exc.message)  # fmt: skip
            else:
                link_table.save(conn, link)
                outbox.drop(conn, other.public_key)
                journal.append(conn, other.cell_name, "linked", f"cell {other.cell_name}",
                               "they redeemed our invite")  # fmt: skip
        if refusal is not None:
            raise Forbidden(REFUSED, field="identity")
        self.wake_sender()
        answer: dict[str, Any] = {"identity": identity_of(cell).as_dict(), "nonce": request.nonce}
        if link.identity.mapped is not None:  # "we see you as"
            answer["mapped_subnet"] = str(link.identity.mapped)
        return {**answer, "mac": mac(match.mac_key, {**answer, "role": "accepted"})}

    def spend_invite(self, conn: sqlite3.Connection, cell: Cell, link: Link, proof: str) -> None:
        """Spend the invite of ours that `link` proves it imported (the link completed without
        our pairing port, so no redemption spent it)."""
        our_public = keys.public_from_private(cell.private_key)
        signed = {"from_public_key": link.public_key, "to_public_key": our_public}
        for inv in invite_table.candidates(conn, time.time()):
            if mac_ok(inv.mac_key, signed, proof):
                invite_table.consume(conn, inv.id, link.name)
                journal.append(conn, link.name, "invite spent", f"cell {link.name}",
                               "they imported it; the link completed without pairing")  # fmt: skip
                return

    # -- disconnect and unlink -----------------------------------------------------------------
    def disconnect(self, name: str) -> None:
        validate.name(name, "cell")
        with self.control.change() as conn:
            link = link_table.get(conn, name)
            if link.state == LinkState.UNLINKING:
                return
            _tell_linked(conn, name)  # it leaves our `wanted`: a relay forgets the pair now
            if link.state == LinkState.WAITING:
                # the other cell never confirmed: it holds no side to tear down
                link_table.delete(conn, name)
                journal.append(conn, name, "unlinked", "local owner", "before it was confirmed")
                self.wake_sender()
                return
            cell = cell_table.load(conn)
            seq = link.sync.seq + 1
            envelope = envelope_from(cell, link, "unlink", seq)
            state = link.state.to(LinkState.UNLINKING, name)
            link_table.save(conn, replace(link, state=state, sync=replace(link.sync, seq=seq)))
            outbox.put(conn, link.public_key, "unlink", json.dumps(envelope))
            journal.append(conn, name, "unlinked", "local owner", "telling the other cell")
        self.wake_sender()

    def receive_unlink(self, payload: Any, source: str | None) -> dict[str, Any]:
        """Forget the link at the other cell's word. Only the store changes here: the caller
        converges after the answer left, since removing the peer first would strand it."""
        env = parse_envelope(payload, wire.UnlinkBody)
        with self.store.transaction() as conn:
            link, cell = self.authenticate(conn, env, source)
            link_table.delete(conn, link.name)
            outbox.drop(conn, link.public_key)
            journal.append(conn, link.name, "unlinked", f"cell {link.name}",
                           "the other cell ended the link")  # fmt: skip
        return {"ok": True, "cell": cell.name}

    def authenticate(
        self, conn: sqlite3.Connection, env: Envelope[Any], source: str | None
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
            if link is not None and link.state == LinkState.UNLINKING:
                link_table.delete(conn, link.name)
                journal.append(conn, link.name, "unlink delivered", "local owner", outcome)

    # -- status --------------------------------------------------------------------------------
    def describe(self, name: str) -> dict[str, Any]:
        """One link as a change answers it: without the shares' usage (`link_overview`)."""
        return link_overview(self.store, self.control.runner, name, usage=False)[0]

    def overview(self) -> list[dict[str, Any]]:
        return link_overview(self.store, self.control.runner)

    def journal_entries(self, name: str | None) -> list[dict[str, Any]]:
        if name is not None:
            validate.name(name, "cell")
        with self.store.read() as conn:
            return journal.entries(conn, name)
