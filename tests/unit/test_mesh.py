"""Links without a network: crypto, invites, conflicts, signed envelopes, pairing redemption,
the seed import, against a fake kernel."""

from __future__ import annotations

import ipaddress
import json
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from picell.cellinit import InitRequest
from picell.control import Control
from picell.errors import BadInput, Conflict, Forbidden, NotFound
from picell.mesh import wire
from picell.mesh.crypto import link_key, mac, pairing_key, short_auth_string
from picell.mesh.document import document
from picell.mesh.invite import parse_invite
from picell.mesh.links import Links
from picell.mesh.policy import check_conflicts
from picell.mesh.protocol import check_envelope, make_envelope, parse_envelope
from picell.mesh.seed import import_links
from picell.mesh.wire import Identity
from picell.store import links as link_table
from picell.store.links import Link, LinkIdentity, Mirror
from picell.wireguard import keys


def keypair() -> tuple[str, str]:
    private = keys.generate_private()
    return private, keys.public_from_private(private)


def identity(name: str, subnet: str, domain: str, public: str | None = None) -> dict[str, Any]:
    net = ipaddress.IPv4Network(subnet)
    return {"version": 1, "cell_name": name, "domain": domain,
            "public_key": public or keypair()[1], "endpoint": "198.51.100.9:51820",
            "vpn_subnet": subnet, "dns_ip": str(net[1]), "mesh_port": 3000}  # fmt: skip


def redeem(
    token: str,
    ident: dict[str, Any],
    proof_for: tuple[str, str] | None = None,
    mapped: str | None = None,
) -> dict[str, Any]:
    """A redemption; `proof_for` (our private key, their public key) adds the key proof;
    `mapped`, where the redeemer presents our network (the MAC covers it)."""
    request: dict[str, Any] = {"identity": ident, "nonce": secrets.token_hex(16)}
    if mapped is not None:
        request["mapped_subnet"] = mapped
    out = {**request, "mac": mac(pairing_key(token), request)}
    if proof_for:
        out["key_proof"] = mac(link_key(*proof_for), request)
    return out


def test_both_cells_derive_the_same_link_key_and_auth_string() -> None:
    (a_priv, a_pub), (b_priv, b_pub) = keypair(), keypair()
    assert link_key(a_priv, b_pub) == link_key(b_priv, a_pub)
    assert link_key(a_priv, b_pub) != link_key(a_priv, keypair()[1])
    sas = short_auth_string(a_pub, b_pub)
    assert sas == short_auth_string(b_pub, a_pub)
    assert len(sas) == 19 and sas.replace(" ", "").isdigit()


def test_invite_round_trip_and_field_errors() -> None:
    ident = identity("beta", "10.62.0.0/24", "beta.test")
    text = json.dumps({**ident, "pairing": {"port": 51821, "token": "t" * 32, "expires_at": 1.0}})
    inv = parse_invite(text)
    assert parse_invite(inv.encode()) == inv
    cases = {
        "invite.vpn_subnet": {**ident, "vpn_subnet": "10.62.0.1/24"},
        "invite.dns_ip": {**ident, "dns_ip": "10.99.0.1"},
        "invite.public_key": {**ident, "public_key": "nope"},
        "invite.cell_name": {**ident, "cell_name": "Bad Name"},
        "invite.endpoint": {**ident, "endpoint": "no-port"},
        "invite.versions": {**ident, "versions": []},
    }
    for field, data in cases.items():
        with pytest.raises(BadInput) as err:
            parse_invite(json.dumps(data))
        assert err.value.field == field
    del ident["public_key"]
    with pytest.raises(BadInput) as err:
        parse_invite(json.dumps(ident))
    assert err.value.field == "invite.public_key"
    with pytest.raises(BadInput) as err:
        parse_invite(inv.encode()[:-10] + "!!")
    assert err.value.field == "invite"


def _as_identity(data: dict[str, Any]) -> Identity:
    return parse_invite(json.dumps(data))


