"""The BIDS-App levels: ``participant`` (every visit of a BIDS dataset through QSM,
relaxometry when a MESE series is there, motor-cortex indices and the registry, one dask
task per visit, resumable) and ``group`` (normative model, longitudinal models, reports).

A visit is one ``sub-XX/ses-YY/`` folder (or ``sub-XX/`` without sessions).  When a visit
finishes, a manifest ``<OUTPUT_DIR>/sub-XX/ses-YY/sub-XX_ses-YY_visit.json`` records the
SHA-256 of every input file of the visit folder, the run's settings (alsiron version and
every parameter), a digest of each registry record it wrote and the SHA-256 of every
output; it is written last, so its presence with ``Status: done`` means the visit is
complete.  A rerun skips a visit whose manifest, outputs and registry records all still
match (:func:`visit_state`), so after a crash nothing finished is recomputed.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import alsiron
from alsiron.cohort.records import SessionRecord
from alsiron.errors import AlsironError, InputError
from alsiron.io import bids as ingest
from alsiron.io.atomic import save_json, save_text, sha256_file
from alsiron.io.derivatives import dataset_relative, write_dataset_description
from alsiron.qsm.chain import QsmParameters
from alsiron.relax.chain import RelaxParameters
from alsiron.runs.batch import BatchOptions, BatchSummary, TaskResult, run_tasks
from alsiron.runs.group import GroupOutputs, run_group_stage
from alsiron.runs.roi import RoiOptions

log = logging.getLogger("alsiron")

#: Registry file of a BIDS-App run, inside OUTPUT_DIR, unless ``--registry`` is given.
REGISTRY_NAME = "registry.sqlite"

VisitState = Literal["complete", "changed", "incomplete"]


@dataclass(frozen=True)
class Visit:
    """One visit folder of a BIDS dataset.

    Attributes
    ----------
    subject, session : str
        ``sub-01``, ``ses-01`` (``""`` for a subject without session folders).
    path : Path
        The ``sub-XX/ses-YY/`` folder (``sub-XX/`` without sessions).
    """

    subject: str
    session: str
    path: Path

    @property
    def label(self) -> str:
        """BIDS prefix: ``sub-01_ses-01`` (``sub-01`` without sessions)."""
        return f"{self.subject}_{self.session}" if self.session else self.subject

    def out_dir(self, output_dir: Path) -> Path:
        """The visit's folder in the derivatives."""
        base = Path(output_dir) / self.subject
        return base / self.session if self.session else base


@dataclass
class ParticipantOptions:
    """Every choice of a participant-level run.

    Attributes
    ----------
    params : QsmParameters
        The QSM chain's algorithms and parameters.
    roi : RoiOptions or None
        Motor-cortex masks and indices; None skips them.
    relax : RelaxParameters or None
        Relaxometry (R2*, and R2/T2/B1/R2' from a MESE series) when the visit has a MESE
        series; None skips it.
    registry : str or path or None
        Registry (SQLite file or SQLAlchemy URL); None: ``$ALSIRON_REGISTRY``, else
        ``OUTPUT_DIR/registry.sqlite``.
    resume : bool
        Skip visits that are complete with the same inputs and settings.
    overwrite : bool
        Recompute visits finished earlier with other inputs or settings (their outputs
        are replaced; their registry records are kept as history).
    """

    params: QsmParameters = field(default_factory=QsmParameters)
    roi: RoiOptions | None = field(default_factory=RoiOptions)
    relax: RelaxParameters | None = field(default_factory=RelaxParameters)
    registry: str | Path | None = None
    resume: bool = True
    overwrite: bool = False

    def settings(self) -> dict[str, Any]:
        """What makes a visit's outputs (alsiron version and every parameter), as JSON
        values: two runs with equal settings make the same files."""
        doc = {"alsiron": alsiron.__version__, "qsm": self.params.to_flat(),
               "roi": None if self.roi is None else asdict(self.roi),
               "relax": None if self.relax is None else asdict(self.relax)}
        return _plain(doc)


def _plain(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples → lists, paths → strings)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _strip(label: str, prefix: str) -> str:
    return label.removeprefix(prefix)


