"""`picell doctor`'s pure parts and the `explain` message: the question resolved (a 4xx naming
`from` or `to`), the serving side's answer (the same bytes for a service not shared and for one
that does not exist; replays and devices refused), the asking side's strict reading of a
hostile answer, the one answer line, the DNS probe's packets and the drop counters' reading.
The whole walk runs against real cells in tests/netns/test_doctor.py."""

from __future__ import annotations

import ipaddress
import json
import struct
from typing import Any

import httpx
import pytest

from picell.control import Control
from picell.doctor import DoctorAsk, _drops, build_query, parse_answer, resolve
from picell.errors import Conflict, Forbidden, NotFound
from picell.mesh import client, wire
from picell.mesh.client import MeshClient
from picell.mesh.crypto import link_key, mac_ok
from picell.mesh.explain import Explain, ExplainFailed, answer_line
from picell.mesh.links import Links
from picell.mesh.protocol import make_envelope
from picell.mesh.sync import Sync
from picell.store.links import Link, LinkIdentity
from picell.wireguard import keys
from tests.unit.test_mesh import _linked_pair, _state_from_beta


def _linked(control: Control) -> tuple[Links, str]:
    """alpha linked with beta (beta's first document confirms it); alpha shares web only."""
    control.add_service("web", "127.0.0.1:8080", 80)
    control.add_service("secret", "127.0.0.1:9090", 80)
    control.add_peer("phone", None)
    links, beta_private, _ = _linked_pair(control)
    Sync(links).receive_state(_state_from_beta(control, beta_private, 1), "10.62.0.1")
    Sync(links).share("beta", ["web"])
    return links, beta_private


def _explain_from_beta(control: Control, beta_private: str, seq: int, service: str) -> Any:
    alpha = Link("alpha", keys.public_from_private(control.cell().private_key),
                 LinkIdentity("x:1", ipaddress.IPv4Network("10.61.0.0/24"),
                              ipaddress.IPv4Address("10.61.0.1"), "alpha.test"))  # fmt: skip
    return make_envelope(kind="explain", from_cell="beta", our_private=beta_private,
                         our_public=keys.public_from_private(beta_private), link=alpha, seq=seq,
                         extra={"service": service, "device": "laptop"})  # fmt: skip


def test_the_question_is_resolved_or_refused_naming_its_field(control: Control) -> None:
    _linked(control)
    with control.store.read() as conn:

        def ask(**kw: str) -> Any:
            return resolve(conn, DoctorAsk.model_validate(kw))

        route = ask(**{"from": "beta", "to": "web"})
        assert route.asker is not None and route.asker.name == "beta"
        assert route.service is not None and route.service.name == "web"
        route = ask(**{"from": "phone", "to": "beta/files"})
        assert route.device is not None and route.server is not None and route.remote == "files"
        assert ask(**{"from": "alpha/phone"}).device is not None  # our own CELL/DEVICE
        cases = [
            ({"from": "tablet"}, NotFound, "from", "no device or linked cell"),
            ({"from": "gamma/x"}, NotFound, "from", "no linked cell"),
            ({"from": "beta/laptop"}, Conflict, "from", "publishes no devices"),
            ({"to": "nope"}, NotFound, "to", "no service named 'nope'"),
            ({"to": "gamma/web"}, NotFound, "to", "no linked cell"),
            ({"from": "beta", "to": "beta/files"}, Conflict, "to", "reach only our services"),
        ]
        for body, error, field, words in cases:
            with pytest.raises(error) as err:
                ask(**body)
            assert err.value.field == field and words in err.value.message, body


def test_the_answer_is_the_same_for_a_service_not_shared_and_one_that_does_not_exist(
    control: Control,
) -> None:
    links, beta_private = _linked(control)
    explain = Explain(links)
    allowed = explain.receive(_explain_from_beta(control, beta_private, 2, "web"), "10.62.0.1")
    answer = wire.ExplainAnswer.model_validate(allowed)
    assert answer.allowed and answer.ports == [80] and answer.since is not None
    hidden = explain.receive(_explain_from_beta(control, beta_private, 3, "secret"), "10.62.0.1")
    missing = explain.receive(_explain_from_beta(control, beta_private, 4, "nope"), "10.62.0.1")
    as_bytes = [json.dumps(a).encode().replace(b"nope", b"secret") for a in (hidden, missing)]
    assert as_bytes[0] == as_bytes[1]
    assert hidden == {"ok": True, "service": "secret", "allowed": False, "ports": []}
    with pytest.raises(Forbidden):  # a replay
        explain.receive(_explain_from_beta(control, beta_private, 4, "web"), "10.62.0.1")
    with pytest.raises(Forbidden):  # one of beta's devices cannot ask for it
        explain.receive(_explain_from_beta(control, beta_private, 5, "web"), "10.62.0.9")
    Sync(links).unshare("beta", "web")
    gone = explain.receive(_explain_from_beta(control, beta_private, 6, "web"), "10.62.0.1")
    assert gone["allowed"] is False