def test_conflicts_name_the_cell(control: Control) -> None:
    cell = control.cell()
    beta = Link(
        "beta",
        keypair()[1],
        LinkIdentity(
            "198.51.100.2:1",
            ipaddress.IPv4Network("10.62.0.0/24"),
            ipaddress.IPv4Address("10.62.0.1"),
            "beta.test",
        ),
    )
    for data, field, who in [
        (identity("gamma", "10.63.0.0/24", "x.beta.test"), "invite.domain", "beta"),
        (identity("beta", "10.63.0.0/24", "g.test"), "invite.cell_name", "beta"),
        (identity("alpha", "10.63.0.0/24", "g.test"), "invite.cell_name", "alpha"),
    ]:
        with pytest.raises(Conflict) as err:
            check_conflicts(cell, [beta], _as_identity(data))
        assert err.value.field == field and who in err.value.message
    # re-pairing the same cell (same key) is no conflict with itself
    check_conflicts(cell, [beta], _as_identity(identity("beta", "10.62.0.0/24", "beta.test",
                                                        beta.public_key)))  # fmt: skip


def test_envelopes_are_checked_for_source_mac_target_and_order() -> None:
    (a_priv, a_pub), (b_priv, b_pub) = keypair(), keypair()
    link_at_b = Link(
        "alpha",
        a_pub,
        LinkIdentity(
            "x:1",
            ipaddress.IPv4Network("10.61.0.0/24"),
            ipaddress.IPv4Address("10.61.0.1"),
            "alpha.test",
        ),
        mirror=Mirror(seq=4),
    )
    link_at_a = Link(
        "beta",
        b_pub,
        LinkIdentity(
            "x:1",
            ipaddress.IPv4Network("10.62.0.0/24"),
            ipaddress.IPv4Address("10.62.0.1"),
            "beta.test",
        ),
    )
    env = make_envelope(kind="unlink", from_cell="alpha", our_private=a_priv, our_public=a_pub,
                        link=link_at_a, seq=5)  # fmt: skip
    src = ipaddress.IPv4Address("10.61.0.1")
    check_envelope(parse_envelope(env, wire.UnlinkBody), link_at_b, src, b_priv, b_pub)
    bad = [
        (env, ipaddress.IPv4Address("10.62.0.7")),  # from outside alpha's network
        (env, ipaddress.IPv4Address("10.61.0.5")),  # from one of alpha's devices
        ({**env, "mac": "0" * 64}, src),  # forged
        ({"body": {**env["body"], "seq": 6}, "mac": env["mac"]}, src),  # altered
    ]
    for data, source in bad:
        with pytest.raises(Forbidden):
            check_envelope(parse_envelope(data, wire.UnlinkBody), link_at_b, source, b_priv, b_pub)
    stale = make_envelope(kind="unlink", from_cell="alpha", our_private=a_priv, our_public=a_pub,
                          link=link_at_a, seq=4)  # fmt: skip
    with pytest.raises(Forbidden):
        check_envelope(parse_envelope(stale, wire.UnlinkBody), link_at_b, src, b_priv, b_pub)
    other = Link(
        "gamma",
        keypair()[1],
        LinkIdentity(
            "x:1",
            ipaddress.IPv4Network("10.62.0.0/24"),
            ipaddress.IPv4Address("10.62.0.1"),
            "g.test",
        ),
    )
    retargeted = make_envelope(kind="unlink", from_cell="alpha", our_private=a_priv,
                               our_public=a_pub, link=other, seq=9)  # fmt: skip
    with pytest.raises(Forbidden):
        check_envelope(parse_envelope(retargeted, wire.UnlinkBody), link_at_b, src, b_priv, b_pub)
    with pytest.raises(BadInput):
        parse_envelope(env, wire.StateBody)


def test_invite_tokens_are_never_stored(control: Control) -> None:
    links = Links(control)
    inv = links.invite(3600)
    assert inv.pairing is not None
    raw = control.store.path.read_bytes() + control.store.path.with_name(
        control.store.path.name + "-wal").read_bytes()  # fmt: skip
    assert inv.pairing.token.encode() not in raw
    with pytest.raises(BadInput) as err:
        links.invite(10)
    assert err.value.field == "expires"


def test_a_token_redeems_once_even_under_concurrency(control: Control) -> None:
    links = Links(control)
    inv = links.invite(3600)
    assert inv.pairing is not None
    token = inv.pairing.token
    bodies = [redeem(token, identity(f"r{i}", f"10.{100 + i}.0.0/24", f"r{i}.test"))
              for i in range(50)]  # fmt: skip

    def attempt(body: dict[str, Any]) -> str:
        try:
            links.accept(body)
        except Forbidden:
            return "refused"
        return "linked"

    with ThreadPoolExecutor(max_workers=50) as pool:
        outcomes = list(pool.map(attempt, bodies))
    assert outcomes.count("linked") == 1
    assert len(links.overview()) == 1


