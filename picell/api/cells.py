"""Admin routes for links to other cells (DESIGN §9): list, invite, connect, disconnect,
journal, import of the seed system's link file. Handlers only call `Links`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import segno
from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, Field

from picell.api.admin import image
from picell.constants import DEFAULT_INVITE_TTL_S
from picell.mesh.links import Links
from picell.mesh.seed import import_links
from picell.mesh.sync import Sync


class CellConnect(BaseModel):
    invite: str = Field(max_length=8192)


class Permissions(BaseModel):
    services: list[str] = Field(max_length=1000)


class ExitOffer(BaseModel):
    offered: bool


class LinksImport(BaseModel):
    content: str = Field(max_length=4_000_000)


def get_links(request: Request) -> Links:
    links: Links = request.app.state.links
    return links


def get_sync(request: Request) -> Sync:
    sync: Sync = request.app.state.sync
    return sync


LinksDep = Annotated[Links, Depends(get_links)]
SyncDep = Annotated[Sync, Depends(get_sync)]
router = APIRouter(prefix="/api/cells")


@router.get("")
def list_cells(links: LinksDep) -> list[dict[str, Any]]:
    return links.overview()


@router.get("/invite")
def invite(
    links: LinksDep,
    expires: Annotated[float, Query(description="seconds until the token expires")] = (
        DEFAULT_INVITE_TTL_S
    ),
    format: Annotated[Literal["json", "svg"], Query()] = "json",
) -> Any:
    """A fresh invite (each call makes a new single-use token)."""
    inv = links.invite(expires)
    if format == "svg":
        return Response(image(segno.make(inv.encode(), error="m"), "svg"),
                        media_type="image/svg+xml")  # fmt: skip
    return {"invite": inv.as_dict(), "string": inv.encode()}


@router.get("/journal")
def journal(links: LinksDep, cell: str | None = None) -> list[dict[str, Any]]:
    return links.journal_entries(cell)


@router.post("", status_code=201)
def connect(body: CellConnect, links: LinksDep) -> dict[str, Any]:
    return links.connect(body.invite)


@router.post("/import", status_code=201)
def import_seed(body: LinksImport, links: LinksDep) -> dict[str, Any]:
    return import_links(links, body.content)


@router.put("/{name}/permissions")
def set_permissions(name: str, body: Permissions, sync: SyncDep) -> dict[str, Any]:
    """The full set of our services that cell `name` may use."""
    return sync.set_permissions(name, body.services)


@router.put("/{name}/exit-offer")
def exit_offer(name: str, body: ExitOffer, sync: SyncDep) -> dict[str, Any]:
    """Offer our internet exit to cell `name` (DESIGN §8); it sees `remote_exit_offered`."""
    return sync.set_exit_offer(name, body.offered)


@router.post("/{name}/shares/{service}")
def share(name: str, service: str, sync: SyncDep) -> dict[str, Any]:
    return sync.share(name, service)


@router.delete("/{name}/shares/{service}")
def unshare(name: str, service: str, sync: SyncDep) -> dict[str, Any]:
    return sync.unshare(name, service)


@router.get("/rejected")
def rejected(links: LinksDep) -> dict[str, int]:
    """Refused cross-cell messages since start, by route and status."""
    return dict(links.rejected)


@router.delete("/{name}", status_code=204)
def disconnect(name: str, links: LinksDep) -> Response:
    links.disconnect(name)
    return Response(status_code=204)
