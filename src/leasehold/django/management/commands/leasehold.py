"""``manage.py leasehold ls|break|doctor|run|leader ...``: the ``leasehold`` command
on the store ``settings.LEASEHOLD`` names (see ``leasehold --help``)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from django.core.management.base import BaseCommand

from leasehold.cli._app import run_main
from leasehold.django import _client

SUBCOMMANDS = ("ls", "break", "doctor", "run", "leader")


class Command(BaseCommand):  # type: ignore[misc]
    help = (
        "The leasehold command (ls, break, doctor, run, leader) on the store of "
        "settings.LEASEHOLD. `manage.py leasehold SUBCOMMAND --help` for each."
    )

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> Any:
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        parser.epilog = "subcommands: " + ", ".join(SUBCOMMANDS)
        return parser

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("words", nargs=argparse.REMAINDER, help="leasehold arguments")

    def run_from_argv(self, argv: list[str]) -> None:
        # Everything after `leasehold` belongs to the leasehold command (`run --
        # cmd --verbosity 3` must reach cmd untouched), so Django's parser only
        # sees it when asked for help.
        words = argv[2:]
        if not words or words[0] in ("-h", "--help"):
            super().run_from_argv(argv)
            return
        sys.exit(self._run(words))

    def handle(self, *args: Any, **options: Any) -> None:
        words = list(options.get("words") or args)
        code = self._run(words)
        if code:
            sys.exit(code)

    @staticmethod
    def _run(words: list[str]) -> int:
        if words and words[0] not in SUBCOMMANDS and not words[0].startswith("-"):
            sys.stderr.write(
                f"manage.py leasehold: unknown subcommand {words[0]!r}; "
                f"one of {', '.join(SUBCOMMANDS)}\n"
            )
            return 2
        # In-process: the URL (and any password in it) never reaches argv of a process.
        return run_main(["--url", _client.source().url, *words])