def test_a_refused_redemption_spends_the_token_and_tells_only_our_journal(
    control: Control,
) -> None:
    links = Links(control)
    inv = links.invite(3600)
    assert inv.pairing is not None
    with pytest.raises(Forbidden) as err:
        links.accept(redeem(inv.pairing.token, identity("g", "10.61.0.0/24", "g.alpha.test")))
    assert err.value.message == "pairing refused"  # nothing about our domain or links
    [entry] = links.journal_entries("g")
    assert entry["event"] == "pairing refused" and "g.alpha.test" in entry["detail"]
    with pytest.raises(Forbidden):  # the token is spent: an invite holder cannot probe on
        links.accept(redeem(inv.pairing.token, identity("g", "10.64.0.0/24", "g.test")))
    inv = links.invite(3600)
    assert inv.pairing is not None
    answer = links.accept(redeem(inv.pairing.token, identity("g", "10.64.0.0/24", "g.test")))
    assert answer["identity"]["cell_name"] == "alpha"
    with pytest.raises(Forbidden):
        links.accept(redeem("x" * 32, identity("h", "10.65.0.0/24", "h.test")))


def test_own_settings_cannot_collide_with_a_link(control: Control) -> None:
    links = Links(control)
    inv = links.invite(3600)
    assert inv.pairing is not None
    links.accept(redeem(inv.pairing.token, identity("beta", "10.62.0.0/24", "beta.test")))
    for req, field in [
        (InitRequest(address="10.62.0.1/24"), "address"),
        (InitRequest(domain="beta.test"), "domain"),
        (InitRequest(name="beta"), "name"),
    ]:
        with pytest.raises(Conflict) as err:
            control.init_cell(req)
        assert err.value.field == field and "beta" in err.value.message
    assert control.cell().domain == "alpha.test"


def test_seed_import_maps_every_field_and_keeps_unknown_ones(control: Control) -> None:
    links = Links(control)
    seed = {"gamma": {"public_key": keypair()[1], "endpoint": "198.51.100.3:51820",
                      "vpn_subnet": "10.63.0.0/24", "remote_api_url": "http://10.63.0.1:3001",
                      "inbound": ["web"], "outbound": ["files"], "exit_offered": 1,
                      "last_push_at": "2025-01-02T03:04:05", "extra": [1, 2]}}  # fmt: skip
    out = import_links(links, json.dumps(seed))
    assert out == {"imported": [{"name": "gamma", "unknown_fields": ["extra"]}]}
    link = links.overview()[0]
    assert link["dns_ip"] == "10.63.0.1" and link["domain"] == "gamma.cell"
    assert link["outbound"] == [{"name": "files"}] and link["exit_offered"] is True
    assert link["last_push_at"] == pytest.approx(1735787045.0)
    with pytest.raises(BadInput) as err:
        bad = {"cell_name": "x", "public_key": keypair()[1], "endpoint": "198.51.100.4:1",
               "vpn_subnet": "nope"}  # fmt: skip
        import_links(links, json.dumps([bad]))
    assert "vpn_subnet" in (err.value.field or "")
    assert [c["name"] for c in links.overview()] == ["gamma"]


def test_waiting_links_go_at_once_linked_ones_say_goodbye(control: Control) -> None:
    links = Links(control)
    inv = links.invite(3600)
    assert inv.pairing is not None
    links.accept(redeem(inv.pairing.token, identity("beta", "10.62.0.0/24", "beta.test")))
    links.disconnect("beta")
    [beta] = links.overview()
    assert beta["state"] == "unlinking" and beta["pending_message"] == "unlink"
    links.unlink_delivered(beta["public_key"], "delivered")
    assert links.overview() == []
    assert [e["event"] for e in links.journal_entries("beta")] == [
        "linked", "unlinked", "unlink delivered"
    ]  # fmt: skip


def _linked_pair(control: Control) -> tuple[Links, str, str]:
    """alpha (the fixture's cell) linked with a made-up beta; returns beta's keys."""
    links = Links(control)
    inv = links.invite(3600)
    assert inv.pairing is not None
    beta_private, beta_public = keypair()
    links.accept(redeem(inv.pairing.token, identity("beta", "10.62.0.0/24", "beta.test",
                                                    beta_public)))  # fmt: skip
    return links, beta_private, beta_public


