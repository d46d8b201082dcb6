"""The host's other firewalls (`picell.firewall.host`): the parsers on real `nft -j` output of
each owner's shape (tests/unit/golden/hostfw/cases.json, made by gen.sh in a namespace from the
rulesets beside it), the verdict per chain, the DOCKER-USER rules written once, and the
parsers raising nothing on garbage."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from picell.api.auth import Auth
from picell.app import build_web_api
from picell.control import Control
from picell.errors import CommandFailed
from picell.firewall.host import (
    Blocker,
    HostFirewall,
    HostResult,
    Needs,
    Rule,
    assess,
    docker_rules,
    parse_chains,
    parse_rules,
    remove_docker_rules,
)
from picell.system.run import Result, Runner

CASES = json.loads((Path(__file__).parent / "golden" / "hostfw" / "cases.json").read_text())
NEEDS = Needs("picell0", 51820)


def judge(case: str, needs: Needs = NEEDS) -> tuple[list[Blocker], Any]:
    base, names, anomalies = parse_chains(json.dumps(CASES[case]["chains"]))
    assert anomalies == []
    tables: dict[tuple[str, str], dict[str, list[Rule]]] = {}
    for key, data in CASES[case]["tables"].items():
        family, table = key.split(" ")
        tables[(family, table)], found = parse_rules(json.dumps(data))
        assert found == []
    result = assess(base, names, tables, needs, "accept rules added in DOCKER-USER")
    return list(result.blockers), result.docker_missing


def test_docker_forward_drop_is_named_and_all_our_rules_are_missing() -> None:
    blockers, missing = judge("docker")
    assert [(b.owner, b.table, b.chain, b.hook) for b in blockers] == [
        ("docker", "filter", "FORWARD", "forward")
    ]
    assert blockers[0].as_dict()["what"] == "drops forwarded traffic"
    assert blockers[0].as_dict()["table"] == "ip filter"
    assert set(missing) == set(docker_rules("picell0"))
    # Docker leaves INPUT (policy accept) alone, and our own table is never judged
    assert all(b.chain != "INPUT" for b in blockers)


def test_our_docker_rules_are_recognised_in_docker_user() -> None:
    blockers, missing = judge("docker_fixed")
    assert [b.owner for b in blockers] == ["docker"]  # still named: the owner sees what we did
    assert missing == ()
    # another cell's interface name: its rules are not ours
    _, other = judge("docker_fixed", Needs("picell1", 51820))
    assert set(other) == set(docker_rules("picell1"))


def test_docker_and_ufw_in_one_table_each_hook_has_its_owner() -> None:
    blockers, missing = judge("docker_ufw")
    owners = {(b.chain, b.owner) for b in blockers}
    assert owners == {("FORWARD", "docker"), ("INPUT", "ufw")}
    # one of ours is there, three are missing
    assert len(missing) == 3


def test_ufw_gets_the_owners_command_and_its_fix_is_recognised() -> None:
    blockers, missing = judge("ufw")
    assert missing is None  # no Docker: nothing of ours to write
    actions = {b.hook: b.action for b in blockers}
    assert {b.owner for b in blockers} == {"ufw"}
    assert actions == {
        "input": "run: ufw allow in on picell0 && ufw allow 51820/udp",
        "forward": "run: ufw route allow in on picell0",
    }
    relay = Needs("picell0", 51820, relay_interface="picell0x0")
    blockers, _ = judge("ufw", relay)
    forward = next(b for b in blockers if b.hook == "forward")
    assert forward.action == "run: ufw route allow in on picell0 && ufw route allow in on picell0x0"
    assert judge("ufw_fixed") == ([], None)
    # the owner's fix was for another port: input still drops WireGuard
    blockers, _ = judge("ufw_fixed", Needs("picell0", 51999))
    assert [(b.hook, b.action) for b in blockers] == [
        ("input", "run: ufw allow in on picell0 && ufw allow 51999/udp")
    ]


def test_firewalld_rejects_at_the_end_of_an_accept_policy_chain() -> None:
    blockers, missing = judge("firewalld")
    assert missing is None
    assert {(b.owner, b.chain, b.hook) for b in blockers} == {
        ("firewalld", "filter_INPUT", "input"),
        ("firewalld", "filter_FORWARD", "forward"),
    }
    forward = next(b for b in blockers if b.hook == "forward")
    assert forward.action == (
        "run: firewall-cmd --permanent --zone=trusted --add-interface=picell0 && "
        "firewall-cmd --reload"
    )
    # the trusted zone (a goto to a chain ending in accept) and the port are recognised
    assert judge("firewalld_fixed") == ([], None)


def test_other_tables_are_named_by_table_and_chain() -> None:
    blockers, _ = judge("other")
    assert [(b.owner, b.table, b.chain, b.hook) for b in blockers] == [
        ("other", "filter", "input", "input"),
        ("other", "filter", "forward", "forward"),
    ]
    assert blockers[1].action == 'run: nft insert rule inet filter forward iifname "picell0" accept'
    # libvirt's forward chain rejects only what goes to its bridge: not in our way


@pytest.mark.parametrize(
    "out",
    [
        "",
        "not json",
        "[]",
        '{"nftables": 5}',
        '{"nftables": [5, "x", {"chain": 7}, {"chain": {"family": 1}}]}',
        '{"nftables": [{"rule": {"chain": "x", "expr": [5, {"match": 3}, {"jump": 7}]}}]}',
        '{"nftables": [{"chain": {"family": "ip", "table": "t", "name": "c", "hook": "forward",'
        ' "policy": "drop"}}, {"rule": {"chain": "c", "expr": [{"match": {"left": 5, '
        '"right": {"set": [{"range": ["a", 3]}]}}}, {"accept": null}]}}]}',
    ],
)
def test_parsers_raise_nothing(out: str) -> None:
    base, names, _ = parse_chains(out)
    rules, _ = parse_rules(out)
    assess(base, names, {(c.family, c.table): rules for c in base}, NEEDS, "x")


def test_an_unreadable_table_is_judged_on_its_policy() -> None:
    base, names, _ = parse_chains(json.dumps(CASES["ufw"]["chains"]))
    result = assess(base, names, {}, NEEDS, "x")
    assert {b.hook for b in result.blockers} == {"input", "forward"}


class Host(Runner):
    """`nft -j` answers from a case; `iptables-nft` edits DOCKER-USER as a list of specs."""

    def __init__(self, case: str) -> None:
        super().__init__()
        self.case = case
        self.docker_user: list[tuple[str, ...]] = []
        self.fail_insert = False

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: str | None = None,
        ok_codes: Sequence[int] = (0,),
        timeout_s: float = 0,
    ) -> Result:
        a = tuple(argv)
        self.history.append(a)
        code, out = 0, ""
        if a[:4] == ("nft", "-j", "list", "chains"):
            out = json.dumps(CASES[self.case]["chains"])
        elif a[:4] == ("nft", "-j", "list", "table"):
            data = CASES[self.case]["tables"].get(f"{a[4]} {a[5]}")
            if data is None:
                raise CommandFailed(a, 1, "No such file or directory")
            if a[4:6] == ("ip", "filter") and self.docker_user:
                data = json.loads(json.dumps(CASES["docker_fixed"]["tables"]["ip filter"]))
            out = json.dumps(data)
        elif a[0] == "iptables-nft":
            spec = a[3:]
            if a[1] == "-C":
                code = 0 if spec in self.docker_user else 1
            elif a[1] == "-I":
                if self.fail_insert:
                    raise CommandFailed(a, 4, "iptables: Resource temporarily unavailable.")
                self.docker_user.insert(0, spec)
            elif a[1] == "-D":
                self.docker_user.remove(spec)
        else:
            raise AssertionError(f"unexpected command {a}")
        if code not in ok_codes:
            raise CommandFailed(a, code, "Bad rule (does a matching rule exist in that chain?)")
        return Result(a, code, out, "")


class State:
    interface = "picell0"
    listen_port = 51820
    exits = ()


def firewall(host: Host, iptables: bool = True) -> HostFirewall:
    return HostFirewall(host, which=lambda name: f"/usr/sbin/{name}" if iptables else None)


def test_docker_rules_are_written_once_with_the_nft_backend() -> None:
    host = Host("docker")
    fw = firewall(host)
    first = fw.converge(State())  # type: ignore[arg-type]
    assert sorted(host.docker_user) == sorted(tuple(r.spec) for r in docker_rules("picell0"))
    assert all("--comment" in s and "picell" in s for s in host.docker_user)
    assert len(first.added) == 4 and first.warnings == []
    assert [b.action for b in first.blockers] == ["accept rules added in DOCKER-USER"]
    # second round: the observation sees them (by shape), nothing is checked or written
    host.take_history()
    again = fw.converge(State())  # type: ignore[arg-type]
    assert again.added == []
    assert [c[:2] for c in host.take_history()] == [("nft", "-j"), ("nft", "-j")]
    assert len(host.docker_user) == 4


def test_missing_iptables_and_a_failed_insert_are_reported_not_raised() -> None:
    host = Host("docker")
    result = firewall(host, iptables=False).converge(State())  # type: ignore[arg-type]
    assert host.docker_user == []
    assert "iptables (nf_tables) is not installed" in result.blockers[0].action
    assert (
        result.warnings and "apt-get install --no-install-recommends iptables" in result.warnings[0]
    )
    host.fail_insert = True
    result = firewall(host).converge(State())  # type: ignore[arg-type]
    assert result.blockers[0].action.startswith("adding accept rules to DOCKER-USER failed")


def test_ufw_is_never_written_to() -> None:
    host = Host("ufw")
    result = firewall(host).converge(State())  # type: ignore[arg-type]
    assert not any(c[0].startswith("iptables") for c in host.history)
    assert {b.owner for b in result.blockers} == {"ufw"}
    assert any("ufw route allow in on picell0" in w for w in result.warnings)


def test_remove_deletes_only_our_rules() -> None:
    host = Host("docker")
    firewall(host).converge(State())  # type: ignore[arg-type]
    host.docker_user.append(("-i", "eth9", "-j", "ACCEPT"))  # the owner's own
    assert remove_docker_rules(host, "iptables-nft", "picell0") == 4
    assert host.docker_user == [("-i", "eth9", "-j", "ACCEPT")]


def test_the_cell_network_page_shows_the_other_firewall(control: Control) -> None:
    auth = Auth(control.store)
    auth.set_password("a long enough password")
    client = TestClient(build_web_api(control, auth=auth), base_url="http://localhost:8080")
    token = re.search(r'name="login_token" value="([^"]+)"', client.get("/login").text)
    assert token
    client.post("/login", data={"password": "a long enough password", "login_token": token[1]})
    assert 'id="host-firewall"' in client.get("/cells").text
    assert "Another firewall on this host" not in client.get("/cells").text
    blockers, _ = judge("ufw")
    docker, _ = judge("docker_fixed")
    assert control.reconciler is not None
    control.reconciler.host_firewall.last = HostResult(blockers=tuple(blockers + docker))
    html = client.get("/cells").text
    assert "Another firewall on this host" in html
    assert '<code class="wrap">ufw route allow in on picell0</code>' in html
    assert "Docker (ip filter, chain FORWARD) drops forwarded traffic" in html
    assert control.status()["host_firewall"][0]["owner"] == "ufw"
