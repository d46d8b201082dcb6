"""The words of the `picell` commands (DESIGN §9 is their contract): every answer's human text, the
`--json` output, the error lines, and the daemon's refusal read back from its body.

The one source of these words for both clients: the Typer CLI (`picell.cli.commands`) and the
fast path (`picell.cli.fast`). Functions take the answer as JSON values (dicts, lists, str,
numbers), as the daemon sent them or as an answer model's `model_dump(mode="json")` gives them.
Must import only the standard library (the fast path's start-up pays for every import) and must
not talk to the daemon.
"""

from __future__ import annotations

import json
import sys
import time

TYPE_CHECKING = False  # `typing` costs milliseconds of the fast path's start-up
if TYPE_CHECKING:
    from typing import Any

    Json = dict[str, Any]


def emit(data: Any, as_json: bool, human: str) -> None:
    """Print `human`, or with --json the answer's JSON value."""
    print(json.dumps(data, indent=2) if as_json else human)


def error(message: str, as_json: bool, body: Any = None) -> None:
    """A refused or failed command: the API's error body (or one like it) with --json, on stdout;
    else `error: MESSAGE` on stderr. The caller exits 1."""
    if as_json:
        print(json.dumps(body or {"code": "error", "message": message, "field": None}))
    else:
        print(f"error: {message}", file=sys.stderr)


def not_running(sock: object) -> str:
    return f"the picell daemon is not running (no answer on {sock}); start it with `picell serve`"


def refusal(content: bytes) -> tuple[str, Any]:
    """The message and body of a 4xx/5xx answer (the body is None when it is not JSON)."""
    try:
        body = json.loads(content)
        message = body.get("message") or str(body)
    except ValueError:
        body, message = None, content.decode("utf-8", "replace")
    return message, body


def duration(text: str) -> float:
    """An invite lifetime: 3600, 30m, 24h, 7d. ValueError names the accepted forms."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise ValueError(f"{text!r}: use e.g. 3600, 30m, 24h or 7d") from None


def _day_minute(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


# -- the cell ----------------------------------------------------------------------------------
def reach_lines(d: Json) -> list[str]:
    """What a StatusOut says about our endpoints: warnings, then the devices' note."""
    lines = [f"warning: {w}" for w in d["endpoint_warnings"]]
    if d["device_endpoint_note"]:
        lines.append(f"note: {d['device_endpoint_note']}")
    return lines


def _port_mapping(d: Json) -> str:
    m = d["port_mapping"]
    if m is None:
        why = f" ({d['port_mapping_error']})" if d["port_mapping_error"] else ""
        return f"port mapping: none{why}"
    pair = f", pairing TCP {m['pair_external_port']}" if m["pair_external_port"] else ""
    left = max(0, round(m["expires_at"] - time.time()))
    line = (
        f"port mapping: {m['protocol']} {m['external_address']}:{m['external_port']}{pair}, "
        f"{left} s left"
    )
    return line + (f"\nwarning: {m['warning']}" if m["warning"] else "")


def status_text(d: Json) -> str:
    """`picell status`: the cell's identity and health (a StatusOut)."""
    keys = ("name", "domain", "address", "endpoint", "interface", "public_key", "dns")
    lines = [f"{k}: {d[k]}" for k in keys]
    if len(d["endpoints"]) > 1:
        lines.append(f"endpoints: {', '.join(d['endpoints'])}")
    lines += reach_lines(d)
    lines.append(f"devices: {d['devices']}  services: {d['services']}")
    lines.append(f"dns running: {'yes' if d['dns_running'] else 'NO'}")
    if d["last_error"]:
        lines.append(f"last error: {d['last_error']}")
    for c in d["conflicts"]:
        lines.append(f"CONFLICT: link {c['cell']} ({c['network']}) overlaps {c['overlaps']}")
    lines.append(_port_mapping(d))
    for fw in d["host_firewall"]:
        lines.append(
            f"host firewall: {fw['owner']} ({fw['table']} {fw['chain']}) {fw['what']}: "
            f"{fw['action']}"
        )
    rot = d["key_rotation"]
    if rot is not None and rot["in_flight"]:
        waiting = ", ".join(rot["waiting_for"]) or "?"
        lines.append(f"key rotation: in flight, waiting for {waiting}"
                     " (run `picell keys rotate` again once they are online)")  # fmt: skip
    elif rot is not None and rot["rotated_at"]:
        lines.append(f"key rotated: {_day_minute(rot['rotated_at'])}")
    if d["restored_at"]:
        lines.append(f"restored from a backup: {_day_minute(d['restored_at'])}")
    for warning in d["last_reconcile"]["warnings"] if d["last_reconcile"] else []:
        if not warning.startswith("host firewall: "):  # said just above
            lines.append(f"warning: {warning}")
    return "\n".join(lines)


def peers_text(peers: list[Json]) -> str:
    """`picell peers list` (PeerLive rows)."""
    rows = [
        f"{p['name']:<20} {p['address']:<16} "
        f"{'never' if p['handshake_age_s'] is None else str(p['handshake_age_s']) + 's ago':<12} "
        f"rx {p['rx_bytes']} tx {p['tx_bytes']}"
        + (f"  internet via {p['route_via']}" if p["route_via"] else "")
        for p in peers
    ]
    return "\n".join(rows) or "no devices"


def services_text(services: list[Json]) -> str:
    """`picell services list` (ServiceOut rows)."""
    rows = [
        f"{s['name']:<20} {s['vip']}:{s['port']}/{s['protocol']:<4} -> {s['backend']}"
        for s in services
    ]
    return "\n".join(rows) or "no services"


