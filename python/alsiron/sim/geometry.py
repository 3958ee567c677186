"""Geometry recipe of the numerical head phantom (labels on a supersampled grid).

Every length here is in millimetres of the *reference head*, in a frame whose axes are
the voxel axes of the output grid: x towards the subject's right, y anterior, z
superior, origin at the centre of the field of view.  :func:`head_labels` receives
coordinates already divided by the phantom's scale factor, so the recipe below is the
one documented in ``phantoms/README.md`` regardless of the field of view.

Shells (scalp, skull, subarachnoid CSF, cortical ribbon and its two depth halves) are
cut at an approximate distance from the outer head ellipsoid, ``(1 - f) / |grad f|``
with ``f`` the ellipsoid norm: exact on the surface, accurate to a fraction of a
millimetre over the 20 mm the shells span.
"""

from __future__ import annotations

import numpy as np

from alsiron.sim.tissues import LABELS

# Outer head ellipsoid, semi-axes (x, y, z) in mm, centred on the field of view.
HEAD_SEMI_AXES_MM = (72.0, 90.0, 88.0)
SCALP_THICKNESS_MM = 5.0
#: Depth of the inner skull surface below the head surface: 7 mm of bone.
INTRACRANIAL_DEPTH_MM = 12.0
#: The brain's flat floor; below it the skull base, soft tissue and the air sinuses.
SKULL_BASE_Z_MM = -40.0
#: Bone plate under the brain floor; below it facial soft tissue down to the scalp.
SKULL_BASE_PLATE_MM = 7.0
SUBARACHNOID_MM = 2.5
#: Cortical ribbon: intracranial depth 2.5..8.5 mm (6 mm, >= 2 voxels at 2 mm);
#: anatomical cortex is 2.5-4 mm thick, thickened here so depth is resolvable.
RIBBON_INNER_MM = 8.5
#: Deep half of the ribbon (next to white matter) starts at this intracranial depth.
RIBBON_DEEP_FROM_MM = 5.5
#: Bone wall kept around the sinus cavities (towards brain and scalp).
SINUS_WALL_MM = 3.0
#: Interhemispheric fissure: CSF sheet |x| < 1.25 mm above this height.
FISSURE_HALF_WIDTH_MM = 1.25
FISSURE_FROM_Z_MM = 22.0
#: Precentral cortex: a coronal slab of the ribbon over the upper convexity.
PRECENTRAL_Y_RANGE_MM = (-14.0, 2.0)
PRECENTRAL_FROM_Z_MM = 15.0

# (centre, semi-axes) of the bilateral ellipsoids, left copy at -x; written in this
# order so later structures win where they touch (pallidum over putamen, ...).
_VENTRICLE = ((7.0, 8.0, 12.0), (4.5, 24.0, 7.0))
_BILATERAL = [
    ("caudate", (15.0, 14.0, 12.0), (5.0, 12.0, 8.0)),
    ("thalamus", (10.0, -14.0, 2.0), (7.0, 13.0, 8.0)),
    ("putamen", (25.5, 4.0, 0.0), (5.5, 14.0, 10.0)),
    ("globus_pallidus", (18.5, 1.0, -1.0), (4.0, 9.0, 6.0)),
    ("substantia_nigra", (10.0, -14.0, -22.0), (3.5, 8.0, 3.0)),
    ("red_nucleus", (5.5, -16.0, -15.0), (3.6, 3.6, 3.6)),
]
_THIRD_VENTRICLE = ((0.0, -10.0, 2.0), (1.5, 10.0, 6.0))
# Air cavities (frontal-ethmoid and sphenoid sinus), centre and semi-axes.
_SINUSES = [((0.0, 50.0, -55.0), (22.0, 14.0, 10.0)), ((0.0, 20.0, -58.0), (12.0, 10.0, 9.0))]
# Venous tubes: (start, end, radius); the sagittal sinus is cut from the shell instead.
_VEIN_TUBES = [
    ((0.0, -30.0, 12.0), (0.0, -62.0, 40.0), 2.5),  # straight sinus
    ((-2.5, 12.0, 16.0), (-2.5, -28.0, 12.0), 1.5),  # internal cerebral vein, left
    ((2.5, 12.0, 16.0), (2.5, -28.0, 12.0), 1.5),  # internal cerebral vein, right
]
#: Superior sagittal sinus: |x| < 3 mm, intracranial depth < 5 mm, z > 0.
SSS_HALF_WIDTH_MM = 3.0
SSS_DEPTH_MM = 5.0


