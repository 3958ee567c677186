"""Participant and visit metadata from a BIDS dataset's tables.

``participants.tsv`` gives age (at the first session, years), sex, group and site;
``sub-XX/sub-XX_sessions.tsv`` gives each visit's ``acq_time`` and, when present,
``years_since_baseline``.  Missing tables or columns give ``None`` values, not errors:
the registry keeps what is known.  A table that exists but cannot be parsed is an
:class:`~alsiron.errors.InputError`.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

from alsiron.errors import InputError

_MISSING = {"", "n/a", "na", "nan"}


@dataclass(frozen=True)
class VisitInfo:
    """What the BIDS tables say about one visit of one participant.

    Attributes
    ----------
    age : float or None
        Age at this visit, years (``participants.tsv`` age + years since baseline).
    sex, group, site : str or None
        From ``participants.tsv``.
    acq_time : str or None
        ISO 8601 date-time of the visit.
    years_since_baseline : float or None
        From ``sessions.tsv``, else computed from the ``acq_time`` of the first visit.
    """

    age: float | None
    sex: str | None
    group: str | None
    site: str | None
    acq_time: str | None
    years_since_baseline: float | None


def read_tsv(path: Path) -> list[dict[str, str]]:
    """Rows of a BIDS TSV file as dicts (``n/a`` and empty cells become ``""``).

    BIDS TSV has no quoting: every line is one row and every tab separates two cells, so
    a value starting with ``"`` is kept as it is (CSV quoting would swallow the next rows
    into it).  Blank lines are skipped; missing trailing cells read as empty.

    Raises
    ------
    InputError
        The file is not readable UTF-8 tab-separated text with a header row.
    """
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read the table ({exc})") from None
    lines = [ln.removesuffix("\r") for ln in text.split("\n")]
    lines = [ln for ln in lines if ln != ""]
    if not lines:
        return []
    header = [h.strip() for h in lines[0].split("\t")]
    rows = []
    for line in lines[1:]:
        cells = line.split("\t")
        cells += [""] * (len(header) - len(cells))
        rows.append({k: ("" if v.strip().lower() in _MISSING else v.strip())
                     for k, v in zip(header, cells, strict=False)})
    return rows


def _float(value: str | None, path: Path, column: str) -> float | None:
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        raise InputError(path, f"column {column!r} holds {value!r}, not a number") from None


def _parse_time(value: str | None, path: Path) -> _dt.datetime | None:
    if not value:
        return None
    try:
        return _dt.datetime.fromisoformat(value)
    except ValueError:
        raise InputError(path, f"acq_time {value!r} is not an ISO 8601 date-time") from None


def visit_info(dataset_root: Path, subject: str, session: str) -> VisitInfo:
    """Look up one visit in ``participants.tsv`` and the subject's ``sessions.tsv``.

    Parameters
    ----------
    dataset_root : path
        BIDS dataset root.
    subject, session : str
        Labels with or without their ``sub-``/``ses-`` prefixes (``session`` may be
        ``""`` for a dataset without session folders).
    """
    root = Path(dataset_root)
    sub = subject if subject.startswith("sub-") else f"sub-{subject}"
    ses = session if (not session or session.startswith("ses-")) else f"ses-{session}"
    person: dict[str, str] = {}
    participants = root / "participants.tsv"
    if participants.is_file():
        for row in read_tsv(participants):
            if row.get("participant_id") == sub:
                person = row
                break
    base_age = _float(person.get("age"), participants, "age")

    acq_time = years = None
    sessions_tsv = root / sub / f"{sub}_sessions.tsv"
    if sessions_tsv.is_file() and ses:
        rows = read_tsv(sessions_tsv)
        times = [_parse_time(r.get("acq_time"), sessions_tsv) for r in rows]
        for row, when in zip(rows, times, strict=True):
            if row.get("session_id") != ses:
                continue
            acq_time = row.get("acq_time") or None
            years = _float(row.get("years_since_baseline"), sessions_tsv,
                           "years_since_baseline")
            known = [t for t in times if t is not None]
            if years is None and when is not None and known:
                years = (when - min(known)).total_seconds() / (365.25 * 86400.0)
    if years is None and ses in ("", "ses-01"):
        years = 0.0
    age = None if base_age is None else round(base_age + (years or 0.0), 2)
    return VisitInfo(age=age, sex=person.get("sex") or None,
                     group=person.get("group") or None, site=person.get("site") or None,
                     acq_time=acq_time, years_since_baseline=years)

