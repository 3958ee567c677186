"""qsm-forward's cylinder phantom as MEGRE input, and the scores of a χ map against it.

qsm-forward (the QSMxT project's forward simulator, PyPI ``qsm-forward``, GPL-3.0; a test
and benchmark dependency installed by ``alsiron[test]``, imported only here and only when
called, never bundled or needed at run time) simulates its own cylinder phantom with its own
forward model, noise, shim and phase offset. Nothing in alsiron was shaped on it, so it is
one of the data sets every QSM default is checked on (tests/test_qsmforward.py,
bench/qsmforward_chi.py).

The phantom: a large cylinder (χ 0.005 ppm) along the first axis holding four small ones
(0.05, 0.1, 0.2, 0.5 ppm), 7 T, TE 4/12/20/28 ms, 1 mm voxels, peak SNR 100, B0 along the
third axis, qsm-forward's 2nd-order shim, and its phase offset plus a random constant.
Two surroundings:

- ``"water"``: qsm-forward's own example, χ 0 outside the large cylinder;
- ``"air"``: χ +9.4 ppm outside it (air against tissue, the tissue being the reference),
  magnitude 0 there, so that a background field as strong as a head's sits right at the
  object's edge.
"""

from __future__ import annotations

import contextlib
import glob
import io
import tempfile
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage

from alsiron.evaluation import metrics
from alsiron.volume import MegreSeries

#: χ [ppm] of the large cylinder and of the four small ones.
LARGE_CHI = 0.005
SMALL_CHI = (0.05, 0.1, 0.2, 0.5)
#: χ [ppm] outside the object in the "air" surrounding.
AIR_CHI = 9.4
SURROUNDINGS = ("water", "air")


@dataclass(frozen=True)
class CylinderCase:
    """One simulated acquisition: the series, the true χ [ppm] (0 outside the object), the
    object mask, and qsm-forward's true total field [ppm] after its shim."""

    series: MegreSeries
    chi: np.ndarray
    mask: np.ndarray
    field_ppm: np.ndarray


def simulate_cylinders(seed: int = 0, surrounding: str = "water", size: int = 100,
                       phase_offset: float | np.ndarray | None = None) -> CylinderCase:
    """qsm-forward's cylinders on a ``size``³ grid of 1 mm voxels.

    Parameters
    ----------
    seed : int
        qsm-forward's noise seed; also draws the constant phase offset U(−π, π).
    surrounding : {"water", "air"}
        χ outside the large cylinder: 0, or +9.4 ppm with no signal.
    size : int
        Grid edge [voxels]; the small cylinders' radii are 4, 4, 4 and 7 voxels.
    phase_offset : float or ndarray, optional
        φ0 [rad] added by qsm-forward to every echo (a constant or a ``size``³ map);
        None: a constant drawn U(−π, π) from ``default_rng(1000 + seed)``.

    Raises
    ------
    ImportError
        qsm-forward is not installed (``pip install alsiron[test]``).
    ValueError
        An unknown surrounding.
    """
    import qsm_forward as qf

    if surrounding not in SURROUNDINGS:
        raise ValueError(f"unknown surrounding {surrounding!r} (choose one of "
                         f"{', '.join(SURROUNDINGS)})")
    chi = qf.generate_susceptibility_phantom(
        resolution=[size] * 3, background=0, large_cylinder_val=LARGE_CHI,
        small_cylinder_radii=[4, 4, 4, 7], small_cylinder_vals=list(SMALL_CHI))
    obj = chi != 0
    if surrounding == "air":
        chi = np.where(obj, chi, AIR_CHI)
    rp = qf.ReconParams()
    rp.subject, rp.peak_snr, rp.random_seed = "c", 100, seed
    rp.phase_offset = (np.random.default_rng(1000 + seed).uniform(-np.pi, np.pi)
                       if phase_offset is None else phase_offset)
    with tempfile.TemporaryDirectory() as d, contextlib.redirect_stdout(io.StringIO()):
        # qsm-forward takes a mask and M0 as arrays only when χ is 0 outside the object;
        # as files it takes them always.
        nib.save(nib.Nifti1Image(obj.astype(np.float32), np.eye(4)), f"{d}/mask.nii")
        qf.generate_bids(qf.TissueParams(chi=chi, mask=f"{d}/mask.nii", M0=f"{d}/mask.nii"),
                         rp, f"{d}/bids", save_shimmed_field=True)
        mags = [nib.load(f) for f in sorted(glob.glob(f"{d}/bids/sub-c/anat/*part-mag*.nii"))]
        phases = [nib.load(f)
                  for f in sorted(glob.glob(f"{d}/bids/sub-c/anat/*part-phase*.nii"))]
        magnitude = np.stack([m.get_fdata(dtype=np.float32) for m in mags])
        phase = np.stack([p.get_fdata(dtype=np.float32) for p in phases])
        affine = mags[0].affine
        field = nib.load(glob.glob(f"{d}/bids/derivatives/qsm-forward/sub-c/anat/"
                                   "*desc-shimmed_fieldmap.nii")[0]).get_fdata()
    series = MegreSeries(magnitude=np.ascontiguousarray(magnitude),
                         phase=np.ascontiguousarray(phase),
                         echo_times=np.asarray(rp.TEs, np.float64),
                         field_strength=float(rp.B0), affine=affine,
                         voxel_size=tuple(float(v) for v in rp.voxel_size),
                         b0_direction=tuple(float(v) for v in rp.B0_dir),
                         subject="c", session="01")
    return CylinderCase(series=series, chi=np.where(obj, chi, 0.0), mask=obj, field_ppm=field)


def score_cylinders(chi: np.ndarray, case: CylinderCase, mask: np.ndarray
                    ) -> dict[str, float]:
    """χ [ppm] against the truth in ``mask`` (each minus its mean there).

    Returns
    -------
    dict
        ``NRMSE_pct``, ``XSIM``, and ``CylinderSlope``: the slope of the mean χ of the five
        cylinders (each eroded by one voxel, inside ``mask``) against their true χ.
    """
    m = np.asarray(mask, bool)
    est = np.where(m, chi - chi[m].mean(), 0.0)
    tru = np.where(m, case.chi - case.chi[m].mean(), 0.0)
    values = (LARGE_CHI, *SMALL_CHI)
    means = [float(chi[ndimage.binary_erosion(case.chi == v) & m].mean()) for v in values]
    return {"NRMSE_pct": metrics.nrmse(est, tru, m), "XSIM": metrics.xsim(est, tru, m),
            "CylinderSlope": float(np.polyfit(values, means, 1)[0])}
