"""The runner: the one place picell starts short-lived system commands.

Commands are argv lists (never a shell), run with LC_ALL=C, a timeout and captured output. Secrets
travel through stdin or 0600 files, never argv. Every call is recorded so that a reconcile can
report exactly which commands it spawned; tests replace the runner with a fake.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

from picell.constants import COMMAND_TIMEOUT_S
from picell.errors import CommandFailed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


@dataclass
class Runner:
    """Runs commands; `history` holds every argv since the last `take_history()`."""

    history: list[tuple[str, ...]] = field(default_factory=list)

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: str | None = None,
        ok_codes: Sequence[int] = (0,),
        timeout_s: float = COMMAND_TIMEOUT_S,
    ) -> Result:
        args = tuple(str(a) for a in argv)
        self.history.append(args)
        log.debug("run %s", " ".join(args))
        env = dict(os.environ, LC_ALL="C")
        try:
            proc = subprocess.run(  # noqa: S603 - argv list, never a shell
                args,
                input=stdin,
                capture_output=True,
                text=True,
                # an interface or a comment named in another encoding must not raise here
                encoding="utf-8",
                errors="replace",
                timeout=timeout_s,
                env=env,
                check=False,
            )
        except FileNotFoundError as exc:
            raise CommandFailed(args, 127, f"{args[0]} not found") from exc
        except subprocess.TimeoutExpired as exc:
            raise CommandFailed(args, -1, f"timed out after {timeout_s}s") from exc
        result = Result(args, proc.returncode, proc.stdout, proc.stderr)
        if proc.returncode not in ok_codes:
            raise CommandFailed(args, proc.returncode, proc.stderr or proc.stdout)
        return result

    def take_history(self) -> list[tuple[str, ...]]:
        taken, self.history = self.history, []
        return taken
