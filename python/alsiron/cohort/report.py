"""Self-contained HTML reports: one page per subject, one for the cohort.

Every image is an inline base64 PNG (matplotlib, Agg canvas); the page has its own
``<style>`` and no script, link, font or remote reference, so it opens offline, in a
mail attachment or an archive. Every text that comes from the data (subject IDs, file
names, notes, parameters) is HTML-escaped.

A subject page has: the participant, the normative model used (or how to build one),
trajectory plots of the indices against the normative band (central 95 % of the
predictive distribution for the subject's age, sex and site), the index table per visit
with z-scores, the QC montages
that exist, and the provenance of every number (software version, parameters and input
checksums per session, the model's file digest and provenance).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import alsiron
from alsiron.cohort.normative import (
    NO_MODEL_MESSAGE,
    SMALL_REFERENCE,
    NormativeModel,
    ZScore,
)
from alsiron.cohort.records import HEADLINE_INDEX, SessionRecord, index_units
from alsiron.io.atomic import save_text, sha256_file

if TYPE_CHECKING:
    from alsiron.sim.recovery import EffectRecovery

#: Indices plotted when none are named: the headline first, then the other means.
MAX_PLOTTED_INDICES = 4
GROUP_COLOURS = {"control": "#1f77b4", "ALS": "#d62728"}
#: Normative band fill colour (the headless-browser test looks for it on screen).
BAND_RGB = (198, 219, 239)

_CSS = """
body{font-family:Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:2px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}
.warn{background:#fff3cd}.fail{background:#f8d7da}.note{color:#555;font-size:12px}
.zhi{font-weight:bold;color:#a00}figure{display:inline-block;margin:6px}
figcaption{font-size:12px;color:#555}pre{font-size:11px;background:#f7f7f7;padding:6px;
white-space:pre-wrap;word-break:break-all}details{margin:4px 0}
"""


def esc(value: Any) -> str:
    """HTML-escape any value's text (quotes included, so it is safe in attributes)."""
    return html.escape(str(value), quote=True)


def _png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure_png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def _new_figure(width: float = 6.0, height: float = 3.6) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    # fixed margins: constrained layout would draw every figure twice
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.14, top=0.96)
    return fig, fig.add_subplot()


def _display(index: str) -> tuple[float, str]:
    """Scale and unit for display: χ in ppb, R2* in s⁻¹."""
    unit = index_units(index)
    return (1000.0, "ppb") if unit == "ppm" else (1.0, unit)


def _visit_key(r: SessionRecord) -> tuple[float, str, str, int]:
    t = r.years_since_baseline
    return (t if t is not None else math.inf, r.acq_time or "", r.session, r.run)


def default_indices(records: Sequence[SessionRecord], model: NormativeModel | None = None
                    ) -> list[str]:
    """Indices to show: the headline first, then the model's (or the records') means."""
    names = {k for r in records for k in r.indices}
    pool = model.indices if model is not None else sorted(names)
    chosen = [HEADLINE_INDEX] if HEADLINE_INDEX in names else []
    chosen += [k for k in pool if k in names and k not in chosen and not k.endswith("_n")]
    return chosen[:MAX_PLOTTED_INDICES]


# --------------------------------------------------------------------------- plots


def trajectory_png(records: Sequence[SessionRecord], index: str,
                   model: NormativeModel | None) -> bytes:
    """One subject's index over age with the normative band of its site and sex."""
    scale, unit = _display(index)
    rows = [r for r in sorted(records, key=_visit_key)
            if index in r.indices and r.age is not None and math.isfinite(r.indices[index])]
    fig, ax = _new_figure()
    if rows and model is not None and index in model.indices:
        ages = [float(r.age) for r in rows]  # type: ignore[arg-type]
        lo_age, hi_age = min(ages) - 1.0, max(ages) + 1.0
        grid = np.linspace(lo_age, hi_age, 40)
        first = rows[0]
        band = np.array([model.band(index, a, first.sex, first.site) for a in grid])
        if np.all(np.isfinite(band)):
            ax.fill_between(grid, band[:, 1] * scale, band[:, 2] * scale,
                            color=np.array(BAND_RGB) / 255, label="normative 95 % band",
                            linewidth=0)
            ax.plot(grid, band[:, 0] * scale, color="#6b8fb5", lw=1, label="normative mean")
    if rows:
        colour = GROUP_COLOURS.get(str(rows[0].group), "#333333")
        ages = [float(r.age) for r in rows]  # type: ignore[arg-type]
        values = [r.indices[index] * scale for r in rows]
        ax.plot(ages, values, "-o", color=colour, ms=5, label=str(rows[0].subject))
        for r, a, v in zip(rows, ages, values, strict=True):
            if r.qc_status != "pass":
                ax.plot([a], [v], "x", color="k", ms=9)
    else:
        ax.text(0.5, 0.5, "no values", transform=ax.transAxes, ha="center")
    ax.set_xlabel("age (years)")
    ax.set_ylabel(f"{index} ({unit})")
    ax.legend(fontsize=7, loc="best", framealpha=0.7)
    return _figure_png(fig)


def cohort_trajectory_png(records: Sequence[SessionRecord], index: str) -> bytes:
    """Every participant's index over years since baseline, with group means per visit."""
    scale, unit = _display(index)
    by_subject: dict[str, list[SessionRecord]] = {}
    for r in records:
        if r.run == 1 and index in r.indices and r.years_since_baseline is not None:
            by_subject.setdefault(r.subject, []).append(r)
    from matplotlib.collections import LineCollection

    fig, ax = _new_figure(7.0, 4.0)
    groups: dict[str, dict[str, list[tuple[float, float]]]] = {}
    lines: dict[str, list[np.ndarray]] = {}
    for rows in by_subject.values():
        rows.sort(key=_visit_key)
        group = str(rows[0].group)
        t = [float(r.years_since_baseline) for r in rows]  # type: ignore[arg-type]
        v = [r.indices[index] * scale for r in rows]
        lines.setdefault(group, []).append(np.column_stack([t, v]))
        for r, ti, vi in zip(rows, t, v, strict=True):
            groups.setdefault(group, {}).setdefault(r.session, []).append((ti, vi))
    for group, segments in lines.items():
        # one artist per group, not per participant: drawing cost stays flat with n
        ax.add_collection(LineCollection(segments, colors=GROUP_COLOURS.get(group, "#777777"),
                                         alpha=0.15, linewidths=0.8))
    ax.autoscale_view()
    for group, sessions in sorted(groups.items()):
        pts = sorted((np.mean([p[0] for p in s]), np.mean([p[1] for p in s]),
                      np.std([p[1] for p in s], ddof=1) / math.sqrt(len(s)) if len(s) > 1
                      else 0.0) for s in sessions.values())
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[1.96 * p[2] for p in pts],
                    fmt="-o", color=GROUP_COLOURS.get(group, "#333333"), lw=2, capsize=3,
                    label=f"{group} mean ± 95 % CI")
    ax.set_xlabel("years since baseline")
    ax.set_ylabel(f"{index} ({unit})")
    if groups:
        ax.legend(fontsize=8)
    return _figure_png(fig)


