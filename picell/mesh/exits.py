"""Routing one device's internet through a linked cell's exit (DESIGN §8): `route-via`.

The owner's choice lives in `peers.route_via`; the exit cell is told through the state document
(`use_as_exit_relay` and our end of the exit tunnel), and relays only while it also offers its
exit to us. A routed device never leaves through our own uplink: while its exit cell does not
offer (or cannot be reached) its traffic is dropped. Every change is commit + converge.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from picell import validate
from picell.control import Control
from picell.errors import Conflict, ExitNotOffered
from picell.store import cell as cell_table
from picell.store import exits as exit_table
from picell.store import journal
from picell.store import links as link_table
from picell.store import peers as peer_table
from picell.store.links import LinkState


class Exits:
    def __init__(self, control: Control, wake_sender: Callable[[], None] = lambda: None) -> None:
        self.control = control
        self.wake_sender = wake_sender

    def route_via(self, peer: str, via_cell: str | None) -> dict[str, Any]:
        """Send device `peer`'s internet through linked cell `via_cell` (None: through this
        cell, its home exit). Refused, changing nothing, when that cell does not offer it."""
        name = validate.name(peer)
        via = validate.name(via_cell, "via_cell") if via_cell is not None else None
        with self.control.change() as conn:
            device = peer_table.get(conn, name)
            if via is not None:
                link = link_table.get(conn, via)
                if link.state == LinkState.UNLINKING:
                    raise Conflict(f"via_cell: the link with {via} is ending", field="via_cell")
                if not link.mirror.exit_offered:
                    me = cell_table.load(conn).name
                    raise ExitNotOffered(
                        f"via_cell: cell {via} does not offer its internet exit to this cell; "
                        f"its owner can offer it with `picell exit-offer {me} on`",
                        field="via_cell",
                    )
                exit_table.claim(conn, via)
            if device.route_via != via:
                peer_table.set_route_via(conn, name, via)
                exit_table.release_unused(conn)
                for cell in {device.route_via, via} - {None}:
                    assert cell is not None
                    if link_table.find(conn, cell) is not None:
                        link_table.mark_pending(conn, cell)
                        event = (
                            f"device {name} " + ("uses" if cell == via else "left") + " their exit"
                        )
                        journal.append(conn, cell, event, "local owner")
        self.wake_sender()
        info = next(p for p in self.control.list_peers() if p["name"] == name)
        where = f"cell {via}'s uplink" if via else "this cell's own uplink"
        return {
            **info,
            "full_tunnel": True,
            "config": self.control.peer_config(name, full_tunnel=True),
            "message": (
                f"{name}'s internet traffic now leaves through {where}. The device needs a "
                f"full-tunnel config for that (AllowedIPs 0.0.0.0/0, ::/0): import this one, "
                f"or show it again with `picell peers config {name} --full-tunnel --qr`."
            ),
        }
