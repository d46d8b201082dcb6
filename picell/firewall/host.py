"""The host's other firewalls: Docker, ufw, firewalld, or a hand-written table.

In nftables a packet must pass every base chain of its hook, whatever table holds it: an
accept in `table inet picell` does not get a forwarded packet past Docker's `ip filter FORWARD`
(policy drop). This module finds the base chains of *other* tables, on the input and forward
hooks, that drop what picell needs (policy drop, or a last rule that drops or rejects
unconditionally), names their owner, and

- for Docker, keeps narrow accept rules for picell's interfaces at the top of `DOCKER-USER`,
  the chain Docker documents for its users and never flushes, written with the same iptables
  backend Docker uses (iptables-nft) and tagged `-m comment --comment picell`. This is the one
  place picell writes outside its own table (docs/ARCHITECTURE.md, rule 22);
- for ufw, firewalld and anything else, says the exact command the owner runs: their reloads
  would wipe rules we added, so we never write theirs.

An accept in DOCKER-USER opens nothing by itself: picell's own forward chain still judges every
packet into or out of its interfaces (`vpn_forward`, `vpn_deliver`, `exit_in`).

Reading costs one `nft -j list chains` per reconcile, plus one `nft -j list table` per other
table holding a base chain that may drop (Docker's `ip filter`); never per device or service.
The parsers raise nothing (rule 18): what they cannot read is an anomaly. This module must not
touch any table or chain but DOCKER-USER, nor a rule there that is not ours.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from picell.constants import TABLE_NAME
from picell.errors import CommandFailed
from picell.routing.exits import exit_ifname
from picell.state import State
from picell.system.run import Runner

HOOKS = ("input", "forward")
DOCKER_USER = "DOCKER-USER"
COMMENT = "picell"
VERDICTS = ("accept", "drop", "reject", "jump", "goto", "return", "continue", "queue")
IPTABLES_PACKAGE = "apt-get install --no-install-recommends iptables"

Owner = Literal["docker", "ufw", "firewalld", "other"]


@dataclass(frozen=True)
class BaseChain:
    family: str
    table: str
    name: str
    hook: str
    policy: str


@dataclass(frozen=True)
class Rule:
    """One rule as far as we need it: its matches, its verdict (and target), whether it is
    tagged (an iptables comment match, or an nft comment)."""

    matches: tuple[dict[str, Any], ...]
    verdict: str | None
    target: str | None = None
    conditional: bool = False  # anything but counters, logs and the verdict
    comment: str | None = None
    tagged: bool = False  # an `xt` comment match (iptables-nft keeps its text hidden from nft -j)


@dataclass(frozen=True)
class Needs:
    """What picell's traffic looks like on this host (from the desired `State`)."""

    interface: str
    listen_port: int
    relay_interface: str | None = None  # the exit relay's tunnel, while we relay

    @classmethod
    def of(cls, state: State) -> Needs:
        relay = next((t.interface for t in state.exits if t.relay), None)
        return cls(state.interface, state.listen_port, relay)


@dataclass(frozen=True, order=True)
class DockerRule:
    """One accept rule of ours in DOCKER-USER: `-i IF` or `-o IF` (`+` is iptables' wildcard)."""

    direction: Literal["in", "out"]
    interface: str

    @property
    def spec(self) -> list[str]:
        flag = "-i" if self.direction == "in" else "-o"
        return [flag, self.interface, "-m", "comment", "--comment", COMMENT, "-j", "ACCEPT"]

    @property
    def nft_name(self) -> str:
        """How `nft -j` prints the interface (iptables' `+` becomes `*`)."""
        return self.interface[:-1] + "*" if self.interface.endswith("+") else self.interface

    def __str__(self) -> str:
        return f"{DOCKER_USER} {' '.join(self.spec)}"


def docker_rules(ifname: str) -> tuple[DockerRule, ...]:
    """The forward paths picell uses (render.py's `forward` chain), by interface: into and out
    of the WireGuard interface (devices and linked cells to LAN backends, to each other, to the
    uplink when lent, the relay between two linked cells, and replies), and into and out of the
    exit tunnels (`<if>x<slot>`: the relay's lent uplink and its replies, our devices into an
    exit cell's tunnel). Interface-based: picell's own chains stay the judges."""
    tunnels = exit_ifname(ifname, 0)[:-1] + "+"
    return (
        DockerRule("in", ifname),
        DockerRule("out", ifname),
        DockerRule("in", tunnels),
        DockerRule("out", tunnels),
    )


