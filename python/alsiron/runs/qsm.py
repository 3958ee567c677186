"""One subject through the whole per-visit chain: maps → motor-cortex indices → registry
record → z-scores.

This is what ``alsiron qsm SUBJ_DIR`` runs and what ``alsiron demo`` runs per subject;
the CLI only parses options into :class:`QsmRunOptions` and prints the
:class:`SessionOutcome` objects as they come.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import alsiron
from alsiron.cohort.records import SessionRecord
from alsiron.errors import AlsironError
from alsiron.io import bids as ingest
from alsiron.io import derivatives
from alsiron.io.tables import visit_info
from alsiron.io.transaction import (
    RegistryHook,
    VisitTransaction,
    check_disk_space,
    interrupt_point,
)
from alsiron.qsm import chain as workflow
from alsiron.qsm import transfer
from alsiron.runs import roi as roi_workflow
from alsiron.runs.outcome import VisitOutcome
from alsiron.volume import MegreSeries

log = logging.getLogger("alsiron")


@dataclass
class QsmRunOptions:
    """Every choice of an ``alsiron qsm`` run.

    Attributes
    ----------
    params : QsmParameters
        Algorithms and parameters of the map-making chain.
    echo_times : list of float, optional
        Echo times [s] overriding the sidecars.
    field_strength : float, optional
        B0 [T] overriding the sidecars.
    fill_nonfinite, negate_phase, phase_unwrapped : bool
        Input handling, as the CLI options of the same names.
    mask_path, reference_mask, fieldmap_path : path, optional
        User brain mask, reference region (with ``reference_label``) and total field map.
    roi : RoiOptions or None
        Motor-cortex masks and indices; None skips them.
    registry : str or path or None
        Results registry location (SQLite file or SQLAlchemy URL); None: ``$ALSIRON_REGISTRY``
        or the default file beside the derivatives.
    record : bool
        Write each session's record to the registry.
    normative : path, optional
        Normative model JSON: z-scores per session (printed and stored beside the indices).
    overwrite : bool
        Replace existing outputs.
    """

    params: workflow.QsmParameters = field(default_factory=workflow.QsmParameters)
    echo_times: list[float] | None = None
    field_strength: float | None = None
    fill_nonfinite: bool = False
    negate_phase: bool = False
    phase_unwrapped: bool = False
    mask_path: Path | None = None
    reference_mask: Path | None = None
    reference_label: int | None = None
    fieldmap_path: Path | None = None
    roi: roi_workflow.RoiOptions | None = field(default_factory=roi_workflow.RoiOptions)
    registry: str | Path | None = None
    record: bool = True
    normative: Path | None = None
    overwrite: bool = False


@dataclass(kw_only=True)
class SessionOutcome(VisitOutcome):
    """What one MEGRE series of one visit produced: the fields of
    :class:`~alsiron.runs.outcome.VisitOutcome` (``written``: the map files; ``seconds``:
    wall time of the map-making chain) and

    Attributes
    ----------
    series : MegreSeries
    result : SessionResult
        The maps.
    dataset_root : Path
        BIDS dataset the series came from.
    entities : dict
        BIDS entities of the series (``sub``, ``ses``, ...).
    indices : MotorCortexIndices or None
        None when skipped or failed (then ``roi_error`` says why).
    roi_written : list of Path
    roi_seconds : float
        Wall time of the motor-cortex stage.
    roi_error : str or None
    record : SessionRecord or None
        The registry record (None when not recorded).
    registry : str or None
        Where the record went.
    zscores : dict
        Index → :class:`alsiron.cohort.normative.ZScore` (empty without a model).
    zscore_text : str
        Printable z-score table, or how to build a model.
    """

    series: MegreSeries
    result: workflow.SessionResult
    dataset_root: Path
    entities: dict[str, str]
    indices: Any = None
    roi_written: list[Path] = field(default_factory=list)
    roi_seconds: float = 0.0
    roi_error: str | None = None
    record: SessionRecord | None = None
    registry: str | None = None
    zscores: dict[str, Any] = field(default_factory=dict)
    zscore_text: str = ""


def zscore_path(out_root: Path, entities: dict[str, str]) -> Path:
    """Where a session's z-scores are stored (JSON beside the indices)."""
    return derivatives.OutputPlan(out_root, entities).add_file("zscores", roi_workflow.DESC,
                                                                ".json")


