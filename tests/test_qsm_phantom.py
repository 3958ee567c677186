"""End to end on the head phantom: `alsiron phantom` then `alsiron qsm`, checked
against the phantom's ground truth (DESIGN.md §5 metrics), plus output safety.

The phantom is simulated at 2x supersampling with a padded continuous-like dipole
kernel and averaged down, so the pipeline never inverts the kernel that made the data.
Tolerances are the measured values (64³, 3 mm, SNR 100, seed 3) plus a margin for
noise; see the comments at each assertion.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from alsiron.cli import EXIT_INPUT_ERROR, EXIT_INTERRUPTED, main
from alsiron.evaluation import truth as evaluate
from alsiron.io import bids as ingest
from alsiron.qsm import chain as workflow
from alsiron.qsm.inversion import InversionSettings
from alsiron.sim import phantom

PRECENTRAL = [20, 21, 22, 23]
OUTPUTS = ["Chimap", "R2starmap", "T2starmap", "S0map", "desc-r2starfit_status",
           "desc-total_fieldmap", "desc-local_fieldmap", "desc-brain_mask", "desc-qsm_mask"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantom") / "bids"
    code = main(["phantom", str(root), "--subjects", "1", "--matrix", "64",
                 "--voxel-size", "3", "--seed", "3"])
    assert code == 0
    return root


@pytest.fixture(scope="module")
def qsm_run(dataset) -> Path:
    assert main(["qsm", str(dataset / "sub-01")]) == 0
    return dataset / "derivatives" / "alsiron" / "sub-01" / "ses-01" / "anat"


@pytest.fixture(scope="module")
def two_step_run(dataset) -> Path:
    """The two-step chain (PDF + tvmasked), the default until sstv replaced it."""
    out = dataset.parent / "two_step"
    assert main(["qsm", str(dataset / "sub-01"), "--inversion", "tvmasked",
                 "--out", str(out)]) == 0
    return out / "sub-01" / "ses-01" / "anat"


def out_file(anat: Path, tail: str) -> Path:
    return anat / f"sub-01_ses-01_{tail}.nii.gz"


def test_outputs_and_sidecars(dataset, qsm_run):
    raw = nib.load(str(dataset / "sub-01/ses-01/anat/sub-01_ses-01_echo-1_part-mag_MEGRE.nii.gz"))
    for tail in OUTPUTS:
        img = nib.load(str(out_file(qsm_run, tail)))
        assert img.shape == raw.shape
        np.testing.assert_allclose(img.affine, raw.affine, atol=1e-6)
        side = json.loads(out_file(qsm_run, tail).with_suffix("").with_suffix(".json").read_text())
        assert side["Software"]["Name"] == "alsiron" and side["Sources"]
    chi_side = json.loads((qsm_run / "sub-01_ses-01_Chimap.json").read_text())
    assert chi_side["Units"] == "ppm"
    steps = chi_side["Steps"]
    assert steps["BackgroundFieldRemoval"]["Method"] == "PDF"
    assert steps["BackgroundFieldRemoval"]["IterationsRun"] >= 1
    # The default inversion: single-step TV, its anchor refined by a first pass, its α
    # from the noise rule (here at its floor: the phantom's Laplacian noise is 0.32 ppb/mm²).
    dipole = steps["DipoleInversion"]
    assert dipole["Method"] == "single-step TV: Laplacian of the total field plus the LBV " \
                               "local field"
    assert dipole["Parameters"]["sstv_alpha"] == 2e-5
    assert dipole["Parameters"]["sstv_alpha_rule"] == "noise"
    assert dipole["AlphaUsed"] == 2e-5 and dipole["LaplacianNoiseSD_ppm_per_mm2"] > 0
    assert 1 <= dipole["IterationsRun"] <= 80
    assert steps["BackgroundFieldRemoval"]["AnchorRefinement"]["FirstPassIterations"] >= 1
    # The pre-BFR erosion is recorded in mm: sstv's anchor takes 2 mm, at least one voxel
    # (3 mm here); the two-step chain's 4 mm is checked in test_two_step_sidecar.
    assert steps["BackgroundFieldRemoval"]["MaskErosionMm"] == 3.0
    assert "MaskErosionVoxels" not in steps["BackgroundFieldRemoval"]
    assert chi_side["Parameters"]["bfr_erode_mm"] is None  # = the method's default
    assert "BET" in steps["BrainMask"]["Method"]
    assert steps["BrainMask"]["FractionalIntensity"] == 0.5
    acq = chi_side["Acquisition"]
    assert acq["MagneticFieldStrength"] == 3.0 and acq["NumberOfEchoes"] == 6
    assert acq["B0Direction_voxel"] == pytest.approx([0, 0, 1], abs=1e-9)
    assert json.loads((qsm_run / "sub-01_ses-01_R2starmap.json").read_text())["Units"] == "1/s"
    assert json.loads((qsm_run / "sub-01_ses-01_T2starmap.json").read_text())["Units"] == "s"
    # Whole-brain referencing: the χ mean over the QSM mask is zero.
    chi = np.asarray(nib.load(str(out_file(qsm_run, "Chimap"))).dataobj)
    mask = np.asarray(nib.load(str(out_file(qsm_run, "desc-qsm_mask"))).dataobj).astype(bool)
    assert abs(float(np.mean(chi[mask]))) < 1e-5
    assert np.isnan(chi[~mask]).all()
    assert (dataset / "derivatives" / "alsiron" / "dataset_description.json").is_file()


def test_two_step_sidecar(two_step_run):
    steps = json.loads((two_step_run / "sub-01_ses-01_Chimap.json").read_text())["Steps"]
    assert steps["DipoleInversion"]["Method"] == "TV-ADMM, masked data term"
    assert steps["DipoleInversion"]["Parameters"]["masked_tv_alpha"] == 7e-4
    assert steps["DipoleInversion"]["IterationsRun"] >= 1
    # The default 4 mm erosion before a two-step inversion (resolution-independent).
    assert steps["BackgroundFieldRemoval"]["MaskErosionMm"] == 4.0


def load_chi_and_truth(dataset: Path, anat: Path):
    truth = evaluate.load_truth(dataset, {"sub": "01", "ses": "01"})
    chi = np.asarray(nib.load(str(out_file(anat, "Chimap"))).dataobj, dtype=np.float64)
    mask = np.asarray(nib.load(str(out_file(anat, "desc-qsm_mask"))).dataobj).astype(bool)
    return chi, mask, truth


def test_two_step_chi_accuracy_against_truth(dataset, two_step_run):
    chi, mask, truth = load_chi_and_truth(dataset, two_step_run)
    # Measured at this seed with the BET mask, PDF after the default 4 mm erosion (one
    # voxel layer at 3 mm) and the two-step inversion (TV-ADMM, masked data term): NRMSE
    # 64.8 %, HFEN 47.0 %, XSIM 0.59, slope 0.93, R² 0.97; 45.0 % one voxel deeper, 30.9 %
    # two voxels deeper (plain TV-ADMM, the former default: 68.9 / 50.7 / 0.48 / 0.91 /
    # 0.95, 54.4 % and 43.3 % deeper; the bounds below date from it) on the QSM mask,
    # which keeps 88 % of the brain and one more (cortical) voxel layer, whose χ is
    # the least accurate (its own NRMSE ≈ 86 %, docs/qsm_mask_erosion.md). The former
    # 2-voxel erosion gave 58.1 % on a mask without that layer; on the SAME voxels (the
    # QSM mask eroded by one voxel, ≈ the former mask) this chain gives 54.4 % (XSIM
    # 0.50 vs 0.54), and 44.3 % one voxel deeper (former chain 42.1 %). The own-mask
    # bound moved from 65 to 72 % for the added rim, not for a loss of accuracy. The QSM mask
    # keeps most of the brain (the 4 mm BFR erosion removes one voxel layer).
    assert_chi_scores(chi, mask, truth, nrmse=68, hfen=51, xsim=0.55, slope=(0.8, 1.1),
                      r2=0.85, kept=0.85, one_in=49, two_in=35)


def assert_chi_scores(chi, mask, truth, *, nrmse: float, hfen: float, xsim: float,
                      slope: tuple[float, float], r2: float, kept: float, one_in: float,
                      two_in: float) -> None:
    """χ against the truth in the QSM mask, and one and two voxel layers in: NRMSE and
    HFEN [%] below, XSIM above, deep-grey slope inside, R² above the bounds given; the
    mask keeps more than ``kept`` of the brain."""
    scores = evaluate.score_chi(chi, mask, truth)
    assert scores["NRMSE_pct"] < nrmse
    assert scores["HFEN_pct"] < hfen
    assert scores["XSIM"] > xsim
    assert slope[0] < scores["DeepGreySlope"] < slope[1]
    assert scores["DeepGreyR2"] > r2
    assert mask.sum() > kept * truth.brain_mask.sum()
    core = ndimage.binary_erosion(mask)
    assert evaluate.score_chi(chi, core, truth)["NRMSE_pct"] < one_in
    core2 = ndimage.binary_erosion(mask, iterations=2)
    assert evaluate.score_chi(chi, core2, truth)["NRMSE_pct"] < two_in


def test_default_chi_accuracy_against_truth(dataset, qsm_run, two_step_run):
    """The default chain (sstv) on the geometric phantom: behind the two-step chain here.

    Measured at this seed: own mask (99.5 % of the brain, outer voxel layer kept) NRMSE
    78.6 %, HFEN 69.2 %, XSIM 0.38, slope 1.04, R² 0.97; 70.5 % one voxel in, 60.0 % two
    voxels in; on the two-step chain's mask 70.5 % / XSIM 0.38 against its 64.7 % / 0.60.
    Why the default is still sstv: its error here is smooth, the anchor's (its 4 mm
    Gaussian part is 44 % against the two-step chain's 26 % at 96³, its fine-scale part the
    smaller one: LBV's boundary carries the phantom's edge field error inwards,
    docs/qsm_anatomy.md "Where the geometric phantom's gap is"), and the two-step defaults
    were tuned on this phantom. On the anatomical phantom, whose folded cortex is 1–2 voxels
    thick, the two-step chain keeps 0.42–0.48 of the cortex contrast and 0.45–0.49 of the
    ALS deep-layer excess; sstv keeps 0.74–0.86 and 0.80–0.84 (tests/test_sstv_anatomy.py,
    docs/qsm_anatomy.md). The bounds are the measured values plus 3 points / 0.03 for
    platform round-off; single-step, its mask (nearly) the whole brain.
    """
    chi, mask, truth = load_chi_and_truth(dataset, qsm_run)
    assert_chi_scores(chi, mask, truth, nrmse=82, hfen=73, xsim=0.34, slope=(0.9, 1.1),
                      r2=0.9, kept=0.98, one_in=74, two_in=63)
    # On the two-step chain's own mask: within 9 points of it (measured 5.8).
    _, two_mask, _ = load_chi_and_truth(dataset, two_step_run)
    common = mask & two_mask
    assert evaluate.score_chi(chi, common, truth)["NRMSE_pct"] < 64.7 + 9


def test_default_qsm_mask_keeps_the_precentral_cortex(dataset, qsm_run):
    _, mask, truth = load_chi_and_truth(dataset, qsm_run)
    names = truth.label_names
    deep = np.isin(truth.labels, [i for i, n in names.items()
                                  if n.startswith("precentral") and n.endswith("deep")])
    sup = np.isin(truth.labels, [i for i, n in names.items()
                                 if n.startswith("precentral") and n.endswith("superficial")])
    kept_deep = (mask & deep).sum() / deep.sum()
    kept_sup = (mask & sup).sum() / sup.sum()
    print(f"precentral kept: deep {kept_deep:.3f}, superficial {kept_sup:.3f}")
    # Measured with the default sstv, whose QSM mask is the phase-quality brain mask
    # (no erosion): deep 1.000, superficial 1.000. The two-step chain's 4 mm erosion (the
    # outer voxel layer at 3 mm) kept 1.000 and 0.94, the 2-voxel erosion before it 0.93
    # and 0.16 (docs/qsm_mask_erosion.md).
    assert kept_deep >= 0.97
    assert kept_sup >= 0.97


def test_cortical_contrast_survives_background_removal(dataset, qsm_run):
    chi, mask, truth = load_chi_and_truth(dataset, qsm_run)

    def contrast(x, ids):
        sel = mask & np.isin(truth.labels, ids)
        wm = mask & (truth.labels == 5)
        assert sel.sum() >= 100 and wm.sum() >= 100
        return float(x[sel].mean() - x[wm].mean())

    cortex_true, m1_true = contrast(truth.chi, [6]), contrast(truth.chi, PRECENTRAL)
    cortex, m1 = contrast(chi, [6]), contrast(chi, PRECENTRAL)
    print(f"GM-WM {cortex:.4f} (true {cortex_true:.4f}), M1-WM {m1:.4f} (true {m1_true:.4f})")
    # Measured with the default chain (sstv): GM − WM +0.013 ppm of a true +0.032,
    # precentral − WM +0.023 of +0.039. The two-step chain (PDF + tvmasked) gave +0.014 and
    # +0.012 (V-SHARP: +0.000 and +0.002 on the 1007 cortical voxels it kept); PDF keeps
    # about 45 %, of which ~3 ppb is bias (no-contrast control); the rest is lost at the
    # brain edge (see docs/qsm_bfr.md).
    assert cortex > 0.3 * cortex_true
    assert m1 > 0.45 * m1_true
    # The CLI's truth summary reports the same numbers.
    scores = evaluate.score_chi(chi, mask, truth)
    assert scores["CortexMinusWM"] == pytest.approx(cortex, abs=1e-6)
    assert scores["PrecentralMinusWM_true"] == pytest.approx(m1_true, abs=1e-6)


def test_deep_grey_region_means(dataset, qsm_run):
    chi, mask, truth = load_chi_and_truth(dataset, qsm_run)
    ref_est = chi[mask].mean()
    ref_true = truth.chi[mask].mean()
    names = truth.label_names
    errors = {}
    for lab in truth.deep_grey_ids():
        sel = mask & (truth.labels == lab)
        if sel.sum() < 5:
            continue
        errors[names[lab]] = (chi[sel].mean() - ref_est) - (truth.chi[sel].mean() - ref_true)
    assert len(errors) >= 8
    # Region means within 0.04 ppm of truth (globus pallidus truth ≈ 0.18 ppm); the
    # measured worst case is printed on failure.
    worst = max(errors, key=lambda k: abs(errors[k]))
    assert abs(errors[worst]) < 0.04, errors
    # Iron-rich nuclei come out more paramagnetic than white matter, in the right order.
    def region(name):
        sel = mask & np.isin(truth.labels, [i for i, n in names.items() if n.startswith(name)])
        return chi[sel].mean()
    assert region("globus_pallidus") > region("putamen") > region("white_matter")


def r2star_region_errors(r2star: np.ndarray, labels: np.ndarray, truth_r2star: np.ndarray,
                         brain: np.ndarray, names: dict[int, str]) -> dict[str, float]:
    """Relative error of the mean R2* in the interior (1-voxel eroded) of each tissue."""
    errors = {}
    for lab, name in names.items():
        if name in ("air", "bone", "sinus_air", "scalp", "csf", "vein"):
            continue
        sel = ndimage.binary_erosion(labels == lab) & brain
        if sel.sum() < 10:
            continue
        errors[name] = float(np.nanmean(r2star[sel]) / truth_r2star[sel].mean() - 1)
    return errors


def test_r2star_in_the_qsm_run(dataset, qsm_run):
    truth = evaluate.load_truth(dataset, {"sub": "01", "ses": "01"})
    r2s = np.asarray(nib.load(str(out_file(qsm_run, "R2starmap"))).dataobj, dtype=np.float64)
    errors = r2star_region_errors(r2s, truth.labels, truth.r2star, truth.brain_mask,
                                  truth.label_names)
    assert len(errors) >= 5
    # At 3 T and 3 mm the phantom's sub-voxel field variation (real intravoxel dephasing,
    # not modelled by the mono-exponential tissue R2* truth) raises apparent R2*: measured
    # +1.9 % in WM, +4.6 % in the cortex next to the skull, -0.5..+1.9 % in deep grey.
    deep = {k: v for k, v in errors.items() if k != "cortical_gm"}
    assert max(abs(v) for v in deep.values()) < 0.03, errors
    assert 0 < errors["cortical_gm"] < 0.08, errors


@pytest.mark.parametrize("seed", [3, 4])
def test_r2star_within_two_percent_at_snr_100(seed):
    """R2* fit accuracy in tissue at SNR 100, with dephasing made negligible (0.5 T)."""
    ps = phantom.simulate_subject(matrix=64, voxel_size=3.0, snr=100.0, field_strength=0.5,
                                  rng=np.random.default_rng(seed))
    from alsiron import relax

    fit = relax.fit_r2star_loglinear(ps.magnitude, ps.echo_times, mask=ps.brain_mask,
                                     weighted=True)
    errors = r2star_region_errors(fit.r2star, ps.labels, ps.r2star, ps.brain_mask,
                                  ps.label_names)
    assert len(errors) >= 5
    # Measured (seed 3): |error| <= 0.8 % in every tissue.
    assert max(abs(v) for v in errors.values()) < 0.02, errors


def test_intravoxel_dephasing_bias_grows_with_field():
    """Documents the bias the 3 T test allows: it vanishes as B0 (hence the field
    variation inside a voxel) shrinks, so it is physics, not the fitter."""
    from alsiron import relax

    bias = {}
    for b0 in (0.5, 3.0):
        ps = phantom.simulate_subject(matrix=64, voxel_size=3.0, snr=None, field_strength=b0,
                                      rng=np.random.default_rng(3))
        fit = relax.fit_r2star_loglinear(ps.magnitude, ps.echo_times, mask=ps.brain_mask)
        bias[b0] = r2star_region_errors(fit.r2star, ps.labels, ps.r2star, ps.brain_mask,
                                        ps.label_names)["cortical_gm"]
    assert abs(bias[0.5]) < 0.01 < bias[3.0]


def test_bfr_option_selects_the_method(dataset, qsm_run, tmp_path, capsys):
    out = tmp_path / "vsharp"
    # --bfr other than PDF without --inversion runs the two-step chain, as it did before
    # the default became single-step, and says so.
    assert main(["qsm", str(dataset / "sub-01"), "--bfr", "vsharp", "--brain-mask", "otsu",
                 "--out", str(out)]) == 0
    assert "--bfr vsharp runs the two-step chain" in capsys.readouterr().err
    anat = out / "sub-01" / "ses-01" / "anat"
    side = json.loads((anat / "sub-01_ses-01_Chimap.json").read_text())
    assert side["Parameters"]["inversion"] == "tvmasked"
    assert side["Steps"]["BrainMask"]["Method"].startswith("Otsu")
    assert side["Parameters"]["brain_mask_method"] == "otsu"
    bfr = side["Steps"]["BackgroundFieldRemoval"]
    assert bfr["Method"] == "V-SHARP" and bfr["Radii_mm"][0] == 24.0
    assert side["Parameters"]["bfr"] == "vsharp"
    chi_v, mask_v, truth = load_chi_and_truth(dataset, anat)
    chi_p, mask_p, _ = load_chi_and_truth(dataset, qsm_run)
    # Measured: V-SHARP NRMSE 37.2 % on its mask, which keeps 792 cortical voxels (the
    # default chain keeps 8716).
    assert evaluate.score_chi(chi_v, mask_v, truth)["NRMSE_pct"] < 50
    cortex = truth.labels == 6
    assert (mask_p & cortex).sum() > 3 * (mask_v & cortex).sum()

    def gm_wm(chi, mask):
        return chi[mask & cortex].mean() - chi[mask & (truth.labels == 5)].mean()

    # Measured GM − WM: V-SHARP −0.002 ppm, the default chain +0.013 ppm (truth +0.031).
    assert gm_wm(chi_v, mask_v) < 0.005 < 0.01 < gm_wm(chi_p, mask_p)
    assert main(["qsm", str(dataset / "sub-01"), "--bfr", "sharp", "--out", str(out)]) != 0


def test_rerun_refuses_then_overwrites(dataset, qsm_run, capsys):
    chi_path = out_file(qsm_run, "Chimap")
    before = chi_path.stat().st_mtime_ns
    code = main(["qsm", str(dataset / "sub-01")])
    err = capsys.readouterr().err
    assert code == EXIT_INPUT_ERROR and "already exists" in err and "--overwrite" in err
    assert chi_path.stat().st_mtime_ns == before
    assert main(["qsm", str(dataset / "sub-01"), "--overwrite", "--inversion", "tkd"]) == 0
    side = json.loads((qsm_run / "sub-01_ses-01_Chimap.json").read_text())
    assert side["Steps"]["DipoleInversion"]["Method"] == "TKD"
    # The phantom's truth is beside the data: the CLI (not the run) compares with it.
    assert "  vs phantom truth: chi NRMSE " in capsys.readouterr().out


def test_truth_is_looked_for_only_beside_phantom_data(dataset, tmp_path):
    assert evaluate.has_truth(dataset, {"sub": "01", "ses": "01"})
    assert not evaluate.has_truth(dataset, {"sub": "02", "ses": "01"})
    assert not evaluate.has_truth(tmp_path, {"sub": "01"})
    assert evaluate.load_truth(tmp_path, {"sub": "01"}) is None


def test_truth_comparison_of_a_mask_that_missed_the_brain_says_so(dataset):
    # A QSM mask outside the true brain (BET following the neck on the anatomical head)
    # leaves nothing to score: the comparison says so instead of raising.
    truth = evaluate.load_truth(dataset, {"sub": "01", "ses": "01"})
    outside = ~truth.brain_mask
    outside[:, :, 1:] = False  # one slab outside the brain
    fake = SimpleNamespace(chi=SimpleNamespace(data=np.zeros(truth.chi.shape, np.float32)),
                           qsm_mask=SimpleNamespace(data=outside))
    out = evaluate.compare_with_truth(fake, dataset, {"sub": "01", "ses": "01"})
    assert out == {"scored": "nothing (QSM mask outside the true brain)"}


def test_interrupted_run_leaves_no_partial_files(dataset, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real_save = nib.save

    def save_then_interrupt(img, filename):
        calls["n"] += 1
        if calls["n"] == 4:
            with open(filename, "wb") as fh:
                fh.write(b"partial")
            raise KeyboardInterrupt
        real_save(img, filename)

    monkeypatch.setattr(nib, "save", save_then_interrupt)
    out = tmp_path / "out"
    assert main(["qsm", str(dataset / "sub-01"), "--out", str(out)]) == EXIT_INTERRUPTED
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if ".part" in p.name]
    for p in files:
        if p.name.endswith(".nii.gz"):
            real_img = nib.load(str(p))
            assert np.asarray(real_img.dataobj).shape == (64, 64, 64)
    # A visit is one transaction (issue 14): the three maps written before the interrupt
    # were staged, never published, and went with the staging folder.
    assert [p for p in files if p.name.endswith(".nii.gz")] == []
    assert not [p for p in out.rglob(".alsiron-staging*")]


def test_oblique_anisotropic_phantom_needs_the_affine_b0(tmp_path):
    b0 = (0.0, 0.34, 0.94)
    root = phantom.write_dataset(tmp_path / "obl", subjects=1, matrix=(64, 64, 56),
                                 voxel_size=(3.0, 3.0, 3.5), b0_direction=b0, seed=5)
    ses = ingest.find_sessions(root / "sub-01")[0]
    series = ingest.load_megre(ses.series[0], subject="01", session=ses.session)
    unit = np.asarray(b0) / np.linalg.norm(b0)
    assert series.b0_direction == pytest.approx(tuple(unit), abs=1e-6)
    assert series.voxel_size == pytest.approx((3.0, 3.0, 3.5))
    truth = evaluate.load_truth(root, {"sub": "01", "ses": "01"})
    wrong_series = dataclasses.replace(series, b0_direction=(0.0, 0.0, 1.0))  # what a tool
    # that ignores the affine would do
    two_step = workflow.QsmParameters(inversion=InversionSettings(method="tvmasked"))
    scores = {}
    for name, params in (("two-step", two_step), ("default", workflow.QsmParameters())):
        result = workflow.process_series(series, params)
        wrong_chi = workflow.process_series(wrong_series, params).chi.data
        # Scored on the QSM mask less its outer voxel layer, where χ is poor with either B0.
        core = ndimage.binary_erosion(result.qsm_mask.data.astype(bool))
        scores[name] = (evaluate.score_chi(result.chi.data, core, truth),
                        evaluate.score_chi(wrong_chi, core, truth))
        print(name, [round(v["NRMSE_pct"], 1) for v in scores[name]])
    # Two-step chain (PDF, tvmasked; 2026-11-26): NRMSE 46.4 % (slope 0.87, XSIM 0.58)
    # with the affine's B0 vs 64.5 % (slope 0.72) assuming (0, 0, 1); plain TV-ADMM gave
    # 51.0 % (slope 0.84) vs 64.3 %.
    right, wrong = scores["two-step"]
    assert right["NRMSE_pct"] < 55
    assert right["NRMSE_pct"] < wrong["NRMSE_pct"] - 8
    assert 0.75 < right["DeepGreySlope"] < 1.1
    # Default chain (sstv; its mask keeps the whole brain, so its core is one layer further
    # out than the two-step chain's): measured 76.4 % with the affine's B0 vs 123.6 %
    # assuming (0, 0, 1). Behind the two-step chain on this flat-compartment phantom
    # (test_default_chi_accuracy_against_truth gives the reason); the wrong B0 costs it more.
    right, wrong = scores["default"]
    assert right["NRMSE_pct"] < 80
    assert right["NRMSE_pct"] < wrong["NRMSE_pct"] - 30
    assert 0.75 < right["DeepGreySlope"] < 1.1


def test_real_romeo_patch_runs(tmp_path):
    """The in-vivo ROMEO patch (3 echoes, no TEs recorded) runs once TEs are given."""
    real = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "romeo_small"
    if not (real / "Mag.nii").exists():
        pytest.skip("shared real data not present")
    anat = tmp_path / "sub-r" / "anat"
    anat.mkdir(parents=True)
    mag, phase = nib.load(str(real / "Mag.nii")), nib.load(str(real / "Phase.nii"))
    for k in range(3):
        for part, img in (("mag", mag), ("phase", phase)):
            raw = np.asarray(img.dataobj.get_unscaled())[..., k]
            hdr = nib.Nifti1Image(raw, img.affine)
            hdr.header.set_slope_inter(img.dataobj.slope, img.dataobj.inter)
            nib.save(hdr, anat / f"sub-r_echo-{k + 1}_part-{part}_MEGRE.nii")
    code = main(["qsm", str(tmp_path / "sub-r"), "--echo-times", "0.004", "--echo-times",
                 "0.008", "--echo-times", "0.012", "--field-strength", "3"])
    assert code == 0
    out = tmp_path / "derivatives" / "alsiron" / "sub-r" / "anat"
    chi = np.asarray(nib.load(str(out / "sub-r_Chimap.nii.gz")).dataobj)
    r2s = np.asarray(nib.load(str(out / "sub-r_R2starmap.nii.gz")).dataobj)
    mask = np.asarray(nib.load(str(out / "sub-r_desc-qsm_mask.nii.gz")).dataobj).astype(bool)
    # The patch lies inside the brain (no background): the brain mask keeps most of it;
    # the 4 mm pre-BFR erosion takes 8 voxels (0.47 mm) in-plane and 4 (1 mm) through
    # plane off every face of this 24 × 24 × 41 mm patch: the QSM mask keeps 35 %.
    brain = np.asarray(nib.load(str(out / "sub-r_desc-brain_mask.nii.gz")).dataobj)
    assert brain.astype(bool).mean() > 0.5
    assert mask.mean() > 0.3
    assert 5 < np.nanmedian(r2s) < 80
    # Veins (the highest R2*: deoxygenated blood) come out paramagnetic.
    # Measured: +0.015 ppm in the top 2 % of R2* vs 0 over the mask.
    veins = mask & (r2s > np.nanpercentile(r2s[mask], 98))
    assert chi[veins].mean() > chi[mask].mean() + 0.005


def test_negate_phase_option_flips_susceptibility(dataset, tmp_path):
    """GE stores phase with the opposite sign: --negate-phase must restore paramagnetic > 0."""
    out = tmp_path / "neg"
    assert main(["qsm", str(dataset / "sub-01"), "--out", str(out), "--negate-phase"]) == 0
    anat = out / "sub-01" / "ses-01" / "anat"
    chi, mask, truth = load_chi_and_truth(dataset, anat)
    pallidum = mask & np.isin(truth.labels, [i for i, n in truth.label_names.items()
                                             if n.startswith("globus_pallidus")])
    # Negated phase = negated field = negated χ: iron-rich pallidum now reads diamagnetic.
    assert chi[pallidum].mean() < chi[mask].mean() - 0.05
    side = json.loads((anat / "sub-01_ses-01_Chimap.json").read_text())
    assert side["Acquisition"]["PhaseNegated"] is True


def test_user_mask(dataset, tmp_path, capsys):
    truth_mask = (dataset / "derivatives/phantom/sub-01/ses-01/anat/"
                  "sub-01_ses-01_desc-brain_mask.nii.gz")
    out = tmp_path / "um"
    assert main(["qsm", str(dataset / "sub-01"), "--out", str(out),
                 "--mask", str(truth_mask)]) == 0
    anat = out / "sub-01" / "ses-01" / "anat"
    used = np.asarray(nib.load(str(out_file(anat, "desc-brain_mask"))).dataobj).astype(bool)
    given = np.asarray(nib.load(str(truth_mask)).dataobj).astype(bool)
    np.testing.assert_array_equal(used, given)
    side = json.loads((anat / "sub-01_ses-01_Chimap.json").read_text())
    assert side["Steps"]["BrainMask"] == {"Method": "given by the user",
                                          "Source": truth_mask.relative_to(dataset).as_posix()}
    # A mask on another grid is refused, naming the file; nothing is written.
    bad = tmp_path / "bad_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((10, 10, 10), np.uint8), np.eye(4)), bad)
    capsys.readouterr()
    assert main(["qsm", str(dataset / "sub-01"), "--out", str(tmp_path / "um2"),
                 "--mask", str(bad)]) == EXIT_INPUT_ERROR
    err = capsys.readouterr().err
    assert str(bad) in err and "differs" in err
    assert not (tmp_path / "um2" / "sub-01").exists()


def test_list_methods(capsys):
    assert main(["qsm", "--list-methods"]) == 0
    out = capsys.readouterr().out
    for name in ("pdf (default)", "vsharp", "ismv", "lbv", "sstv (default)", "tvmasked", "tvadmm",
                 "tkd", "tikhonov", "ilsqr", "medi", "rts", "ndi", "--weak-harmonic"):
        assert name in out


def test_inversion_option_records_every_parameter(dataset, qsm_run, tmp_path):
    out = tmp_path / "medi"
    assert main(["qsm", str(dataset / "sub-01"), "--inversion", "medi", "--out", str(out)]) == 0
    anat = out / "sub-01" / "ses-01" / "anat"
    side = json.loads((anat / "sub-01_ses-01_Chimap.json").read_text())
    inv = side["Steps"]["DipoleInversion"]
    assert inv["Method"].startswith("MEDI") and "Liu" in inv["Reference"]
    assert set(inv["Parameters"]) >= {"medi_alpha", "medi_edge_fraction", "medi_max_iter",
                                      "medi_tol", "medi_nonlinear"}
    assert 1 <= inv["IterationsRun"] <= inv["Parameters"]["medi_max_iter"]
    assert inv["PhasePerPpm_rad"] == pytest.approx(2 * np.pi * 42.577478 * 3.0 * 16.5e-3,
                                                   rel=1e-6)
    assert side["Parameters"]["inversion"] == "medi"
    chi, mask, truth = load_chi_and_truth(dataset, anat)
    # Measured in the chain (PDF local field, noise, 4 mm erosion): MEDI NRMSE 86.0 %,
    # slope 0.97; the default (TV-ADMM, masked data term) 64.8 %, plain TV-ADMM 68.9 %.
    scores = evaluate.score_chi(chi, mask, truth)
    assert scores["NRMSE_pct"] < 110 and 0.85 < scores["DeepGreySlope"] < 1.15
    assert main(["qsm", str(dataset / "sub-01"), "--inversion", "rts", "--weak-harmonic",
                 "--out", str(tmp_path / "x")]) != 0


def test_reference_region_from_a_label_image(dataset, tmp_path):
    dseg = dataset / "derivatives/phantom/sub-01/ses-01/anat/sub-01_ses-01_dseg.nii.gz"
    truth = evaluate.load_truth(dataset, {"sub": "01", "ses": "01"})
    csf = next(i for i, n in truth.label_names.items() if n == "csf")
    out = tmp_path / "ref"
    assert main(["qsm", str(dataset / "sub-01"), "--out", str(out),
                 "--reference-mask", str(dseg), "--reference-label", str(csf)]) == 0
    anat = out / "sub-01" / "ses-01" / "anat"
    chi = np.asarray(nib.load(str(out_file(anat, "Chimap"))).dataobj, dtype=np.float64)
    mask = np.asarray(nib.load(str(out_file(anat, "desc-qsm_mask"))).dataobj).astype(bool)
    region = mask & (truth.labels == csf)
    assert abs(chi[region].mean()) < 1e-5
    ref = json.loads((anat / "sub-01_ses-01_Chimap.json").read_text())["Steps"]["Referencing"]
    # The region's offset from the whole-brain reference is reported: the whole-brain
    # mean of the region-referenced map is minus that offset.
    np.testing.assert_allclose(chi[mask].mean(), -ref["RegionMeanVsWholeBrain_ppm"], atol=1e-5)
    assert ref["RegionVoxels"] == int(region.sum()) and ref["RegionSDVsWholeBrain_ppm"] > 0
    # Relative to the dataset (issue 14, finding 9).
    assert ref["Source"] == f"{dseg.relative_to(dataset).as_posix()} label {csf}"
    assert main(["qsm", str(dataset / "sub-01"), "--reference-label", "4"]) != 0