def _state_from_beta(control: Control, beta_private: str, seq: int, **extra: Any) -> Any:
    alpha = Link(
        "alpha",
        keys.public_from_private(control.cell().private_key),
        LinkIdentity(
            "x:1",
            ipaddress.IPv4Network("10.61.0.0/24"),
            ipaddress.IPv4Address("10.61.0.1"),
            "alpha.test",
        ),
    )
    body = {"shared_services": [], "exit_offered": False, "use_as_exit_relay": False, **extra}
    return make_envelope(kind="state", from_cell="beta", our_private=beta_private,
                         our_public=keys.public_from_private(beta_private), link=alpha, seq=seq,
                         extra=body)  # fmt: skip


def test_a_state_document_is_mirrored_once(control: Control) -> None:
    from picell.mesh.sync import Sync

    links, beta_private, _ = _linked_pair(control)
    sync = Sync(links)
    shared = [{"name": "files", "vip": "10.62.0.254", "ports": [80], "protocol": "tcp"}]
    moved = {"endpoint": "198.51.100.44:51820", "domain": "beta.test", "dns_ip": "10.62.0.1",
             "vpn_subnet": "10.62.0.0/24"}  # fmt: skip
    env = _state_from_beta(
        control, beta_private, 1, shared_services=shared, exit_offered=True, identity=moved
    )
    sync.receive_state(env, "10.62.0.1")
    [beta] = links.overview()
    assert beta["outbound"] == shared and beta["remote_exit_offered"] is True
    assert beta["endpoint"] == "198.51.100.44:51820"
    with pytest.raises(Forbidden):  # the same document again
        sync.receive_state(env, "10.62.0.1")
    with pytest.raises(Forbidden):  # from one of beta's devices
        sync.receive_state(_state_from_beta(control, beta_private, 2), "10.62.0.9")
    bad_vip = [{"name": "x", "vip": "10.99.0.1", "ports": [80]}]
    with pytest.raises(BadInput) as err:
        sync.receive_state(_state_from_beta(control, beta_private, 3, shared_services=bad_vip),
                           "10.62.0.1")  # fmt: skip
    assert err.value.field == "body.shared_services[0].vip"
    renumbered = {"vpn_subnet": "10.70.0.0/24", "dns_ip": "10.70.0.1"}
    with pytest.raises(BadInput):
        sync.receive_state(_state_from_beta(control, beta_private, 4, identity=renumbered),
                           "10.62.0.1")  # fmt: skip
    assert links.overview()[0]["outbound"] == shared


def test_sharing_marks_the_link_for_a_push_and_grants_it(control: Control) -> None:
    from picell.mesh.sync import Sync

    control.add_service("web", "127.0.0.1:8080", 80)
    links, _, _ = _linked_pair(control)
    sync = Sync(links)
    out = sync.share("beta", ["web"])
    assert [s["name"] for s in out["inbound"]] == ["web"] and out["pending_push"] >= 1
    with control.store.read() as conn:
        state = control.build(conn)
    assert [g.element for g in state.grants] == ["10.62.0.0/24 . 10.61.0.254 . 80"]
    assert "web.alpha.test" in [r.fqdn for r in state.dns.views[0].records]
    with pytest.raises(NotFound) as err:
        sync.share("beta", ["nope"])
    assert err.value.field == "services"
    control.remove_service("web")  # a removed service stops being shared
    assert links.overview()[0]["inbound"] == []


def test_pairing_again_after_a_disconnect_cancels_the_pending_unlink(control: Control) -> None:
    links, beta_private, beta_public = _linked_pair(control)
    links.disconnect("beta")
    assert links.overview()[0]["pending_message"] == "unlink"
    inv = links.invite(3600)
    assert inv.pairing is not None
    alpha_public = keys.public_from_private(control.cell().private_key)
    links.accept(
        redeem(
            inv.pairing.token,
            identity("beta", "10.62.0.0/24", "beta.test", beta_public),
            (beta_private, alpha_public),
        )
    )
    [beta] = links.overview()
    assert beta["state"] == "linked" and beta["pending_message"] is None


def test_an_exit_offer_is_pushed_and_journalled(control: Control) -> None:
    from picell.mesh.sync import Sync

    links, _, _ = _linked_pair(control)
    sync = Sync(links)
    generation = links.overview()[0]["pending_push"]
    out = sync.set_exit_offer("beta", True)
    assert out["exit_offered"] is True and out["pending_push"] > generation
    with control.store.read() as conn:
        beta = link_table.get(conn, "beta")
    assert document(control.cell(), beta, [])["exit_offered"] is True
    assert "offered our exit" in [e["event"] for e in links.journal_entries("beta")]