# -- links -------------------------------------------------------------------------------------
def invite_text(d: Json) -> str:
    """`picell invite` (an InviteCreated): the JSON, the string, and how to end it."""
    return (
        f"{json.dumps(d['invite'], indent=2)}\n\n"
        "Copy-paste string (give it to the other cell's owner: picell connect STRING):\n"
        f"{d['string']}\n\n"
        f"invite {d['id']}, single use, expires {_day_minute(d['expires_at'])}; end it with "
        f"`picell invites revoke {d['id']}`"
    )


def invites_text(rows: list[Json]) -> str:
    """`picell invites` (InviteRow rows)."""

    def one(row: Json) -> str:
        state = {
            "open": f"open until {_day_minute(row['expires_at'])}",
            "expired": f"expired {_day_minute(row['expires_at'])}",
            "used": f"used {_day_minute(row['used_at'] or 0)} by {row['used_by']}",
        }[row["state"]]
        return f"{row['id']:>4}  created {_day_minute(row['created_at'])}  {state}"

    return "\n".join(one(r) for r in rows) or "no invites"


def _service(s: Json) -> str:
    """ "wiki (10.0.0.254:80) with phone until 2026-12-24T18:00:00+01:00, 3 flows, 1.2 kB" """
    text = f"{s['name']} ({s['vip']}:{','.join(map(str, s['ports']))})" if s["vip"] else s["name"]
    if s.get("device"):
        text += f" with {s['device']}"
        if s.get("published") is False:
            text += " (not listed by its cell now: no access)"
    if s.get("devices"):
        text += f" with {', '.join(s['devices'])}"
    if s.get("until"):
        text += f" until {s['until']}"
    if s.get("bytes") is not None:
        flows = f"{s['flows']} open flow(s), " if s.get("flows") is not None else ""
        text += f" [{flows}{s['packets']} packets, {s['bytes']} bytes]"
    return text


def _services(items: list[Json]) -> str:
    return ", ".join(_service(s) for s in items) or "nothing"


def _clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


def link_text(c: Json) -> str:
    """One linked cell (a CellOut), as `cells`, `share`, `unshare` and `connect` show it."""
    hs = "never" if c["handshake_age_s"] is None else f"{c['handshake_age_s']}s ago"
    state = c["state"]
    if state == "linked":
        state = "linked, online" if c["online"] else "linked, offline"
    at = ", ".join(c["endpoints"] or [c["endpoint"]])
    name = c["name"]
    # translation (issue 15): where we present its network, and where it presents ours
    net = c["vpn_subnet"] + (f" as {c['mapped_subnet']}" if c.get("mapped_subnet") else "")
    lines = [
        f"{name}  [{state}]  {c['domain']}  {net}  at {at}",
        f"  handshake {hs}  rx {c['rx_bytes']} tx {c['tx_bytes']}"
        + (f"  they see us at {c['seen_at']}" if c["seen_at"] else ""),
        f"  authentication string: {c['auth_string']} (compare it with {name}'s owner)",
        f"  we share: {_services(c['inbound'])}",
    ]
    if c.get("seen_as"):
        lines.append(f"  it presents our network at {c['seen_as']}")
    lines.append(f"  path: {c['path']}" + (f" ({c['relay_note']})" if c["relay_note"] else ""))
    if c["orphan"]:
        lines.append(f"  orphan: {c['orphan_reason']}")
    if c["rekey_state"] == "pending":
        lines.append("  key rotation: waiting for it to take our new key")
    exits = [
        "we offer them our relay" if c["relay_offered"] else "",
        "they offer us their relay" if c["remote_relay_offered"] else "",
        ("we offer them our exit" + (f" until {c['exit_until']}" if c.get("exit_until") else ""))
        if c["exit_offered"]
        else "",
        "they offer us their exit" if c["remote_exit_offered"] else "",
        "some of our devices use their exit" if c["exit_relay_active"] else "",
        "their devices use our exit" if c["relaying"] else "",
    ]
    if any(exits):
        lines.append("  " + "; ".join(x for x in exits if x))
    lines.append(f"  they share: {_services(c['outbound'])}")
    if c.get("publish_devices"):
        lines.append("  we publish our devices to them")
    if c.get("devices"):
        shown = ", ".join(f"{d['name']} ({d['address']})" for d in c["devices"])
        lines.append(f"  their devices: {shown}")
    if c["last_push_at"]:
        lines.append(f"  last push: {c['last_push_status']} at {_clock(c['last_push_at'])}")
    if c["last_remote_update_at"]:
        lines.append(f"  they last told us their state at {_clock(c['last_remote_update_at'])}")
    if c["last_push_error"]:
        lines.append(f"  {c['last_push_error']}")
    if c["pending_message"]:
        err = f": {c['pending_error']}" if c["pending_error"] else ""
        lines.append(f"  telling {name}: {c['pending_message']} pending{err}")
    return "\n".join(lines)


def cells_text(cells: list[Json]) -> str:
    """`picell cells` (CellOut rows)."""
    return "\n".join(link_text(c) for c in cells) or "no linked cells"


def journal_text(entries: list[Json], cell: str) -> str:
    """`picell cells --journal CELL` (JournalEntryOut rows)."""
    rows = [
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(e['at']))}  {e['event']}"
        f"  by {e['actor']}" + (f"  ({e['detail']})" if e["detail"] else "")
        for e in entries
    ]
    return "\n".join(rows) or f"no journal entries for {cell}"