# ---------------------------------------------------------------------------- HTML


def _page(title: str, body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _img(png: bytes, caption: str, alt: str) -> str:
    return (f"<figure><img alt=\"{esc(alt)}\" src=\"{_png_data_uri(png)}\">"
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}f}"


def _model_section(model: NormativeModel | None, model_path: Path | None) -> list[str]:
    if model is None:
        return ["<h2>Normative model</h2>", f"<p class=\"warn\">{esc(NO_MODEL_MESSAGE)}</p>"]
    c = model.cohort
    lo, hi = model.age_range
    digest = sha256_file(model_path) if model_path is not None and model_path.is_file() else None
    return [
        "<h2>Normative model</h2>",
        f"<p>{esc(c.get('n_sessions'))} control sessions "
        f"(by site: {esc(json.dumps(c.get('n_by_site', {})))}; by sex: "
        f"{esc(json.dumps(c.get('n_by_sex', {})))}), ages {lo:g}–{hi:g} years; age model "
        f"{esc(model.age_basis.to_dict()['basis'])} (df {model.age_basis.df}); site "
        f"harmonisation: {esc(model.harmonisation_method)}. "
        f"Reference: {model.n_subjects} control participants"
        + (" (a small reference: z-scores are calibrated, but the centre of each is "
           "uncertain by the ± shown beside it)" if model.n_subjects < SMALL_REFERENCE else "")
        + ". "
        f"Built {esc(model.provenance.get('created'))} by alsiron "
        f"{esc(model.provenance.get('software_version'))}"
        + (f"; file {esc(model_path)} (SHA-256 {esc(digest)})" if model_path else "")
        + ".</p>",
        "<p class=\"note\">t = (site-harmonised value − normative mean for age and sex) / "
        "predictive SD of one new control scan; z is the standard-normal score with the "
        "same tail probability under Student's t with the reference's degrees of freedom, "
        "so |z| ≥ 1.96 in 5 % of controls whatever the reference size. Beside each z, "
        "± the SD of the reference's fitted mean in z units. The band is the central 95 % "
        "of the predictive distribution on the subject's site scale.</p>",
    ]


