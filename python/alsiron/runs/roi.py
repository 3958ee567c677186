"""The per-session motor-cortex stage: masks → indices → TSV/JSON, mask image, QC PNG.

Used by ``alsiron roi`` (on maps already in the derivatives) and at the end of
``alsiron qsm``.  Route choice: a label image given by the user; else, unless an atlas is
requested explicitly, a label image with a lookup table found in the dataset's
derivatives (:func:`alsiron.motor.labels.find_label_image`); else the bundled atlas.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alsiron.errors import OutputExistsError
from alsiron.io.atomic import save_nifti, save_text, sidecar_path
from alsiron.io.derivatives import map_path, write_dataset_description
from alsiron.motor import atlas, labels
from alsiron.motor import masks as mk
from alsiron.motor.indices import MotorCortexIndices, motor_cortex_indices, write_indices

log = logging.getLogger("alsiron")

#: ``desc`` entity of every motor-cortex output.
DESC = "motorcortex"


@dataclass
class RoiOptions:
    """Choices of the motor-cortex stage.

    Attributes
    ----------
    labels, lut : path or None
        Label image (and its lookup table) given by the user.
    atlas : {"ho", "juelich"} or None
        Force the atlas route with this atlas (None: labels found in the derivatives
        first, then Harvard-Oxford).
    t1w : path or None
        T1-weighted image the atlas route registers the template to (resampled onto the
        maps' grid); None: a same-session ``*_T1w`` in the raw data when present, else
        the GRE magnitude.
    find_t1w : bool
        Look for that same-session T1w.
    qc : bool
        Write the QC montage.
    """

    labels: Path | None = None
    lut: Path | None = None
    atlas: str | None = None
    t1w: Path | None = None
    find_t1w: bool = True
    qc: bool = True


def output_paths(out_root: Path, entities: dict[str, str]) -> dict[str, Path]:
    """Paths of the stage's outputs: indices TSV (+ JSON), mask label image (+ TSV,
    JSON) and QC PNG."""
    dseg = map_path(out_root, entities, "dseg", DESC)
    tsv = map_path(out_root, entities, "indices", DESC)
    tsv = tsv.with_name(tsv.name.replace(".nii.gz", ".tsv"))
    png = map_path(out_root, entities, "qc", DESC)
    png = png.with_name(png.name.replace(".nii.gz", ".png"))
    return {"indices": tsv, "dseg": dseg, "qc": png}


def check_outputs_free(out_root: Path, entities: dict[str, str], overwrite: bool) -> None:
    """Refuse before any work when an output exists and ``overwrite`` is off."""
    if overwrite:
        return
    paths = output_paths(out_root, entities)
    candidates = [paths["indices"], paths["indices"].with_suffix(".json"), paths["dseg"],
                  sidecar_path(paths["dseg"]), _dseg_tsv(paths["dseg"]), paths["qc"]]
    for p in candidates:
        if p.exists():
            raise OutputExistsError(f"{p}: already exists (use --overwrite to replace the "
                                    "outputs)")


def _dseg_tsv(dseg: Path) -> Path:
    return dseg.with_name(dseg.name.replace(".nii.gz", ".tsv"))


def region_masks(magnitude: np.ndarray, affine: np.ndarray, brain: np.ndarray,
                 options: RoiOptions, *, dataset_root: Path | None = None,
                 entities: dict[str, str] | None = None,
                 magnitude_name: str | None = None) -> mk.RegionMasks:
    """Masks on the maps' grid by the route that :class:`RoiOptions` selects."""
    shape = magnitude.shape[:3]
    if options.labels is not None:
        return labels.masks_from_label_file(options.labels, shape, affine, lut_path=options.lut,
                                            brain=brain)
    if options.atlas is None and dataset_root is not None and entities is not None:
        found = labels.find_label_image(dataset_root, entities)
        if found is not None:
            log.info("motor cortex: using label image %s", found[0])
            return labels.masks_from_label_file(found[0], shape, affine, lut_path=found[1],
                                                brain=brain)
    t1w = options.t1w
    if t1w is None and options.find_t1w and dataset_root is not None and entities is not None:
        t1w = atlas.find_session_t1w(dataset_root, entities)
    if t1w is not None:
        log.info("motor cortex: registering the template to %s", t1w)
        image = atlas.load_on_grid(t1w, shape, affine)
        masks = atlas.masks_from_atlas(image, affine, brain, atlas=options.atlas or "ho",
                                       subject_contrast="t1w", magnitude_name=str(t1w))
        masks.provenance["SubjectImage"] = str(t1w)
        return masks
    masks = atlas.masks_from_atlas(magnitude, affine, brain, atlas=options.atlas or "ho",
                                   magnitude_name=magnitude_name)
    masks.provenance["SubjectImage"] = magnitude_name or "GRE echo-1 magnitude"
    return masks


