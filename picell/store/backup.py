"""Backups and restores of the store (`picell backup`, `picell restore`; DESIGN §9).

- **Backup**: an online, consistent copy made with SQLite's backup API straight from the data
  dir's database (SQLite's own locking makes the copy consistent while the daemon writes; the
  CLI runs as root, like the daemon, so no admin route carries private keys). The copy is one
  self-contained SQLite file (journal mode DELETE) that records when it was made
  (`cell.backup_made_at`). It is written 0600 through a temporary file, fsync and rename.
- **Encryption** (`--passphrase-file`): scrypt (n=2^15, r=8, p=1) derives a 256-bit key from the
  passphrase and a random salt; AES-256-GCM seals the database with a random nonce, and the
  header is the GCM associated data, so a changed header fails like a changed body. The file is
  `MAGIC`, one line of JSON header (`v`, `kdf`, its parameters, `salt`, `nonce`), then the
  ciphertext. A wrong passphrase and a damaged file both fail the tag: the message says both.
- **Restore** (daemon stopped: the CLI checks): the backup is checked (SQLite integrity, a cell
  row, a schema this picell knows), migrated, then changed before it replaces the store:
  - a new `epoch` (`mesh.protocol`), so linked cells accept its documents again, and every
    link is marked to push at once (the daemon also pushes every link when it starts);
  - kept from the store it replaces: the web admin settings (the password in use now) and the
    router's port mapping (so the daemon renews or releases the ports it holds now);
  - compared with the store it replaces, when there is one: devices added since the backup
    (they must be added again), devices removed since (back now), links made since (the other
    cell still holds them: reconnect), links ended since (marked orphans: the other cell no
    longer holds them). Without the old store, the restore says what it cannot know;
  - the replaced store is kept as `picell.db.before-restore` (0600), then the new one is
    renamed into place (atomic) and the directory fsynced.

Must not: talk to the daemon, touch the kernel, or restore while the daemon runs.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from picell.errors import BadInput
from picell.store import cell as cell_table
from picell.store import journal
from picell.store import links as link_table
from picell.store.db import MIGRATIONS, Store

MAGIC = b"PICELL-BACKUP\n"
SQLITE_MAGIC = b"SQLite format 3\x00"
FORMAT_VERSION = 1
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
SCRYPT_N_MAX = 2**20  # a header asking more is refused (memory: 128 * r * n bytes)
HEADER_MAX = 1024
PASSPHRASE_MIN = 8
BACKUP_MAX = 1 << 30  # a file larger than this is not one of our backups
STORE_NAME = "picell.db"
BEFORE_RESTORE = "picell.db.before-restore"
WARNING = "this backup holds the cell's private keys: keep it as safe as the cell itself"
ORPHAN_ENDED = ("ended after the backup was made, restored here: the other cell no longer holds"
                " it; disconnect, or connect again with a fresh invite")  # fmt: skip


# -- files ---------------------------------------------------------------------------------------
def read_passphrase(path: Path) -> str:
    """The first line of `path`, at least `PASSPHRASE_MIN` characters."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(
            f"passphrase_file: cannot read {path}: {exc}", field="passphrase_file"
        ) from None
    phrase = lines[0] if lines else ""
    if len(phrase) < PASSPHRASE_MIN:
        raise BadInput(
            f"passphrase_file: the passphrase (its first line) needs {PASSPHRASE_MIN} characters"
            " or more",
            field="passphrase_file",
        )
    return phrase


def write_private(path: Path, data: bytes) -> None:
    """`data` at `path`, 0600 from the start, through a temporary file, fsync and rename."""
    parent = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- encryption ----------------------------------------------------------------------------------
def _key(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode())


