"""The per-visit chain end to end: qsm → indices → registry → z-scores, and the demo."""

import json
import math

import pytest
from click.testing import CliRunner

from alsiron.cli import cli
from alsiron.cohort.normative import build_normative_model
from alsiron.cohort.records import (
    HEADLINE_INDEX,
    PARTIAL_VOLUME_INDEX,
    TRANSFER_CORRECTED_INDEX,
)
from alsiron.cohort.registry import Registry, default_registry_path
from alsiron.runs.demo import run_demo
from alsiron.sim.cohort import simulate_index_cohort
from alsiron.sim.phantom import write_dataset


def test_qsm_records_each_visit_and_scores_it_against_a_model(tmp_path):
    root = write_dataset(tmp_path / "bids", subjects=1, sessions=2, matrix=64, voxel_size=3.0,
                         seed=4)
    controls = [r for r in simulate_index_cohort(80, 1, seed=2)[0] if r.group == "control"]
    model_path = tmp_path / "model.json"
    build_normative_model(controls, group="control").save(model_path)

    run = CliRunner().invoke(cli, ["qsm", str(root / "sub-01"), "--normative", str(model_path)])
    assert run.exit_code == 0, run.output
    assert run.output.count("z-scores against") == 2
    registry = default_registry_path(root / "derivatives")
    with Registry.open(registry, create=False) as reg:
        records = reg.sessions()
    assert [(r.subject, r.session) for r in records] == [("sub-01", "ses-01"),
                                                         ("sub-01", "ses-02")]
    first, second = records
    # Visit metadata come from participants.tsv / sessions.tsv, checksums from the inputs.
    assert first.group == "control" and first.site in ("site-01", "site-02")
    assert first.years_since_baseline == 0.0 and 0.3 < second.years_since_baseline < 0.7
    assert second.age > first.age
    assert len(first.input_checksums) == 12
    assert all(len(h) == 64 for h in first.input_checksums.values())
    assert math.isfinite(first.indices[HEADLINE_INDEX])
    assert first.parameters["qsm"]["Steps"]
    for ses in ("01", "02"):
        z_file = (root / "derivatives" / "alsiron" / "sub-01" / f"ses-{ses}" / "anat" /
                  f"sub-01_ses-{ses}_desc-motorcortex_zscores.json")
        doc = json.loads(z_file.read_text())
        (z,) = [z for z in doc["zscores"] if z["index"] == HEADLINE_INDEX]
        assert math.isfinite(z["z"])

    # A rerun replaces the records and keeps the old ones as history.
    rerun = CliRunner().invoke(cli, ["qsm", str(root / "sub-01"), "--overwrite"])
    assert rerun.exit_code == 0, rerun.output
    with Registry.open(registry, create=False) as reg:
        assert len(reg.sessions()) == 2
        assert len(reg.history("sub-01", "ses-01")) == 2


def test_demo_writes_registry_tables_and_reports_and_says_what_it_could_not_do(tmp_path):
    lines: list[str] = []
    result = run_demo(tmp_path / "demo", subjects=4, sessions=2, say=lines.append)
    assert result.n_sessions == 8
    with Registry.open(result.registry, create=False) as reg:
        assert len(reg.sessions()) == 8
    # Two controls cannot make a normative model (8 participants needed): said, not hidden.
    assert result.model is None
    assert any("normative model not built" in n and "at least 8" in n for n in result.notes)
    assert result.visit_table.is_file()
    assert [p.name for p in result.reports] == [f"sub-0{i}_report.html" for i in range(1, 5)] \
        + ["cohort_report.html"]
    page = result.reports[0].read_text()
    assert "sub-01" in page and "data:image/png;base64," in page
    assert any(line.startswith("demo: sub-04_ses-02") for line in lines)