def test_both_owners_read_the_same_line() -> None:
    allowed = wire.ExplainAnswer(ok=True, service="web", allowed=True, since=1796106000.0,
                                 ports=[80], protocol="tcp")  # fmt: skip
    assert answer_line("beta", "phone", "alpha", allowed) == (
        "beta/phone → alpha/web:80 allowed since 2026-12-01 06:20 UTC"
    )
    refused = wire.ExplainAnswer(ok=True, service="web", allowed=False)
    assert answer_line("beta", None, "alpha", refused) == "beta → alpha/web not allowed"


def _asking(
    control: Control, monkeypatch: pytest.MonkeyPatch, status: int, content: bytes
) -> tuple[Explain, list[httpx.Request]]:
    links, _ = _linked(control)
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, content=content)

    monkeypatch.setattr(client, "default", MeshClient(httpx.MockTransport(handler)))
    return Explain(links), seen


def test_the_question_is_signed_and_the_answer_read_strictly(
    control: Control, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = b'{"ok": true, "service": "files", "allowed": true, "ports": [80], "protocol": "tcp"}'
    explain, seen = _asking(control, monkeypatch, 200, good)
    answer = explain.ask("beta", "files", "phone")
    assert answer.allowed and answer.ports == [80]
    [request] = seen
    assert request.url.path == "/api/cells/peer-sync/explain"
    envelope = json.loads(request.content)
    body = envelope["body"]
    assert body["type"] == "explain" and body["service"] == "files" and body["device"] == "phone"
    beta_public = body["to_public_key"]
    with control.store.read() as conn:
        seq = conn.execute("SELECT local_seq FROM links WHERE name = 'beta'").fetchone()[0]
    assert body["seq"] == seq  # the link's next sequence number, spent
    key = link_key(control.cell().private_key, beta_public)
    assert mac_ok(key, body, envelope["mac"])


@pytest.mark.parametrize(
    ("status", "content", "words"),
    [
        (200, b"not json", "not usable JSON"),
        (200, b"[]", "a JSON object is expected"),
        (200, b'{"ok": true, "service": "files", "allowed": true}', "answer"),
        # a refusal that says more than a refusal may (it would tell services apart)
        (200, b'{"ok": true, "service": "files", "allowed": false, "ports": [80]}', "answer"),
        (200, b'{"ok": true, "service": "other", "allowed": false}', "not the service we asked"),
        (200, b'{"ok": true, "service": "files", "allowed": "yes"}', "answer.allowed"),
        (403, b'{"message": "mac: the signature does not verify"}', "HTTP 403"),
    ],
)
def test_a_hostile_answer_is_refused(
    control: Control, monkeypatch: pytest.MonkeyPatch, status: int, content: bytes, words: str
) -> None:
    explain, _ = _asking(control, monkeypatch, status, content)
    with pytest.raises(ExplainFailed) as err:
        explain.ask("beta", "files", None)
    assert words in str(err.value)


def test_the_dns_probe_reads_compressed_answers_and_refuses_strangers() -> None:
    query = build_query(0x1234, "web.alpha.test")
    assert query[12:] == b"\x03web\x05alpha\x04test\x00\x00\x01\x00\x01"
    cname = b"\xc0\x0c" + struct.pack("!HHIH", 5, 1, 60, 2) + b"\xc0\x0c"
    a_record = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + bytes([10, 61, 0, 254])
    answer = struct.pack("!HHHHHH", 0x1234, 0x8180, 1, 2, 0, 0) + query[12:] + cname + a_record
    assert parse_answer(answer, 0x1234) == (0, [ipaddress.IPv4Address("10.61.0.254")])
    nx = struct.pack("!HHHHHH", 0x1234, 0x8183, 1, 0, 0, 0) + query[12:]
    assert parse_answer(nx, 0x1234) == (3, [])
    with pytest.raises(ValueError):
        parse_answer(answer, 0x4321)  # not the answer to our question
    with pytest.raises(ValueError):
        parse_answer(answer[:-3], 0x1234)


class _Nft:
    def __init__(self, data: Any) -> None:
        self.data = data

    def run(self, argv: list[str], **_: Any) -> Any:
        assert argv[:6] == ["nft", "-j", "list", "chain", "inet", "picell"]
        return type("R", (), {"stdout": json.dumps(self.data)})()


def test_drop_counters_count_only_drop_rules() -> None:
    rules = [{"rule": {"chain": "link_pre", "expr": e}} for e in (
        [{"counter": {"packets": 7, "bytes": 420}}, {"accept": None}],
        [{"counter": {"packets": 3, "bytes": 180}}, {"drop": None}],
    )]  # fmt: skip
    assert _drops(_Nft({"nftables": [{"metainfo": {}}, *rules]}), "link_pre") == 3
