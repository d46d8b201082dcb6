"""Hypothesis strategies for the cross-cell wire: valid messages as varied as the protocol
allows, and what an attacker would put in any one field of them.

Shared by the pure property tests (`tests/unit/test_wire_properties.py`), the in-process entry
point tests, the schemathesis run and the root checker test
(`tests/netns/test_render_checkers.py`). Hostile values are: control characters (NUL, line
breaks, escape), brackets, `%` (an IPv6 scope id), quotes and config syntax, unicode look-alikes
(Kelvin sign, dotless i, fullwidth digits, Cyrillic а), over-long values and wrong JSON types.

Must not: touch the system or the store; it only builds data.
"""

from __future__ import annotations

import base64
import ipaddress
import string
from typing import Any

from hypothesis import strategies as st

from picell.mesh import policy, wire
from picell.wireguard import keys

# characters that have no business in any stored field of the wire (brackets, `:` and `/` are
# part of some fields' syntax and are tried below as insertions, not forbidden outright)
CONTROL = ["\x00", "\n", "\r", "\t", "\x0b", "\x0c", "\x1b", "\x7f", "\x85", "\x9b", "\u2028",
           "\u2029"]  # fmt: skip
LOOKALIKES = {
    "k": "\u212a",  # KELVIN SIGN: "\u212a".lower() == "k"
    "K": "\u212a",
    "i": "\u0131",  # LATIN SMALL LETTER DOTLESS I: .upper() == "I"
    "I": "\u0130",
    "a": "\u0430",  # CYRILLIC SMALL LETTER A
    "e": "\u0435",
    "o": "\u043e",
    "c": "\u0441",
    "0": "\uff10",  # FULLWIDTH DIGIT ZERO: int("\uff10") == 0
    "1": "\uff11",
    "5": "\u0665",  # ARABIC-INDIC DIGIT FIVE: int() takes it too
    ".": "\uff0e",
    "-": "\u2010",
    ":": "\uff1a",
    "/": "\u2215",
    "=": "\uff1d",
}
SYNTAX = ["[", "]", "%", "{", "}", '"', "'", "\\", " ", "#", ";", "=", ",", ":", "/", "@",
          "*", "$", "`", "\u200b", "\ufeff", "\u00a0"]  # fmt: skip
INJECTIONS = [
    "\n[Peer]\nPublicKey = AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\nAllowedIPs = 0.0.0.0/0",
    "\nAllowedIPs = 10.61.0.0/24",
    '\nforward-zone:\n\tname: "."\n\tforward-addr: 192.0.2.66',
    '"\n\tlocal-zone: "." transparent\n#',
    '" accept\n\t\tip saddr 0.0.0.0/0 accept #',
    "%eth0",
    "%1",
    "%25lo",
    "\x00",
    "\r\n",
    "\x1b[2J",
]
# every character no stored field may hold, whatever its syntax
NEVER_STORED = set("".join(CONTROL)) | set("%{}\"'\\ #;,@*$`") | {"\u200b", "\ufeff", "\u00a0"}

KEY_PRIVATE = st.binary(min_size=32, max_size=32).map(lambda b: base64.b64encode(b).decode())


def keypair() -> st.SearchStrategy[tuple[str, str]]:
    return KEY_PRIVATE.map(lambda p: (p, keys.public_from_private(p)))


# -- valid values, as varied as the protocol allows --------------------------------------------
LOWER, ALNUM = string.ascii_lowercase, string.ascii_lowercase + string.digits


def _label(first: str, middle_max: int) -> st.SearchStrategy[str]:
    """first char, then up to `middle_max` of [a-z0-9-], ending alphanumeric (no regex: fast)."""
    return st.one_of(
        st.sampled_from(first),
        st.tuples(
            st.sampled_from(first),
            st.text(ALNUM + "-", max_size=middle_max),
            st.sampled_from(ALNUM),
        ).map("".join),  # fmt: skip
    )


NAMES = _label(LOWER, 61)  # picell's name: 1-63 of a-z, 0-9, '-', starting with a letter
LABEL = _label(ALNUM, 20)


@st.composite
def private_domains(draw: st.DrawFn, styled: bool = True) -> str:
    """A domain a linked cell may bring in (under a private-use suffix); `styled`: sometimes in
    upper case or with the root dot, which are stored normalised."""
    labels = draw(st.lists(LABEL, min_size=1, max_size=3))
    text = ".".join([*labels, draw(st.sampled_from(policy.PRIVATE_SUFFIXES))])
    if styled and draw(st.booleans()):
        text = draw(st.sampled_from([text.upper(), text + ".", text.title()]))
    return text


