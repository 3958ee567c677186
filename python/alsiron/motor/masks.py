"""Precentral-cortex region masks on the grid of the χ / R2* maps: the
:class:`RegionMasks` both routes produce and :func:`build_region_masks`, which splits a
precentral cortex into sub-regions.

Two routes give the precentral cortex:

* **labels** (:func:`alsiron.motor.labels.masks_from_labels`): a label image
  (FreeSurfer ``aparc+aseg`` / ``aparc.a2009s``, a BIDS ``dseg`` with its ``dseg.tsv``,
  or any image with a lookup table naming the precentral labels), resampled to the map
  grid through the affines;
* **atlas** (:func:`alsiron.motor.atlas.masks_from_atlas`, the default): the bundled
  MNI152 template is registered to the subject (:mod:`alsiron.motor.registration`), a
  precentral atlas (Harvard-Oxford "Precentral Gyrus" or Jülich BA4a+BA4p) is warped into
  the subject and restricted to cortical grey matter of a three-class intensity model.

Both routes end in :func:`build_region_masks`, which splits the cortex into left/right,
somatotopic segments (leg / hand / face, from the position along the gyrus) and cortical
depth bands (deep / superficial, from the distances to the grey/white boundary and to
the pial side), and adds the underlying white matter and a control region.

Coordinates are RAS+ millimetres (NIfTI world); arrays are (X, Y, Z) on the map grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from alsiron.grid import voxel_size_from_affine, world_coordinates

if TYPE_CHECKING:
    from alsiron.motor.pvc import PartialVolumeRegions

#: Somatotopic segments along the gyrus, from the dorsomedial end to the ventrolateral.
SEGMENTS = ("leg", "hand", "face")
#: Boundaries of the segments in normalised position along the gyrus (0 = medial end at
#: the midline, 1 = lateral-inferior end): thirds, a documented approximation of the
#: homunculus (leg and foot on the vertex, hand knob in the middle, face laterally).
SEGMENT_BOUNDS = (1.0 / 3.0, 2.0 / 3.0)
#: Cortical voxels with normalised depth below this (closer to white matter) are "deep".
DEEP_DEPTH_THRESHOLD = 0.5
#: Underlying white matter: WM voxels within this distance (mm) of the precentral cortex.
UNDERLYING_WM_MM = 6.0
#: Control-region slab behind the precentral gyrus when no postcentral label exists (mm).
CONTROL_SLAB_MM = (4.0, 20.0)

#: ``hemisphere`` codes of :class:`RegionMasks`.
HEMI_LEFT = 1
HEMI_RIGHT = 2


@dataclass
class RegionMasks:
    """Precentral cortex and its sub-regions on one grid.

    Attributes
    ----------
    precentral : ndarray, bool, (X, Y, Z)
        Precentral cortical grey matter (both hemispheres).
    hemisphere : ndarray, uint8
        1 = left, 2 = right inside ``precentral``, 0 elsewhere.
    segment : ndarray, uint8
        1 = leg (dorsomedial), 2 = hand (middle), 3 = face/bulbar (ventrolateral), 0 outside.
    position : ndarray, float32
        Normalised position along the gyrus (0 medial end .. 1 lateral-inferior end);
        NaN outside ``precentral``.
    depth : ndarray, float32
        Normalised cortical depth, 0 at the grey/white boundary .. 1 at the pial side;
        NaN outside ``precentral``.
    deep : ndarray, bool
        ``precentral`` voxels with ``depth`` < :data:`DEEP_DEPTH_THRESHOLD`.
    underlying_wm : ndarray, bool
        White matter within :data:`UNDERLYING_WM_MM` of the precentral cortex.
    control : ndarray, bool
        Control cortex (postcentral gyrus, or a cortical slab behind the precentral).
    affine : ndarray, (4, 4)
        Voxel-to-world transform of the grid.
    provenance : dict
        Route, sources and parameters (written to the indices' JSON).
    partial_volume : PartialVolumeRegions or None
        Tissue fractions around the precentral cortex, when the masks came from a label
        image finer than the maps (:mod:`alsiron.motor.pvc`); enables the ``gtm`` indices.
    """

    precentral: np.ndarray
    hemisphere: np.ndarray
    segment: np.ndarray
    position: np.ndarray
    depth: np.ndarray
    deep: np.ndarray
    underlying_wm: np.ndarray
    control: np.ndarray
    affine: np.ndarray
    provenance: dict[str, Any] = field(default_factory=dict)
    partial_volume: PartialVolumeRegions | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid shape (X, Y, Z)."""
        return tuple(self.precentral.shape)  # type: ignore[return-value]

    def regions(self) -> dict[str, np.ndarray]:
        """Named boolean masks: ``precentral[_L|_R][_leg|_hand|_face][_deep|_superficial]``,
        ``underlyingwm`` and ``control`` (the region part of the index names)."""
        out: dict[str, np.ndarray] = {}
        sides = {"": self.precentral,
                 "_L": self.hemisphere == HEMI_LEFT,
                 "_R": self.hemisphere == HEMI_RIGHT}
        segs = {"": self.precentral}
        segs.update({f"_{name}": self.segment == k + 1 for k, name in enumerate(SEGMENTS)})
        depths = {"": self.precentral, "_deep": self.deep,
                  "_superficial": self.precentral & ~self.deep}
        for s, sm in sides.items():
            for g, gm in segs.items():
                for d, dm in depths.items():
                    out[f"precentral{s}{g}{d}"] = sm & gm & dm & self.precentral
        out["underlyingwm"] = self.underlying_wm
        out["control"] = self.control
        return out


def position_along_gyrus(coords: np.ndarray, mask: np.ndarray, hemisphere: np.ndarray,
                         centre: np.ndarray) -> np.ndarray:
    """Normalised position of each gyrus voxel from the midline (0) to its lateral-
    inferior end (1), per hemisphere.

    The angle in the coronal (x, z) plane about ``centre`` is
    θ = atan2(|x − x_c|, z − z_c): 0 at the vertex above the centre, growing down the
    lateral convexity.  θ is rescaled per hemisphere between its 1st and 99th
    percentiles over the gyrus (clipped to [0, 1]).

    Parameters
    ----------
    coords : ndarray, (3, X, Y, Z)
        Coordinates (mm) of each voxel in the space where the geometry is defined
        (subject world, or template space for the atlas route).
    mask, hemisphere : ndarray
        Gyrus voxels and their side (1 left, 2 right).
    centre : ndarray, (3,)
        Centre (mm) of the brain in the same space; only x and z are used.
    """
    pos = np.full(mask.shape, np.nan, np.float32)
    dx = np.abs(coords[0] - np.float32(centre[0]))
    dz = coords[2] - np.float32(centre[2])
    theta = np.arctan2(dx, dz)
    for side in (HEMI_LEFT, HEMI_RIGHT):
        sel = mask & (hemisphere == side)
        if sel.sum() < 3:
            continue
        lo, hi = np.percentile(theta[sel], [1.0, 99.0])
        span = max(float(hi - lo), 1e-6)
        pos[sel] = np.clip((theta[sel] - lo) / span, 0.0, 1.0)
    return pos


def cortical_depth(cortex: np.ndarray, wm: np.ndarray, voxel_size: tuple[float, ...]
                   ) -> np.ndarray:
    """Normalised depth of cortical voxels: d_wm / (d_wm + d_pial).

    d_wm is the Euclidean distance (mm) to the nearest white-matter voxel, d_pial to the
    nearest voxel that is neither cortex nor white matter (CSF, outside the brain): 0 next
    to white matter, 1 at the pial side; NaN outside ``cortex``.  A cortex with no white
    matter or no outside in the field of view gets NaN.
    """
    depth = np.full(cortex.shape, np.nan, np.float32)
    outside = ~(cortex | wm)
    if not wm.any() or not outside.any() or not cortex.any():
        return depth
    d_wm = ndimage.distance_transform_edt(~wm, sampling=voxel_size)
    d_pial = ndimage.distance_transform_edt(~outside, sampling=voxel_size)
    depth[cortex] = (d_wm[cortex] / (d_wm[cortex] + d_pial[cortex])).astype(np.float32)
    return depth


def control_slab(cortex: np.ndarray, precentral: np.ndarray, coords: np.ndarray,
                 slab_mm: tuple[float, float] = CONTROL_SLAB_MM) -> np.ndarray:
    """Cortex in a coronal slab ``slab_mm`` behind the precentral gyrus (postcentral-like),
    at or above the gyrus' 10th-percentile height (mm in ``coords``' space)."""
    if not precentral.any():
        return np.zeros_like(cortex)
    y = coords[1]
    z = coords[2]
    y_back = float(np.percentile(y[precentral], 2.0))
    z_low = float(np.percentile(z[precentral], 10.0))
    return (cortex & ~precentral & (y <= y_back - slab_mm[0]) & (y >= y_back - slab_mm[1])
            & (z >= z_low))


def build_region_masks(precentral: np.ndarray, hemisphere: np.ndarray, cortex: np.ndarray,
                       wm: np.ndarray, affine: np.ndarray, *, control: np.ndarray | None = None,
                       geometry_coords: np.ndarray | None = None,
                       geometry_centre: np.ndarray | None = None,
                       brain: np.ndarray | None = None,
                       provenance: dict[str, Any] | None = None) -> RegionMasks:
    """Split a precentral cortex mask into sides, segments and depth bands.

    Parameters
    ----------
    precentral : ndarray, bool (X, Y, Z)
        Precentral cortical grey matter.
    hemisphere : ndarray, uint8
        1 left, 2 right (0 = unknown: decided by the side of the midline).
    cortex, wm : ndarray, bool
        All cortical grey matter and white matter (for depth, control and underlying WM).
    affine : ndarray (4, 4)
        Grid voxel-to-world (mm).
    control : ndarray, bool, optional
        Control cortex (e.g. postcentral); default :func:`control_slab`.
    geometry_coords : ndarray (3, X, Y, Z), optional
        Coordinates in which the segment geometry is defined (default: subject world).
    geometry_centre : ndarray (3,), optional
        Brain centre in those coordinates (default: centroid of ``brain`` or of
        ``cortex | wm`` in world coordinates).
    brain : ndarray, bool, optional
        Brain mask for the default centre.
    provenance : dict, optional
        Recorded on the result.
    """
    precentral = np.asarray(precentral, bool)
    cortex = np.asarray(cortex, bool) | precentral
    wm = np.asarray(wm, bool) & ~cortex
    world = world_coordinates(precentral.shape, affine)
    coords = world if geometry_coords is None else geometry_coords
    if geometry_centre is None:
        inside = brain if brain is not None and np.any(brain) else (cortex | wm)
        centre = coords[:, inside].mean(axis=1) if inside.any() else np.zeros(3)
    else:
        centre = np.asarray(geometry_centre, float)
    hemi = np.where(precentral, np.asarray(hemisphere, np.uint8), 0).astype(np.uint8)
    unknown = precentral & (hemi == 0)
    if unknown.any():
        hemi[unknown & (coords[0] < centre[0])] = HEMI_LEFT
        hemi[unknown & (coords[0] >= centre[0])] = HEMI_RIGHT
    position = position_along_gyrus(coords, precentral, hemi, centre)
    segment = np.zeros(precentral.shape, np.uint8)
    ok = precentral & np.isfinite(position)
    segment[ok] = 1 + np.searchsorted(SEGMENT_BOUNDS, position[ok], side="right").astype(
        np.uint8)
    voxel_size = voxel_size_from_affine(affine)
    depth_all = cortical_depth(cortex, wm, voxel_size)
    depth = np.where(precentral, depth_all, np.nan).astype(np.float32)
    deep = precentral & (depth < DEEP_DEPTH_THRESHOLD)
    near = ndimage.distance_transform_edt(~precentral, sampling=voxel_size) <= UNDERLYING_WM_MM
    underlying = wm & near
    if control is None:
        control = control_slab(cortex, precentral, coords)
    prov = dict(provenance or {})
    prov.update({
        "SegmentDefinition": "angle about the brain centre in the coronal plane, "
                             "normalised per hemisphere (1st-99th percentile): leg < 1/3 "
                             "<= hand < 2/3 <= face",
        "SegmentBounds": list(SEGMENT_BOUNDS),
        "GeometryCentre_mm": [round(float(c), 2) for c in centre],
        "DepthDefinition": "d_wm / (d_wm + d_pial), Euclidean distances in mm; deep < "
                           f"{DEEP_DEPTH_THRESHOLD}",
        "UnderlyingWM_mm": UNDERLYING_WM_MM,
        "PrecentralVoxels": int(precentral.sum()),
    })
    return RegionMasks(precentral=precentral, hemisphere=hemi, segment=segment,
                       position=position, depth=depth, deep=deep, underlying_wm=underlying,
                       control=np.asarray(control, bool) & ~precentral, affine=np.asarray(affine),
                       provenance=prov)

