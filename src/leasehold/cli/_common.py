"""What every subcommand shares: exit codes, output, options, opening the client."""

from __future__ import annotations

import logging
import math
import os
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console

from leasehold._core import validate
from leasehold._core.defaults import ENV_URL
from leasehold._core.records import HolderInfo
from leasehold._errors import InvalidArgument, LeaseholdError
from leasehold._sync.client import Client

# -- exit codes ------------------------------------------------------------------
# Shells own 1, 2, 126, 127 and 128+N; `run` passes its command's own status through
# unchanged, so leasehold's own outcomes use the sysexits.h block (64-78), which
# ordinary commands rarely return. 75-77 are the three "the lock decided" outcomes,
# side by side: 75 is EX_TEMPFAIL ("try again later"), which is exactly what a busy
# lock means to cron, systemd and mail-style retry loops.

EXIT_OK = 0
EXIT_FAILURE = 1  # break declined at the prompt; other expected failures
EXIT_USAGE = 2  # click's own code for bad command lines; bad input of any kind
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: the store cannot be reached or used
EXIT_INTERNAL = 70  # EX_SOFTWARE: a bug in leasehold (traceback with --debug)
EXIT_BUSY = 75  # EX_TEMPFAIL: run --no-wait found the lease held
EXIT_TIMEOUT = 76  # run --wait S gave up waiting
EXIT_LOST = 77  # run lost the lease and stopped its command
EXIT_CANNOT_EXECUTE = 126  # as in shells: the command exists but cannot be run
EXIT_NOT_FOUND = 127  # as in shells: the command was not found
SIGNAL_BASE = 128  # 128+N: killed by (or interrupted with) signal N, as in shells

USAGE_MEANING = "bad command line or argument (one line on stderr, no traceback)"


def exit_codes_epilog(*rows: tuple[object, str], usage: str = USAGE_MEANING, note: str = "") -> str:
    """An "Exit codes" section for --help from (code, meaning) rows, followed by
    the codes every subcommand shares. ``\\b`` stops click re-wrapping it."""
    table = [
        *rows,
        (EXIT_USAGE, usage),
        (EXIT_UNAVAILABLE, "the store is unreachable or unusable"),
        (EXIT_INTERNAL, "internal error (re-run with --debug for the traceback)"),
    ]
    width = max(len(str(code)) for code, _ in table)
    lines = [f"  {code!s:>{width}}  {meaning}" for code, meaning in table]
    if note:
        lines.append(f"  {note}")
    body = "\n".join(lines)
    return f"\b\nExit codes:\n{body}"


class CliError(Exception):
    """An expected failure: printed as one line, exits with ``code``."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


# -- output ------------------------------------------------------------------------

# Wide enough that rich never wraps a line or a table column when writing to a
# file or a pipe, where there is no terminal width to respect.
PIPE_WIDTH = 4096


def stderr_console() -> Console:
    err = Console(stderr=True, highlight=False)
    if not err.is_terminal:
        err = Console(stderr=True, highlight=False, width=PIPE_WIDTH)
    return err


def stdout_console() -> Console:
    out = Console(highlight=False)
    if not out.is_terminal:
        out = Console(highlight=False, width=PIPE_WIDTH)
    return out


def _secrets() -> list[str]:
    """Passwords in the URL in use, in every spelling an error message might show."""
    raw = STATE.url if STATE.url is not None else os.environ.get(ENV_URL, "")
    if not raw:
        return []
    found: set[str] = set()
    try:
        parts = urllib.parse.urlsplit(raw)
        if parts.password:
            found.add(parts.password)
        for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
            if key.lower() in ("password", "pass", "sslpassword") and value:
                found.add(value)
    except ValueError:
        return []
    spellings = (
        found
        | {urllib.parse.unquote(s) for s in found}
        | {urllib.parse.quote(s, safe="") for s in found}
    )
    # Very short "passwords" would blank out ordinary words; they protect nothing.
    return sorted((s for s in spellings if len(s) >= 3), key=len, reverse=True)


def scrub(text: str) -> str:
    """Belt and braces: leasehold's messages never contain credentials, but a
    driver's exception text might; nothing printed may show the password."""
    for secret in _secrets():
        text = text.replace(secret, "***")
    return text


