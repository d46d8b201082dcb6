"""Validation names the field and refuses what must never reach a command."""

from __future__ import annotations

import pytest

from picell import validate
from picell.errors import BadInput
from picell.wireguard import keys


@pytest.mark.parametrize("good", ["a", "phone", "web-1", "x" * 63])
def test_names_accepted(good: str) -> None:
    assert validate.name(good) == good


@pytest.mark.parametrize(
    "bad",
    ["", "Phone", "-a", "a-", "1a", "a_b", "a.b", "x" * 64, "a b", "beta\n", "beta\r", "\u212aa"],
)
def test_names_refused_with_field(bad: str) -> None:
    with pytest.raises(BadInput) as err:
        validate.name(bad, "name")
    assert err.value.field == "name"


def test_domain() -> None:
    assert validate.domain("Alpha.Cell.") == "alpha.cell"
    for bad in (
        "",
        "a..b",
        "-a.cell",
        "a.123",
        "a b.cell",
        "beta.cell\n",
        "beta\n.cell",
        "x" * 64 + ".cell",
        "\u212aa.cell",
        "a." * 127 + "cell",
    ):
        with pytest.raises(BadInput):
            validate.domain(bad)


def test_endpoint() -> None:
    assert str(validate.endpoint("198.51.100.1:51820")) == "198.51.100.1:51820"
    assert str(validate.endpoint("cell.example.org:1")) == "cell.example.org:1"
    # stored normalised: equal endpoints compare equal
    assert str(validate.endpoint("[2001:DB8:0::1]:51820")) == "[2001:db8::1]:51820"
    assert str(validate.endpoint("Cell.Example.ORG.:1")) == "cell.example.org:1"
    injected = "[fe80::1%1\n[Peer]\nPublicKey = x\nAllowedIPs = 10.61.0.2/32]:51820"
    for bad in (
        "198.51.100.1",
        "host:0",
        "host:70000",
        "ho st:1",
        ":1",
        "[fe80::1%1]:51820",
        injected,
        "[fe80::1]:51820",
        "host:1\n",
        "0.0.0.0:1",
        "224.0.0.1:1",
        "1.2.3:1",
        "[::]:1",
        "2001:db8::1:51820",
        "h\u0131st:1",
    ):
        with pytest.raises(BadInput) as err:
            validate.endpoint(bad)
        assert err.value.field == "endpoint"


def test_cell_address() -> None:
    assert str(validate.cell_address("10.0.0.1/24").network) == "10.0.0.0/24"
    for bad in ("10.0.0.0/24", "10.0.0.255/24", "8.8.8.8/24", "10.0.0.1/30", "10.0.0.1"):
        with pytest.raises(BadInput) as err:
            validate.cell_address(bad)
        assert err.value.field == "address"


def test_backend() -> None:
    assert validate.backend("127.0.0.1:8080")[1] == 8080
    for bad in ("localhost:80", "127.0.0.1", "0.0.0.0:80", "224.0.0.1:80", "1.2.3.4:0"):
        with pytest.raises(BadInput):
            validate.backend(bad)


def test_wg_key() -> None:
    good = keys.public_from_private(keys.generate_private())
    assert validate.wg_key(good) == good
    for bad in ("", "abc", good[:-2], good + "=", "!" * 44):
        with pytest.raises(BadInput) as err:
            validate.wg_key(bad)
        assert err.value.field == "public_key"


def test_interface() -> None:
    assert validate.interface("picell0") == "picell0"
    for bad in ("", "a" * 16, "eth0;rm", "0abc", "a/b"):
        with pytest.raises(BadInput):
            validate.interface(bad)
