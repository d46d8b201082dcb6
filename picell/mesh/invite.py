"""Invites (DESIGN §5): reading back every form a cell exports, into `wire.Invite`.

`connect` takes the copy-paste string (`picell-invite:…`), the raw invite JSON, and the output of
`picell invite --json` (`{"invite": {…}, "string": "picell-invite:…"}`); errors name
`invite.<field>`. The text is hostile until the model accepted it: its size is bounded before it
is decoded, and the JSON parse refuses NaN, Infinity and deep nesting.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from picell.api.strict_json import loads_strict
from picell.errors import BadInput
from picell.mesh.wire import INVITE_PREFIX, PAIRING_BODY_MAX, Identity, Invite, parse

INVITE_TEXT_MAX = 3 * PAIRING_BODY_MAX  # the string form is base64, the JSON may be indented


def _decode_string(text: str) -> Any:
    body = text[len(INVITE_PREFIX) :]
    try:
        raw = base64.b64decode(body + "=" * (-len(body) % 4), altchars=b"-_", validate=True)
        return loads_strict(raw, max_bytes=INVITE_TEXT_MAX, field="invite")
    except (binascii.Error, ValueError, BadInput):
        raise BadInput("invite: the string is damaged (copy all of it)", field="invite") from None


def parse_invite(text: str) -> Invite:
    """An invite from its copy-paste string, its JSON, or `picell invite --json` output."""
    if not isinstance(text, str) or len(text) > INVITE_TEXT_MAX:
        raise BadInput(f"invite: at most {INVITE_TEXT_MAX} characters", field="invite")
    text = text.strip()
    if text.startswith(INVITE_PREFIX):
        data = _decode_string(text)
    elif text.startswith("{"):
        data = loads_strict(text.encode(), max_bytes=INVITE_TEXT_MAX, field="invite")
        if isinstance(data, dict) and isinstance(data.get("invite"), dict):
            data = data["invite"]  # `picell invite --json` wraps it with its string form
    else:
        raise BadInput(
            "invite: neither an invite string (picell-invite:…) nor invite JSON", field="invite"
        )
    return parse(Invite, data, "invite")


def parse_identity(data: Any, prefix: str) -> Identity:
    """An identity in another form (the seed system's link file), errors naming `prefix`."""
    return parse(Identity, data, prefix)