def _visit_table(records: Sequence[SessionRecord], indices: Sequence[str],
                 zscores: dict[tuple[str, int], dict[str, ZScore]]) -> list[str]:
    head = ["<tr><th class=\"l\">session</th><th>run</th><th class=\"l\">date</th>"
            "<th>years</th><th>age</th><th class=\"l\">site</th><th class=\"l\">QC</th>"]
    for index in indices:
        _, unit = _display(index)
        head.append(f"<th>{esc(index)} ({esc(unit)})</th><th>z</th>")
    head.append("<th class=\"l\">notes</th></tr>")
    lines = ["<table>", "".join(head)]
    for r in sorted(records, key=_visit_key):
        zs = zscores.get((r.session, r.run), {})
        css = {"warn": " class=\"warn\"", "fail": " class=\"fail\""}.get(r.qc_status, "")
        cells = [f"<tr{css}><td class=\"l\">{esc(r.session)}</td><td>{r.run}</td>"
                 f"<td class=\"l\">{esc((r.acq_time or '')[:10])}</td>"
                 f"<td>{_fmt(r.years_since_baseline)}</td><td>{_fmt(r.age, 1)}</td>"
                 f"<td class=\"l\">{esc(r.site)}</td><td class=\"l\">{esc(r.qc_status)}</td>"]
        notes: list[str] = []
        for index in indices:
            scale, _ = _display(index)
            v = r.indices.get(index)
            z = zs.get(index)
            zval = z.z if z is not None else None
            zcls = " class=\"zhi\"" if zval is not None and abs(zval) >= 1.96 else ""
            centre = (f"<span class=\"note\"> ±{_fmt(z.centre_sd)}</span>"
                      if z is not None and math.isfinite(z.centre_sd) else "")
            cells.append(f"<td>{_fmt(None if v is None else v * scale)}</td>"
                         f"<td{zcls}>{_fmt(zval)}{centre}</td>")
            if z is not None:
                notes += [n for n in z.notes if n not in notes]
        if r.qc_notes:
            notes.append("QC: " + json.dumps(r.qc_notes, sort_keys=True, default=str))
        cells.append(f"<td class=\"l note\">{esc('; '.join(notes))}</td></tr>")
        lines.append("".join(cells))
    lines.append("</table>")
    return lines


def _qc_section(qc_images: Sequence[str | os.PathLike[str]]) -> list[str]:
    out = ["<h2>QC montages</h2>"]
    if not qc_images:
        return out + ["<p class=\"note\">No QC montage was given or found.</p>"]
    missing = []
    for p in map(Path, qc_images):
        try:
            data = p.read_bytes()
        except OSError:
            missing.append(p)
            continue
        if not data.startswith(b"\x89PNG\r\n\x1a\n"):
            missing.append(p)
            continue
        out.append(_img(data, p.name, f"QC montage {p.name}"))
    if missing:
        out.append("<p class=\"note\">Not shown (missing or not PNG): "
                   + ", ".join(esc(p) for p in missing) + "</p>")
    return out


