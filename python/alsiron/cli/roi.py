"""``alsiron roi``: motor-cortex masks and indices from the maps of ``alsiron qsm``
(:func:`alsiron.runs.roi.run_roi_subject`), printing each visit's indices."""

from __future__ import annotations

from pathlib import Path

import click

from alsiron.cli._options import echo_roi, roi_options, with_roi_options
from alsiron.runs.roi import run_roi_subject


@click.command("roi")
@click.argument("subj_dir", type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Derivatives folder holding the maps and receiving the outputs (default: "
                   "<dataset>/derivatives/alsiron).")
@with_roi_options
@click.option("--no-qc", is_flag=True, help="Skip the QC montage PNG.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
def roi_cmd(subj_dir: Path, out: Path | None, labels: Path | None, lut: Path | None,
            atlas: str | None, t1w: Path | None, no_qc: bool, overwrite: bool) -> None:
    """Precentral masks and motor-cortex χ / R2* indices from the maps of `alsiron qsm`."""
    options = roi_options(labels, lut, atlas, not no_qc, t1w)
    for oc in run_roi_subject(subj_dir, options, out=out, overwrite=overwrite):
        echo_roi(oc.label, oc.indices, oc.written, oc.seconds)
