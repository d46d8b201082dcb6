"""`python -m picell` runs the CLI."""

from picell.cli import main

main()
