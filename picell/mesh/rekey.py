"""Key rotation (`picell keys rotate`): a new cell key, with every link moving to it through
the existing tunnels, no new invite.

The message is a signed `rekey` body (`wire.RekeyBody`) on the mesh listener
(`/api/cells/peer-sync/rekey`): signed with the link key of our current key, like every
message, so the receiver knows it comes from the cell it links with; its `proof` is a MAC with
the link key of the NEW key over both keys, so only the holder of the new private key can make
it (a leaked old key alone cannot move a link to a key of the thief's choosing without also
proving the new key; it could always impersonate us anyway, which is why we rotate).

Ordering, so that no tunnel is stranded (a WireGuard interface has one private key, and a
peer's key cannot be in two places):
1. **prepare**: a `rekey` without `switch` to every linked cell. The receiver only keeps the
   new key (`Mirror.next_key`); its tunnel stays on the old one.
2. Only when every linked cell answered the prepare: **switch**: a `rekey` with `switch` to
   each. The receiver answers, then moves its link (and its WireGuard peer) to the new key.
   Once every switch was sent, we take the new key ourselves and converge: the interface key
   changes and WireGuard handshakes again on the new keys.
3. A linked cell that did not answer the prepare keeps the rotation in flight: the old key
   stays in use everywhere (the owner sees which cells are missing in `picell status` and
   `picell cells`), and `picell keys rotate` again resumes it with the same new key. A cell
   that was prepared but missed the switch holds the new key already: it moves on its own
   once its tunnel with the old key has been stale for `LINK_STALE_S` (`follow_stale`).

Every device has the cell's public key in its config: after a rotation each must import its
config again; `rotate` names them.

Must not: switch our key before every linked cell holds the new one, or move a link on an
unproven key.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

from pydantic import ValidationError

from picell.constants import LINK_STALE_S
from picell.errors import Conflict, Forbidden
from picell.mesh import client, wire
from picell.mesh.client import model_error
from picell.mesh.crypto import link_key, mac, mac_ok
from picell.mesh.links import Links
from picell.mesh.protocol import check_fresh, envelope_from, parse_envelope, retire
from picell.store import cell as cell_table
from picell.store import journal, peers
from picell.store import links as link_table
from picell.store.links import Link, LinkState
from picell.wireguard import keys
from picell.wireguard.apply import observe_wg

log = logging.getLogger(__name__)


def proof(new_private: str, old_public: str, their_public: str) -> str:
    """Our proof that we hold the key behind `new_private` (see the module's docstring)."""
    signed = {"from_public_key": old_public, "new_public_key": keys.public_from_private(
        new_private), "to_public_key": their_public}  # fmt: skip
    return mac(link_key(new_private, their_public), signed)


def proof_ok(our_private: str, body: wire.RekeyBody) -> bool:
    signed = {"from_public_key": body.from_public_key, "new_public_key": body.new_public_key,
              "to_public_key": body.to_public_key}  # fmt: skip
    return mac_ok(link_key(our_private, body.new_public_key), signed, body.proof)


class Rekey:
    def __init__(self, links: Links) -> None:
        self.links = links
        self.store = links.store
        self.control = links.control

    # -- the rotating side ---------------------------------------------------------------------
    def rotate(self) -> dict[str, Any]:
        """Start (or resume) a rotation; see the module's docstring for the order."""
        with self.store.transaction() as conn:
            cell = cell_table.load(conn)
            new_private = cell.next_private_key or keys.generate_private()
            conn.execute("UPDATE cell SET next_private_key = ? WHERE id = 1", (new_private,))
            linked = [ln.name for ln in link_table.all_links(conn) if ln.state == LinkState.LINKED]
            for name in linked:
                conn.execute("UPDATE links SET rekey_state = 'pending' WHERE name = ?", (name,))
        pending: dict[str, str] = {}
        for name in linked:
            error = self._send(name, new_private, switch=False)
            if error is not None:
                pending[name] = error
        moved: list[str] = []
        switched = not pending
        if switched:
            for name in linked:
                error = self._send(name, new_private, switch=True)
                if error is None:
                    moved.append(name)
                else:  # it holds the new key: it follows once its tunnel is stale
                    pending[name] = f"{error}; it holds the new key and follows on its own"
            self._switch(new_private, moved, pending)
        with self.store.read() as conn:
            devices = [p.name for p in peers.all_peers(conn)]
        return {
            "public_key": keys.public_from_private(new_private),
            "switched": switched,
            "moved": moved,
            "pending": pending,
            "devices": devices if switched else [],
        }

    def _send(self, name: str, new_private: str, *, switch: bool) -> str | None:
        with self.store.transaction() as conn:
            link = link_table.get(conn, name)
            cell = cell_table.load(conn)
            seq = link.sync.seq + 1
            conn.execute("UPDATE links SET local_seq = ? WHERE name = ?", (seq, name))
            old_public = keys.public_from_private(cell.private_key)
            extra = {"new_public_key": keys.public_from_private(new_private),
                     "proof": proof(new_private, old_public, link.public_key),
                     "switch": switch}  # fmt: skip
            envelope = envelope_from(cell, link, "rekey", seq, extra)
        try:
            status, data = client.send(cell.ip, link.identity.address, link.identity.mesh_port,
                                       "rekey", envelope)  # fmt: skip
        except client.Unreachable as exc:
            return str(exc)
        if not 200 <= status < 300:
            message = data.get("message") if isinstance(data, dict) else data
            return f"HTTP {status}: {client.printable(message)}"
        try:
            answer = wire.RekeyAnswer.model_validate(data)
        except ValidationError as exc:
            return f"HTTP {status}: {model_error(exc)}"
        if answer.new_public_key != extra["new_public_key"]:
            return f"HTTP {status}: answer.new_public_key: not the key we sent"
        with self.store.transaction() as conn:
            state = "told" if switch else "prepared"
            conn.execute("UPDATE links SET rekey_state = ? WHERE name = ?", (state, name))
        return None

    def _switch(self, new_private: str, moved: list[str], pending: dict[str, str]) -> None:
        with self.control.change() as conn:
            conn.execute(
                "UPDATE cell SET private_key = ?, next_private_key = NULL, rotated_at = ?"
                " WHERE id = 1",
                (new_private, time.time()),
            )
            conn.execute("UPDATE links SET rekey_state = NULL")
            for name in moved:
                journal.append(conn, name, "key rotated", "local owner",
                               "they moved to our new key through the tunnel")  # fmt: skip
                link_table.mark_pending(conn, name)
            for name, why in pending.items():
                journal.append(conn, name, "key rotated", "local owner", why)
        self.links.wake_sender()

    # -- the receiving side --------------------------------------------------------------------
    def receive(self, payload: Any, source: str | None) -> dict[str, Any]:
        """Keep (prepare) or move to (switch) the other cell's new key. Only the store changes
        here: the caller converges after the answer left, through the old tunnel."""
        env = parse_envelope(payload, wire.RekeyBody)
        body = env.body
        with self.store.transaction() as conn:
            link, cell = self.links.authenticate(conn, env, source)
            if not proof_ok(cell.private_key, body):
                raise Forbidden("body.proof: does not prove the new key", field="body.proof")
            ours = keys.public_from_private(cell.private_key)
            other = link_table.by_key(conn, body.new_public_key)
            if body.new_public_key == ours or (other is not None and other.name != link.name):
                raise Conflict("body.new_public_key: already in use", field="body.new_public_key")
            epoch = body.epoch or ""
            mirror = replace(link.mirror, seq=body.seq, epoch=epoch,
                             retired_epochs=retire(link, epoch))  # fmt: skip
            if check_fresh(body, link) and (link.mirror.epoch or link.mirror.seq):
                journal.append(conn, link.name, f"cell {link.name} was restored from a backup",
                               f"cell {link.name}", "a new epoch")  # fmt: skip
            if body.switch:
                updated = replace(link, public_key=body.new_public_key,
                                  mirror=replace(mirror, next_key=None))  # fmt: skip
                journal.append(conn, link.name, "their key rotated", f"cell {link.name}",
                               "the link moved to their new key, no new invite needed")  # fmt: skip
            else:
                updated = replace(link, mirror=replace(mirror, next_key=body.new_public_key))
                if link.mirror.next_key != body.new_public_key:
                    journal.append(conn, link.name, "their key rotating", f"cell {link.name}",
                                   "their new key is kept, ready")  # fmt: skip
            link_table.save(conn, updated)
        return {"ok": True, "new_public_key": body.new_public_key}

    def follow_stale(self) -> list[str]:
        """Links whose cell announced a new key and whose tunnel on the old one has been stale
        for `LINK_STALE_S`: it switched while we missed its word. Move them (journalled)."""
        with self.store.read() as conn:
            cell = cell_table.load(conn)
            candidates = [ln for ln in link_table.all_links(conn) if ln.mirror.next_key]
        if not candidates:
            return []
        observed = observe_wg(self.control.runner, cell.interface)
        now = time.time()
        moved = []
        for link in candidates:
            peer = observed.peers.get(link.public_key) if observed else None
            last = peer.latest_handshake if peer else 0
            if last and now - last < LINK_STALE_S:
                continue
            if not last and now - (link.mirror.updated_at or 0) < LINK_STALE_S:
                continue
            moved.append(self._follow(link))
        if moved:
            self.control.converge_soon()
        return moved

    def _follow(self, link: Link) -> str:
        with self.store.transaction() as conn:
            current = link_table.find(conn, link.name)
            if current is not None and current.mirror.next_key:
                link_table.save(
                    conn,
                    replace(
                        current,
                        public_key=current.mirror.next_key,
                        mirror=replace(current.mirror, next_key=None),
                    ),
                )
                journal.append(
                    conn,
                    link.name,
                    "their key rotated",
                    "local owner",
                    "moved to the new key they announced: the old tunnel went stale",
                )
        return link.name


def rotation_status(conn: Any) -> dict[str, Any]:
    """For `picell status` and the web page: the rotation in flight and the last one."""
    cell = cell_table.load(conn)
    rows = conn.execute("SELECT name, rekey_state FROM links WHERE rekey_state IS NOT NULL")
    waiting = [r[0] for r in rows if r[1] == "pending"]
    return {
        "in_flight": cell.next_private_key is not None,
        "waiting_for": waiting,
        "rotated_at": cell.rotated_at,
    }
