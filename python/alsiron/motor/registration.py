"""Template-to-subject registration (dipy affine + SyN) for the atlas route of the masks.

Both images are first turned into a contrast-free *tissue index* (CSF 1, GM 2, WM 3 from
a three-class intensity model, :func:`alsiron.motor.atlas.tissue_classes`), so that a T1-weighted
template and a GRE magnitude can be matched with one metric: mutual information for the
affine stages (centre of mass → translation → rigid → affine) and local
cross-correlation for SyN.  Registration runs on a working grid of ``work_mm`` voxels
(3 mm by default); the final warp is applied to atlas images at any resolution.

A registration whose tissue-index correlation inside the subject brain stays below
``min_similarity`` is reported as not converged (:class:`RegistrationError`).
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from alsiron.errors import RegistrationError
from alsiron.grid import vox2vox, voxel_size_from_affine

log = logging.getLogger("alsiron")

#: Working voxel size of the registration, mm (3 mm: a 1 mm whole-head T1w registers in
#: about a quarter of the CPU time of 2 mm with the same mask, docs/roi.md).
WORK_MM = 3.0
#: Minimum Pearson correlation of the warped template's tissue index with the subject's
#: inside the subject brain for a registration to count as converged.
MIN_SIMILARITY = 0.5
#: Smallest working-grid extent (voxels per axis) a registration is attempted on.
MIN_WORK_VOXELS = 24
#: Largest working grid on which mutual information uses every voxel by default.
MI_DENSE_MAX_VOXELS = 300_000
#: A margin (mm) for ``RegistrationParameters.crop_margin_mm`` (cropping is off by
#: default: it changes the resolution pyramid and, on the geometric phantom, the result).
CROP_MARGIN_MM = 12.0


@dataclass
class RegistrationParameters:
    """Stages and iterations (defaults are the timed ones, docs/roi.md).

    Attributes
    ----------
    work_mm : float
        Working voxel edge, mm.
    affine_iters : tuple of int
        Iterations per resolution level (coarse → fine) of each affine stage.
    syn_iters : tuple of int
        SyN iterations per level; empty = affine only.
    cc_radius : int
        Window radius (voxels) of the SyN cross-correlation metric.
    mi_bins : int
        Histogram bins of the mutual-information metric.
    mi_sampling : float or None
        Fraction of voxels sampled by the mutual-information metric; None = all voxels
        on working grids up to :data:`MI_DENSE_MAX_VOXELS`, 25 % above (dipy's regular
        sampling with a fixed jitter, so runs are reproducible).
    affine_stages : tuple of str
        Stages after the centre-of-mass alignment, from "translation", "rigid",
        "affine".
    min_similarity : float
        Correlation below which the result is rejected.
    crop_margin_mm : float or None
        Both images are cropped to their brain's bounding box plus this margin (mm)
        before registration (:func:`crop_to_support`); None (default) = no cropping.
    """

    work_mm: float = WORK_MM
    affine_iters: tuple[int, ...] = (100, 50, 20)
    syn_iters: tuple[int, ...] = (30, 30, 30)
    cc_radius: int = 4
    mi_bins: int = 32
    mi_sampling: float | None = None
    affine_stages: tuple[str, ...] = ("rigid", "affine")
    min_similarity: float = MIN_SIMILARITY
    crop_margin_mm: float | None = None


@dataclass
class TemplateRegistration:
    """Result of :func:`register_template`: maps template-space images onto the subject.

    Attributes
    ----------
    affine_map : dipy AffineMap
    diffeo_map : dipy DiffeomorphicMap or None
    static_shape, static_affine
        Working grid of the subject.
    similarity_affine, similarity_final : float
        Tissue-index correlation after the affine stages and at the end.
    provenance : dict
    """

    affine_map: Any
    diffeo_map: Any
    static_shape: tuple[int, int, int]
    static_affine: np.ndarray
    similarity_affine: float
    similarity_final: float
    provenance: dict[str, Any] = field(default_factory=dict)

    def warp(self, image: np.ndarray, image_affine: np.ndarray, out_shape: tuple[int, ...],
             out_affine: np.ndarray, *, nearest: bool = False) -> np.ndarray:
        """Warp a template-space image onto a subject grid.

        Parameters
        ----------
        image : ndarray (X', Y', Z')
            In template space on its own grid.
        image_affine : ndarray (4, 4)
        out_shape, out_affine
            Subject grid (any resolution).
        nearest : bool
            Nearest-neighbour instead of trilinear interpolation.
        """
        interp = "nearest" if nearest else "linear"
        data = np.asarray(image, np.float64)
        if self.diffeo_map is not None:
            out = self.diffeo_map.transform(
                data, interpolation=interp, image_world2grid=np.linalg.inv(image_affine),
                out_shape=tuple(int(s) for s in out_shape[:3]), out_grid2world=out_affine)
        else:
            out = self.affine_map.transform(
                data, interpolation=interp, image_grid2world=image_affine,
                sampling_grid_shape=tuple(int(s) for s in out_shape[:3]),
                sampling_grid2world=out_affine)
        return np.asarray(out, np.float32)


def work_grid(shape: tuple[int, ...], affine: np.ndarray, work_mm: float
              ) -> tuple[tuple[int, int, int], np.ndarray]:
    """A coarser grid covering the same field of view with voxels of about ``work_mm``.

    Returns the grid itself when its voxels are already at least that large.
    """
    vox = np.asarray(voxel_size_from_affine(affine))
    factor = np.maximum(1.0, np.floor(work_mm / vox + 1e-6))
    if np.all(factor == 1.0):
        return tuple(int(s) for s in shape[:3]), np.asarray(affine, float)
    new_shape = tuple(int(np.ceil(s / f)) for s, f in zip(shape[:3], factor, strict=True))
    scale = np.diag([*factor, 1.0])
    # Voxel (0,0,0) of the coarse grid sits at the centre of the first f³ block.
    shift = np.eye(4)
    shift[:3, 3] = (factor - 1.0) / 2.0
    return new_shape, np.asarray(affine, float) @ shift @ scale


def to_work_grid(image: np.ndarray, affine: np.ndarray, work_mm: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Block-smoothed and resampled copy of ``image`` on :func:`work_grid`."""
    shape, w_affine = work_grid(image.shape, affine, work_mm)
    if shape == tuple(image.shape[:3]) and np.allclose(w_affine, affine):
        return np.asarray(image, np.float32), w_affine
    vox = np.asarray(voxel_size_from_affine(affine))
    sigma = np.maximum(0.0, (work_mm / vox - 1.0) / 2.0)
    smooth = ndimage.gaussian_filter(np.asarray(image, np.float32), sigma)
    m = vox2vox(affine, w_affine)
    out = ndimage.affine_transform(smooth, m[:3, :3], offset=m[:3, 3], output_shape=shape,
                                   order=1, mode="constant", cval=0.0)
    return out.astype(np.float32), w_affine


def crop_to_support(image: np.ndarray, affine: np.ndarray, margin_mm: float | None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Crop ``image`` to the bounding box of its non-zero voxels plus ``margin_mm``.

    Returns the cropped array (a view) and its voxel-to-world affine (mm); the image
    itself when it has no non-zero voxel or ``margin_mm`` is None.  A whole-head scan
    with neck and face is mostly background that registration would otherwise pay for.
    """
    nz = np.nonzero(np.asarray(image) != 0) if margin_mm is not None else (np.empty(0),)
    if nz[0].size == 0 or margin_mm is None:
        return image, np.asarray(affine, float)
    vox = np.asarray(voxel_size_from_affine(affine))
    pad = np.ceil(margin_mm / vox).astype(int)
    lo = [max(0, int(a.min()) - q) for a, q in zip(nz, pad, strict=True)]
    hi = [min(n, int(a.max()) + 1 + q) for a, n, q in zip(nz, image.shape[:3], pad, strict=True)]
    shift = np.eye(4)
    shift[:3, 3] = lo
    return (image[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]],
            np.asarray(affine, float) @ shift)


def _correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    x = a[mask].astype(np.float64)
    y = b[mask].astype(np.float64)
    if x.size < 10 or x.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def register_template(template_tissue: np.ndarray, template_affine: np.ndarray,
                      subject_tissue: np.ndarray, subject_affine: np.ndarray, *,
                      params: RegistrationParameters | None = None,
                      subject_name: str | None = None) -> TemplateRegistration:
    """Register a template to a subject (template = moving, subject = static).

    Parameters
    ----------
    template_tissue, subject_tissue : ndarray (X, Y, Z)
        Tissue-index images (0 outside the brain, CSF 1, GM 2, WM 3) of each side.
    template_affine, subject_affine : ndarray (4, 4)
        Their voxel-to-world transforms (mm).
    params : RegistrationParameters, optional
    subject_name : str, optional
        Named in the error message (e.g. the magnitude file).

    Returns
    -------
    TemplateRegistration

    Raises
    ------
    RegistrationError
        Correlation after registration below ``params.min_similarity``.
    """
    from dipy.align.imaffine import (
        AffineRegistration,
        MutualInformationMetric,
        transform_centers_of_mass,
    )
    from dipy.align.imwarp import SymmetricDiffeomorphicRegistration
    from dipy.align.metrics import CCMetric
    from dipy.align.transforms import (
        AffineTransform3D,
        RigidTransform3D,
        TranslationTransform3D,
    )

    p = params or RegistrationParameters()
    t_start = time.perf_counter()
    static, s_aff = to_work_grid(*crop_to_support(subject_tissue, subject_affine,
                                                  p.crop_margin_mm), p.work_mm)
    moving, m_aff = to_work_grid(*crop_to_support(template_tissue, template_affine,
                                                  p.crop_margin_mm), p.work_mm)
    if not np.any(static > 0) or not np.any(moving > 0):
        raise RegistrationError(subject_name, "registration impossible: empty brain in the "
                                "subject or the template")
    static_brain = static > 0.5
    levels = len(p.affine_iters)
    factors = [int(2 ** (levels - 1 - k)) for k in range(levels)]
    sigmas = [float(f - 1) for f in factors]
    sampling = p.mi_sampling
    if sampling is None and static.size > MI_DENSE_MAX_VOXELS:
        sampling = 0.25
    reg = AffineRegistration(metric=MutualInformationMetric(nbins=p.mi_bins,
                                                           sampling_proportion=sampling),
                             level_iters=list(p.affine_iters), sigmas=sigmas,
                             factors=factors, verbosity=0)
    with warnings.catch_warnings():
        # dipy warns on optimiser details (e.g. maximum iterations reached); the
        # similarity check below is the verdict that matters.
        warnings.simplefilter("ignore")
        com = transform_centers_of_mass(static, s_aff, moving, m_aff)
        current = com
        stages = {"translation": TranslationTransform3D, "rigid": RigidTransform3D,
                  "affine": AffineTransform3D}
        for stage in p.affine_stages:
            transform = stages[stage]()
            current = reg.optimize(static, moving, transform, None, static_grid2world=s_aff,
                                   moving_grid2world=m_aff,
                                   starting_affine=current.affine)
        affine_map = current
        warped = affine_map.transform(moving)
        sim_affine = _correlation(warped, static, static_brain)
        t_affine = time.perf_counter() - t_start
        diffeo = None
        sim_final = sim_affine
        if p.syn_iters:
            syn = SymmetricDiffeomorphicRegistration(CCMetric(3, sigma_diff=2.0,
                                                              radius=p.cc_radius),
                                                     level_iters=list(p.syn_iters))
            diffeo = syn.optimize(static, moving, static_grid2world=s_aff,
                                  moving_grid2world=m_aff, prealign=affine_map.affine)
            sim_syn = _correlation(diffeo.transform(moving), static, static_brain)
            # Keep SyN only when it improves the match (cross-contrast SyN can hurt).
            if sim_syn >= sim_affine:
                sim_final = sim_syn
            else:
                diffeo = None
    elapsed = time.perf_counter() - t_start
    log.info("registration: correlation %.3f after affine, %.3f final, %.1f s",
             sim_affine, sim_final, elapsed)
    if not np.isfinite(sim_final) or sim_final < p.min_similarity:
        raise RegistrationError(
            subject_name, f"template registration did not converge (tissue correlation "
            f"{sim_final:.2f} < {p.min_similarity}); check the magnitude and brain mask, "
            "or give a label image with --labels")
    prov = {"Library": "dipy", "Metric": f"mutual information ({p.mi_bins} bins) for "
            "translation/rigid/affine, local cross-correlation (radius "
            f"{p.cc_radius}) for SyN", "Images": "tissue index (CSF 1, GM 2, WM 3) of a "
            "3-class k-means intensity model", "WorkingVoxel_mm": p.work_mm,
            "WorkingGrid": list(static.shape), "MISampling": sampling or 1.0,
            "AffineIterations": list(p.affine_iters), "SyNIterations": list(p.syn_iters),
            "SyNUsed": diffeo is not None, "CorrelationAfterAffine": round(sim_affine, 4),
            "CorrelationFinal": round(sim_final, 4), "AffineSeconds": round(t_affine, 1),
            "TotalSeconds": round(elapsed, 1)}
    return TemplateRegistration(affine_map=affine_map, diffeo_map=diffeo,
                                static_shape=static.shape, static_affine=s_aff,
                                similarity_affine=sim_affine, similarity_final=sim_final,
                                provenance=prov)