def find_visits(bids_dir: str | os.PathLike[str], participant_labels: Sequence[str] = (),
                session_labels: Sequence[str] = ()) -> list[Visit]:
    """The visit folders of a BIDS dataset, sorted by subject and session.

    Parameters
    ----------
    bids_dir : path
        The dataset root (with ``dataset_description.json``).
    participant_labels, session_labels : sequences of str
        Keep only these (``01`` or ``sub-01``; ``01`` or ``ses-01``); empty keeps all.

    Raises
    ------
    InputError
        Not a BIDS dataset, a requested participant without a folder, or nothing found.
    """
    root = Path(bids_dir)
    if not root.is_dir():
        raise InputError(root, "not a folder (expected a BIDS dataset)")
    if not (root / "dataset_description.json").is_file():
        raise InputError(root, "not a BIDS dataset: no dataset_description.json")
    subjects = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("sub-"))
    wanted = {f"sub-{_strip(x, 'sub-')}" for x in participant_labels}
    missing = wanted - {p.name for p in subjects}
    if missing:
        raise InputError(root, f"no folder for participant(s) {', '.join(sorted(missing))}")
    sessions_wanted = {f"ses-{_strip(x, 'ses-')}" for x in session_labels}
    visits = []
    for subj in subjects:
        if wanted and subj.name not in wanted:
            continue
        ses = sorted(p for p in subj.iterdir() if p.is_dir() and p.name.startswith("ses-"))
        if not ses:
            if not sessions_wanted:
                visits.append(Visit(subj.name, "", subj))
            continue
        visits += [Visit(subj.name, s.name, s) for s in ses
                   if not sessions_wanted or s.name in sessions_wanted]
    if not visits:
        what = "sub-*/ folders" if not (wanted or sessions_wanted) else "visits matching the labels"
        raise InputError(root, f"no {what}")
    return visits


def registry_location(output_dir: Path, registry: str | Path | None) -> str | Path:
    """``registry`` (path or URL), else ``$ALSIRON_REGISTRY``, else
    ``OUTPUT_DIR/registry.sqlite``."""
    from alsiron.cohort.registry import REGISTRY_ENV, resolve_location

    if registry is not None or os.environ.get(REGISTRY_ENV):
        return resolve_location(registry)
    return Path(output_dir) / REGISTRY_NAME


def manifest_path(visit: Visit, output_dir: Path) -> Path:
    """Where a visit's completion manifest goes."""
    return visit.out_dir(output_dir) / f"{visit.label}_visit.json"


def _input_checksums(visit: Visit, root: Path) -> dict[str, str]:
    files = sorted(p for p in visit.path.rglob("*") if p.is_file())
    return {dataset_relative(p, root): sha256_file(p) for p in files}


def _record_key(rec: SessionRecord) -> str:
    return f"{rec.subject}/{rec.session}/run-{rec.run}"


def _record_digest(rec: SessionRecord) -> str:
    doc = {"inputs": rec.input_checksums, "version": rec.software_version,
           "parameters": rec.parameters}
    return hashlib.sha256(json.dumps(_plain(doc), sort_keys=True).encode()).hexdigest()


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def visit_state(visit: Visit, root: Path, output_dir: Path, options: ParticipantOptions,
                registry: str | Path) -> tuple[VisitState, str]:
    """Whether a visit is complete for these inputs and settings.

    Returns
    -------
    state : {"complete", "changed", "incomplete"}
        ``complete``: its manifest says done, its inputs (SHA-256 of every file of the
        visit folder) and settings are the same, every output listed still has its
        SHA-256, and the registry's current records are the ones the run wrote.
        ``changed``: it was finished with other inputs or settings.  ``incomplete``:
        never finished (or its outputs or records were lost since).
    reason : str
        One line saying why.
    """
    from alsiron.cohort.registry import Registry

    doc = _read_manifest(manifest_path(visit, output_dir))
    if doc is None or doc.get("Status") != "done":
        return "incomplete", "not finished before"
    if doc.get("Settings") != options.settings():
        return "changed", "finished earlier with other settings or another alsiron version"
    if doc.get("Inputs") != _input_checksums(visit, root):
        return "changed", "finished earlier from other input files"
    for rel, digest in doc.get("Outputs", {}).items():
        path = Path(output_dir) / rel
        if not path.is_file() or sha256_file(path) != digest:
            return "incomplete", f"output {rel} is missing or was changed"
    try:
        with Registry.open(registry, create=False) as reg:
            current = {_record_key(r): r for r in reg.sessions(visit.subject)}
    except AlsironError as exc:
        return "incomplete", f"registry not readable: {exc}"
    for key, digest in doc.get("Records", {}).items():
        rec = current.get(key)
        if rec is None or _record_digest(rec) != digest:
            return "incomplete", f"registry record {key} is missing or was replaced"
    return "complete", "complete with the same inputs and settings"


