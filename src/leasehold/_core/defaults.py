"""Where the default store lives when no URL is given."""

from __future__ import annotations

import os
from pathlib import Path

ENV_URL = "LEASEHOLD_URL"


def state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "leasehold"


def default_url() -> str:
    """$LEASEHOLD_URL, else a SQLite file in the user's state directory."""
    env = os.environ.get(ENV_URL)
    if env:
        return env
    return f"sqlite:///{state_dir() / 'leasehold.db'}"
