"""Render the owned nftables table as text for one atomic `nft -f` (pure; golden-file tested).

The file deletes and recreates `table inet picell` in a single transaction, so the kernel never
holds half a ruleset. The jump rule of the input chain carries a comment with the hash of the
text (`nft -j` of nft 1.0.6 omits table comments but keeps rule comments): `observe` reads it
back to tell whether the kernel holds what we rendered. One statement per line (nft 1.0.6 cannot
parse a chain closed on the line of its last rule).
"""

from __future__ import annotations

import hashlib

from picell.constants import METRICS_PORT, TABLE_NAME
from picell.mesh.mapping import translate
from picell.routing.exits import exit_dns_port, exit_port
from picell.state import State

GRANT_SETS = {"tcp": "grants_tcp", "udp": "grants_udp"}


def grant_elements(state: State) -> dict[str, frozenset[str]]:
    """The desired elements of each grant set (applied as deltas when only they change)."""
    return {
        name: frozenset(g.element for g in state.grants if g.protocol == proto)
        for proto, name in GRANT_SETS.items()
    }


def render_table_body(
    state: State, with_elements: bool = True, default_uplinks: tuple[str, ...] = ()
) -> list[str]:
    wg = state.interface
    uplink = _uplink(state, default_uplinks)
    net = state.network
    me = state.address.ip
    dnat = [
        f'\t\tiifname "{wg}" ip daddr {s.vip} {s.protocol} dport {s.port} '
        f"dnat ip to {s.backend_host}:{s.backend_port}"
        for s in state.services
    ]
    linked = ", ".join(str(n) for n in state.linked_networks)
    ex = _exit_rules(state, uplink)
    rl = _relay_rules(state)
    tr = _translation_rules(state)
    grant_sets: list[str] = []
    for name, elements in grant_elements(state).items():
        grant_sets += [
            f"\tset {name} {{",
            "\t\ttype ipv4_addr . ipv4_addr . inet_service",
            "\t\tflags interval",
            "\t\tcounter",  # per grant: who used what (`cells`, the web page)
            *(
                [f"\t\telements = {{ {', '.join(sorted(elements))} }}"]
                if elements and with_elements
                else []
            ),
            "\t}",
        ]
    return [
        "\tset linked_nets {",
        "\t\ttype ipv4_addr",
        "\t\tflags interval",
        *([f"\t\telements = {{ {linked} }}"] if linked else []),
        "\t}",
        "\tset not_internet {",
        "\t\t# where an exit never leads: IANA special-purpose ranges and multicast, our and",
        "\t\t# linked networks, our LANs",
        "\t\ttype ipv4_addr",
        "\t\tflags interval",
        f"\t\telements = {{ {', '.join(str(n) for n in state.not_internet)} }}",
        "\t}",
        *grant_sets,
        *ex["chains"],
        "\tchain link_gate {",
        "\t\ttype filter hook prerouting priority -150; policy accept;",
        "\t\t# before DNAT: a linked cell's traffic to anything but this cell's own address",
        "\t\t# passes only for services granted to it (established flows too, so that a",
        "\t\t# revoked grant stops them)",
        *tr["gate"],
        f'\t\tiifname "{wg}" ip saddr @linked_nets ip daddr != {me} jump link_pre',
        "\t}",
        "\tchain link_pre {",
        "\t\t# replies to what our own devices opened on their side",
        "\t\tct direction reply accept",
        "\t\tct state related accept",
        "\t\tip saddr . ip daddr . tcp dport @grants_tcp accept",
        "\t\tip saddr . ip daddr . udp dport @grants_udp accept",
        "\t\tcounter drop",
        "\t}",
        "\tchain prerouting {",
        "\t\ttype nat hook prerouting priority dstnat; policy accept;",
        *ex["dns"],
        *rl["dnat"],
        *tr["dnat"],
        *dnat,
        "\t}",
        "\tchain postrouting {",
        "\t\ttype nat hook postrouting priority srcnat; policy accept;",
        "\t\t# services whose backend is a LAN host answer to the cell, not to the device",
        f'\t\tiifname "{wg}" oifname != "{wg}" ct status dnat masquerade',
        *_lend(
            uplink,
            "\t\t# the cell as home exit of its devices, and as relay of linked cells' devices",
            f'\t\tiifname "{wg}" ip saddr {net} {uplink} ip daddr != @not_internet masquerade',
        ),
        *ex["masquerade"],
        *rl["snat"],
        *tr["snat"],
        "\t}",
        "\tchain input {",
        "\t\ttype filter hook input priority filter; policy accept;",
        f'\t\tiifname "{wg}" jump vpn_input comment "{{digest}}"',
        *ex["input"],
        "\t}",
        "\tchain vpn_input {",
        "\t\tct state established,related accept",
        "\t\tct state invalid drop",
        f"\t\tip saddr {net} jump own_input",
        "\t\tip saddr @linked_nets jump link_input",
        "\t\tcounter drop",
        "\t}",
        "\tchain link_input {",
        "\t\t# a linked cell reaches our DNS (its view), our mesh API and our ping; nothing else",
        f"\t\tip daddr {me} udp dport {state.dns.port} accept",
        f"\t\tip daddr {me} tcp dport {state.dns.port} accept",
        f"\t\tip daddr {me} tcp dport {state.mesh_port} accept",
        f"\t\tip daddr {me} icmp type echo-request accept",
        *ex["link_input"],
        *rl["link_input"],
        "\t\t# granted services with a backend on the cell host (link_gate let only those by)",
        "\t\tct status dnat accept",
        "\t\tcounter drop",
        "\t}",
        "\tchain own_input {",
        f"\t\tip daddr {me} udp dport {state.dns.port} accept",
        f"\t\tip daddr {me} tcp dport {state.dns.port} accept",
        f"\t\tip daddr {me} tcp dport {METRICS_PORT} accept",  # our devices' Prometheus
        f"\t\tip daddr {me} icmp type echo-request accept",
        "\t\t# services with a backend on the cell host (DNAT to loopback)",
        "\t\tct status dnat accept",
        "\t\tcounter drop",
        "\t}",
        "\tchain forward {",
        "\t\ttype filter hook forward priority filter; policy accept;",
        *ex["forward"],
        f'\t\tiifname "{wg}" jump vpn_forward',
        f'\t\toifname "{wg}" jump vpn_deliver',
        "\t}",
        "\tchain vpn_forward {",
        "\t\tct state established,related accept",
        "\t\tct state invalid drop",
        "\t\t# the owner's devices reach each other",
        f'\t\tip saddr {net} ip daddr {net} oifname "{wg}" accept',
        "\t\t# and whatever linked cells let them reach (each cell enforces its own side)",
        f'\t\tip saddr {net} ip daddr @linked_nets oifname "{wg}" accept',
        "\t\t# services with a backend on the LAN (for linked cells: granted ones only)",
        f"\t\tip saddr {net} ct status dnat accept",
        "\t\tip saddr @linked_nets ct status dnat accept",
        *ex["vpn_forward"],
        *rl["vpn_forward"],
        *_lend(
            uplink,
            "\t\t# every other device may use the cell as its home exit: the internet only",
            f"\t\tip saddr {net} {uplink} ip daddr != @not_internet accept",
        ),
        "\t\tcounter drop",
        "\t}",
        "\tchain vpn_deliver {",
        "\t\t# toward devices from elsewhere: only replies to what they opened",
        "\t\tct state established,related accept",
        "\t\tcounter drop",
        "\t}",
    ]