def visit_record(entities: dict[str, str], dataset_root: Path) -> SessionRecord:
    """The part of a visit's registry record known before any image is read: who, which
    visit, and the visit metadata of ``participants.tsv``/``sessions.tsv``
    (:func:`alsiron.io.tables.visit_info`, which refuses malformed tables)."""
    subject = f"sub-{entities['sub']}"
    session = f"ses-{entities['ses']}" if entities.get("ses") else ""
    run = int(entities["run"]) if entities.get("run", "").isdigit() else 1
    info = visit_info(dataset_root, subject, session)
    # A dataset without session folders has one visit; the registry key needs a label.
    return SessionRecord(
        subject=subject, session=session or "n/a", run=run, acq_time=info.acq_time,
        years_since_baseline=info.years_since_baseline, site=info.site, group=info.group,
        sex=info.sex, age=info.age, software_version=alsiron.__version__)


def session_record(series: MegreSeries, entities: dict[str, str], dataset_root: Path,
                   provenance: dict[str, Any], *,
                   checksums: dict[str, str] | None = None) -> SessionRecord:
    """The registry record of one series, before indices: who, when, where, inputs.

    Visit metadata come from ``participants.tsv``/``sessions.tsv``
    (:func:`visit_record`); input checksums are SHA-256 of the magnitude and phase
    files, keyed relative to the dataset (``checksums`` when the caller has them
    already).  The sidecars' ``InputChecksums`` are left out of the record's parameters:
    the record holds them in ``input_checksums``.
    """
    from alsiron.cohort.registry import input_checksums

    record = visit_record(entities, dataset_root)
    record.field_strength_t = float(series.field_strength)
    record.input_checksums = (input_checksums(series.sources, dataset_root)
                              if checksums is None else checksums)
    record.parameters = {"qsm": {k: v for k, v in provenance.items()
                                 if k != "InputChecksums"}}
    return record


def plan_outputs(out_root: Path, entities: dict[str, str],
                 opts: QsmRunOptions) -> derivatives.OutputPlan:
    """Every file one series' run writes: the maps of :data:`alsiron.qsm.chain.OUTPUT_NAMES`
    (with sidecars), the z-scores (with ``normative``) and the motor-cortex outputs (with
    ``roi``), in checking order."""
    plan = derivatives.OutputPlan(out_root, entities)
    plan.add_maps(workflow.OUTPUT_NAMES)
    if opts.normative is not None:
        plan.add_file("zscores", roi_workflow.DESC, ".json")
    if opts.roi is not None:
        roi_workflow.plan_outputs(plan)
    return plan


def run_qsm_subject(
    subj_dir: str | Path,
    options: QsmRunOptions | None = None,
    *,
    out: str | Path | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    iteration_progress: Callable[[int, int], None] | None = None,
    announce: Callable[[str], None] | None = None,
) -> Iterator[SessionOutcome]:
    """Process every MEGRE series of every session of a subject, one at a time.

    Parameters
    ----------
    subj_dir : path
        BIDS ``sub-XX/`` or ``sub-XX/ses-YY/`` folder.
    options : QsmRunOptions, optional
    out : path, optional
        Derivatives folder (default ``<dataset>/derivatives/alsiron``).
    progress, iteration_progress : callable, optional
        Step and solver-iteration callbacks (see :func:`alsiron.qsm.chain.process_series`).
    announce : callable, optional
        Receives one-line status messages ("loading 6 echoes").

    Yields
    ------
    SessionOutcome
        As each series finishes: its maps, indices, z-scores and record were published
        together (:class:`alsiron.io.transaction.VisitTransaction`).

    Raises
    ------
    InputError, OutputExistsError, OutputWriteError, RegistryError, ValueError
        Bad input or tables, a registry that cannot hold the record, outputs that exist
        without ``overwrite``, or too little disk space: raised before computing.  Any
        error or interrupt later leaves the series' previous outputs and record as they
        were.  A failure of the motor-cortex stage does not raise: the maps are
        published, the outcome's ``roi_error`` says why and the record is marked
        ``qc_status="fail"``.
    """
    opts = options or QsmRunOptions()
    say = announce or (lambda _msg: None)
    sessions = ingest.find_sessions(subj_dir)
    root = ingest.dataset_root(subj_dir)
    out_root = derivatives.derivatives_root(root, out)
    registry = registry_location = None
    if opts.record:
        from alsiron.cohort.registry import (
            REGISTRY_ENV,
            Registry,
            default_registry_path,
            resolve_location,
        )

        if opts.registry is not None or os.environ.get(REGISTRY_ENV):
            registry_location = resolve_location(opts.registry)
        else:
            registry_location = default_registry_path(out_root)
        # Opened once for the subject (its integrity check is not free), and before any
        # map is made, so a damaged or newer-schema registry stops the run up front.
        registry = Registry.open(registry_location)
    try:
        for ses in sessions:
            for files in ses.series:
                yield _run_series(files, ses, opts, root, out_root, registry,
                                  progress=progress, iteration_progress=iteration_progress,
                                  say=say)
    finally:
        if registry is not None:
            registry.close()