def mask_label_image(masks: mk.RegionMasks) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """One label image of the sub-regions: 1-12 = side × segment × depth, 13 underlying
    WM, 14 control; and its (value, name) table."""
    image = np.zeros(masks.shape, np.uint8)
    table: list[tuple[int, str]] = []
    value = 0
    for side_code, side in ((1, "L"), (2, "R")):
        for k, seg in enumerate(mk.SEGMENTS):
            for deep, band in ((False, "superficial"), (True, "deep")):
                value += 1
                sel = (masks.precentral & (masks.hemisphere == side_code)
                       & (masks.segment == k + 1) & (masks.deep == deep))
                image[sel] = value
                table.append((value, f"precentral_{side}_{seg}_{band}"))
    image[masks.underlying_wm & (image == 0)] = 13
    image[masks.control & (image == 0)] = 14
    table += [(13, "underlyingwm"), (14, "control")]
    return image, table


def write_outputs(out_root: Path, entities: dict[str, str], masks: mk.RegionMasks,
                  result: MotorCortexIndices, magnitude: np.ndarray, chi: np.ndarray | None,
                  *, qc: bool = True, overwrite: bool = False) -> list[Path]:
    """Write the indices (TSV + JSON dictionary), the sub-region label image and the QC
    montage; returns the paths."""
    from alsiron.motor import qc as qc_mod

    write_dataset_description(out_root)
    paths = output_paths(out_root, entities)
    written = write_indices(paths["indices"], result, overwrite=overwrite)
    image, table = mask_label_image(masks)
    written.append(save_nifti(paths["dseg"], image, masks.affine, sidecar={
        "Description": "precentral sub-regions (side x somatotopic segment x depth band), "
                       "underlying white matter and control cortex; names in the .tsv",
        **masks.provenance}, overwrite=overwrite))
    written.append(save_text(_dseg_tsv(paths["dseg"]), "index\tname\n" + "".join(
        f"{v}\t{n}\n" for v, n in table), overwrite=overwrite))
    if qc:
        stem = "_".join(f"{k}-{v}" for k, v in entities.items())
        lost = result.qc_notes.get("precentral_lost_to_mask", float("nan"))
        title = (f"{stem}: precentral {result.qc_notes.get('precentral_voxels', 0)} voxels, "
                 f"{lost:.1%} lost to the mask, QC {result.qc_status}")
        written.append(qc_mod.save_montage(paths["qc"], masks, magnitude, chi, title=title,
                                           overwrite=overwrite))
    return written


def run_session(out_root: Path, entities: dict[str, str], magnitude: np.ndarray,
                affine: np.ndarray, brain: np.ndarray, *, chi: np.ndarray | None,
                r2star: np.ndarray | None, options: RoiOptions | None = None,
                dataset_root: Path | None = None, magnitude_name: str | None = None,
                overwrite: bool = False) -> tuple[mk.RegionMasks, MotorCortexIndices,
                                                  list[Path]]:
    """Masks, indices and outputs of one session (nothing is written on an error).

    Parameters
    ----------
    out_root : Path
        Derivatives root.
    entities : dict
        BIDS entities of the session's series (``sub``, ``ses``, ...).
    magnitude : ndarray (X, Y, Z)
        Echo-1 magnitude.
    affine : ndarray (4, 4)
    brain : ndarray, bool
        Brain mask.
    chi, r2star : ndarray or None
        Maps [ppm], [1/s] on the same grid (NaN = invalid).
    options : RoiOptions, optional
    dataset_root : Path, optional
        Where to look for label images in the derivatives.
    """
    opts = options or RoiOptions()
    check_outputs_free(out_root, entities, overwrite)
    masks = region_masks(magnitude, affine, brain, opts, dataset_root=dataset_root,
                         entities=entities, magnitude_name=magnitude_name)
    result = motor_cortex_indices(masks, chi=chi, r2star=r2star)
    written = write_outputs(out_root, entities, masks, result, magnitude, chi, qc=opts.qc,
                            overwrite=overwrite)
    return masks, result, written