def encrypt(data: bytes, passphrase: str) -> bytes:
    salt, nonce = os.urandom(16), os.urandom(12)
    header = {
        "v": FORMAT_VERSION,
        "kdf": "scrypt",
        "n": SCRYPT_N,
        "r": SCRYPT_R,
        "p": SCRYPT_P,
        "salt": base64.b64encode(salt).decode(),
        "cipher": "aes-256-gcm",
        "nonce": base64.b64encode(nonce).decode(),
    }
    line = json.dumps(header, sort_keys=True).encode() + b"\n"
    sealed = AESGCM(_key(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)).encrypt(
        nonce, data, MAGIC + line
    )
    return MAGIC + line + sealed


def _b64(value: Any, name: str, size: int) -> bytes:
    try:
        raw = base64.b64decode(value, validate=True) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != size:
        raise BadInput(f"backup.header.{name}: {size} bytes in base64 expected",
                       field=f"backup.header.{name}")  # fmt: skip
    return raw


def _header(blob: bytes) -> tuple[dict[str, Any], bytes, bytes]:
    """The parsed header, the header line (associated data) and the ciphertext."""
    end = blob.find(b"\n", len(MAGIC), len(MAGIC) + HEADER_MAX)
    if end < 0:
        raise BadInput("backup.header: missing or longer than it may be", field="backup.header")
    line = blob[len(MAGIC) : end + 1]
    try:
        header = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise BadInput("backup.header: not a JSON object", field="backup.header")
    if header.get("v") != FORMAT_VERSION:
        raise BadInput(f"backup.header.v: format {header.get('v')!r}; this picell reads "
                       f"{FORMAT_VERSION}", field="backup.header.v")  # fmt: skip
    if header.get("kdf") != "scrypt" or header.get("cipher") != "aes-256-gcm":
        raise BadInput("backup.header.kdf: scrypt with aes-256-gcm expected",
                       field="backup.header.kdf")  # fmt: skip
    for name, top in (("n", SCRYPT_N_MAX), ("r", 32), ("p", 16)):
        value = header.get(name)
        if type(value) is not int or not 1 <= value <= top:
            raise BadInput(f"backup.header.{name}: an integer from 1 to {top} expected",
                           field=f"backup.header.{name}")  # fmt: skip
    if header["n"] & (header["n"] - 1) or header["n"] < 2:
        raise BadInput("backup.header.n: a power of two expected", field="backup.header.n")
    return header, MAGIC + line, blob[end + 1 :]


def decrypt(blob: bytes, passphrase: str) -> bytes:
    header, aad, sealed = _header(blob)
    salt = _b64(header.get("salt"), "salt", 16)
    nonce = _b64(header.get("nonce"), "nonce", 12)
    key = _key(passphrase, salt, header["n"], header["r"], header["p"])
    try:
        return AESGCM(key).decrypt(nonce, sealed, aad)
    except InvalidTag:
        raise BadInput(
            "passphrase: the backup does not decrypt: a wrong passphrase, or a damaged file",
            field="passphrase",
        ) from None


def is_encrypted(blob: bytes) -> bool:
    return blob.startswith(MAGIC)


# -- backup --------------------------------------------------------------------------------------
def snapshot(db_path: Path) -> bytes:
    """A consistent copy of the store at `db_path` (SQLite's backup API), as one file's bytes,
    stamped with the time it was made."""
    if not db_path.exists():
        raise BadInput(f"data_dir: no store at {db_path}: is this cell initialised?",
                       field="data_dir")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="picell-backup-") as tmp:
        os.chmod(tmp, 0o700)
        copy = Path(tmp) / STORE_NAME
        src = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        dst = sqlite3.connect(copy)
        try:
            src.execute("PRAGMA busy_timeout=5000")
            src.backup(dst)
            # one self-contained file: no WAL beside it
            dst.execute("PRAGMA journal_mode=DELETE")
            if _has_column(dst, "cell", "backup_made_at"):
                dst.execute("UPDATE cell SET backup_made_at = ?", (time.time(),))
                dst.commit()
        finally:
            src.close()
            dst.close()
        return copy.read_bytes()


def _has_column(conn: sqlite3.Connection, table: str, column: str) -> bool:
    return any(r[1] == column for r in conn.execute(f"PRAGMA table_info({table})"))