def test_a_burst_of_documents_costs_few_reconciles_and_one_journal_row_each(
    control: Control,
) -> None:
    import threading

    from picell.control import Coalescer
    from picell.mesh.sync import Sync

    links, beta_private, _ = _linked_pair(control)
    runs: list[int] = []
    done = threading.Event()

    def converge() -> None:
        control.converge_and_flush()
        runs.append(1)
        done.set()

    control.coalescer = Coalescer(converge, 0.5)
    try:
        sync = Sync(links)
        shared = [{"name": "files", "vip": "10.62.0.254", "ports": [80], "protocol": "tcp"}]
        for seq in range(1, 101):  # 100 documents, every other one toggling a share
            extra = {"shared_services": shared if seq % 2 else []}
            sync.receive_state(_state_from_beta(control, beta_private, seq, **extra), "10.62.0.1")
        assert done.wait(10)
        assert len(runs) <= 3
    finally:
        control.coalescer.stop()
        control.coalescer = None
    rows = [e for e in links.journal_entries("beta") if "shared" in e["event"]]
    assert len(rows) == 100  # one summarised row per document that changed something
    assert links.overview()[0]["outbound"] == []  # the last document is the truth


def test_the_journal_keeps_the_latest_thousand_rows_per_link(control: Control) -> None:
    from picell.store import journal

    with control.store.transaction() as conn:
        for i in range(1100):
            journal.append(conn, "beta", f"e{i}", "cell beta", "x\x1b[2J\nmore")
        journal.append(conn, "gamma", "kept", "local owner")
    entries = Links(control).journal_entries("beta")
    assert len(entries) == journal.KEEP_PER_LINK and entries[-1]["event"] == "e1099"
    assert entries[0]["detail"] == "x?[2J?more"  # no control character reaches a terminal
    assert Links(control).journal_entries("gamma")[0]["event"] == "kept"


def test_a_link_completed_without_pairing_spends_the_invite_it_used(control: Control) -> None:
    """Beta imported alpha's invite but could not reach alpha's pairing port; alpha imported
    beta's and paired. Beta's first document proves which invite of alpha's it imported."""
    from picell.mesh.links import invite_proof
    from picell.mesh.sync import Sync
    from picell.store import invites as invite_table

    links, beta_private, beta_public = _linked_pair(control)
    inv = links.invite(3600)
    assert inv.pairing is not None
    alpha_public = keys.public_from_private(control.cell().private_key)
    proof = invite_proof(inv.pairing.token, beta_public, alpha_public)
    with control.store.read() as conn:
        assert len(invite_table.candidates(conn, 0)) == 1
    Sync(links).receive_state(
        _state_from_beta(control, beta_private, 1, invite_proof="0" * 64), "10.62.0.1"
    )
    with control.store.read() as conn:  # a proof of nothing spends nothing
        assert len(invite_table.candidates(conn, 0)) == 1
    Sync(links).receive_state(
        _state_from_beta(control, beta_private, 2, invite_proof=proof), "10.62.0.1"
    )
    with control.store.read() as conn:
        assert invite_table.candidates(conn, 0) == []
    assert "invite spent" in [e["event"] for e in links.journal_entries("beta")]


def test_a_linked_key_cannot_be_taken_over_by_an_invite_holder(control: Control) -> None:
    """Anyone holding an invite tries to redeem it with beta's (linked) public key: without
    proof of beta's private key it is refused, and beta's link keeps its name and shares."""
    links, beta_private, beta_public = _linked_pair(control)
    inv = links.invite(3600)
    assert inv.pairing is not None
    stolen = identity("mallory", "10.66.0.0/24", "m.test", beta_public)
    with pytest.raises(Forbidden):
        links.accept(redeem(inv.pairing.token, stolen))
    inv = links.invite(3600)
    assert inv.pairing is not None
    same_name = identity("beta", "10.66.0.0/24", "beta.test", beta_public)
    wrong_key = keypair()[0]  # a proof made with another private key
    alpha_public = keys.public_from_private(control.cell().private_key)
    with pytest.raises(Forbidden):
        links.accept(redeem(inv.pairing.token, same_name, (wrong_key, alpha_public)))
    [beta] = links.overview()
    assert beta["name"] == "beta" and beta["vpn_subnet"] == "10.62.0.0/24"
    reasons = [e["detail"] for e in links.journal_entries(None) if e["event"] == "pairing refused"]
    assert any("key_proof" in r for r in reasons) and any("renames" in r for r in reasons)


