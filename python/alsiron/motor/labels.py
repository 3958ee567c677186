"""The label route to the precentral masks: lookup tables (reading and classifying
label names), label-image discovery and loading, and label image → :class:`RegionMasks`
on the map grid.

Coordinates are RAS+ millimetres (NIfTI world); arrays are (X, Y, Z) on their grid.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import nibabel as nib
import numpy as np

from alsiron.errors import InputError
from alsiron.grid import resample_to_grid, same_grid
from alsiron.motor.masks import HEMI_LEFT, HEMI_RIGHT, RegionMasks, build_region_masks
from alsiron.motor.pvc import MIN_LABEL_VOXELS_PER_MAP_VOXEL, partial_volume_regions


def read_lut(path: str | Path) -> dict[int, str]:
    """Read a label lookup table: BIDS ``dseg.tsv`` (``index``/``name`` columns), a CSV
    with the same columns, or a FreeSurfer ``*ColorLUT.txt`` (``value name R G B A``).

    Raises
    ------
    InputError
        Unreadable file or no ``value name`` rows.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise InputError(path, f"cannot read lookup table ({exc.strerror})") from None
    lut: dict[int, str] = {}
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if lines and ("\t" in lines[0] or "," in lines[0]) and not lines[0].split()[0].isdigit():
        delim = "\t" if "\t" in lines[0] else ","
        reader = csv.DictReader(lines, delimiter=delim)
        cols = {c.lower(): c for c in reader.fieldnames or []}
        key = cols.get("index") or cols.get("value") or cols.get("label")
        name = cols.get("name") or cols.get("label_name")
        if key is None or name is None:
            raise InputError(path, "lookup table needs 'index' and 'name' columns")
        for row in reader:
            try:
                lut[int(float(row[key]))] = str(row[name]).strip()
            except (TypeError, ValueError):
                continue
    else:
        for ln in lines:
            parts = ln.split()
            if len(parts) >= 2 and re.fullmatch(r"-?\d+", parts[0]):
                lut[int(parts[0])] = parts[1]
    if not lut:
        raise InputError(path, "no 'value name' rows found in the lookup table")
    return lut


def freesurfer_lut(values: np.ndarray) -> dict[int, str]:
    """Names for the FreeSurfer ``aseg``/``aparc``/``a2009s`` values present in an image.

    Only what the masks need: cerebral white matter, cortex, and the precentral and
    postcentral labels (Desikan-Killiany 1024/2024, 1022/2022; Destrieux 11129/12129,
    11128/12128); other cortical parcels are named ``ctx-?h-other``.
    """
    named = {2: "Left-Cerebral-White-Matter", 41: "Right-Cerebral-White-Matter",
             3: "Left-Cerebral-Cortex", 42: "Right-Cerebral-Cortex",
             77: "WM-hypointensities", 5001: "Left-UnsegmentedWhiteMatter",
             5002: "Right-UnsegmentedWhiteMatter",
             1024: "ctx-lh-precentral", 2024: "ctx-rh-precentral",
             1022: "ctx-lh-postcentral", 2022: "ctx-rh-postcentral",
             11129: "ctx_lh_G_precentral", 12129: "ctx_rh_G_precentral",
             11128: "ctx_lh_G_postcentral", 12128: "ctx_rh_G_postcentral"}
    lut: dict[int, str] = {}
    for v in (int(x) for x in np.unique(values)):
        if v in named:
            lut[v] = named[v]
        elif 1000 <= v < 2000 or 11100 <= v < 12000:
            lut[v] = "ctx-lh-other"
        elif 2000 <= v < 3000 or 12100 <= v < 13000:
            lut[v] = "ctx-rh-other"
        elif 3000 <= v < 5000 or 251 <= v <= 255:
            lut[v] = "wm-other"
    return lut


_WM = re.compile(r"white|(^|[-_ ])wm([-_ ]|$)|^wm", re.I)
_SULCUS = re.compile(r"(^|[-_ ])s_", re.I)


def classify_lut(lut: dict[int, str]) -> dict[str, list[int]]:
    """Sort label values into the classes the masks need, from their names.

    Returns
    -------
    dict
        ``precentral_L``, ``precentral_R``, ``precentral_unsided`` (precentral gyrus
        cortex; sulci such as Destrieux ``S_precentral`` excluded), ``postcentral``,
        ``cortex`` (every cortical grey-matter label incl. the above) and ``wm``.
    """
    out: dict[str, list[int]] = {k: [] for k in ("precentral_L", "precentral_R",
                                                  "precentral_unsided", "postcentral",
                                                  "cortex", "wm")}
    for value, name in lut.items():
        low = name.lower()
        if _WM.search(name):
            out["wm"].append(value)
            continue
        is_ctx = bool(re.search(r"ctx|cortex|cortical|gyrus|precentral|postcentral|(^|_)gm",
                                low))
        if "precentral" in low and not _SULCUS.search(name):
            side = _side_from_name(name)
            out[f"precentral_{side}" if side else "precentral_unsided"].append(value)
        elif "postcentral" in low and not _SULCUS.search(name):
            out["postcentral"].append(value)
        if is_ctx:
            out["cortex"].append(value)
    return out