def backup(db_path: Path, out: Path, passphrase: str | None) -> dict[str, Any]:
    data = snapshot(db_path)
    if passphrase is not None:
        data = encrypt(data, passphrase)
    write_private(out, data)
    return {"written": str(out), "bytes": len(data), "encrypted": passphrase is not None,
            "warning": WARNING}  # fmt: skip


# -- restore -------------------------------------------------------------------------------------
@dataclass
class Report:
    backup_made_at: float | None = None
    devices_added_since: list[str] = field(default_factory=list)  # must be added again
    devices_removed_since: list[str] = field(default_factory=list)  # back now
    links_made_since: list[str] = field(default_factory=list)  # other side holds them
    links_ended_since: list[str] = field(default_factory=list)  # marked orphans
    compared: bool = False  # False: no store to compare with
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def load_backup(blob: bytes, passphrase: str | None) -> bytes:
    if len(blob) > BACKUP_MAX:
        raise BadInput("backup: larger than any picell backup", field="backup")
    if is_encrypted(blob):
        if passphrase is None:
            raise BadInput("passphrase_file: this backup is encrypted: give --passphrase-file",
                           field="passphrase_file")  # fmt: skip
        return decrypt(blob, passphrase)
    if not blob.startswith(SQLITE_MAGIC):
        raise BadInput("backup: not a picell backup (neither encrypted nor an SQLite store)",
                       field="backup")  # fmt: skip
    if passphrase is not None:
        raise BadInput("passphrase_file: this backup is not encrypted",
                       field="passphrase_file")  # fmt: skip
    return blob


def _check_copy(path: Path) -> None:
    """The copy at `path` is a sound store of a cell this picell can read."""
    try:
        conn = sqlite3.connect(path)
        try:
            ok = conn.execute("PRAGMA integrity_check").fetchone()[0]
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
            has_cell = "cell" in tables and conn.execute("SELECT COUNT(*) FROM cell").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise BadInput(f"backup: a damaged store ({exc})", field="backup") from None
    if ok != "ok":
        raise BadInput(f"backup: a damaged store ({ok})", field="backup")
    if version > len(MIGRATIONS):
        raise BadInput(f"backup: made by a newer picell (store version {version}; this one "
                       f"knows {len(MIGRATIONS)}): upgrade first", field="backup")  # fmt: skip
    if not has_cell:
        raise BadInput("backup: no cell in it: not a picell backup", field="backup")


def _names(conn: sqlite3.Connection, table: str) -> set[str]:
    return {r[0] for r in conn.execute(f"SELECT name FROM {table}")}  # noqa: S608 - fixed names


