"""``alsiron import``: DICOM folder → de-identified BIDS dataset
(:func:`alsiron.runs.importer.import_dicom`)."""

from __future__ import annotations

from pathlib import Path

import click

from alsiron.runs.importer import import_dicom


@click.command("import")
@click.argument("dicom_dir", type=click.Path(path_type=Path))
@click.argument("bids_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--map", "map_path", type=click.Path(dir_okay=False, path_type=Path),
              required=True,
              help="ids.tsv: PatientID (or StudyInstanceUID) → participant_id, session_id "
                   "(tab-separated, BIDS style). Labels come only from this file.")
@click.option("--deface", is_flag=True,
              help="Zero the face in magnitude and T1w images (template registered to "
                   "each image; brain and skull are kept).")
@click.option("--overwrite", is_flag=True, help="Replace visit folders that exist.")
def import_cmd(dicom_dir: Path, bids_dir: Path, map_path: Path, deface: bool,
               overwrite: bool) -> None:
    """Convert DICOMs (dcm2niix) into BIDS sub-XX/ses-YY/anat MEGRE (magnitude + phase in
    radians per echo), MESE and T1w, de-identified; age at scan and sex go to
    participants.tsv / sessions.tsv."""
    visits = import_dicom(dicom_dir, bids_dir, map_path, deface=deface, overwrite=overwrite,
                          announce=lambda msg: click.echo(msg, err=True))
    for v in visits:
        click.echo(f"{v.folder}: {len(v.files)} images"
                   + (f", {len(v.skipped)} series skipped" if v.skipped else ""))
    click.echo(f"imported {len(visits)} visit(s) into {bids_dir}")
