"""The subject loop of ``alsiron relax``: R2*/T2*/S0 (MEGRE), R2/T2/B1 (MESE, EPG) and R2'
maps for every series of every session.

The CLI only parses options into :class:`~alsiron.relax.chain.RelaxParameters` and prints
the :class:`RelaxOutcome` objects as they come.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from alsiron.io import bids as ingest
from alsiron.io import derivatives
from alsiron.io.transaction import VisitTransaction, check_disk_space
from alsiron.relax import chain as relax_chain
from alsiron.runs.outcome import VisitOutcome

log = logging.getLogger("alsiron")


@dataclass(kw_only=True)
class RelaxOutcome(VisitOutcome):
    """What one MEGRE series of one visit produced: the fields of
    :class:`~alsiron.runs.outcome.VisitOutcome` (``written``: the map files; ``seconds``:
    wall time of the fits and the writing) and

    Attributes
    ----------
    result : RelaxResult
        The maps (``r2prime`` is None without a MESE series).
    """

    result: relax_chain.RelaxResult


def plan_outputs(out_root: Path, entities: dict[str, str],
                 with_mese: bool) -> derivatives.OutputPlan:
    """Every map (with its sidecar) that one series' run writes, in checking order."""
    plan = derivatives.OutputPlan(out_root, entities)
    plan.add_maps(relax_chain.output_names(with_mese))
    return plan


def run_relax_subject(subj_dir: str | Path,
                      params: relax_chain.RelaxParameters | None = None, *,
                      out: str | Path | None = None, field_strength: float | None = None,
                      overwrite: bool = False) -> Iterator[RelaxOutcome]:
    """Relaxometry maps for every MEGRE series of every session of a subject.

    Parameters
    ----------
    subj_dir : path
        BIDS ``sub-XX/`` or ``sub-XX/ses-YY/`` folder.
    params : RelaxParameters, optional
    out : path, optional
        Derivatives folder (default ``<dataset>/derivatives/alsiron``).
    field_strength : float, optional
        B0 [T] overriding the sidecars.
    overwrite : bool
        Replace existing outputs.

    Yields
    ------
    RelaxOutcome
        As each series finishes (its maps were published together,
        :class:`alsiron.io.transaction.VisitTransaction`).

    Raises
    ------
    InputError, OutputExistsError, OutputWriteError
        Bad input, outputs that exist without ``overwrite`` or too little disk space:
        the output check comes before the MEGRE series is loaded, so a refused series
        costs no fit.  An error or interrupt later leaves the previous maps as they were.
    """
    from alsiron.cohort.registry import input_checksums

    p = params or relax_chain.RelaxParameters()
    sessions = ingest.find_sessions(subj_dir)
    root = ingest.dataset_root(subj_dir)
    out_root = derivatives.derivatives_root(root, out)
    for ses in sessions:
        mese_sets = ingest.find_mese_series(ses.series[0].session_dir) if ses.series else []
        if len(mese_sets) > 1:
            log.warning("%d MESE series found; using %s", len(mese_sets), mese_sets[0][0])
        mese = (ingest.load_mese(mese_sets[0], subject=ses.subject, session=ses.session)
                if mese_sets else None)
        for files in ses.series:
            plan = plan_outputs(out_root, dict(files.entities), with_mese=mese is not None)
            every = plan_outputs(out_root, dict(files.entities), with_mese=True)
            with VisitTransaction.begin(plan, replaces=every, overwrite=overwrite) as txn:
                series = ingest.load_megre(files, subject=ses.subject, session=ses.session,
                                           field_strength=field_strength)
                check_disk_space(plan, int(series.magnitude[0].size))
                t0 = time.perf_counter()
                result = relax_chain.process_relax(series, mese, p)
                sources = list(result.provenance["Sources"])
                result.provenance.update(derivatives.input_provenance(
                    sources, root, input_checksums(sources, root)))
                written = derivatives.write_maps(txn.staged, result.derivative_maps(),
                                                 result.provenance, overwrite=True)
                txn.commit()
            yield RelaxOutcome(label=files.prefix, out_root=out_root, result=result,
                               written=txn.final_paths(written),
                               seconds=time.perf_counter() - t0)
