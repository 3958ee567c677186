"""Normative model: ComBat against reference values, z-scores and effect sizes on
simulated cohorts, persistence and its errors."""

import dataclasses
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest

from alsiron.cohort.normative import (
    NO_MODEL_MESSAGE,
    SCHEMA_VERSION,
    age_df_cap,
    build_normative_model,
    combat_fit,
    load_model,
    score_session,
    session_zscores,
    subject_hash,
    t_to_z,
    write_zscores,
    zscore_table,
)
from alsiron.cohort.records import HEADLINE_INDEX
from alsiron.errors import InputError, OutputExistsError
from alsiron.sim.cohort import CONTROL_LEVEL_PPM, WITHIN_SUBJECT_SD_PPM, simulate_index_cohort
from alsiron.sim.phantom import PRECENTRAL_BETWEEN_SUBJECT_SD_PPM

REFERENCE = Path(__file__).parent / "data" / "combat_reference.json"
#: Observed single-scan SD of the simulated index (between + within subject), ppm.
TOTAL_SD_PPM = math.hypot(PRECENTRAL_BETWEEN_SUBJECT_SD_PPM, WITHIN_SUBJECT_SD_PPM)


def _cohens_d(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.mean() - b.mean()) / np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2))


def _z(model, records, group=None):
    return np.array([model.z_scores(r)[HEADLINE_INDEX].z for r in records
                     if group is None or r.group == group])


@pytest.fixture(scope="module")
def model():
    # 2000 training controls: the fitted mean's SE is ~0.03 SD and the scale's ~1.7 %.
    train, _ = simulate_index_cohort(2000, 1, seed=11, als_fraction=0.0)
    return build_normative_model(train, source="simulated")


