"""Command line: ``alsiron phantom``, ``demo``, ``import``, ``qsm``, ``relax``, ``roi``,
``registry export``, ``normative build``, ``report``, ``longitudinal``, ``power`` and the
BIDS App (``alsiron BIDS_DIR OUTPUT_DIR participant|group``, :mod:`.bidsapp`).

This module holds the command group (logging, ``--threads``) and the error handling; each
command group lives in its own module (:mod:`.sim`, :mod:`.qsm`, :mod:`.relax`,
:mod:`.roi`, :mod:`.registry`, :mod:`.cohort`, :mod:`.importer`), which only parses options, calls
:mod:`alsiron.runs` or the stage functions and prints.  Every
:class:`~alsiron.errors.AlsironError` (bad input, existing outputs, a damaged registry) is
printed as one line with a non-zero exit status; any other exception is a bug and keeps
its traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import threading

import click

from alsiron import __version__
from alsiron.cli import bidsapp, cohort, importer, qsm, registry, relax, roi, sim
from alsiron.errors import AlsironError

log = logging.getLogger("alsiron")

EXIT_INPUT_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process killed by SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so the interrupt path (temporary files removed,
    one line, a non-zero status) runs as for Ctrl-C."""


def _raise_terminated(signum: int, _frame: object) -> None:
    raise Terminated(f"signal {signum}")


def _was_terminated(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, Terminated):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _configure_threads(threads: int | None) -> None:
    n = threads
    if n is None and os.environ.get("ALSIRON_NUM_THREADS"):
        try:
            n = int(os.environ["ALSIRON_NUM_THREADS"])
        except ValueError:
            raise click.BadParameter("ALSIRON_NUM_THREADS must be an integer") from None
    if n is not None:
        if n < 1:
            raise click.BadParameter("--threads must be at least 1")
        from alsiron import _core

        if not _core.set_num_threads(n) and _core.num_threads() != n:
            log.warning("thread pool already running with %d threads; --threads %d ignored",
                        _core.num_threads(), n)


@click.group(cls=bidsapp.BidsAppGroup,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="alsiron")
@click.option("-v", "--verbose", is_flag=True, help="Log details of every step.")
@click.option("--debug", is_flag=True, help="Show Python tracebacks on errors.")
@click.option("--threads", type=int, default=None,
              help="Worker threads for the numerical core (default: all cores, or "
                   "ALSIRON_NUM_THREADS).")
@click.pass_context
def cli(ctx: click.Context, verbose: bool, debug: bool, threads: int | None) -> None:
    """alsiron: QSM and R2* iron maps of the motor cortex from multi-echo MRI.

    \b
    As a BIDS App: alsiron BIDS_DIR OUTPUT_DIR participant [--participant-label ...]
                   alsiron BIDS_DIR OUTPUT_DIR group
    (alsiron bids-app --help lists its options.)
    """
    ctx.obj = {"debug": debug}
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("alsiron: %(levelname)s: %(message)s"))
    root = logging.getLogger("alsiron")
    root.handlers[:] = [h for h in root.handlers if isinstance(h, logging.NullHandler)]
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    _configure_threads(threads)


for _command in (sim.phantom, sim.demo_cmd, qsm.qsm_cmd, relax.relax_cmd, roi.roi_cmd,
                 registry.registry_group, registry.normative_group, cohort.report_cmd,
                 cohort.longitudinal_cmd, cohort.power_cmd, importer.import_cmd,
                 bidsapp.bidsapp_cmd):
    cli.add_command(_command)


def main(args: list[str] | None = None) -> int:
    """Entry point; returns the exit status (also used by tests in-process).

    In the main thread SIGTERM is handled as Ctrl-C (exit status 143 instead of 130) while
    the command runs; the previous handler is restored on return.
    """
    if threading.current_thread() is not threading.main_thread():
        return _main(args)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _main(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(args: list[str] | None) -> int:
    debug = "--debug" in (args if args is not None else sys.argv[1:])
    try:
        cli.main(args=args, prog_name="alsiron", standalone_mode=False)
    except click.exceptions.Abort as exc:
        # click turns KeyboardInterrupt (and so SIGTERM) into Abort, keeping it as the cause.
        if _was_terminated(exc):
            click.echo("alsiron: terminated; no partial outputs were left", err=True)
            return EXIT_TERMINATED
        click.echo("alsiron: aborted", err=True)
        return EXIT_INTERRUPTED
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except KeyboardInterrupt as exc:
        if isinstance(exc, Terminated):
            click.echo("alsiron: terminated; no partial outputs were left", err=True)
            return EXIT_TERMINATED
        click.echo("alsiron: interrupted; no partial outputs were left", err=True)
        return EXIT_INTERRUPTED
    except AlsironError as exc:
        if debug:
            raise
        click.echo(f"alsiron: error: {exc}", err=True)
        return EXIT_INPUT_ERROR
    except OSError as exc:
        # The machine, not alsiron, refused: a full disk or a read-only or forbidden place
        # is the user's to fix, told in one line; any other OSError keeps its traceback.
        if debug or exc.errno not in _ENVIRONMENT_ERRNOS:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        click.echo(f"alsiron: error: {where}{exc.strerror or exc}", err=True)
        return EXIT_INPUT_ERROR
    return 0


#: OSError numbers that describe the machine (disk full, quota, read-only, permission).
_ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
                                 errno.EPERM})


def entry_point() -> None:
    """Console-script wrapper."""
    sys.exit(main())
