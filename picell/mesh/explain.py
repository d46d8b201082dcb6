"""The grant on the serving side, asked across cells (`picell doctor`): a signed `explain`
message (`wire.ExplainBody`, mesh route `/api/cells/peer-sync/explain`) and its typed answer
(`wire.ExplainAnswer`).

- The asking side (`Explain.ask`) sends which service of the other cell it (or one of its
  devices) wants, signed with the link key and with the next `seq` of the link, like every
  message; it parses the answer strictly and checks that it answers the question asked.
- The serving side (`Explain.receive`) authenticates the message like every peer-sync message
  (source address, MAC, addressee, freshness: a replay is refused), records its `seq`, and
  answers from its own grants (`links.inbound`), never from what the asker believes. A service
  not shared with the asker and a service that does not exist get the same answer, byte for
  byte, so the question reveals nothing that is not shared.
- Both owners read the same line (`answer_line`): the serving owner through `picell doctor
  --from CELL --to SERVICE` (decided locally with the same `decide`), the asking owner through
  `picell doctor --to CELL/SERVICE`.

Must not: change a grant, or answer anything but the one question.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import replace
from typing import Any

from pydantic import ValidationError

from picell.errors import Conflict
from picell.mesh import client, wire
from picell.mesh.client import model_error, printable
from picell.mesh.links import Links
from picell.mesh.protocol import check_fresh, envelope_from, parse_envelope, retire
from picell.store import cell as cell_table
from picell.store import journal
from picell.store import links as link_table
from picell.store import services as service_table
from picell.store.links import Link, LinkState

log = logging.getLogger(__name__)


class ExplainFailed(Exception):
    """The other cell could not be asked, or its answer is unusable (one printable line)."""


def refusal(service: str) -> wire.ExplainAnswer:
    return wire.ExplainAnswer(ok=True, service=service, allowed=False)


def decide(
    conn: sqlite3.Connection, link: Link, service: str, device: str | None = None
) -> wire.ExplainAnswer:
    """Our answer to `link` (or its `device`, one it publishes) about our `service`: from our
    own grants only. The refusal is one value whatever the reason (not shared, no such
    service, the link not linked, the device not listed)."""
    share = next((s for s in link.choices.shares if s.key == (service, "")), None)
    if share is None and device and link.mirror.device(device) is not None:
        share = next((s for s in link.choices.shares if s.key == (service, device)), None)
    if link.state != LinkState.LINKED or share is None:
        return refusal(service)
    svc = next((s for s in service_table.all_services(conn) if s.name == service), None)
    if svc is None:
        return refusal(service)
    event = f"shared {service}" + (f" with {share.device}" if share.device else "")
    since = journal.last_at(conn, link.name, event)
    return wire.ExplainAnswer(
        ok=True,
        service=service,
        allowed=True,
        since=since,
        until=share.until,
        ports=[svc.port],
        protocol="udp" if svc.protocol == "udp" else "tcp",
    )


def when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(at))


def answer_line(asker: str, device: str | None, server: str, answer: wire.ExplainAnswer) -> str:
    """ "beta/phone → alpha/web:80 allowed since 2026-12-01 06:20 UTC": the one line both
    owners read."""
    who = f"{asker}/{device}" if device else asker
    if not answer.allowed:
        return f"{who} → {server}/{answer.service} not allowed"
    ports = ",".join(str(p) for p in answer.ports)
    proto = "/udp" if answer.protocol == "udp" else ""
    since = f"since {when(answer.since)}" if answer.since is not None else "(since: no record)"
    until = f" until {when(answer.until)}" if answer.until is not None else ""
    return f"{who} → {server}/{answer.service}:{ports}{proto} allowed {since}{until}"


class Explain:
    def __init__(self, links: Links) -> None:
        self.links = links
        self.store = links.store

    # -- the serving side ----------------------------------------------------------------------
    def receive(self, payload: Any, source: str | None) -> dict[str, Any]:
        env = parse_envelope(payload, wire.ExplainBody)
        body = env.body
        with self.store.transaction() as conn:
            link, cell = self.links.authenticate(conn, env, source)
            # replay-checked like every message: its seq is spent once answered
            epoch = body.epoch or ""
            if check_fresh(body, link) and (link.mirror.epoch or link.mirror.seq):
                journal.append(
                    conn,
                    link.name,
                    f"cell {link.name} was restored from a backup",
                    f"cell {link.name}",
                    "a new epoch",
                )
            mirror = replace(
                link.mirror, seq=body.seq, epoch=epoch, retired_epochs=retire(link, epoch)
            )
            link_table.save(conn, replace(link, mirror=mirror))
            answer = decide(conn, link, body.service, body.device)
        log.info("explain: %s", answer_line(link.name, body.device, cell.name, answer))
        return answer.model_dump(mode="json", exclude_none=True)

    # -- the asking side -----------------------------------------------------------------------
    def ask(self, name: str, service: str, device: str | None) -> wire.ExplainAnswer:
        """Ask linked cell `name` whether we (or our `device`) may use its `service`."""
        with self.store.transaction() as conn:
            link = link_table.get(conn, name)
            if link.state != LinkState.LINKED:
                raise Conflict(f"to: the link with {name} is {link.state.value}", field="to")
            cell = cell_table.load(conn)
            seq = link.sync.seq + 1
            conn.execute("UPDATE links SET local_seq = ? WHERE name = ?", (seq, name))
            extra: dict[str, Any] = {"service": service}
            if device:
                extra["device"] = device
            envelope = envelope_from(cell, link, "explain", seq, extra)
        try:
            status, data = client.send(
                cell.ip, link.identity.address, link.identity.mesh_port, "explain", envelope
            )
        except client.Unreachable as exc:
            raise ExplainFailed(str(exc)) from None
        if not 200 <= status < 300:
            message = data.get("message") if isinstance(data, dict) else data
            raise ExplainFailed(f"HTTP {status}: {printable(message)}")
        if not isinstance(data, dict):
            raise ExplainFailed(f"HTTP {status}: answer: a JSON object is expected")
        try:
            answer = wire.ExplainAnswer.model_validate(data)
        except ValidationError as exc:
            raise ExplainFailed(f"HTTP {status}: {model_error(exc)}") from None
        if answer.service != service:
            raise ExplainFailed(f"HTTP {status}: answer.service: not the service we asked about")
        return answer
