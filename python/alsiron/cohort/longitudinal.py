"""Longitudinal change of an index: per-subject change and slope, cohort mixed model.

Per subject (:func:`subject_trajectory`):

* the value of a visit is the mean of its usable runs (QC ``fail`` excluded);
* change from baseline (first visit with a usable run) with its reliable-change index
  ``RCI = change / (S_w * sqrt(1/k0 + 1/k))`` and minimal detectable change
  ``MDC95 = 1.96 * S_w * sqrt(1/k0 + 1/k)``, where ``S_w`` is the within-subject
  (test-retest) SD and ``k0``, ``k`` the runs averaged at baseline and at the visit; for
  single scans ``MDC95 = 2.77 * S_w``;
* the annualised slope by ordinary least squares with its t-based confidence interval.

``S_w`` comes from same-day repeat scans in the records (:func:`within_subject_sd`,
``run >= 2``), else from a value the user gives (a published retest SD, or the normative
model's residual SD, which also holds between-subject variation and so is conservative).

Published retest SDs (≈ 2.4 ppb same scanner, ≈ 4.2 ppb across sites) exceed the ALS
effect (≈ 3 ppb) and its yearly progression, so one participant's change rarely passes
the MDC: the group analysis (:func:`fit_cohort_model`, a linear mixed-effects model
``index ~ years * group`` with random intercepts and slopes) carries the signal.
"""

from __future__ import annotations

import datetime as _dt
import math
import warnings
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from alsiron.cohort.records import HEADLINE_INDEX, SessionRecord, index_units
from alsiron.errors import AlsironError

#: z for a two-sided 95 % interval.
Z95 = 1.959963984540054
#: MDC95 / S_w for single scans: 1.96 * sqrt(2).
MDC95_FACTOR = Z95 * math.sqrt(2.0)
#: Message shown with every single-subject result.
SINGLE_SUBJECT_CAVEAT = (
    "single-subject change is rarely significant: published test-retest SDs of χ "
    "(≈2.4 ppb same scanner, ≈4.2 ppb across sites) exceed the ALS effect and its yearly "
    "progression; group analysis (--cohort) carries the signal")


@dataclass(frozen=True)
class RetestSD:
    """Within-subject (test-retest) SD of one scan and where it came from.

    Attributes
    ----------
    sd : float
        Within-subject SD, index units.
    source : str
        ``"repeat scans"``, ``"given"`` or ``"normative residual"``.
    n_pairs : int
        Sessions with repeats that contributed (0 when given).
    df : int
        Degrees of freedom of the estimate (0 when given).
    """

    sd: float
    source: str
    n_pairs: int = 0
    df: int = 0

    @property
    def mdc95(self) -> float:
        """Minimal detectable change between two single scans, index units."""
        return MDC95_FACTOR * self.sd


@dataclass
class VisitChange:
    """One visit of a subject's trajectory.

    Attributes
    ----------
    session : str
    acq_time : str or None
    years : float
        Years since the subject's first session.
    value : float
        Mean of the visit's usable runs (NaN when none).
    n_runs : int
        Usable runs averaged.
    change, rci, mdc95 : float
        Change from baseline, its reliable-change index and MDC95 (index units; NaN at
        baseline or when unusable).
    qc_status : str
        Worst QC status among the visit's runs.
    flags : list of str
        ``"exceeds_mdc"`` (|change| > MDC95), ``"qc_fail"``, ``"qc_warn"``.
    """

    session: str
    acq_time: str | None
    years: float
    value: float
    n_runs: int
    change: float
    rci: float
    mdc95: float
    qc_status: str
    flags: list[str] = field(default_factory=list)


@dataclass
class SubjectTrajectory:
    """Change and slope of one index for one subject.

    Attributes
    ----------
    subject, group : str
    index, units : str
    visits : list of VisitChange
        In time order.
    slope_per_year, slope_se : float
        OLS slope over usable visits, units/year, and its standard error (NaN with fewer
        than three visits).
    slope_ci : tuple of float
        Confidence interval of the slope (t distribution, ``n - 2`` df).
    retest : RetestSD or None
        SD used for RCI and MDC (None: changes have no RCI).
    """

    subject: str
    group: str | None
    index: str
    units: str
    visits: list[VisitChange]
    slope_per_year: float
    slope_se: float
    slope_ci: tuple[float, float]
    retest: RetestSD | None

    @property
    def follow_up_years(self) -> float:
        """Time between the first and last usable visits, years."""
        t = [v.years for v in self.visits if v.n_runs > 0]
        return max(t) - min(t) if t else 0.0