def _provenance_section(records: Sequence[SessionRecord], model: NormativeModel | None
                        ) -> list[str]:
    out = ["<h2>Provenance</h2>",
           f"<p class=\"note\">Page written {esc(_now())} by alsiron {esc(alsiron.__version__)}."
           " Each value above comes from the session below; open it for the software "
           "version, every parameter and the SHA-256 of every input.</p>"]
    for r in sorted(records, key=_visit_key):
        doc = {"software_version": r.software_version, "parameters": r.parameters,
               "input_checksums": r.input_checksums, "field_strength_t": r.field_strength_t,
               "acq_time": r.acq_time, "qc_status": r.qc_status, "qc_notes": r.qc_notes}
        out.append(f"<details><summary>{esc(r.session)} run {r.run}: alsiron "
                   f"{esc(r.software_version or '?')}, {len(r.input_checksums)} input "
                   f"checksum(s)</summary><pre>"
                   f"{esc(json.dumps(doc, indent=1, sort_keys=True, default=str))}</pre>"
                   "</details>")
    if model is not None:
        from alsiron.cohort.registry import display_location

        # A model file written before sources were masked may still hold a password.
        provenance = dict(model.provenance)
        if provenance.get("source"):
            provenance["source"] = display_location(str(provenance["source"]))
        out.append("<details><summary>normative model provenance</summary><pre>"
                   + esc(json.dumps({"provenance": provenance,
                                     "selection": model.selection}, indent=1, default=str))
                   + "</pre></details>")
    return out