def test_anatomical_demo_reports_the_simulated_effect_it_recovers(tmp_path):
    import numpy as np

    out = tmp_path / "anat"
    run = CliRunner().invoke(cli, ["demo", str(out), "--anatomy", "template", "--subjects",
                                   "4", "--sessions", "2", "--voxel-size", "4"])
    assert run.exit_code == 0, run.output
    derivs = out / "derivatives" / "alsiron"
    with Registry.open(default_registry_path(out / "derivatives"), create=False) as reg:
        records = {(r.subject, r.session): r for r in reg.sessions()}
    assert len(records) == 8
    # Participants differ in anatomy; the anatomy is the same at every visit.
    params = {}
    for side in sorted((out / "derivatives" / "phantom").glob("sub-*/ses-*/anat/*_Chimap.json")):
        p = json.loads(side.read_text())["PhantomParameters"]
        params[(p["participant_id"], p["session_id"])] = p
    assert len(params) == 8
    scales = {pid: p["anatomy_scale"] for (pid, _), p in params.items()}
    assert len(set(scales.values())) == 4
    assert all(p["anatomy_scale"] == scales[pid] for (pid, _), p in params.items())
    assert all(p["b0_shim"]["order"] == 2 for p in params.values())

    # The simulated baseline difference, recomputed here from the truth sidecars alone:
    # χ put in the deep layer = participant offset + (ALS) excess / deep fraction.
    def deep(p):
        return p["precentral_offset_ppm"] + p["als_precentral_excess_ppm"] / p[
            "precentral_deep_fraction"]

    base = {g: [deep(p) for (_, ses), p in params.items() if ses == "ses-01"
                and p["group"] == g] for g in ("ALS", "control")}
    simulated = np.mean(base["ALS"]) - np.mean(base["control"])
    got = {g: [r.indices[HEADLINE_INDEX] for (_, ses), r in records.items()
               if ses == "ses-01" and r.group == g] for g in ("ALS", "control")}
    recovered = np.mean(got["ALS"]) - np.mean(got["control"])

    def slope(pid):
        rows = sorted((p["years_since_baseline"], deep(p)) for (q, _), p in params.items()
                      if q == pid)
        return (rows[1][1] - rows[0][1]) / (rows[1][0] - rows[0][0])

    slopes = {g: [slope(pid) for pid in sorted(scales) if params[(pid, "ses-01")]["group"]
                  == g] for g in ("ALS", "control")}
    progression = np.mean(slopes["ALS"]) - np.mean(slopes["control"])
    # ALS excess and its growth are the simulation's defaults, spread over the deep layer.
    assert simulated > 0 and progression > 0

    doc = json.loads((derivs / "effect_recovery.json").read_text())
    assert doc["index"] == HEADLINE_INDEX and doc["tolerance"] == 0.2
    baseline, growth = doc["effects"]
    assert baseline["simulated"] == pytest.approx(simulated, rel=1e-9)
    assert baseline["recovered"] == pytest.approx(recovered, rel=1e-9)
    assert baseline["ratio"] == pytest.approx(recovered / simulated, rel=1e-9)
    assert growth["simulated"] == pytest.approx(progression, rel=1e-9)
    assert 0.0 < baseline["truth_map_ratio"] < 1.2
    lo, hi = baseline["ratio_interval_95"]
    assert lo <= baseline["ratio"] <= hi and isinstance(baseline["decided"], bool)
    # Console and cohort page state the ratios and the pass mark.
    for effect in (baseline, growth):
        assert f"= {effect['ratio']:.2f} (pass mark 0.80-1.20" in run.output
        lo, hi = effect["ratio_interval_95"]
        assert f"95 % interval over participants {lo:.2f}-{hi:.2f}" in run.output
    page = (derivs / "cohort_report.html").read_text()
    assert "Simulated ALS effect, recovered" in page and "±20 %" in page
    assert f"<td>{baseline['ratio']:.2f}</td>" in page
    assert f"<td>{growth['ratio']:.2f}</td>" in page
    for effect in (baseline, growth):
        lo, hi = effect["ratio_interval_95"]
        assert f"<td>{lo:.2f}–{hi:.2f}</td>" in page
    # Anatomical participants come with fine-grid labels: the partial-volume-corrected
    # index is compared too, against the same simulated values.
    pv = doc["partial_volume_corrected"]
    assert pv["index"] == PARTIAL_VOLUME_INDEX
    assert pv["effects"][0]["simulated"] == pytest.approx(baseline["simulated"], rel=1e-12)
    assert pv["effects"][0]["truth_map"] is None
    assert f"of {PARTIAL_VOLUME_INDEX}: recovered" in run.output
    assert f"<h3>{PARTIAL_VOLUME_INDEX}</h3>" in page
    # The chain reran once per visit to measure its transfer of a deep-band change.
    rc = doc["transfer_corrected"]
    assert rc["index"] == TRANSFER_CORRECTED_INDEX
    assert rc["effects"][0]["simulated"] == pytest.approx(baseline["simulated"], rel=1e-12)
    assert f"of {TRANSFER_CORRECTED_INDEX}: recovered" in run.output
    indices = json.loads(next(derivs.glob("sub-01/ses-01/anat/*_desc-motorcortex_indices"
                                          ".json")).read_text())
    measured = indices["Parameters"]["PartialVolumeFits"]["chi"]["ChainTransfer"]
    assert 0.2 <= measured["Transfer"] <= 1.2 and measured["Perturbation_ppm"] == 0.01