def _set_threads(threads: int | None) -> None:
    """Size the numerical core's thread pool in this (worker) process, once."""
    n = threads or int(os.environ.get("ALSIRON_NUM_THREADS", "0") or 0)
    if n > 0:
        from alsiron import _core

        _core.set_num_threads(n)


def _process_visit(visit: Visit, root: Path, output_dir: Path, options: ParticipantOptions,
                   registry: str | Path) -> tuple[dict[str, str], list[str]]:
    """QSM (+ indices, registry records), then relaxometry with a MESE series; returns
    the digests of the records written and notes (a failed index stage)."""
    from alsiron.runs import qsm as qsm_run
    from alsiron.runs.relax import run_relax_subject

    # Outputs left by an unfinished run (or a changed one the user asked to replace) are
    # replaced: this visit has no manifest in force any more.
    qsm_options = qsm_run.QsmRunOptions(params=options.params, roi=options.roi,
                                        registry=registry, overwrite=True)
    records: dict[str, str] = {}
    notes: list[str] = []
    for oc in qsm_run.run_qsm_subject(visit.path, qsm_options, out=output_dir):
        if oc.roi_error:
            notes.append(f"{oc.label}: motor-cortex indices failed: {oc.roi_error}")
        if oc.record is not None:
            records[_record_key(oc.record)] = _record_digest(oc.record)
    if options.relax is not None and ingest.find_mese_series(visit.path):
        for _ in run_relax_subject(visit.path, options.relax, out=output_dir, overwrite=True):
            pass
    return records, notes


def _visit_outputs(visit: Visit, output_dir: Path) -> dict[str, str]:
    """SHA-256 of the visit's per-visit outputs (``anat/``, less the group's z-scores)."""
    anat = visit.out_dir(output_dir) / "anat"
    files = sorted(p for p in anat.glob("*") if p.is_file() and not p.name.endswith(
        ("_zscores.json", ".part")))
    return {p.relative_to(output_dir).as_posix(): sha256_file(p) for p in files}


