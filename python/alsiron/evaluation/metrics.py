"""Accuracy metrics of DESIGN.md §5, shared by tests, benchmarks and evaluation."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _demeaned(a: np.ndarray, mask: np.ndarray) -> np.ndarray:
    v = np.asarray(a, dtype=np.float64)[mask]
    return v - v.mean()


def nrmse(estimate: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """Normalised RMS error [%] inside ``mask`` after removing each map's mean there.

    QSM is defined up to a constant, so both maps are demeaned over the mask:
    ``100 * ||x - x_true|| / ||x_true||``.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise ValueError("evaluation mask is empty")
    e, t = _demeaned(estimate, mask), _demeaned(truth, mask)
    return float(100.0 * np.linalg.norm(e - t) / np.linalg.norm(t))


def hfen(estimate: np.ndarray, truth: np.ndarray, mask: np.ndarray, sigma: float = 1.5) -> float:
    """High-frequency error norm [%]: NRMSE of Laplacian-of-Gaussian filtered maps.

    Maps are demeaned and zeroed outside ``mask`` before filtering (sigma in voxels).
    """
    mask = np.asarray(mask, dtype=bool)
    e = np.zeros(mask.shape)
    t = np.zeros(mask.shape)
    e[mask] = _demeaned(estimate, mask)
    t[mask] = _demeaned(truth, mask)
    le = ndimage.gaussian_laplace(e, sigma)[mask]
    lt = ndimage.gaussian_laplace(t, sigma)[mask]
    return float(100.0 * np.linalg.norm(le - lt) / np.linalg.norm(lt))


def xsim(estimate: np.ndarray, truth: np.ndarray, mask: np.ndarray, *,
         k1: float = 0.01, k2: float = 0.001, dynamic_range: float = 1.0,
         window: int = 5) -> float:
    """Structural similarity for susceptibility maps (QSM-CI's XSIM), averaged in ``mask``.

    SSIM with constants C1 = (k1 L)^2, C2 = (k2 L)^2 (L = 1 ppm) and a uniform
    ``window``^3 neighbourhood; maps are zeroed outside the mask (not demeaned: XSIM
    compares maps on their own scale).
    """
    mask = np.asarray(mask, dtype=bool)
    x = np.where(mask, estimate, 0.0).astype(np.float64)
    y = np.where(mask, truth, 0.0).astype(np.float64)
    c1, c2 = (k1 * dynamic_range) ** 2, (k2 * dynamic_range) ** 2
    f = lambda a: ndimage.uniform_filter(a, size=window, mode="constant")  # noqa: E731
    mx, my = f(x), f(y)
    vx = f(x * x) - mx * mx
    vy = f(y * y) - my * my
    cxy = f(x * y) - mx * my
    ssim = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(ssim[mask].mean())


def region_linearity(estimate: np.ndarray, truth: np.ndarray,
                     labels: np.ndarray, label_ids: list[int]) -> tuple[float, float]:
    """Slope and R² of region means of ``estimate`` against region means of ``truth``."""
    xs, ys = [], []
    for lab in label_ids:
        sel = labels == lab
        if sel.any():
            xs.append(float(np.mean(truth[sel])))
            ys.append(float(np.mean(estimate[sel])))
    if len(xs) < 2:
        raise ValueError("need at least two non-empty regions for a linearity fit")
    x, y = np.asarray(xs), np.asarray(ys)
    slope, intercept = np.polyfit(x, y, 1)
    pred = slope * x + intercept
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    return float(slope), r2