@dataclass(frozen=True)
class Blocker:
    """A base chain of another table that drops what picell needs, and what is done about it."""

    owner: Owner
    family: str
    table: str
    chain: str
    hook: str
    action: str

    @property
    def what(self) -> str:
        return "drops forwarded traffic" if self.hook == "forward" else "drops incoming traffic"

    def as_dict(self) -> dict[str, str]:
        return {
            "owner": self.owner,
            "table": f"{self.family} {self.table}",
            "chain": self.chain,
            "hook": self.hook,
            "what": self.what,
            "action": self.action,
        }

    def __str__(self) -> str:
        return f"{self.owner} ({self.family} {self.table} {self.chain}) {self.what}: {self.action}"


@dataclass(frozen=True)
class Assessment:
    """What `assess` found: the chains in the way, the Docker rules of ours still missing
    (None: no Docker here), and what could not be read."""

    blockers: tuple[Blocker, ...] = ()
    docker_missing: tuple[DockerRule, ...] | None = None
    anomalies: tuple[str, ...] = ()


# -- parsing (pure, raises nothing) --------------------------------------------------------------
def _items(out: str, anomalies: list[str], what: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(out)
    except ValueError:
        anomalies.append(f"nft: {what}: output is not JSON")
        return []
    items = data.get("nftables") if isinstance(data, dict) else None
    if not isinstance(items, list):
        anomalies.append(f"nft: {what}: no list of objects")
        return []
    return [i for i in items if isinstance(i, dict)]


def parse_chains(out: str) -> tuple[list[BaseChain], dict[tuple[str, str], set[str]], list[str]]:
    """`nft -j list chains` → the filter base chains on the input and forward hooks of every
    table but ours, the names of every chain by (family, table), and anomalies."""
    anomalies: list[str] = []
    base: list[BaseChain] = []
    names: dict[tuple[str, str], set[str]] = {}
    for item in _items(out, anomalies, "list chains"):
        chain = item.get("chain")
        if not isinstance(chain, dict):
            continue
        family, table, name = chain.get("family"), chain.get("table"), chain.get("name")
        if not all(isinstance(v, str) for v in (family, table, name)):
            anomalies.append("nft: a chain without family, table or name")
            continue
        assert isinstance(family, str) and isinstance(table, str) and isinstance(name, str)
        names.setdefault((family, table), set()).add(name)
        hook = chain.get("hook")
        if hook not in HOOKS or chain.get("type", "filter") != "filter":
            continue
        if (family, table) == ("inet", TABLE_NAME):
            continue
        # picell forwards IPv4 only; over IPv6 only WireGuard's port arrives (input)
        if family not in ("ip", "inet") and not (family == "ip6" and hook == "input"):
            continue
        policy = chain.get("policy", "accept")
        base.append(BaseChain(family, table, name, str(hook), str(policy)))
    return base, names, anomalies


def parse_rules(out: str) -> tuple[dict[str, list[Rule]], list[str]]:
    """`nft -j list table F T` → the rules of each chain, in order."""
    anomalies: list[str] = []
    chains: dict[str, list[Rule]] = {}
    for item in _items(out, anomalies, "list table"):
        if isinstance(item.get("chain"), dict):
            name = item["chain"].get("name")
            if isinstance(name, str):
                chains.setdefault(name, [])
            continue
        rule = item.get("rule")
        if not isinstance(rule, dict):
            continue
        chain, exprs = rule.get("chain"), rule.get("expr")
        if not isinstance(chain, str) or not isinstance(exprs, list):
            anomalies.append("nft: a rule without chain or expressions")
            continue
        chains.setdefault(chain, []).append(_rule(exprs, rule.get("comment")))
    return chains, anomalies


def _rule(exprs: list[Any], comment: Any) -> Rule:
    matches: list[dict[str, Any]] = []
    verdict = target = None
    conditional = tagged = False
    for e in exprs:
        if not isinstance(e, dict) or len(e) != 1:
            conditional = True
            continue
        ((key, value),) = e.items()
        if key == "match" and isinstance(value, dict):
            matches.append(value)
            conditional = True
        elif key in VERDICTS:
            verdict = key
            if key in ("jump", "goto") and isinstance(value, dict):
                target = value.get("target") if isinstance(value.get("target"), str) else None
        elif key == "xt" and isinstance(value, dict) and value.get("name") == "comment":
            tagged = True
        elif key not in ("counter", "log"):
            conditional = True  # an xt match we cannot read, a limit, a set lookup...
    text = comment if isinstance(comment, str) else None
    return Rule(tuple(matches), verdict, target, conditional, text, tagged)


# -- judging (pure) ------------------------------------------------------------------------------
def _value_has(right: Any, want: str | int) -> bool:
    """Whether an nft match's right side covers `want` (a name with `*` wildcards, a port, a
    set or a range of them)."""
    if isinstance(right, dict):
        if "set" in right and isinstance(right["set"], list):
            return any(_value_has(v, want) for v in right["set"])
        if "range" in right and isinstance(right["range"], list) and len(right["range"]) == 2:
            low, high = right["range"]
            return (
                isinstance(want, int)
                and isinstance(low, int)
                and isinstance(high, int)
                and (low <= want <= high)
            )
        return False
    if isinstance(want, str) and isinstance(right, str):
        return right == want or (right.endswith("*") and want.startswith(right[:-1]))
    return isinstance(want, int) and not isinstance(right, bool) and right == want


def _match_is(m: dict[str, Any], left: Callable[[Any], bool], want: str | int) -> bool:
    return (
        m.get("op", "==") in ("==", "in")
        and left(m.get("left"))
        and _value_has(m.get("right"), want)
    )


def _meta(key: str) -> Callable[[Any], bool]:
    return lambda left: isinstance(left, dict) and left.get("meta", {}).get("key") == key


def _dport(proto: str) -> Callable[[Any], bool]:
    def check(left: Any) -> bool:
        payload = left.get("payload") if isinstance(left, dict) else None
        return (
            isinstance(payload, dict)
            and payload.get("field") == "dport"
            and payload.get("protocol") in (proto, "th")
        )

    return check


def _unconditional_drop(rules: list[Rule]) -> bool:
    return bool(rules) and rules[-1].verdict in ("drop", "reject") and not rules[-1].conditional


def _ends_in_accept(rules: list[Rule]) -> bool:
    return bool(rules) and rules[-1].verdict == "accept" and not rules[-1].conditional


def _accepted(chains: dict[str, list[Rule]], wanted: Callable[[Rule], bool]) -> bool:
    """Whether some rule of the table matching `wanted` accepts, or jumps to a chain that ends
    by accepting (firewalld's trusted zone). Reachability from the base chain is not proven:
    this recognises the owner's fix (`ufw route allow in on IF`, a trusted zone), no more."""
    for rules in chains.values():
        for rule in rules:
            if not wanted(rule):
                continue
            if rule.verdict == "accept":
                return True
            if rule.verdict in ("jump", "goto") and _ends_in_accept(
                chains.get(rule.target or "", [])
            ):
                return True
    return False


def _iif(ifname: str) -> Callable[[Rule], bool]:
    return lambda r: any(_match_is(m, _meta("iifname"), ifname) for m in r.matches)


def _udp(port: int) -> Callable[[Rule], bool]:
    return lambda r: any(_match_is(m, _dport("udp"), port) for m in r.matches)


def lets_through(chains: dict[str, list[Rule]], family: str, hook: str, needs: Needs) -> bool:
    """Whether the table already lets picell's traffic through this hook: for forward, what
    arrives on our interfaces; for input, that and WireGuard's port (IPv6: the port only)."""
    wants = []
    if family != "ip6":
        wants.append(_iif(needs.interface))
        if hook == "forward" and needs.relay_interface:
            wants.append(_iif(needs.relay_interface))
    if hook == "input":
        wants.append(_udp(needs.listen_port))
    return all(_accepted(chains, w) for w in wants)


def _present_docker_rules(rules: list[Rule]) -> set[DockerRule]:
    """Our rules in DOCKER-USER, recognised by shape: one interface match, a comment, accept."""
    found = set()
    for rule in rules:
        ours = rule.tagged or (rule.comment or "").startswith(COMMENT)
        if not ours or rule.verdict != "accept" or len(rule.matches) != 1:
            continue
        m = rule.matches[0]
        key = (
            m.get("left", {}).get("meta", {}).get("key")
            if isinstance(m.get("left"), dict)
            else None
        )
        right = m.get("right")
        if key in ("iifname", "oifname") and isinstance(right, str) and m.get("op", "==") == "==":
            name = right[:-1] + "+" if right.endswith("*") else right
            found.add(DockerRule("in" if key == "iifname" else "out", name))
    return found


def owner_of(chain: BaseChain, names: set[str]) -> Owner:
    if (chain.family, chain.table) == ("inet", "firewalld"):
        return "firewalld"
    if chain.hook == "forward" and DOCKER_USER in names:
        return "docker"
    if any(n.startswith(("ufw-", "ufw6-")) for n in names):
        return "ufw"
    return "other"


def command_for(owner: Owner, chain: BaseChain, needs: Needs) -> str:
    """The exact command the owner runs to let picell through (ours to print, theirs to run)."""
    ifs = [needs.interface] + (
        [needs.relay_interface] if needs.relay_interface and chain.hook == "forward" else []
    )
    port = needs.listen_port
    if owner == "ufw":
        if chain.hook == "forward":
            return " && ".join(f"ufw route allow in on {i}" for i in ifs)
        if chain.family == "ip6":
            return f"ufw allow {port}/udp"
        return f"ufw allow in on {needs.interface} && ufw allow {port}/udp"
    if owner == "firewalld":
        zone = "firewall-cmd --permanent --zone=trusted " + " ".join(
            f"--add-interface={i}" for i in ifs
        )
        if chain.hook == "input":
            zone += f" && firewall-cmd --permanent --add-port={port}/udp"
        return f"{zone} && firewall-cmd --reload"
    where = f"{chain.family} {chain.table} {chain.name}"
    if chain.hook == "forward":
        return " && ".join(f'nft insert rule {where} iifname "{i}" accept' for i in ifs)
    lines = (
        []
        if chain.family == "ip6"
        else [f'nft insert rule {where} iifname "{needs.interface}" accept']
    )
    lines.append(f"nft insert rule {where} udp dport {port} accept")
    return " && ".join(lines)


def assess(
    base: list[BaseChain],
    names: dict[tuple[str, str], set[str]],
    tables: dict[tuple[str, str], dict[str, list[Rule]]],
    needs: Needs,
    docker_action: str,
) -> Assessment:
    """Which base chains drop what picell needs, by owner; for Docker, which of our accept rules
    DOCKER-USER lacks. `tables` holds the rules of each table named in `base`; a table missing
    from it (we could not read it) is judged on its policy alone."""
    blockers: list[Blocker] = []
    docker_missing: set[DockerRule] | None = None
    for chain in base:
        key = (chain.family, chain.table)
        rules = tables.get(key, {})
        if chain.policy != "drop" and not _unconditional_drop(rules.get(chain.name, [])):
            continue
        owner = owner_of(chain, names.get(key, set()))
        if owner == "docker":
            lacking = set(docker_rules(needs.interface)) - _present_docker_rules(
                rules.get(DOCKER_USER, [])
            )
            docker_missing = (docker_missing or set()) | lacking
            blockers.append(Blocker(owner, *key, chain.name, chain.hook, docker_action))
            continue
        if lets_through(rules, chain.family, chain.hook, needs):
            continue
        action = "run: " + command_for(owner, chain, needs)
        blockers.append(Blocker(owner, *key, chain.name, chain.hook, action))
    return Assessment(
        tuple(blockers), None if docker_missing is None else tuple(sorted(docker_missing))
    )


# -- observing and applying ----------------------------------------------------------------------
@dataclass
class HostResult:
    blockers: tuple[Blocker, ...] = ()
    added: list[str] = field(default_factory=list)  # our DOCKER-USER rules written this round
    warnings: list[str] = field(default_factory=list)
    anomalies: list[str] = field(default_factory=list)


def suspect_tables(base: Iterable[BaseChain]) -> list[tuple[str, str]]:
    """Tables whose rules we must read: a chain with a drop policy (to see whether the owner
    let us through, or our DOCKER-USER rules) or one that may end in a drop."""
    return sorted({(c.family, c.table) for c in base})


class HostFirewall:
    """Held by the reconciler: one `converge` per reconcile; `last` is what status shows."""

    ADDED = "accept rules added in DOCKER-USER"

    def __init__(self, runner: Runner, which: Callable[[str], str | None] = shutil.which) -> None:
        self.runner = runner
        self.which = which
        self._iptables: str | None | bool = False  # False: not looked up yet
        self.last = HostResult()

    def iptables(self) -> str | None:
        """The iptables that writes where Docker's rules are (nf_tables), looked up once:
        `iptables-nft` by name, else `iptables` when `iptables -V` says nf_tables (a host
        whose `iptables` is the legacy backend writes tables nft does not see)."""
        if self._iptables is False:
            self._iptables = None
            if self.which("iptables-nft") is not None:
                self._iptables = "iptables-nft"
            elif self.which("iptables") is not None:
                try:
                    version = self.runner.run(["iptables", "-V"]).stdout
                except CommandFailed:
                    version = ""
                self._iptables = "iptables" if "nf_tables" in version else None
        return self._iptables if isinstance(self._iptables, str) else None

    def observe(self, needs: Needs, docker_action: str = ADDED) -> Assessment:
        anomalies: list[str] = []
        try:
            out = self.runner.run(["nft", "-j", "list", "chains"]).stdout
        except CommandFailed as exc:
            return Assessment(anomalies=(f"nft: cannot list chains: {exc.message}",))
        base, names, found = parse_chains(out)
        anomalies += found
        tables: dict[tuple[str, str], dict[str, list[Rule]]] = {}
        for family, table in suspect_tables(base):
            try:
                text = self.runner.run(["nft", "-j", "list", "table", family, table]).stdout
            except CommandFailed:
                anomalies.append(f"nft: cannot list table {family} {table}")
                continue
            tables[(family, table)], found = parse_rules(text)
            anomalies += found
        result = assess(base, names, tables, needs, docker_action)
        return Assessment(result.blockers, result.docker_missing, tuple(anomalies))

    def converge(self, state: State) -> HostResult:
        needs = Needs.of(state)
        seen = self.observe(needs)
        result = HostResult(anomalies=list(seen.anomalies))
        blockers = list(seen.blockers)
        if seen.docker_missing:
            action = self._add_docker_rules(seen.docker_missing, result)
            blockers = [b if b.owner != "docker" else _with(b, action) for b in blockers]
        for b in blockers:
            if b.action != self.ADDED:
                result.warnings.append(f"host firewall: {b}")
        result.blockers = tuple(blockers)
        self.last = result
        return result

    def _add_docker_rules(self, missing: tuple[DockerRule, ...], result: HostResult) -> str:
        iptables = self.iptables()
        if iptables is None:
            return (
                "iptables (nf_tables) is not installed, so picell cannot add its accept rules to "
                f"DOCKER-USER: run {IPTABLES_PACKAGE}"
            )
        try:
            for rule in missing:
                check = self.runner.run([iptables, "-C", DOCKER_USER, *rule.spec], ok_codes=(0, 1))
                if check.returncode == 1:  # absent (the observation may not recognise a shape)
                    self.runner.run([iptables, "-I", DOCKER_USER, *rule.spec])
                    result.added.append(str(rule))
        except CommandFailed as exc:
            return f"adding accept rules to DOCKER-USER failed: {exc.message}"
        return self.ADDED


def _with(b: Blocker, action: str) -> Blocker:
    return Blocker(b.owner, b.family, b.table, b.chain, b.hook, action)


def remove_docker_rules(runner: Runner, iptables: str, ifname: str) -> int:
    """Delete our accept rules from DOCKER-USER (each as many times as it is there); what a
    command removing the cell must call. Nothing removes a cell today: a stop or a restart
    keeps them, as it keeps the tunnels. Returns how many were deleted."""
    deleted = 0
    for rule in docker_rules(ifname):
        while (
            runner.run([iptables, "-C", DOCKER_USER, *rule.spec], ok_codes=(0, 1, 2)).returncode
            == 0
        ):
            runner.run([iptables, "-D", DOCKER_USER, *rule.spec])
            deleted += 1
    return deleted
