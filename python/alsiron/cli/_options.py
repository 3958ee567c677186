"""Options and printers shared by several commands: ``--registry``, ``--normative``,
``--out FILE``, the motor-cortex (ROI) options, ``--mask-erode``'s parameter type,
step/iteration progress, the ROI summary, and method choices taken from the method
tables."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

import click

from alsiron.motor.atlas import BUNDLED_ATLASES
from alsiron.motor.indices import MotorCortexIndices, summary_lines
from alsiron.runs.roi import RoiOptions


def method_choice(table: Mapping[str, object] | tuple[str, ...],
                  first: str | None = None) -> click.Choice:
    """A ``click.Choice`` of a method table's keys, in the table's order (``first``, the
    default, moved to the front where the help has always listed it first)."""
    keys = list(table)
    if first is not None:
        keys.remove(first)
        keys.insert(0, first)
    return click.Choice(keys)


def progress(i: int, n: int, message: str) -> None:
    """Step callback of the map-making chain: ``[i+1/n] message`` on stderr."""
    click.echo(f"  [{i + 1}/{n}] {message}", err=True)


def iteration_progress(iteration: int, max_iter: int) -> None:
    """Solver-iteration callback: one line redrawn in place on a terminal."""
    # Redrawn in place on a terminal; silent in logs, where the step lines suffice.
    if sys.stderr.isatty():
        click.echo(f"\r        iteration {iteration}/{max_iter} (stops early when converged)",
                   err=True, nl=False)


def registry_option(func):
    """The ``--registry URL|PATH`` option shared by every command that reads or writes
    the results registry (default: ``$ALSIRON_REGISTRY``, else the dataset's
    ``derivatives/alsiron/registry.sqlite``); resolve it with
    :func:`alsiron.cohort.registry.resolve_location`."""
    return click.option(
        "--registry", "registry", default=None, metavar="URL|PATH",
        help="Results registry: an SQLite file or an SQLAlchemy URL (postgresql://...). "
             "Default: $ALSIRON_REGISTRY, else <dataset>/derivatives/alsiron/registry.sqlite.",
    )(func)


def normative_option(help: str):
    """The ``--normative FILE`` option: a normative model JSON
    (:func:`alsiron.cohort.normative.load_model`); ``help`` says what the command uses it
    for."""
    return click.option("--normative", "normative",
                        type=click.Path(dir_okay=False, path_type=Path), default=None,
                        help=help)


def out_file_option(help: str):
    """The ``--out FILE`` option of a command that writes one file (default None: the
    command's own location); ``help`` names the file and its default."""
    return click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path),
                        default=None, help=help)


_ROI_OPTIONS = [
    click.option("--labels", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="Label image (FreeSurfer aparc+aseg / aparc.a2009s, BIDS dseg, ...) "
                      "naming the precentral gyrus; resampled to the maps' grid."),
    click.option("--lut", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="Lookup table of --labels (dseg.tsv, CSV index,name or FreeSurfer "
                      "ColorLUT); default: FreeSurfer label values."),
    click.option("--atlas", type=click.Choice(list(BUNDLED_ATLASES)), default=None,
                 help="Register the bundled MNI template and warp this atlas (Harvard-Oxford "
                      "precentral gyrus or Juelich BA4a+BA4p). Default: a label image found "
                      "in the dataset's derivatives, else ho."),
    click.option("--t1w", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="T1w image for the atlas registration (default: the session's own "
                      "anat/*_T1w.nii[.gz] when present, else the GRE magnitude)."),
]


class MaskErosion(click.ParamType):
    """``--mask-erode``: "4", "4mm" or "4.5 mm" → ("mm", 4.0); "2vox" → ("vox", 2)."""

    name = "mask-erosion"

    def convert(self, value, param, ctx) -> tuple[str, float]:
        if isinstance(value, tuple):
            return value
        text = str(value).strip().lower().replace(" ", "")
        unit = "vox" if text.endswith("vox") else "mm"
        number = text.removesuffix("vox").removesuffix("mm")
        try:
            amount = float(number)
        except ValueError:
            self.fail(f"{value!r} is not a depth in mm (e.g. 4 or 4mm) or a voxel count "
                      "(e.g. 2vox)", param, ctx)
        if not (amount >= 0 and amount < float("inf")):
            self.fail(f"{value!r}: the erosion must be >= 0", param, ctx)
        if unit == "vox" and (amount != int(amount) or amount > 10):
            self.fail(f"{value!r}: a voxel erosion is a whole number of voxels, 0-10",
                      param, ctx)
        if unit == "mm" and amount > 30:
            self.fail(f"{value!r}: an erosion deeper than 30 mm leaves no cortex", param, ctx)
        return unit, amount


def with_roi_options(func):
    """The label-image / atlas options of the motor-cortex stage (``alsiron qsm``, ``roi``);
    turn them into :class:`~alsiron.runs.roi.RoiOptions` with :func:`roi_options`."""
    for option in reversed(_ROI_OPTIONS):
        func = option(func)
    return func


def roi_options(labels: Path | None, lut: Path | None, atlas: str | None, qc: bool,
                t1w: Path | None = None) -> RoiOptions:
    """:class:`~alsiron.runs.roi.RoiOptions` from the ROI options, refusing combinations
    that make no sense (``--lut`` without ``--labels``, ``--labels`` with ``--atlas``)."""
    if lut is not None and labels is None:
        raise click.UsageError("--lut needs --labels")
    if labels is not None and atlas is not None:
        raise click.UsageError("give either --labels or --atlas, not both")
    if t1w is not None and labels is not None:
        raise click.UsageError("--t1w is for the atlas route; drop it or --labels")
    return RoiOptions(labels=labels, lut=lut, atlas=atlas, t1w=t1w, qc=qc)


def echo_roi(label: str, result: MotorCortexIndices, written: list[Path],
             elapsed: float) -> None:
    """Print one visit's motor-cortex summary: route, files, time [s], then the indices."""
    click.echo(f"{label}: motor-cortex indices ({result.parameters['Masks'].get('Route')} "
               f"route), {len(written)} files in {elapsed:.1f} s")
    for line in summary_lines(result):
        click.echo(line)
