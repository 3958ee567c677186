"""The per-session motor-cortex stage (masks → indices → TSV/JSON, mask image, QC PNG) and
the subject loop of ``alsiron roi``.

Used by ``alsiron roi`` (:func:`run_roi_subject`, on maps already in the derivatives) and
at the end of ``alsiron qsm`` (:func:`run_session`).  Route choice: a label image given by
the user; else, unless an atlas is requested explicitly, a label image with a lookup table
found in the dataset's derivatives (:func:`alsiron.motor.labels.find_label_image`); else
the bundled atlas.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import alsiron
from alsiron.errors import InputError
from alsiron.io import bids as ingest
from alsiron.io.atomic import save_json, save_nifti, save_text
from alsiron.io.derivatives import (
    OutputPlan,
    derivatives_root,
    map_path,
    write_dataset_description,
)
from alsiron.motor import atlas, labels
from alsiron.motor import masks as mk
from alsiron.motor.indices import MotorCortexIndices, motor_cortex_indices, write_indices
from alsiron.runs.outcome import VisitOutcome

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
    chain_transfer : bool
        Where the QSM chain runs in the same visit (``alsiron qsm``) and the masks come
        with partial-volume regions (a label image finer than the maps), rerun the chain
        once with the deep band's χ raised to measure its transfer (the ``gtmrc`` index;
        :func:`alsiron.motor.pvc.chain_transfer`).
    """

    labels: Path | None = None
    lut: Path | None = None
    atlas: str | None = None
    t1w: Path | None = None
    find_t1w: bool = True
    qc: bool = True
    chain_transfer: bool = True


def plan_outputs(plan: OutputPlan) -> None:
    """Add the stage's outputs to a visit's plan: indices TSV (+ JSON dictionary), the
    sub-region label image (+ sidecar, + TSV table) and the QC PNG (+ JSON sidecar).

    The QC PNG is planned (and so checked) even when ``RoiOptions.qc`` is off, as it
    always was.
    """
    plan.add_file("indices", DESC, ".tsv", extra=(".json",))
    plan.add_map("dseg", DESC, extra=(".tsv",))
    plan.add_file("qc", DESC, ".png", extra=(".json",))


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


def write_outputs(plan: OutputPlan, masks: mk.RegionMasks, result: MotorCortexIndices,
                  magnitude: np.ndarray, chi: np.ndarray | None, *, qc: bool = True,
                  overwrite: bool = False,
                  provenance: dict[str, Any] | None = None) -> list[Path]:
    """Write the indices (TSV + JSON dictionary, with ``provenance``: input ``Sources``
    and ``InputChecksums``), the sub-region label image and the QC montage to their paths
    in ``plan`` (see :func:`plan_outputs`); returns the paths."""
    from alsiron.motor import qc as qc_mod

    write_dataset_description(plan.root)
    written = write_indices(plan.path("indices", DESC), result, overwrite=overwrite,
                            provenance=provenance)
    image, table = mask_label_image(masks)
    dseg = plan.path("dseg", DESC)
    written.append(save_nifti(dseg, image, masks.affine, sidecar={
        "Description": "precentral sub-regions (side x somatotopic segment x depth band), "
                       "underlying white matter and control cortex; names in the .tsv",
        "Software": {"Name": "alsiron", "Version": alsiron.__version__},
        **masks.provenance}, overwrite=overwrite))
    written.append(save_text(_dseg_tsv(dseg), "index\tname\n" + "".join(
        f"{v}\t{n}\n" for v, n in table), overwrite=overwrite))
    if qc:
        stem = "_".join(f"{k}-{v}" for k, v in plan.entities.items())
        lost = result.qc_notes.get("precentral_lost_to_mask", float("nan"))
        title = (f"{stem}: precentral {result.qc_notes.get('precentral_voxels', 0)} voxels, "
                 f"{lost:.1%} lost to the mask, QC {result.qc_status}")
        png = plan.path("qc", DESC)
        written.append(qc_mod.save_montage(png, masks, magnitude, chi,
                                           title=title, overwrite=overwrite))
        written.append(save_json(png.with_suffix(".json"), {
            "Description": "QC montage: echo-1 magnitude and chi (axial, coronal, sagittal) "
                           "with the precentral sub-region masks drawn over them",
            "Title": title, "QCStatus": result.qc_status,
            "Software": {"Name": "alsiron", "Version": alsiron.__version__},
            "Sources": [plan.path("dseg", DESC).name]
                       + ([map_path(plan.root, plan.entities, "Chimap").name]
                          if chi is not None else [])}, overwrite=overwrite))
    return written