def run_visit_task(visit: Visit, bids_dir: Path, output_dir: Path,
                   options: ParticipantOptions, registry: str | Path, *,
                   threads: int | None = None) -> TaskResult:
    """One visit, as one dask task: skip it when complete, else compute it and write its
    manifest last.  Errors of the data (AlsironError, ValueError, an unwritable disk)
    become a ``failed`` result with their one-line reason, and a manifest saying so.

    Parameters
    ----------
    visit : Visit
    bids_dir, output_dir : Path
        Dataset root and derivatives folder.
    options : ParticipantOptions
    registry : str or Path
        Resolved registry location.
    threads : int, optional
        Threads of the numerical core in this worker.
    """
    t0, cpu0 = time.perf_counter(), time.process_time()
    worker = f"{socket.gethostname()}:{os.getpid()}"
    _set_threads(threads)
    out = Path(output_dir)
    mpath = manifest_path(visit, out)
    try:
        state, why = visit_state(visit, Path(bids_dir), out, options, registry)
        if state == "complete" and options.resume:
            return TaskResult(visit.label, "skipped", why, time.perf_counter() - t0, worker)
        if state == "changed" and options.resume and not options.overwrite:
            return TaskResult(visit.label, "failed", f"{why}; pass --overwrite to recompute it",
                              time.perf_counter() - t0, worker)
        mpath.unlink(missing_ok=True)
        inputs = _input_checksums(visit, Path(bids_dir))
        records, notes = _process_visit(visit, Path(bids_dir), out, options, registry)
        doc = {"Visit": visit.label, "Status": "done", "Finished": _now(),
               "Seconds": round(time.perf_counter() - t0, 2), "Worker": worker,
               "Inputs": inputs, "Settings": options.settings(), "Records": records,
               "Outputs": _visit_outputs(visit, out), "Notes": notes}
        save_json(mpath, doc, overwrite=True)
        return TaskResult(visit.label, "done", "; ".join(notes), time.perf_counter() - t0,
                          worker, time.process_time() - cpu0)
    except (AlsironError, ValueError, OSError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        try:
            save_json(mpath, {"Visit": visit.label, "Status": "failed", "Finished": _now(),
                              "Worker": worker, "Reason": reason}, overwrite=True)
        except OSError:
            pass  # the reason still reaches the summary table
        return TaskResult(visit.label, "failed", reason, time.perf_counter() - t0, worker)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def run_participant_level(
    bids_dir: str | os.PathLike[str], output_dir: str | os.PathLike[str],
    options: ParticipantOptions | None = None, batch: BatchOptions | None = None, *,
    participant_labels: Sequence[str] = (), session_labels: Sequence[str] = (),
    progress: Callable[[TaskResult, int, int], None] | None = None,
    on_client: Callable[[Any], None] | None = None,
) -> BatchSummary:
    """Every visit of a BIDS dataset, one task each (see :mod:`alsiron.runs.batch`).

    Parameters
    ----------
    bids_dir : path
        BIDS dataset root.
    output_dir : path
        Derivatives folder (maps, indices, manifests, the default registry, run logs).
    options : ParticipantOptions, optional
    batch : BatchOptions, optional
        Where the tasks run (default: a local cluster sized from the machine).
    participant_labels, session_labels : sequences of str
        Restrict the visits (``01`` or ``sub-01``).
    progress : callable, optional
        ``progress(result, n_finished, n_total)`` as each visit finishes.
    on_client : callable, optional
        Receives the dask client (tests, monitoring).

    Returns
    -------
    BatchSummary
        One result per visit; its table is also written to
        ``OUTPUT_DIR/logs/participant_<UTC time>.tsv``.

    Raises
    ------
    InputError
        Not a BIDS dataset, unknown labels, OUTPUT_DIR the dataset itself.
    AlsironError
        An SQLite registry with workers on several machines or on a network file system;
        an unreachable scheduler; a damaged registry.
    """
    from alsiron.cohort.registry import Registry

    opts = options or ParticipantOptions()
    engine = batch or BatchOptions()
    root = Path(bids_dir).resolve()
    out = Path(output_dir).absolute()
    if out.resolve() == root:
        raise InputError(out, "OUTPUT_DIR must not be the BIDS dataset itself "
                              "(use e.g. BIDS_DIR/derivatives/alsiron)")
    visits = find_visits(root, participant_labels, session_labels)
    registry = registry_location(out, opts.registry)
    from alsiron.runs.batch import refuse_shared_sqlite

    refuse_shared_sqlite(engine, registry)
    out.mkdir(parents=True, exist_ok=True)
    write_dataset_description(out)
    # Created (or migrated) once here, so that workers never race to create the schema.
    Registry.open(registry).close()
    summary = run_tasks(run_visit_task, visits, [v.label for v in visits], engine,
                        args=(root, out, opts, registry), progress=progress,
                        on_client=on_client)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    rows = ["visit\tstatus\tseconds\tworker\treason"]
    rows += [f"{r.label}\t{r.status}\t{r.seconds:.1f}\t{r.worker}\t{r.reason}"
             for r in summary.results]
    save_text(out / "logs" / f"participant_{stamp}.tsv", "\n".join(rows) + "\n",
              overwrite=True)
    return summary


def run_group_level(output_dir: str | os.PathLike[str], *, registry: str | Path | None = None,
                    overwrite: bool = False,
                    say: Callable[[str], None] | None = None) -> GroupOutputs:
    """Normative model, z-scores, longitudinal models and reports from the registry the
    participant level filled (:func:`alsiron.runs.group.run_group_stage`).

    Raises
    ------
    RegistryError
        No registry yet (run the participant level first), or a damaged one.
    InputError
        The registry holds no visit.
    """
    from alsiron.cohort.registry import Registry, display_location

    out = Path(output_dir)
    location = registry_location(out, registry)
    with Registry.open(location, create=False) as reg:
        records = reg.sessions()
    if not records:
        raise InputError(None if not isinstance(location, Path) else location,
                         "the registry holds no visit: run the participant level first")
    return run_group_stage(records, out, source=display_location(location),
                           overwrite=overwrite, say=say)