def ellipsoid_depth(x: np.ndarray, y: np.ndarray, z: np.ndarray,
                    semi_axes: tuple[float, float, float]) -> np.ndarray:
    """Approximate inward distance (mm) to an origin-centred ellipsoid's surface.

    Positive inside, negative outside; ``(1 - f) / |grad f|`` with ``f`` the ellipsoid
    norm (first-order distance, exact on the surface).
    """
    a, b, c = semi_axes
    f = np.sqrt((x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2)
    f = np.maximum(f, 1e-6)
    grad = np.sqrt((x / a**2) ** 2 + (y / b**2) ** 2 + (z / c**2) ** 2) / f
    return (1.0 - f) / np.maximum(grad, 1e-12)


def _box(axes: tuple[np.ndarray, np.ndarray, np.ndarray], centre, half) -> tuple[slice, ...]:
    """Index slices of the axis-aligned box centre ± half on the 1-D coordinate axes."""
    out = []
    for ax, c, h in zip(axes, centre, half, strict=True):
        lo = int(np.searchsorted(ax, c - h, side="left"))
        hi = int(np.searchsorted(ax, c + h, side="right"))
        out.append(slice(lo, hi))
    return tuple(out)


def _paint_ellipsoid(labels: np.ndarray, axes, centre, semi, value: int,
                     where_labels: tuple[int, ...] | None = None) -> None:
    sl = _box(axes, centre, semi)
    x = axes[0][sl[0]][:, None, None] - centre[0]
    y = axes[1][sl[1]][None, :, None] - centre[1]
    z = axes[2][sl[2]][None, None, :] - centre[2]
    inside = (x / semi[0]) ** 2 + (y / semi[1]) ** 2 + (z / semi[2]) ** 2 <= 1.0
    block = labels[sl]
    if where_labels is not None:
        inside &= np.isin(block, where_labels)
    block[inside] = value


def _paint_tube(labels: np.ndarray, axes, start, end, radius: float, value: int,
                where_labels: tuple[int, ...]) -> None:
    p0 = np.asarray(start, float)
    p1 = np.asarray(end, float)
    lo = np.minimum(p0, p1) - radius
    hi = np.maximum(p0, p1) + radius
    sl = _box(axes, (lo + hi) / 2, (hi - lo) / 2)
    x = axes[0][sl[0]][:, None, None] - p0[0]
    y = axes[1][sl[1]][None, :, None] - p0[1]
    z = axes[2][sl[2]][None, None, :] - p0[2]
    seg = p1 - p0
    length2 = float(seg @ seg)
    t = np.clip((x * seg[0] + y * seg[1] + z * seg[2]) / length2, 0.0, 1.0)
    dist2 = (x - t * seg[0]) ** 2 + (y - t * seg[1]) ** 2 + (z - t * seg[2]) ** 2
    block = labels[sl]
    block[(dist2 <= radius**2) & np.isin(block, where_labels)] = value


def head_labels(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label image of the reference head on the grid spanned by 1-D coordinates.

    Parameters
    ----------
    x, y, z : ndarray, 1-D, increasing
        Voxel-centre coordinates (mm of the reference head) along the three voxel axes.

    Returns
    -------
    labels : ndarray, uint8, shape (len(x), len(y), len(z))
        Tissue labels (indices of ``head_tissues.tsv``).
    intracranial : ndarray, bool, same shape
        Everything inside the inner skull surface: the phantom's brain mask.
    """
    axes = (np.asarray(x, np.float32), np.asarray(y, np.float32), np.asarray(z, np.float32))
    X = axes[0][:, None, None]
    Y = axes[1][None, :, None]
    Z = axes[2][None, None, :]
    d_head = ellipsoid_depth(X, Y, Z, HEAD_SEMI_AXES_MM)
    d_ic = np.minimum(d_head - INTRACRANIAL_DEPTH_MM, Z - SKULL_BASE_Z_MM)
    L = LABELS
    labels = np.full(d_head.shape, L["air"], np.uint8)
    labels[d_head >= 0] = L["scalp"]
    labels[d_head >= SCALP_THICKNESS_MM] = L["bone"]
    # Below the skull-base plate: facial soft tissue (lumped with scalp).
    face = (Z < SKULL_BASE_Z_MM - SKULL_BASE_PLATE_MM) & (d_head >= SCALP_THICKNESS_MM + 7.0)
    labels[face] = L["scalp"]
    intracranial = d_ic >= 0
    labels[intracranial] = L["csf"]
    labels[d_ic >= SUBARACHNOID_MM] = L["cortical_gm"]
    labels[d_ic >= RIBBON_INNER_MM] = L["white_matter"]

    sinus_allowed = (d_head >= SCALP_THICKNESS_MM + SINUS_WALL_MM) & (d_ic <= -SINUS_WALL_MM)
    for centre, semi in _SINUSES:
        sl = _box(axes, centre, semi)
        xs = axes[0][sl[0]][:, None, None] - centre[0]
        ys = axes[1][sl[1]][None, :, None] - centre[1]
        zs = axes[2][sl[2]][None, None, :] - centre[2]
        norm = np.sqrt((xs / semi[0]) ** 2 + (ys / semi[1]) ** 2 + (zs / semi[2]) ** 2)
        walled = norm <= 1.0 + SINUS_WALL_MM / min(semi)
        labels[sl][walled & (d_head[sl] >= SCALP_THICKNESS_MM)] = L["bone"]
        labels[sl][(norm <= 1.0) & sinus_allowed[sl]] = L["sinus_air"]

    brain = (L["white_matter"], L["cortical_gm"], L["csf"])
    vc, vs = _VENTRICLE
    for sign in (-1.0, 1.0):
        _paint_ellipsoid(labels, axes, (sign * vc[0], vc[1], vc[2]), vs, L["csf"], brain)
    for name, centre, semi in _BILATERAL:
        for sign, side in ((-1.0, "L"), (1.0, "R")):
            c = (sign * centre[0], centre[1], centre[2])
            _paint_ellipsoid(labels, axes, c, semi, L[f"{name}_{side}"])
    _paint_ellipsoid(labels, axes, *_THIRD_VENTRICLE, L["csf"])

    fissure = (np.abs(X) < FISSURE_HALF_WIDTH_MM) & (Z > FISSURE_FROM_Z_MM) & intracranial
    labels[fissure] = L["csf"]

    sss = (np.abs(X) < SSS_HALF_WIDTH_MM) & (d_ic >= 0) & (d_ic < SSS_DEPTH_MM) & (Z > 0)
    labels[sss] = L["vein"]
    for start, end, radius in _VEIN_TUBES:
        _paint_tube(labels, axes, start, end, radius, L["vein"],
                    (L["white_matter"], L["cortical_gm"], L["csf"], L["thalamus_L"],
                     L["thalamus_R"]))

    slab = (Y >= PRECENTRAL_Y_RANGE_MM[0]) & (Y <= PRECENTRAL_Y_RANGE_MM[1])
    precentral = slab & (Z > PRECENTRAL_FROM_Z_MM) & (labels == L["cortical_gm"])
    deep = d_ic >= RIBBON_DEEP_FROM_MM
    left = X < 0
    labels[precentral & left & ~deep] = L["precentral_L_superficial"]
    labels[precentral & left & deep] = L["precentral_L_deep"]
    labels[precentral & ~left & ~deep] = L["precentral_R_superficial"]
    labels[precentral & ~left & deep] = L["precentral_R_deep"]
    return labels, intracranial
