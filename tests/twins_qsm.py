"""Plain NumPy twins of the QSM kernels (slow, float64, obviously correct).

Each function mirrors one Rust kernel in ``rust/alsiron-core`` step by step with
``numpy.fft`` so the tests can compare them to float32 tolerance. Also a small
susceptibility phantom simulated at twice the resolution (no inverse crime).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def fast_len(n: int) -> int:
    """Smallest m >= n with only 2, 3, 5 as prime factors."""
    m = max(int(n), 1)
    while True:
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def fft3_forward(x: np.ndarray) -> np.ndarray:
    return np.fft.rfftn(np.asarray(x, dtype=np.float64))


def fft3_inverse(spectrum: np.ndarray, nz: int) -> np.ndarray:
    return np.fft.irfftn(spectrum, s=(spectrum.shape[0], spectrum.shape[1], nz), axes=(0, 1, 2))


def half_spectrum_frequencies(shape, voxel_size):
    """k [cycles/mm] on the rfftn layout, as broadcastable (nx,1,1), (1,ny,1), (1,1,nh)."""
    nx, ny, nz = shape
    kx = np.fft.fftfreq(nx, d=voxel_size[0])[:, None, None]
    ky = np.fft.fftfreq(ny, d=voxel_size[1])[None, :, None]
    kz = np.fft.rfftfreq(nz, d=voxel_size[2])[None, None, :]
    return kx, ky, kz


def dipole_kernel(shape, voxel_size, b0_dir) -> np.ndarray:
    b = np.asarray(b0_dir, dtype=np.float64)
    b = b / np.linalg.norm(b)
    kx, ky, kz = half_spectrum_frequencies(shape, voxel_size)
    k2 = kx**2 + ky**2 + kz**2
    kb = kx * b[0] + ky * b[1] + kz * b[2]
    with np.errstate(invalid="ignore", divide="ignore"):
        d = 1.0 / 3.0 - kb**2 / k2
    d[0, 0, 0] = 0.0
    return d


def forward_field(chi, voxel_size, b0_dir) -> np.ndarray:
    d = dipole_kernel(chi.shape, voxel_size, b0_dir)
    return fft3_inverse(d * fft3_forward(chi), chi.shape[2])


def tkd(field, mask, voxel_size, b0_dir, threshold) -> np.ndarray:
    d = dipole_kernel(field.shape, voxel_size, b0_dir)
    inv = np.where(np.abs(d) > threshold, 1.0 / np.where(d == 0, 1.0, d), np.sign(d) / threshold)
    inside = mask != 0
    chi = fft3_inverse(inv * fft3_forward(np.where(inside, field, 0.0)), field.shape[2])
    return np.where(inside, chi, 0.0)


def _grad(x, voxel_size):
    return [(np.roll(x, -1, axis=a) - x) / voxel_size[a] for a in range(3)]


def _grad_adjoint(g, voxel_size):
    return sum((np.roll(g[a], 1, axis=a) - g[a]) / voxel_size[a] for a in range(3))


def tv_admm(field, mask, voxel_size, b0_dir, alpha, mu, n_iter) -> np.ndarray:
    """Linear TV-ADMM: fixed number of iterations, no early stop."""
    shape = field.shape
    inside = mask != 0
    d = dipole_kernel(shape, voxel_size, b0_dir)
    kx, ky, kz = (
        np.fft.fftfreq(shape[0])[:, None, None],
        np.fft.fftfreq(shape[1])[None, :, None],
        np.fft.rfftfreq(shape[2])[None, None, :],
    )
    e2 = sum(
        np.abs((np.exp(2j * np.pi * k) - 1.0) / h) ** 2
        for k, h in zip((kx, ky, kz), voxel_size, strict=True)
    )
    den = d**2 + mu * e2
    inv_den = np.where(den > 0, 1.0 / np.where(den > 0, den, 1.0), 0.0)
    data_term = d * fft3_forward(np.where(inside, field, 0.0))
    z = [np.zeros(shape) for _ in range(3)]
    u = [np.zeros(shape) for _ in range(3)]
    chi = np.zeros(shape)
    for _ in range(n_iter):
        rhs = mu * _grad_adjoint([z[a] - u[a] for a in range(3)], voxel_size)
        chi = fft3_inverse((data_term + fft3_forward(rhs)) * inv_den, shape[2])
        g = _grad(chi, voxel_size)
        for a in range(3):
            v = g[a] + u[a]
            z[a] = np.sign(v) * np.maximum(np.abs(v) - alpha / mu, 0.0)
            u[a] = v - z[a]
    return np.where(inside, chi, 0.0)


def tv_objective(chi, field, mask, voxel_size, b0_dir, alpha) -> float:
    resid = forward_field(chi, voxel_size, b0_dir) - np.where(mask != 0, field, 0.0)
    tv = sum(np.abs(g).sum() for g in _grad(chi, voxel_size))
    return 0.5 * float((resid**2).sum()) + alpha * float(tv)


def sphere_indicator(shape, voxel_size, radius_mm) -> np.ndarray:
    """Unnormalised sphere centred at voxel 0 of a periodic grid."""
    offsets = []
    for a in range(3):
        reach = int(np.floor(radius_mm / voxel_size[a]))
        offsets.append(np.arange(-reach, reach + 1))
    dx, dy, dz = np.meshgrid(*offsets, indexing="ij")
    d2 = (dx * voxel_size[0]) ** 2 + (dy * voxel_size[1]) ** 2 + (dz * voxel_size[2]) ** 2
    inside = d2 <= radius_mm**2 * (1 + 1e-9)
    sphere = np.zeros(shape)
    sphere[dx[inside] % shape[0], dy[inside] % shape[1], dz[inside] % shape[2]] = 1.0
    return sphere


def vsharp(field, mask, voxel_size, radii_mm, threshold):
    shape = field.shape
    padded = tuple(fast_len(n) for n in shape)
    inside = mask != 0
    f = np.zeros(padded)
    m = np.zeros(padded)
    f[: shape[0], : shape[1], : shape[2]] = np.where(inside, field, 0.0)
    m[: shape[0], : shape[1], : shape[2]] = inside
    f_hat, m_hat = np.fft.rfftn(f), np.fft.rfftn(m)
    local = np.zeros(padded)
    assigned = np.zeros(padded, dtype=bool)
    kernel_largest = None
    eroded = None
    for r in sorted(set(radii_mm), reverse=True):
        sphere = sphere_indicator(padded, voxel_size, r)
        count = sphere.sum()
        s_hat = np.fft.rfftn(sphere).real
        eroded = np.fft.irfftn(m_hat * s_hat, s=padded, axes=(0, 1, 2)) > count - 0.5
        high_pass = np.fft.irfftn(f_hat * (1.0 - s_hat / count), s=padded, axes=(0, 1, 2))
        take = eroded & ~assigned
        local[take] = high_pass[take]
        assigned |= take
        if kernel_largest is None:
            kernel_largest = 1.0 - s_hat / count
    keep = np.abs(kernel_largest) >= threshold
    safe = np.where(keep, kernel_largest, 1.0)
    deconv = np.fft.irfftn(
        np.where(keep, np.fft.rfftn(local) / safe, 0.0), s=padded, axes=(0, 1, 2)
    )
    deconv = np.where(eroded, deconv, 0.0)
    sl = (slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2]))
    return deconv[sl], eroded[sl].astype(np.uint8)


def nrmse(estimate, truth, mask) -> float:
    """DESIGN §5 NRMSE [%]: demeaned over the mask."""
    inside = mask != 0
    e = estimate[inside] - estimate[inside].mean()
    t = truth[inside] - truth[inside].mean()
    return float(100.0 * np.linalg.norm(e - t) / np.linalg.norm(t))


@dataclass
class QsmPhantom:
    chi: np.ndarray  # ppm, brain-internal χ at the working resolution (0 outside brain)
    total_field: np.ndarray  # ppm, field of brain + background sources
    local_field: np.ndarray  # ppm, field of the brain sources alone
    mask: np.ndarray  # bool, brain
    voxel_size: tuple[float, float, float]
    b0_dir: tuple[float, float, float]


def _ellipsoid(grid, centre, semi_axes):
    return sum(((g - c) / s) ** 2 for g, c, s in zip(grid, centre, semi_axes, strict=True)) <= 1.0


def simulate_phantom(
    n: int = 64,
    voxel_size=(1.5, 1.5, 2.0),
    b0_dir=(0.1, -0.2, 1.0),
    noise_ppm: float = 0.0,
    seed: int = 0,
) -> QsmPhantom:
    """Ellipsoid 'brain' with deep-grey-like blobs, a vein, a skull shell and an air
    cavity, simulated at 2x resolution and averaged down by 2 along each axis."""
    rng = np.random.default_rng(seed)
    hi = 2 * n
    vs_hi = tuple(v / 2 for v in voxel_size)
    # Coordinates in mm of the high-resolution voxel centres, origin at the volume centre.
    axes = [(np.arange(hi) - (hi - 1) / 2) * vs_hi[a] for a in range(3)]
    grid = np.meshgrid(*axes, indexing="ij", sparse=True)
    extent = [n * voxel_size[a] for a in range(3)]
    brain_axes = [0.33 * e for e in extent]
    brain = _ellipsoid(grid, (0, 0, 0), brain_axes)
    chi_brain = np.where(brain, -0.02, 0.0)
    blobs = [
        ((-0.10, 0.05, 0.0), (0.06, 0.04, 0.05), 0.18),  # pallidum-like
        ((0.10, 0.05, 0.0), (0.07, 0.05, 0.06), 0.08),  # putamen-like
        ((0.0, -0.12, 0.05), (0.05, 0.05, 0.04), 0.12),  # nigra-like
        ((0.0, 0.15, -0.10), (0.04, 0.06, 0.05), -0.05),
    ]
    for (cx, cy, cz), (sx, sy, sz), value in blobs:
        centre = (cx * extent[0], cy * extent[1], cz * extent[2])
        semi = (sx * extent[0], sy * extent[1], sz * extent[2])
        chi_brain = np.where(_ellipsoid(grid, centre, semi) & brain, value, chi_brain)
    # A thin vein along y.
    vein = ((grid[0] - 0.12 * extent[0]) ** 2 + (grid[2] - 0.1 * extent[2]) ** 2 <= 1.2**2) & brain
    chi_brain = np.where(vein, 0.4, chi_brain)
    # Background: skull shell (bone, χ ≈ -2 ppm vs tissue) and an air cavity (+9.4 ppm).
    skull_outer = _ellipsoid(
        grid, (0, 0, 0), [a + 0.08 * e for a, e in zip(brain_axes, extent, strict=True)]
    )
    skull = skull_outer & ~_ellipsoid(
        grid, (0, 0, 0), [a + 0.03 * e for a, e in zip(brain_axes, extent, strict=True)]
    )
    air = _ellipsoid(
        grid,
        (0, 0.36 * extent[1], -0.2 * extent[2]),
        (0.08 * extent[0], 0.05 * extent[1], 0.06 * extent[2]),
    )
    chi_bg = np.where(skull, -2.0, 0.0) + np.where(air & ~brain, 9.4, 0.0)

    def down(x):
        return x.reshape(n, 2, n, 2, n, 2).mean(axis=(1, 3, 5))

    local_hi = forward_field(chi_brain, vs_hi, b0_dir)
    bg_hi = forward_field(chi_bg, vs_hi, b0_dir)
    mask = down(brain.astype(np.float64)) > 0.99
    local = down(local_hi)
    total = local + down(bg_hi)
    if noise_ppm > 0:
        noise = rng.normal(0.0, noise_ppm, total.shape)
        total = total + noise
        local = local + noise
    return QsmPhantom(
        chi=np.where(mask, down(chi_brain), 0.0),
        total_field=total,
        local_field=local,
        mask=mask,
        voxel_size=tuple(voxel_size),
        b0_dir=tuple(b0_dir),
    )


# --------------------------------------------------------------------------- PDF, iSMV


def conjugate_gradients(apply, x, r, tol, max_iter, *, rhs_norm=0.0):
    """Textbook CG on ``apply`` (symmetric positive definite) from ``x`` with residual
    ``r`` (both updated in place): stop after ``max_iter`` iterations or when ‖r‖ falls
    below ``tol`` × max(``rhs_norm``, ‖r₀‖). Returns (x, iterations run)."""
    p = r.copy()
    rs = float(np.vdot(r, r))
    stop = tol * max(rhs_norm, np.sqrt(rs))
    it = 0
    while it < max_iter and np.sqrt(rs) > stop and rs > 0:
        ap = apply(p)
        alpha = rs / float(np.vdot(p, ap))
        x += alpha * p
        r -= alpha * ap
        rs_new = float(np.vdot(r, r))
        p = r + (rs_new / rs) * p
        rs = rs_new
        it += 1
    return x, it


def _pad_corner(x, padded):
    out = np.zeros(padded)
    out[: x.shape[0], : x.shape[1], : x.shape[2]] = x
    return out


def dipole_kernel_image_space(shape, voxel_size, b0_dir) -> np.ndarray:
    """Half spectrum of the point-dipole field sampled on the periodic grid (twin of
    bfr_iterative::dipole_kernel_image_space): V/(4π)·(3cos²θ − 1)/r³, 0 at r = 0."""
    b = np.asarray(b0_dir, dtype=np.float64)
    b = b / np.linalg.norm(b)
    offs = [np.fft.fftfreq(n, d=1.0 / n) * h for n, h in zip(shape, voxel_size, strict=True)]
    x, y, z = np.meshgrid(*offs, indexing="ij")
    r2 = x * x + y * y + z * z
    rb = x * b[0] + y * b[1] + z * b[2]
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.prod(voxel_size) / (4 * np.pi) * (3 * rb * rb / r2 - 1.0) / r2**1.5
    d[0, 0, 0] = 0.0
    return np.fft.rfftn(d).real


def source_gradient_penalty(x, sources, voxel_size):
    """∇ᵀ(M_pair ∇x) with forward differences between neighbouring ``sources`` voxels,
    periodic, each axis divided by its spacing squared [1/mm²]."""
    out = np.zeros_like(x)
    for axis in range(3):
        pair = np.roll(sources, -1, axis) & sources
        d = np.where(pair, np.roll(x, -1, axis) - x, 0.0) / voxel_size[axis] ** 2
        out += np.roll(d, 1, axis) - d
    return out


def pdf(field, mask, voxel_size, b0_dir, *, weight=None, pad_voxels=(0, 0, 0),
        tol=1e-2, max_iter=100, kernel="image", source_smoothing=0.0, source_mask=None):
    """Projection onto dipole fields by CG on the normal equations (twin of
    bfr::pdf_with_sources).

    The volume is zero-padded at the far end of each axis to fast_len(n + pad); the
    background sources χ_b live outside the mask in the padded grid, within
    ``source_mask`` (or the padding) when given. Solves
    (P Dᵀ W² M D P + λ P ∇ᵀ∇ P) x = P Dᵀ W² M f with P the source voxels and λ =
    ``source_smoothing``, returns (M·(f − D P x) cropped, iterations run).
    """
    shape = field.shape
    padded = tuple(fast_len(n + p) for n, p in zip(shape, pad_voxels, strict=True))
    inside = _pad_corner(mask != 0, padded) > 0.5
    outside = ~inside
    if source_mask is not None:
        outside &= ~(_pad_corner(~np.asarray(source_mask, bool), padded) > 0.5)
    w = np.ones(shape) if weight is None else np.asarray(weight, np.float64)
    w2 = _pad_corner(np.where(mask != 0, w * w, 0.0), padded)
    f = _pad_corner(np.where(mask != 0, field, 0.0), padded)
    d = (dipole_kernel_image_space if kernel == "image" else dipole_kernel)(
        padded, voxel_size, b0_dir)

    def conv(x):
        return np.fft.irfftn(d * np.fft.rfftn(x), s=padded, axes=(0, 1, 2))

    def normal(x):
        xs = np.where(outside, x, 0.0)
        out = conv(w2 * conv(xs))
        if source_smoothing:
            out = out + source_smoothing * source_gradient_penalty(xs, outside, voxel_size)
        return np.where(outside, out, 0.0)

    b = np.where(outside, conv(w2 * f), 0.0)
    x, it = conjugate_gradients(normal, np.zeros(padded), b.copy(), tol, max_iter)
    local = np.where(inside, f - conv(np.where(outside, x, 0.0)), 0.0)
    return local[: shape[0], : shape[1], : shape[2]], it


def ismv(field, mask, voxel_size, radius_mm, *, tol=1e-3, max_iter=500):
    """Iterative SMV (Wen et al. 2014), twin of bfr::ismv.

    Background f_b starts as the total field; iterate f_b ← E·(S∗f_b) + (M − E)·f with E the
    mask eroded by the sphere, until ‖Δf_b‖ ≤ tol·‖E·f‖. Returns (E·(f − f_b), E, iterations).
    """
    shape = field.shape
    padded = tuple(fast_len(n) for n in shape)
    inside = _pad_corner(mask != 0, padded) > 0.5
    f = _pad_corner(np.where(mask != 0, field, 0.0), padded)
    sphere = sphere_indicator(padded, voxel_size, radius_mm)
    count = sphere.sum()
    s_hat = np.fft.rfftn(sphere).real
    eroded = np.fft.irfftn(np.fft.rfftn(inside.astype(float)) * s_hat, s=padded,
                           axes=(0, 1, 2)) > count - 0.5
    boundary = np.where(inside & ~eroded, f, 0.0)
    fb = f.copy()
    stop = tol * np.linalg.norm(np.where(eroded, f, 0.0))
    it = 0
    change = np.inf
    while it < max_iter and change > stop:
        smooth = np.fft.irfftn(np.fft.rfftn(fb) * (s_hat / count), s=padded, axes=(0, 1, 2))
        new = np.where(eroded, smooth, 0.0) + boundary
        change = np.linalg.norm(new - fb)
        fb = new
        it += 1
    local = np.where(eroded, f - fb, 0.0)
    sl = (slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2]))
    return local[sl], eroded[sl].astype(np.uint8), it


def lbv(field, mask, voxel_size, *, tol=1e-4, max_iter=2000):
    """Laplacian boundary value, twin of bfr_iterative::lbv (CG on the 7-point Laplacian)."""
    inside = np.asarray(mask) != 0
    f = np.asarray(field, np.float64)
    interior = inside.copy()
    for a in range(3):
        # Interior along axis a: not on the volume border and both neighbours inside.
        centre, ahead, behind = ([slice(None)] * 3 for _ in range(3))
        centre[a], ahead[a], behind[a] = slice(1, -1), slice(2, None), slice(0, -2)
        both = np.zeros_like(inside)
        both[tuple(centre)] = inside[tuple(ahead)] & inside[tuple(behind)]
        interior &= both
    inv_h2 = [1.0 / h**2 for h in voxel_size]

    def shifted_sum(v, a):
        out = np.zeros_like(v)
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[a], hi[a] = slice(0, -1), slice(1, None)
        out[tuple(lo)] += v[tuple(hi)]
        out[tuple(hi)] += v[tuple(lo)]
        return out

    def apply(p):
        out = 2.0 * sum(inv_h2) * p
        for a in range(3):
            out -= inv_h2[a] * shifted_sum(p, a)
        return np.where(interior, out, 0.0)

    boundary = np.where(inside & ~interior, f, 0.0)
    rhs = np.where(interior, sum(inv_h2[a] * shifted_sum(boundary, a) for a in range(3)), 0.0)
    x = np.where(interior, f, 0.0)
    x, it = conjugate_gradients(apply, x, rhs - apply(x), tol, max_iter,
                                rhs_norm=float(np.linalg.norm(rhs)))
    return np.where(interior, f - x, 0.0), interior.astype(np.uint8), it


# --------------------------------------------------------------------------- inversions


class FftBackend:
    """The FFTs a twin uses: NumPy in float64 (the default, obviously correct) or SciPy's
    multi-threaded float32 real FFT (the benchmark's "SciPy implementation of the same
    iterations")."""

    def __init__(self, kind: str = "numpy"):
        self.kind = kind
        self.dtype = np.float64 if kind == "numpy" else np.float32
        if kind == "scipy":
            import scipy.fft as sfft

            self._f = lambda x: sfft.rfftn(x, workers=-1)
            self._i = lambda s, shape: sfft.irfftn(s, s=shape, axes=(0, 1, 2), workers=-1)
        else:
            self._f = np.fft.rfftn
            self._i = lambda s, shape: np.fft.irfftn(s, s=shape, axes=(0, 1, 2))

    def f(self, x):
        return self._f(np.asarray(x, dtype=self.dtype))

    def i(self, spectrum, shape):
        return self._i(spectrum, shape)

    def real(self, x):
        return np.asarray(x, dtype=self.dtype)


NUMPY = FftBackend("numpy")


def gradient_energy(shape, voxel_size) -> np.ndarray:
    """Σ|E_a|² on the half spectrum (symbol of ∇ᵀ∇ for forward differences per mm)."""
    ks = (np.fft.fftfreq(shape[0])[:, None, None], np.fft.fftfreq(shape[1])[None, :, None],
          np.fft.rfftfreq(shape[2])[None, None, :])
    return sum(np.abs((np.exp(2j * np.pi * k) - 1.0) / h) ** 2
               for k, h in zip(ks, voxel_size, strict=True))


def tikhonov(field, mask, voxel_size, b0_dir, lam, fft: FftBackend = NUMPY) -> np.ndarray:
    d = dipole_kernel(field.shape, voxel_size, b0_dir)
    den = d**2 + lam * gradient_energy(field.shape, voxel_size)
    filt = np.where(den > 0, d / np.where(den > 0, den, 1.0), 0.0).astype(fft.dtype)
    inside = mask != 0
    chi = fft.i(filt * fft.f(np.where(inside, field, 0.0)), field.shape)
    return np.where(inside, chi, 0.0)


def edge_weight(magnitude, mask, voxel_size, edge_fraction) -> np.ndarray:
    inside = mask != 0
    mag = np.where(inside, magnitude, 0.0)
    g = np.sqrt(sum(((np.roll(mag, -1, axis=a) - mag) / voxel_size[a]) ** 2 for a in range(3)))
    values = np.sort(g[inside])
    n_edges = int(round(edge_fraction * values.size))
    if n_edges == 0:
        return np.ones(mag.shape)
    threshold = values[values.size - n_edges]
    return np.where(inside & (g >= threshold), 0.0, 1.0)


def _laplacian(x, voxel_size):
    return sum((np.roll(x, 1, axis=a) + np.roll(x, -1, axis=a) - 2 * x) / voxel_size[a] ** 2
               for a in range(3))


def weighted_tv_admm(field, weight, tv_weight, mask, voxel_size, b0_dir, alpha, mu1, mu2,
                     n_iter, phase_scale=None, weak_harmonic=None,
                     fft: FftBackend = NUMPY) -> np.ndarray:
    """Twin of inversion_iterative::weighted_tv_admm, fixed iteration count."""
    shape = field.shape
    inside = mask != 0
    d = dipole_kernel(shape, voxel_size, b0_dir).astype(fft.dtype)
    e = gradient_energy(shape, voxel_size).astype(fft.dtype)
    f = fft.real(np.where(inside, field, 0.0))
    w2 = fft.real(np.where(inside, np.asarray(weight, np.float64) ** 2, 0.0))
    thr = alpha / mu1 * (np.ones(shape) if tv_weight is None else tv_weight)
    u1 = [np.zeros(shape, fft.dtype) for _ in range(3)]
    w1 = [np.zeros(shape, fft.dtype) for _ in range(3)]
    u2, t2 = np.zeros(shape, fft.dtype), f.copy()
    if weak_harmonic is not None:
        beta, mu3 = weak_harmonic
        u3, t3 = np.zeros(shape, fft.dtype), np.zeros(shape, fft.dtype)
    chi = np.zeros(shape, fft.dtype)
    for _ in range(n_iter):
        c = fft.f(mu1 * _grad_adjoint(w1, voxel_size))
        m = fft.f(t2)
        r1 = c + mu2 * d * m
        if weak_harmonic is None:
            den = mu1 * e + mu2 * d * d
            x = np.where(den > 0, r1 / np.where(den > 0, den, 1.0), 0.0)
            y = 0.0
        else:
            r2 = mu2 * m - mu3 * e * fft.f(t3)
            a, b, cc = mu1 * e + mu2 * d * d, mu2 * d, mu2 + mu3 * e * e
            det = a * cc - b * b
            ok = det > 0
            safe = np.where(ok, det, 1.0)
            x = np.where(ok, (r1 * cc - r2 * b) / safe, 0.0)
            y = np.where(ok, (r2 * a - r1 * b) / safe, r2 / cc)
        chi = fft.i(x, shape)
        model = fft.i(x * d + y, shape)
        if weak_harmonic is not None:
            v3 = _laplacian(fft.i(y, shape), voxel_size) + u3
            z3 = mu3 * v3 / (np.where(inside, beta, 0.0) + mu3)
            u3 = v3 - z3
            t3 = z3 - u3
        v = model + u2
        z = (w2 * f + mu2 * v) / (w2 + mu2)
        if phase_scale is not None:
            s = phase_scale
            for _ in range(3):
                r = s * (z - f)
                g = w2 * np.sin(r) / s + mu2 * (z - v)
                h = np.maximum(w2 * np.cos(r) + mu2, mu2)
                z = np.where(w2 > 0, z - g / h, z)
        u2 = v - z
        t2 = z - u2
        g = _grad(chi, voxel_size)
        for a_ in range(3):
            vv = g[a_] + u1[a_]
            u1[a_] = np.clip(vv, -thr, thr)
            w1[a_] = vv - 2 * u1[a_]
    return np.where(inside, chi, 0.0)


def rts(field, mask, voxel_size, b0_dir, delta, mu, rho, n_iter, lsqr_iter=16,
        fft: FftBackend = NUMPY) -> np.ndarray:
    """Twin of inversion_iterative::rts: step 1 ``lsqr_iter`` textbook LSQR iterations on
    M·F⁻¹DF·x = M·f, χ̂₀ = F{x} where |D| > δ (Nyquist planes ill-conditioned), then the
    TV loop."""
    shape = field.shape
    inside = mask != 0
    d = _nyquist_zeroed(dipole_kernel(shape, voxel_size, b0_dir), shape).astype(fft.dtype)
    e = gradient_energy(shape, voxel_size).astype(fft.dtype)
    well = np.abs(d) > delta
    x = lsqr(field, np.ones(shape), mask, voxel_size, b0_dir, lsqr_iter, fft=fft,
             masked=False)
    data = np.where(well, fft.f(x) * mu, 0)
    den = np.where(well, mu, 0.0) + rho * e
    inv_den = np.where(den > 0, 1.0 / np.where(den > 0, den, 1.0), 0.0).astype(fft.dtype)
    u = [np.zeros(shape, fft.dtype) for _ in range(3)]
    w = [np.zeros(shape, fft.dtype) for _ in range(3)]
    chi = np.zeros(shape, fft.dtype)
    for _ in range(n_iter):
        chi = fft.i((data + fft.f(rho * _grad_adjoint(w, voxel_size))) * inv_den, shape)
        g = _grad(chi, voxel_size)
        for a in range(3):
            v = g[a] + u[a]
            u[a] = np.clip(v, -1.0 / rho, 1.0 / rho)
            w[a] = v - 2 * u[a]
    return np.where(inside, chi, 0.0)


def ndi(field, weight, mask, voxel_size, b0_dir, phase_scale, lam, step, n_iter,
        fft: FftBackend = NUMPY) -> np.ndarray:
    """Twin of inversion_iterative::ndi: χ̂ ← χ̂ − τ(D·F{W² sin(s(Dχ − f))/s} + λχ̂)."""
    shape = field.shape
    inside = mask != 0
    d = dipole_kernel(shape, voxel_size, b0_dir).astype(fft.dtype)
    f = fft.real(np.where(inside, field, 0.0))
    w2 = fft.real(np.where(inside, np.asarray(weight, np.float64) ** 2, 0.0))
    s = phase_scale
    chi_hat = fft.f(np.zeros(shape))
    for _ in range(n_iter):
        r = w2 * np.sin(s * (fft.i(d * chi_hat, shape) - f)) / s
        chi_hat = chi_hat - step * (d * fft.f(r) + lam * chi_hat)
    return np.where(inside, fft.i(chi_hat, shape), 0.0)


def _nyquist_zeroed(d: np.ndarray, shape) -> np.ndarray:
    """Half-spectrum kernel with the Nyquist planes of even axes zeroed (as the Rust
    kernels' zero_nyquist_planes; along the last axis that is the last rfft bin)."""
    d = d.copy()
    for axis, n in enumerate(shape):
        if n % 2 == 0:
            index = [slice(None)] * 3
            index[axis] = n // 2
            d[tuple(index)] = 0.0
    return d


def lsqr_loop(a_op, at_op, b, n_iter, dtype=np.float64):
    """Textbook LSQR (Paige & Saunders 1982) for min ‖A x − b‖ from x = 0, fixed
    iteration count; ``a_op``/``at_op`` apply A and Aᵀ to arrays."""
    u = b.astype(dtype)
    beta = np.linalg.norm(u)
    u = u / beta
    v = at_op(u)
    alpha = np.linalg.norm(v)
    v = v / alpha
    wd = v.copy()
    x = np.zeros_like(v)
    phi_bar, rho_bar = beta, alpha
    for _ in range(n_iter):
        u = a_op(v) - alpha * u
        beta = np.linalg.norm(u)
        u = u / beta
        v = at_op(u) - beta * v
        alpha = np.linalg.norm(v)
        v = v / alpha
        rho = np.hypot(rho_bar, beta)
        c, s = rho_bar / rho, beta / rho
        theta = s * alpha
        rho_bar = -c * alpha
        phi = c * phi_bar
        phi_bar = s * phi_bar
        x = x + (phi / rho) * wd
        wd = v - (theta / rho) * wd
    return x


def lsqr(field, weight, mask, voxel_size, b0_dir, n_iter, fft: FftBackend = NUMPY,
         masked: bool = True):
    """Textbook LSQR on W·F⁻¹DF·χ = W·f in image space, fixed iteration count (twin of
    inversion_iterative::ilsqr with tol = 0); ``masked=False`` returns x everywhere."""
    shape = field.shape
    inside = mask != 0
    # Nyquist planes of even axes zeroed, as in the Rust kernel (see zero_nyquist_planes).
    d = _nyquist_zeroed(dipole_kernel(shape, voxel_size, b0_dir), shape).astype(fft.dtype)
    w = fft.real(np.where(inside, weight, 0.0))
    x = lsqr_loop(lambda x: w * fft.i(d * fft.f(x), shape),
                  lambda y: fft.i(d * fft.f(w * y), shape),
                  w * fft.real(np.where(inside, field, 0.0)), n_iter, fft.dtype)
    return np.where(inside, x, 0.0) if masked else x


def _ramp_down(v, lo, hi):
    return np.where(v < lo, 1.0, np.where(v > hi, 0.0, (hi - v) / (hi - lo)))


def ilsqr_fast_estimate(field, mask, voxel_size, b0_dir, fft: FftBackend = NUMPY) -> np.ndarray:
    """Twin of inversion_iterative::ilsqr_fast_estimate (Li et al. 2015, eqs. 8–14)."""
    shape = field.shape
    inside = mask != 0
    d = dipole_kernel(shape, voxel_size, b0_dir)
    powered = np.abs(d) ** 0.001
    lo, hi = np.percentile(powered, [1.0, 30.0])
    w = 1.0 - _ramp_down(powered, lo, hi)
    sphere = sphere_indicator(shape, voxel_size, 3.0)
    h = (fft.f(sphere).real / sphere.sum()).astype(fft.dtype)
    f_hat = fft.f(np.where(inside, field, 0.0))
    x = np.sign(d).astype(fft.dtype) * f_hat
    w = w.astype(fft.dtype)
    x = np.where(inside, fft.i(w * x + (1 - w) * h * x, shape), 0.0)
    x_hat = fft.f(x)
    x = np.where(inside, fft.i(w * x_hat + (1 - w) * h * x_hat, shape), 0.0)
    inv = np.where(np.abs(d) > 0.125, 1.0 / np.where(d == 0, 1.0, d),
                   np.sign(d) / 0.125).astype(fft.dtype)
    tkd_ref = fft.i(inv * f_hat, shape)
    a, b = np.polyfit(x[inside], tkd_ref[inside], 1)
    return np.where(inside, a * x + b, 0.0)


def ilsqr_streaking(field, weight, mask, voxel_size, b0_dir, lsqr_iter, streak_iter,
                    ill_threshold=0.1, fft: FftBackend = NUMPY):
    """Twin of inversion_iterative::ilsqr_streaking with fixed iteration counts: LSQR,
    fast estimate, streaking LSQR on W_G∘∇F⁻¹M_icF·x = W_G∘∇χ_LSQR (the literal
    operator, FFTs both ways), subtraction."""
    shape = field.shape
    inside = mask != 0
    chi_lsqr = lsqr(field, weight, mask, voxel_size, b0_dir, lsqr_iter, fft=fft)
    fast = ilsqr_fast_estimate(field, mask, voxel_size, b0_dir, fft=fft)
    wg = []
    for g in _grad(fast, voxel_size):
        lo, hi = np.percentile(np.abs(g[inside]), [50.0, 70.0])
        wg.append(np.where(inside, _ramp_down(np.abs(g), lo, hi), 0.0))
    d = _nyquist_zeroed(dipole_kernel(shape, voxel_size, b0_dir), shape)
    ill = (np.abs(d) < ill_threshold).astype(fft.dtype)
    wg = [g.astype(fft.dtype) for g in wg]

    def project(x):
        return fft.i(ill * fft.f(x), shape)

    def a_op(x):
        return np.stack([w * g for w, g in zip(wg, _grad(project(x), voxel_size),
                                                strict=True)])

    def at_op(y):
        return project(_grad_adjoint([w * c for w, c in zip(wg, y, strict=True)],
                                     voxel_size))

    b = np.stack([w * g for w, g in zip(wg, _grad(chi_lsqr, voxel_size), strict=True)])
    artefact = lsqr_loop(a_op, at_op, b, streak_iter, fft.dtype)
    return np.where(inside, chi_lsqr - artefact, 0.0)