def _set(items: list[str]) -> str:
    return "{ " + ", ".join(items) + " }"


def _uplink(state: State, default_uplinks: tuple[str, ...]) -> str | None:
    """Where the internet is: the configured uplink, else the interfaces of the host's default
    route; None (lend nothing: fail closed) without either. Never "anything but our own
    interfaces", which would lend a corporate VPN's tun0 too (the `not_internet` set keeps
    LANs and special-purpose ranges out either way)."""
    names = (state.uplink,) if state.uplink else default_uplinks
    if not names:
        return None
    return "oifname " + (f'"{names[0]}"' if len(names) == 1 else _set([f'"{n}"' for n in names]))


def _lend(uplink: str | None, *lines: str) -> list[str]:
    """The lines that lend the uplink, or a comment saying that nothing is lent."""
    if uplink is None:
        return ["\t\t# no uplink (no default route, none configured): no exit lends anything"]
    return list(lines)


def _exit_rules(state: State, uplink: str | None) -> dict[str, list[str]]:
    """The lines the exit relay adds to the table (DESIGN §8), by where they go.

    Our devices routed via an exit cell are marked for its table (routing does the rest) and
    their DNS goes to that exit's resolver; their packets may leave only into its tunnel. The
    relay forwards and masquerades what arrives through its tunnel to the internet only, and
    marks those connections so that replies are routed back into the tunnel. Nothing arriving
    through an exit tunnel may open anything here.
    """
    wg, me, net = state.interface, state.address.ip, state.network
    exits = state.exits
    parts = ("chains", "dns", "masquerade", "input", "link_input", "forward", "vpn_forward")
    out: dict[str, list[str]] = {k: [] for k in parts}
    if not exits:
        return out
    tunnels = [f'"{t.interface}"' for t in exits]
    steer = []
    for t in exits:
        if t.relay:
            steer += [
                f'\t\tiifname "{t.interface}" ct mark set {t.mark:#x}',
                f"\t\tct direction reply ct mark {t.mark:#x} meta mark set {t.mark:#x}",
            ]
            if uplink is not None:
                out["masquerade"].append(f'\t\tiifname "{t.interface}" {uplink} masquerade')
            out["forward"].append(f'\t\tiifname "{t.interface}" jump exit_relay')
            continue
        devices = _set([str(d) for d in t.devices])
        steer.append(
            f'\t\tiifname "{wg}" ip saddr {devices} ip daddr != {net} '
            f"ip daddr != @linked_nets meta mark set {t.mark:#x}"
        )
        out["dns"] += [
            f'\t\tiifname "{wg}" ip saddr {devices} ip daddr {me} {proto} dport 53 '
            f"dnat ip to {me}:{exit_dns_port(t.slot)}"
            for proto in ("udp", "tcp")
        ]
        out["vpn_forward"].append(f'\t\tip saddr {devices} oifname "{t.interface}" accept')
    routed = [str(d) for t in exits for d in t.devices]
    if routed:
        out["vpn_forward"] += [
            "\t\t# devices routed via an exit cell never leave through our own uplink",
            f"\t\tip saddr {_set(routed)} counter drop",
        ]
    ports = _set([str(exit_port(state.listen_port, t.slot)) for t in exits])
    out["link_input"] = [
        "\t\t# exit tunnels, nested in the link (WireGuard authenticates their peers)",
        f"\t\tip daddr {me} udp dport {ports} accept",
    ]
    out["input"] = [f"\t\tiifname {_set(tunnels)} jump exit_in"]
    relays = [f'"{t.interface}"' for t in exits if t.relay]
    uses = [f'"{t.interface}"' for t in exits if not t.relay]
    out["forward"] = [
        f"\t\toifname {_set(tunnels)} tcp flags syn tcp option maxseg size set rt mtu",
        *out["forward"],
        *([f"\t\toifname {_set(relays)} jump vpn_deliver"] if relays else []),
        f"\t\tiifname {_set(tunnels)} jump exit_in",
        *([f'\t\toifname {_set(uses)} iifname != "{wg}" counter drop'] if uses else []),
    ]
    out["chains"] = [
        "\tchain exit_steer {",
        "\t\ttype filter hook prerouting priority mangle; policy accept;",
        *steer,
        "\t}",
        "\tchain exit_in {",
        "\t\t# through an exit tunnel only replies come in: it opens nothing here",
        "\t\tct state established,related accept",
        "\t\tcounter drop",
        "\t}",
    ]
    if any(t.relay for t in exits):
        out["chains"] += [
            "\tchain exit_relay {",
            "\t\t# a linked cell's devices borrow our uplink: the internet, never our devices,",
            "\t\t# our LAN or our services",
            *_lend(uplink, f"\t\t{uplink} ip daddr != @not_internet accept"),
            "\t\tcounter drop",
            "\t}",
        ]
    return out


