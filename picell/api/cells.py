"""Admin routes for links to other cells (DESIGN §9): list, invites, connect, disconnect,
sharing, exit and relay offers, journal, import of the seed system's link file. Handlers only
call `Links`, `Sync` and the invites table; bodies and answers are the typed models of
`picell.api.models`.

No GET changes anything: an invite (a stored single-use token) is made only by
`POST /api/cells/invites`, whose one answer carries the JSON, the copy-paste string and the QR
code (SVG), since the token is never shown again.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import segno
from fastapi import APIRouter, Depends, Path, Query, Request, Response

from picell.api.admin import image
from picell.api.models import (
    NAME_MAX,
    NAME_PATTERN,
    CellConnect,
    CellOut,
    ExitOffer,
    ImportOut,
    InviteCreate,
    InviteCreated,
    InviteJson,
    InviteRow,
    JournalEntryOut,
    LinksImport,
    Permissions,
    PublishDevices,
    RelayOffer,
    Shares,
)
from picell.mesh.crypto import token_hash
from picell.mesh.links import Links
from picell.mesh.seed import import_links
from picell.mesh.sync import Sync
from picell.store import invites as invite_table
from picell.store.db import Store


def get_links(request: Request) -> Links:
    links: Links = request.app.state.links
    return links


def get_sync(request: Request) -> Sync:
    sync: Sync = request.app.state.sync
    return sync


def get_store(request: Request) -> Store:
    store: Store = request.app.state.control.store
    return store


LinksDep = Annotated[Links, Depends(get_links)]
SyncDep = Annotated[Sync, Depends(get_sync)]
StoreDep = Annotated[Store, Depends(get_store)]
CellName = Annotated[str, Path(pattern=NAME_PATTERN, max_length=NAME_MAX)]
ServiceName = Annotated[str, Path(pattern=NAME_PATTERN, max_length=NAME_MAX)]
InviteId = Annotated[int, Path(ge=1, le=2**53)]
router = APIRouter(prefix="/api/cells")


@router.get("", response_model=list[CellOut])
def list_cells(links: LinksDep) -> list[dict[str, Any]]:
    return links.overview()


# -- invites -----------------------------------------------------------------------------------
def create_invite(links: Links, store: Store, expires_s: float) -> InviteCreated:
    """A fresh invite (a new single-use token) as one answer; also the web page's."""
    inv = links.invite(expires_s)
    assert inv.pairing is not None  # our own invites always carry their pairing block
    with store.read() as conn:
        invite_id = invite_table.id_of(conn, token_hash(inv.pairing.token))
    text = inv.encode()
    svg = image(segno.make(text, error="m"), "svg").decode()
    return InviteCreated(
        id=invite_id,
        expires_at=inv.pairing.expires_at,
        invite=InviteJson.model_validate(inv.as_dict()),
        string=text,
        svg=svg,
    )


def list_invites(store: Store) -> list[InviteRow]:
    now = time.time()
    with store.read() as conn:
        records = invite_table.listing(conn)
    return [
        InviteRow(
            id=r.id,
            created_at=r.created_at,
            expires_at=r.expires_at,
            used_at=r.used_at,
            used_by=r.used_by,
            state=r.state(now),
        )
        for r in records
    ]


@router.post("/invites", status_code=201, response_model=InviteCreated)
def invite(body: InviteCreate, links: LinksDep, store: StoreDep) -> InviteCreated:
    """A fresh invite: its JSON, its copy-paste string and its QR code (SVG), in one answer.
    The token is shown only here; the cell keeps its hash."""
    return create_invite(links, store, body.expires_s)


@router.get("/invites", response_model=list[InviteRow])
def invites(store: StoreDep) -> list[InviteRow]:
    """The invites this cell handed out: open, used (and by whom) or expired. Creates nothing."""
    return list_invites(store)


