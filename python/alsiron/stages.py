"""QSM-CI-style per-stage evaluation on the project's head phantom.

Each stage is scored from the phantom's *true* input to that stage, so one stage's error
does not hide another's (QSM-CI's layout). The dipole stage here: χ from the true local
field (the field of the brain's own susceptibility, simulated on a 2× finer grid and
averaged down, so the inversion's discrete kernel did not make it). Scores are those of
DESIGN.md §5 in the truth brain mask (:func:`alsiron.evaluate.score_chi`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from alsiron import inversion, phantom, qsm
from alsiron.evaluate import PhantomTruth, score_chi


@dataclass(frozen=True)
class StageCase:
    """A phantom geometry: matrix, voxel size [mm], B0 direction (voxel-index space)."""

    name: str
    matrix: tuple[int, int, int]
    voxel_size: tuple[float, float, float]
    b0_direction: tuple[float, float, float] = (0.0, 0.0, 1.0)
    seed: int = 3


#: The phantoms of the stage table (docs/qsm_stages.md).
CASES: dict[str, StageCase] = {
    "64-3mm": StageCase("64³, 3 mm", (64, 64, 64), (3.0, 3.0, 3.0)),
    "96-2mm": StageCase("96³, 2 mm", (96, 96, 96), (2.0, 2.0, 2.0)),
    "oblique": StageCase("64×64×56, 3×3×3.5 mm, B0 tilted 20°", (64, 64, 56),
                         (3.0, 3.0, 3.5), (0.0, 0.34, 0.94), seed=5),
}


def simulate(case: StageCase) -> phantom.PhantomSession:
    """Simulate the case's phantom session (default SNR and echo times)."""
    return phantom.simulate_subject(matrix=case.matrix, voxel_size=case.voxel_size,
                                    b0_direction=case.b0_direction, rng=case.seed)


def truth_of(session: phantom.PhantomSession) -> PhantomTruth:
    """The session's ground truth in the form :func:`~alsiron.evaluate.score_chi` takes."""
    return PhantomTruth(chi=session.chi.astype(np.float64),
                        r2star=session.r2star.astype(np.float64),
                        brain_mask=session.brain_mask.astype(bool),
                        labels=session.labels.astype(np.int32),
                        label_names=dict(session.label_names))


def dipole_inputs(session: phantom.PhantomSession) -> dict[str, Any]:
    """Keyword arguments of :func:`alsiron.inversion.invert` for the dipole stage: the
    true local field, the brain mask, the echo-RSS magnitude and the phase per ppm at
    the mean echo time."""
    te = float(np.mean(session.echo_times))
    return {
        "local_field": session.local_field,
        "mask": session.brain_mask,
        "voxel_size": session.voxel_size,
        "b0_dir": tuple(float(v) for v in session.b0_direction),
        "magnitude": np.sqrt(np.sum(session.magnitude.astype(np.float64) ** 2, axis=0)),
        "phase_scale": inversion.phase_per_ppm(session.field_strength, te),
    }


def dipole_stage(session: phantom.PhantomSession, method: str,
                 settings: inversion.InversionSettings | None = None,
                 truth: PhantomTruth | None = None) -> dict[str, Any]:
    """Invert the true local field with ``method`` and score χ against the truth.

    Returns
    -------
    dict
        ``NRMSE_pct``, ``HFEN_pct``, ``XSIM``, ``DeepGreySlope``, ``DeepGreyR2`` (and the
        cortical contrasts) from :func:`~alsiron.evaluate.score_chi`, plus ``seconds`` and
        the inversion's provenance ``record``.
    """
    truth = truth or truth_of(session)
    args = dipole_inputs(session)
    t0 = time.perf_counter()
    chi, record = inversion.invert(method, args.pop("local_field"), args.pop("mask"),
                                   settings=settings, **args)
    seconds = time.perf_counter() - t0
    chi = qsm.reference_to_mean(chi, session.brain_mask)
    scores = score_chi(chi, session.brain_mask, truth)
    scores["seconds"] = seconds
    scores["record"] = record
    return scores
