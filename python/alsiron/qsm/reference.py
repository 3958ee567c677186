"""Referencing of χ: the constant that the dipole kernel cannot see (k = 0) is fixed
by a reference region; maps are 0 outside the mask (the consensus convention)."""

from __future__ import annotations

import logging

import numpy as np

from alsiron.arrays import as_mask, as_volume

logger = logging.getLogger("alsiron")


def reference_to_mean(chi: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Reference χ to its mean over ``mask`` (the whole-brain default of DESIGN §3).

    Parameters
    ----------
    chi : ndarray, shape (X, Y, Z)
        Susceptibility in ppm.
    mask : ndarray of bool, shape (X, Y, Z)
        Reference region (usually the brain mask).

    Returns
    -------
    ndarray, float32
        ``chi - mean(chi[mask])`` inside the mask, 0 outside (χ maps are 0 outside the
        brain by convention; NaN is reserved for failed voxels).
    """
    x = as_volume(chi, "chi")
    m = as_mask(mask, x.shape).astype(bool)
    ref = float(np.mean(x[m], dtype=np.float64))
    return np.where(m, x - np.float32(ref), np.float32(0.0)).astype(np.float32)
