"""``alsiron phantom``: a simulated BIDS dataset (MEGRE, optionally MESE) with its ground
truth, from the command's options (None = the phantom's default)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from alsiron.sim import phantom as ph


@dataclass
class PhantomOutcome:
    """Where the dataset went and how long it took.

    Attributes
    ----------
    root : Path
        The BIDS dataset (ground truth in ``derivatives/phantom``).
    seconds : float
        Wall time.
    """

    root: Path
    seconds: float


def run_phantom(out_dir: str | Path, *, subjects: int, sessions: int, matrix: int | None,
                voxel_size: float | None, field_strength: float, snr: float | None,
                b0_direction: tuple[float, float, float] | None, seed: int, mese: bool,
                overwrite: bool, anatomy: str = "geometric", shim: bool = True
                ) -> PhantomOutcome:
    """Write the phantom dataset of :func:`alsiron.sim.phantom.write_dataset`.

    Parameters
    ----------
    out_dir : path
    subjects, sessions : int
        Subjects (alternating control / ALS) and visits each.
    matrix, voxel_size : int, float or None
        Voxels per axis and isotropic voxel size [mm]; None: the phantom's defaults.
    field_strength : float
        B0 [T].
    snr : float or None
        SNR of the first-echo magnitude in WM; None: the phantom's default.
    b0_direction : 3 floats or None
        B0 direction in voxel-index space; None: along z.
    seed : int
    mese : bool
        Also write a 16-echo multi-echo spin echo with B1 inhomogeneity.
    overwrite : bool
        Replace an existing dataset's files.
    anatomy : {"geometric", "template"}
        Ellipsoid head, or the folded-cortex head of :mod:`alsiron.sim.anatomical`.
    shim : bool
        Anatomical head: 2nd-order B0 shim over the brain (the geometric head has none).
    """
    kwargs: dict[str, object] = {"subjects": subjects, "sessions": sessions,
                                 "field_strength": field_strength, "seed": seed,
                                 "overwrite": overwrite}
    # None leaves the phantom's own default in place.
    optional = {"matrix": matrix, "voxel_size": voxel_size, "snr": snr,
                "b0_direction": None if b0_direction is None else tuple(b0_direction)}
    kwargs.update({key: value for key, value in optional.items() if value is not None})
    if mese:
        kwargs["mese"] = ph.MeseProtocol()
    if anatomy != "geometric":
        kwargs["anatomy"] = anatomy
        kwargs["shim"] = shim
    t0 = time.perf_counter()
    root = ph.write_dataset(out_dir, **kwargs)  # type: ignore[arg-type]
    return PhantomOutcome(root=Path(root), seconds=time.perf_counter() - t0)
