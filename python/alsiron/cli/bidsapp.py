"""The BIDS-App command line, ``alsiron BIDS_DIR OUTPUT_DIR participant|group`` (as fMRIPrep,
MRIQC and QSMxT take it), and the command group that sends a first argument that is not a
subcommand to it (:class:`BidsAppGroup`).  The work is in :mod:`alsiron.runs.bidsapp`
(visits, resume, group stage) and :mod:`alsiron.runs.batch` (dask)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from alsiron.cli._options import method_choice, registry_option
from alsiron.errors import AlsironError
from alsiron.motor.atlas import BUNDLED_ATLASES
from alsiron.qsm.chain import BFR_METHODS
from alsiron.qsm.inversion import INVERSION_METHODS

LEVELS = ("participant", "group")
#: Options that take several values after one flag (``--participant-label 01 02``).
_VARIADIC = ("--participant-label", "--session-label")


def spread_variadic(args: list[str]) -> list[str]:
    """``--participant-label 01 02 --x`` → ``--participant-label 01 --participant-label 02
    --x``: the BIDS-App form of a list option, in click's repeated-option form."""
    out: list[str] = []
    current = None
    for arg in args:
        if arg in _VARIADIC:
            current = arg
            continue
        if current is not None and not arg.startswith("-"):
            out += [current, arg]
            continue
        current = None
        out.append(arg)
    return out


