"""Rust dipole inversions (Tikhonov, iLSQR, weighted/weak-harmonic TV-ADMM, MEDI, RTS,
NDI) against their NumPy twins in tests/twins_qsm.py, to float32 tolerance.

Iterative solvers run a fixed number of iterations (tol = 0) so both sides do the same
arithmetic; odd and even shapes, anisotropic voxels and an oblique B0 throughout.
"""

from __future__ import annotations

import numpy as np
import pytest

from alsiron.qsm import inversion

import twins_qsm as tw

VOXEL = (1.0, 1.2, 1.5)
B0 = (0.2, -0.1, 1.0)


def case(shape, seed=0):
    ph = np.random.default_rng(seed)
    g = np.indices(shape, sparse=True)
    r2 = sum(((g[a] - (shape[a] - 1) / 2) / (0.4 * shape[a])) ** 2 for a in range(3))
    mask = r2 <= 1
    chi = np.where(mask, 0.05 * ph.standard_normal(shape), 0.0)
    chi = np.where(r2 < 0.2, 0.1, chi)
    field = tw.forward_field(chi, VOXEL, B0) + 0.002 * ph.standard_normal(shape)
    magnitude = np.where(mask, 1.0 + 0.3 * np.cos(g[0] / 3.0) + 0.1 * ph.random(shape), 0.05)
    return field.astype(np.float32), mask, magnitude.astype(np.float32)


def close(got, want, mask, rel):
    scale = np.abs(want[mask]).max()
    err = np.abs(got - want).max()
    assert err <= rel * scale, f"max |diff| {err:.3g} vs {rel:g} x {scale:.3g}"


SHAPES = [(20, 18, 16), (17, 19, 15)]


