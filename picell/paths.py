"""Where a cell keeps its files: everything lives under the data dir (DESIGN §9)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    """Where a cell keeps its files; everything lives under the data dir."""

    data_dir: Path

    @property
    def db(self) -> Path:
        return self.data_dir / "picell.db"

    @property
    def admin_socket(self) -> Path:
        return self.data_dir / "admin.sock"

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    @property
    def unbound_dir(self) -> Path:
        return self.data_dir / "unbound"

    @property
    def unbound_conf(self) -> Path:
        return self.unbound_dir / "unbound.conf"

    @property
    def unbound_control(self) -> Path:
        return self.unbound_dir / "control.sock"

    @property
    def wg_conf(self) -> Path:
        return self.run_dir / "wg.conf"

    @property
    def nft_file(self) -> Path:
        return self.run_dir / "ruleset.nft"
