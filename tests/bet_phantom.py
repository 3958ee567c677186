"""Magnitude-only head phantoms for the brain-mask tests (harder than the default head).

Built from the project's head phantom geometry (:func:`alsiron.sim.geometry.head_labels`)
and tissue table, at echo 1 of the default MEGRE (TE 4 ms), with options that make
intensity thresholds fail where real heads make them fail: a smooth receive-coil gain,
bright (fat-like) scalp, a thinned skull where scalp nearly touches the brain, and an
oblique head position.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from alsiron.sim.geometry import (
    HEAD_SEMI_AXES_MM,
    INTRACRANIAL_DEPTH_MM,
    SKULL_BASE_Z_MM,
    ellipsoid_depth,
    head_labels,
)
from alsiron.sim.tissues import LABELS, TISSUES

TE1_S = 0.004


@dataclass
class HeadMagnitude:
    magnitude: np.ndarray   # echo-1 magnitude, float32
    intracranial: np.ndarray  # truth: inside the inner skull surface (voxel fraction >= 0.5)
    scalp: np.ndarray       # voxels that are mostly scalp/face soft tissue
    voxel_size: tuple[float, float, float]


def _rotation(degrees: tuple[float, float, float]) -> np.ndarray:
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def head_magnitude(matrix: tuple[int, int, int], voxel_size: tuple[float, float, float], *,
                   supersampling: int = 2, snr: float = 50.0, bias_gain: float = 1.0,
                   scalp_m0: float | None = None, thin_skull_mm: float | None = None,
                   foramen_radius_mm: float | None = None,
                   rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0),
                   seed: int = 0) -> HeadMagnitude:
    """Echo-1 magnitude of the head phantom (true size, head must fit the field of view).

    bias_gain: ratio of the receive gain across the head (1 = none), a smooth log-linear
    ramp plus a mild bump; scalp_m0: proton density of scalp/face (table 0.75, fat ~1.2);
    thin_skull_mm: over the right hemisphere (x > 15 mm, above the skull base) the bone
    is cut to this thickness and the rest becomes scalp; foramen_radius_mm: a foramen
    magnum and spinal canal (CSF around a 5 mm cord) of this radius running from the
    skull base down through the neck soft tissue, so that bright signal connects brain
    and neck as in real heads (the truth stays the intracranial volume above the skull
    base); rotation_deg: head rotation
    about the x, y, z axes (oblique position on the grid).
    """
    ss = supersampling
    fine_shape = tuple(n * ss for n in matrix)
    fine_vox = tuple(v / ss for v in voxel_size)
    axes = [(np.arange(n) + 0.5) * h - n * h / 2.0
            for n, h in zip(fine_shape, fine_vox, strict=True)]
    labels, ic = head_labels(*axes)
    if thin_skull_mm is not None:
        X = axes[0][:, None, None].astype(np.float32)
        Y = axes[1][None, :, None].astype(np.float32)
        Z = axes[2][None, None, :].astype(np.float32)
        d_head = ellipsoid_depth(X, Y, Z, HEAD_SEMI_AXES_MM)
        d_ic = np.minimum(d_head - INTRACRANIAL_DEPTH_MM, Z - SKULL_BASE_Z_MM)
        thin = ((labels == LABELS["bone"]) & (d_ic < -thin_skull_mm) & (X > 15.0)
                & (Z > SKULL_BASE_Z_MM + 10.0))
        labels[thin] = LABELS["scalp"]
    if foramen_radius_mm is not None:
        X = axes[0][:, None, None].astype(np.float32)
        Y = axes[1][None, :, None].astype(np.float32)
        Z = axes[2][None, None, :].astype(np.float32)
        r2 = X**2 + (Y + 15.0) ** 2
        canal = (r2 <= foramen_radius_mm**2) & (Z < SKULL_BASE_Z_MM + 2.0) & (labels > 0)
        labels[canal & ~ic] = LABELS["csf"]
        labels[canal & (r2 <= 5.0**2)] = LABELS["white_matter"]
    if any(rotation_deg):
        rot = _rotation(rotation_deg)
        # Pull back: output fine voxel -> mm -> rotate by R^T -> input fine voxel.
        scale = np.diag(fine_vox)
        matrix_in = np.linalg.inv(scale) @ rot.T @ scale
        centre = (np.array(fine_shape) - 1) / 2.0
        offset = centre - matrix_in @ centre
        labels = ndimage.affine_transform(labels, matrix_in, offset, order=0,
                                          cval=LABELS["air"])
        ic = ndimage.affine_transform(ic.astype(np.uint8), matrix_in, offset, order=0) > 0
    m0 = TISSUES.m0.astype(np.float32).copy()
    if scalp_m0 is not None:
        m0[LABELS["scalp"]] = scalp_m0
    signal = m0[labels] * np.exp(-TE1_S * TISSUES.r2star_per_s.astype(np.float32)[labels])

    def block(x: np.ndarray) -> np.ndarray:
        return x.reshape(matrix[0], ss, matrix[1], ss, matrix[2], ss).mean(axis=(1, 3, 5))

    mag = block(signal)
    truth = block(ic.astype(np.float32)) >= 0.5
    scalp = block((labels == LABELS["scalp"]).astype(np.float32)) >= 0.5
    if bias_gain != 1.0:
        c = [(np.arange(n) + 0.5) * h - n * h / 2.0
             for n, h in zip(matrix, voxel_size, strict=True)]
        u = (0.6 * c[0][:, None, None] / 72.0 + 0.8 * c[1][None, :, None] / 90.0
             + 0.0 * c[2][None, None, :])
        bump = np.exp(-(c[2][None, None, :] - 40.0) ** 2 / (2 * 60.0**2))
        gain = np.exp(np.log(bias_gain) * (0.5 * np.clip(u, -1, 1) + 0.5)) * (0.9 + 0.1 * bump)
        mag = mag * gain
    rng = np.random.default_rng(seed)
    wm = block((labels == LABELS["white_matter"]).astype(np.float32)) >= 0.5
    sigma = float(mag[wm].mean()) / snr
    noisy = np.abs(mag + sigma * (rng.standard_normal(mag.shape)
                                  + 1j * rng.standard_normal(mag.shape)))
    return HeadMagnitude(noisy.astype(np.float32), truth, scalp & ~truth,
                         tuple(float(v) for v in voxel_size))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * float((a & b).sum()) / max(1.0, float(a.sum() + b.sum()))


def scalp_fraction(mask: np.ndarray, scalp: np.ndarray) -> float:
    """Fraction of the scalp/face voxels that the mask includes."""
    return float((mask & scalp).sum()) / max(1.0, float(scalp.sum()))
