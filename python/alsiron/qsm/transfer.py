"""What the QSM chain returns for a known change of χ in this visit's own data: the
chain's transfer of a perturbation.

A regularised dipole inversion does not return all of a thin structure's χ: the part of
its field near the magic cone is what regularisation fills in from the neighbours, so a
one-voxel layer keeps a fraction of its contrast that depends on its shape, its
orientation to B0, the mask edge and the noise.  On the anatomical phantom the default
chain keeps 0.83–0.89 of a deep-band change at 2.5 mm, and even truncated k-space division
of the *true* local field keeps only 0.83 (threshold 0.19) to 0.94 (0.05)
(docs/qsm_anatomy.md, "The chain's own transfer").  That fraction is a property of the
chain and the visit, not of the tissue, and it can be measured where it applies: add the
field of a small χ change to the visit's phase, run the same chain again, and read how much
of the change comes back (the regional spread function of PET's geometric transfer
matrix, with the QSM chain as the system).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from alsiron.qsm import dipole
from alsiron.qsm.inversion import phase_per_ppm
from alsiron.volume import MegreSeries, wrap_phase

#: ``chain_response(delta_chi) -> chi``: the χ map [ppm] the chain returns when
#: ``delta_chi`` [ppm] is added to the head imaged in the visit (NaN outside its mask).
ChainResponse = Callable[[np.ndarray], np.ndarray]


def add_field(series: MegreSeries, field_ppm: np.ndarray, *,
              phase_unwrapped: bool = False) -> MegreSeries:
    """The series with ``field_ppm`` added to every echo's phase.

    Echo e gains 2π·γ̄·B0·TE_e·field (:func:`alsiron.qsm.inversion.phase_per_ppm`), the
    phase the field would have accrued; the magnitude is unchanged (a small χ change
    alters the decay negligibly).

    Parameters
    ----------
    series : MegreSeries
    field_ppm : ndarray (X, Y, Z)
        Field to add [ppm of B0], on the series' grid.
    phase_unwrapped : bool
        The series' phase is already unwrapped: add without wrapping back to (−π, π].

    Returns
    -------
    MegreSeries
        A copy with the new phase (float32); everything else shared.
    """
    f = np.asarray(field_ppm, np.float64)
    if f.shape != series.shape:
        raise ValueError(f"field has shape {f.shape}, the series {series.shape}")
    phase = np.empty_like(series.phase, dtype=np.float32)
    for e, te in enumerate(series.echo_times):
        p = series.phase[e].astype(np.float64) + phase_per_ppm(series.field_strength,
                                                                float(te)) * f
        phase[e] = p if phase_unwrapped else wrap_phase(p)
    return dataclasses.replace(series, phase=phase)


def chain_response(series: MegreSeries, run_chain: Callable[..., Any], *,
                   phase_unwrapped: bool = False,
                   total_field_ppm: np.ndarray | None = None,
                   **chain_kwargs: Any) -> ChainResponse:
    """A :data:`ChainResponse` that reruns the chain on the visit with a χ change added.

    Parameters
    ----------
    series : MegreSeries
        The visit's series, as the chain first saw it.
    run_chain : callable
        :func:`alsiron.qsm.chain.process_series` (or a wrapper with its signature).
    phase_unwrapped : bool
        As in the chain: the phase is added to without wrapping.
    total_field_ppm : ndarray, optional
        The user's total field map when the chain took one instead of the phase: the
        change's field is added to it.
    **chain_kwargs
        Everything else the chain was given (parameters, masks, sources); progress
        callbacks are best left out.

    Returns
    -------
    callable
        ``delta_chi [ppm] -> chi [ppm]`` (NaN outside the chain's QSM mask).  The field of
        ``delta_chi`` is its dipole field on the series' grid (periodic, B0 from the
        affine); one full chain run per call.
    """
    def respond(delta_chi: np.ndarray) -> np.ndarray:
        d = np.asarray(delta_chi, np.float32)
        if d.shape != series.shape:
            raise ValueError(f"χ change has shape {d.shape}, the series {series.shape}")
        field = dipole.forward_field(d, voxel_size=series.voxel_size,
                                     b0_dir=series.b0_direction)
        if total_field_ppm is not None:
            result = run_chain(series, phase_unwrapped=phase_unwrapped,
                               total_field_ppm=np.asarray(total_field_ppm) + field,
                               **chain_kwargs)
        else:
            result = run_chain(add_field(series, field, phase_unwrapped=phase_unwrapped),
                               phase_unwrapped=phase_unwrapped, **chain_kwargs)
        mask = np.asarray(result.qsm_mask.data) > 0
        return np.where(mask, np.asarray(result.chi.data, np.float32), np.nan)

    return respond