def run_session(plan: OutputPlan, magnitude: np.ndarray, affine: np.ndarray,
                brain: np.ndarray, *, chi: np.ndarray | None, r2star: np.ndarray | None,
                options: RoiOptions | None = None, dataset_root: Path | None = None,
                magnitude_name: str | None = None, overwrite: bool = False,
                provenance: dict[str, Any] | None = None,
                chain_response: Callable[[np.ndarray], np.ndarray] | None = None
                ) -> tuple[mk.RegionMasks, MotorCortexIndices, list[Path]]:
    """Masks, indices and outputs of one session (nothing is written on an error).

    The caller has checked ``plan`` before any work (in a run, ``plan`` is the staged
    plan of a :class:`~alsiron.io.transaction.VisitTransaction`).

    Parameters
    ----------
    plan : OutputPlan
        The visit's plan, holding the stage's outputs (:func:`plan_outputs`).
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
    provenance : dict, optional
        ``Sources`` and ``InputChecksums`` of the inputs, for the indices' dictionary.
    chain_response : callable, optional
        The QSM chain rerun on the visit with a χ change added
        (:func:`alsiron.qsm.transfer.chain_response`), for the ``gtmrc`` index where the
        masks come with partial-volume regions.
    """
    opts = options or RoiOptions()
    masks = region_masks(magnitude, affine, brain, opts, dataset_root=dataset_root,
                         entities=plan.entities, magnitude_name=magnitude_name)
    result = motor_cortex_indices(masks, chi=chi, r2star=r2star,
                                  chain_response=chain_response)
    written = write_outputs(plan, masks, result, magnitude, chi, qc=opts.qc,
                            overwrite=overwrite, provenance=provenance)
    return masks, result, written


@dataclass(kw_only=True)
class RoiOutcome(VisitOutcome):
    """What ``alsiron roi`` produced for one MEGRE series of one visit: the fields of
    :class:`~alsiron.runs.outcome.VisitOutcome` (``out_root``: the derivatives folder
    read from and written to; ``seconds``: wall time of masks, indices and writing) and

    Attributes
    ----------
    indices : MotorCortexIndices
    """

    indices: MotorCortexIndices


