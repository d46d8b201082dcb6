"""Render the owned nftables table as text for one atomic `nft -f` (pure; golden-file tested).

The file deletes and recreates `table inet picell` in a single transaction, so the kernel never
holds half a ruleset. The jump rule of the input chain carries a comment with the hash of the
text (`nft -j` of nft 1.0.6 omits table comments but keeps rule comments): `observe` reads it
back to tell whether the kernel holds what we rendered. One statement per line (nft 1.0.6 cannot
parse a chain closed on the line of its last rule).
"""

from __future__ import annotations

import hashlib

from picell.constants import TABLE_NAME
from picell.state import State

GRANT_SETS = {"tcp": "grants_tcp", "udp": "grants_udp"}


def grant_elements(state: State) -> dict[str, frozenset[str]]:
    """The desired elements of each grant set (applied as deltas when only they change)."""
    return {
        name: frozenset(g.element for g in state.grants if g.protocol == proto)
        for proto, name in GRANT_SETS.items()
    }


def render_table_body(state: State, with_elements: bool = True) -> list[str]:
    wg = state.interface
    net = state.network
    me = state.address.ip
    dnat = [
        f'\t\tiifname "{wg}" ip daddr {s.vip} {s.protocol} dport {s.port} '
        f"dnat ip to {s.backend_host}:{s.backend_port}"
        for s in state.services
    ]
    linked = ", ".join(str(n) for n in state.linked_networks)
    grant_sets: list[str] = []
    for name, elements in grant_elements(state).items():
        grant_sets += [
            f"\tset {name} {{",
            "\t\ttype ipv4_addr . ipv4_addr . inet_service",
            "\t\tflags interval",
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
        *grant_sets,
        "\tchain link_gate {",
        "\t\ttype filter hook prerouting priority -150; policy accept;",
        "\t\t# before DNAT: a linked cell's traffic to anything but this cell's own address",
        "\t\t# passes only for services granted to it (established flows too, so that a",
        "\t\t# revoked grant stops them)",
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
        *dnat,
        "\t}",
        "\tchain postrouting {",
        "\t\ttype nat hook postrouting priority srcnat; policy accept;",
        "\t\t# services whose backend is a LAN host answer to the cell, not to the device",
        f'\t\tiifname "{wg}" oifname != "{wg}" ct status dnat masquerade',
        "\t}",
        "\tchain input {",
        "\t\ttype filter hook input priority filter; policy accept;",
        f'\t\tiifname "{wg}" jump vpn_input comment "{{digest}}"',
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
        "\t\t# granted services with a backend on the cell host (link_gate let only those by)",
        "\t\tct status dnat accept",
        "\t\tcounter drop",
        "\t}",
        "\tchain own_input {",
        f"\t\tip daddr {me} udp dport {state.dns.port} accept",
        f"\t\tip daddr {me} tcp dport {state.dns.port} accept",
        f"\t\tip daddr {me} icmp type echo-request accept",
        "\t\t# services with a backend on the cell host (DNAT to loopback)",
        "\t\tct status dnat accept",
        "\t\tcounter drop",
        "\t}",
        "\tchain forward {",
        "\t\ttype filter hook forward priority filter; policy accept;",
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
        "\t\tcounter drop",
        "\t}",
        "\tchain vpn_deliver {",
        "\t\t# toward devices from elsewhere: only replies to what they opened",
        "\t\tct state established,related accept",
        "\t\tcounter drop",
        "\t}",
    ]


def ruleset_hash(body: list[str]) -> str:
    return hashlib.sha256("\n".join(body).encode()).hexdigest()[:32]


def render_ruleset(state: State) -> tuple[str, str]:
    """(nft -f text, hash). Creating the table first makes `delete` safe when it is absent.
    The hash leaves out the grant elements: those change as set-element deltas."""
    digest = "picell " + ruleset_hash(render_table_body(state, with_elements=False))
    body = [line.replace("{digest}", digest) for line in render_table_body(state)]
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
