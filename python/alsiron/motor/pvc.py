"""Partial-volume-corrected region values of the precentral cortex: the geometric transfer
matrix (GTM; Rousset, Ma & Evans, J Nucl Med 1998;39:904) on tissue fractions from a
label image finer than the maps.

The deep precentral band (the inner half of the cortex by normalised depth) is thinner
than a 2–2.5 mm voxel, so the mean of the voxels labelled "deep" mixes it with the
superficial band, white matter and CSF: on the anatomical phantom a perfect χ map keeps
only 0.81–0.85 of a deep-layer change at 2.5 mm that way (docs/qsm_anatomy.md, "The
demo's ±20 %").  When the label image is on a finer grid (a 1 mm segmentation beside
2 mm maps, say), every map voxel's fraction of each tissue is known, and the region
values x_r that explain the map best, χ_v ≈ Σ_r f_vr x_r over the voxels around the
precentral cortex, are a least-squares fit with no free parameter.

What GTM assumes: each region's value is uniform within the neighbourhood, and the map
resolves the voxel grid (no extra blur is modelled).  Veins are not a label of a
structural segmentation, so the fit drops the voxels above the neighbourhood's 97th
percentile of the map, as the plain indices do (:data:`alsiron.motor.indices.
VEIN_PERCENTILE`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from alsiron.grid import voxel_size_from_affine
from alsiron.motor.masks import DEEP_DEPTH_THRESHOLD, cortical_depth

#: A label image counts as finer than the maps when a map voxel holds at least this many
#: of its voxels on average (2 × 2 × 2 = 8 at half the edge).
MIN_LABEL_VOXELS_PER_MAP_VOXEL = 4.0
#: Regions whose fractions add up to fewer map voxels than this in the neighbourhood are
#: pooled into one "rest" column (a column of a few voxels is fitted from noise).
MIN_REGION_VOXELS = 2.0
#: Neighbourhood of the fit: map voxels touching the precentral cortex, grown by this many
#: voxels (the white matter and CSF that share voxels with it).
NEIGHBOURHOOD_VOXELS = 1
#: Regions the indices read.
DEEP, SUPERFICIAL, WHITE_MATTER = "precentral_deep", "precentral_superficial", "white_matter"


@dataclass
class PartialVolumeRegions:
    """Tissue fractions of the map voxels around the precentral cortex.

    Attributes
    ----------
    voxels : ndarray, bool (X, Y, Z)
        Map voxels of the neighbourhood (precentral cortex in any fraction, grown by
        :data:`NEIGHBOURHOOD_VOXELS`).
    fractions : ndarray, float32 (N, R)
        Fraction of each neighbourhood voxel (in ``voxels``' C order) in each region.
    names : list of str
        Region names: :data:`DEEP`, :data:`SUPERFICIAL`, :data:`WHITE_MATTER`,
        ``cortex`` (other cortical grey matter), then ``label_<value>`` for every other
        label of the image (``label_0``: unlabelled).
    provenance : dict
    """

    voxels: np.ndarray
    fractions: np.ndarray
    names: list[str]
    provenance: dict[str, Any] = field(default_factory=dict)


def finer_than(source_affine: np.ndarray, target_affine: np.ndarray) -> bool:
    """Whether a grid's voxels are small enough against the target's for fractions
    (:data:`MIN_LABEL_VOXELS_PER_MAP_VOXEL`)."""
    src = float(np.prod(voxel_size_from_affine(source_affine)))
    tgt = float(np.prod(voxel_size_from_affine(target_affine)))
    return src > 0 and tgt / src >= MIN_LABEL_VOXELS_PER_MAP_VOXEL


def _plane_targets(shape: tuple[int, ...], vox: np.ndarray, k: int,
                   target_shape: tuple[int, ...]) -> np.ndarray:
    """Flat index of the target voxel holding the centre of each source voxel of plane
    ``k`` (source C order of ``labels[:, :, k].ravel()``; -1 outside the target)."""
    ii, jj = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    pts = (vox[:3, :3] @ np.stack([ii.ravel(), jj.ravel(), np.full(ii.size, k)])
           + vox[:3, 3:4])
    idx = np.rint(pts).astype(np.int64)
    ok = np.all((idx >= 0) & (idx < np.array(target_shape[:3])[:, None]), axis=0)
    out = np.full(ii.size, -1, np.int64)
    out[ok] = np.ravel_multi_index(tuple(idx[:, ok]), target_shape[:3])
    return out


def _target_index(shape: tuple[int, ...], source_affine: np.ndarray,
                  target_shape: tuple[int, ...], target_affine: np.ndarray) -> np.ndarray:
    """:func:`_plane_targets` of every plane, int64 over the source grid in C order."""
    vox = np.linalg.inv(target_affine) @ source_affine
    out = np.empty(shape[:3], np.int64)
    for k in range(shape[2]):
        out[:, :, k] = _plane_targets(shape, vox, k, target_shape).reshape(shape[:2])
    return out.ravel()


def partial_volume_regions(labels: np.ndarray, labels_affine: np.ndarray,
                           classes: Mapping[str, list[int]], target_shape: tuple[int, ...],
                           target_affine: np.ndarray) -> PartialVolumeRegions | None:
    """Fractions of the map voxels around the precentral cortex in each tissue, from a
    label image on a finer grid.

    The precentral cortex is split into deep and superficial halves on the label grid
    (:func:`alsiron.motor.masks.cortical_depth`, the same rule as the masks), so the
    bands are drawn at the label image's resolution, not the maps'.

    Parameters
    ----------
    labels : ndarray, int (X', Y', Z')
        Label image on its own grid.
    labels_affine : ndarray (4, 4)
    classes : mapping
        :func:`alsiron.motor.labels.classify_lut` of its lookup table.
    target_shape, target_affine
        Grid of the maps.

    Returns
    -------
    PartialVolumeRegions, or None when the label image is not finer than the maps
    (:func:`finer_than`) or holds no precentral voxel on the maps' grid.
    """
    if not finer_than(labels_affine, target_affine):
        return None
    pre_values = (list(classes.get("precentral_L", [])) + list(classes.get("precentral_R", []))
                  + list(classes.get("precentral_unsided", [])))
    pre = np.isin(labels, pre_values)
    if not pre.any():
        return None
    target_shape = tuple(int(n) for n in target_shape[:3])
    voxel_mm = tuple(float(v) for v in voxel_size_from_affine(labels_affine))
    # Work in a box around the precentral cortex: wide enough for the depth's distances
    # (12 mm) and for whole map voxels of the neighbourhood, so a fine 1 mm head's label
    # image is never held at full size in int64.
    reach = 12.0 + (NEIGHBOURHOOD_VOXELS + 2) * float(max(voxel_size_from_affine(
        target_affine)))
    margin = int(np.ceil(reach / min(voxel_mm)))
    box = tuple(slice(max(int(i.min()) - margin, 0), int(i.max()) + margin + 1)
                for i in np.nonzero(pre))
    labels, pre = labels[box], pre[box]
    shift = np.eye(4)
    shift[:3, 3] = [b.start for b in box]
    labels_affine = labels_affine @ shift
    where = _target_index(labels.shape, labels_affine, target_shape, target_affine)
    n_target = int(np.prod(target_shape))
    inside = where >= 0
    touched = np.bincount(where[inside & pre.ravel()], minlength=n_target) > 0
    voxels = ndimage.binary_dilation(touched.reshape(target_shape),
                                     iterations=NEIGHBOURHOOD_VOXELS)
    if not voxels.any():
        return None
    cortex_values = set(classes.get("cortex", [])) | set(classes.get("postcentral", []))
    cortex_values |= set(pre_values)
    cortex = np.isin(labels, sorted(cortex_values))
    wm = np.isin(labels, list(classes.get("wm", []))) & ~cortex
    # Depth on the label grid (the box reaches 12 mm past the cortex, as the phantom's).
    deep = pre & (cortical_depth(cortex, wm, voxel_mm) < DEEP_DEPTH_THRESHOLD)

    region = np.zeros(labels.shape, np.int32)
    names = [DEEP, SUPERFICIAL, WHITE_MATTER, "cortex"]
    region[deep] = 0
    region[pre & ~deep] = 1
    region[wm] = 2
    region[cortex & ~pre] = 3
    rest = ~(pre | wm | cortex)
    others = np.unique(labels[rest])
    names += [f"label_{int(v)}" for v in others]
    if others.size:
        lookup = np.searchsorted(others, labels[rest])
        region[rest] = 4 + lookup
    # Map voxels of the neighbourhood get a compact index; count source voxels per region.
    compact = np.full(n_target, -1, np.int64)
    compact[np.flatnonzero(voxels)] = np.arange(int(voxels.sum()))
    pick = inside.copy()
    pick[inside] = compact[where[inside]] >= 0
    rows = compact[where[pick]]
    counts = np.bincount(rows * len(names) + region.ravel()[pick],
                         minlength=int(voxels.sum()) * len(names)).reshape(-1, len(names))
    total = counts.sum(axis=1, keepdims=True)
    fractions = np.where(total > 0, counts / np.maximum(total, 1), 0.0).astype(np.float32)
    covered = total[:, 0] > 0
    if not covered.all():
        # Voxels the label image does not reach cannot be split; leave them out.
        keep_flat = np.flatnonzero(voxels)[covered]
        voxels = np.zeros(target_shape, bool)
        voxels.flat[keep_flat] = True
        fractions = fractions[covered]
    prov = {"Method": "geometric transfer matrix (Rousset et al. 1998) on tissue fractions "
                      "of the label image's voxels",
            "LabelVoxel_mm": [round(v, 3) for v in voxel_mm],
            "LabelVoxelsPerMapVoxel": round(float(total[covered].mean()), 2),
            "NeighbourhoodVoxels": int(voxels.sum()),
            "Regions": names}
    return PartialVolumeRegions(voxels=voxels, fractions=fractions, names=names,
                                provenance=prov)


def gtm_region_values(values: np.ndarray, regions: PartialVolumeRegions, *,
                      trim_percentile: float = 97.0) -> tuple[dict[str, float], dict[str, Any]]:
    """Region values that explain a map best around the precentral cortex (GTM).

    Solves min_x Σ_v (m_v − Σ_r f_vr x_r)² over the neighbourhood voxels with a finite
    value, after dropping those above the ``trim_percentile`` of the map there (veins).
    Regions with fewer than :data:`MIN_REGION_VOXELS` voxels' worth of fraction are pooled.

    Parameters
    ----------
    values : ndarray (X, Y, Z)
        A map on the grid of ``regions`` (χ [ppm], R2* [1/s]); NaN = invalid.
    regions : PartialVolumeRegions

    Returns
    -------
    (dict, dict)
        Region name → value (NaN for pooled or absent regions); fit diagnostics (voxels
        used, condition number of the fraction matrix).
    """
    m = np.asarray(values, np.float64)[regions.voxels]
    ok = np.isfinite(m)
    if ok.sum() >= 2 and trim_percentile < 100.0:
        ok &= m <= np.percentile(m[ok], trim_percentile)
    out = {name: float("nan") for name in regions.names}
    a = regions.fractions[ok].astype(np.float64)
    y = m[ok]
    cols = a.sum(axis=0) >= MIN_REGION_VOXELS
    design = a[:, cols]
    pooled = a[:, ~cols].sum(axis=1)
    if np.any(pooled > 0):
        design = np.column_stack([design, pooled])
    if design.shape[0] <= design.shape[1] or not cols[0]:
        return out, {"voxels": int(ok.sum()), "condition": float("nan")}
    x, *_ = np.linalg.lstsq(design, y, rcond=None)
    for k, name in enumerate(n for n, c in zip(regions.names, cols, strict=True) if c):
        out[name] = float(x[k])
    return out, {"voxels": int(ok.sum()), "condition": round(float(np.linalg.cond(design)), 1)}
