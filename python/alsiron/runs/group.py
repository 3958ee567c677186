"""The group stage over a registry's records: normative model from the controls, z-scores
of every visit, longitudinal visit table and cohort mixed model, subject and cohort HTML
reports — what ``alsiron demo`` and ``alsiron BIDS_DIR OUTPUT_DIR group`` run after the
visits."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from alsiron.cohort import longitudinal, normative, report
from alsiron.cohort.records import HEADLINE_INDEX, SessionRecord
from alsiron.errors import AlsironError
from alsiron.io.atomic import save_json
from alsiron.io.derivatives import OutputPlan
from alsiron.runs.roi import DESC as _ZSCORE_DESC
from alsiron.sim.recovery import EffectRecovery


@dataclass
class GroupOutputs:
    """What the group stage wrote.

    Attributes
    ----------
    model : Path or None
        Normative model JSON (None when it could not be built; ``notes`` says why).
    visit_table : Path or None
        Per-visit longitudinal table of the headline index (TSV).
    cohort_model : Path or None
        Mixed-model summary (JSON).
    reports : list of Path
        Subject pages, then the cohort page.
    zscores : list of Path
        Per-visit z-score files.
    notes : list of str
        What could not be done, one line each.
    """

    model: Path | None = None
    visit_table: Path | None = None
    cohort_model: Path | None = None
    reports: list[Path] = field(default_factory=list)
    zscores: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def run_group_stage(records: list[SessionRecord], derivs: Path, *, source: str,
                    overwrite: bool = False,
                    say: Callable[[str], None] | None = None,
                    recovery: EffectRecovery | Sequence[EffectRecovery] | None = None
                    ) -> GroupOutputs:
    """Normative model, z-scores, longitudinal models and reports from visit records.

    Parameters
    ----------
    records : list of SessionRecord
        Current registry records.
    derivs : path
        The alsiron derivatives folder: ``normative_model.json``,
        ``longitudinal_<index>.tsv`` (+ ``_model.json``), ``cohort_report.html`` go here,
        subject pages to ``sub-XX/``, z-scores beside each visit's indices.
    source : str
        Where the records came from (the registry as displayed), for the model's provenance.
    overwrite : bool
        Replace these files from an earlier run.
    say : callable, optional
        Receives one progress line per step.
    recovery : EffectRecovery or a sequence of them, optional
        Simulated against recovered ALS effect (phantom cohorts), shown on the cohort page.

    Returns
    -------
    GroupOutputs
        A model or mixed model that cannot be fitted (too few controls or visits) is a
        note, not an error.
    """
    tell = say or (lambda _line: None)
    out = GroupOutputs()
    model = None
    model_path = derivs / "normative_model.json"
    try:
        # One scan per control, as `alsiron normative build` does by default: the
        # minimum counts participants, not visits, and with one scan each the z-scores
        # of new controls are calibrated (tests/test_normative_calibration.py).
        model = normative.build_normative_model(records, group="control", source=source)
    except (AlsironError, ValueError) as exc:
        out.notes.append(f"normative model not built: {exc}")
    else:
        model.save(model_path, overwrite=overwrite)
        out.model = model_path
        tell(f"normative model from {model.n_subjects} control participants "
             f"({model.harmonisation_label}) -> {model_path}")
        for rec in records:
            if not rec.indices:
                continue
            ents = {"sub": rec.subject.removeprefix("sub-")}
            if rec.session != "n/a":
                ents["ses"] = rec.session.removeprefix("ses-")
            path = OutputPlan(derivs, ents).add_file("zscores", _ZSCORE_DESC, ".json")
            normative.score_session(rec, model_path, out=path, overwrite=overwrite)
            out.zscores.append(path)

    retest = (longitudinal.retest_from_normative(model_path, HEADLINE_INDEX)
              if out.model is not None else None)
    trajectories = longitudinal.cohort_trajectories(records, HEADLINE_INDEX, retest=retest)
    out.visit_table = derivs / f"longitudinal_{HEADLINE_INDEX}.tsv"
    longitudinal.write_visit_table(out.visit_table, trajectories, overwrite=overwrite)
    try:
        cohort_model = longitudinal.fit_cohort_model(records, HEADLINE_INDEX)
    except (AlsironError, ValueError) as exc:
        out.notes.append(f"cohort mixed model not fitted: {exc}")
    else:
        out.cohort_model = out.visit_table.with_name(out.visit_table.stem + "_model.json")
        save_json(out.cohort_model, longitudinal.model_summary(cohort_model),
                  overwrite=overwrite)
        tell(f"cohort mixed model -> {out.cohort_model}")

    by_subject: dict[str, list[SessionRecord]] = {}
    for rec in records:
        by_subject.setdefault(rec.subject, []).append(rec)
    for subject, recs in sorted(by_subject.items()):
        page = report.render_subject_report(
            recs, model=model, model_path=out.model,
            qc_images=report.find_qc_images(derivs / subject))
        out.reports.append(report.write_report(derivs / subject / f"{subject}_report.html",
                                               page, overwrite=overwrite))
    page = report.render_cohort_report(records, model=model, model_path=out.model,
                                       recovery=recovery)
    out.reports.append(report.write_report(derivs / "cohort_report.html", page,
                                           overwrite=overwrite))
    tell(f"{len(out.reports)} report pages; open {out.reports[-1]}")
    return out
