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
resolves the voxel grid (no extra blur is modelled).  A QSM chain's error is not uniform:
what background removal and the dipole inversion leave is smooth over centimetres (on the
anatomical phantom, −10 to −17 ppb over the vertex of some heads and about 0 elsewhere),
and it differs between heads, so a contrast of two uniform region values carries it into
every participant's index.  :func:`gtm_contrasts` fits the region values against the white
matter *at the same place*: the white-matter column is replaced by a low-order polynomial
in space (:data:`BASELINE_ORDER`), which the interleaving of cortex and white matter at the
millimetre scale keeps apart from the tissue columns.  Veins are not a label of a
structural segmentation, so the fit drops the voxels above the neighbourhood's 97th
percentile of the map, as the plain indices do (:data:`alsiron.motor.indices.
VEIN_PERCENTILE`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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
#: Order of the spatial polynomial standing in for the white matter in
#: :func:`gtm_contrasts` (2: ten terms, as a second-order shim; docs/qsm_anatomy.md,
#: "The chain's own transfer, and a smooth baseline": orders 0–3 on every cohort).
BASELINE_ORDER = 2
#: Length scale of the polynomial's coordinates [mm] (keeps the design well conditioned).
_BASELINE_SCALE_MM = 50.0
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
    voxel_mm : tuple of float
        Voxel size of the maps' grid [mm] (for :func:`gtm_contrasts`' coordinates).
    provenance : dict
    """

    voxels: np.ndarray
    fractions: np.ndarray
    names: list[str]
    voxel_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
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
    map_mm = tuple(float(v) for v in voxel_size_from_affine(target_affine))
    return PartialVolumeRegions(voxels=voxels, fractions=fractions, names=names,
                                voxel_mm=map_mm, provenance=prov)


def _usable(values: np.ndarray, regions: PartialVolumeRegions,
            trim_percentile: float) -> tuple[np.ndarray, np.ndarray]:
    """Map values of the neighbourhood (in ``regions.fractions``' order) and which of them
    the fit uses: finite and not above the ``trim_percentile`` (veins)."""
    m = np.asarray(values, np.float64)[regions.voxels]
    ok = np.isfinite(m)
    if ok.sum() >= 2 and trim_percentile < 100.0:
        ok &= m <= np.percentile(m[ok], trim_percentile)
    return m, ok


def _solve(a: np.ndarray, y: np.ndarray, names: list[str], extra: np.ndarray | None,
           exclude: str | None) -> tuple[dict[str, float], dict[str, Any]]:
    """Least squares of ``y`` on the fraction columns ``a`` (regions below
    :data:`MIN_REGION_VOXELS` pooled, ``exclude`` left out) plus the ``extra`` columns."""
    out = {name: float("nan") for name in names}
    cols = a.sum(axis=0) >= MIN_REGION_VOXELS
    if exclude is not None:
        # The excluded region is the reference the extra columns stand in for; it is not
        # pooled into "rest", which would bring it back as a column.
        keep = np.ones(len(names), bool)
        keep[names.index(exclude)] = False
        a, cols, names = a[:, keep], cols[keep], [n for n in names if n != exclude]
    design = a[:, cols]
    pooled = a[:, ~cols].sum(axis=1)
    if np.any(pooled > 0):
        design = np.column_stack([design, pooled])
    if extra is not None:
        design = np.column_stack([design, extra])
    if design.shape[0] <= design.shape[1] or not cols[0]:
        return out, {"voxels": int(y.size), "condition": float("nan")}
    x, *_ = np.linalg.lstsq(design, y, rcond=None)
    for k, name in enumerate(n for n, c in zip(names, cols, strict=True) if c):
        out[name] = float(x[k])
    return out, {"voxels": int(y.size), "condition": round(float(np.linalg.cond(design)), 1)}


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
    m, ok = _usable(values, regions, trim_percentile)
    return _solve(regions.fractions[ok].astype(np.float64), m[ok], regions.names,
                  None, None)


def spatial_baseline(regions: PartialVolumeRegions, order: int = BASELINE_ORDER
                     ) -> np.ndarray:
    """Polynomial of ``order`` in the neighbourhood voxels' positions, (N, terms),
    constant first; coordinates in units of 50 mm about their mean."""
    p = np.argwhere(regions.voxels).astype(np.float64) * np.asarray(regions.voxel_mm)
    p = (p - p.mean(axis=0)) / _BASELINE_SCALE_MM
    terms = [np.ones(len(p))]
    for degree in range(1, order + 1):
        for powers in _monomials(degree):
            terms.append(np.prod(p ** np.asarray(powers), axis=1))
    return np.column_stack(terms)


def _monomials(degree: int) -> list[tuple[int, int, int]]:
    """Exponents (a, b, c) of x^a y^b z^c with a + b + c = degree."""
    return [(a, b, degree - a - b) for a in range(degree, -1, -1)
            for b in range(degree - a, -1, -1)]


def gtm_contrasts(values: np.ndarray, regions: PartialVolumeRegions, *,
                  trim_percentile: float = 97.0, order: int = BASELINE_ORDER
                  ) -> tuple[dict[str, float], dict[str, Any]]:
    """Region values minus the white matter beside them, with a smooth baseline (GTM).

    Solves min Σ_v (m_v − Σ_{r≠WM} f_vr c_r − Σ_k β_k p_k(v))² over the same voxels as
    :func:`gtm_region_values`, where p_k are the terms of a polynomial of ``order`` in
    position (:func:`spatial_baseline`).  Since the fractions of a voxel add up to one,
    c_r is region r's excess over the white matter at the same place: a smooth error of
    the map (or a smooth real gradient) common to both falls into the polynomial instead.

    Parameters
    ----------
    values : ndarray (X, Y, Z)
        χ map [ppm] on the grid of ``regions``; NaN = invalid.
    regions : PartialVolumeRegions
    trim_percentile : float
        Voxels above this percentile of the map in the neighbourhood are left out (veins).
    order : int
        Polynomial order (0: a constant, which gives the contrasts of
        :func:`gtm_region_values`).

    Returns
    -------
    (dict, dict)
        Region name → value minus white matter, in the map's unit (NaN for pooled or absent
        regions; the white matter itself is 0); diagnostics as in :func:`gtm_region_values`
        plus the polynomial order.
    """
    m, ok = _usable(values, regions, trim_percentile)
    base = spatial_baseline(regions, order)[ok]
    out, diag = _solve(regions.fractions[ok].astype(np.float64), m[ok], regions.names,
                       base, WHITE_MATTER)
    out[WHITE_MATTER] = 0.0
    return out, {**diag, "baseline_order": int(order)}


#: χ added to the deep band to measure the chain's transfer [ppm] (10 ppb: the size of the
#: ALS excess; on the anatomical phantom the transfer is the same from 2 to 20 ppb).
TRANSFER_PERTURBATION_PPM = 0.01
#: Transfers outside this range are not trusted to correct anything (a chain that returns
#: less than a fifth of a change, or more than twice it, is not measuring the band).
TRANSFER_RANGE = (0.2, 2.0)


def region_fraction(regions: PartialVolumeRegions, name: str) -> np.ndarray:
    """Fraction of every map voxel in region ``name`` (float32 on the maps' grid; 0
    outside the neighbourhood)."""
    out = np.zeros(regions.voxels.shape, np.float32)
    out[regions.voxels] = regions.fractions[:, regions.names.index(name)]
    return out


def chain_transfer(chi: np.ndarray, regions: PartialVolumeRegions,
                   response: Callable[[np.ndarray], np.ndarray], *,
                   trim_percentile: float = 97.0,
                   perturbation_ppm: float = TRANSFER_PERTURBATION_PPM
                   ) -> tuple[float, dict[str, Any]]:
    """How much of a deep-band χ change the chain returns in this visit, as
    :func:`gtm_contrasts` reads it.

    Adds ``perturbation_ppm`` × the deep band's fraction map to the head
    (``response``, :func:`alsiron.qsm.transfer.chain_response`) and divides the change of
    the deep band's contrast by the perturbation.

    Parameters
    ----------
    chi : ndarray (X, Y, Z)
        The chain's χ map of the visit [ppm].
    regions : PartialVolumeRegions
    response : callable
        ``delta_chi -> chi`` of the same chain on the same visit.
    trim_percentile, perturbation_ppm : float

    Returns
    -------
    (float, dict)
        The transfer (unitless; 1 = the whole change comes back; NaN where it cannot be
        read) and a record (perturbation, transfer, condition of the fit).
    """
    before, _ = gtm_contrasts(chi, regions, trim_percentile=trim_percentile)
    after_map = np.array(response(perturbation_ppm * region_fraction(regions, DEEP)),
                         np.float64)
    # The same voxels as the first fit: trimming the second map afresh would swap voxels
    # in and out at the percentile and read that as a response.
    _, used = _usable(chi, regions, trim_percentile)
    keep = np.zeros(regions.voxels.shape, bool)
    keep[regions.voxels] = used
    after_map[~keep] = np.nan
    after, diag = gtm_contrasts(after_map, regions, trim_percentile=100.0)
    transfer = (after[DEEP] - before[DEEP]) / perturbation_ppm
    record = {"Method": "the chain rerun on the visit with the deep band's χ raised "
                        "(its dipole field added to the phase)",
              "Perturbation_ppm": perturbation_ppm,
              "Transfer": round(float(transfer), 4) if np.isfinite(transfer) else None,
              "Condition": diag["condition"]}
    if not (np.isfinite(transfer) and TRANSFER_RANGE[0] <= transfer <= TRANSFER_RANGE[1]):
        record["Rejected"] = (f"transfer outside {TRANSFER_RANGE[0]:g}–"
                              f"{TRANSFER_RANGE[1]:g}")
        return float("nan"), record
    return float(transfer), record
