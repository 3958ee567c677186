"""QC montages of the precentral masks over the magnitude and the χ map.

One PNG per session: two rows (echo-1 magnitude, χ) × three columns (axial slice through
the top quarter of the gyrus, coronal and sagittal slices through it).  Deep precentral
voxels are drawn in orange, superficial ones in yellow, precentral voxels *without a
valid χ* (lost to the brain/QSM mask) in red, and the edge of the valid-χ region in cyan,
so the picture shows whether the mask reaches the top of the gyrus.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from alsiron.grid import voxel_size_from_affine
from alsiron.io.atomic import atomic_path
from alsiron.motor.masks import RegionMasks

_DEEP = (1.0, 0.55, 0.0, 0.75)
_SUPERFICIAL = (1.0, 0.95, 0.2, 0.65)
_LOST = (0.9, 0.0, 0.0, 0.9)


def montage_slices(masks: RegionMasks) -> tuple[int, int, int]:
    """Voxel indices (i, j, k) of the sagittal, coronal and axial slices: through the
    left-hemisphere gyrus centre (i), the gyrus centre (j) and its top quarter (k)."""
    pre = np.argwhere(masks.precentral)
    if pre.size == 0:
        return tuple(s // 2 for s in masks.shape)  # type: ignore[return-value]
    left = np.argwhere(masks.hemisphere == 1)
    i = int(np.round(np.median((left if left.size else pre)[:, 0])))
    j = int(np.round(np.median(pre[:, 1])))
    k = int(np.round(np.percentile(pre[:, 2], 80.0)))
    return i, j, k


def _overlay(masks: RegionMasks, valid: np.ndarray) -> np.ndarray:
    rgba = np.zeros((*masks.shape, 4), np.float32)
    sup = masks.precentral & ~masks.deep
    rgba[sup] = _SUPERFICIAL
    rgba[masks.deep] = _DEEP
    rgba[masks.precentral & ~valid] = _LOST
    return rgba


def _slice(vol: np.ndarray, axis: int, index: int) -> np.ndarray:
    sl = [slice(None)] * 3
    sl[axis] = int(np.clip(index, 0, vol.shape[axis] - 1))
    plane = vol[tuple(sl)]
    # Horizontal = first remaining axis, vertical = second (origin lower).
    return np.swapaxes(plane, 0, 1)


def save_montage(path: str | Path, masks: RegionMasks, magnitude: np.ndarray,
                 chi: np.ndarray | None, *, title: str = "", overwrite: bool = False,
                 chi_range_ppm: float = 0.1) -> Path:
    """Write the QC montage PNG (atomically).

    Parameters
    ----------
    path : path ending in .png
    masks : RegionMasks
    magnitude : ndarray (X, Y, Z)
        Echo-1 magnitude on the masks' grid.
    chi : ndarray (X, Y, Z) or None
        χ [ppm], NaN outside the QSM mask; None draws the magnitude row only.
    title : str
        Figure title (subject, session, lost fraction).
    chi_range_ppm : float
        χ display window ±, ppm.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    valid = np.isfinite(chi) if chi is not None else np.ones(masks.shape, bool)
    overlay = _overlay(masks, valid)
    i, j, k = montage_slices(masks)
    vox = voxel_size_from_affine(masks.affine)
    views = [("axial", 2, k), ("coronal", 1, j), ("sagittal", 0, i)]
    rows = [("magnitude", np.asarray(magnitude, np.float32), "gray", None)]
    if chi is not None:
        rows.append(("chi [ppm]", np.asarray(chi, np.float32), "gray",
                     (-chi_range_ppm, chi_range_ppm)))
    fig, axes = plt.subplots(len(rows), 3, figsize=(10.5, 3.6 * len(rows)), squeeze=False)
    for r, (label, vol, cmap, window) in enumerate(rows):
        finite = vol[np.isfinite(vol)]
        vmin, vmax = window if window else (0.0, float(np.percentile(finite, 99.5))
                                            if finite.size else 1.0)
        for c, (name, axis, index) in enumerate(views):
            ax = axes[r][c]
            rest = [a for a in range(3) if a != axis]
            aspect = vox[rest[1]] / vox[rest[0]]
            ax.imshow(_slice(np.nan_to_num(vol, nan=vmin), axis, index), cmap=cmap,
                      vmin=vmin, vmax=vmax, origin="lower", aspect=aspect,
                      interpolation="nearest")
            ax.imshow(_slice(overlay, axis, index), origin="lower", aspect=aspect,
                      interpolation="nearest")
            edge = _slice(valid.astype(np.float32), axis, index)
            if 0 < edge.sum() < edge.size:
                ax.contour(edge, levels=[0.5], colors="cyan", linewidths=0.6)
            ax.set_title(f"{label}: {name} {'ijk'[axis]}={index}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title + "\norange deep, yellow superficial, red: precentral voxel without "
                 "valid chi, cyan: edge of the valid-chi mask", fontsize=9)
    fig.tight_layout()
    final = Path(path)
    with atomic_path(final, overwrite=overwrite) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return final