def test_combat_reproduces_neurocombat_reference_values():
    ref = json.loads(REFERENCE.read_text())
    sex = np.array(ref["sex"])
    cov = np.column_stack([(sex == "M").astype(float), ref["age"]])
    harmonised, est = combat_fit(np.array(ref["data"]).T, ref["site"], cov)
    assert est.empirical_bayes
    for key in ("gamma_hat", "delta_hat", "gamma_star", "delta_star"):
        np.testing.assert_allclose(getattr(est, key), ref[key], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(est.var_pooled, ref["var_pooled"], rtol=1e-9)
    np.testing.assert_allclose(harmonised, np.array(ref["harmonised"]).T, rtol=1e-9)
    # EB shrinks: the posterior site effects lie between the per-feature estimate and
    # the site's mean over features.
    gbar = np.array(est.priors["gamma_bar"])[:, None]
    lo, hi = np.minimum(est.gamma_hat, gbar), np.maximum(est.gamma_hat, gbar)
    assert np.all((est.gamma_star >= lo - 1e-12) & (est.gamma_star <= hi + 1e-12))


def test_combat_without_eb_equalises_site_means_and_variances():
    rng = np.random.default_rng(5)
    sites = ["a"] * 40 + ["b"] * 60
    age = rng.uniform(40, 75, 100)
    y = (0.1 * age + np.where(np.array(sites) == "b", 3.0, 0.0)
         + rng.normal(0, 1, 100) * np.where(np.array(sites) == "b", 2.0, 1.0))[:, None]
    harmonised, est = combat_fit(y, sites, age[:, None])
    assert not est.empirical_bayes
    resid = harmonised[:, 0] - est.covariate_mean(age[:, None])[:, 0]
    a, b = resid[:40], resid[40:]
    assert abs(a.mean() - b.mean()) < 1e-9
    assert a.var(ddof=1) == pytest.approx(b.var(ddof=1), rel=1e-9)
    # new rows of a known site get the same transform as the training rows
    again, known = est.harmonise(y[:5], sites[:5], age[:5, None])
    np.testing.assert_allclose(again, harmonised[:5], rtol=1e-12)
    assert known.all()


def test_held_out_control_zscores_are_standard_normal(model):
    test, _ = simulate_index_cohort(2400, 1, seed=12, als_fraction=0.5)
    z = _z(model, test, "control")
    # 1200 held-out controls: SE of the mean 0.03, of the SD 0.02 (plus the model's own
    # estimation error, ~0.03 and ~2 %): the ±0.15 / 0.85-1.15 limits are > 3.5 SE.
    assert len(z) == 1200
    assert abs(z.mean()) < 0.15
    assert 0.85 < z.std(ddof=1) < 1.15
    fit = model.fits[HEADLINE_INDEX]
    # Huber's robust scale (kept as an outlier flag) agrees with the least-squares one
    assert fit.robust_sd == pytest.approx(math.sqrt(fit.between_var), rel=0.05)
    assert model.selection["age_df"] in (1, 2)  # the simulated age effect is linear
    assert model.combat is not None  # 1000 controls per site: ComBat's scale step is used


@pytest.mark.parametrize("target_d", [0.9, 2.0])
def test_group_effect_size_is_recovered(model, target_d):
    test, truth = simulate_index_cohort(2400, 1, seed=13, als_fraction=0.5,
                                        als_effect_ppm=target_d * TOTAL_SD_PPM)
    assert truth.cohens_d == pytest.approx(target_d, rel=1e-9)
    als, ctl = _z(model, test, "ALS"), _z(model, test, "control")
    d = _cohens_d(als, ctl)
    # SE of d with 1200 per group: sqrt(2/1200 + d²/4800) = 0.043 (d=0.9), 0.050 (d=2).
    # z removes the age and site variance that the simulated d counts in its SD, so d
    # from z-scores is ~2.8 % larger by construction; ±20 % is then > 3 SE.
    assert d == pytest.approx(truth.cohens_d, rel=0.20)
    auc = float((als[:, None] > ctl[None, :]).mean())
    if target_d >= 2.0:
        assert auc >= 0.9


def _scale_site(records, site, factor, offset):
    out = []
    for r in records:
        if r.site == site:
            v = r.indices[HEADLINE_INDEX]
            r = dataclasses.replace(r, indices={
                HEADLINE_INDEX: CONTROL_LEVEL_PPM + factor * (v - CONTROL_LEVEL_PPM) + offset})
        out.append(r)
    return out


def test_site_offset_and_scale_are_harmonised():
    train, _ = simulate_index_cohort(1200, 1, seed=21, als_fraction=0.0)
    test, _ = simulate_index_cohort(1200, 1, seed=22, als_fraction=0.0)
    train = _scale_site(train, "site-02", 1.6, 0.004)
    test = _scale_site(test, "site-02", 1.6, 0.004)
    m = build_normative_model(train)
    assert m.combat.delta_star[1, 0] / m.combat.delta_star[0, 0] == pytest.approx(2.56, rel=0.2)
    for site in ("site-01", "site-02"):
        z = _z(m, [r for r in test if r.site == site])
        # ~600 per site: SE 0.04 (mean), 0.03 (SD)
        assert abs(z.mean()) < 0.15, site
        assert 0.85 < z.std(ddof=1) < 1.15, site


def test_curved_age_effect_selects_a_spline_and_stays_unbiased():
    def curve(records):
        return [dataclasses.replace(r, indices={HEADLINE_INDEX: r.indices[HEADLINE_INDEX]
                                               + 0.00003 * (r.age - 57.5) ** 2})
                for r in records]
    train, _ = simulate_index_cohort(1500, 1, seed=31, als_fraction=0.0)
    test, _ = simulate_index_cohort(1500, 1, seed=32, als_fraction=0.0)
    m = build_normative_model(curve(train))
    assert m.selection["age_df"] >= 2
    test = curve(test)
    ages = np.array([r.age for r in test])
    z = _z(m, test)
    for lo, hi in ((40, 50), (50, 65), (65, 75)):
        sel = (ages >= lo) & (ages < hi)
        assert abs(z[sel].mean()) < 0.2, (lo, hi)
    linear = build_normative_model(curve(train), age_df=1)
    zl = _z(linear, test)
    # a straight line misses the curvature at the ends of the age range
    assert abs(zl[(ages >= 50) & (ages < 65)].mean()) > 0.25


def test_unknown_site_is_scored_unharmonised_with_a_note(model, caplog):
    record = simulate_index_cohort(1, 1, seed=3, als_fraction=0.0)[0][0]
    stranger = dataclasses.replace(record, site="site-99")
    with caplog.at_level(logging.WARNING, logger="alsiron"):
        zs = model.z_scores(stranger)[HEADLINE_INDEX]
    assert not zs.site_harmonised and zs.harmonised == zs.value
    assert any("not in the normative model" in n for n in zs.notes)
    assert "site-99" in caplog.text
    old = model.z_scores(dataclasses.replace(record, age=90.0))[HEADLINE_INDEX]
    assert any("outside the control range" in n for n in old.notes)
    assert math.isfinite(old.z)
    nan = model.z_scores(dataclasses.replace(record, age=None))[HEADLINE_INDEX]
    assert math.isnan(nan.z) and "age unknown" in nan.notes


def test_band_edges_score_at_1_96(model):
    record = simulate_index_cohort(3, 1, seed=4, als_fraction=0.0)[0][2]
    mean, lo, hi = model.band(HEADLINE_INDEX, record.age, record.sex, record.site)
    for value, expected in ((mean, 0.0), (lo, -1.96), (hi, 1.96)):
        r = dataclasses.replace(record, indices={HEADLINE_INDEX: value})
        assert model.z_scores(r)[HEADLINE_INDEX].z == pytest.approx(expected, abs=1e-3)


def _multi_index_records(n, seed):
    records, _ = simulate_index_cohort(n, 1, seed=seed, als_fraction=0.0)
    rng = np.random.default_rng(seed)
    out = []
    for r in records:
        v = r.indices[HEADLINE_INDEX]
        indices = {HEADLINE_INDEX: v, "chi_precentral_deep_n": 1234.0}
        for k, name in enumerate(["chi_precentral_mean", "chi_precentral_L_mean",
                                  "chi_precentral_R_mean", "chi_precentral_p90",
                                  "r2star_precentral_mean"]):
            indices[name] = (0.5 + 0.1 * k) * v + rng.normal(0, 0.002)
        out.append(dataclasses.replace(r, indices=indices))
    return out


def test_model_round_trips_through_json_and_rejects_bad_files(tmp_path):
    records = _multi_index_records(300, 41)
    m = build_normative_model(records, source="test")
    assert m.combat.empirical_bayes and len(m.indices) == 6  # voxel count left out
    path = m.save(tmp_path / "model.json")
    with pytest.raises(OutputExistsError):
        m.save(path)
    loaded = load_model(path)
    doc = json.loads(path.read_text())
    assert doc["schema_version"] == SCHEMA_VERSION
    assert sum(doc["cohort"]["n_by_site"].values()) == 300
    assert doc["cohort"]["n_by_group"] == {"control": 300}
    assert set(doc["combat"]["gamma_star"]) == {"site-01", "site-02"}
    assert doc["provenance"]["indices"] == m.indices
    for r in records[:20]:
        a, b = m.z_scores(r), loaded.z_scores(r)
        assert [x.z for x in a.values()] == pytest.approx([x.z for x in b.values()], rel=1e-12)
    table = zscore_table(loaded.z_scores(records[0]))
    assert HEADLINE_INDEX in table and "ppb" in table

    newer = dict(doc, schema_version=SCHEMA_VERSION + 1)
    (tmp_path / "newer.json").write_text(json.dumps(newer))
    with pytest.raises(InputError, match="newer than this alsiron"):
        load_model(tmp_path / "newer.json")
    (tmp_path / "cut.json").write_text(path.read_text()[:500])
    with pytest.raises(InputError, match="not valid JSON"):
        load_model(tmp_path / "cut.json")
    broken = json.loads(path.read_text())
    del broken["indices"][HEADLINE_INDEX]["coef"]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(InputError, match="malformed normative model") as info:
        load_model(tmp_path / "broken.json")
    assert "\n" not in str(info.value)
    (tmp_path / "v1.json").write_text(json.dumps(dict(doc, schema_version=1)))
    with pytest.raises(InputError, match="schema version 1 .* rebuild it") as info:
        load_model(tmp_path / "v1.json")
    assert "\n" not in str(info.value)
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(InputError, match="not an alsiron normative model"):
        load_model(tmp_path / "other.json")
    with pytest.raises(InputError, match="alsiron normative build"):
        load_model(tmp_path / "missing.json")

    out = write_zscores(tmp_path / "z.json", records[0], loaded.z_scores(records[0]), path)
    stored = json.loads(out.read_text())
    assert stored["normative_model"]["sha256"] and len(stored["zscores"]) == 6
    zs, text = score_session(records[1], path, out=tmp_path / "z2.json")
    assert len(zs) == 6 and HEADLINE_INDEX in text
    assert json.loads((tmp_path / "z2.json").read_text())["subject"] == records[1].subject
    assert score_session(records[1], None) == ({}, NO_MODEL_MESSAGE)


def test_without_a_model_the_message_says_how_to_build_one():
    record = simulate_index_cohort(1, 1, seed=1)[0][0]
    with pytest.raises(InputError) as info:
        session_zscores(record, None)
    assert str(info.value) == NO_MODEL_MESSAGE
    assert "alsiron normative build --group control" in NO_MODEL_MESSAGE


def test_too_few_controls_is_a_clear_error():
    records, _ = simulate_index_cohort(14, 3, seed=2, als_fraction=0.5)
    # 7 controls x 3 visits = 21 scans: the minimum counts participants, not scans
    with pytest.raises(InputError, match="only 7 usable 'control' participants.*at least 8"):
        build_normative_model(records, visits="all")
    with pytest.raises(InputError, match="no usable 'healthy'"):
        build_normative_model(records, group="healthy")


def test_visit_selection_baseline_or_all():
    records, _ = simulate_index_cohort(60, 3, seed=8, als_fraction=0.5, repeat_fraction=0.5)
    failed = dataclasses.replace(records[0], qc_status="fail")  # sub-01 is a control
    records = [failed, *records[1:]]
    base = build_normative_model(records)
    every = build_normative_model(records, visits="all")
    assert base.cohort["n_sessions"] == base.cohort["n_subjects"] == 30
    assert every.cohort["n_sessions"] == 30 * 3 - 1  # repeats and the failed scan left out
    assert every.selection["dropped"]["qc_failed"] == 1
    assert every.selection["dropped"]["repeat_runs"] > 0
    # sub-01's baseline failed QC, so its earliest usable visit (ses-02) stands in
    assert base.selection["dropped"]["later_visits"] == 30 * 3 - 1 - 30


def _small_cohort(seed=5, n=24, visits=3):
    records, _ = simulate_index_cohort(n, visits, seed=seed, als_fraction=0.5)
    return records


@pytest.mark.parametrize("visits", ["baseline", "all"])
def test_leave_one_subject_out_equals_a_refit_without_the_control(visits, monkeypatch):
    records = _small_cohort()
    m = build_normative_model(records, visits=visits)
    assert m.combat is None and m.n_subjects == 12  # 6 or so per site: site intercepts
    assert m.fits[HEADLINE_INDEX].df_between == 12 - len(m.design_columns)
    monkeypatch.setattr("alsiron.cohort.normative.MIN_PARTICIPANTS", 2)
    for c in [r for r in records if r.group == "control" and r.session == "ses-01"][:4]:
        held = m.held_out_z_scores(c, records)[HEADLINE_INDEX]
        refit = build_normative_model([r for r in records if r.subject != c.subject],
                                      visits=visits, age_df=1).z_scores(c)[HEADLINE_INDEX]
        assert "leave-one-subject-out" in " ".join(held.notes)
        # exact for one scan per control (the externally studentised residual); with
        # every visit the within-participant variance keeps the full fit's age slope
        tol = 1e-9 if visits == "baseline" else 2e-3
        assert held.z == pytest.approx(refit.z, abs=tol)
        assert held.df == pytest.approx(refit.df, rel=1e-9 if visits == "baseline" else 2e-3)
        insample = m.z_scores(c)[HEADLINE_INDEX]
        assert any("in-sample" in n for n in insample.notes)
    stranger = simulate_index_cohort(1, 1, seed=99, als_fraction=0.0)[0][0]
    stranger = dataclasses.replace(stranger, subject="sub-new")
    assert m.held_out_z_scores(stranger, [stranger]) == m.z_scores(stranger)


def test_small_reference_uses_student_t_and_says_so():
    records = [r for r in _small_cohort(seed=6, n=16) if r.session == "ses-01"]
    m = build_normative_model(records)
    assert m.n_subjects == 8 and m.selection["age_df"] == 1 == age_df_cap(8, 2, True)
    record = simulate_index_cohort(1, 1, seed=3, als_fraction=0.0)[0][0]
    zs = m.z_scores(record)[HEADLINE_INDEX]
    assert "small reference: 8 controls" in zs.notes
    # ν = 8 participants − (2 sites + 1 age + 1 sex) parameters
    assert zs.df == 4.0 and zs.z == pytest.approx(t_to_z(zs.t, 4.0), rel=1e-12)
    assert abs(zs.z) < abs(zs.t) and 0 < zs.centre_sd < 1
    assert HEADLINE_INDEX in zscore_table({HEADLINE_INDEX: zs})
    mean, lo, hi = m.band(HEADLINE_INDEX, record.age, record.sex, record.site)
    # the band is t_4-wide: 2.776 predictive SDs either side
    assert (hi - mean) / zs.sd == pytest.approx(2.7764451, rel=1e-6)
    assert subject_hash(records[0].subject) in m.reference["subject_hashes"]


def test_t_to_z_keeps_the_tail_probability():
    from scipy import stats

    for t, df in ((-2.0, 4.0), (3.0, 10.5), (8.0, 4.0), (-40.0, 3.0)):
        z = t_to_z(t, df)
        assert stats.norm.sf(abs(z)) == pytest.approx(stats.t.sf(abs(t), df), rel=1e-9)
        assert math.copysign(1, z) == math.copysign(1, t)
    assert t_to_z(1.5, math.inf) == 1.5 and math.isnan(t_to_z(math.nan, 4.0))


def test_an_aberrant_control_is_flagged(caplog):
    records = [r for r in _small_cohort(seed=7, n=60) if r.session == "ses-01"]
    odd = next(r for r in records if r.group == "control")
    records = [dataclasses.replace(r, indices={HEADLINE_INDEX: r.indices[HEADLINE_INDEX]
                                               + 0.03}) if r is odd else r
               for r in records]
    with caplog.at_level(logging.WARNING, logger="alsiron"):
        m = build_normative_model(records)
    assert m.fits[HEADLINE_INDEX].outliers == [subject_hash(odd.subject)]
    assert odd.subject in caplog.text and "robust SDs" in caplog.text