def _side_from_name(name: str) -> str | None:
    if re.search(r"(^|[-_ ])(lh|l|left)([-_ ]|$)|^left", name, re.I):
        return "L"
    if re.search(r"(^|[-_ ])(rh|r|right)([-_ ]|$)|^right", name, re.I):
        return "R"
    return None


def _voxel_volume(path: Path) -> float:
    """Voxel volume of an image from its header [mm³] (inf when unreadable, so that a
    broken candidate is chosen last and reported when loaded)."""
    try:
        return float(np.prod(nib.load(str(path)).header.get_zooms()[:3]))
    except Exception:  # nibabel raises several types for bad files
        return float("inf")


def _dseg_pairs(folder: Path) -> list[tuple[Path, Path]]:
    """``*_dseg.nii[.gz]`` images of a folder that have their ``.tsv``, sorted by name."""
    pairs = [(img, folder / f"{img.name.split('.nii')[0]}.tsv")
             for img in sorted(folder.glob("*_dseg.nii*"))]
    return [(img, tsv) for img, tsv in pairs if tsv.is_file()]


def finer_label_image(label_image: str | Path) -> tuple[Path, Path] | None:
    """A segmentation beside ``label_image`` (``*_dseg`` with its ``.tsv`` in the same
    folder) with smaller voxels, the smallest if several: e.g. the anatomical phantom's
    ``res-fine_dseg`` beside its ``dseg`` on the maps' grid.  It gives the
    partial-volume indices (:mod:`alsiron.motor.pvc`) while the masks keep coming from
    ``label_image``.  None when there is none."""
    path = Path(label_image)
    own = _voxel_volume(path)
    sized = [(_voxel_volume(img), img, tsv) for img, tsv in _dseg_pairs(path.parent)
             if img != path]
    finer = [row for row in sized if row[0] < own]
    return min(finer, key=lambda row: row[0])[1:] if finer else None


def find_label_image(dataset_root: str | Path, entities: dict[str, str]
                     ) -> tuple[Path, Path | None] | None:
    """Find a label image for a session in the dataset's derivatives.

    Looks under ``derivatives/*/sub-X[/ses-Y]/anat`` (alsiron's own outputs skipped) for
    ``*_dseg.nii[.gz]`` with a ``*_dseg.tsv`` beside it, then for FreeSurfer-style
    ``*aparc+aseg*`` / ``*aparc.a2009s*`` images.

    Returns
    -------
    (label image, lookup table or None) or None when nothing is found.
    """
    root = Path(dataset_root) / "derivatives"
    if not root.is_dir():
        return None
    rel = Path(f"sub-{entities['sub']}")
    if "ses" in entities:
        rel = rel / f"ses-{entities['ses']}"
    for pipeline in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "alsiron"):
        folder = pipeline / rel / "anat"
        if not folder.is_dir():
            continue
        found = _dseg_pairs(folder)
        if found:
            return found[0]
        for pattern in ("*aparc+aseg*.nii*", "*aparc.a2009s*.nii*", "*aparc*.mgz"):
            for img in sorted(folder.glob(pattern)):
                return img, None
    return None



def _indicator_on_grid(labels: np.ndarray, values: list[int], source_affine: np.ndarray,
                       target_shape: tuple[int, ...], target_affine: np.ndarray) -> np.ndarray:
    """Voxels of the target grid at least half covered by ``values`` (trilinear fraction)."""
    ind = np.isin(labels, values)
    if same_grid(labels.shape, source_affine, target_shape, target_affine):
        return ind
    frac = resample_to_grid(ind.astype(np.float32), source_affine, target_shape, target_affine,
                            order=1)
    return frac >= 0.5


