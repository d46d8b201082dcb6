"""Outgoing cross-cell HTTP: the pairing call (to the other cell's public pairing port) and
signed messages to its mesh API, sent from our WireGuard address so they travel in the tunnel.

Returns `(status, json body or None)`; transport failures raise `Unreachable`. Never retries:
the outbox owns retries.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import httpx

PAIR_PATH = "/api/cells/peer-sync/accept-invite"
# message type -> route on the other cell's mesh listener (DESIGN §6 names the state route)
MESH_ROUTES = {"state": "/api/cells/peer-sync/permissions", "unlink": "/api/cells/peer-sync/unlink"}
TIMEOUT_S = 8.0


class Unreachable(Exception):
    pass


def _post(client: httpx.Client, url: str, body: dict[str, Any]) -> tuple[int, Any]:
    try:
        resp = client.post(url, json=body)
    except httpx.HTTPError as exc:
        raise Unreachable(f"{url}: {exc.__class__.__name__}: {exc}") from exc
    try:
        data = resp.json()
    except ValueError:
        data = None
    return resp.status_code, data


def pair(host: str, port: int, body: dict[str, Any]) -> tuple[int, Any]:
    netloc = f"[{host}]" if ":" in host else host
    with httpx.Client(timeout=TIMEOUT_S, trust_env=False) as client:
        return _post(client, f"http://{netloc}:{port}{PAIR_PATH}", body)


def send(
    our_ip: ipaddress.IPv4Address,
    their_ip: ipaddress.IPv4Address,
    port: int,
    kind: str,
    envelope: dict[str, Any],
) -> tuple[int, Any]:
    transport = httpx.HTTPTransport(local_address=str(our_ip))
    with httpx.Client(transport=transport, timeout=TIMEOUT_S, trust_env=False) as client:
        return _post(client, f"http://{their_ip}:{port}{MESH_ROUTES[kind]}", envelope)