def one_line(message: str) -> str:
    """Driver messages can span lines ("...refused\\n\\tIs the server running?")."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def say(message: str, *, style: str | None = None, console: Console | None = None) -> None:
    """One line on stderr, prefixed ``leasehold:``. Never parsed as rich markup,
    never wrapped: messages carry names and commands verbatim."""
    target = console or stderr_console()
    message = scrub(one_line(message))
    target.print(
        f"leasehold: {message}", style=style, markup=False, highlight=False, soft_wrap=True
    )


def warn(message: str) -> None:
    say(f"warning: {message}", style="yellow")


def error(message: str) -> None:
    say(f"error: {message}", style="bold red")


def duration(seconds: float) -> str:
    """Short human duration: 0.4s, 12s, 3m 05s, 2h 01m, 3d 04h."""
    if math.isnan(seconds) or seconds < 0:
        seconds = 0.0
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def describe_holder(info: HolderInfo) -> str:
    return (
        f"{info.owner} (pid {info.pid} on {info.host}, fence {info.fence}) "
        f"for {duration(info.held_for)}, expires in {duration(info.expires_in)}"
    )


def describe_holders(holders: list[HolderInfo]) -> str:
    if not holders:
        return "no live holder right now (it was just released or expired)"
    return "held by " + "; ".join(describe_holder(info) for info in holders)


# -- global state and options ---------------------------------------------------------


@dataclass
class State:
    """Options that the group and every subcommand accept (the subcommand wins)."""

    url: str | None = None
    debug: bool = False


STATE = State()

F = TypeVar("F", bound=Callable[..., Any])


def _set_url(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    del ctx, param
    if value is not None:
        STATE.url = value


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    del ctx, param
    if value:
        STATE.debug = True
        configure_logging(debug=True)


URL_HELP = (
    "Store URL (sqlite:///file.db, redis://..., postgresql://..., etcd://...). "
    f"Default: ${ENV_URL}, else a SQLite file in the user's state directory. "
    "Passwords are never printed."
)


def common_options(func: F) -> F:
    """``--url`` and ``--debug``, accepted before or after the subcommand name."""
    func = click.option(
        "--debug",
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=_set_debug,
        help="Show tracebacks and leasehold's debug log on stderr.",
    )(func)
    func = click.option(
        "--url",
        metavar="URL",
        expose_value=False,
        callback=_set_url,
        help=URL_HELP,
    )(func)
    return func


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = scrub(record.getMessage())
        if record.levelno >= logging.ERROR:
            return f"leasehold: error: {message}"
        if record.levelno >= logging.WARNING:
            return f"leasehold: warning: {message}"
        return f"leasehold: {record.levelname.lower()}: {message}"


class _DebugFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(threadName)s %(name)s %(levelname)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))


_HANDLER: logging.Handler | None = None
_ROOT_HANDLER: logging.Handler | None = None


def configure_logging(*, debug: bool) -> None:
    """Library warnings (renewal failures, loss) as one ``leasehold: warning:`` line
    each; with --debug, everything with timestamps and tracebacks."""
    global _HANDLER, _ROOT_HANDLER
    # Drivers log too (psycopg's pool, for one): their records reach stderr only
    # with --debug; otherwise leasehold's own error line says what went wrong.
    root = logging.getLogger()
    if not any(isinstance(h, logging.NullHandler) for h in root.handlers):
        root.addHandler(logging.NullHandler())
    if debug and _ROOT_HANDLER is None:
        _ROOT_HANDLER = logging.StreamHandler(sys.stderr)
        _ROOT_HANDLER.setFormatter(_DebugFormatter())
        root.addHandler(_ROOT_HANDLER)
        root.setLevel(logging.DEBUG)
    logger = logging.getLogger("leasehold")
    if _HANDLER is not None:
        logger.removeHandler(_HANDLER)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_DebugFormatter() if debug else _Formatter())
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.WARNING)
    logger.propagate = False
    _HANDLER = handler


# -- arguments -----------------------------------------------------------------------


def checked(check: Callable[[Any], Any]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback applying one of leasehold's validators: the library's own
    message becomes click's "Invalid value for ..." usage error (exit 2)."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        del ctx
        if value is None:
            return None
        try:
            return check(value)
        except InvalidArgument as exc:
            raise click.BadParameter(str(exc), param=param) from None

    return callback


check_name = checked(validate.name)
check_ttl = checked(validate.ttl)


def _check_seconds(value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise InvalidArgument(f"expected a number of seconds >= 0, got {value!r}")
    return value


check_seconds = checked(_check_seconds)


def _check_exit_code(value: int) -> int:
    if not 0 <= value <= 255:
        raise InvalidArgument(f"an exit code is between 0 and 255, got {value}")
    return value


check_exit_code = checked(_check_exit_code)


# -- the client ------------------------------------------------------------------------


@contextmanager
def open_client(identity: str | None = None) -> Iterator[Client]:
    """The client on --url, else $LEASEHOLD_URL, else the default SQLite file."""
    url = STATE.url
    if url is not None and not url:
        raise InvalidArgument("--url must not be empty")
    client = Client(url, identity=identity)
    try:
        yield client
    finally:
        try:
            client.close()
        except LeaseholdError as exc:
            # Closing releases what is still held; failing that only delays expiry.
            warn(f"closing the store connection failed: {exc}")


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    raise CliError(message, code)


def terminal_stdin() -> bool:
    try:
        return os.isatty(sys.stdin.fileno())
    except (OSError, ValueError, AttributeError):
        return False