def _load_map(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    import nibabel as nib

    from alsiron.io.bids import check_image_header

    if not path.is_file():
        return None
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(path, f"cannot read image ({exc})") from None
    check_image_header(path, img)
    try:
        return np.asarray(img.get_fdata(dtype=np.float32)), np.asarray(img.affine, float)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(path, f"cannot read image ({exc})") from None


@dataclass
class _SessionMaps:
    magnitude: np.ndarray
    affine: np.ndarray
    brain: np.ndarray
    chi: np.ndarray | None
    r2star: np.ndarray | None


def _load_session_maps(out_root: Path, entities: dict[str, str],
                       mag_path: Path) -> _SessionMaps:
    """The maps of ``alsiron qsm`` (χ and/or R2*, brain mask) and the echo-1 magnitude,
    checked to share one grid; without a stored brain mask, one from the magnitude."""
    import nibabel as nib

    from alsiron.field import brain_mask as bm

    chi = _load_map(map_path(out_root, entities, "Chimap"))
    r2s = _load_map(map_path(out_root, entities, "R2starmap"))
    if chi is None and r2s is None:
        raise InputError(map_path(out_root, entities, "Chimap"),
                         "no Chimap or R2starmap found: run `alsiron qsm` first")
    try:
        mag_img = nib.load(str(mag_path))
        magnitude = np.asarray(mag_img.get_fdata(dtype=np.float32))
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(mag_path, f"cannot read magnitude ({exc})") from None
    magnitude = magnitude.reshape(magnitude.shape[:3])
    affine = np.asarray(mag_img.affine, float)
    for name, loaded in (("Chimap", chi), ("R2starmap", r2s)):
        if loaded is not None and (loaded[0].shape != magnitude.shape
                                   or not np.allclose(loaded[1], affine, atol=1e-3)):
            raise InputError(map_path(out_root, entities, name),
                             "not on the grid of the echo-1 magnitude")
    brain_loaded = _load_map(map_path(out_root, entities, "mask", "brain"))
    # Without the mask of `alsiron qsm`, the threshold mask it has always used here (not the
    # package default, BET): changing it changes the ROI outputs (issue 12 closing note).
    brain = (brain_loaded[0] > 0 if brain_loaded is not None
             else bm.brain_mask(magnitude, method="otsu"))
    return _SessionMaps(magnitude, affine, brain, None if chi is None else chi[0],
                        None if r2s is None else r2s[0])


def run_roi_subject(subj_dir: str | Path, options: RoiOptions | None = None, *,
                    out: str | Path | None = None,
                    overwrite: bool = False) -> Iterator[RoiOutcome]:
    """Masks and indices for every MEGRE series of every session of a subject, from the
    maps that ``alsiron qsm`` left in the derivatives.

    Parameters
    ----------
    subj_dir : path
        BIDS ``sub-XX/`` or ``sub-XX/ses-YY/`` folder.
    options : RoiOptions, optional
    out : path, optional
        Derivatives folder holding the maps and receiving the outputs (default
        ``<dataset>/derivatives/alsiron``).
    overwrite : bool
        Replace existing outputs.

    Yields
    ------
    RoiOutcome
        As each series finishes (its files are on disk).

    Raises
    ------
    InputError, OutputExistsError
        Missing or unreadable maps, maps off the magnitude's grid, or outputs that exist
        without ``overwrite``: raised before any file of that series is written.
    """
    from alsiron.cohort.registry import input_checksums
    from alsiron.io.derivatives import input_provenance
    from alsiron.io.transaction import VisitTransaction, check_disk_space

    opts = options or RoiOptions()
    sessions = ingest.find_sessions(subj_dir)
    root = ingest.dataset_root(subj_dir)
    out_root = derivatives_root(root, out)
    for ses in sessions:
        for files in ses.series:
            plan = OutputPlan(out_root, dict(files.entities))
            plan_outputs(plan)
            # Indices replaced: z-scores computed from the old ones go with them.
            every = OutputPlan(out_root, dict(files.entities))
            plan_outputs(every)
            every.add_file("zscores", DESC, ".json")
            with VisitTransaction.begin(plan, replaces=every, overwrite=overwrite) as txn:
                mag_path = files.echoes[0].magnitude
                maps = _load_session_maps(out_root, plan.entities, mag_path)
                check_disk_space(plan, int(maps.magnitude.size))
                inputs = [mag_path] + [p for p in (
                    map_path(out_root, plan.entities, "Chimap"),
                    map_path(out_root, plan.entities, "R2starmap"),
                    map_path(out_root, plan.entities, "mask", "brain")) if p.is_file()]
                t0 = time.perf_counter()
                _, indices, written = run_session(
                    txn.staged, maps.magnitude, maps.affine, maps.brain, chi=maps.chi,
                    r2star=maps.r2star, options=opts, dataset_root=root,
                    magnitude_name=str(mag_path), overwrite=True,
                    provenance=input_provenance([str(p) for p in inputs], root,
                                                input_checksums(inputs, root)))
                txn.commit()
            yield RoiOutcome(label=files.prefix, out_root=out_root, indices=indices,
                             written=txn.final_paths(written),
                             seconds=time.perf_counter() - t0)
