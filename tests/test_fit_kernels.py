"""Unwrapping, multi-echo field fit and R2* fit: Rust vs NumPy twins and vs ground truth."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from skimage.restoration import unwrap_phase as skimage_unwrap

from alsiron import _core
from alsiron.constants import GAMMA_BAR_HZ_PER_T
from alsiron.field.echo_fit import fit_multi_echo_field, omega_to_ppm, unwrap_phase
from alsiron.relax.r2star import R2STAR_STATUS, fit_r2star_loglinear

import twins_fit as twins

TWO_PI = 2.0 * np.pi
REAL = Path("/work/shared/data/real/romeo_small")


def assert_equal_up_to_2pi_constant(out, truth, where=None):
    """out − truth must be one constant 2πk over ``where`` (float32 rounding allowed)."""
    d = np.asarray(out, np.float64) - truth
    if where is not None:
        d = d[where]
    k = np.round(d / TWO_PI)
    np.testing.assert_allclose(d - TWO_PI * k, 0.0, atol=2e-4)
    assert np.ptp(k) == 0, f"offsets not constant: {np.unique(k)}"


def smooth_phase(shape, rng, max_step=1.3):
    """A smooth random phase [rad] spanning several wraps, scaled so that the largest
    difference between neighbours is ``max_step`` rad (< π: unwrappable exactly)."""
    axes = [np.linspace(-1, 1, n) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    c = rng.uniform(-1, 1, 6)
    f = (c[0] * x + c[1] * y * z + c[2] * x**2 + 0.5 * np.sin(2 * z + c[3])
         + 0.3 * c[4] * y**2 + 0.2 * c[5] * x * y + 1.5 * x)
    steepest = max(np.abs(np.diff(f, axis=a)).max() for a in range(3))
    return f * (max_step / steepest)


def head_like(shape):
    """Ellipsoid mask and a magnitude bright inside it."""
    axes = [np.linspace(-1, 1, n) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    inside = (x / 0.85) ** 2 + (y / 0.8) ** 2 + (z / 0.75) ** 2 < 1
    mag = np.where(inside, 1.0 + 0.3 * np.cos(3 * x) * np.cos(2 * y), 0.05)
    return inside, mag


# ----------------------------------------------------------------------------- unwrap
@pytest.mark.parametrize("shape", [(20, 18, 14), (17, 21, 9)])
def test_unwrap_recovers_truth_and_matches_twin(shape):
    rng = np.random.default_rng(sum(shape))
    truth = smooth_phase(shape, rng)
    assert np.ptp(truth) > 2.5 * TWO_PI
    wrapped = twins.wrap(truth).astype(np.float32)
    inside, mag = head_like(shape)
    out = unwrap_phase(wrapped, mag, inside)
    assert out.dtype == np.float32 and out.shape == shape
    assert_equal_up_to_2pi_constant(out, truth, inside)
    np.testing.assert_array_equal(out[~inside], wrapped[~inside])
    ref = twins.unwrap_reference(wrapped, mag, inside)
    # Both exact: they may differ only by the seed's 2πk.
    assert_equal_up_to_2pi_constant(out, ref, inside)


def test_unwrap_matches_skimage_and_is_invariant_to_2pi():
    rng = np.random.default_rng(7)
    shape = (32, 30, 24)
    truth = smooth_phase(shape, rng)
    assert np.ptp(truth) > 4 * TWO_PI
    wrapped = twins.wrap(truth).astype(np.float32)
    out = unwrap_phase(wrapped)
    assert_equal_up_to_2pi_constant(out, truth)
    assert_equal_up_to_2pi_constant(out, skimage_unwrap(wrapped.astype(np.float64)))
    shifted = unwrap_phase(wrapped + np.float32(TWO_PI))
    np.testing.assert_allclose(shifted - out, TWO_PI, atol=1e-4)


def test_unwrap_disconnected_parts_and_nan():
    rng = np.random.default_rng(3)
    shape = (24, 12, 10)
    truth = smooth_phase(shape, rng)
    wrapped = twins.wrap(truth).astype(np.float32)
    mask = np.ones(shape, bool)
    mask[12] = False  # two slabs
    wrapped[20, 5, 5] = np.nan
    out = unwrap_phase(wrapped, None, mask)
    assert np.isnan(out[20, 5, 5])
    first, second = np.zeros(shape, bool), np.zeros(shape, bool)
    first[:12], second[13:] = True, True
    second[20, 5, 5] = False
    assert_equal_up_to_2pi_constant(out, truth, first)
    assert_equal_up_to_2pi_constant(out, truth, second)


def test_unwrap_rejects_bad_shapes():
    with pytest.raises(ValueError, match="3-D"):
        unwrap_phase(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="magnitude"):
        unwrap_phase(np.zeros((4, 4, 4)), np.ones((4, 4, 3)))
    with pytest.raises(ValueError, match="mask"):
        unwrap_phase(np.zeros((4, 4, 4)), None, np.ones((4, 4, 3)))
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.unwrap_phase(np.zeros((4, 4, 8), np.float32)[:, :, ::2],
                           np.ones((4, 4, 4), np.float32), np.ones((4, 4, 4), np.uint8))


# ----------------------------------------------------------------------------- field
def simulate_field(shape, tes, b0, snr, rng):
    """Wrapped multi-echo data: smooth large background + local blobs, φ0, R2* decay.

    Returns magnitude, phase (E, X, Y, Z) float32, field [ppm], φ0 [rad], mask. The field
    has zero magnitude²-weighted mean over the mask, the convention the fit assumes to
    resolve the global 2π/ΔTE ambiguity.
    """
    axes = [np.linspace(-1, 1, n) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    inside, mag0 = head_like(shape)
    background = 2.0 * z**2 - 1.2 * x * y + 0.8 * x + 1.0  # ppm: air/tissue-like, large
    local = 0.15 * np.exp(-((x - 0.3) ** 2 + y**2 + (z + 0.2) ** 2) / 0.02) \
        - 0.1 * np.exp(-((x + 0.4) ** 2 + (y - 0.3) ** 2 + z**2) / 0.01)
    field = background + local
    # The scanner centres its frequency on the imaged tissue: mean off-resonance ≈ 0.
    field = field - np.average(field[inside], weights=mag0[inside] ** 2)
    phi0 = 0.6 * np.sin(2 * x + y) - 0.4
    omega = TWO_PI * GAMMA_BAR_HZ_PER_T * b0 * field * 1e-6
    tes = np.asarray(tes)[:, None, None, None]
    signal = 100.0 * mag0 * np.exp(-25.0 * tes) * np.exp(1j * (phi0 + omega * tes))
    if snr:
        sigma = 100.0 / snr
        signal = signal + sigma * (rng.standard_normal(signal.shape)
                                   + 1j * rng.standard_normal(signal.shape))
    return (np.abs(signal).astype(np.float32), np.angle(signal).astype(np.float32),
            field, phi0, inside)


def test_field_fit_noiseless_is_exact_and_matches_twin():
    rng = np.random.default_rng(11)
    shape, tes, b0 = (28, 26, 20), [0.004, 0.008, 0.012, 0.016, 0.020], 3.0
    mag, phase, field, phi0, inside = simulate_field(shape, tes, b0, None, rng)
    wraps = np.abs(TWO_PI * GAMMA_BAR_HZ_PER_T * b0 * field * 1e-6 * tes[-1])[inside].max()
    assert wraps > 2.5 * TWO_PI, "simulation must wrap several times per echo"
    res = fit_multi_echo_field(mag, phase, tes, inside, field_strength=b0)
    assert np.all(np.isnan(res.field_ppm[~inside]))
    np.testing.assert_allclose(res.field_ppm[inside], field[inside], atol=2e-5)
    np.testing.assert_allclose(twins.wrap(res.phase_offset - phi0)[inside], 0.0, atol=2e-4)
    assert np.nanmax(res.residual) < 1e-3

    dphi, pair_mag = twins.pair_difference(mag, phase, tes)
    dphi_unwrapped = twins.centre(twins.unwrap_reference(dphi, pair_mag, inside),
                                  pair_mag, inside)
    omega, offset, residual = twins.fit_field_reference(mag, phase, tes, dphi_unwrapped,
                                                        inside)
    np.testing.assert_allclose(res.omega[inside], omega[inside], rtol=1e-5, atol=1e-2)
    np.testing.assert_allclose(res.residual[inside], residual[inside], atol=1e-4)


def test_field_fit_noisy_accuracy_and_echo_last_layout():
    rng = np.random.default_rng(12)
    shape, tes, b0 = (32, 30, 24), [0.003, 0.0065, 0.010, 0.0135, 0.017, 0.0205], 3.0
    mag, phase, field, _, inside = simulate_field(shape, tes, b0, 100.0, rng)
    res = fit_multi_echo_field(mag, phase, tes, inside, field_strength=b0)
    err = (res.field_ppm - field)[inside]
    # Phase noise ≈ 1/SNR_k rad per echo → field noise ≈ 1e-3 ppm; no wrap errors allowed.
    assert np.max(np.abs(err)) < 0.02
    assert np.sqrt(np.mean(err**2)) < 3e-3
    assert np.median(res.residual[inside]) < 0.05
    last = fit_multi_echo_field(np.moveaxis(mag, 0, -1), np.moveaxis(phase, 0, -1), tes,
                                inside, field_strength=b0, echo_axis=-1)
    np.testing.assert_array_equal(last.field_ppm, res.field_ppm)


def test_field_fit_bad_input():
    mag = np.ones((2, 4, 4, 4), np.float32)
    with pytest.raises(ValueError, match="at least 2"):
        fit_multi_echo_field(mag[:1], mag[:1], [0.01], field_strength=3)
    with pytest.raises(ValueError, match="increasing"):
        fit_multi_echo_field(mag, mag, [0.02, 0.01], field_strength=3)
    with pytest.raises(ValueError, match="milliseconds"):
        fit_multi_echo_field(mag, mag, [4.0, 8.0], field_strength=3)
    with pytest.raises(ValueError, match="echo times for"):
        fit_multi_echo_field(mag, mag, [0.01, 0.02, 0.03], field_strength=3)
    with pytest.raises(ValueError, match="field_strength"):
        fit_multi_echo_field(mag, mag, [0.01, 0.02], field_strength=0)
    with pytest.raises(ValueError, match="differ in shape"):
        fit_multi_echo_field(mag, mag[:, :3], [0.01, 0.02], field_strength=3)
    phase = np.zeros_like(mag)
    phase[1, 0, 0, 0] = np.nan
    res = fit_multi_echo_field(mag, phase, [0.01, 0.02], field_strength=3)
    assert np.isnan(res.field_ppm[0, 0, 0]) and np.isfinite(res.field_ppm[1:]).all()


def test_omega_to_ppm_definition():
    assert omega_to_ppm(np.array([TWO_PI * GAMMA_BAR_HZ_PER_T * 3.0 * 1e-6]), 3.0)[0] == \
        pytest.approx(1.0, rel=1e-6)


# ----------------------------------------------------------------------------- R2*
TES6 = np.array([4.0, 8.0, 12.0, 16.0, 20.0, 24.0]) * 1e-3


def test_r2star_noiseless_exact_and_matches_twins():
    rng = np.random.default_rng(21)
    n = 5000
    r2 = rng.uniform(10, 60, n)
    s0 = rng.uniform(50, 2000, n)
    mag = (s0 * np.exp(-r2 * TES6[:, None])).astype(np.float32)
    for weighted in (False, True):
        res = fit_r2star_loglinear(mag, TES6, weighted=weighted)
        assert np.all(res.status == 0)
        np.testing.assert_allclose(res.r2star, r2, rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(res.s0, s0, rtol=1e-5)
        # The kernels sum in float32 (as the float32 twins do): the rounding of ln S to
        # f32 leaves ≲ 2e-5 relative error on T2*, 50× below the 0.1 %.
        np.testing.assert_allclose(res.t2star, 1 / r2, rtol=3e-5)
    noisy = np.abs(mag + rng.normal(0, 5, mag.shape)).astype(np.float32)
    for weighted in (False, True):
        res = fit_r2star_loglinear(noisy, TES6, weighted=weighted)
        ref_r2, ref_s0 = twins.r2star_loglinear_reference(noisy[:, :300], TES6, weighted)
        np.testing.assert_allclose(res.r2star[:300], ref_r2, rtol=1e-5, atol=2e-3)
        np.testing.assert_allclose(res.s0[:300], ref_s0, rtol=1e-5)


@pytest.mark.parametrize("weighted", [False, True])
def test_r2star_accuracy_at_snr_100(weighted):
    """Bias < 2 % of truth for R2* 10–60 s⁻¹ (6 echoes, SNR 100 at TE 0, Rician data);
    the unweighted spread matches the least-squares noise prediction."""
    rng = np.random.default_rng(22)
    values = np.arange(10.0, 61.0, 10.0)
    r2 = np.repeat(values, 4000)
    s0, sigma = 1000.0, 10.0
    clean = s0 * np.exp(-r2 * TES6[:, None])
    noisy = np.abs(clean + sigma * (rng.standard_normal(clean.shape)
                                    + 1j * rng.standard_normal(clean.shape)))
    res = fit_r2star_loglinear(noisy.astype(np.float32), TES6, weighted=weighted)
    c = (TES6 - TES6.mean()) / np.sum((TES6 - TES6.mean()) ** 2)
    for v in values:
        sel = r2 == v
        bias = np.mean(res.r2star[sel]) / v - 1
        assert abs(bias) < 0.02, f"R2* {v}: bias {bias:.4f}"
        if not weighted:
            predicted_sd = np.sqrt(np.sum((c * sigma / (s0 * np.exp(-v * TES6))) ** 2))
            assert np.std(res.r2star[sel]) == pytest.approx(predicted_sd, rel=0.1)


def test_r2star_layouts_without_copy():
    rng = np.random.default_rng(23)
    shape = (7, 5, 4)
    r2 = rng.uniform(10, 60, shape)
    echo_first = np.ascontiguousarray(
        (300 * np.exp(-r2[None] * TES6[:, None, None, None])).astype(np.float32))
    nib_like = np.asfortranarray(np.moveaxis(echo_first, 0, -1))  # (X,Y,Z,E), F order
    a = fit_r2star_loglinear(echo_first, TES6)
    b = fit_r2star_loglinear(nib_like, TES6)
    c = fit_r2star_loglinear(np.ascontiguousarray(nib_like), TES6)  # C-ordered echo-last
    for res in (a, b, c):
        assert res.r2star.shape == shape
        np.testing.assert_allclose(res.r2star, r2, rtol=1e-5)
    from alsiron.relax.r2star import _echo_major
    flat, vol_shape, order = _echo_major(nib_like, 6)
    assert np.shares_memory(flat, nib_like) and order == "F" and vol_shape == shape
    flat, _, order = _echo_major(echo_first, 6)
    assert np.shares_memory(flat, echo_first) and order == "C"


def test_r2star_bad_voxels_and_mask():
    tes = [0.005, 0.010, 0.015]
    mag = np.full((3, 2, 2, 2), 100.0, np.float32) * np.exp(-20 * np.array(tes))[
        :, None, None, None].astype(np.float32)
    mag[0, 0, 0, 0] = 0
    mag[1, 0, 0, 1] = np.nan
    mag[2, 0, 1, 0] = -3
    mask = np.ones((2, 2, 2), bool)
    mask[1, 1, 1] = False
    res = fit_r2star_loglinear(mag, tes, mask=mask)
    assert res.status[0, 0, 0] == res.status[0, 0, 1] == res.status[0, 1, 0] == 1
    assert res.status[1, 1, 1] == 3 and R2STAR_STATUS[3] == "outside mask"
    assert res.status[1, 0, 0] == 0 and res.r2star[1, 0, 0] == pytest.approx(20, rel=1e-5)
    failed = res.status != 0
    assert np.all(np.isnan(res.r2star[failed])) and np.all(np.isnan(res.s0[failed]))
    assert np.all(np.isnan(res.t2star[failed]))
    # Masks follow the voxel order of an echo-last Fortran array too.
    res_f = fit_r2star_loglinear(np.asfortranarray(np.moveaxis(mag, 0, -1)), tes, mask=mask)
    np.testing.assert_array_equal(res_f.status, res.status)
    with pytest.raises(ValueError, match="at least 2"):
        fit_r2star_loglinear(mag[:1], [0.01])
    with pytest.raises(ValueError, match="increasing"):
        fit_r2star_loglinear(mag, [0.01, 0.01, 0.02])
    with pytest.raises(ValueError, match="no axis of"):
        fit_r2star_loglinear(mag, [0.01, 0.02, 0.03, 0.04])
    with pytest.raises(ValueError, match="mask has shape"):
        fit_r2star_loglinear(mag, tes, mask=np.ones((2, 2)))


# ----------------------------------------------------------------------------- real data
@pytest.mark.skipif(not REAL.exists(), reason="real data not available")
def test_real_romeo_small_runs_and_is_finite_in_brain():
    # Stored values are radians (phase) despite scl_slope = 1/855: read them unscaled.
    mag = np.asarray(nib.load(REAL / "Mag.nii").dataobj.get_unscaled(), np.float32)
    phase = np.asarray(nib.load(REAL / "Phase.nii").dataobj.get_unscaled(), np.float32)
    assert np.abs(phase).max() <= np.pi + 1e-5
    tes = [0.004, 0.008, 0.012]  # assumed (not recorded), see data README
    brain = mag[..., 0] > 0.2 * np.percentile(mag[..., 0], 99)
    assert brain.mean() > 0.2
    res = fit_multi_echo_field(mag, phase, tes, brain, field_strength=3.0, echo_axis=-1)
    assert np.isfinite(res.field_ppm[brain]).all()
    assert np.isnan(res.field_ppm[~brain]).all()
    # Real noise, vessels: most of the brain follows a straight phase line in TE.
    assert np.median(res.residual[brain]) < 0.2
    assert np.abs(res.field_ppm[brain]).max() < 20.0
    r2 = fit_r2star_loglinear(mag, tes, mask=brain, weighted=True)
    ok = r2.status[brain] == 0
    assert ok.mean() > 0.99
    assert 5 < np.median(r2.r2star[brain][ok]) < 100


def test_r2star_negative_rate_is_kept_and_t2star_nan():
    tes = [0.005, 0.010, 0.015]
    growing = (100 * np.exp(5.0 * np.array(tes)))[:, None].astype(np.float32)
    res = fit_r2star_loglinear(growing, tes)
    assert res.status[0] == 0 and res.r2star[0] == pytest.approx(-5.0, rel=1e-4)
    assert np.isnan(res.t2star[0])


@pytest.mark.skipif(not REAL.exists(), reason="real data not available")
def test_real_phase_with_nan_does_not_crash():
    # 2-echo phantom phase with 1280 NaN voxels and values slightly outside (−π, π].
    phase = np.asarray(nib.load(REAL / "phase_with_nan.nii").dataobj, np.float32)
    nan = np.isnan(phase).any(axis=-1)
    assert nan.sum() > 0
    unwrapped = unwrap_phase(phase[..., 0])
    assert np.isnan(unwrapped[np.isnan(phase[..., 0])]).all()
    assert np.isfinite(unwrapped[~np.isnan(phase[..., 0])]).all()
    res = fit_multi_echo_field(np.ones_like(phase), phase, [0.004, 0.008], None,
                               field_strength=3.0, echo_axis=-1)
    assert np.isnan(res.field_ppm[nan]).all()
    assert np.isfinite(res.field_ppm[~nan]).mean() > 0.99
