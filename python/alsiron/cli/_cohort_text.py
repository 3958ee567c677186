"""Plain-text tables of ``alsiron longitudinal`` and ``alsiron power``: values in display
units (χ in ppb), trajectories, the cohort summary and the mixed model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # scipy.stats behind it would slow every `alsiron --help`
    from alsiron.cohort.longitudinal import CohortModel, RetestSD, SubjectTrajectory


def fmt(value: float | None, units: str, *, signed: bool = False) -> str:
    """χ in ppb (values are ppm), other units as stored; "n/a" for a missing value."""
    if value is None or not np.isfinite(value):
        return "n/a"
    if units == "ppm":
        return f"{value * 1000:{'+' if signed else ''}.2f} ppb"
    return f"{value:{'+' if signed else ''}.3g} {units}"


def retest_line(retest: RetestSD | None, units: str) -> str:
    """The test-retest SD, where it comes from and the MDC95 it implies, or why there is
    none."""
    if retest is None:
        return ("no test-retest SD (no same-day repeat scans in the registry, no "
                "--retest-sd, no --normative): changes are shown without RCI/MDC")
    where = (f"from {retest.n_pairs} same-day repeat session(s), {retest.df} df"
             if retest.source == "repeat scans" else retest.source)
    return (f"test-retest SD {fmt(retest.sd, units)} ({where}); "
            f"MDC95 = 2.77 x SD = {fmt(retest.mdc95, units)} for single scans")


def trajectory_text(tr: SubjectTrajectory, units: str) -> str:
    """One subject's visits (value, change from baseline, RCI, MDC95, flags) and slope per
    year, in display units."""
    usable = [v for v in tr.visits if v.n_runs > 0]
    lines = [f"{tr.subject} ({tr.group or 'group n/a'}), {tr.index}: {len(usable)} usable "
             f"visit(s) over {tr.follow_up_years:.2f} years",
             f"  {'session':<10} {'date':<10} {'years':>5}  {'value':>11}  {'change':>11}  "
             f"{'RCI':>6}  {'MDC95':>9}  flags"]
    for v in tr.visits:
        date = (v.acq_time or "n/a")[:10]
        change = "baseline" if v is usable[0] else fmt(v.change, units, signed=True)
        rci = f"{v.rci:+.2f}" if np.isfinite(v.rci) else "n/a"
        lines.append(f"  {v.session:<10} {date:<10} {v.years:5.2f}  {fmt(v.value, units):>11}"
                     f"  {change:>11}  {rci:>6}  {fmt(v.mdc95, units):>9}  "
                     f"{','.join(v.flags)}")
    lo, hi = tr.slope_ci
    ci = (f" (95% CI {fmt(lo, units, signed=True)} to {fmt(hi, units, signed=True)})"
          if np.isfinite(lo) else " (no CI: fewer than 3 visits)")
    lines.append(f"  slope {fmt(tr.slope_per_year, units, signed=True)}/year{ci}")
    return "\n".join(lines)


def cohort_text(trajectories: Sequence[SubjectTrajectory], units: str) -> str:
    """One line per subject: visits, follow-up [years], slope per year with its 95 % CI,
    visits beyond the MDC and failed QC."""
    lines = [f"  {'subject':<12} {'group':<8} {'visits':>6} {'years':>5}  "
             f"{'slope/year':>12}  {'95% CI':>25}  >MDC  QC fail"]
    for tr in trajectories:
        lo, hi = tr.slope_ci
        ci = (f"{fmt(lo, units, signed=True)}..{fmt(hi, units, signed=True)}"
              if np.isfinite(lo) else "n/a")
        n_mdc = sum("exceeds_mdc" in v.flags for v in tr.visits)
        n_fail = sum("qc_fail" in v.flags for v in tr.visits)
        lines.append(f"  {tr.subject:<12} {(tr.group or 'n/a'):<8} "
                     f"{sum(v.n_runs > 0 for v in tr.visits):>6} {tr.follow_up_years:5.2f}  "
                     f"{fmt(tr.slope_per_year, units, signed=True):>12}  {ci:>25}  "
                     f"{n_mdc:>4}  {n_fail:>7}")
    return "\n".join(lines)


def model_text(model: CohortModel) -> str:
    """The cohort mixed model: slope per year by group, group x time effect and SDs."""
    u = model.units
    lines = [f"mixed model {model.index} ~ years * group, random intercept"
             f"{' and slope' if model.random_slopes else ' only'} per subject "
             f"({model.n_subjects} subjects, {model.n_observations} scans):"]
    for group, slope in model.slope_per_year.items():
        lines.append(f"  {group} slope {fmt(slope, u, signed=True)}/year")
    eff = model.group_time_effect
    if eff is not None:
        lines.append(f"  group x time ({model.group_time_term}) "
                     f"{fmt(eff['estimate'], u, signed=True)}/year, 95% CI "
                     f"{fmt(eff['ci_low'], u, signed=True)} to "
                     f"{fmt(eff['ci_high'], u, signed=True)}, p = {eff['p']:.2g}")
    lines.append(f"  SDs: intercept {fmt(model.random_intercept_sd, u)}, slope "
                 f"{fmt(model.random_slope_sd, u)}/year, residual {fmt(model.residual_sd, u)}")
    lines += [f"  note: {n}" for n in model.notes]
    return "\n".join(lines)
