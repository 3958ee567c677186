"""How well a simulated cohort's ALS effect comes back: the ALS − control difference at
baseline and the yearly progression of the headline index, simulated (from the phantom's
own truth sidecars) against recovered (from the registry's records).

The simulated value of a session is read from the ``PhantomParameters`` of its truth
sidecar (``derivatives/phantom/.../*_Chimap.json``), never re-typed: the χ put into the deep
precentral layer relative to the tissue table is ``precentral_offset_ppm`` (between-
subject, age and site terms, added to every precentral label) plus, for ALS,
``als_precentral_excess_ppm / precentral_deep_fraction`` (the excess is placed in the deep
layer only, :func:`alsiron.sim.phantom._subject_tables`).  The same two estimators are
applied to the simulated and to the recovered values of the same sessions, so the random
draw of the participants (offsets, ages, sites) cancels in the ratio:

* baseline difference: mean over ALS participants of their first visit's value minus the
  same mean over controls;
* progression: per participant, the least-squares slope of the value on
  ``years_since_baseline`` (participants with two visits or more); mean ALS slope minus
  mean control slope.

A third column reads the same quantities from the truth χ map itself, averaged over the
true deep precentral labels of the output grid (``dseg``): what a perfect map would give
at this voxel size, whose partial volume dilutes a one-voxel layer.

The draw cancels in the ratio, but the chain's own error of each participant does not:
on the anatomical head it is an anatomy-dependent offset of the deep-layer mean (SD
≈ 2.4 ppb between participants at 2.5 mm, stable over a participant's visits;
``docs/qsm_anatomy.md``), of the size of the simulated effect itself.  Each ratio
therefore carries a 95 % interval from resampling participants within each group
(:data:`BOOTSTRAP_REPLICATES` draws, fixed seed), which says whether the cohort is large
enough for its verdict.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from alsiron.cohort.records import HEADLINE_INDEX, SessionRecord
from alsiron.errors import InputError
from alsiron.sim.tissues import PRECENTRAL_DEEP_LABELS

#: Pass mark of a recovered / simulated ratio: within ±20 % of 1 (issue 13).
RECOVERY_TOLERANCE = 0.20

#: Participant resamplings behind each ratio's 95 % interval.
BOOTSTRAP_REPLICATES = 2000

#: (participant, session) → (group, years since baseline, value in ppm).
Visits = Mapping[tuple[str, str], tuple[str, float, float]]


@dataclass(frozen=True)
class SimulatedSession:
    """One simulated session as its truth sidecar records it.

    Attributes
    ----------
    participant_id, session_id, group : str
    years_since_baseline : float
    deep_precentral_ppm : float
        χ added to the deep precentral layer relative to the tissue table [ppm]
        (offset + ALS deep excess), from ``PhantomParameters``.
    truth_map_deep_ppm : float
        Mean of the truth χ map (``Chimap``, demeaned over the brain) over the true deep
        precentral labels of the output grid [ppm]; NaN when the files are missing.
    """

    participant_id: str
    session_id: str
    group: str
    years_since_baseline: float
    deep_precentral_ppm: float
    truth_map_deep_ppm: float


def _deep_value(params: Mapping[str, Any], where: Path) -> float:
    try:
        offset = float(params["precentral_offset_ppm"])
        excess = float(params["als_precentral_excess_ppm"])
        fraction = float(params["precentral_deep_fraction"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(where, f"PhantomParameters lacks {exc}") from None
    return offset + (excess / fraction if fraction > 0 else 0.0)


def _truth_map_value(chimap: Path) -> float:
    dseg = chimap.with_name(chimap.name.replace("_Chimap.nii.gz", "_dseg.nii.gz"))
    if not (chimap.is_file() and dseg.is_file()):
        return math.nan
    chi = np.asarray(nib.load(str(chimap)).dataobj, np.float64)
    deep = np.isin(np.asarray(nib.load(str(dseg)).dataobj), PRECENTRAL_DEEP_LABELS)
    return float(chi[deep].mean()) if deep.any() else math.nan


def read_simulated_sessions(dataset_root: str | Path, *, truth_maps: bool = True
                            ) -> list[SimulatedSession]:
    """Every session of a phantom dataset from its ground truth
    (``derivatives/phantom/sub-*/ses-*/anat/*_Chimap.json``).

    Parameters
    ----------
    dataset_root : path
        Dataset written by :func:`alsiron.sim.phantom.write_dataset`.
    truth_maps : bool
        Also average the truth χ map over the true deep layer (reads two images a session).

    Raises
    ------
    InputError
        No truth sidecar, or one without the simulation's parameters.
    """
    truth = Path(dataset_root) / "derivatives" / "phantom"
    sidecars = sorted(truth.glob("sub-*/ses-*/anat/*_Chimap.json"))
    sidecars = [p for p in sidecars if "_desc-" not in p.name]
    if not sidecars:
        raise InputError(truth, "no phantom truth sidecars (*_Chimap.json)")
    out = []
    for path in sidecars:
        try:
            params = json.loads(path.read_text())["PhantomParameters"]
            pid, sid = params["participant_id"], params["session_id"]
            group, years = str(params["group"]), float(params["years_since_baseline"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(path, f"not a phantom truth sidecar ({exc})") from None
        chimap = path.with_name(path.name.replace(".json", ".nii.gz"))
        out.append(SimulatedSession(
            participant_id=str(pid), session_id=str(sid), group=group,
            years_since_baseline=years, deep_precentral_ppm=_deep_value(params, path),
            truth_map_deep_ppm=_truth_map_value(chimap) if truth_maps else math.nan))
    return out


def baseline_difference(visits: Visits) -> float:
    """Mean first-visit value of ALS participants minus that of controls [ppm] (NaN when a
    group is missing)."""
    rows = participant_summaries(visits).values()
    means = {g: [first for grp, first, _ in rows if grp == g] for g in ("ALS", "control")}
    if not means["ALS"] or not means["control"]:
        return math.nan
    return float(np.mean(means["ALS"]) - np.mean(means["control"]))


def progression_difference(visits: Visits) -> float:
    """Mean per-participant least-squares slope of ALS minus that of controls [ppm/year]
    (participants with >= 2 visits at different times; NaN when a group has none)."""
    rows = participant_summaries(visits).values()
    slopes = {g: [sl for grp, _, sl in rows if grp == g and math.isfinite(sl)]
              for g in ("ALS", "control")}
    if not slopes["ALS"] or not slopes["control"]:
        return math.nan
    return float(np.mean(slopes["ALS"]) - np.mean(slopes["control"]))


def participant_summaries(visits: Visits) -> dict[str, tuple[str, float, float]]:
    """Per participant: (group, first-visit value, least-squares slope on years) — the
    slope NaN with fewer than two visit times.  :func:`baseline_difference` and
    :func:`progression_difference` are group means of these."""
    series: dict[str, tuple[str, list[float], list[float]]] = {}
    for (pid, _), (group, years, value) in visits.items():
        series.setdefault(pid, (group, [], []))
        series[pid][1].append(years)
        series[pid][2].append(value)
    out = {}
    for pid, (group, years, values) in series.items():
        first = values[int(np.argmin(years))]
        slope = (float(np.polyfit(years, values, 1)[0]) if len(set(years)) >= 2
                 else math.nan)
        out[pid] = (group, float(first), slope)
    return out


def ratio_interval(simulated: Visits, recovered: Visits, *, effect: str,
                   replicates: int = BOOTSTRAP_REPLICATES, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of recovered / simulated over participant resamplings.

    Participants are drawn with replacement within each group (a participant's simulated
    and recovered values travel together); ``effect`` is ``"baseline"`` (first-visit
    difference) or ``"progression"`` (slope difference).  (NaN, NaN) when a group has
    fewer than two participants with the effect's value.
    """
    column = {"baseline": 1, "progression": 2}[effect]
    sim, rec = participant_summaries(simulated), participant_summaries(recovered)
    pairs: dict[str, list[tuple[float, float]]] = {"ALS": [], "control": []}
    for pid, row in sim.items():
        if pid in rec and row[0] in pairs:
            a, b = row[column], rec[pid][column]
            if math.isfinite(a) and math.isfinite(b):
                pairs[row[0]].append((a, b))
    if min(len(v) for v in pairs.values()) < 2:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    diff = np.zeros((2, replicates))
    for sign, group in ((1.0, "ALS"), (-1.0, "control")):
        vals = np.asarray(pairs[group])
        draw = rng.integers(0, len(vals), size=(replicates, len(vals)))
        diff += sign * vals[draw].mean(axis=1).T
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = diff[1] / diff[0]
    ratios = ratios[np.isfinite(ratios)]
    if ratios.size == 0:
        return (math.nan, math.nan)
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(ratios, [tail, 100.0 - tail])
    return (float(lo), float(hi))


@dataclass(frozen=True)
class RecoveredEffect:
    """One effect, simulated against recovered.

    Attributes
    ----------
    name : str
        ``"baseline ALS − control"`` or ``"yearly progression"``.
    units : str
    simulated, recovered, truth_map : float
        From the parameters, from the tool's index, from the truth χ map (same units).
    interval : (float, float)
        95 % interval of :attr:`ratio` over participant resamplings
        (:func:`ratio_interval`); NaNs when too few participants.
    """

    name: str
    units: str
    simulated: float
    recovered: float
    truth_map: float
    interval: tuple[float, float] = (math.nan, math.nan)

    @property
    def ratio(self) -> float:
        """Recovered / simulated (NaN when undefined)."""
        if not (math.isfinite(self.simulated) and self.simulated != 0):
            return math.nan
        return self.recovered / self.simulated

    @property
    def truth_map_ratio(self) -> float:
        """Truth map / simulated: the ceiling a perfect χ map reaches at this grid."""
        if not (math.isfinite(self.simulated) and self.simulated != 0):
            return math.nan
        return self.truth_map / self.simulated

    @property
    def passed(self) -> bool:
        """Whether the ratio lies within 1 ± :data:`RECOVERY_TOLERANCE`."""
        return math.isfinite(self.ratio) and abs(self.ratio - 1.0) <= RECOVERY_TOLERANCE

    @property
    def decided(self) -> bool:
        """Whether the cohort is large enough for the verdict: the whole 95 % interval
        lies inside the pass band, or wholly outside it."""
        lo, hi = self.interval
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return False
        band = (1.0 - RECOVERY_TOLERANCE, 1.0 + RECOVERY_TOLERANCE)
        inside = band[0] <= lo and hi <= band[1]
        outside = hi < band[0] or lo > band[1]
        return inside or outside


@dataclass(frozen=True)
class EffectRecovery:
    """ALS effect recovery of one simulated cohort.

    Attributes
    ----------
    index : str
        The index compared (the headline ``chi_precentral_deep_mean``).
    effects : list of RecoveredEffect
        Baseline difference [ppm], then yearly progression [ppm/year] (when follow-ups
        exist).
    n_als, n_control : int
        Participants with a recovered value, per group.
    n_sessions : int
        Sessions compared.
    tolerance : float
        Pass mark (ratio within 1 ± tolerance).
    source : str
        Where the simulated values were read.
    """

    index: str
    effects: list[RecoveredEffect]
    n_als: int
    n_control: int
    n_sessions: int
    tolerance: float = RECOVERY_TOLERANCE
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """One plain-text line per effect (ppb, ppb/year)."""
        out = []
        for e in self.effects:
            verdict = "pass" if e.passed else "FAIL"
            unit = "ppb/year" if "year" in e.units else "ppb"
            lo, hi = e.interval
            spread = (f"95 % interval over participants {lo:.2f}-{hi:.2f}"
                      + ("" if e.decided else ", too wide for this cohort to decide")
                      if math.isfinite(lo) else "no interval: too few participants")
            out.append(
                f"{e.name} of {self.index}: recovered {1e3 * e.recovered:+.2f} {unit} / "
                f"simulated {1e3 * e.simulated:+.2f} {unit} = {e.ratio:.2f} "
                f"(pass mark {1 - self.tolerance:.2f}-{1 + self.tolerance:.2f}: {verdict}; "
                f"{spread}" + (f"; a perfect map at this grid: {e.truth_map_ratio:.2f})"
                               if math.isfinite(e.truth_map_ratio) else ")"))
        return out


def effect_recovery(records: Iterable[SessionRecord], simulated: Sequence[SimulatedSession],
                    *, index: str = HEADLINE_INDEX, source: str = "",
                    truth_map: bool = True) -> EffectRecovery:
    """Compare the recovered ALS effect with the simulated one, on the sessions that have
    both a finite recovered ``index`` (first run of a visit) and a truth sidecar.

    Parameters
    ----------
    records : iterable of SessionRecord
        The registry's records of the cohort.
    simulated : sequence of SimulatedSession
        :func:`read_simulated_sessions` of the same dataset.
    index : str
        Index compared (ppm).
    source : str
        Recorded as :attr:`EffectRecovery.source`.
    truth_map : bool
        Fill the truth-map column (the plain mean of the truth χ map over the true deep
        labels, comparable with ``chi_precentral_deep_mean``); off for other indices.
    """
    truth = {(s.participant_id, s.session_id): s for s in simulated}
    sim: dict[tuple[str, str], tuple[str, float, float]] = {}
    rec: dict[tuple[str, str], tuple[str, float, float]] = {}
    tmap: dict[tuple[str, str], tuple[str, float, float]] = {}
    for r in records:
        value = r.indices.get(index)
        key = (r.subject, r.session)
        if r.run != 1 or key not in truth or value is None or not math.isfinite(value):
            continue
        s = truth[key]
        sim[key] = (s.group, s.years_since_baseline, s.deep_precentral_ppm)
        rec[key] = (s.group, s.years_since_baseline, float(value))
        tmap[key] = (s.group, s.years_since_baseline,
                     s.truth_map_deep_ppm if truth_map else math.nan)
    effects = [RecoveredEffect("baseline ALS − control", "ppm", baseline_difference(sim),
                               baseline_difference(rec), baseline_difference(tmap),
                               ratio_interval(sim, rec, effect="baseline"))]
    if math.isfinite(progression_difference(sim)):
        effects.append(RecoveredEffect(
            "yearly progression (ALS − control slope)", "ppm/year",
            progression_difference(sim), progression_difference(rec),
            progression_difference(tmap), ratio_interval(sim, rec, effect="progression")))
    groups = {pid: g for (pid, _), (g, _, _) in rec.items()}
    notes = []
    if len(rec) < len(truth):
        notes.append(f"{len(truth) - len(rec)} simulated session(s) without a recovered "
                     f"{index} were left out")
    return EffectRecovery(index=index, effects=effects,
                          n_als=sum(g == "ALS" for g in groups.values()),
                          n_control=sum(g == "control" for g in groups.values()),
                          n_sessions=len(rec), source=source, notes=notes)