def _relay_rules(state: State) -> dict[str, list[str]]:
    """The lines the relay through a linked cell adds (issue 12; `picell.mesh.relay`), by
    where they go.

    As the relay: UDP from one linked cell to our address's port for its pair is DNATed to the
    other cell's WireGuard port and SNATed to our address, so that replies come back through
    us; only exactly that flow is forwarded. Nothing else opens, and what we carry is the two
    cells' WireGuard, ciphertext to us. As a relayed cell: WireGuard arrives over our tunnel
    from a linked cell that offers us its relay, to our own listen port only.
    """
    wg, me = state.interface, state.address.ip
    out: dict[str, list[str]] = {k: [] for k in ("dnat", "snat", "link_input", "vpn_forward")}
    net = state.network
    for r in state.relay.rules:
        # translation: each cell reaches us, and hears from us, where it presents our network
        arrives = translate(me, net, r.arrives) if r.arrives else me
        leaves = translate(me, net, r.leaves) if r.leaves else me
        out["dnat"].append(
            f'\t\tiifname "{wg}" ip saddr {r.source} ip daddr {arrives} udp dport {r.port} '
            f'dnat ip to {r.target}:{r.target_port} comment "relay {r.label}"'
        )
        match = f"ip saddr {r.source} ip daddr {r.target} udp dport {r.target_port} ct status dnat"
        out["snat"].append(f'\t\tiifname "{wg}" oifname "{wg}" {match} snat ip to {leaves}')
        out["vpn_forward"].append(f'\t\toifname "{wg}" {match} accept')
    if state.relay.rules:
        out["vpn_forward"].insert(0, "\t\t# the relay: one linked cell's WireGuard to another's")
    if state.relay.sources:
        sources = _set([str(s) for s in state.relay.sources])
        out["link_input"] = [
            "\t\t# WireGuard relayed by a linked cell that offers us its relay",
            f"\t\tip saddr {sources} ip daddr {me} udp dport {state.listen_port} accept",
        ]
    return out