def load_label_image(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Load an integer label image (NIfTI or MGZ); returns (int32 array, affine).

    Raises
    ------
    InputError
        Unreadable, not 3-D, or with non-integer values.
    """
    from alsiron.io.bids import check_image_header

    path = Path(path)
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for bad files
        raise InputError(path, f"cannot read label image ({type(exc).__name__}: {exc})"
                         ) from None
    check_image_header(path, img)
    try:
        data = np.asarray(img.dataobj)
    except Exception as exc:  # nibabel raises several types for bad files
        raise InputError(path, f"cannot read label image ({type(exc).__name__}: {exc})"
                         ) from None
    data = np.squeeze(data)
    if data.ndim != 3:
        raise InputError(path, f"label image must be 3-D, got shape {data.shape}")
    if not np.issubdtype(data.dtype, np.integer):
        if not np.all(np.isfinite(data)) or np.any(data != np.round(data)):
            raise InputError(path, "label image holds non-integer values")
    return data.astype(np.int32), np.asarray(img.affine, float)


def masks_from_labels(labels: np.ndarray, labels_affine: np.ndarray, lut: dict[int, str],
                      target_shape: tuple[int, ...], target_affine: np.ndarray, *,
                      brain: np.ndarray | None = None, labels_path: str | Path | None = None,
                      lut_path: str | Path | None = None,
                      fine: tuple[np.ndarray, np.ndarray, dict[int, str]] | None = None,
                      fine_path: str | Path | None = None) -> RegionMasks:
    """Precentral masks from a label image and its lookup table, on the map grid.

    Parameters
    ----------
    labels : ndarray, int (X', Y', Z')
        Label image on its own grid.
    labels_affine : ndarray (4, 4)
    lut : dict int → str
        Label names (:func:`read_lut` or :func:`freesurfer_lut`).
    target_shape, target_affine
        Grid of the χ / R2* maps.
    brain : ndarray, bool, optional
        Brain mask on the target grid (centre of the segment geometry).
    labels_path, lut_path : path, optional
        For messages and provenance.
    fine : (labels, affine, lut), optional
        A finer segmentation of the same head for the partial-volume fractions
        (:mod:`alsiron.motor.pvc`); default: ``labels`` itself, which gives them only when
        it is finer than the maps.
    fine_path : path, optional
        Its file, for provenance.

    Raises
    ------
    InputError
        No precentral label in the table, or the label image does not overlap the grid.
    """
    classes = classify_lut(lut)
    pre_values = classes["precentral_L"] + classes["precentral_R"] + classes["precentral_unsided"]
    if not pre_values:
        raise InputError(lut_path or labels_path,
                         "lookup table names no precentral label (expected a name containing "
                         "'precentral', e.g. ctx-lh-precentral)")
    if not np.isin(labels, pre_values).any():
        raise InputError(labels_path, f"no voxel carries a precentral label {pre_values}")

    def on_grid(values: list[int]) -> np.ndarray:
        if not values:
            return np.zeros(tuple(target_shape[:3]), bool)
        return _indicator_on_grid(labels, values, labels_affine, target_shape, target_affine)

    left = on_grid(classes["precentral_L"])
    right = on_grid(classes["precentral_R"]) & ~left
    unsided = on_grid(classes["precentral_unsided"]) & ~left & ~right
    precentral = left | right | unsided
    if not precentral.any():
        raise InputError(labels_path, "label image does not overlap the maps' grid (no "
                         "precentral voxel after resampling through the affines)")
    hemisphere = np.zeros(precentral.shape, np.uint8)
    hemisphere[left] = HEMI_LEFT
    hemisphere[right] = HEMI_RIGHT
    cortex = on_grid(classes["cortex"]) | precentral
    wm = on_grid(classes["wm"])
    control = on_grid(classes["postcentral"]) if classes["postcentral"] else None
    prov = {"Route": "labels", "LabelImage": str(labels_path) if labels_path else None,
            "LookupTable": str(lut_path) if lut_path else "built-in FreeSurfer values",
            "PrecentralLabels": sorted(pre_values),
            "ControlRegion": ("postcentral labels " + str(sorted(classes["postcentral"])))
            if control is not None else "cortical slab 4-20 mm behind the precentral gyrus",
            "Resampled": not same_grid(labels.shape, labels_affine, target_shape,
                                       target_affine)}
    masks = build_region_masks(precentral, hemisphere, cortex, wm, target_affine,
                               control=control, brain=brain, provenance=prov)
    pv_labels, pv_affine, pv_classes = ((labels, labels_affine, classes) if fine is None
                                        else (fine[0], fine[1], classify_lut(fine[2])))
    masks.partial_volume = partial_volume_regions(pv_labels, pv_affine, pv_classes,
                                                  target_shape, target_affine)
    if masks.partial_volume is not None:
        masks.provenance["PartialVolume"] = {
            "LabelImage": str(fine_path or labels_path), **masks.partial_volume.provenance}
    else:
        masks.provenance["PartialVolume"] = (
            "no gtm indices: no label image finer than the maps (needs >= "
            f"{MIN_LABEL_VOXELS_PER_MAP_VOXEL:g} label voxels per map voxel)")
    return masks


def masks_from_label_file(labels_path: str | Path, target_shape: tuple[int, ...],
                          target_affine: np.ndarray, *, lut_path: str | Path | None = None,
                          brain: np.ndarray | None = None) -> RegionMasks:
    """:func:`masks_from_labels` from files; FreeSurfer values are named built-in when no
    lookup table is given.  A finer ``*_dseg`` beside a BIDS ``dseg``
    (:func:`finer_label_image`) gives the partial-volume fractions."""
    labels, affine = load_label_image(labels_path)
    lut = read_lut(lut_path) if lut_path is not None else freesurfer_lut(labels)
    fine = None
    finer = finer_label_image(labels_path) if lut_path is not None else None
    if finer is not None:
        fine_labels, fine_affine = load_label_image(finer[0])
        fine = (fine_labels, fine_affine, read_lut(finer[1]))
    return masks_from_labels(labels, affine, lut, target_shape, target_affine, brain=brain,
                             labels_path=labels_path, lut_path=lut_path, fine=fine,
                             fine_path=None if finer is None else finer[0])