def test_a_heartbeat_converges_nothing_a_change_converges(control: Control) -> None:
    from picell.mesh.sync import Sync

    links, beta_private, _ = _linked_pair(control)
    sync = Sync(links)
    asked: list[str | None] = []
    control.converge_soon = lambda flush=None: asked.append(flush)  # type: ignore[method-assign]
    heard: list[str] = []
    sync.heard_from = heard.append  # every accepted document: the sender's backoff ends
    shared = [{"name": "files", "vip": "10.62.0.250", "ports": [445]}]
    sync.receive_state(_state_from_beta(control, beta_private, 1, shared_services=shared),
                       "10.62.0.1")  # fmt: skip
    assert asked == ["beta.test"]  # their share changed: converge, and flush their zone
    for seq in (2, 3):  # the same document again: only its counters move
        seen = f"198.51.100.{seq}:51820"
        doc = _state_from_beta(control, beta_private, seq, shared_services=shared, seen_at=seen)
        assert sync.receive_state(doc, "10.62.0.1") == {"ok": True, "seq": seq}
    assert asked == ["beta.test"]
    sync.receive_state(_state_from_beta(control, beta_private, 4, shared_services=shared,
                                        exit_offered=True), "10.62.0.1")  # fmt: skip
    assert asked == ["beta.test", None]
    assert heard == [links.overview()[0]["public_key"]] * 4


def test_a_cell_on_our_own_network_is_mapped_and_both_sides_told(control: Control) -> None:
    """beta redeems our invite from our own network 10.61.0.0/24, telling us where it presents
    ours: we link it at a free block, keep its word, and answer with ours under the MAC."""
    from picell.mesh.sync import Sync

    links = Links(control)
    inv = links.invite(3600)
    assert inv.pairing is not None
    beta_private, beta_public = keypair()
    ident = identity("beta", "10.61.0.0/24", "beta.test", beta_public)
    answer = links.accept(redeem(inv.pairing.token, ident, mapped="10.201.9.0/24"))
    [shown] = links.overview()
    mapped = ipaddress.IPv4Network(shown["mapped_subnet"])
    assert not mapped.overlaps(ipaddress.IPv4Network("10.61.0.0/24"))
    assert shown["seen_as"] == "10.201.9.0/24" and shown["vpn_subnet"] == "10.61.0.0/24"
    assert answer["mapped_subnet"] == str(mapped)
    signed = {k: answer[k] for k in ("identity", "nonce", "mapped_subnet")}
    assert answer["mac"] == mac(pairing_key(inv.pairing.token), {**signed, "role": "accepted"})
    # its documents carry its word too; a changed one is followed and journalled
    sync = Sync(links)
    sync.receive_state(_state_from_beta(control, beta_private, 1, mapped_subnet="10.202.0.0/24"),
                       str(mapped.network_address + 1))  # fmt: skip
    assert links.overview()[0]["seen_as"] == "10.202.0.0/24"
    assert any("present our network at 10.202.0.0/24" in e["detail"]
               for e in links.journal_entries("beta"))  # fmt: skip
    # one that is not a private block of our size is refused, naming the field
    for bad in ("8.8.8.0/24", "10.203.0.0/25"):
        with pytest.raises(BadInput) as err:
            sync.receive_state(_state_from_beta(control, beta_private, 2, mapped_subnet=bad),
                               str(mapped.network_address + 1))  # fmt: skip
        assert err.value.field == "body.mapped_subnet"
    # and a document from its real address (our own!) is not from beta
    with pytest.raises(Forbidden):
        sync.receive_state(_state_from_beta(control, beta_private, 3), "10.61.0.1")


def test_a_mapping_altered_after_the_mac_is_refused(control: Control) -> None:
    links = Links(control)
    inv = links.invite(3600)
    assert inv.pairing is not None
    payload = redeem(inv.pairing.token, identity("beta", "10.61.0.0/24", "beta.test",
                                                 keypair()[1]), mapped="10.201.9.0/24")  # fmt: skip
    with pytest.raises(Forbidden):
        links.accept({**payload, "mapped_subnet": "10.201.10.0/24"})
    assert links.overview() == []
