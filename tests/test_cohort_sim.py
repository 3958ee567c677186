"""The index-level cohort simulator reproduces the effects it is asked for."""

import numpy as np
import pytest

from alsiron.cohort.records import HEADLINE_INDEX, index_units
from alsiron.sim.cohort import simulate_index_cohort


def _values(records, **where):
    return np.array([r.indices[HEADLINE_INDEX] for r in records
                     if all(getattr(r, k) == v for k, v in where.items())])


def test_baseline_effect_size_and_retest_sd_match_the_truth():
    records, truth = simulate_index_cohort(1500, 2, seed=3, repeat_fraction=0.5)
    als = _values(records, session="ses-01", run=1, group="ALS")
    ctl = _values(records, session="ses-01", run=1, group="control")
    d = (als.mean() - ctl.mean()) / np.sqrt((als.var(ddof=1) + ctl.var(ddof=1)) / 2)
    # SE of d with 750 per group is about 0.055; 0.12 is > 2 SE.
    assert d == pytest.approx(truth.cohens_d, abs=0.12)
    by_visit: dict[tuple[str, str], list[float]] = {}
    for r in records:
        by_visit.setdefault((r.subject, r.session), []).append(r.indices[HEADLINE_INDEX])
    diffs = np.array([v[1] - v[0] for v in by_visit.values() if len(v) == 2])
    assert len(diffs) > 1000
    assert diffs.std(ddof=1) / np.sqrt(2) == pytest.approx(truth.within_subject_sd_ppm,
                                                           rel=0.06)


def test_als_progression_is_recovered_from_visit_differences():
    records, truth = simulate_index_cohort(400, 3, seed=1, within_subject_sd_ppm=0.0)
    slopes = {"ALS": [], "control": []}
    for subj in {r.subject for r in records}:
        rows = sorted((r for r in records if r.subject == subj),
                      key=lambda r: r.years_since_baseline)
        t = np.array([r.years_since_baseline for r in rows])
        y = np.array([r.indices[HEADLINE_INDEX] for r in rows])
        slopes[rows[0].group].append(np.polyfit(t, y, 1)[0])
    gap = np.mean(slopes["ALS"]) - np.mean(slopes["control"])
    assert gap == pytest.approx(truth.progression_ppm_per_year, rel=1e-6)


def test_index_units_follow_the_name():
    assert index_units("chi_precentral_L_hand_deep_mean") == "ppm"
    assert index_units("r2star_precentral_p90") == "1/s"
    assert index_units("chi_precentral_n") == "voxel"
    with pytest.raises(ValueError, match="not of the form"):
        index_units("precentral_mean")
