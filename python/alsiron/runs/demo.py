"""``alsiron demo``: a simulated trial from scanner images to reports, on one machine.

It writes a phantom cohort (controls and ALS, several visits, two sites) as BIDS, runs
every visit through :func:`alsiron.runs.qsm.run_qsm_subject` (maps, motor-cortex
indices, registry record), builds the normative model from the controls' baseline
visits, scores every visit against it, fits the longitudinal models and writes the HTML
reports — the same functions the individual commands call.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from alsiron.cohort.records import HEADLINE_INDEX
from alsiron.cohort.registry import Registry, default_registry_path
from alsiron.errors import InputError
from alsiron.runs import qsm as pipeline
from alsiron.runs.group import run_group_stage
from alsiron.sim import phantom

log = logging.getLogger("alsiron")

#: Defaults sized so that the normative model has its minimum of 8 control participants
#: (a small reference, noted on every z) and the whole demo runs in a few minutes.
DEMO_SUBJECTS = 16
DEMO_SESSIONS = 3
DEMO_MATRIX = 64
DEMO_VOXEL_MM = 3.0


@dataclass
class DemoResult:
    """Where the demo put things.

    Attributes
    ----------
    dataset : Path
        The simulated BIDS dataset.
    derivatives : Path
        ``<dataset>/derivatives/alsiron``: maps, indices, QC, registry, model, reports.
    registry : Path
    model : Path or None
        Normative model JSON (None when it could not be built; ``notes`` says why).
    visit_table : Path
        Per-visit longitudinal table (TSV).
    cohort_model : Path or None
        Mixed-model summary (JSON).
    reports : list of Path
        Subject pages, then the cohort page.
    n_sessions : int
    notes : list of str
        What could not be done, one line each.
    """

    dataset: Path
    derivatives: Path
    registry: Path
    model: Path | None = None
    visit_table: Path | None = None
    cohort_model: Path | None = None
    reports: list[Path] = field(default_factory=list)
    n_sessions: int = 0
    notes: list[str] = field(default_factory=list)


def run_demo(out_dir: str | Path, *, subjects: int = DEMO_SUBJECTS,
             sessions: int = DEMO_SESSIONS, matrix: int = DEMO_MATRIX,
             voxel_size: float = DEMO_VOXEL_MM, seed: int = 0, overwrite: bool = False,
             say: Callable[[str], None] | None = None) -> DemoResult:
    """Simulate a small trial and run the whole alsiron chain on it.

    Parameters
    ----------
    out_dir : path
        The BIDS dataset is written here (derivatives under ``derivatives/alsiron``).
    subjects, sessions : int
        Participants (alternating control / ALS, random site of two) and visits each
        (about 6 months apart).
    matrix, voxel_size : int, float
        Phantom grid (voxels per axis, mm).
    seed : int
        Same seed, same dataset and numbers.
    overwrite : bool
        Replace the files of an earlier demo in ``out_dir``.
    say : callable, optional
        Receives one progress line per step.

    Returns
    -------
    DemoResult
    """
    tell = say or (lambda _line: None)
    root = Path(out_dir)
    tell(f"demo: simulating {subjects} participants x {sessions} visits "
         f"({matrix}^3 voxels of {voxel_size:g} mm) in {root}")
    phantom.write_dataset(root, subjects=subjects, sessions=sessions, matrix=matrix,
                          voxel_size=voxel_size, seed=seed, overwrite=overwrite)
    derivs = root / "derivatives" / "alsiron"
    reg_path = default_registry_path(derivs)
    result = DemoResult(dataset=root, derivatives=derivs, registry=reg_path)
    options = pipeline.QsmRunOptions(registry=reg_path, overwrite=overwrite)
    for subj in sorted(p for p in root.glob("sub-*") if p.is_dir()):
        for oc in pipeline.run_qsm_subject(subj, options):
            result.n_sessions += 1
            status = "indices failed" if oc.roi_error else f"QC {oc.record.qc_status}"
            tell(f"demo: {oc.label}: maps + indices in {oc.seconds + oc.roi_seconds:.1f} s "
                 f"({status})")

    with Registry.open(reg_path) as reg:
        records = reg.sessions()
    baseline = {}
    for rec in records:
        if rec.session == "ses-01" and rec.run == 1 and HEADLINE_INDEX in rec.indices:
            baseline.setdefault(rec.group, []).append(rec.indices[HEADLINE_INDEX])
    if {"ALS", "control"} <= baseline.keys():
        gap = 1000.0 * (statistics.fmean(baseline["ALS"]) - statistics.fmean(baseline["control"]))
        tell(f"demo: baseline {HEADLINE_INDEX}, ALS - control = {gap:+.1f} ppb "
             f"({len(baseline['ALS'])} vs {len(baseline['control'])} participants)")
    group = run_group_stage(records, derivs, source=str(reg_path), overwrite=overwrite,
                            say=lambda line: tell(f"demo: {line}"))
    result.model, result.visit_table = group.model, group.visit_table
    result.cohort_model, result.reports = group.cohort_model, group.reports
    result.notes += group.notes
    if not records:
        raise InputError(reg_path, "the demo recorded no sessions")
    return result
