"""Endpoints follow reality (DESIGN §5, ARCHITECTURE rule 20): which endpoint each linked
cell's WireGuard peer is given on the next sync.

A peer with a fresh handshake keeps the endpoint WireGuard learned (roaming, a NAT's address):
its config line is left out, so `wg syncconf` keeps it. A stale one gets its declared endpoints
in turn, one every `ENDPOINT_RETRY_S`, each applied again so a host name is resolved anew. When
its declared endpoints change, the first new one is applied at once, fresh or not.

Owns only that choice and its memory between reconciles; must not run commands (the
reconciler syncs and `wg set`s what it returns).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from picell.constants import ENDPOINT_RETRY_S, LINK_STALE_S
from picell.state import PeerState, WgDevice
from picell.wireguard.apply import ObservedWg


class EndpointFollower:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        # stale links: which candidate endpoint we tried last, and when (by peer key)
        self._tries: dict[str, tuple[int, float]] = {}
        # each link peer's declared endpoints as we last saw them: a change is a move
        self._declared: dict[str, tuple[str, ...]] = {}
        self.tries = 0  # stale links given their next endpoint since the last `reset_count`

    def follow(
        self, dev: WgDevice, observed: ObservedWg | None, applied: dict[str, str]
    ) -> tuple[WgDevice, list[PeerState]]:
        """The device to sync, and the peers whose next try is due now but which `wg syncconf`
        would not see as a change (the same endpoint text: set it again by hand)."""
        now = self.clock()
        have = observed.peers if observed else {}
        peers, retry = [], []
        for peer in dev.peers:
            if not peer.candidates:
                peers.append(peer)
                continue
            got = have.get(peer.public_key)
            before = self._declared.get(peer.public_key)
            self._declared[peer.public_key] = peer.candidates
            if before is not None and before != peer.candidates:
                # the other cell told us it moved (its signed document, a new pairing): try
                # its new endpoint at once, fresh or not; if only the old address worked
                # (a NAT), its next packet roams us back
                self._tries[peer.public_key] = (0, now)
                chosen = replace(peer, endpoint=peer.candidates[0])
                peers.append(chosen)
                if got is not None and applied.get(peer.public_key) == chosen.endpoint:
                    retry.append(chosen)
                continue
            if (
                got is not None
                and got.latest_handshake
                and now - got.latest_handshake < LINK_STALE_S
            ):
                self._tries.pop(peer.public_key, None)
                peers.append(replace(peer, endpoint=None))
                continue
            index, at = self._tries.get(peer.public_key, (-1, 0.0))
            due = got is None or index < 0 or now - at >= ENDPOINT_RETRY_S
            if due:
                index = (index + 1) % len(peer.candidates)
                self._tries[peer.public_key] = (index, now)
                self.tries += got is not None
            chosen = replace(peer, endpoint=peer.candidates[index % len(peer.candidates)])
            peers.append(chosen)
            if due and got is not None and applied.get(peer.public_key) == chosen.endpoint:
                retry.append(chosen)  # syncconf sees no change: set it again by hand
        live = {p.public_key for p in dev.peers}
        for memory in (self._tries, self._declared):
            for key in set(memory) - live:
                del memory[key]
        return replace(dev, peers=tuple(peers)), retry