def _registry_hook(registry: Any, record: SessionRecord) -> RegistryHook:
    """How a visit's transaction stores ``record`` in ``registry`` (and finds it again)."""
    from alsiron.cohort.registry import display_location

    def store(outputs: dict[str, Any]) -> None:
        record.parameters["outputs"] = outputs
        registry.record_session(record)

    def recorded(key: tuple[str, str, int], txn: str) -> bool:
        return registry.has_transaction(*key, txn)

    return RegistryHook(name=display_location(registry.location),
                        key=(record.subject, record.session, record.run),
                        record=store, recorded=recorded)


def _user_inputs(opts: QsmRunOptions, series: MegreSeries, root: Path
                 ) -> tuple[Any, Any, Any, workflow.InputSources]:
    """The brain mask, reference region and field map given in place of chain steps,
    loaded onto the series' grid, and their sources (relative to the dataset)."""
    user_mask = ref_region = user_field = None
    sources: dict[str, str] = {}
    if opts.mask_path is not None:
        user_mask = ingest.load_mask(opts.mask_path, series)
        sources["brain_mask"] = derivatives.dataset_relative(opts.mask_path, root)
    if opts.reference_mask is not None:
        ref_region = ingest.load_mask(opts.reference_mask, series, label=opts.reference_label)
        ref = derivatives.dataset_relative(opts.reference_mask, root)
        sources["reference"] = (ref if opts.reference_label is None
                                else f"{ref} label {opts.reference_label}")
    if opts.fieldmap_path is not None:
        user_field = ingest.load_fieldmap(opts.fieldmap_path, series)
        sources["field_map"] = derivatives.dataset_relative(opts.fieldmap_path, root)
    return user_mask, ref_region, user_field, workflow.InputSources(**sources)


#: Chain step index → named stage of :func:`alsiron.io.transaction.interrupt_point`.
_CHAIN_STAGES = {1: "field fit", 3: "inversion"}


