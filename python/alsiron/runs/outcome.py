"""What every per-visit run loop reports for one series: :class:`VisitOutcome`, the base
of the ``qsm``, ``relax`` and ``roi`` outcomes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(kw_only=True)
class VisitOutcome:
    """The fields every command's outcome for one MEGRE series of one visit holds
    (keyword-only, so that each command's outcome adds its own in any order).

    Attributes
    ----------
    label : str
        BIDS prefix of the series (``sub-01_ses-01``).
    out_root : Path
        Derivatives folder the outputs went to.
    written : list of Path
        Files written.
    seconds : float
        Wall time [s] of the command's work on the series (each outcome says which).
    """

    label: str
    out_root: Path
    written: list[Path] = field(default_factory=list)
    seconds: float = 0.0
