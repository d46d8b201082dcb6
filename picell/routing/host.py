"""Read the host's own routes and addresses (for defaults at init): `ip -j` only."""

from __future__ import annotations

import ipaddress
import json

from picell.system.run import Runner


def observe_host_networks(runner: Runner) -> list[ipaddress.IPv4Network]:
    out = runner.run(["ip", "-j", "-4", "route", "show", "table", "all"]).stdout
    nets = []
    for route in json.loads(out or "[]"):
        dst = route.get("dst", "")
        if dst and dst != "default":
            try:
                nets.append(ipaddress.IPv4Network(dst, strict=False))
            except ValueError:
                continue
    return nets


def observe_host_address(runner: Runner) -> str | None:
    out = runner.run(["ip", "-j", "-4", "addr", "show", "scope", "global"]).stdout
    for link in json.loads(out or "[]"):
        for a in link.get("addr_info", []):
            if a.get("family") == "inet":
                return str(a["local"])
    return None
