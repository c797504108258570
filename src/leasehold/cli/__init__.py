"""The ``leasehold`` command: run a command under a lease, list and break leases,
diagnose the store, and a self-contained demo.

Each subcommand lives in its own module and registers itself in ``_app``; this
package's ``__init__`` stays import-light so that ``leasehold`` starts quickly.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point: parse ``argv`` (default ``sys.argv[1:]``), run the
    subcommand and exit with its status."""
    from leasehold.cli._app import run_main

    raise SystemExit(run_main(argv))
