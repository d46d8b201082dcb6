"""`picell backup FILE | restore FILE [--passphrase-file F] | keys rotate` (DESIGN §9).

`backup` and `restore` work on the data dir's store directly (`picell.store.backup`): a backup
is consistent while the daemon runs (SQLite's backup API); a restore refuses while the daemon
answers on its admin socket. `keys rotate` asks the running daemon (`picell.mesh.rekey`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from picell.cli.base import CTX, JsonOpt, admin_client, app, call, fail, out
from picell.errors import BadInput, PicellError

keys_app = typer.Typer(no_args_is_help=True, help="The cell's WireGuard key")
app.add_typer(keys_app, name="keys")

PassphraseOpt = Annotated[
    Path | None,
    typer.Option("--passphrase-file", help="Encrypt (decrypt) with the first line of this file"),
]


def _refused(exc: PicellError, as_json: bool) -> None:
    fail(exc.message, as_json, {"code": exc.code, "message": exc.message, "field": exc.field})


def daemon_answers() -> bool:
    if not (CTX.data_dir / "admin.sock").exists():
        return False
    try:
        with admin_client() as http:
            http.get("/api/status", timeout=5)
        return True
    except httpx.TransportError:
        return False


@app.command()
def backup(
    file: Annotated[Path, typer.Argument(help="Where to write the backup (0600)")],
    passphrase_file: PassphraseOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A consistent copy of the store (the daemon may run). It holds the private keys."""
    from picell.store import backup as backups

    try:
        phrase = backups.read_passphrase(passphrase_file) if passphrase_file else None
        data = backups.backup(CTX.data_dir / backups.STORE_NAME, file, phrase)
    except PicellError as exc:
        _refused(exc, as_json)
    except OSError as exc:
        fail(f"file: cannot write {file}: {exc.strerror}", as_json)
    how = "encrypted" if phrase else "NOT encrypted (use --passphrase-file to encrypt)"
    out(data, as_json, f"wrote {file} ({data['bytes']} bytes, {how})\nwarning: {data['warning']}")


@app.command()
def restore(
    file: Annotated[Path, typer.Argument(help="A file made by `picell backup`")],
    passphrase_file: PassphraseOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Replace the store by a backup (stop the daemon first). Linked cells hear at once."""
    from picell.store import backup as backups

    if daemon_answers():
        fail("the daemon is running: stop it before restoring a backup", as_json)
    try:
        phrase = backups.read_passphrase(passphrase_file) if passphrase_file else None
        try:
            blob = file.read_bytes()
        except OSError as exc:
            raise BadInput(f"file: cannot read {file}: {exc.strerror}",
                                   field="file") from None  # fmt: skip
        report = backups.restore(CTX.data_dir, blob, phrase)
    except PicellError as exc:
        _refused(exc, as_json)
    made = report.backup_made_at
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(made)) if made else "unknown"
    lines = [
        f"restored from a backup made at {when}",
        "a new epoch: every linked cell accepts this cell's documents again; each is told at"
        " the next `picell serve`",
        f"the replaced store is kept as {CTX.data_dir / backups.BEFORE_RESTORE}",
        *(f"note: {n}" for n in report.notes),
    ]
    data: dict[str, Any] = report.as_dict()
    out(data, as_json, "\n".join(lines))


@keys_app.command("rotate")
def keys_rotate(as_json: JsonOpt = False) -> None:
    """A new cell key: every linked cell moves to it (no new invite); devices re-import."""
    resp = call("POST", "/api/cell/keys/rotate", as_json)
    data = resp.json()
    lines = [f"new public key: {data['public_key']}"]
    if data["moved"]:
        lines.append("linked cells moved to it: " + ", ".join(data["moved"]))
    for name, why in data["pending"].items():
        lines.append(f"pending: {name} did not answer ({why}); it moves when it does")
    devices = data["devices"]
    if devices:
        lines.append("every device must import its config again (`picell peers config NAME`): "
                     + ", ".join(devices))  # fmt: skip
    out(data, as_json, "\n".join(lines))