def _translation_rules(state: State) -> dict[str, list[str]]:
    """The lines per-link translation adds (issue 15, `picell.mesh.mapping`), by where they go.

    For a link that presents our network at `seen_as`: what it sends us arrives addressed
    there, so the gate lets its packets to our address there by (as to our own address), and
    DNAT moves them to our own addresses, the granted VIPs straight to their backends (one NAT
    per connection: the first NAT rule that matches is the only one); what we send it leaves
    with our source moved there (SNAT), the exit tunnels' too. Conntrack undoes both for the
    replies. Its own network needs nothing here: the kernel already holds it where we present
    it (AllowedIPs, routes, grants)."""
    wg, me, net = state.interface, state.address.ip, state.network
    out: dict[str, list[str]] = {k: [] for k in ("gate", "dnat", "snat")}
    for ln in state.links:
        seen = ln.seen_as
        if seen is None:
            continue
        src = f'iifname "{wg}" ip saddr {ln.routed}'
        out["gate"].append(f"\t\t{src} ip daddr {translate(me, net, seen)} accept")
        out["dnat"] += [
            f"\t\t{src} ip daddr {translate(s.vip, net, seen)} {s.protocol} dport {s.port} "
            f"dnat ip to {s.backend_host}:{s.backend_port}"
            for s in state.services
        ]
        out["dnat"].append(f'\t\t{src} ip daddr {seen} dnat ip prefix to {net} comment "{ln.name}"')
        out["snat"].append(
            f'\t\toifname "{wg}" ip saddr {net} ip daddr {ln.routed} snat ip prefix to {seen} '
            f'comment "{ln.name}"'
        )
    for t in state.exits:
        if t.seen_as is not None and not t.relay:
            out["snat"].append(
                f'\t\toifname "{t.interface}" ip saddr {net} snat ip prefix to {t.seen_as}'
            )
    if out["dnat"]:
        out["dnat"].insert(0, "\t\t# linked cells that present our network elsewhere")
    return out


def ruleset_hash(body: list[str]) -> str:
    return hashlib.sha256("\n".join(body).encode()).hexdigest()[:32]


def render_ruleset(state: State, default_uplinks: tuple[str, ...] = ()) -> tuple[str, str]:
    """(nft -f text, hash). Creating the table first makes `delete` safe when it is absent.
    The hash leaves out the grant elements: those change as set-element deltas.
    `default_uplinks` (the default route's interfaces, `routing.host.default_uplinks`) is
    where the exit lends when the cell has no configured uplink; empty, it lends nothing."""
    digest = "picell " + ruleset_hash(
        render_table_body(state, with_elements=False, default_uplinks=default_uplinks)
    )
    body = [
        line.replace("{digest}", digest)
        for line in render_table_body(state, default_uplinks=default_uplinks)
    ]
    text = "\n".join(
        [
            f"table inet {TABLE_NAME}",
            f"delete table inet {TABLE_NAME}",
            f"table inet {TABLE_NAME} {{",
            *body,
            "}",
            "",
        ]
    )
    return text, digest


def render_grant_delta(
    have: dict[str, frozenset[str]], want: dict[str, frozenset[str]]
) -> list[str]:
    """`nft -f` lines turning the grant sets from `have` into `want` (one transaction)."""
    lines = []
    for name in sorted(want):
        added = sorted(want[name] - have.get(name, frozenset()))
        removed = sorted(have.get(name, frozenset()) - want[name])
        if removed:
            lines.append(f"delete element inet {TABLE_NAME} {name} {{ {', '.join(removed)} }}")
        if added:
            lines.append(f"add element inet {TABLE_NAME} {name} {{ {', '.join(added)} }}")
    return lines
