"""``alsiron demo``: a simulated trial from scanner images to reports, on one machine.

It writes a phantom cohort (controls and ALS, several visits, two sites; the geometric
head, or with ``anatomy="template"`` one folded-cortex MNI152 anatomy per participant) as
BIDS, runs
every visit through :func:`alsiron.runs.qsm.run_qsm_subject` (maps, motor-cortex
indices, registry record), builds the normative model from the controls' baseline
visits, scores every visit against it, fits the longitudinal models and writes the HTML
reports — the same functions the individual commands call.  Last, it compares the ALS
− control difference and its yearly progression that the chain recovered with the ones
the simulation put in (:mod:`alsiron.sim.recovery`), in the console and the cohort page.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from alsiron.cohort.records import (
    HEADLINE_INDEX,
    PARTIAL_VOLUME_INDEX,
    TRANSFER_CORRECTED_INDEX,
)
from alsiron.cohort.registry import Registry, default_registry_path
from alsiron.errors import AlsironError, InputError
from alsiron.io.atomic import save_json
from alsiron.qsm.settings import QsmParameters
from alsiron.runs import qsm as pipeline
from alsiron.runs.group import run_group_stage
from alsiron.sim import phantom
from alsiron.sim import recovery as sim_recovery

log = logging.getLogger("alsiron")

#: Defaults sized so that the normative model has its minimum of 8 control participants
#: (a small reference, noted on every z) and the whole demo runs in a few minutes.
DEMO_SUBJECTS = 16
DEMO_SESSIONS = 3
DEMO_MATRIX = 64
DEMO_VOXEL_MM = 3.0
#: Anatomical participants: the coarsest voxel at which the deep precentral band is still
#: resolved, i.e. a perfect χ map averaged over the true deep labels keeps >= 0.8 of the
#: excess put in the fine-grid band (measured 0.79 at 3 mm, 0.83 at 2.5 mm, 0.86 at 2 mm);
#: the matrix covers the anatomical field of view (78 x 96 x 90 at 2.5 mm).
DEMO_TEMPLATE_VOXEL_MM = 2.5


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
    recovery : EffectRecovery or None
        Simulated against recovered ALS effect of the headline index (None when it could
        not be computed).
    recovery_path : Path or None
        The same as JSON (``effect_recovery.json``).
    recoveries : list of EffectRecovery
        ``recovery``, then the same for the partial-volume-corrected indices when the
        sessions have them (the phantoms' fine-grid labels are finer than the maps;
        :data:`alsiron.cohort.records.PARTIAL_VOLUME_INDEX` and
        :data:`~alsiron.cohort.records.TRANSFER_CORRECTED_INDEX`).
    seconds : dict
        Wall time [s] of ``simulate``, ``chain`` (maps + indices of every visit) and
        ``cohort`` (models, scores, reports).
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
    recovery: sim_recovery.EffectRecovery | None = None
    recovery_path: Path | None = None
    recoveries: list[sim_recovery.EffectRecovery] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def run_demo(out_dir: str | Path, *, subjects: int = DEMO_SUBJECTS,
             sessions: int = DEMO_SESSIONS, matrix: int | None = None,
             voxel_size: float | None = None, seed: int = 0, overwrite: bool = False,
             anatomy: str = "geometric", params: QsmParameters | None = None,
             shim: bool = True, say: Callable[[str], None] | None = None) -> DemoResult:
    """Simulate a small trial and run the whole alsiron chain on it.

    Parameters
    ----------
    out_dir : path
        The BIDS dataset is written here (derivatives under ``derivatives/alsiron``).
    subjects, sessions : int
        Participants (alternating control / ALS, random site of two) and visits each
        (about 6 months apart).
    matrix, voxel_size : int, float, or None
        Phantom grid (voxels per axis, mm).  None: 64³ of 3 mm for the geometric head;
        for the template head the anatomical field of view (192 × 240 × 224 mm) at
        :data:`DEMO_TEMPLATE_VOXEL_MM`.
    seed : int
        Same seed, same dataset and numbers.
    overwrite : bool
        Replace the files of an earlier demo in ``out_dir``.
    anatomy : {"geometric", "template"}
        The ellipsoid head, or the folded-cortex head of :mod:`alsiron.sim.anatomical`
        (one deformed MNI152 anatomy per participant, B0 shimmed).
    params : QsmParameters, optional
        The QSM chain's settings (default: its defaults).
    shim : bool
        Template heads: 2nd-order B0 shim over the brain before the phase is formed (the
        geometric head has none).
    say : callable, optional
        Receives one progress line per step.

    Returns
    -------
    DemoResult
    """
    tell = say or (lambda _line: None)
    root = Path(out_dir)
    if anatomy == "geometric":
        matrix = DEMO_MATRIX if matrix is None else matrix
        voxel_size = DEMO_VOXEL_MM if voxel_size is None else voxel_size
        grid = f"{matrix}^3 voxels of {voxel_size:g} mm"
    else:
        voxel_size = DEMO_TEMPLATE_VOXEL_MM if voxel_size is None else voxel_size
        grid = (f"{anatomy} anatomy, {voxel_size:g} mm voxels"
                + ("" if matrix is None else f", {matrix}^3"))
    tell(f"demo: simulating {subjects} participants x {sessions} visits ({grid}) in {root}")
    t0 = time.perf_counter()
    phantom.write_dataset(root, subjects=subjects, sessions=sessions, matrix=matrix,
                          voxel_size=voxel_size, seed=seed, overwrite=overwrite,
                          anatomy=anatomy, shim=shim)  # type: ignore[arg-type]
    seconds = {"simulate": time.perf_counter() - t0}
    t0 = time.perf_counter()
    derivs = root / "derivatives" / "alsiron"
    reg_path = default_registry_path(derivs)
    result = DemoResult(dataset=root, derivatives=derivs, registry=reg_path, seconds=seconds)
    options = pipeline.QsmRunOptions(registry=reg_path, overwrite=overwrite,
                                     params=params or QsmParameters())
    for subj in sorted(p for p in root.glob("sub-*") if p.is_dir()):
        for oc in pipeline.run_qsm_subject(subj, options):
            result.n_sessions += 1
            status = "indices failed" if oc.roi_error else f"QC {oc.record.qc_status}"
            tell(f"demo: {oc.label}: maps + indices in {oc.seconds + oc.roi_seconds:.1f} s "
                 f"({status})")

    seconds["chain"] = time.perf_counter() - t0
    t0 = time.perf_counter()
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
    _recovery(result, records, overwrite=overwrite, tell=tell)
    group = run_group_stage(records, derivs, source=str(reg_path), overwrite=overwrite,
                            say=lambda line: tell(f"demo: {line}"),
                            recovery=result.recoveries)
    result.model, result.visit_table = group.model, group.visit_table
    result.cohort_model, result.reports = group.cohort_model, group.reports
    result.notes += group.notes
    seconds["cohort"] = time.perf_counter() - t0
    tell("demo: wall time " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    if not records:
        raise InputError(reg_path, "the demo recorded no sessions")
    return result


def _effects_doc(found: sim_recovery.EffectRecovery) -> dict:
    return {"index": found.index, "tolerance": found.tolerance, "source": found.source,
            "n_als": found.n_als, "n_control": found.n_control,
            "n_sessions": found.n_sessions, "notes": found.notes,
            "effects": [{"name": e.name, "units": e.units, "simulated": e.simulated,
                         "recovered": e.recovered, "ratio": e.ratio, "passed": e.passed,
                         "ratio_interval_95": [v if math.isfinite(v) else None
                                               for v in e.interval], "decided": e.decided,
                         "truth_map": e.truth_map if math.isfinite(e.truth_map) else None,
                         "truth_map_ratio": e.truth_map_ratio
                         if math.isfinite(e.truth_map_ratio) else None}
                        for e in found.effects]}


#: Key in ``effect_recovery.json`` → corrected index compared there too.
_CORRECTED = {"partial_volume_corrected": PARTIAL_VOLUME_INDEX,
              "transfer_corrected": TRANSFER_CORRECTED_INDEX}


def _recovery(result: DemoResult, records: list, *, overwrite: bool,
              tell: Callable[[str], None]) -> None:
    """Simulated against recovered ALS effect, for the headline index and (where the
    sessions have them) the partial-volume-corrected one and its chain-transfer-corrected
    form: on ``result``, in ``effect_recovery.json`` (the headline's comparison, the others
    under ``"partial_volume_corrected"`` and ``"transfer_corrected"``) and one console
    line per effect."""
    try:
        simulated = sim_recovery.read_simulated_sessions(result.dataset)
        source = str(result.dataset / "derivatives" / "phantom")
        found = sim_recovery.effect_recovery(records, simulated, index=HEADLINE_INDEX,
                                             source=source)
        result.recoveries = [found]
        extra = {}
        for key, index in _CORRECTED.items():
            if any(index in r.indices for r in records):
                extra[key] = sim_recovery.effect_recovery(
                    records, simulated, index=index, source=source, truth_map=False)
                result.recoveries.append(extra[key])
    except AlsironError as exc:
        result.notes.append(f"simulated effect not compared: {exc}")
        return
    result.recovery = found
    result.recovery_path = result.derivatives / "effect_recovery.json"
    doc = _effects_doc(found)
    doc.update({key: _effects_doc(one) for key, one in extra.items()})
    save_json(result.recovery_path, doc, overwrite=overwrite)
    for one in result.recoveries:
        for line in one.lines():
            tell(f"demo: {line}")
