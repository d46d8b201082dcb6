"""Record deltas for a running Unbound: what `unbound-control` must do to turn one `DnsState`
into another without a reload (pure; no process).

A share, a new device or a renamed service changes only local data (and, for a relayed link, a
view's local zones). Those are applied with `local_datas` / `local_datas_remove` and
`view_local_datas` / `view_local_datas_remove` / `view_local_zone` / `view_local_zone_remove`,
which take effect on the next query and keep Unbound's cache and its statistics; a reload drops
both and leaves a gap in which queries fail. Anything else (the zone, the listen address, access
control, forward zones, the set of views and their networks, upstreams) changes what only a
reload applies: `plan` then answers None.

Every value that reaches `unbound-control` is checked here once more, although the store and
the wire validated it: a name is plain LDH labels, a view is `link-NAME`, a zone type is one we
render. Bulk commands read one record per stdin line, so a line break inside a value would
smuggle in another record: a value that fails the check makes `plan` answer None (reload).
This module must not run commands or read files: `picell.dns.unbound` applies the plan.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from picell.dns.render import record_line, view_zones
from picell.state import DnsRecord, DnsState

# a name as the state holds it: LDH labels without the root dot
NAME_RE = re.compile(
    r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?){0,126}"
)
# the fully-qualified form: LDH labels, each followed by a dot, or the root alone
FQDN_RE = re.compile(r"\.|([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.){1,127}")
VIEW_RE = re.compile(r"link-[a-z]([a-z0-9-]{0,61}[a-z0-9])?")
ZONE_TYPES = frozenset({"static", "refuse", "transparent"})


@dataclass(frozen=True)
class Command:
    """One `unbound-control` call: its arguments after `-c CONF`, and the lines it reads."""

    args: tuple[str, ...]
    stdin: str | None = None

    def __str__(self) -> str:
        lines = self.stdin.count("\n") if self.stdin else 0
        return " ".join(self.args) + (f" ({lines} lines)" if lines else "")


def _frame(dns: DnsState) -> tuple[object, ...]:
    """What only a reload changes."""
    views = tuple((v.name, v.network) for v in dns.views)
    zones = tuple(z.domain for z in dns.zones)
    return (dns.domain, dns.listen, dns.port, dns.allow, dns.upstreams, dns.forwards, views, zones)


def _global(dns: DnsState) -> tuple[DnsRecord, ...]:
    """The records outside views: our zone's and the linked zones we present."""
    return (*dns.records, *(r for z in dns.zones for r in z.records))


def plan(old: DnsState, new: DnsState) -> list[Command] | None:
    """The commands that turn a running Unbound configured from `old` into one configured from
    `new`; [] when nothing differs; None when only a reload can (or a value fails its check)."""
    if _frame(old) != _frame(new):
        return None
    names = [
        r.fqdn for d in (old, new) for r in (*_global(d), *(r for v in d.views for r in v.records))
    ]
    names += [h for d in (old, new) for v in d.views for h in v.hidden]
    views = [v.name for d in (old, new) for v in d.views]
    if not all(NAME_RE.fullmatch(n) for n in names) or not all(
        VIEW_RE.fullmatch(f"link-{v}") for v in views
    ):
        return None  # checked on the values: a line break would be a valid record of its own
    commands = _data(_global(old), _global(new), None)
    for before, after in zip(old.views, new.views, strict=True):
        view = f"link-{after.name}"
        zones_before = dict(view_zones(old, before))
        zones_after = dict(view_zones(new, after))
        for name in sorted(zones_before):
            if zones_after.get(name) != zones_before[name]:
                commands.append(Command(("view_local_zone_remove", view, name)))
        for name, kind in sorted(zones_after.items()):
            if zones_before.get(name) != kind:
                commands.append(Command(("view_local_zone", view, name, kind)))
        commands += _data(before.records, after.records, view)
    return commands if all(_checked(c) for c in commands) else None


def _data(old: Iterable[DnsRecord], new: Iterable[DnsRecord], view: str | None) -> list[Command]:
    """Names whose records differ are removed whole, then given their new records: removing
    a name removes all its data, so an address that changed is a remove and an add."""
    before, after = _by_name(old), _by_name(new)
    changed = sorted(n for n in before.keys() | after.keys() if before.get(n) != after.get(n))
    gone = [f"{n}." for n in changed if n in before]
    added = [record_line(r) for n in changed for r in sorted(after.get(n, ()))]
    prefix = ("view_local_datas",) if view else ("local_datas",)
    where = (view,) if view else ()
    commands = []
    if gone:
        commands.append(Command((f"{prefix[0]}_remove", *where), "".join(f"{n}\n" for n in gone)))
    if added:
        commands.append(Command((prefix[0], *where), "".join(f"{line}\n" for line in added)))
    return commands


def _by_name(records: Iterable[DnsRecord]) -> dict[str, frozenset[DnsRecord]]:
    grouped: dict[str, set[DnsRecord]] = defaultdict(set)
    for record in records:
        grouped[record.fqdn].add(record)
    return {name: frozenset(group) for name, group in grouped.items()}


def _checked(command: Command) -> bool:
    verb, *rest = command.args
    if verb.startswith("view_"):
        view, *rest = rest
        if not VIEW_RE.fullmatch(view):
            return False
    if verb.endswith("_zone"):
        name, kind = rest
        return bool(FQDN_RE.fullmatch(name)) and kind in ZONE_TYPES
    if verb.endswith("_zone_remove"):
        return len(rest) == 1 and bool(FQDN_RE.fullmatch(rest[0]))
    lines = (command.stdin or "").splitlines()
    if rest or not lines or (command.stdin or "")[-1] != "\n":
        return False
    if verb.endswith("_remove"):
        return all(FQDN_RE.fullmatch(line) for line in lines)
    return all(_record_ok(line) for line in lines)


def _record_ok(line: str) -> bool:
    words = line.split(" ")
    if len(words) != 5 or words[1:4] != ["60", "IN", "A"] or not FQDN_RE.fullmatch(words[0]):
        return False
    octets = words[4].split(".")
    return len(octets) == 4 and all(o.isdigit() and len(o) <= 3 and int(o) < 256 for o in octets)
