"""Defacing: a face mask for a head image from the bundled MNI152 template registered to
it (affine), for ``alsiron import --deface``.

The face is defined in template (MNI) coordinates as what lies in front of and below the
brain — ``y > FACE_Y_MM`` and ``z < FACE_Z_MM`` — and, whatever the registration says,
never within ``PROTECT_MM`` of the subject's own brain mask (BET on the image), so brain
and skull are untouched: QSM needs both (the skull's field is removed by background-field
removal, the brain mask must be the same before and after).
"""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
from scipy import ndimage

from alsiron.errors import InputError, RegistrationError
from alsiron.grid import voxel_size_from_affine

log = logging.getLogger("alsiron")

#: MNI y [mm] in front of which the face lies (the frontal pole is at about +70 mm, the
#: eyes' centres at about +50 mm).
FACE_Y_MM = 30.0
#: MNI z [mm] below which the face lies (the orbitofrontal cortex ends at about -25 mm).
FACE_Z_MM = -20.0
#: Distance [mm] from the subject's brain mask within which nothing is removed (skull
#: and scalp over the frontal lobes are 10-15 mm thick).
PROTECT_MM = 15.0
#: Tissue-index correlation an affine-only registration must reach (below the atlas
#: route's 0.5, which assumes a nonlinear stage: the face needs gross alignment only,
#: and the brain is protected by the subject's own mask whatever the registration says).
MIN_SIMILARITY = 0.2
#: Working voxel edge of the registration [mm]: coarser than the atlas route's 3 mm, the
#: face needs no finer alignment.
WORK_MM = 4.0


def face_mask(image: np.ndarray, affine: np.ndarray, *, contrast: str = "gre",
              brain: np.ndarray | None = None, name: str | None = None) -> np.ndarray:
    """Voxels of the face of a head image (True = remove).

    Parameters
    ----------
    image : ndarray (X, Y, Z)
        Magnitude (GRE echo 1) or T1-weighted image of a whole head.
    affine : ndarray (4, 4)
        Voxel-to-world transform [mm].
    contrast : {"gre", "t1w"}
        Tissue intensity order (:func:`alsiron.motor.atlas.tissue_classes`).
    brain : ndarray, bool, optional
        Subject brain mask; default BET on ``image``.
    name : str, optional
        File named in error messages.

    Returns
    -------
    ndarray, bool
        The face; empty when the field of view holds none.

    Raises
    ------
    RegistrationError
        The template does not register to the image (too small a field of view, not a
        head).
    """
    from alsiron.field.brain_mask import bet
    from alsiron.motor.atlas import TEMPLATE_FILE, atlas_data_dir, tissue_classes
    from alsiron.motor.registration import (
        MIN_WORK_VOXELS,
        RegistrationParameters,
        register_template,
        work_grid,
    )

    image = np.nan_to_num(np.asarray(image, np.float32))
    vsz = voxel_size_from_affine(affine)
    work_shape, _ = work_grid(image.shape, affine, WORK_MM)
    if min(work_shape) < MIN_WORK_VOXELS:
        raise RegistrationError(name, f"field of view too small to register the template "
                                f"({min(work_shape)} voxels of {WORK_MM:g} mm along one "
                                f"axis, need {MIN_WORK_VOXELS})")
    if brain is None:
        brain = bet(image, vsz).mask
    brain = np.asarray(brain, bool)
    if not brain.any():
        raise InputError(name, "no brain found to deface around")
    tpl = nib.load(str(atlas_data_dir() / "templates" / TEMPLATE_FILE))
    tpl_image = np.asarray(tpl.dataobj, np.float32)
    _, tissue = tissue_classes(image, brain, contrast=contrast)
    _, tpl_tissue = tissue_classes(tpl_image, tpl_image > 0, contrast="t1w")
    params = RegistrationParameters(syn_iters=(), min_similarity=MIN_SIMILARITY,
                                    work_mm=WORK_MM)
    reg = register_template(tpl_tissue, tpl.affine, tissue, affine, params=params,
                            subject_name=name)
    # Subject voxel → subject world → template world (the affine stage maps static
    # world points into the moving image's world).
    to_tpl = np.asarray(reg.affine_map.affine, float) @ np.asarray(affine, float)
    ijk = np.indices(image.shape, dtype=np.float32).reshape(3, -1)
    world = to_tpl[:3, :3].astype(np.float32) @ ijk + to_tpl[:3, 3:4].astype(np.float32)
    y = world[1].reshape(image.shape)
    z = world[2].reshape(image.shape)
    far = ndimage.distance_transform_edt(~brain, sampling=vsz) > PROTECT_MM
    face = (y > FACE_Y_MM) & (z < FACE_Z_MM) & far
    log.info("deface: %d voxels (%.1f %% of the image)", int(face.sum()),
             100.0 * face.mean())
    return face
