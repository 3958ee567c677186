"""The head phantom's tissue property table (``alsiron/data/head_tissues.tsv``).

The table ships inside the package so an installed wheel finds it;
``phantoms/head_tissues.tsv`` in the source tree is a symbolic link to the same file.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from importlib.resources import files

import numpy as np

_TABLE_RESOURCE = "data/head_tissues.tsv"
_COLUMNS = ("index", "name", "chi_ppm", "r2star_per_s", "r2_per_s", "m0", "note")


@dataclass(frozen=True)
class TissueTable:
    """Per-label tissue properties; arrays are indexed by the label value.

    Attributes
    ----------
    names : tuple of str
        Label names, ``names[i]`` for label ``i``.
    chi_ppm : ndarray, float64
        Susceptibility in ppm relative to the whole-brain mean (air +9.4 ppm).
    r2star_per_s, r2_per_s : ndarray, float64
        Relaxation rates in s⁻¹ at 3 T.
    m0 : ndarray, float64
        Proton density (arbitrary units; CSF = 1).
    notes : tuple of str
        Source or reasoning for each row.
    """

    names: tuple[str, ...]
    chi_ppm: np.ndarray
    r2star_per_s: np.ndarray
    r2_per_s: np.ndarray
    m0: np.ndarray
    notes: tuple[str, ...]

    def index(self, name: str) -> int:
        """Label value of a tissue name (raises KeyError for unknown names)."""
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"unknown phantom tissue {name!r}") from None


def table_text() -> str:
    """The raw TSV text of the tissue table as shipped in the package."""
    return files("alsiron").joinpath(_TABLE_RESOURCE).read_text(encoding="utf-8")


def load_tissue_table() -> TissueTable:
    """Read and check the packaged tissue table.

    Returns
    -------
    TissueTable
        Rows in label order; labels must be 0..n-1 without gaps.
    """
    rows = list(csv.DictReader(io.StringIO(table_text()), delimiter="\t"))
    if not rows or tuple(rows[0].keys()) != _COLUMNS:
        raise RuntimeError(f"head_tissues.tsv: expected columns {_COLUMNS}")
    indices = [int(r["index"]) for r in rows]
    if indices != list(range(len(rows))):
        raise RuntimeError("head_tissues.tsv: label indices must be 0..n-1 in order")

    def column(key: str) -> np.ndarray:
        return np.array([float(r[key]) for r in rows], dtype=np.float64)

    return TissueTable(
        names=tuple(r["name"] for r in rows),
        chi_ppm=column("chi_ppm"),
        r2star_per_s=column("r2star_per_s"),
        r2_per_s=column("r2_per_s"),
        m0=column("m0"),
        notes=tuple(r["note"] for r in rows),
    )


TISSUES: TissueTable = load_tissue_table()
#: Label value of each tissue name.
LABELS: dict[str, int] = {name: i for i, name in enumerate(TISSUES.names)}
PRECENTRAL_LABELS: tuple[int, ...] = tuple(
    LABELS[f"precentral_{s}_{d}"] for s in ("L", "R") for d in ("superficial", "deep")
)
PRECENTRAL_DEEP_LABELS: tuple[int, ...] = (LABELS["precentral_L_deep"],
                                           LABELS["precentral_R_deep"])
DEEP_GREY_LABELS: tuple[int, ...] = tuple(
    LABELS[f"{n}_{s}"]
    for n in ("caudate", "putamen", "globus_pallidus", "thalamus", "substantia_nigra",
              "red_nucleus")
    for s in ("L", "R")
)
