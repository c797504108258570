"""The ``leasehold`` group, and the one place where errors become exit codes."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Sequence

import click

from leasehold import __version__
from leasehold._errors import (
    InvalidArgument,
    LeaseholdError,
    StoreMisconfigured,
    StoreUnavailable,
)
from leasehold.cli import _common
from leasehold.cli._common import (
    EXIT_FAILURE,
    EXIT_INTERNAL,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    SIGNAL_BASE,
    CliError,
    common_options,
    error,
)
from leasehold.cli._supervise import Interrupted, signal_name
from leasehold.cli.brk import break_command
from leasehold.cli.demo import demo_command
from leasehold.cli.doctor import doctor_command
from leasehold.cli.exporter import exporter_command
from leasehold.cli.leader import leader_command
from leasehold.cli.ls import ls_command
from leasehold.cli.run import run_command
from leasehold.cli.top import top_command


@click.group(
    context_settings=_common.CONTEXT_SETTINGS,
    epilog=_common.exit_codes_epilog(
        (0, "success (run, leader: the command's own exit status)"),
        note="Each subcommand's --help lists its own codes.",
    ),
)
@common_options
@click.version_option(__version__, "-V", "--version", prog_name="leasehold")
def cli() -> None:
    """Race-free coordination of workers: leased locks with fencing tokens.

    \b
    Start here:
      leasehold demo                           see why locks need fencing (30 s)
      leasehold run nightly-report -- ./report.sh
                                               run a job on one machine at a time
      leasehold leader beat -- celery -A proj beat
                                               one active instance, others standing by
      leasehold ls                             what is held, by whom, for how long
      leasehold top                            the busiest names, live
      leasehold exporter                       the whole store on /metrics (Prometheus)
      leasehold doctor                         check the store
    """


# One module per subcommand; a new one is a module and an entry here.
for command in (
    run_command,
    leader_command,
    ls_command,
    break_command,
    doctor_command,
    demo_command,
    top_command,
    exporter_command,
):
    cli.add_command(command)


_NO_ARGS_IS_HELP: type[click.UsageError] = getattr(
    click.exceptions, "NoArgsIsHelpError", type("_Never", (click.UsageError,), {})
)


def _usage_line(exc: click.UsageError) -> str:
    """Click's multi-line usage error as one line that still points at --help."""
    message = exc.format_message()
    ctx = exc.ctx
    if ctx is None:
        return message
    return f"{message} (see '{ctx.command_path} --help')"


def run_main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status instead of exiting."""
    _common.STATE.url = None
    _common.STATE.debug = False
    _common.configure_logging(debug=False)
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        result = cli.main(args=args, prog_name="leasehold", standalone_mode=False)
    except click.UsageError as exc:
        if isinstance(exc, _NO_ARGS_IS_HELP) and exc.ctx is not None:
            # Plain `leasehold`: the help is the most useful answer (click >= 8.2).
            click.echo(exc.ctx.get_help(), err=True)
            return EXIT_USAGE
        error(_usage_line(exc))
        return EXIT_USAGE
    except click.Abort:
        error("aborted")
        return EXIT_FAILURE
    except click.ClickException as exc:
        error(exc.format_message())
        return exc.exit_code
    except CliError as exc:
        error(exc.message)
        return exc.code
    except InvalidArgument as exc:
        _debug_traceback()
        error(str(exc))
        return EXIT_USAGE
    except StoreMisconfigured as exc:
        _debug_traceback()
        error(f"store misconfigured (not retried): {exc}")
        return EXIT_UNAVAILABLE
    except StoreUnavailable as exc:
        _debug_traceback()
        error(f"store unavailable: {exc}")
        return EXIT_UNAVAILABLE
    except LeaseholdError as exc:
        _debug_traceback()
        error(str(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        error("interrupted")
        return SIGNAL_BASE + 2
    except Interrupted as exc:
        error(f"interrupted by {signal_name(exc.signum)}")
        return SIGNAL_BASE + exc.signum
    except BrokenPipeError:
        # `leasehold ls | head`: the reader left; nothing useful to say, and the
        # final flush of stdout at exit must not complain about it either.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE
    except Exception as exc:
        if _common.STATE.debug:
            _debug_traceback()
            error(f"internal error: {type(exc).__name__}: {exc}")
        else:
            error(
                f"internal error: {type(exc).__name__}: {exc} "
                "(re-run with --debug for the traceback, and please report it)"
            )
        return EXIT_INTERNAL
    if isinstance(result, int):
        return result
    return 0


def _debug_traceback() -> None:
    if _common.STATE.debug:
        sys.stderr.write(_common.scrub(traceback.format_exc()))