@dataclass
class CohortModel:
    """Linear mixed-effects model ``index ~ years * group`` with random intercept and slope.

    Attributes
    ----------
    index, units : str
    reference_group : str or None
        Baseline level of the group factor (None with one group).
    groups : list of str
    n_subjects, n_observations : int
    fixed : dict
        Term → ``{"estimate", "se", "ci_low", "ci_high", "p"}`` (index units, years).
    slope_per_year : dict
        Group → yearly slope estimate (reference slope + interaction).
    group_time_term : str or None
        Name of the group × time term of the first non-reference group.
    random_intercept_sd, random_slope_sd, random_correlation, residual_sd : float
        Variance components as SDs (index units; slope SD in units/year).
    random_slopes : bool
        False when the model fell back to random intercepts only.
    converged : bool
    notes : list of str
        Warnings of the fit, fall-backs.
    visit_years : list of float
        Median visit schedule (years since baseline) of the cohort.
    """

    index: str
    units: str
    reference_group: str | None
    groups: list[str]
    n_subjects: int
    n_observations: int
    fixed: dict[str, dict[str, float]]
    slope_per_year: dict[str, float]
    group_time_term: str | None
    random_intercept_sd: float
    random_slope_sd: float
    random_correlation: float
    residual_sd: float
    random_slopes: bool
    converged: bool
    notes: list[str]
    visit_years: list[float]

    @property
    def group_time_effect(self) -> dict[str, float] | None:
        """Estimate and CI of the group × time term (None with one group)."""
        return None if self.group_time_term is None else self.fixed[self.group_time_term]


# ---------------------------------------------------------------------- helpers


def _value(record: SessionRecord, index: str) -> float:
    v = record.indices.get(index)
    return float(v) if v is not None and math.isfinite(float(v)) else math.nan


def _parse_time(text: str | None) -> _dt.datetime | None:
    if not text:
        return None
    try:
        when = _dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return when.replace(tzinfo=None)


def _years_by_session(rows: list[SessionRecord]) -> dict[str, float]:
    """Years since the subject's first session, from the records or their acq_time."""
    out: dict[str, float] = {}
    times: dict[str, _dt.datetime | None] = {}
    for r in sorted(rows, key=lambda x: -x.run):   # the first run of a session wins
        times[r.session] = _parse_time(r.acq_time)
    first = min((t for t in times.values() if t is not None), default=None)
    for r in rows:
        if r.session in out:
            continue
        if r.years_since_baseline is not None and math.isfinite(r.years_since_baseline):
            out[r.session] = float(r.years_since_baseline)
        elif first is not None and times.get(r.session) is not None:
            out[r.session] = (times[r.session] - first).total_seconds() / (365.25 * 86400)
        else:
            raise AlsironError(f"{r.subject} {r.session}: neither years_since_baseline nor "
                               "acq_time is recorded, so the visit cannot be placed in time")
    return out


_QC_RANK = {"pass": 0, "warn": 1, "fail": 2}


def within_subject_sd(records: Iterable[SessionRecord], index: str = HEADLINE_INDEX
                      ) -> RetestSD | None:
    """Test-retest SD from sessions scanned more than once (``run >= 2``) the same day.

    Pooled within-session variance ``sum_s sum_r (x_sr - mean_s)^2 / sum_s (k_s - 1)``
    over sessions with at least two usable runs (QC not ``fail``, finite value).

    Returns
    -------
    RetestSD or None
        None when no session has a usable repeat.
    """
    by_session: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in records:
        v = _value(r, index)
        if r.qc_status != "fail" and math.isfinite(v):
            by_session[(r.subject, r.session)].append(v)
    ss, df, pairs = 0.0, 0, 0
    for values in by_session.values():
        if len(values) >= 2:
            x = np.asarray(values)
            ss += float(((x - x.mean()) ** 2).sum())
            df += len(x) - 1
            pairs += 1
    if df == 0:
        return None
    return RetestSD(sd=math.sqrt(ss / df), source="repeat scans", n_pairs=pairs, df=df)