class BidsAppCommand(click.Command):
    """A click command that accepts the BIDS-App list options."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, spread_variadic(args))


class BidsAppGroup(click.Group):
    """The ``alsiron`` group: a subcommand as usual, or, when the first argument is not
    one (a dataset path, or followed by a level), the BIDS-App command."""

    def resolve_command(self, ctx: click.Context, args: list[str]):
        first = args[0] if args else ""
        if (first and not first.startswith("-") and self.get_command(ctx, first) is None
                and (Path(first).exists() or (len(args) > 2 and args[2] in LEVELS))):
            return "bids-app", self.get_command(ctx, "bids-app"), args
        return super().resolve_command(ctx, args)


def _progress_printer():
    """A progress callback: tqdm's bar (with ETA) when tqdm is installed and stderr is a
    terminal, else one line per visit with the elapsed time and the ETA from the mean
    time per visit so far."""
    import sys

    t0 = time.perf_counter()
    state: dict = {}
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    use_bar = tqdm is not None and sys.stderr.isatty()

    def report(res, done: int, total: int) -> None:
        if use_bar:
            bar = state.get("bar") or state.setdefault(
                "bar", tqdm(total=total, unit="visit", file=sys.stderr))
            bar.set_postfix_str(f"{res.label} {res.status}")
            bar.update(1)
            if done == total:
                bar.close()
            return
        elapsed = time.perf_counter() - t0
        eta = elapsed / done * (total - done)
        click.echo(f"[{done}/{total}] {res.label}: {res.status}"
                   f"{' (' + res.reason + ')' if res.status == 'failed' else ''}; "
                   f"elapsed {elapsed:.0f} s, ETA {eta:.0f} s", err=True)

    return report


def echo_table(summary) -> None:
    """The final table: one row per visit (status, seconds, reason), then the counts."""
    width = max((len(r.label) for r in summary.results), default=5)
    click.echo(f"{'visit':<{width}}  {'status':<7}  {'seconds':>7}  reason")
    for r in summary.results:
        click.echo(f"{r.label:<{width}}  {r.status:<7}  {r.seconds:>7.1f}  {r.reason}")
    click.echo(f"{summary.count('done')} done, {summary.count('skipped')} skipped, "
               f"{summary.count('failed')} failed in {summary.seconds:.1f} s ({summary.where})")


@click.command("bids-app", cls=BidsAppCommand)
@click.argument("bids_dir", type=click.Path(path_type=Path))
@click.argument("output_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("level", type=click.Choice(LEVELS))
@click.option("--participant-label", "participant_labels", multiple=True, metavar="LABEL ...",
              help="Participants to process (01 or sub-01; several after one flag). "
                   "Default: all.")
@click.option("--session-label", "session_labels", multiple=True, metavar="LABEL ...",
              help="Sessions to process (01 or ses-01). Default: all.")
@registry_option
@click.option("--inversion", type=method_choice(INVERSION_METHODS), default=None,
              help="Dipole inversion (default: as alsiron qsm).")
@click.option("--bfr", type=method_choice(BFR_METHODS), default=None,
              help="Background-field removal (default: as alsiron qsm).")
@click.option("--atlas", type=click.Choice(list(BUNDLED_ATLASES)), default=None,
              help="Force the atlas route of the motor-cortex masks (as alsiron qsm).")
@click.option("--no-indices", is_flag=True, help="Skip the motor-cortex masks and indices.")
@click.option("--no-relax", is_flag=True, help="Skip relaxometry of visits with a MESE series.")
@click.option("--scheduler", default=None, metavar="tcp://HOST:PORT",
              help="Run on a running dask scheduler (needs a PostgreSQL --registry).")
@click.option("--slurm", "jobqueue", flag_value="slurm", default=None,
              help="Run the workers as SLURM jobs (dask-jobqueue; needs a PostgreSQL "
                   "--registry).")
@click.option("--pbs", "jobqueue", flag_value="pbs", help="Run the workers as PBS jobs.")
@click.option("--serial", is_flag=True, help="Run the visits one after the other in this "
                                             "process (no dask).")
@click.option("--workers", type=click.IntRange(1, 10000), default=None,
              help="Worker processes (local: default from cores and memory) or jobs "
                   "(SLURM/PBS, default 1).")
@click.option("--worker-memory", default=None, metavar="SIZE",
              help="Memory per worker, e.g. 8GB (local default: the machine's share; "
                   "SLURM/PBS default 4 GiB).")
@click.option("--job-cores", type=click.IntRange(1, 1024), default=4, show_default=True,
              help="Cores per SLURM/PBS job.")
@click.option("--queue", default=None, help="SLURM partition or PBS queue.")
@click.option("--account", default=None, help="SLURM/PBS account (project) to charge.")
@click.option("--walltime", default=None, metavar="HH:MM:SS",
              help="Wall time per SLURM/PBS job (default 04:00:00).")
@click.option("--retries", type=click.IntRange(0, 10), default=2, show_default=True,
              help="Extra attempts of a visit whose worker died.")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Skip visits complete with the same inputs and settings (SHA-256).")
@click.option("--overwrite", is_flag=True,
              help="Recompute visits finished earlier with other inputs or settings "
                   "(participant) / replace the group outputs (group).")
def bidsapp_cmd(bids_dir: Path, output_dir: Path, level: str,
                participant_labels: tuple[str, ...], session_labels: tuple[str, ...],
                registry: str | None, inversion: str | None, bfr: str | None,
                atlas: str | None, no_indices: bool, no_relax: bool, scheduler: str | None,
                jobqueue: str | None, serial: bool, workers: int | None,
                worker_memory: str | None, job_cores: int, queue: str | None,
                account: str | None, walltime: str | None, retries: int, resume: bool,
                overwrite: bool) -> None:
    """BIDS-App: alsiron BIDS_DIR OUTPUT_DIR participant|group [OPTIONS].

    participant: every visit of the dataset (QSM, relaxometry when a MESE series is
    there, motor-cortex indices, registry record), one dask task per visit, skipping
    visits already complete.  group: normative model, z-scores, longitudinal models and
    reports from the registry.
    """
    from alsiron.runs import bidsapp

    if level == "group":
        result = bidsapp.run_group_level(output_dir, registry=registry, overwrite=overwrite,
                                         say=click.echo)
        for note in result.notes:
            click.echo(f"alsiron: warning: {note}", err=True)
        return
    options = _participant_options(inversion, bfr, atlas, no_indices, no_relax, registry,
                                   resume, overwrite)
    batch = _batch_options(scheduler, jobqueue, serial, workers, worker_memory, job_cores,
                           queue, account, walltime, retries)
    summary = bidsapp.run_participant_level(bids_dir, output_dir, options, batch,
                                            participant_labels=participant_labels,
                                            session_labels=session_labels,
                                            progress=_progress_printer())
    echo_table(summary)
    failed = summary.count("failed")
    if failed:
        raise AlsironError(f"{failed} of {len(summary.results)} visits failed (reasons above; "
                           f"log in {output_dir / 'logs'})")


def _participant_options(inversion: str | None, bfr: str | None, atlas: str | None,
                         no_indices: bool, no_relax: bool, registry: str | None, resume: bool,
                         overwrite: bool):
    """:class:`~alsiron.runs.bidsapp.ParticipantOptions` from the command's options."""
    from alsiron.cli.qsm import qsm_parameters
    from alsiron.relax.chain import RelaxParameters
    from alsiron.runs.bidsapp import ParticipantOptions
    from alsiron.runs.roi import RoiOptions

    params = qsm_parameters(inversion=inversion, weak_harmonic=False, bfr=bfr,
                            unwrapping=None, brain_mask_method=None, bet_f=None,
                            mask_path=None, mask_erode=None, phase_quality_threshold=None)
    return ParticipantOptions(params=params, roi=None if no_indices else RoiOptions(atlas=atlas),
                              relax=None if no_relax else RelaxParameters(),
                              registry=registry, resume=resume, overwrite=overwrite)


def _batch_options(scheduler: str | None, jobqueue: str | None, serial: bool,
                   workers: int | None, worker_memory: str | None, job_cores: int,
                   queue: str | None, account: str | None, walltime: str | None,
                   retries: int):
    """:class:`~alsiron.runs.batch.BatchOptions` from the command's options, refusing
    more than one place to run."""
    from alsiron.runs.batch import BatchOptions

    chosen = [name for name, on in (("--scheduler", scheduler), ("--slurm/--pbs", jobqueue),
                                    ("--serial", serial)) if on]
    if len(chosen) > 1:
        raise click.UsageError(f"give one of {', '.join(chosen)}")
    memory = None
    if worker_memory is not None:
        from dask.utils import parse_bytes

        try:
            memory = parse_bytes(worker_memory)
        except ValueError:
            raise click.BadParameter(f"{worker_memory!r} is not a size such as 8GB",
                                     param_hint="--worker-memory") from None
    backend = ("scheduler" if scheduler else jobqueue if jobqueue else
               "serial" if serial else "local")
    return BatchOptions(backend=backend, scheduler=scheduler, workers=workers,
                        memory_per_worker=memory, retries=retries, queue=queue,
                        account=account, walltime=walltime, job_cores=job_cores)
