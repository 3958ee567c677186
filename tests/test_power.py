"""Sample size per arm: the mixed-model formula against simulated trials."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from alsiron.cli import main
from alsiron.cohort import longitudinal as lg
from alsiron.cohort import power as pw
from alsiron.cohort.registry import Registry
from alsiron.sim.cohort import simulate_index_cohort


def test_formula_by_hand():
    d = pw.PowerDesign(visit_years=(0, 0.5, 1.0), slope_per_year=2.0, slowing=0.5,
                       residual_sd=1.0, random_slope_sd=0.5)
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)
    assert d.sxx == pytest.approx(0.5)
    assert pw.participants_per_arm(d) == pytest.approx(2 * z**2 * (0.25 + 1.0 / 0.5) / 1.0)
    n = pw.participants_per_arm(d)
    assert pw.power_at(d, n) == pytest.approx(0.8, abs=1e-9)
    assert pw.schedule(1.5, 3) == (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


@pytest.mark.parametrize("slope_sd, jitter", [(0.0, 0.0), (0.0012, 14 / 365.25)])
def test_formula_agrees_with_simulated_trials_within_15_percent(slope_sd, jitter):
    d = pw.PowerDesign(visit_years=pw.schedule(1.5, 6), slope_per_year=0.002, slowing=0.5,
                       residual_sd=0.00236, random_slope_sd=slope_sd,
                       random_intercept_sd=0.0033, random_correlation=0.3)
    n_formula = pw.participants_per_arm(d)
    n_sim = pw.simulated_participants_per_arm(d, n_sims=1500, seed=1,
                                              visit_jitter_years=jitter)
    assert n_sim == pytest.approx(n_formula, rel=0.15)


def _trial_power(n_per_arm: int, slowing: float, n_trials: int) -> float:
    """Two ALS arms from the cohort simulator (its own visit jitter, ages, sites)."""
    hits = 0
    for k in range(n_trials):
        slopes = []
        for arm, progression in enumerate((0.002, 0.002 * (1 - slowing))):
            recs, _ = simulate_index_cohort(n_per_arm, 4, seed=10_000 + 2 * k + arm,
                                            als_fraction=1.0,
                                            progression_ppm_per_year=progression)
            by = {}
            for r in recs:
                by.setdefault(r.subject, []).append(r)
            slopes.append([lg.ols_slope(np.array([r.years_since_baseline for r in rows]),
                                        np.array([r.indices["chi_precentral_deep_mean"]
                                                  for r in rows]))[0]
                           for rows in by.values()])
        hits += stats.ttest_ind(*slopes, equal_var=False).pvalue < 0.05
    return hits / n_trials


def test_power_from_a_fitted_cohort_agrees_with_simulated_trials():
    # Variance components and schedule from a fitted cohort model, sample size by the
    # formula, then trials drawn by the cohort simulator with the same truth.
    records, truth = simulate_index_cohort(120, 4, seed=21)
    model = lg.fit_cohort_model(records)
    design = pw.design_from_model(model, 0.5)
    # Plan with the true progression so the check is of the formula and the variance
    # components, not of the slope estimate's sampling error.
    design = pw.PowerDesign(visit_years=design.visit_years,
                            slope_per_year=truth.progression_ppm_per_year, slowing=0.5,
                            residual_sd=design.residual_sd,
                            random_slope_sd=design.random_slope_sd)
    n = math.ceil(pw.participants_per_arm(design))
    assert 40 < n < 110
    achieved = _trial_power(n, 0.5, 200)
    assert achieved == pytest.approx(0.8, rel=0.15)


def test_design_from_model_uses_the_excess_slope():
    records, _ = simulate_index_cohort(40, 3, seed=2)
    model = lg.fit_cohort_model(records)
    d = pw.design_from_model(model, 0.3)
    excess = model.slope_per_year["ALS"] - model.slope_per_year["control"]
    assert d.slope_per_year == pytest.approx(excess)
    assert d.effect_per_year == pytest.approx(0.3 * excess)
    total = pw.design_from_model(model, 0.3, slope="total", visit_years=(0, 1, 2))
    assert total.slope_per_year == pytest.approx(model.slope_per_year["ALS"])
    assert total.visit_years == (0, 1, 2)


def test_bad_designs_are_refused():
    with pytest.raises(ValueError, match="two distinct"):
        pw.PowerDesign(visit_years=(0.0,), slope_per_year=1, slowing=0.5, residual_sd=1)
    with pytest.raises(ValueError, match="slowing"):
        pw.PowerDesign(visit_years=(0, 1), slope_per_year=1, slowing=0, residual_sd=1)


def test_cli_power(tmp_path, capsys):
    assert main(["power", "--slope-per-year", "0.002", "--residual-sd", "0.00236",
                 "--duration", "1.5", "--interval-months", "6", "--slowing", "0.5",
                 "--simulate", "400"]) == 0
    out = capsys.readouterr().out
    assert "participants per arm: 70" in out and "simulation (400 trials" in out
    records, _ = simulate_index_cohort(30, 3, seed=1)
    path = tmp_path / "r.sqlite"
    with Registry.open(path) as reg:
        reg.record_sessions(records)
    assert main(["power", "--registry", str(path), "--simulate", "0",
                 "--visits", "0,0.5,1,1.5"]) == 0
    out = capsys.readouterr().out
    assert "group x time" in out and "participants per arm:" in out
    assert main(["power", "--slope-per-year", "0.002", "--residual-sd", "0.00236"]) == 2