@pytest.mark.parametrize("shape", SHAPES)
def test_tikhonov_matches_twin(shape):
    field, mask, _ = case(shape)
    got = inversion.tikhonov(field, mask, voxel_size=VOXEL, b0_dir=B0, lam=0.02)
    close(got, tw.tikhonov(field, mask, VOXEL, B0, 0.02), mask, 1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_ilsqr_matches_textbook_lsqr(shape):
    field, mask, mag = case(shape, 1)
    w = inversion.magnitude_weight(mag, mask)
    got, it = inversion.ilsqr(field, mask, voxel_size=VOXEL, b0_dir=B0, weight=w, tol=0.0,
                              max_iter=15, streaking=False)
    assert it == 15
    close(got, tw.lsqr(field, w, mask, VOXEL, B0, 15), mask, 2e-4)


def test_ilsqr_fast_estimate_matches_twin():
    field, mask, _ = case((20, 18, 16), 7)
    got = inversion.ilsqr_fast_estimate(field, mask, voxel_size=VOXEL, b0_dir=B0)
    close(got, tw.ilsqr_fast_estimate(field, mask, VOXEL, B0), mask, 1e-4)


@pytest.mark.parametrize("shape", SHAPES)
def test_ilsqr_streaking_matches_twin(shape):
    field, mask, mag = case(shape, 8)
    w = inversion.magnitude_weight(mag, mask)
    got, it = inversion.ilsqr(field, mask, voxel_size=VOXEL, b0_dir=B0, weight=w, tol=0.0,
                              max_iter=10, streak_tol=0.0, streak_max_iter=12)
    assert it == 22
    want = tw.ilsqr_streaking(field, w, mask, VOXEL, B0, 10, 12)
    close(got, want, mask, 5e-4)
    # The streaking estimate is a real correction, not a no-op.
    lsqr_only = tw.lsqr(field, w, mask, VOXEL, B0, 10)
    assert np.abs(want - lsqr_only)[mask].max() > 0.05 * np.abs(lsqr_only[mask]).max()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", ["linear", "nonlinear", "weak-harmonic"])
def test_weighted_tv_admm_matches_twin(shape, variant):
    field, mask, mag = case(shape, 2)
    w = inversion.magnitude_weight(mag, mask)
    g = inversion.edge_weight(mag, mask, voxel_size=VOXEL, edge_fraction=0.2)
    kw = {"phase_scale": 8.0 if variant == "nonlinear" else None,
          "weak_harmonic": (50.0, 1.0) if variant == "weak-harmonic" else None}
    got, it = inversion.tv_admm_weighted(field, mask, voxel_size=VOXEL, b0_dir=B0, weight=w,
                                         tv_weight=g, alpha=2e-4, mu_gradient=2e-2,
                                         mu_data=1.0, max_iter=12, tol=0.0, **kw)
    assert it == 12
    want = tw.weighted_tv_admm(field, w, g, mask, VOXEL, B0, 2e-4, 2e-2, 1.0, 12, **kw)
    close(got, want, mask, 3e-4)


@pytest.mark.parametrize("shape", SHAPES)
def test_masked_tv_admm_is_the_weighted_engine_with_the_mask_as_weight(shape):
    # tvmasked = ½‖M(Dχ − f)‖² + α‖∇χ‖₁: the weighted twin with W = M, G = 1, linear.
    field, mask, _ = case(shape, 3)
    got, it = inversion.tv_admm_masked(field, mask, voxel_size=VOXEL, b0_dir=B0, alpha=2e-4,
                                       mu_gradient=2e-2, mu_data=0.1, max_iter=12, tol=0.0)
    assert it == 12
    ones = np.ones(field.shape, np.float32)
    want = tw.weighted_tv_admm(field, ones, ones, mask, VOXEL, B0, 2e-4, 2e-2, 0.1, 12)
    close(got, want, mask, 3e-4)
    chi, record = inversion.invert("tvmasked", field, mask, voxel_size=VOXEL, b0_dir=B0)
    assert record["Method"] == inversion.INVERSION_METHODS["tvmasked"]
    assert set(record["Parameters"]) == {"masked_tv_alpha", "masked_tv_mu_gradient",
                                         "masked_tv_mu_data", "masked_tv_max_iter",
                                         "masked_tv_tol"}
    assert 1 <= record["IterationsRun"] <= 200
    assert np.all(chi[~mask] == 0) and np.abs(chi[mask]).max() > 0


def test_edge_weight_matches_twin_and_marks_the_requested_fraction():
    field, mask, mag = case((20, 18, 16), 3)
    got = inversion.edge_weight(mag, mask, voxel_size=VOXEL, edge_fraction=0.25)
    want = tw.edge_weight(mag.astype(np.float64), mask, VOXEL, 0.25)
    # Ties at the cut may fall either way in float32; allow a handful of voxels.
    assert np.count_nonzero(got != want) <= 3
    assert abs(np.count_nonzero(got[mask] == 0) / mask.sum() - 0.25) < 0.01


@pytest.mark.parametrize("shape", SHAPES)
def test_rts_matches_twin(shape):
    field, mask, _ = case(shape, 4)
    got, it = inversion.rts(field, mask, voxel_size=VOXEL, b0_dir=B0, delta=0.15, mu=1e3,
                            rho=10.0, max_iter=10, tol=0.0, lsqr_iter=3)
    assert it == 10
    close(got, tw.rts(field, mask, VOXEL, B0, 0.15, 1e3, 10.0, 10, lsqr_iter=3), mask, 3e-4)


@pytest.mark.parametrize("shape", SHAPES)
def test_ndi_matches_twin(shape):
    field, mask, mag = case(shape, 5)
    w = inversion.magnitude_weight(mag, mask)
    got, it = inversion.ndi(field, mask, voxel_size=VOXEL, b0_dir=B0, phase_scale=10.0,
                            weight=w, lam=1e-3, step=2.0, max_iter=20, tol=0.0)
    assert it == 20
    close(got, tw.ndi(field, w, mask, VOXEL, B0, 10.0, 1e-3, 2.0, 20), mask, 2e-4)


def test_scipy_backend_of_the_twins_agrees_with_numpy():
    field, mask, mag = case((20, 18, 16), 6)
    sp = tw.FftBackend("scipy")
    close(tw.tikhonov(field, mask, VOXEL, B0, 0.02, fft=sp),
          tw.tikhonov(field, mask, VOXEL, B0, 0.02), mask, 1e-5)
    close(tw.ndi(field, mag, mask, VOXEL, B0, 10.0, 1e-3, 2.0, 5, fft=sp),
          tw.ndi(field, mag, mask, VOXEL, B0, 10.0, 1e-3, 2.0, 5), mask, 1e-4)


def test_interrupt_and_progress():
    field, mask, mag = case((16, 16, 16), 7)
    seen = []
    stop_at = [4]

    def progress(i, n):
        seen.append((i, n))
        if i >= stop_at[0]:
            raise KeyboardInterrupt

    # (solver, iteration to stop at, the total it reports): iLSQR counts both LSQR runs
    # (stopped once in each), RTS its LSQR step and the TV loop.
    for run, stop, total in (
        (lambda: inversion.ilsqr(field, mask, voxel_size=VOXEL, b0_dir=B0, tol=0.0,
                                 max_iter=50, streak_tol=0.0, progress=progress), 4, 100),
        (lambda: inversion.ilsqr(field, mask, voxel_size=VOXEL, b0_dir=B0, tol=0.0,
                                 max_iter=50, streak_tol=0.0, progress=progress), 54, 100),
        (lambda: inversion.rts(field, mask, voxel_size=VOXEL, b0_dir=B0, tol=0.0,
                               max_iter=50, progress=progress), 4, 66),
        (lambda: inversion.rts(field, mask, voxel_size=VOXEL, b0_dir=B0, tol=0.0,
                               max_iter=50, progress=progress), 20, 66),
        (lambda: inversion.ndi(field, mask, voxel_size=VOXEL, b0_dir=B0, phase_scale=5.0,
                               tol=0.0, max_iter=50, progress=progress), 4, 50),
        (lambda: inversion.medi(field, mask, mag, voxel_size=VOXEL, b0_dir=B0, tol=0.0,
                                max_iter=50, progress=progress), 4, 50),
        (lambda: inversion.tv_admm_masked(field, mask, voxel_size=VOXEL, b0_dir=B0, tol=0.0,
                                          max_iter=50, progress=progress), 4, 50),
    ):
        seen.clear()
        stop_at[0] = stop
        with pytest.raises(KeyboardInterrupt):
            run()
        assert seen and seen[-1] == (stop, total)


def test_bad_arguments_are_refused():
    field, mask, mag = case((12, 12, 12), 8)
    geo = {"voxel_size": VOXEL, "b0_dir": B0}
    with pytest.raises(ValueError, match="lam"):
        inversion.tikhonov(field, mask, lam=0.0, **geo)
    with pytest.raises(ValueError, match="empty"):
        inversion.tikhonov(field, np.zeros_like(mask), **geo)
    with pytest.raises(ValueError, match="non-finite"):
        inversion.ilsqr(np.where(mask, np.nan, field), mask, **geo)
    with pytest.raises(ValueError, match="non-negative"):
        inversion.ndi(field, mask, phase_scale=1.0, weight=-np.ones(field.shape), **geo)
    with pytest.raises(ValueError, match="phase_scale"):
        inversion.invert("ndi", field, mask, **geo)
    with pytest.raises(ValueError, match="magnitude"):
        inversion.invert("medi", field, mask, phase_scale=5.0, **geo)
    with pytest.raises(ValueError, match="unknown"):
        inversion.invert("nope", field, mask, **geo)
