"""Longitudinal statistics against the index-level cohort simulator's ground truth."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from scipy import stats

from alsiron.cli import main
from alsiron.cohort import longitudinal as lg
from alsiron.cohort.records import HEADLINE_INDEX
from alsiron.cohort.registry import Registry
from alsiron.errors import AlsironError
from alsiron.sim.cohort import simulate_index_cohort
from alsiron.sim.phantom import PRECENTRAL_AGE_SLOPE_PPM_PER_YEAR


def _by_subject(records):
    out = {}
    for r in records:
        out.setdefault(r.subject, []).append(r)
    return out


def test_slopes_recover_progression_when_noise_allows():
    # 0.2 ppb scan noise over 2.5 years: slope SE ≈ 0.1 ppb/year, 5 % of the progression.
    records, truth = simulate_index_cohort(24, 6, seed=4, within_subject_sd_ppm=0.0002)
    trajectories = lg.cohort_trajectories(records)
    als = [t for t in trajectories if t.group == "ALS"]
    ctl = [t for t in trajectories if t.group == "control"]
    assert len(als) == 12 and len(ctl) == 12
    true_als = truth.progression_ppm_per_year + PRECENTRAL_AGE_SLOPE_PPM_PER_YEAR
    for t in als:
        assert t.slope_per_year == pytest.approx(true_als, rel=0.15)
        assert t.slope_ci[0] < t.slope_per_year < t.slope_ci[1]
    for t in ctl:
        assert abs(t.slope_per_year - PRECENTRAL_AGE_SLOPE_PPM_PER_YEAR) < \
            0.15 * truth.progression_ppm_per_year


def test_slope_confidence_intervals_cover_at_the_nominal_rate():
    records, truth = simulate_index_cohort(300, 4, seed=7)
    trajectories = lg.cohort_trajectories(records)
    covered = []
    for t in trajectories:
        true = PRECENTRAL_AGE_SLOPE_PPM_PER_YEAR + (
            truth.progression_ppm_per_year if t.group == "ALS" else 0.0)
        covered.append(t.slope_ci[0] <= true <= t.slope_ci[1])
    # 300 intervals at 95 %: SE of the coverage 1.3 %.
    assert 0.91 <= np.mean(covered) <= 0.99


def test_retest_sd_from_same_day_repeats():
    records, truth = simulate_index_cohort(100, 3, seed=2, repeat_fraction=0.5)
    retest = lg.within_subject_sd(records)
    assert retest is not None and retest.source == "repeat scans"
    assert retest.n_pairs > 120
    # SE of an SD from ~150 df is ~6 %.
    assert retest.sd == pytest.approx(truth.within_subject_sd_ppm, rel=0.15)
    assert retest.mdc95 == pytest.approx(2.77 * retest.sd, rel=1e-3)
    no_repeats, _ = simulate_index_cohort(5, 3, seed=2)
    assert lg.within_subject_sd(no_repeats) is None


def test_mdc_flags_controls_at_the_false_positive_rate():
    # Controls change only by ageing (0.04 ppb per half-year): |change| > MDC95 should
    # happen in about 5 % of follow-up visits, and the RCI should be ~N(0, 1).
    records, truth = simulate_index_cohort(400, 3, seed=11, als_fraction=0.0)
    retest = lg.RetestSD(sd=truth.within_subject_sd_ppm, source="given")
    visits = [v for t in lg.cohort_trajectories(records, retest=retest) for v in t.visits[1:]]
    rate = np.mean(["exceeds_mdc" in v.flags for v in visits])
    rci = np.array([v.rci for v in visits])
    assert 0.03 <= rate <= 0.075
    assert abs(rci.mean()) < 0.15 and rci.std() == pytest.approx(1.0, abs=0.08)


def test_single_subject_change_is_rarely_significant_at_the_realistic_effect():
    records, truth = simulate_index_cohort(200, 3, seed=5, als_fraction=1.0)
    retest = lg.RetestSD(sd=truth.within_subject_sd_ppm, source="given")
    last = [t.visits[-1] for t in lg.cohort_trajectories(records, retest=retest)]
    detected = np.mean(["exceeds_mdc" in v.flags for v in last])
    # 2.08 ppb/year over ~1 year vs MDC95 6.5 ppb: P(|change| > MDC) ≈ 9.5 % although every
    # one of these participants progresses.
    mean_change = np.mean([v.years for v in last]) * (
        truth.progression_ppm_per_year + PRECENTRAL_AGE_SLOPE_PPM_PER_YEAR)
    sd_change = truth.within_subject_sd_ppm * math.sqrt(2)
    mdc = lg.MDC95_FACTOR * truth.within_subject_sd_ppm
    expected = stats.norm.sf((mdc - mean_change) / sd_change) + stats.norm.cdf(
        (-mdc - mean_change) / sd_change)
    assert 0.07 < expected < 0.12
    assert detected == pytest.approx(expected, abs=0.045)   # SE with 200 subjects ≈ 2 %


def test_qc_failed_visits_are_flagged_and_excluded():
    records, _ = simulate_index_cohort(2, 4, seed=0, within_subject_sd_ppm=0.0)
    mine = _by_subject(records)["sub-02"]
    mine[0] = replace(mine[0], qc_status="fail")
    mine[2] = replace(mine[2], qc_status="warn")
    t = lg.subject_trajectory(mine, retest=lg.RetestSD(sd=0.002, source="given"))
    assert t.visits[0].flags == ["qc_fail"] and t.visits[0].n_runs == 0
    assert math.isnan(t.visits[0].change)
    assert "qc_warn" in t.visits[2].flags
    # The second visit is the baseline now; the slope comes from visits 2-4 only.
    assert math.isnan(t.visits[1].change) and t.visits[2].change > 0
    expected = np.polyfit([v.years for v in t.visits[1:]], [v.value for v in t.visits[1:]], 1)
    assert t.slope_per_year == pytest.approx(expected[0], rel=1e-9)


def test_time_comes_from_acq_time_when_years_are_missing():
    records, _ = simulate_index_cohort(1, 3, seed=0)
    stripped = [replace(r, years_since_baseline=None) for r in records]
    a = lg.subject_trajectory(records)
    b = lg.subject_trajectory(stripped)
    assert [v.years for v in b.visits] == pytest.approx([v.years for v in a.visits], abs=1e-3)
    with pytest.raises(AlsironError, match="cannot be placed in time"):
        lg.subject_trajectory([replace(r, acq_time=None) for r in stripped])


def test_mixed_model_recovers_group_by_time_within_its_ci():
    records, truth = simulate_index_cohort(80, 4, seed=3, repeat_fraction=0.2)
    model = lg.fit_cohort_model(records)
    eff = model.group_time_effect
    assert model.groups == ["control", "ALS"] and model.group_time_term == "years:group[ALS]"
    assert eff["ci_low"] < truth.progression_ppm_per_year < eff["ci_high"]
    assert eff["p"] < 0.01
    assert model.fixed["group[ALS]"]["ci_low"] < truth.als_effect_ppm < \
        model.fixed["group[ALS]"]["ci_high"]
    assert model.residual_sd == pytest.approx(truth.within_subject_sd_ppm, rel=0.15)
    assert model.random_intercept_sd == pytest.approx(truth.between_subject_sd_ppm, rel=0.3)
    assert model.visit_years == pytest.approx([0, 0.5, 1.0, 1.5], abs=0.05)


def test_mixed_model_large_cohort_estimate_is_close():
    records, truth = simulate_index_cohort(160, 4, seed=8, within_subject_sd_ppm=0.001)
    model = lg.fit_cohort_model(records)
    assert model.group_time_effect["estimate"] == pytest.approx(
        truth.progression_ppm_per_year, rel=0.15)
    # No random slopes in the simulation: either the fit falls back to intercepts only
    # (and says so) or it estimates a slope SD far below the progression.
    assert (not model.random_slopes and model.notes) or \
        model.random_slope_sd < 0.25 * truth.progression_ppm_per_year


def test_mixed_model_needs_subjects():
    records, _ = simulate_index_cohort(2, 3, seed=0)
    with pytest.raises(AlsironError, match="at least 3 subjects"):
        lg.fit_cohort_model(records)


def test_cli_longitudinal_subject_and_cohort(tmp_path, capsys):
    records, _ = simulate_index_cohort(12, 3, seed=1, repeat_fraction=0.5)
    path = tmp_path / "derivatives" / "alsiron" / "registry.sqlite"
    with Registry.open(path) as reg:
        reg.record_sessions(records)
    (tmp_path / "dataset_description.json").write_text("{}")
    subj = tmp_path / "sub-02"
    subj.mkdir()
    assert main(["longitudinal", str(subj)]) == 0      # registry found from the dataset
    out = capsys.readouterr().out
    assert "sub-02 (ALS)" in out and "MDC95 = 2.77 x SD" in out and "rarely significant" in out
    assert "from " in out and "same-day repeat" in out and "slope" in out
    table = tmp_path / "long.tsv"
    assert main(["longitudinal", "--cohort", "--registry", str(path), "--retest-sd", "0.00236",
                 "--out", str(table)]) == 0
    out = capsys.readouterr().out
    assert "group x time" in out and "(given)" in out
    lines = table.read_text().splitlines()
    assert len(lines) == 1 + 12 * 3
    assert (tmp_path / "long.json").exists() and (tmp_path / "long_model.json").exists()
    assert main(["longitudinal", str(tmp_path / "sub-77"), "--registry", str(path)]) == 2
    assert "no records" in capsys.readouterr().err
    assert main(["longitudinal", "--registry", str(path)]) == 2


def test_index_name_is_checked():
    records, _ = simulate_index_cohort(1, 2, seed=0)
    with pytest.raises(ValueError, match="not of the form"):
        lg.subject_trajectory(records, "precentral")
    with pytest.raises(AlsironError, match="no usable value"):
        lg.subject_trajectory(records, "chi_precentral_p90")
    assert HEADLINE_INDEX in records[0].indices


def test_normative_residual_sd_is_the_fallback(tmp_path, capsys):
    import json

    model = tmp_path / "norm.json"
    model.write_text(json.dumps({"format": "alsiron-normative-model", "schema_version": 1,
                                 "indices": {HEADLINE_INDEX: {"residual_sd": 0.004}}}))
    retest = lg.retest_from_normative(model)
    assert retest.sd == 0.004 and "conservative" in retest.source
    with pytest.raises(AlsironError, match="no residual SD"):
        lg.retest_from_normative(model, "chi_precentral_p90")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(AlsironError, match="not an alsiron normative model"):
        lg.retest_from_normative(tmp_path / "bad.json")
    records, _ = simulate_index_cohort(4, 3, seed=1)          # no repeats
    path = tmp_path / "r.sqlite"
    with Registry.open(path) as reg:
        reg.record_sessions(records)
    subj = tmp_path / "sub-01"
    subj.mkdir()
    assert main(["longitudinal", str(subj), "--registry", str(path)]) == 0
    assert "no test-retest SD" in capsys.readouterr().out
    assert main(["longitudinal", str(subj), "--registry", str(path),
                 "--normative", str(model)]) == 0
    out = capsys.readouterr().out
    assert "4.00 ppb (normative residual" in out and "11.09 ppb" in out