def test_effect_recovery_compares_like_with_like():
    from alsiron.cohort.records import SessionRecord
    from alsiron.sim.recovery import SimulatedSession, effect_recovery

    sims, recs = [], []
    # Two participants a group, two visits a year apart; recovered = half the truth.
    for pid, group, base, slope in (("sub-01", "control", 0.001, 0.0),
                                    ("sub-02", "ALS", 0.007, 0.004),
                                    ("sub-03", "control", 0.003, 0.0),
                                    ("sub-04", "ALS", 0.009, 0.004)):
        for k, years in enumerate((0.0, 1.0)):
            truth = base + slope * years
            sims.append(SimulatedSession(pid, f"ses-0{k + 1}", group, years, truth, truth))
            recs.append(SessionRecord(subject=pid, session=f"ses-0{k + 1}", run=1,
                                      group=group, years_since_baseline=years,
                                      indices={HEADLINE_INDEX: 0.5 * truth}))
    found = effect_recovery(recs, sims)
    baseline, growth = found.effects
    assert baseline.simulated == pytest.approx(0.006) and baseline.ratio == pytest.approx(0.5)
    assert growth.simulated == pytest.approx(0.004) and growth.ratio == pytest.approx(0.5)
    assert baseline.truth_map_ratio == pytest.approx(1.0)
    assert not baseline.passed and found.n_als == 2 and found.n_control == 2
    assert "= 0.50 (pass mark 0.80-1.20: FAIL" in found.lines()[0]
    # Every participant recovers half: every resampling gives 0.5, a decided failure.
    assert baseline.interval == pytest.approx((0.5, 0.5))
    assert growth.interval == pytest.approx((0.5, 0.5)) and growth.decided


