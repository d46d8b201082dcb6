"""Templates and static files of the web UI (no code; `picell.api.web` renders them)."""
