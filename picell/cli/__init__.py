"""The `picell` command. The common commands take the standard-library fast path
(`picell.cli.fast`); everything else, `--help` and usage errors run the Typer CLI
(`picell.cli.commands`). Both print with `picell.cli.show`. Must stay light: the console script
and `python -m picell` import this package before anything runs.
"""

from __future__ import annotations

import sys


def main() -> None:
    from picell.cli import fast

    code = fast.main(sys.argv[1:])
    if code is not None:
        raise SystemExit(code)
    from picell.cli.commands import app

    app()
