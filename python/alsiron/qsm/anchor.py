"""The local-field anchor of a single-step inversion, refined by a first pass.

A single-step inversion (:func:`alsiron.qsm.inversion.invert_single_step`) pins the low
spatial frequencies of χ to a local field f_anchor, which a background-field removal
gives. Each removal errs in its own way near the brain's edge, where the cortex is
(docs/qsm_anatomy.md, "The anchor, continued"):

- PDF fits background sources to the whole mask, and a least-squares fit of outside
  sources takes up part of the field of cortex next to the edge: about 15 % of the ALS
  deep-layer excess field on the anatomical phantom;
- LBV keeps that field (it matches the background to the field on the mask's boundary
  only) but carries the boundary's local field inwards as a smooth error over the brain.

:func:`refine_anchor` combines them. A first pass with the PDF anchor gives χ₁; the
field of χ₁ inside the brain, D(χ₁·brain), is the best estimate of the local field at the
mask's boundary, so LBV run on the total field *less* that field removes the background
with boundary values that carry little local field, and the new anchor is LBV's result plus
D(χ₁·brain).

Whatever χ₁ gets wrong stays in the new anchor (LBV removes only its harmonic part), and
the final pass follows the anchor. So the first pass is regularised as strongly as the
two-step default (α 7e-4, against the final pass's 2e-5): its χ₁ carries little of the
PDF anchor's smooth error, and the final pass, with the Laplacian term, puts back the fine
structure (docs/qsm_anatomy.md, "The first pass").
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from alsiron.qsm import bfr
from alsiron.qsm import inversion as inv
from alsiron.qsm.dipole import forward_field

logger = logging.getLogger(__name__)

__all__ = ["brain_field", "refine_anchor"]


def brain_field(chi: np.ndarray, brain_mask: np.ndarray, *, voxel_size: Sequence[float],
                b0_dir: Sequence[float], pad_voxels: int = bfr.PDF_PAD_VOXELS) -> np.ndarray:
    """Field [ppm] of χ [ppm] inside ``brain_mask`` (0 outside it), on the zero-padded grid
    so that the periodic convolution does not wrap sources onto the opposite face.

    Returns
    -------
    ndarray, float32, shape of ``chi``
        D(χ·brain) [ppm] everywhere on the grid.
    """
    source = np.where(np.asarray(brain_mask, dtype=bool), np.asarray(chi, np.float32), 0.0)
    p = int(pad_voxels)
    padded = np.pad(source.astype(np.float32), p)
    field = forward_field(padded, voxel_size=voxel_size, b0_dir=b0_dir)
    return field[p:-p, p:-p, p:-p] if p > 0 else field


def refine_anchor(method: str, total_field: np.ndarray, brain_mask: np.ndarray,
                  local_field: np.ndarray, local_mask: np.ndarray, bfr_mask: np.ndarray, *,
                  voxel_size: Sequence[float], b0_dir: Sequence[float],
                  settings: inv.InversionSettings, lbv_tol: float = bfr.LBV_TOL,
                  lbv_max_iter: int = bfr.LBV_MAX_ITER,
                  progress: Callable[[int, int], None] | None = None
                  ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The anchor of ``method`` refined by a first pass of ``settings.sstv_refine_iter``
    iterations (module docstring).

    Parameters
    ----------
    method : str
        The single-step inversion (a key of :data:`alsiron.qsm.inversion.SINGLE_STEP_METHODS`).
    total_field : ndarray, shape (X, Y, Z)
        Total field [ppm], finite inside ``brain_mask``.
    brain_mask : ndarray of bool
        Where χ is estimated (the phase-quality brain mask).
    local_field, local_mask : ndarray
        The background removal's local field [ppm] and where it is valid: the first pass's
        anchor.
    bfr_mask : ndarray of bool
        The mask the background removal was given (the eroded brain): LBV's domain.
    voxel_size, b0_dir
        Voxel size [mm] and B0 direction in voxel-index space.
    settings : InversionSettings
        The inversion's settings; the first pass runs ``sstv_refine_iter`` ≥ 1 iterations
        with TV weight ``sstv_refine_alpha`` (``sstv_alpha`` when None).
    lbv_tol, lbv_max_iter : float, int
        LBV's CG tolerance and iteration cap.
    progress : callable, optional
        ``progress(iteration, max_iter)`` during the first pass.

    Returns
    -------
    anchor : ndarray, float32
        The refined local field [ppm], 0 outside ``anchor_mask``.
    anchor_mask : ndarray of bool
        Where it is valid (LBV's interior of ``bfr_mask``).
    record : dict
        Provenance of the refinement.
    """
    n = settings.sstv_refine_iter
    if n < 1:
        raise ValueError("refine_anchor needs settings.sstv_refine_iter >= 1")
    brain = np.asarray(brain_mask, dtype=bool)
    alpha1 = (settings.sstv_alpha if settings.sstv_refine_alpha is None
              else settings.sstv_refine_alpha)
    first = dataclasses.replace(settings, sstv_max_iter=n, sstv_refine_iter=0,
                                sstv_alpha=alpha1, sstv_alpha_rule="fixed")
    chi1, record1 = inv.invert_single_step(method, total_field, brain, local_field, local_mask,
                                           voxel_size=voxel_size, b0_dir=b0_dir,
                                           settings=first, progress=progress)
    field1 = brain_field(chi1, brain, voxel_size=voxel_size, b0_dir=b0_dir)
    total = np.nan_to_num(np.asarray(total_field, dtype=np.float32))
    residual = np.where(brain, total - field1, 0.0).astype(np.float32)
    local, interior, n_lbv = bfr.lbv(residual, np.asarray(bfr_mask, dtype=bool),
                                     voxel_size=voxel_size, tol=lbv_tol, max_iter=lbv_max_iter)
    interior = interior.astype(bool)
    if not interior.any():
        raise ValueError("the refined anchor is empty: LBV's interior of the mask is empty")
    anchor = np.where(interior, local + field1, 0.0).astype(np.float32)
    logger.debug("anchor refined: first pass %d iterations, LBV %d iterations",
                 record1["IterationsRun"], n_lbv)
    record = {"Method": "first single-step pass, then LBV of the total field less the "
                        "first pass's brain field, plus that field",
              "FirstPassIterations": int(record1["IterationsRun"]),
              "FirstPassAlpha": alpha1,
              "LBVIterationsRun": int(n_lbv),
              "LBVTolerance": lbv_tol,
              "AnchorVoxels": int(interior.sum())}
    return anchor, interior, record