def test_ratio_interval_widens_with_participant_error():
    """The interval reflects participant-level error that does not cancel: exact recovery
    gives a zero-width interval; an error that alternates in sign between participants
    leaves the point ratio at 1 but spreads the interval; more participants narrow it."""
    from alsiron.sim.recovery import participant_summaries, ratio_interval

    def cohort(n: int, error: float):
        sim, rec = {}, {}
        for k in range(2 * n):
            group = "ALS" if k % 2 else "control"
            truth = (0.005 if group == "ALS" else 0.0) + 0.001 * (k % 5)
            err = error * (1 if (k // 2) % 2 else -1)
            for years in (0.0, 1.0):
                key = (f"sub-{k:03d}", f"ses-{years:.0f}")
                sim[key] = (group, years, truth + 0.002 * years * (group == "ALS"))
                rec[key] = (group, years, sim[key][2] + err)
        return sim, rec

    sim, rec = cohort(8, 0.0)
    assert ratio_interval(sim, rec, effect="baseline") == pytest.approx((1.0, 1.0))
    sim, rec = cohort(8, 0.0025)
    lo, hi = ratio_interval(sim, rec, effect="baseline")
    assert lo < 0.85 and hi > 1.15
    lo_big, hi_big = ratio_interval(*cohort(64, 0.0025), effect="baseline")
    assert lo < lo_big < 1.0 < hi_big < hi
    # A constant per-participant offset leaves slopes exact.
    assert ratio_interval(sim, rec, effect="progression") == pytest.approx((1.0, 1.0))
    # One group with a single participant: no interval.
    one = {k: v for k, v in sim.items() if v[0] == "control" or k[0] == "sub-001"}
    assert all(math.isnan(v) for v in ratio_interval(one, one, effect="baseline"))
    first = participant_summaries(sim)["sub-001"]
    assert first[0] == "ALS" and first[1] == pytest.approx(0.006)
    assert first[2] == pytest.approx(0.002)


def test_demo_without_shim_and_its_refusal(tmp_path):
    out = tmp_path / "noshim"
    run = CliRunner().invoke(cli, ["demo", str(out), "--anatomy", "template", "--subjects",
                                   "2", "--sessions", "1", "--voxel-size", "4", "--no-shim"])
    assert run.exit_code == 0, run.output
    sides = [p for p in (out / "derivatives" / "phantom").glob("sub-*/ses-*/anat/*_Chimap.json")
             if "desc-" not in p.name]
    assert len(sides) == 2
    assert all("b0_shim" not in json.loads(p.read_text())["PhantomParameters"] for p in sides)
    run = CliRunner().invoke(cli, ["demo", str(tmp_path / "geo"), "--no-shim"])
    assert run.exit_code != 0 and "--no-shim goes with --anatomy template" in run.output


def _tiny_demo_records(out, inversion: str) -> list:
    """Registry records of a 2-participant, 1-visit, 32³ × 6 mm demo run with ``inversion``."""
    run = CliRunner().invoke(cli, ["demo", str(out), "--subjects", "2", "--sessions", "1",
                                   "--matrix", "32", "--voxel-size", "6",
                                   "--inversion", inversion])
    assert run.exit_code == 0, run.output
    with Registry.open(default_registry_path(out / "derivatives"), create=False) as reg:
        records = reg.sessions()
    assert len(records) == 2
    return records


def test_demo_runs_the_chosen_inversion(tmp_path):
    for record in _tiny_demo_records(tmp_path / "sstv", "sstv"):
        qsm = record.parameters["qsm"]
        assert qsm["Parameters"]["inversion"] == "sstv"
        # The single-step method's own anchor: PDF with smooth sources outside the brain,
        # refined by a first pass.
        assert qsm["Parameters"]["bfr"] == "pdf"
        assert qsm["Parameters"]["sstv_refine_iter"] == 80
        assert qsm["Parameters"]["sstv_refine_alpha"] == 7e-4
        bfr = qsm["Steps"]["BackgroundFieldRemoval"]
        assert "outside the phase-quality brain mask" in bfr["SourceRegion"]
        assert bfr["AnchorRefinement"]["FirstPassIterations"] == 80
        assert bfr["AnchorRefinement"]["FirstPassAlpha"] == 7e-4
    # A method other than the default: the two-step chain, recorded as such.
    records = _tiny_demo_records(tmp_path / "two_step", "tvmasked")
    assert [r.parameters["qsm"]["Parameters"]["inversion"] for r in records] == ["tvmasked"] * 2
    assert all("AnchorRefinement" not in r.parameters["qsm"]["Steps"]["BackgroundFieldRemoval"]
               for r in records)