def restore(data_dir: Path, blob: bytes, passphrase: str | None) -> Report:
    """Replace the store in `data_dir` by the backup `blob` (the daemon is stopped: the caller
    checked). Nothing changes unless the backup is sound."""
    raw = load_backup(blob, passphrase)
    target = data_dir / STORE_NAME
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp_name = tempfile.mkstemp(prefix=".restore.", suffix=".db", dir=data_dir)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
        _check_copy(tmp)
        if target.exists():
            _fold(target)
        report = _prepare(tmp, target if target.exists() else None)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        if target.exists():
            # the old store stays beside it, root-only, until the next restore
            os.replace(target, data_dir / BEFORE_RESTORE)
        for suffix in ("-wal", "-shm"):
            Path(f"{target}{suffix}").unlink(missing_ok=True)
        os.replace(tmp, target)
        _fsync_dir(data_dir)
    except BaseException:
        tmp.unlink(missing_ok=True)
        for suffix in ("-wal", "-shm", "-journal"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
        raise
    return report


def _fold(path: Path) -> None:
    """Bring the store being replaced to this picell's schema and fold its WAL into the file
    (opening and closing a `Store` does both); a store too damaged to open is compared with
    nothing (the restore says so)."""
    try:
        Store(path).close()
    except sqlite3.DatabaseError:
        pass


def _prepare(copy: Path, current: Path | None) -> Report:
    """Change the copy at `copy` into the restored store (see the module's docstring)."""
    store = Store(copy)  # migrates an older backup
    report = Report()
    try:
        old: dict[str, Any] | None = None
        if current is not None:
            old = _current(current)
        with store.transaction() as conn:
            cell = cell_table.load(conn)
            report.backup_made_at = cell.backup_made_at
            made = (time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(cell.backup_made_at))
                    if cell.backup_made_at else "an unknown time")  # fmt: skip
            now = time.time()
            conn.execute(
                "UPDATE cell SET epoch = ?, restored_at = ?, backup_made_at = NULL",
                (cell_table.new_epoch(), now),
            )
            devices, links = _names(conn, "peers"), _names(conn, "links")
            if old is not None:
                report.compared = True
                report.devices_added_since = sorted(old["peers"] - devices)
                report.devices_removed_since = sorted(devices - old["peers"])
                report.links_made_since = sorted(old["links"] - links)
                report.links_ended_since = sorted(links - old["links"])
                _keep(conn, old)
            else:
                report.notes.append(
                    "no store to compare with: devices added after the backup was made are not"
                    " in it, and picell cannot know their names: add them again; links made"
                    " or ended since are not known either: `picell cells` shows an orphan"
                    " once the other cell answers that it holds no link with us"
                )
            for name in sorted(links):
                link_table.mark_pending(conn, name)
                journal.append(conn, name, "restored from backup", "local owner",
                               f"restored from a backup made at {made}: a new epoch; telling"
                               " the other cell at once")  # fmt: skip
            for name in report.links_ended_since:
                link_table.set_orphan(conn, name, ORPHAN_ENDED)
                journal.append(conn, name, "orphan", "local owner", ORPHAN_ENDED)
            # a rotation in flight in the backup is not in flight any more
            conn.execute("UPDATE cell SET next_private_key = NULL")
            conn.execute("UPDATE links SET rekey_state = NULL")
        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        store.conn.execute("PRAGMA journal_mode=DELETE")
    finally:
        store.close()
    if report.devices_added_since:
        report.notes.append(
            "devices added after the backup must be added again (new configs): "
            + ", ".join(report.devices_added_since)
        )
    if report.devices_removed_since:
        report.notes.append(
            "devices removed after the backup are back: remove them again if they should not"
            " connect: " + ", ".join(report.devices_removed_since)
        )
    if report.links_made_since:
        report.notes.append(
            "links made after the backup are not in it; those cells still hold their side:"
            " connect again with a fresh invite (or ask their owners to disconnect): "
            + ", ".join(report.links_made_since)
        )
    if report.links_ended_since:
        report.notes.append(
            "links ended after the backup are back here, marked orphans (the other cell no"
            " longer holds them): " + ", ".join(report.links_ended_since)
        )
    return report


def _current(path: Path) -> dict[str, Any] | None:
    """What the store being replaced holds that the restore keeps or compares; None when it
    cannot be read (then the restore says what it cannot know)."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        conn.row_factory = sqlite3.Row
        try:
            admin = conn.execute("SELECT * FROM admin WHERE id = 1").fetchone()
            mapping = conn.execute("SELECT * FROM port_mapping WHERE id = 1").fetchone()
            return {
                "peers": _names(conn, "peers"),
                "links": _names(conn, "links"),
                "admin": dict(admin) if admin else None,
                "port_mapping": dict(mapping) if mapping else None,
            }
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return None


def _keep(conn: sqlite3.Connection, old: dict[str, Any]) -> None:
    """The web admin settings and the router's port mapping of the store being replaced."""
    for table in ("admin", "port_mapping"):
        row = old[table]
        conn.execute(f"DELETE FROM {table}")  # noqa: S608 - fixed names
        if row:
            cols = ", ".join(row)
            marks = ", ".join("?" for _ in row)
            conn.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks})",  # noqa: S608
                         tuple(row.values()))  # fmt: skip
