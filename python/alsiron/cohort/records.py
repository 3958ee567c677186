"""Per-session results that the index, registry, normative, longitudinal and report
stages exchange in memory.

An index name is ``{map}_{region}_{statistic}``: ``map`` is ``chi`` (ppm) or ``r2star``
(s⁻¹); ``region`` is ``precentral`` or a sub-region such as ``precentral_L``,
``precentral_deep`` or ``precentral_L_hand_deep``; ``statistic`` is ``mean``,
``median``, ``p75``, ``p90``, ``p95`` or ``n`` (voxel count).  The headline ALS index
is :data:`HEADLINE_INDEX`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from alsiron.errors import InvalidInputError

#: Deep-layer precentral mean χ (ppm): where the ALS iron excess sits.
HEADLINE_INDEX = "chi_precentral_deep_mean"
#: Its partial-volume-corrected counterpart relative to the adjacent white matter, where
#: the session's label image is finer than the maps (:mod:`alsiron.motor.pvc`).
PARTIAL_VOLUME_INDEX = "chi_precentral_deep_minusWM_gtm"
#: The same divided by the QSM chain's transfer of a deep-band change, measured on the
#: visit by a second chain run (:func:`alsiron.motor.pvc.chain_transfer`).
TRANSFER_CORRECTED_INDEX = "chi_precentral_deep_minusWM_gtmrc"

QcStatus = Literal["pass", "warn", "fail"]

_INDEX_NAME = re.compile(r"^(chi|r2star)_([a-z0-9]+(?:_[A-Za-z0-9]+)*)_([a-z0-9]+)$")


def index_units(name: str) -> str:
    """Unit of an index from its name: ``ppm`` for χ, ``1/s`` for R2*, ``voxel`` for n.

    Raises
    ------
    ValueError
        If ``name`` does not follow ``{map}_{region}_{statistic}``.
    """
    match = _INDEX_NAME.match(name)
    if match is None:
        raise InvalidInputError(f"index name {name!r} is not of the form "
                                "{chi|r2star}_{region}_{statistic}")
    if match.group(3) == "n":
        return "voxel"
    return "ppm" if match.group(1) == "chi" else "1/s"


@dataclass
class SessionRecord:
    """Everything the registry keeps about one processed session.

    Attributes
    ----------
    subject, session : str
        BIDS labels with their prefixes (``"sub-01"``, ``"ses-01"``).
    run : int
        Repeat scan within the session (1 = first); same-day repeats give the
        test-retest SD.
    acq_time : str or None
        Acquisition date-time, ISO 8601 (from ``sessions.tsv`` or the sidecar).
    years_since_baseline : float or None
        Time since the participant's first session, years.
    site, group, sex : str or None
        From ``participants.tsv``; group is ``"control"`` or ``"ALS"`` (other labels
        are kept as given).
    age : float or None
        Age at this session, years.
    field_strength_t : float or None
        Scanner field strength, tesla.
    indices : dict
        Index name → value (units from :func:`index_units`); NaN where not computable.
    qc_status : {"pass", "warn", "fail"}
        Overall quality verdict of the session's maps and masks.
    qc_notes : dict
        Machine-readable reasons (e.g. ``{"precentral_lost_to_mask": 0.12}``).
    input_checksums : dict
        Input file path (relative to the dataset) → SHA-256 hex digest.
    software_version : str
        alsiron version that made the record.
    parameters : dict
        Every algorithm and parameter of the run (as in the map sidecars).
    """

    subject: str
    session: str
    run: int = 1
    acq_time: str | None = None
    years_since_baseline: float | None = None
    site: str | None = None
    group: str | None = None
    sex: str | None = None
    age: float | None = None
    field_strength_t: float | None = None
    indices: dict[str, float] = field(default_factory=dict)
    qc_status: QcStatus = "pass"
    qc_notes: dict[str, Any] = field(default_factory=dict)
    input_checksums: dict[str, str] = field(default_factory=dict)
    software_version: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