def _natural_key(text: str) -> list[Any]:
    """Sort key that orders sub-2 before sub-10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def render_subject_report(records: Sequence[SessionRecord], *,
                          model: NormativeModel | None = None,
                          model_path: str | os.PathLike[str] | None = None,
                          qc_images: Sequence[str | os.PathLike[str]] = (),
                          indices: Sequence[str] | None = None) -> str:
    """HTML page (a string) for one subject's sessions.

    Parameters
    ----------
    records : sequence of SessionRecord
        The subject's sessions (all runs); must all have the same ``subject``.
    model : NormativeModel or None
        For z-scores and bands; None: the page says how to build one.
    model_path : path or None
        Where the model came from (its SHA-256 goes into the provenance).
    qc_images : sequence of path
        QC montage PNGs; those that exist are embedded, the others listed.
    indices : sequence of str or None
        Indices to tabulate and plot (default :func:`default_indices`).

    Raises
    ------
    ValueError
        No records, or records of more than one subject.
    """
    records = list(records)
    subjects = {r.subject for r in records}
    if len(subjects) != 1:
        raise ValueError(f"a subject report needs the records of one subject, got "
                         f"{len(subjects)}")
    subject = subjects.pop()
    names = list(indices) if indices is not None else default_indices(records, model)
    zscores = {(r.session, r.run): model.z_scores(r) for r in records} if model else {}
    first = min(records, key=_visit_key)
    body = [f"<h1>alsiron report: {esc(subject)}</h1>",
            f"<p>group {esc(first.group)}, sex {esc(first.sex)}, site {esc(first.site)}, "
            f"age at first visit {_fmt(first.age, 1)} years; {len(records)} scan(s) in "
            f"{len({r.session for r in records})} session(s).</p>"]
    body += _model_section(model, None if model_path is None else Path(model_path))
    body.append("<h2>Trajectories</h2>")
    for index in names:
        body.append(_img(trajectory_png(records, index, model),
                         f"{index}: subject values (× = QC not passed) and normative band",
                         f"trajectory of {index}"))
    body.append("<h2>Indices per visit</h2>")
    body += _visit_table(records, names, zscores)
    body += _qc_section(qc_images)
    body += _provenance_section(records, model)
    return _page(f"alsiron {subject}", body)


def render_cohort_report(records: Sequence[SessionRecord], *,
                         model: NormativeModel | None = None,
                         model_path: str | os.PathLike[str] | None = None,
                         indices: Sequence[str] | None = None,
                         recovery: EffectRecovery | Sequence[EffectRecovery] | None = None
                         ) -> str:
    """HTML page for the whole cohort: group trajectories and a per-group table, and for
    a simulated cohort (``recovery``: one comparison per index) how well the simulated
    ALS effect came back."""
    records = list(records)
    if not records:
        raise ValueError("a cohort report needs at least one record")
    names = list(indices) if indices is not None else default_indices(records, model)
    body = [f"<h1>alsiron cohort report</h1><p>{len({r.subject for r in records})} "
            f"participants, {len(records)} scans; sites "
            f"{esc(', '.join(sorted({str(r.site) for r in records})))}.</p>"]
    body += _model_section(model, None if model_path is None else Path(model_path))
    found = [] if recovery is None else (
        [recovery] if not isinstance(recovery, Sequence) else list(recovery))
    for k, one in enumerate(found):
        body += _recovery_section(one, heading=k == 0)
    body.append("<h2>Group trajectories</h2>")
    for index in names:
        body.append(_img(cohort_trajectory_png(records, index),
                         f"{index}: participants (thin) and group means per visit",
                         f"cohort trajectories of {index}"))
    body.append("<h2>Baseline by group</h2>")
    body += _cohort_table(records, names, model)
    body.append("<h2>Participants</h2><table><tr><th class=\"l\">subject</th>"
                "<th class=\"l\">group</th><th class=\"l\">site</th><th>scans</th>"
                "<th>QC failed</th></tr>")
    by_subject: dict[str, list[SessionRecord]] = {}
    for r in records:
        by_subject.setdefault(r.subject, []).append(r)
    for subject, rows in sorted(by_subject.items(), key=lambda kv: _natural_key(kv[0])):
        body.append(f"<tr><td class=\"l\">{esc(subject)}</td><td class=\"l\">"
                    f"{esc(rows[0].group)}</td><td class=\"l\">{esc(rows[0].site)}</td>"
                    f"<td>{len(rows)}</td>"
                    f"<td>{sum(r.qc_status == 'fail' for r in rows)}</td></tr>")
    body.append("</table>")
    body.append(f"<p class=\"note\">Page written {esc(_now())} by alsiron "
                f"{esc(alsiron.__version__)}; per-session provenance is on each subject's "
                "page and in the registry export.</p>")
    return _page("alsiron cohort", body)


def _recovery_section(recovery: EffectRecovery, *, heading: bool = True) -> list[str]:
    """Simulated against recovered ALS effect (:mod:`alsiron.sim.recovery`)."""
    lo, hi = 1.0 - recovery.tolerance, 1.0 + recovery.tolerance
    out = ["<h2>Simulated ALS effect, recovered</h2>" if heading
           else f"<h3>{esc(recovery.index)}</h3>",
           f"<p>Simulated cohort: the ALS − control difference of <b>{esc(recovery.index)}"
           f"</b> at baseline and its yearly progression, as recovered by this run, over "
           f"the values the simulation put in (read from its truth sidecars, "
           f"{esc(recovery.source or 'derivatives/phantom')}). Pass mark: recovered / "
           f"simulated within {lo:.2f}–{hi:.2f} (±{100 * recovery.tolerance:.0f} %). "
           f"{recovery.n_als} ALS and {recovery.n_control} control participants, "
           f"{recovery.n_sessions} sessions.</p>",
           "<table><tr><th class=\"l\">effect</th><th>simulated</th><th>recovered</th>"
           "<th>recovered / simulated</th><th>95 % interval</th>"
           "<th class=\"l\">verdict</th>"
           "<th>perfect χ map at this grid / simulated</th></tr>"]
    for e in recovery.effects:
        unit = "ppb/year" if "year" in e.units else "ppb"
        cls = "" if e.passed else " class=\"fail\""
        verdict = ("pass" if e.passed else "fail") + (
            "" if e.decided else " (interval too wide to decide)")
        out.append(f"<tr{cls}><td class=\"l\">{esc(e.name)}</td>"
                   f"<td>{_fmt(1e3 * e.simulated)} {unit}</td>"
                   f"<td>{_fmt(1e3 * e.recovered)} {unit}</td><td>{_fmt(e.ratio)}</td>"
                   f"<td>{_fmt(e.interval[0])}–{_fmt(e.interval[1])}</td>"
                   f"<td class=\"l\">{verdict}</td>"
                   f"<td>{_fmt(e.truth_map_ratio)}</td></tr>")
    out.append("</table>")
    if not heading:
        out.append("<p class=\"note\">The same comparison for this index, with the same "
                   "simulated values (the simulation changes the deep band only, not the "
                   "white matter). A <i>_gtm</i> index is partial-volume corrected: the "
                   "band's value fitted on the tissue fractions of a label image finer "
                   "than the maps (geometric transfer matrix, alsiron.motor.pvc), "
                   "against the white matter at the same place; a <i>_gtmrc</i> index is "
                   "that value divided by the QSM chain's transfer of a deep-band change, "
                   "measured on each visit by running the chain again with the band's χ "
                   "raised. Neither has a truth-map ceiling column.</p>")
        out += [f"<p class=\"warn\">{esc(n)}</p>" for n in recovery.notes]
        return out
    out.append("<p class=\"note\">Simulated: χ added to the deep precentral layer "
               "(participant offset + ALS excess / deep fraction, from PhantomParameters). "
               "Both columns use the same estimators on the same sessions: mean first "
               "visit of ALS minus controls; mean per-participant least-squares slope of "
               "ALS minus controls. The interval is the 2.5–97.5 percentile range of the "
               "ratio over resamplings of the participants within each group: the chain's "
               "error differs between participants (it depends on the anatomy) and does "
               "not cancel, so a verdict whose interval reaches across the pass band needs "
               "a larger cohort. The last column averages the truth χ map over the true "
               "deep labels of the output grid: the partial-volume ceiling of this voxel "
               "size.</p>")
    out += [f"<p class=\"warn\">{esc(n)}</p>" for n in recovery.notes]
    return out


def _cohort_table(records: Sequence[SessionRecord], indices: Sequence[str],
                  model: NormativeModel | None) -> list[str]:
    baseline: dict[str, SessionRecord] = {}
    for r in sorted(records, key=_visit_key):
        if r.run == 1 and r.qc_status != "fail":
            baseline.setdefault(r.subject, r)
    groups = sorted({str(r.group) for r in baseline.values()})
    by_subject: dict[str, list[SessionRecord]] = {}
    for r in records:
        by_subject.setdefault(r.subject, []).append(r)
    star = "*" if model is not None else ""
    lines = ["<table><tr><th class=\"l\">index</th><th class=\"l\">group</th><th>n</th>"
             f"<th>mean</th><th>SD</th><th>mean z{star}</th><th>SD z{star}</th></tr>"]
    for index in indices:
        scale, unit = _display(index)
        for group in groups:
            rows = [r for r in baseline.values()
                    if str(r.group) == group and math.isfinite(r.indices.get(index, math.nan))]
            v = np.array([r.indices[index] * scale for r in rows])
            # The model's own controls are scored leave-one-subject-out: in-sample z of
            # the controls a model was fitted to is too narrow to show its calibration.
            z = np.array([model.held_out_z_scores(r, by_subject[r.subject])[index].z
                          for r in rows]) if (
                model is not None and index in model.indices) else np.array([])
            z = z[np.isfinite(z)]
            lines.append(
                f"<tr><td class=\"l\">{esc(index)} ({esc(unit)})</td><td class=\"l\">"
                f"{esc(group)}</td><td>{len(v)}</td>"
                f"<td>{_fmt(v.mean() if v.size else None)}</td>"
                f"<td>{_fmt(v.std(ddof=1) if v.size > 1 else None)}</td>"
                f"<td>{_fmt(z.mean() if z.size else None)}</td>"
                f"<td>{_fmt(z.std(ddof=1) if z.size > 1 else None)}</td></tr>")
    lines.append("</table>")
    if model is not None:
        lines.append("<p class=\"note\">* Baseline scan of each participant. Controls that "
                     "are in the normative model are scored leave-one-subject-out (against "
                     "the model refitted without them), so their z-scores are held-out like "
                     "everyone else's; a calibrated model gives controls mean z ≈ 0 and "
                     "SD z ≈ 1.</p>")
    return lines


def write_report(path: str | os.PathLike[str], page: str, *, overwrite: bool = False) -> Path:
    """Write a rendered page atomically (refuses to replace unless ``overwrite``)."""
    return save_text(path, page, overwrite=overwrite)


def find_qc_images(folder: str | os.PathLike[str]) -> list[Path]:
    """QC montage PNGs under a subject's derivatives folder (``*.png``, sorted)."""
    root = Path(folder)
    return sorted(root.rglob("*.png")) if root.is_dir() else []


def subject_records(records: Iterable[SessionRecord], subject: str) -> list[SessionRecord]:
    """The records of one subject, in visit order."""
    return sorted((r for r in records if r.subject == subject), key=_visit_key)
