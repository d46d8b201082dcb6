"""Import the seed system's `cell_links.json` (DESIGN §4).

Accepted shapes: a list of link objects, an object of them keyed by cell name, or
`{"links": [...]}`. Every field the seed wrote is mapped; a missing field takes its default
(`dns_ip`: the network's first host, `domain`: `<name>.cell`, the mesh port: the one in
`remote_api_url`, else 3000); unknown fields are kept in the journal. The whole file is imported
in one transaction: a bad or conflicting entry refuses all of it, naming the entry's cell.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import time
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from picell.api.strict_json import loads_strict
from picell.errors import BadInput
from picell.mesh.invite import parse_identity
from picell.mesh.links import Links, _link_from
from picell.store import cell as cell_table
from picell.store import journal
from picell.store import links as link_table
from picell.store.links import Link, LinkState, OwnerChoices, Share

SEED_MAX = 4_000_000  # bytes: the API's own limit on the seed file (LinksImport)

IDENTITY = ("cell_name", "public_key", "endpoint", "vpn_subnet", "dns_ip", "domain")
FLAGS = ("exit_offered", "remote_exit_offered", "exit_relay_active", "remote_exit_relay_active",
         "pending_push")  # fmt: skip
TIMES = ("last_push_at", "last_remote_update_at")
TEXTS = ("last_push_status", "last_push_error")
KNOWN = {*IDENTITY, *FLAGS, *TIMES, *TEXTS, "remote_api_url", "inbound", "outbound", "mesh_port"}


@dataclass(frozen=True)
class _Seeded:
    """What a seed entry says beyond the other cell's identity, in the seed's own words;
    `onto` puts each value in its part of the link and keeps what the seed does not hold (their
    exit ends, the sequence numbers, our invite proof)."""

    choices: OwnerChoices
    outbound: tuple[dict[str, Any], ...]
    remote_exit_offered: bool
    remote_exit_relay_active: bool
    last_remote_update_at: float | None
    pending_push: int
    last_push_status: str | None
    last_push_at: float | None
    last_push_error: str | None
    api_url: str  # "": the one the identity implies

    def onto(self, link: Link) -> Link:
        mirror = replace(
            link.mirror,
            outbound=self.outbound,
            exit_offered=self.remote_exit_offered,
            exit_relay_active=self.remote_exit_relay_active,
            updated_at=self.last_remote_update_at,
        )
        sync = replace(
            link.sync,
            pending_push=self.pending_push,
            last_push_status=self.last_push_status,
            last_push_at=self.last_push_at,
            last_push_error=self.last_push_error,
        )
        identity = replace(link.identity, api_url=self.api_url or link.identity.api_url)
        return replace(link, identity=identity, choices=self.choices, mirror=mirror, sync=sync)


def _entries(data: Any) -> list[dict[str, Any]]:
    if isinstance(data, dict) and isinstance(data.get("links"), list):
        data = data["links"]
    if isinstance(data, dict):
        return [{"cell_name": k, **v} if isinstance(v, dict) else {"cell_name": k, "_bad": v}
                for k, v in data.items()]  # fmt: skip
    if isinstance(data, list):
        return [e if isinstance(e, dict) else {"_bad": e} for e in data]
    raise BadInput("content: a list or an object of links is expected", field="content")


def _time(value: Any, field: str) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=dt.UTC)
            return parsed.timestamp()
    raise BadInput(f"{field}: {value!r} is not a time", field=field)


def _names(value: Any, field: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadInput(f"{field}: a list is expected", field=field)
    return value


def _one(entry: dict[str, Any], index: int) -> tuple[Any, _Seeded, dict[str, Any]]:
    where = f"links[{index}]"
    if "_bad" in entry:
        raise BadInput(f"{where}: a link object is expected", field=where)
    name = entry.get("cell_name")
    prefix = f"{where} ({name}) ." if name else f"{where}."
    raw = dict(entry)
    try:
        net = ipaddress.IPv4Network(str(raw.get("vpn_subnet")), strict=False)
    except ValueError:
        net = None
    if not raw.get("dns_ip") and net is not None:
        raw["dns_ip"] = str(net[1])
    if not raw.get("domain") and name:
        raw["domain"] = f"{name}.cell"
    url = str(raw.get("remote_api_url") or "")
    port = raw.get("mesh_port") or (urlsplit(url).port if url else None) or 3000
    fields = {k: raw.get(k) for k in IDENTITY if raw.get(k) is not None}
    identity = parse_identity({**fields, "mesh_port": port}, prefix.replace(" .", ".").rstrip("."))
    flags = {f: bool(raw.get(f, False)) for f in FLAGS}
    times = {f: _time(raw.get(f), f"{where}.{f}") for f in TIMES}
    texts = {f: (str(raw[f]) if raw.get(f) is not None else None) for f in TEXTS}
    seeded = _Seeded(
        choices=OwnerChoices(
            shares=tuple(sorted({Share(str(x.get("name") if isinstance(x, dict) else x))
                                 for x in _names(raw.get("inbound"), f"{where}.inbound")})),
            exit_offered=flags["exit_offered"],
            exit_relay_active=flags["exit_relay_active"],
        ),
        outbound=tuple(x if isinstance(x, dict) else {"name": str(x)}
                       for x in _names(raw.get("outbound"), f"{where}.outbound")),
        remote_exit_offered=flags["remote_exit_offered"],
        remote_exit_relay_active=flags["remote_exit_relay_active"],
        last_remote_update_at=times["last_remote_update_at"],
        pending_push=int(flags["pending_push"]),
        last_push_status=texts["last_push_status"],
        last_push_at=times["last_push_at"],
        last_push_error=texts["last_push_error"],
        api_url=url,
    )  # fmt: skip
    unknown = {k: v for k, v in entry.items() if k not in KNOWN}
    return identity, seeded, unknown


def import_links(links: Links, content: str) -> dict[str, Any]:
    data = loads_strict(content.encode(), max_bytes=SEED_MAX, field="content")
    parsed = [_one(e, i) for i, e in enumerate(_entries(data))]
    imported = []
    with links.control.change() as conn:
        cell = cell_table.load(conn)
        for identity, seeded, unknown in parsed:
            # the owner's own file: their word for each domain, as `connect --trust-domain`
            mapped = links.admit(conn, cell, identity, "links.", trusted_domain=True)
            existing = link_table.by_key(conn, identity.public_key)
            link = seeded.onto(_link_from(identity, existing, LinkState.LINKED, mapped))
            link_table.save(conn, replace(link, linked_at=link.linked_at or time.time()))
            journal.append(conn, link.name, "imported", "local owner", "from cell_links.json")
            if unknown:
                journal.append(conn, link.name, "import: unknown fields kept", "local owner",
                               json.dumps(unknown, sort_keys=True))  # fmt: skip
            imported.append({"name": link.name, "unknown_fields": sorted(unknown)})
    links.wake_sender()
    return {"imported": imported}
