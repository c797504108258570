"""Where the default store lives when no URL is given."""

from __future__ import annotations

import logging
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


_warned_default = False


def configured_url() -> str | None:
    """The URL in $LEASEHOLD_URL, or None when it is not set (or empty)."""
    return os.environ.get(ENV_URL) or None


def url_for_library(url: str | None) -> str:
    """``url``, else $LEASEHOLD_URL, else the host-local SQLite file, saying so once.

    A fleet whose configuration forgot the URL would otherwise get one "singleton"
    per host without a word: the WARNING names the file and says it is local."""
    global _warned_default
    if url is not None:
        return url
    env = configured_url()
    if env is not None:
        return env
    chosen = default_url()
    if not _warned_default:
        _warned_default = True
        logging.getLogger("leasehold").warning(
            "no store URL given and $%s is not set: using the SQLite file %s, which is "
            "local to this host; processes on other hosts do not share its leases. "
            "Pass a URL (or set %s) to coordinate across hosts.",
            ENV_URL,
            chosen.removeprefix("sqlite:///"),
            ENV_URL,
            extra={"leasehold_event": "default_store"},
        )
    return chosen
