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


def render_table_body(state: State) -> list[str]:
    wg = state.interface
    net = state.network
    me = state.address.ip
    dnat = [
        f'\t\tiifname "{wg}" ip daddr {s.vip} {s.protocol} dport {s.port} '
        f"dnat ip to {s.backend_host}:{s.backend_port}"
        for s in state.services
    ]
    linked = ", ".join(str(n) for n in state.linked_networks)
    return [
        "\tset linked_nets {",
        "\t\ttype ipv4_addr",
        "\t\tflags interval",
        *([f"\t\telements = {{ {linked} }}"] if linked else []),
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
        "\t\t# services with a backend on the LAN",
        f"\t\tip saddr {net} ct status dnat accept",
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
    """(nft -f text, hash). Creating the table first makes `delete` safe when it is absent."""
    body = render_table_body(state)
    digest = "picell " + ruleset_hash(body)
    body = [line.replace("{digest}", digest) for line in body]
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