@st.composite
def networks(draw: st.DrawFn) -> ipaddress.IPv4Network:
    """A network the identity policy lets a linked cell have (private, /24 to /30)."""
    base = draw(st.sampled_from(policy.LINKABLE_RANGES))
    prefix = draw(st.integers(24, 30))
    count = 2 ** (prefix - base.prefixlen)
    index = draw(st.integers(0, count - 1))
    return ipaddress.IPv4Network((int(base.network_address) + index * 2 ** (32 - prefix), prefix))


@st.composite
def hosts(draw: st.DrawFn, net: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    return net[draw(st.integers(1, net.num_addresses - 2))]


PORTS = st.integers(1, 65535)
DOC_V4 = st.sampled_from(["192.0.2.", "198.51.100.", "203.0.113."])


@st.composite
def endpoints(draw: st.DrawFn) -> str:
    """HOST:PORT in every form the protocol accepts: IPv4, IPv6 (compressed or not, any case),
    a host name (any case, with or without the root dot)."""
    port = draw(PORTS)
    kind = draw(st.sampled_from(["v4", "v6", "name"]))
    if kind == "v4":
        return f"{draw(DOC_V4)}{draw(st.integers(1, 254))}:{port}"
    if kind == "v6":
        addr = ipaddress.IPv6Address(int(ipaddress.IPv6Address("2001:db8::")) +
                                     draw(st.integers(1, 2**64)))  # fmt: skip
        text = draw(st.sampled_from([addr.compressed, addr.exploded]))
        return f"[{text.upper() if draw(st.booleans()) else text}]:{port}"
    labels = draw(st.lists(LABEL, min_size=1, max_size=3))
    host = ".".join([*labels, draw(st.sampled_from(["example", "test", "invalid", "example.org"]))])
    if draw(st.booleans()):
        host = draw(st.sampled_from([host.upper(), host + "."]))
    return f"{host}:{port}"


HEX = "0123456789abcdef"
MACS = st.text(HEX, min_size=64, max_size=64)
NONCES = st.text(HEX, min_size=16, max_size=64)
TOKENS = st.text(string.ascii_letters + string.digits + "_-", min_size=16, max_size=128)
VERSIONS = st.lists(st.integers(1, wire.VERSION_MAX), min_size=1, max_size=wire.VERSIONS_MAX)


@st.composite
def identities(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """(private key, the identity a cell sends) with a network the policy admits."""
    private, public = draw(keypair())
    net = draw(networks())
    ident: dict[str, Any] = {
        "cell_name": draw(NAMES),
        "domain": draw(private_domains()),
        "public_key": public,
        "endpoint": draw(endpoints()),
        "vpn_subnet": str(net),
        "dns_ip": str(draw(hosts(net))),
    }
    if draw(st.booleans()):
        ident["version"] = 1
    if draw(st.booleans()):
        ident["versions"] = sorted({1, *draw(VERSIONS)})[: wire.VERSIONS_MAX]
    if draw(st.booleans()):
        ident["mesh_port"] = draw(PORTS)
    return private, ident


def exit_ends() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({"public_key": keypair().map(lambda kp: kp[1]), "port": PORTS})


@st.composite
def services(draw: st.DrawFn, net: ipaddress.IPv4Network | None = None) -> list[dict[str, Any]]:
    names = draw(st.lists(NAMES, max_size=3, unique=True))
    out = []
    for n in names:
        vip = draw(hosts(net)) if net else ipaddress.IPv4Address(draw(st.integers(0, 2**32 - 1)))
        svc: dict[str, Any] = {"name": n, "vip": str(vip),
                               "ports": draw(st.lists(PORTS, min_size=1, max_size=4))}  # fmt: skip
        if draw(st.booleans()):
            svc["protocol"] = draw(st.sampled_from(["tcp", "udp"]))
        out.append(svc)
    return out


def header(kind: str, sender: str, public: str, to: str, seq: int) -> dict[str, Any]:
    return {"v": 1, "versions": [1], "type": kind, "from_cell": sender, "from_public_key": public,
            "to_public_key": to, "seq": seq, "sent_at": 1_700_000_000.5}  # fmt: skip


@st.composite
def doc_identities(draw: st.DrawFn, net: ipaddress.IPv4Network | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if draw(st.booleans()):
        out["endpoint"] = draw(endpoints())
    if net is not None:
        if draw(st.booleans()):
            out["dns_ip"] = str(draw(hosts(net)))
        if draw(st.booleans()):
            out["vpn_subnet"] = str(net)
    return out


@st.composite
def state_extras(draw: st.DrawFn, net: ipaddress.IPv4Network | None = None) -> dict[str, Any]:
    """The document part of a state body (what `mesh.document.document` sends)."""
    out: dict[str, Any] = {"shared_services": draw(services(net))}
    for flag in ("exit_offered", "use_as_exit_relay"):
        if draw(st.booleans()):
            out[flag] = draw(st.booleans())
    for end in ("exit_relay", "exit_client"):
        if draw(st.booleans()):
            out[end] = draw(exit_ends())
    if draw(st.booleans()):
        out["identity"] = draw(doc_identities(net))
    if draw(st.booleans()):
        out["invite_proof"] = draw(MACS)
    return out


@st.composite
def messages(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    """A valid message of each kind in `wire.MESSAGES`."""
    if kind in ("invite", "pairing_request", "pairing_answer"):
        ident = draw(identities())[1]
        if kind == "invite":
            pairing = {"port": draw(PORTS), "token": draw(TOKENS),
                       "expires_at": draw(st.floats(0, 2e9))}  # fmt: skip
            return {**ident, "pairing": pairing}
        out = {"identity": ident, "nonce": draw(NONCES), "mac": draw(MACS)}
        if kind == "pairing_request" and draw(st.booleans()):
            out["key_proof"] = draw(MACS)
        return out
    public, to = draw(keypair())[1], draw(keypair())[1]
    seq = draw(st.integers(1, wire.SEQ_MAX))
    if kind == "state":
        return {**header("state", draw(NAMES), public, to, seq), **draw(state_extras())}
    if kind == "unlink":
        return header("unlink", draw(NAMES), public, to, seq)
    if kind == "envelope":
        return {"body": header("unlink", "beta", public, to, seq), "mac": draw(MACS)}
    if kind == "state_answer":
        return {"ok": True, "seq": draw(st.integers(1, wire.SEQ_MAX))}
    if kind == "rekey":
        out = {**header("rekey", draw(NAMES), public, to, seq), "new_public_key": to,
               "proof": draw(MACS)}  # fmt: skip
        if draw(st.booleans()):
            out["switch"] = draw(st.booleans())
        if draw(st.booleans()):
            out["epoch"] = draw(st.from_regex(wire.EPOCH_PATTERN, fullmatch=True))
        return out
    if kind == "rekey_answer":
        return {"ok": True, "new_public_key": to}
    if kind == "explain":
        out = {**header("explain", draw(NAMES), public, to, seq), "service": draw(NAMES)}
        if draw(st.booleans()):
            out["device"] = draw(NAMES)
        return out
    if kind == "explain_answer":
        if not draw(st.booleans()):
            return {"ok": True, "service": draw(NAMES), "allowed": False}
        ports = draw(st.lists(PORTS, min_size=1, max_size=wire.PORTS_PER_SERVICE_MAX))
        out = {"ok": True, "service": draw(NAMES), "allowed": True, "ports": ports,
               "protocol": draw(st.sampled_from(["tcp", "udp"]))}  # fmt: skip
        if draw(st.booleans()):
            out["since"] = draw(st.floats(0, 2e9))
        return out
    raise AssertionError(kind)


# -- hostile values ------------------------------------------------------------------------------
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)


def json_values(max_leaves: int = 20) -> st.SearchStrategy[Any]:
    """Any JSON value (what strict JSON lets through: no NaN or Infinity, depth well under its
    limit of 32)."""
    return st.recursive(
        JSON_SCALARS,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=max_leaves,
    )


def nested(depth: int) -> Any:
    out: Any = "x"
    for i in range(depth):
        out = [out] if i % 2 else {"k": out}
    return out


WRONG_TYPES = st.one_of(
    st.sampled_from(
        [
            None,
            True,
            False,
            0,
            -1,
            1,
            2**53 + 1,
            2**64,
            -(2**63),
            0.0,
            -0.0,
            1.5,
            1e308,
            "",
            " ",
            [],
            {},
            "null",
            "true",
            "1",
            "80",
        ]
    ),  # fmt: skip
    st.builds(nested, st.integers(1, 30)),
    json_values(8),
)


@st.composite
def mutated_text(draw: st.DrawFn, valid: str) -> str:
    """`valid` with something an attacker would add: a control character, a syntax character or
    an injection inserted anywhere, a look-alike in place of a character, a changed case, the
    value repeated past its limit."""
    how = draw(st.sampled_from(["insert", "lookalike", "inject", "case", "long", "wrap", "cut"]))
    pos = draw(st.integers(0, len(valid)))
    if how == "insert":
        ch = draw(st.sampled_from(CONTROL + SYNTAX + list(LOOKALIKES.values())))
        return valid[:pos] + ch + valid[pos:]
    if how == "lookalike":
        spots = [i for i, c in enumerate(valid) if c in LOOKALIKES]
        if not spots:
            return valid + "\u212a"
        i = draw(st.sampled_from(spots))
        return valid[:i] + LOOKALIKES[valid[i]] + valid[i + 1 :]
    if how == "inject":
        return valid[:pos] + draw(st.sampled_from(INJECTIONS)) + valid[pos:]
    if how == "case":
        return draw(st.sampled_from([valid.upper(), valid.title(), valid.swapcase()]))
    if how == "long":
        return (valid or "a") * draw(st.integers(2, 600 // max(1, len(valid)) + 2))
    if how == "wrap":
        left, right = draw(st.sampled_from([(" ", ""), ("", "\n"), ("[", "]"), ("", "."),
                                            ("", "%0"), ("\ufeff", ""), ("", ":80")]))  # fmt: skip
        return left + valid + right
    return valid[:pos]


ANY_CHAR = [*CONTROL, *SYNTAX, *LOOKALIKES.values(), *ALNUM, *string.ascii_uppercase, ".", "-"]


def hostile_for(valid: Any) -> st.SearchStrategy[Any]:
    """Something to put where `valid` was."""
    options = [WRONG_TYPES, st.text(alphabet=st.sampled_from(ANY_CHAR), max_size=40)]
    if isinstance(valid, str):
        options += [mutated_text(valid)] * 4
    elif isinstance(valid, bool):
        options += [st.sampled_from([0, 1, "true", "false", None])]
    elif isinstance(valid, int):
        options += [
            st.sampled_from(
                [
                    str(valid),
                    float(valid),
                    valid + 0.5,
                    -valid,
                    0,
                    65536,
                    2**53 + 1,
                    "\uff10",
                    f"{valid}\n",
                ]
            ),  # fmt: skip
            st.integers(),
        ]
    elif isinstance(valid, float):
        options += [st.sampled_from([str(valid), -1.0, -1e-9, int(valid), True])]
    elif isinstance(valid, list):
        options += [st.builds(lambda n: valid * n, st.integers(2, 300)), st.just([valid])]
    elif isinstance(valid, dict):
        options += [st.just([valid]), st.just(str(valid))]
    return st.one_of(options)


# -- paths into a message ------------------------------------------------------------------------
Path = tuple[str | int, ...]


def paths(data: Any, at: Path = ()) -> list[Path]:
    """Every key and list index in `data` (containers too, not their root)."""
    out: list[Path] = [at] if at else []
    if isinstance(data, dict):
        for k, v in data.items():
            out += paths(v, (*at, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += paths(v, (*at, i))
    return out


def get(data: Any, path: Path) -> Any:
    for part in path:
        data = data[part]
    return data


def replaced(data: Any, path: Path, value: Any) -> Any:
    """A copy of `data` with `value` at `path` (`DELETE` removes the key)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(data, dict):
        out = dict(data)
        if value is DELETE and not rest:
            out.pop(head, None)
        else:
            out[head] = replaced(data[head], rest, value)
        return out
    out_list = list(data)
    if value is DELETE and not rest:
        del out_list[head]  # type: ignore[arg-type]
    else:
        out_list[head] = replaced(data[head], rest, value)  # type: ignore[index]
    return out_list


DELETE = object()


def where(prefix: str, path: Path) -> str:
    """The field name `wire.parse` gives `path` under `prefix`."""
    out = prefix
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


@st.composite
def mutations(draw: st.DrawFn, message: dict[str, Any]) -> tuple[Path, Any, Any]:
    """(path, hostile value or DELETE, the mutated message)."""
    path = draw(st.sampled_from(paths(message)))
    value = draw(st.one_of(hostile_for(get(message, path)), st.just(DELETE)))
    return path, value, replaced(message, path, value)