@router.delete("/invites/{invite_id}", status_code=204)
def revoke_invite(invite_id: InviteId, store: StoreDep) -> Response:
    """End an invite that was not used: a redemption of it is refused from now on."""
    with store.transaction() as conn:
        invite_table.revoke(conn, invite_id)
    return Response(status_code=204)


# -- links -------------------------------------------------------------------------------------
@router.get("/journal", response_model=list[JournalEntryOut])
def journal(
    links: LinksDep,
    cell: Annotated[str | None, Query(pattern=NAME_PATTERN, max_length=NAME_MAX)] = None,
) -> list[dict[str, Any]]:
    return links.journal_entries(cell)


@router.post("", status_code=201, response_model=CellOut)
def connect(body: CellConnect, links: LinksDep) -> dict[str, Any]:
    """Import another cell's invite (its string, its JSON or `picell invite --json` output)."""
    return links.connect(body.invite, trust_domain=body.trust_domain, via=body.via)


@router.post("/import", status_code=201, response_model=ImportOut)
def import_seed(body: LinksImport, links: LinksDep) -> dict[str, Any]:
    return import_links(links, body.content)


@router.put("/{name}/permissions", response_model=CellOut)
def set_permissions(name: CellName, body: Permissions, sync: SyncDep) -> dict[str, Any]:
    """The whole list of our shares with cell `name`: entries `{service, device?, until?}`
    (a plain service name: its whole network, for good)."""
    entries = [
        (e, "", None) if isinstance(e, str) else (e.service, e.device or "", e.until)
        for e in body.services
    ]
    return sync.set_permissions(name, entries)


@router.put("/{name}/exit-offer", response_model=CellOut)
def exit_offer(name: CellName, body: ExitOffer, sync: SyncDep) -> dict[str, Any]:
    """Offer our internet exit to cell `name` (DESIGN §8), for good or `until` a date; it sees
    `remote_exit_offered`."""
    return sync.set_exit_offer(name, body.offered, body.until)


@router.put("/{name}/publish-devices", response_model=CellOut)
def publish_devices(name: CellName, body: PublishDevices, sync: SyncDep) -> dict[str, Any]:
    """Publish our devices' names and addresses to cell `name` in our documents (or stop):
    its owner may then share a service with one of them."""
    return sync.publish_devices(name, body.published)


@router.put("/{name}/relay-offer", response_model=CellOut)
def relay_offer(name: CellName, body: RelayOffer, sync: SyncDep) -> dict[str, Any]:
    """Offer our relay to cell `name` (issue 12): we relay between it and each other linked
    cell we offer it to; withdrawing ends those relayed paths at once."""
    return sync.set_relay_offer(name, body.offered)


@router.post("/{name}/shares/{service}", response_model=CellOut)
def share(name: CellName, service: ServiceName, sync: SyncDep) -> dict[str, Any]:
    return sync.share(name, [service])


@router.post("/{name}/shares", response_model=CellOut)
def share_many(name: CellName, body: Shares, sync: SyncDep) -> dict[str, Any]:
    """Add one or several services to what cell `name` (or one `device` it publishes) may
    use, for good or `until` a date, as one change."""
    return sync.share(name, body.services, "services", body.device or "", body.until)


@router.delete("/{name}/shares/{service}", response_model=CellOut)
def unshare(
    name: CellName,
    service: ServiceName,
    sync: SyncDep,
    device: Annotated[str | None, Query(pattern=NAME_PATTERN, max_length=NAME_MAX)] = None,
) -> dict[str, Any]:
    """End a share with cell `name` (its whole network, or the share with its `device`)."""
    return sync.unshare(name, service, device or "")


@router.get("/rejected", response_model=dict[str, int])
def rejected(links: LinksDep) -> dict[str, int]:
    """Refused cross-cell messages since start, by route and status."""
    return dict(links.rejected)


@router.delete("/{name}", status_code=204)
def disconnect(name: CellName, links: LinksDep) -> Response:
    links.disconnect(name)
    return Response(status_code=204)