def _run_series(files: Any, ses: Any, opts: QsmRunOptions, root: Path, out_root: Path,
                registry: Any, *, progress: Callable[[int, int, str], None] | None,
                iteration_progress: Callable[[int, int], None] | None,
                say: Callable[[str], None]) -> SessionOutcome:
    """One series: validate, compute, stage, then publish and record as one transaction
    (:class:`alsiron.io.transaction.VisitTransaction`)."""
    from alsiron.cohort.registry import display_location, input_checksums

    label = files.prefix
    plan = plan_outputs(out_root, dict(files.entities), opts)
    # Every file qsm can write for the visit: what the new set replaces.
    every = plan_outputs(out_root, dict(files.entities),
                         QsmRunOptions(roi=roi_workflow.RoiOptions(), normative=Path("-")))
    # Validate the visit's tables and the registry before any image is read.
    early = visit_record(plan.entities, root)
    if registry is not None:
        registry.check_record(early)
    hook = _registry_hook(registry, early) if registry is not None else None
    with VisitTransaction.begin(plan, replaces=every, overwrite=opts.overwrite,
                                registry=hook) as txn:
        interrupt_point("load")
        say(f"{label}: loading {len(files.echoes)} echoes")
        series = ingest.load_megre(files, subject=ses.subject, session=ses.session,
                                   echo_times=opts.echo_times,
                                   field_strength=opts.field_strength,
                                   fill_nonfinite=opts.fill_nonfinite,
                                   negate_phase=opts.negate_phase,
                                   phase_unwrapped=opts.phase_unwrapped)
        user_mask, ref_region, user_field, sources = _user_inputs(opts, series, root)
        check_disk_space(plan, int(series.magnitude[0].size))

        def chain_progress(i: int, n: int, message: str) -> None:
            if progress is not None:
                progress(i, n, message)
            interrupt_point(_CHAIN_STAGES.get(i, ""))

        t0 = time.perf_counter()
        result = workflow.process_series(series, opts.params, brain_mask=user_mask,
                                         reference_mask=ref_region,
                                         phase_unwrapped=opts.phase_unwrapped,
                                         total_field_ppm=user_field, input_sources=sources,
                                         progress=chain_progress,
                                         iteration_progress=iteration_progress)
        series_sums = input_checksums(series.sources, root)
        given = [Path(p) for p in (opts.mask_path, opts.reference_mask,
                                   opts.fieldmap_path) if p is not None]
        result.provenance.update(derivatives.input_provenance(
            series.sources, root, {**series_sums, **input_checksums(given, root)}))
        written = derivatives.write_maps(txn.staged, result.derivative_maps(),
                                         result.provenance, overwrite=True)
        interrupt_point("writing")
        outcome = SessionOutcome(
            label=label, out_root=out_root, series=series, result=result,
            written=txn.final_paths(written), seconds=time.perf_counter() - t0,
            dataset_root=root, entities=plan.entities)
        record = session_record(series, plan.entities, root, result.provenance,
                                checksums=series_sums)
        if opts.roi is not None:
            response = None
            if opts.roi.chain_transfer:
                # The magnitude is not perturbed, so the brain mask would come out the
                # same: the rerun takes it as given instead of recomputing it.
                response = transfer.chain_response(
                    series, workflow.process_series, params=opts.params,
                    brain_mask=user_mask if user_mask is not None
                    else result.brain_mask.data > 0, reference_mask=ref_region,
                    phase_unwrapped=opts.phase_unwrapped, total_field_ppm=user_field,
                    input_sources=sources)
            _roi_stage(txn, outcome, record, opts, root, response)
        outcome.record = record
        if opts.normative is not None and record.indices:
            from alsiron.cohort.normative import score_session

            outcome.zscores, outcome.zscore_text = score_session(
                record, opts.normative, out=txn.staged.path("zscores", roi_workflow.DESC),
                overwrite=True)
        txn.commit(_registry_hook(registry, record) if registry is not None else None)
    if registry is not None:
        outcome.registry = display_location(registry.location)
    return outcome


def _roi_stage(txn: VisitTransaction, outcome: SessionOutcome, record: SessionRecord,
               opts: QsmRunOptions, root: Path,
               response: transfer.ChainResponse | None = None) -> None:
    """Motor-cortex masks, indices and their files (staged); a failure leaves the maps
    usable: the outcome's ``roi_error`` says why and the record's QC is ``fail``.
    ``response`` reruns the chain on the visit (the ``gtmrc`` index)."""
    series, result = outcome.series, outcome.result
    t0 = time.perf_counter()
    try:
        _, outcome.indices, roi_written = roi_workflow.run_session(
            txn.staged, series.magnitude[0], series.affine, result.brain_mask.data > 0,
            chi=result.chi.data, r2star=result.r2star.data, options=opts.roi,
            dataset_root=root,
            magnitude_name=series.sources[0] if series.sources else None, overwrite=True,
            provenance={k: result.provenance[k] for k in ("Sources", "InputChecksums")},
            chain_response=response)
    except (AlsironError, ValueError) as exc:
        outcome.roi_error = str(exc)
        record.qc_status = "fail"
        record.qc_notes["motor_cortex_indices"] = f"failed: {exc}"
    else:
        outcome.roi_written = txn.final_paths(roi_written)
        outcome.indices.update_record(record)
        interrupt_point("indices")
    outcome.roi_seconds = time.perf_counter() - t0
