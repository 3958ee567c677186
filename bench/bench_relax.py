"""Benchmark: relaxometry fits (alsiron.relax.r2star) against NumPy/SciPy twins.

Same data, same process:

- closed-form R2* (``fit_r2star`` loglinear / weighted / arlo, with the R² and CRLB maps,
  and the map-less ``fit_r2star_loglinear`` fast path used by ``alsiron qsm``) vs float32
  vectorised NumPy fits (tests/twins_fit.py) on the full echo-major volume;
- nonlinear R2* (Levenberg–Marquardt, Gaussian and Rician) vs ``scipy.optimize.least_squares``
  per voxel (timed on a subset, throughput scaled);
- EPG: the CPMG simulator vs the Bloch isochromat twin (tests/twins_epg.py), and the
  T2/B1/S0 fit (32 echoes) — NumPy column: Bloch-simulating the same number of trains
  that the fit's throughput implies is not meaningful, so it is timed as scipy
  least_squares over the Bloch twin on a handful of voxels.

Full size is 256×256×176 with 6 echoes (closed form); NLLS uses 1 M voxels and EPG 20 k
voxels (the throughput is what matters). ``quick=True`` shrinks every size.
Run ``python bench/bench_relax.py [--quick]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from timing import best_of, row  # noqa: E402

from alsiron import _core, relax

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import twins_epg  # noqa: E402

import twins_fit as twins  # noqa: E402

TES = [0.003, 0.007, 0.011, 0.015, 0.019, 0.023]
ESP, N_MESE = 0.01, 32


def _gre(n, rng, tes=TES):
    r2 = rng.uniform(10, 60, n).astype(np.float32)
    tes = np.asarray(tes, np.float32)[:, None]
    clean = 500 * np.exp(-r2[None] * tes)
    noise = rng.standard_normal((2, *clean.shape), dtype=np.float32) * 5
    return np.hypot(clean + noise[0], noise[1]).astype(np.float32)


def run(quick: bool = False) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    vol = (64, 64, 48) if quick else (256, 256, 176)
    n = int(np.prod(vol))
    shape = "x".join(map(str, vol)) + f"x{len(TES)}e"
    flat = _gre(n, rng)
    repeats = 3
    with np.errstate(all="ignore"):
        numpy_ols, _ = best_of(lambda: twins.r2star_loglinear_vectorised(flat, TES), repeats)
        numpy_w, _ = best_of(lambda: twins.r2star_loglinear_vectorised(flat, TES, True),
                              repeats)
        numpy_arlo, _ = best_of(lambda: twins.r2star_arlo_vectorised(flat, TES), repeats)
    rust, _ = best_of(lambda: _core.fit_r2star_loglinear(flat, TES, None, False), repeats + 2)
    rows.append(row("fit_r2star_loglinear fast path (vs numpy f32 OLS)", shape, rust,
                     numpy_ols, n))
    for method, base in (("loglinear", numpy_ols), ("weighted", numpy_w),
                         ("arlo", numpy_arlo)):
        for quality in (False, True):
            rust, _ = best_of(lambda m=method, q=quality: _core.fit_r2star(
                flat, TES, None, m, None, 100, q), repeats + 2)
            maps = " +R²+CRLB maps" if quality else ""
            rows.append(row(f"fit_r2star {method}{maps} (vs numpy f32 {method})", shape,
                             rust, base, n))

    # The 4-D array as nibabel returns it: (X, Y, Z, E), Fortran order (echo-major in
    # memory, so no copy), and the same values C-ordered (voxel-major: transposed chunk by
    # chunk in cache by the kernels, no copy).
    vol4_f = flat.T.reshape(*vol, len(TES), order="F")
    assert vol4_f.flags.f_contiguous
    rust, _ = best_of(lambda: relax.fit_r2star_loglinear(vol4_f, TES), repeats + 2)
    rows.append(row("relax.fit_r2star_loglinear (X,Y,Z,E) Fortran/nibabel (vs numpy f32 OLS)",
                     shape, rust, numpy_ols, n))
    vol4_c = np.ascontiguousarray(vol4_f)
    rust, _ = best_of(lambda a=vol4_c: relax.fit_r2star_loglinear(a, TES), repeats + 2)
    rows.append(row("relax.fit_r2star_loglinear (X,Y,Z,E) C order, voxel-major (vs numpy f32 OLS)",
                     shape, rust, numpy_ols, n))
    del vol4_c
    # Memory-bandwidth bound: one pass reading every echo (24 B/voxel for 6 f32 echoes),
    # and a copy (read + write), single-threaded NumPy.
    read_s, _ = best_of(lambda: np.add.reduce(flat, axis=None), repeats + 2)
    rows.append(row("bound: numpy read pass over all echoes (sum, 1 thread)", shape, read_s,
                     read_s, n))
    dst = np.empty_like(flat)
    copy_s, _ = best_of(lambda d=dst: np.copyto(d, flat), repeats + 2)
    rows.append(row("bound: numpy copy of all echoes (1 thread)", shape, copy_s, copy_s, n))
    del dst

    n_nl = 50_000 if quick else 1_000_000
    sub = np.ascontiguousarray(flat[:, :n_nl])
    n_ref = 200
    for sigma in (None, 5.0):
        rust, _ = best_of(lambda s=sigma: _core.fit_r2star(sub, TES, None, "nlls", s), 2)
        ref, _ = best_of(lambda s=sigma: twins.r2star_nlls_reference(sub[:, :n_ref], TES, s),
                          1)
        label = "fit_r2star nlls" + (" rician" if sigma else "")
        rows.append(row(label + " (vs scipy least_squares, scaled)", f"{n_nl}x{len(TES)}e",
                         rust, ref * n_nl / n_ref, n_nl))

    n_epg = 2_000 if quick else 20_000
    t2 = rng.uniform(0.04, 0.12, n_epg)
    b1 = rng.uniform(0.7, 1.0, n_epg)
    rust, clean = best_of(lambda: _core.cpmg_echo_trains(t2, b1, N_MESE, ESP, 180.0, 1.0), 3)
    n_ref = 50
    ref, _ = best_of(lambda: [twins_epg.cpmg_bloch_reference(
        t2[i], b1[i], n_echoes=N_MESE, echo_spacing=ESP, refocusing_angle=180.0)
        for i in range(n_ref)], 1)
    rows.append(row("cpmg_echo_trains EPG (vs Bloch isochromats, scaled)",
                     f"{n_epg}x{N_MESE}e", rust, ref * n_epg / n_ref, n_epg))
    mag = np.abs(1000 * clean + rng.standard_normal(clean.shape).astype(np.float32) * 10)
    mag = np.ascontiguousarray(mag, dtype=np.float32)
    rust, _ = best_of(lambda: _core.fit_t2_epg(mag, ESP, 180.0), 2)

    def scipy_epg(k=5):
        from scipy.optimize import least_squares

        for i in range(k):
            def resid(p, y=mag[:, i]):
                return p[0] * twins_epg.cpmg_bloch_reference(
                    p[1], p[2], n_echoes=N_MESE, echo_spacing=ESP, refocusing_angle=180) - y
            least_squares(resid, [mag[0, i] * 1.1, 0.08, 0.9],
                          bounds=([0, 0.005, 0.3], [np.inf, 2.0, 1.0]))
    ref, _ = best_of(scipy_epg, 1)
    rows.append(row("fit_t2_epg T2+B1+S0 (vs scipy over Bloch twin, scaled)",
                     f"{n_epg}x{N_MESE}e", rust, ref * n_epg / 5, n_epg))
    mono = relax.fit_t2_monoexponential
    tes = ESP * np.arange(1, N_MESE + 1)
    rust, _ = best_of(lambda: mono(mag, tes, drop_first=True, method="nlls"), 2)
    rows.append(row("fit_t2_monoexponential nlls (vs same scaled scipy)", f"{n_epg}x{N_MESE}e",
                     rust, ref * n_epg / 5, n_epg))
    return rows


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(row)
