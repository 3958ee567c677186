"""Benchmark of the motor-cortex stage: masks + indices per subject (time, peak memory).

The subject is the head phantom (96³ at 2 mm, upsampled to 1 mm = 192³ for the full run;
64³ at 3 mm with ``quick``).  Rows:

* label route: :func:`alsiron.motor.labels.masks_from_labels` from the phantom's labels;
* atlas route: the bundled MNI152 template + Harvard-Oxford atlas registered to the
  phantom magnitude (dipy affine + SyN on the tissue index), warped and restricted to
  grey matter — the phantom is an ellipsoidal head, so the registration quality is not
  meaningful here (``min_similarity`` is lowered to 0 to time it regardless);
* indices: :func:`alsiron.motor.indices.motor_cortex_indices` on χ and R2*.

All stages are Python/NumPy/SciPy/dipy (no Rust kernel), so ``rust_ms`` holds the stage
time and ``numpy_ms`` is NaN; the peak memory (tracemalloc, NumPy allocations) is in the
kernel label.
"""

from __future__ import annotations

import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import row  # noqa: E402

from alsiron.grid import resample_to_grid  # noqa: E402
from alsiron.motor import atlas, labels  # noqa: E402
from alsiron.motor.indices import motor_cortex_indices  # noqa: E402
from alsiron.motor.registration import RegistrationParameters  # noqa: E402
from alsiron.sim.phantom import simulate_subject  # noqa: E402
from alsiron.sim.tissues import TISSUES  # noqa: E402


def _subject(quick: bool) -> dict:
    if quick:
        s = simulate_subject(matrix=64, voxel_size=3.0, rng=0)
        return {"magnitude": s.magnitude[0], "labels": s.labels, "chi": s.chi,
                "r2star": s.r2star, "brain": s.brain_mask, "affine": s.affine}
    s = simulate_subject(matrix=96, voxel_size=2.0, rng=0)
    half = np.array([[0.5, 0, 0, -0.25], [0, 0.5, 0, -0.25], [0, 0, 0.5, -0.25],
                     [0, 0, 0, 1.0]])

    def up(a: np.ndarray, order: int) -> np.ndarray:
        if order == 0:
            return a.repeat(2, 0).repeat(2, 1).repeat(2, 2)
        return ndimage.zoom(a.astype(np.float32), 2, order=1, grid_mode=True,
                            mode="grid-constant")

    return {"magnitude": up(s.magnitude[0], 1), "labels": up(s.labels, 0),
            "chi": up(s.chi, 1), "r2star": up(s.r2star, 1), "brain": up(s.brain_mask, 0),
            "affine": s.affine @ half}


def _timed(fn):
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn()
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return elapsed, peak / 1e9, out


def run(quick: bool = False) -> list[dict]:
    subj = _subject(quick)
    shape = subj["magnitude"].shape
    n_vox = int(np.prod(shape))
    label = "x".join(map(str, shape)) + (" 3mm" if quick else " 1mm")
    lut = dict(enumerate(TISSUES.names))
    rows = []
    t, gb, masks = _timed(lambda: labels.masks_from_labels(
        subj["labels"], subj["affine"], lut, shape, subj["affine"], brain=subj["brain"]))
    rows.append(row(f"roi: label-route masks (peak {gb:.2f} GB)", label, t, float("nan"),
                    n_vox))
    t, gb, _ = _timed(lambda: motor_cortex_indices(masks, chi=subj["chi"],
                                                   r2star=subj["r2star"]))
    rows.append(row(f"roi: indices chi+R2* (peak {gb:.2f} GB)", label, t, float("nan"), n_vox))
    template = atlas.load_bundled_atlas("ho")
    params = RegistrationParameters(min_similarity=0.0)
    t, gb, atlas_masks = _timed(lambda: atlas.masks_from_atlas(
        subj["magnitude"], subj["affine"], subj["brain"], template=template,
        registration_params=params))
    reg = atlas_masks.provenance["Registration"]
    rows.append(row(f"roi: atlas-route masks, MNI+HO to the ellipsoid phantom (affine "
                    f"{reg['AffineSeconds']} s, registration {reg['TotalSeconds']} s; peak "
                    f"{gb:.2f} GB)", label, t, float("nan"), n_vox))
    # A real brain: the MNI template itself as a 1 mm T1w "subject" after a known affine.
    t1w, t1w_affine = _moved_template(template, quick)
    t1w_label = "x".join(map(str, t1w.shape)) + (" 3mm T1w" if quick else " 1mm T1w")
    t, gb, t1w_masks = _timed(lambda: atlas.masks_from_atlas(
        t1w, t1w_affine, t1w > 0, template=template, subject_contrast="t1w"))
    reg = t1w_masks.provenance["Registration"]
    # Truth: the atlas moved by the known affine, in the subject's grey-matter class.
    classes, _ = atlas.tissue_classes(t1w, t1w > 0, contrast="t1w")
    shape1 = t1w.shape
    p_l = resample_to_grid(template.left, template.maps_affine, shape1, t1w_affine)
    p_r = resample_to_grid(template.right, template.maps_affine, shape1, t1w_affine)
    truth = (np.maximum(p_l, p_r) >= template.threshold) & (classes == 2)
    got = t1w_masks.precentral
    dice = 2.0 * float((got & truth).sum()) / float(got.sum() + truth.sum())
    rows.append(row(f"roi: atlas-route masks, MNI+HO to a moved MNI brain (affine "
                    f"{reg['AffineSeconds']} s, registration {reg['TotalSeconds']} s, "
                    f"correlation {reg['CorrelationFinal']}, Dice {dice:.3f}; peak "
                    f"{gb:.2f} GB)", t1w_label, t,
                    float("nan"), int(t1w.size)))
    return rows


def _moved_template(template: atlas.AtlasTemplate, quick: bool) -> tuple[np.ndarray, np.ndarray]:
    """The template resampled on a subject-like grid (1 mm, or 3 mm with ``quick``) after
    a rotation of 5° about x and a shift of (3, -4, 5) mm."""
    vox = 3.0 if quick else 1.0
    shape = tuple(int(round(n / vox)) for n in (176, 208, 176))
    ang = np.deg2rad(5.0)
    rot = np.array([[1, 0, 0], [0, np.cos(ang), -np.sin(ang)], [0, np.sin(ang), np.cos(ang)]])
    affine = np.eye(4)
    affine[:3, :3] = rot * vox
    affine[:3, 3] = -(rot * vox) @ ((np.array(shape) - 1) / 2.0) + np.array([3.0, -22.0, 15.0])
    image = resample_to_grid(template.image, template.affine, shape, affine, order=1)
    return np.where(image > 1.0, image, 0.0).astype(np.float32), affine


if __name__ == "__main__":
    for r in run(quick="--quick" in sys.argv):
        print(r)