def retest_from_normative(path, index: str = HEADLINE_INDEX) -> RetestSD:
    """Residual SD of ``index`` from a normative model file (``alsiron normative build``).

    The normative residual SD holds between-subject as well as scan-to-scan variation, so
    RCIs and MDCs from it are conservative (too wide); use it only without repeat scans.

    Raises
    ------
    InputError
        The file is missing, not JSON, not a normative model, or lacks ``index``.
    """
    import json
    from pathlib import Path

    from alsiron.errors import InputError

    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "no such normative model (build one with alsiron normative "
                               "build)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"cannot read the normative model: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != "alsiron-normative-model":
        raise InputError(path, "not an alsiron normative model")
    try:
        sd = float(doc["indices"][index]["residual_sd"])
    except (KeyError, TypeError, ValueError):
        raise InputError(path, f"the normative model has no residual SD for {index}") from None
    if not (math.isfinite(sd) and sd > 0):
        raise InputError(path, f"residual SD of {index} is {sd}, not a positive number")
    return RetestSD(sd=sd, source="normative residual (conservative)")


def ols_slope(years: np.ndarray, values: np.ndarray, *, confidence: float = 0.95
              ) -> tuple[float, float, tuple[float, float]]:
    """OLS slope of ``values`` on ``years`` with its SE and t-based CI.

    Returns
    -------
    slope, se : float
        Units per year; SE is NaN with fewer than three points.
    ci : tuple of float
        ``slope ± t_{n-2} * se`` (NaN with fewer than three points).
    """
    t = np.asarray(years, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    n = t.size
    nan2 = (math.nan, math.nan)
    if n < 2 or np.ptp(t) == 0:
        return math.nan, math.nan, nan2
    tc = t - t.mean()
    sxx = float(tc @ tc)
    slope = float(tc @ (y - y.mean()) / sxx)
    if n < 3:
        return slope, math.nan, nan2
    resid = y - y.mean() - slope * tc
    se = math.sqrt(float(resid @ resid) / (n - 2) / sxx)
    q = float(stats.t.ppf(0.5 + confidence / 2, n - 2))
    return slope, se, (slope - q * se, slope + q * se)


# ---------------------------------------------------------------------- per subject


def subject_trajectory(records: Iterable[SessionRecord], index: str = HEADLINE_INDEX, *,
                       retest: RetestSD | None = None, confidence: float = 0.95
                       ) -> SubjectTrajectory:
    """Change from baseline, RCI, MDC and OLS slope of one subject's index.

    Parameters
    ----------
    records : iterable of SessionRecord
        The subject's records (every session and run); other subjects are refused.
    index : str
        Index name (``SessionRecord.indices`` key).
    retest : RetestSD, optional
        Within-subject SD for RCI and MDC; default: from the subject's own repeat scans,
        else none (changes then have no RCI or MDC).
    confidence : float
        Level of the slope's confidence interval.

    Raises
    ------
    AlsironError
        No records, several subjects, or no usable value of ``index``.
    """
    rows = list(records)
    if not rows:
        raise AlsironError("no records for this subject")
    subjects = {r.subject for r in rows}
    if len(subjects) != 1:
        raise AlsironError(f"records of several subjects given: {sorted(subjects)}")
    subject = rows[0].subject
    units = index_units(index)
    if retest is None:
        retest = within_subject_sd(rows, index)
    years = _years_by_session(rows)
    sessions = sorted({r.session for r in rows}, key=lambda s: (years[s], s))
    visits = []
    for ses in sessions:
        runs = [r for r in rows if r.session == ses]
        usable = [_value(r, index) for r in runs if r.qc_status != "fail"]
        usable = [v for v in usable if math.isfinite(v)]
        worst = max((r.qc_status for r in runs), key=lambda s: _QC_RANK.get(s, 0))
        first = min(runs, key=lambda r: r.run)
        visits.append(VisitChange(
            session=ses, acq_time=first.acq_time, years=years[ses],
            value=float(np.mean(usable)) if usable else math.nan, n_runs=len(usable),
            change=math.nan, rci=math.nan, mdc95=math.nan, qc_status=worst))
    usable_visits = [v for v in visits if v.n_runs > 0]
    if not usable_visits:
        raise AlsironError(f"{subject}: no usable value of {index} (missing or QC failed)")
    base = usable_visits[0]
    for v in visits:
        if v.qc_status == "fail":
            v.flags.append("qc_fail")
        elif v.qc_status == "warn":
            v.flags.append("qc_warn")
        if v.n_runs == 0 or v is base:
            continue
        v.change = v.value - base.value
        if retest is not None and retest.sd > 0:
            se = retest.sd * math.sqrt(1.0 / base.n_runs + 1.0 / v.n_runs)
            v.rci = v.change / se
            v.mdc95 = Z95 * se
            if abs(v.change) > v.mdc95:
                v.flags.append("exceeds_mdc")
    slope, se, ci = ols_slope(np.array([v.years for v in usable_visits]),
                              np.array([v.value for v in usable_visits]),
                              confidence=confidence)
    return SubjectTrajectory(subject=subject, group=rows[0].group, index=index, units=units,
                             visits=visits, slope_per_year=slope, slope_se=se, slope_ci=ci,
                             retest=retest)


def cohort_trajectories(records: Iterable[SessionRecord], index: str = HEADLINE_INDEX, *,
                        retest: RetestSD | None = None, confidence: float = 0.95
                        ) -> list[SubjectTrajectory]:
    """:func:`subject_trajectory` for every subject, with one cohort-wide retest SD.

    The SD comes from all repeat scans of the cohort unless ``retest`` is given; subjects
    without a usable value are skipped.
    """
    rows = list(records)
    if retest is None:
        retest = within_subject_sd(rows, index)
    by_subject: dict[str, list[SessionRecord]] = defaultdict(list)
    for r in rows:
        by_subject[r.subject].append(r)
    out = []
    for subject in sorted(by_subject):
        try:
            out.append(subject_trajectory(by_subject[subject], index, retest=retest,
                                          confidence=confidence))
        except AlsironError:
            continue
    return out


# ---------------------------------------------------------------------- cohort model


def cohort_table(records: Iterable[SessionRecord], index: str = HEADLINE_INDEX):
    """Long table (pandas DataFrame) of usable observations: subject, group, years, value,
    run, session."""
    import pandas as pd

    rows = list(records)
    by_subject: dict[str, list[SessionRecord]] = defaultdict(list)
    for r in rows:
        by_subject[r.subject].append(r)
    out = []
    for subject, recs in by_subject.items():
        years = _years_by_session(recs)
        for r in recs:
            v = _value(r, index)
            if r.qc_status != "fail" and math.isfinite(v):
                out.append({"subject": subject, "group": r.group or "unknown",
                            "years": years[r.session], "value": v, "run": r.run,
                            "session": r.session})
    return pd.DataFrame(out, columns=["subject", "group", "years", "value", "run", "session"])


def fit_cohort_model(records: Iterable[SessionRecord], index: str = HEADLINE_INDEX, *,
                     reference_group: str = "control", random_slopes: bool = True,
                     confidence: float = 0.95) -> CohortModel:
    """Fit ``index ~ years * group`` with random intercepts (and slopes) per subject.

    statsmodels ``MixedLM`` by REML on the usable observations (QC ``fail`` excluded;
    repeat scans enter as extra observations at the same time).  The index is standardised
    before fitting (χ in ppm has variances near 1e-6, which optimisers handle badly) and
    every estimate is scaled back.  When the random-slope fit does not converge or lands
    on a singular covariance, the model is refitted with random intercepts only and the
    fall-back is noted.

    Parameters
    ----------
    records : iterable of SessionRecord
    index : str
    reference_group : str
        Group whose slope is the reference (``control``); with a single group the model
        is ``index ~ years``.
    random_slopes : bool
        Try random slopes (else random intercepts only).
    confidence : float
        Level of the fixed effects' confidence intervals.

    Raises
    ------
    AlsironError
        Fewer than three subjects or no follow-up visits.
    """
    import statsmodels.formula.api as smf

    df = cohort_table(records, index)
    n_subjects = int(df["subject"].nunique()) if len(df) else 0
    if n_subjects < 3:
        raise AlsironError(f"the cohort model needs at least 3 subjects with usable {index}, "
                           f"got {n_subjects}")
    if df["years"].max() <= 0:
        raise AlsironError("the cohort model needs follow-up visits (all at baseline)")
    groups = sorted(df["group"].unique(), key=lambda g: (g != reference_group, g))
    reference = groups[0] if len(groups) > 1 else None
    center, scale = float(df["value"].mean()), float(df["value"].std(ddof=1))
    if not scale > 0:
        raise AlsironError(f"{index} does not vary across the cohort")
    df = df.assign(y=(df["value"] - center) / scale)
    if reference is None:
        formula = "y ~ years"
    else:
        df["group"] = df["group"].astype("category").cat.reorder_categories(groups)
        formula = "y ~ years * C(group)"
    notes: list[str] = []

    def fit(re_formula: str | None):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = smf.mixedlm(formula, df, groups=df["subject"], re_formula=re_formula)
            try:
                result = model.fit(reml=True, method=["lbfgs", "powell"])
            except (np.linalg.LinAlgError, ValueError) as exc:
                return None, [f"fit failed: {exc}"]
        msgs = sorted({str(w.message).splitlines()[0] for w in caught})
        return result, msgs

    result, msgs = (fit("~years") if random_slopes else (None, []))
    use_slopes = result is not None
    if result is not None:
        cov = np.asarray(result.cov_re)
        singular = cov.shape == (2, 2) and np.linalg.eigvalsh(cov).min() <= 1e-8 * max(
            float(np.trace(cov)), 1e-300)
        if not result.converged or singular:
            notes.append("random-slope model " + ("did not converge" if not result.converged
                                                  else "has a singular random-effects "
                                                       "covariance (slope variance ≈ 0)")
                         + "; refitted with random intercepts only")
            notes.extend(msgs)
            use_slopes = False
        else:
            notes.extend(msgs)
    if not use_slopes:
        result, msgs = fit(None)
        if result is None:
            raise AlsironError(f"mixed model of {index} failed: {'; '.join(msgs)}")
        notes.extend(msgs)

    q = float(stats.norm.ppf(0.5 + confidence / 2))
    fixed = {}
    for term in result.fe_params.index:
        est = float(result.fe_params[term])
        se = float(result.bse_fe[term])
        e, s = est * scale, se * scale
        if term == "Intercept":
            e += center
        p = float(2 * stats.norm.sf(abs(e / s))) if s > 0 else math.nan
        fixed[_term_name(term)] = {"estimate": e, "se": s, "ci_low": e - q * s,
                                   "ci_high": e + q * s, "p": p}
    slope_by_group = {}
    group_time_term = None
    if reference is None:
        slope_by_group[groups[0]] = fixed["years"]["estimate"]
    else:
        slope_by_group[reference] = fixed["years"]["estimate"]
        for g in groups[1:]:
            term = f"years:group[{g}]"
            slope_by_group[g] = fixed["years"]["estimate"] + fixed[term]["estimate"]
            group_time_term = group_time_term or term
    cov = np.asarray(result.cov_re) * scale**2
    intercept_sd = math.sqrt(max(float(cov[0, 0]), 0.0))
    slope_sd = math.sqrt(max(float(cov[1, 1]), 0.0)) if use_slopes else 0.0
    corr = (float(cov[0, 1]) / (intercept_sd * slope_sd)
            if use_slopes and intercept_sd > 0 and slope_sd > 0 else math.nan)
    per_subject = [sorted(set(g)) for _, g in df.groupby("subject")["years"]]
    schedule = [float(np.median([t[k] for t in per_subject if len(t) > k]))
                for k in range(max(len(t) for t in per_subject))]
    return CohortModel(
        index=index, units=index_units(index), reference_group=reference, groups=groups,
        n_subjects=n_subjects, n_observations=len(df), fixed=fixed,
        slope_per_year=slope_by_group, group_time_term=group_time_term,
        random_intercept_sd=intercept_sd, random_slope_sd=slope_sd,
        random_correlation=corr, residual_sd=math.sqrt(float(result.scale)) * scale,
        random_slopes=use_slopes, converged=bool(result.converged), notes=notes,
        visit_years=schedule)


def _term_name(term: str) -> str:
    """``years:C(group)[T.ALS]`` → ``years:group[ALS]``."""
    return term.replace("C(group)[T.", "group[")


# ---------------------------------------------------------------------- outputs


def write_visit_table(path, trajectories: list[SubjectTrajectory], *,
                      overwrite: bool = False):
    """Per-visit TSV (one row per subject and visit) with a JSON data dictionary beside it.

    Columns: subject, group, session, acq_time, years, value, n_runs, change, rci, mdc95,
    qc_status, flags and the subject's slope with its CI; ``n/a`` where undefined.
    """
    from pathlib import Path

    from alsiron.errors import OutputExistsError
    from alsiron.io.atomic import save_json, save_text

    path = Path(path)
    dictionary = path.with_suffix(".json")
    if dictionary.exists() and not overwrite:
        raise OutputExistsError(f"{dictionary}: already exists (use --overwrite)")
    header = ["subject", "group", "index", "session", "acq_time", "years", "value", "n_runs",
              "change", "rci", "mdc95", "qc_status", "flags", "slope_per_year",
              "slope_ci_low", "slope_ci_high", "retest_sd", "retest_source"]

    def cell(v: object) -> str:
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "n/a"
        return repr(v) if isinstance(v, float) else str(v)

    lines = ["\t".join(header)]
    for tr in trajectories:
        for v in tr.visits:
            row = [tr.subject, tr.group, tr.index, v.session, v.acq_time, v.years, v.value,
                   v.n_runs, v.change, v.rci, v.mdc95, v.qc_status, ",".join(v.flags) or None,
                   tr.slope_per_year, tr.slope_ci[0], tr.slope_ci[1],
                   tr.retest.sd if tr.retest else None,
                   tr.retest.source if tr.retest else None]
            lines.append("\t".join(cell(c) for c in row))
    units = trajectories[0].units if trajectories else ""
    save_text(path, "\n".join(lines) + "\n", overwrite=overwrite)
    save_json(dictionary, {
        "years": {"Description": "Time since the subject's first session", "Units": "year"},
        "value": {"Description": "Mean of the visit's usable runs", "Units": units},
        "n_runs": {"Description": "Usable runs averaged (QC fail excluded)"},
        "change": {"Description": "Change from the first usable visit", "Units": units},
        "rci": {"Description": "Reliable-change index, change / (S_w sqrt(1/k0 + 1/k))"},
        "mdc95": {"Description": "Minimal detectable change (95 %), 1.96 S_w sqrt(1/k0+1/k) "
                                 "= 2.77 S_w for single scans", "Units": units},
        "flags": {"Description": "exceeds_mdc, qc_fail, qc_warn"},
        "slope_per_year": {"Description": "OLS slope over usable visits",
                           "Units": f"{units}/year"},
        "slope_ci_low": {"Description": "Lower 95 % limit of the slope (t, n-2 df)",
                         "Units": f"{units}/year"},
        "slope_ci_high": {"Description": "Upper 95 % limit of the slope",
                          "Units": f"{units}/year"},
        "retest_sd": {"Description": "Within-subject (test-retest) SD used", "Units": units},
        "retest_source": {"Description": "repeat scans, given, or normative residual"},
        "Caveat": SINGLE_SUBJECT_CAVEAT,
    }, overwrite=True)
    return path


def model_summary(model: CohortModel) -> dict:
    """JSON-ready summary of a fitted :class:`CohortModel` (units as in ``model.units``)."""
    from dataclasses import asdict

    import alsiron

    out = asdict(model)
    out["formula"] = f"{model.index} ~ years * group" if model.reference_group else \
        f"{model.index} ~ years"
    out["random_effects"] = "intercept + slope" if model.random_slopes else "intercept"
    out["software_version"] = alsiron.__version__
    out["method"] = "statsmodels MixedLM, REML, standardised response"
    return out
