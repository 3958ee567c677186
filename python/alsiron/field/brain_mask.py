"""Brain extraction with a deformable surface model (after Smith 2002, BET).

A tessellated sphere (subdivided icosahedron) starts inside the head at the intensity
centre of gravity with half the head radius and is moved, vertex by vertex, by three
forces (Smith SM, Fast robust automated brain extraction, Hum Brain Mapp 17:143, 2002):

1. tangential smoothing: half of the tangential part of the vector from a vertex to
   the mean of its neighbours (keeps vertices evenly spaced);
2. normal smoothing: the normal part of that vector times a sigmoid of the local
   curvature, strong where the radius of curvature is below ``R_MIN_MM`` and weak above
   ``R_MAX_MM`` (lets the surface follow gyri-scale shape but not noise);
3. intensity: along the inward normal the local minimum (within ``D_MIN_MM``) and
   maximum (within ``D_MAX_MM``) intensities give a local threshold
   ``tl = t2 + f (Imax - t2)``; the vertex moves outwards when the minimum is above it
   and inwards otherwise. Dark skull between brain and scalp is what stops the surface,
   so bright scalp and a smooth receive-coil bias (the threshold is local) do not.

Everything is in mm (voxel sizes may differ per axis); the affine's rotation does not
matter because the surface lives in the voxel-index frame scaled by the voxel size.
The final surface is rasterised by marking every voxel it passes through, keeping those
whose centre is on the inner side, and filling the enclosed voxels.

This is an own implementation from the paper's description; it is not FSL's code.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

from alsiron import _core
from alsiron.arrays import as_volume, as_voxel_size
from alsiron.errors import InvalidInputError

log = logging.getLogger("alsiron")

__all__ = [
    "BET_FRACTIONAL_INTENSITY",
    "BetResult",
    "bet",
    "icosphere",
]

#: Default fractional intensity threshold f (Smith 2002: 0.5; smaller = larger brain).
BET_FRACTIONAL_INTENSITY = 0.5
#: Radii of curvature (mm) bounding the normal-smoothing sigmoid (Smith 2002).
R_MIN_MM = 3.33
R_MAX_MM = 10.0
#: Search depths (mm) along the inward normal for the local minimum and maximum.
D_MIN_MM = 20.0
D_MAX_MM = D_MIN_MM / 2.0
#: Weight of the intensity force per unit of mean edge length (Smith 2002: 0.05).
INTENSITY_STEP = 0.05
#: Weight of the tangential smoothing force.
TANGENTIAL_STEP = 0.5
#: Iterations of the surface evolution (Smith 2002: 1000).
BET_ITERATIONS = 1000
#: Otsu class-mean ratio above which the image has no background class (as in
#: :func:`magnitude_threshold`).
NO_BACKGROUND_CONTRAST = 0.5
#: Early stop: mean vertex displacement (mm) over 100 iterations below which the surface
#: has settled (checked from iteration 300 on; measured: the Dice is flat from ~375
#: iterations while the surface still jitters 0.15-0.5 mm per 100 iterations).
BET_SETTLE_MM = 0.5
#: Icosahedron subdivisions: 4 gives 2562 vertices, 5120 triangles.
BET_SUBDIVISIONS = 4


@dataclass
class BetResult:
    """Outcome of :func:`bet`.

    Attributes
    ----------
    mask : ndarray of bool, shape (X, Y, Z)
        Voxels inside the final surface.
    vertices_mm : ndarray, shape (V, 3)
        Final vertex positions in mm of the voxel-index frame (index × voxel size).
    faces : ndarray of int, shape (F, 3)
        Triangles (vertex indices, counter-clockwise seen from outside).
    parameters : dict
        Measured thresholds (t2, t98, t, tm), centre (mm), radius (mm) and the settings,
        for the processing record.
    """

    mask: np.ndarray
    vertices_mm: np.ndarray
    faces: np.ndarray
    parameters: dict[str, Any] = field(default_factory=dict)


def icosphere(subdivisions: int = BET_SUBDIVISIONS) -> tuple[np.ndarray, np.ndarray]:
    """Unit sphere tessellated by repeatedly subdividing an icosahedron.

    Parameters
    ----------
    subdivisions : int
        Number of 1-to-4 triangle splits (0 = icosahedron, 12 vertices).

    Returns
    -------
    vertices : ndarray, float64, shape (10·4^n + 2, 3)
        Points on the unit sphere.
    faces : ndarray, int64, shape (20·4^n, 3)
        Triangles with outward (counter-clockwise) orientation.
    """
    if subdivisions < 0:
        raise ValueError(f"subdivisions must be >= 0, got {subdivisions}")
    g = (1.0 + math.sqrt(5.0)) / 2.0
    verts = [(-1, g, 0), (1, g, 0), (-1, -g, 0), (1, -g, 0), (0, -1, g), (0, 1, g),
             (0, -1, -g), (0, 1, -g), (g, 0, -1), (g, 0, 1), (-g, 0, -1), (-g, 0, 1)]
    faces = np.array([(0, 11, 5), (0, 5, 1), (0, 1, 7), (0, 7, 10), (0, 10, 11),
                      (1, 5, 9), (5, 11, 4), (11, 10, 2), (10, 7, 6), (7, 1, 8),
                      (3, 9, 4), (3, 4, 2), (3, 2, 6), (3, 6, 8), (3, 8, 9),
                      (4, 9, 5), (2, 4, 11), (6, 2, 10), (8, 6, 7), (9, 8, 1)], np.int64)
    v = np.asarray(verts, np.float64)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    for _ in range(subdivisions):
        edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
        key = np.sort(edges, axis=1)
        uniq, inverse = np.unique(key, axis=0, return_inverse=True)
        mid = v[uniq[:, 0]] + v[uniq[:, 1]]
        mid /= np.linalg.norm(mid, axis=1, keepdims=True)
        mid_index = len(v) + inverse.reshape(3, -1)  # (edge slot, face)
        a, b, c = faces.T
        ab, bc, ca = mid_index
        faces = np.concatenate([np.stack([a, ab, ca], 1), np.stack([ab, b, bc], 1),
                                np.stack([ca, bc, c], 1), np.stack([ab, bc, ca], 1)])
        v = np.concatenate([v, mid])
    # Make every face counter-clockwise seen from outside (normal along the position).
    p0, p1, p2 = v[faces[:, 0]], v[faces[:, 1]], v[faces[:, 2]]
    flip = np.einsum("ij,ij->i", np.cross(p1 - p0, p2 - p0), p0 + p1 + p2) < 0
    faces[flip] = faces[flip][:, ::-1]
    return v, faces


def _validated(magnitude: np.ndarray, voxel_size: Sequence[float] | None,
               f: float) -> tuple[np.ndarray, np.ndarray]:
    mag = np.asarray(magnitude)
    if mag.ndim != 3:
        raise InvalidInputError(f"magnitude must be a 3-D volume, got shape {mag.shape}")
    if min(mag.shape) < 4:
        raise InvalidInputError(f"magnitude is too small for a surface model: shape {mag.shape}")
    if not np.issubdtype(mag.dtype, np.number) or np.iscomplexobj(mag):
        raise InvalidInputError(f"magnitude must be real numbers, got dtype {mag.dtype}")
    mag = mag.astype(np.float32, copy=False)
    if not np.all(np.isfinite(mag)):
        n_bad = int(np.count_nonzero(~np.isfinite(mag)))
        raise InvalidInputError(f"magnitude has {n_bad} NaN/inf voxels; zero or fill them first")
    vsz = np.ones(3) if voxel_size is None else np.asarray(as_voxel_size(
        voxel_size, message=f"voxel_size must be 3 positive mm values, got {voxel_size!r}"))
    if not (0.0 < f < 1.0):
        raise InvalidInputError(f"fractional intensity f must lie in (0, 1), got {f!r}")
    return np.ascontiguousarray(mag), vsz


def _head_statistics(mag: np.ndarray, vsz: np.ndarray) -> dict[str, Any]:
    """Robust range, head threshold, centre of gravity, radius and median (Smith 2002)."""
    values = mag.ravel()
    t2, t98 = (float(x) for x in np.percentile(values, [2.0, 98.0]))
    if not t98 > t2:
        raise InvalidInputError("magnitude has no contrast (2nd and 98th percentiles are equal); "
                                "cannot find a head")
    # t2 stands for the background (air) level. In a field of view cropped inside the
    # brain there is no background: Otsu's two classes are then both tissue (means within
    # 2x), and the 2nd percentile is dark tissue, which would make the surface shrink
    # away from tissue. The background level of a magnitude image is ~0 then.
    level = float(threshold_otsu(values))
    low, high = values[values <= level], values[values > level]
    no_background = bool(low.size and high.size
                         and low.mean() > NO_BACKGROUND_CONTRAST * high.mean())
    if no_background:
        log.info("bet: the magnitude has no background class; using 0 as its level")
        t2 = 0.0
    t = t2 + 0.1 * (t98 - t2)
    head = mag > t
    n_head = int(np.count_nonzero(head))
    if n_head < 8:
        raise InvalidInputError("fewer than 8 voxels are above the head threshold; cannot find a "
                                "head in the magnitude")
    idx = np.nonzero(head)
    weights = np.minimum(mag[idx], t98).astype(np.float64) - t2
    centre = np.array([np.average(i, weights=weights) for i in idx]) * vsz
    radius = (3.0 * n_head * float(np.prod(vsz)) / (4.0 * math.pi)) ** (1.0 / 3.0)
    grids = np.ogrid[tuple(slice(0, n) for n in mag.shape)]
    dist2 = sum(((g * h) - c) ** 2 for g, h, c in zip(grids, vsz, centre, strict=True))
    in_sphere = (dist2 <= radius**2) & (mag > t2) & (mag < t98)
    tm = float(np.median(mag[in_sphere])) if in_sphere.any() else 0.5 * (t + t98)
    return {"t2": t2, "t98": t98, "t": t, "tm": tm, "centre_mm": centre.tolist(),
            "radius_mm": radius, "no_background": no_background}


def _rasterise(pos_mm: np.ndarray, faces: np.ndarray, shape: tuple[int, ...],
               vsz: np.ndarray) -> np.ndarray:
    """Voxels enclosed by a closed triangle mesh (mm coordinates of the index frame).

    Every voxel the surface passes through is found by sampling the triangles densely
    (≤ 0.4 voxel apart); such a voxel is kept when its centre lies on the inner side of
    the surface (mean signed distance of its samples along the normal < 0); voxels not
    reachable from the border without crossing the surface are inside.
    """
    pad = 2
    p = pos_mm / vsz + pad  # voxel index in a padded grid
    grid = tuple(n + 2 * pad for n in shape)
    p = np.clip(p, 0.0, np.array(grid) - 1.0)
    a, b, c = p[faces[:, 0]], p[faces[:, 1]], p[faces[:, 2]]
    longest = max(float(np.abs(b - a).max()), float(np.abs(c - b).max()),
                  float(np.abs(a - c).max()), 1e-6)
    k = max(1, math.ceil(longest / 0.4))
    i, j = np.meshgrid(np.arange(k + 1), np.arange(k + 1), indexing="ij")
    keep = i + j <= k
    wu, wv = (i[keep] / k)[:, None], (j[keep] / k)[:, None]
    normals = np.cross(b - a, c - a)
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    # Work in the surface's bounding box plus one voxel (its border is then outside).
    lo = np.maximum(np.floor(p.min(axis=0)).astype(int) - 1, 0)
    hi = np.minimum(np.ceil(p.max(axis=0)).astype(int) + 2, np.array(grid))
    box = tuple(int(x) for x in hi - lo)
    shell = np.zeros(box, bool)
    flats, signeds = [], []
    # Chunk the triangles so the sample array stays small (~k²/2 samples each).
    chunk = max(1, 2_000_000 // max(1, wu.size))
    for s in range(0, len(faces), chunk):
        aa, ee, ff = a[s:s + chunk], (b - a)[s:s + chunk], (c - a)[s:s + chunk]
        pts = (aa[:, None, :] + wu[None] * ee[:, None, :] + wv[None] * ff[:, None, :])
        nrm = np.broadcast_to(normals[s:s + chunk, None, :], pts.shape).reshape(-1, 3)
        pts = pts.reshape(-1, 3)
        vox = np.rint(pts).astype(np.int64)
        flat = np.ravel_multi_index((vox - lo).T, box)
        shell.ravel()[flat] = True
        # Signed distance (in voxels, along the normal) of the voxel centre to the plane.
        flats.append(flat)
        signeds.append(np.einsum("ij,ij->i", vox - pts, nrm))
    shell_voxels, where = np.unique(np.concatenate(flats), return_inverse=True)
    signed_sum = np.bincount(where, weights=np.concatenate(signeds))
    outside_labels, n_labels = ndimage.label(~shell)
    border = np.zeros(n_labels + 1, bool)
    border[np.concatenate([outside_labels[[0, -1]].ravel(),
                           outside_labels[:, [0, -1]].ravel(),
                           outside_labels[:, :, [0, -1]].ravel()])] = True
    inside = ~shell & ~border[outside_labels]
    inside.ravel()[shell_voxels[signed_sum < 0.0]] = True
    mask = np.zeros(grid, bool)
    mask[tuple(slice(int(x), int(y)) for x, y in zip(lo, hi, strict=True))] = inside
    return mask[pad:-pad, pad:-pad, pad:-pad]


def evolution_settings(stats: dict[str, Any], f: float,
                       voxel_size: np.ndarray) -> tuple[float, ...]:
    """Settings tuple of ``_core.bet_evolve_surface`` (and of the NumPy twin).

    (t2, t, tm, f, step_mm, d_min_mm, d_max_mm, r_min_mm, r_max_mm, intensity_step,
    tangential_step, settle_mm); the profile step is 1 mm, or half the smallest voxel edge when
    that is larger.
    """
    step_mm = max(1.0, 0.5 * float(np.min(voxel_size)))
    return (float(stats["t2"]), float(stats["t"]), float(stats["tm"]), float(f), step_mm,
            D_MIN_MM, D_MAX_MM, R_MIN_MM, R_MAX_MM, INTENSITY_STEP, TANGENTIAL_STEP,
            BET_SETTLE_MM)


def bet(
    magnitude: np.ndarray,
    voxel_size: Sequence[float] | None = None,
    *,
    f: float = BET_FRACTIONAL_INTENSITY,
    iterations: int = BET_ITERATIONS,
    subdivisions: int = BET_SUBDIVISIONS,
) -> BetResult:
    """Brain mask of a head magnitude image by a deformable surface (Smith 2002).

    Parameters
    ----------
    magnitude : ndarray, shape (X, Y, Z)
        Magnitude image (arbitrary units, finite), e.g. the first MEGRE echo or the
        root-sum-of-squares over echoes. Skull and air must be darker than brain.
    voxel_size : 3 floats, optional
        Voxel edges in mm along the array axes (default 1 mm isotropic).
    f : float
        Fractional intensity threshold in (0, 1); smaller values give a larger mask.
        Default 0.5.
    iterations : int
        Most surface-evolution steps (Smith 2002: 1000); the evolution stops earlier
        once the mean vertex displacement over 100 steps is below ``BET_SETTLE_MM``.
    subdivisions : int
        Icosphere subdivisions (4 = 2562 vertices). Default 4.

    Returns
    -------
    BetResult
        Mask, final surface and the measured parameters.

    Raises
    ------
    ValueError
        Non-3-D, non-finite, constant or empty magnitude; f outside (0, 1).
    """
    mag, vsz = _validated(magnitude, voxel_size, f)
    if int(iterations) < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    stats = _head_statistics(mag, vsz)
    centre = np.asarray(stats["centre_mm"])
    unit, faces = icosphere(subdivisions)
    pos = centre + 0.5 * stats["radius_mm"] * unit
    settings = evolution_settings(stats, f, vsz)
    pos, iterations_run = _core.bet_evolve_surface(
        mag, tuple(float(v) for v in vsz), np.ascontiguousarray(pos, np.float64),
        np.ascontiguousarray(faces, np.uint32), settings, int(iterations))
    mask = _rasterise(pos, faces, mag.shape, vsz)
    if not mask.any():
        raise InvalidInputError("the brain surface collapsed to nothing; check the magnitude "
                                "(skull and air must be darker than brain) or lower f")
    params = dict(stats, f=float(f), max_iterations=int(iterations),
                  iterations_run=int(iterations_run), settle_mm=BET_SETTLE_MM,
                  vertices=int(len(pos)), voxel_size_mm=vsz.tolist())
    log.debug("bet: %s, %d voxels", params, int(mask.sum()))
    return BetResult(mask=mask, vertices_mm=pos, faces=faces, parameters=params)


#: Below this ratio of the mean intensities of Otsu's two classes, the lower class is
#: background (noise); above it both classes are tissue (a field of view inside the brain).
_BACKGROUND_CONTRAST = 0.5

#: Threshold, as a fraction of the 99th percentile, used when there is no background class.
_NO_BACKGROUND_FRACTION = 0.25


def magnitude_threshold(values: np.ndarray) -> float:
    """Intensity separating head signal from background in a magnitude image.

    Otsu's threshold when the image has a background (noise) class; when Otsu's two
    classes are both tissue (their mean intensities differ by less than 2x, as in a
    field of view cropped inside the brain) a quarter of the 99th percentile instead,
    so that darker tissue is not cut away.
    """
    level = float(threshold_otsu(values))
    low, high = values[values <= level], values[values > level]
    if low.size and high.size and low.mean() > _BACKGROUND_CONTRAST * high.mean():
        level = _NO_BACKGROUND_FRACTION * float(np.percentile(values, 99))
        log.info("magnitude has no background class; brain-mask threshold %.4g", level)
    return level


#: Brain-mask methods of :func:`brain_mask` → provenance description.
BRAIN_MASK_METHODS: dict[str, str] = {
    "bet": "deformable surface model (BET-like, Smith 2002) on the echo-1 magnitude",
    "otsu": "Otsu threshold of echo-1 magnitude, opening, largest component, hole filling",
}
#: The one default brain-mask method: of :func:`brain_mask` and of ``alsiron qsm``
#: (:class:`alsiron.qsm.chain.QsmParameters`).  ``alsiron relax`` and ``alsiron roi``
#: (without a mask from ``alsiron qsm``) name "otsu" at their call instead.
DEFAULT_BRAIN_MASK_METHOD = "bet"


def brain_mask(
    magnitude_echo1: np.ndarray,
    *,
    method: str = DEFAULT_BRAIN_MASK_METHOD,
    voxel_size: Sequence[float] | None = None,
    bet_f: float = 0.5,
    erode_voxels: int = 2,
    threshold: float | None = None,
) -> np.ndarray:
    """Brain mask from the first-echo magnitude.

    ``method="otsu"``: threshold
    (:func:`magnitude_threshold` unless given) → erode by ``erode_voxels`` (a ball) to
    cut thin links between brain and scalp across the signal-free skull → keep the
    largest connected component → fill holes → dilate back by the same ball, restricted
    to the thresholded voxels → fill holes again.

    ``method="bet"`` (:data:`DEFAULT_BRAIN_MASK_METHOD`): the deformable surface model of
    :func:`bet` (Smith 2002), which stops at the dark skull even where bright tissue
    (neck, scalp, a foramen) connects to the brain; ``erode_voxels`` and ``threshold``
    are not used.

    Parameters
    ----------
    magnitude_echo1 : ndarray, shape (X, Y, Z)
        Magnitude of the first echo (arbitrary units).
    method : {"otsu", "bet"}
        Masking algorithm (see :data:`BRAIN_MASK_METHODS`). Default
        :data:`DEFAULT_BRAIN_MASK_METHOD` ("bet").
    voxel_size : 3 floats, optional
        Voxel edges in mm (used by "bet"; default 1 mm isotropic).
    bet_f : float
        BET fractional intensity threshold in (0, 1); smaller = larger mask. Default 0.5.
    erode_voxels : int
        Radius of the erosion/dilation ball in voxels (0 disables), "otsu" only. Default 2.
    threshold : float, optional
        Intensity threshold, "otsu" only; default :func:`magnitude_threshold` of the
        non-zero voxels.

    Returns
    -------
    ndarray of bool, shape (X, Y, Z)
    """
    mag = as_volume(magnitude_echo1, "magnitude_echo1").astype(np.float64)
    if method not in BRAIN_MASK_METHODS:
        raise InvalidInputError(f"unknown brain-mask method {method!r} "
                                f"(choose one of {', '.join(BRAIN_MASK_METHODS)})")
    if erode_voxels < 0:
        raise ValueError(f"erode_voxels must be >= 0, got {erode_voxels}")
    positive = mag[mag > 0]
    if positive.size == 0:
        raise InvalidInputError("magnitude_echo1 has no positive voxel; cannot derive a brain mask")
    if method == "bet":

        return bet(mag, voxel_size, f=bet_f).mask
    level = magnitude_threshold(positive) if threshold is None else float(threshold)
    fg = mag > level
    r = int(erode_voxels)
    ball = None
    core = fg
    if r > 0:
        g = np.arange(-r, r + 1)
        ball = (g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2) <= r * r
        core = ndimage.binary_erosion(fg, structure=ball)
    labels, n = ndimage.label(core)
    if n == 0:
        raise InvalidInputError(
            f"no foreground left after thresholding at {level:.4g} and eroding by {r} voxels; "
            "lower erode_voxels or pass a threshold"
        )
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
    largest = labels == (1 + int(np.argmax(sizes)))
    largest = ndimage.binary_fill_holes(largest)
    if ball is not None:
        largest = ndimage.binary_dilation(largest, structure=ball) & (fg | largest)
    mask = ndimage.binary_fill_holes(largest)
    log.debug("brain_mask: threshold %.4g, %d voxels", level, int(mask.sum()))
    return mask
