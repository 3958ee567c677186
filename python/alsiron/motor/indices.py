"""Motor-cortex iron indices: χ and R2* statistics per precentral sub-region.

Index names follow :mod:`alsiron.cohort.records`: ``{map}_{region}_{statistic}`` with map
``chi`` (ppm) or ``r2star`` (s⁻¹), regions from :meth:`RegionMasks.regions`
(``precentral[_L|_R][_leg|_hand|_face][_deep|_superficial]``, ``underlyingwm``,
``control``) and statistics ``mean``, ``median``, ``p75``, ``p90``, ``p95``, ``n``.
Derived contrasts add a region part:

* ``…_LminusR_{mean,median}``: left minus right (e.g. ``chi_precentral_deep_LminusR_mean``);
* ``…_minusWM_{mean,median}``: cortex minus the underlying white matter;
* ``…_minusControl_{mean,median}``: cortex minus the control cortex (postcentral), which
  makes the index independent of the χ reference region;
* ``chi_precentral_deepminusSuperficial_{mean,median}``.

With a label image finer than the maps, statistic ``gtm`` adds the partial-volume-corrected
χ of the depth bands (:func:`gtm_indices`, :mod:`alsiron.motor.pvc`), and where the caller
can rerun the QSM chain on the visit, ``gtmrc`` the deep band's contrast divided by the
chain's measured transfer of a deep-band change (:func:`alsiron.motor.pvc.chain_transfer`).

Veins are excluded by trimming: in every region, voxels whose χ lies above the region's
97th percentile (:data:`VEIN_PERCENTILE`) are dropped from both the χ and the R2*
statistics (R2*'s own percentile when χ is not available).  Voxels where a map is NaN
(outside the QSM mask, failed fits) are not counted; the fraction of the precentral
cortex lost that way is reported in the QC notes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from alsiron.cohort.records import HEADLINE_INDEX, QcStatus, SessionRecord, index_units
from alsiron.io.atomic import save_json, save_text
from alsiron.motor import pvc
from alsiron.motor.masks import SEGMENTS, RegionMasks
from alsiron.motor.pvc import PartialVolumeRegions, gtm_contrasts, gtm_region_values

log = logging.getLogger("alsiron")

STATISTICS = ("mean", "median", "p75", "p90", "p95", "n")
#: Upper-tail trimming (veins) within each region, percentile of χ.
VEIN_PERCENTILE = 97.0
#: QC: fraction of the precentral cortex outside the valid χ voxels above which the
#: session is flagged "warn" / "fail".
LOST_WARN = 0.10
LOST_FAIL = 0.50
#: QC: fewer valid precentral voxels than this fails the session.
MIN_VOXELS = 20
_CONTRAST_STATS = ("mean", "median")
_ASYM_BASES = ["precentral", "precentral_deep", "precentral_superficial"] + [
    f"precentral_{s}{d}" for s in SEGMENTS for d in ("", "_deep")]
_CONTRAST_BASES = ["precentral", "precentral_deep", "precentral_superficial", "precentral_L",
                   "precentral_R", "precentral_L_deep", "precentral_R_deep"]


@dataclass
class MotorCortexIndices:
    """Indices of one session with their QC verdict.

    Attributes
    ----------
    indices : dict
        Index name → value (NaN where a region is empty); units from
        :func:`alsiron.cohort.records.index_units`.
    qc_status : {"pass", "warn", "fail"}
    qc_notes : dict
        ``precentral_lost_to_mask`` (fraction of the precentral cortex without a valid χ),
        the same for the top quarter of the gyrus (``precentral_top_lost_to_mask``) and
        per segment, valid voxel counts and the reasons of the verdict.
    parameters : dict
        Masks' provenance and the index definitions.
    """

    indices: dict[str, float]
    qc_status: QcStatus
    qc_notes: dict[str, Any]
    parameters: dict[str, Any] = field(default_factory=dict)

    def update_record(self, record: SessionRecord) -> SessionRecord:
        """Store indices, QC verdict/notes and parameters on a :class:`SessionRecord`
        (the worse of its existing and this QC status wins)."""
        record.indices.update(self.indices)
        order = {"pass": 0, "warn": 1, "fail": 2}
        if order[self.qc_status] > order[record.qc_status]:
            record.qc_status = self.qc_status
        record.qc_notes.update(self.qc_notes)
        record.parameters["motor_cortex_indices"] = self.parameters
        return record


def _stats(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {s: (0.0 if s == "n" else float("nan")) for s in STATISTICS}
    p = np.percentile(values, [50.0, 75.0, 90.0, 95.0])
    return {"mean": float(values.mean(dtype=np.float64)), "median": float(p[0]),
            "p75": float(p[1]), "p90": float(p[2]), "p95": float(p[3]),
            "n": float(values.size)}


def trimmed_voxels(region: np.ndarray, chi: np.ndarray | None, r2star: np.ndarray | None,
                   percentile: float = VEIN_PERCENTILE) -> np.ndarray:
    """Region voxels kept after vein trimming (χ above the region's ``percentile`` dropped;
    R2* used when χ is absent).  Voxels with a non-finite χ stay in the mask here; each
    map's statistics skip its own NaNs."""
    keep = np.asarray(region, bool).copy()
    ref = chi if chi is not None else r2star
    if ref is None or not keep.any():
        return keep
    vals = ref[keep]
    finite = np.isfinite(vals)
    if finite.sum() < 2 or percentile >= 100.0:
        return keep
    cut = np.percentile(vals[finite], percentile)
    keep[keep] = ~(finite & (vals > cut))
    return keep


def region_indices(maps: dict[str, np.ndarray | None], regions: dict[str, np.ndarray], *,
                   vein_percentile: float = VEIN_PERCENTILE) -> dict[str, float]:
    """Statistics of each map in each region, after vein trimming.

    Parameters
    ----------
    maps : dict
        ``{"chi": χ [ppm] or None, "r2star": R2* [1/s] or None}``, arrays (X, Y, Z).
    regions : dict
        Region name → boolean mask on the same grid.
    vein_percentile : float
        Trimming percentile of χ per region (100 = no trimming).
    """
    out: dict[str, float] = {}
    chi = maps.get("chi")
    r2s = maps.get("r2star")
    for name, region in regions.items():
        keep = trimmed_voxels(region, chi, r2s, vein_percentile)
        for map_name, data in maps.items():
            if data is None:
                continue
            vals = data[keep]
            vals = vals[np.isfinite(vals)].astype(np.float64)
            for stat, value in _stats(vals).items():
                out[f"{map_name}_{name}_{stat}"] = value
    return out


def derived_contrasts(indices: dict[str, float], map_names: list[str]) -> dict[str, float]:
    """Left−right, cortex−underlying-WM, cortex−control and deep−superficial contrasts
    from region statistics (names in the module docstring)."""
    out: dict[str, float] = {}
    for m in map_names:
        for stat in _CONTRAST_STATS:
            def get(region: str, _m: str = m, _s: str = stat) -> float:
                return indices.get(f"{_m}_{region}_{_s}", float("nan"))

            for base in _ASYM_BASES:
                rest = base.removeprefix("precentral")
                out[f"{m}_{base}_LminusR_{stat}"] = (get(f"precentral_L{rest}")
                                                     - get(f"precentral_R{rest}"))
            for base in _CONTRAST_BASES:
                out[f"{m}_{base}_minusWM_{stat}"] = get(base) - get("underlyingwm")
                out[f"{m}_{base}_minusControl_{stat}"] = get(base) - get("control")
            out[f"{m}_precentral_deepminusSuperficial_{stat}"] = (
                get("precentral_deep") - get("precentral_superficial"))
    return out


def gtm_indices(chi: np.ndarray, regions: PartialVolumeRegions, *,
                vein_percentile: float = VEIN_PERCENTILE,
                chain_response: Callable[[np.ndarray], np.ndarray] | None = None
                ) -> tuple[dict[str, float], dict[str, Any]]:
    """Partial-volume-corrected χ of the precentral bands (:mod:`alsiron.motor.pvc`):
    ``chi_precentral_deep_gtm`` and ``chi_precentral_superficial_gtm`` (uniform region
    values, :func:`alsiron.motor.pvc.gtm_region_values`), ``chi_precentral_deep_minusWM_gtm``
    (the deep band minus the white matter at the same place, with a smooth spatial baseline:
    :func:`alsiron.motor.pvc.gtm_contrasts`), and the fits' diagnostics.  With
    ``chain_response`` (``delta_chi -> chi`` of the chain rerun on the visit,
    :func:`alsiron.qsm.transfer.chain_response`) also ``chi_precentral_deep_minusWM_gtmrc``:
    that contrast divided by the chain's transfer of a deep-band change
    (:func:`alsiron.motor.pvc.chain_transfer`; NaN where the transfer is not trusted).

    The contrast is not ``deep_gtm`` minus a uniform white-matter value: the chain's error
    is smooth over centimetres and differs between heads, and a uniform white matter leaves
    it in the contrast (participant residual 0.97 against 0.95 ppb on seed 0 of the
    anatomical demo, but baseline recovery 0.62 against 0.79; docs/qsm_anatomy.md).

    χ only: a voxel's field, hence its χ, is close to the volume-weighted mean of its
    tissues', which GTM assumes; its R2* is not (a mono-exponential fit of a multi-
    compartment decay, weighted by proton density), and on the anatomical phantom a GTM
    of R2* put the superficial band at 22.7 s⁻¹ against its true 17 s⁻¹.
    """
    values, diag = gtm_region_values(chi, regions, trim_percentile=vein_percentile)
    contrasts, cdiag = gtm_contrasts(chi, regions, trim_percentile=vein_percentile)
    diag = {**diag, "contrast_condition": cdiag["condition"],
            "contrast_baseline_order": cdiag["baseline_order"]}
    out = {"chi_precentral_deep_gtm": values[pvc.DEEP],
           "chi_precentral_superficial_gtm": values[pvc.SUPERFICIAL],
           "chi_precentral_deep_minusWM_gtm": contrasts[pvc.DEEP]}
    if chain_response is not None and np.isfinite(contrasts[pvc.DEEP]):
        transfer, diag["ChainTransfer"] = pvc.chain_transfer(
            chi, regions, chain_response, trim_percentile=vein_percentile)
        out["chi_precentral_deep_minusWM_gtmrc"] = contrasts[pvc.DEEP] / transfer
    return out, diag


def mask_coverage(masks: RegionMasks, valid: np.ndarray) -> dict[str, Any]:
    """How much of the precentral cortex the valid-map voxels cover.

    Returns ``precentral_lost_to_mask`` (fraction of the gyrus without a valid value),
    ``precentral_top_lost_to_mask`` (the same in the top quarter of the gyrus' height:
    the vertex, where brain masks erode first), per-segment fractions and
    ``precentral_top_z_mm`` / ``precentral_valid_top_z_mm`` (highest world z of the gyrus
    and of its valid part).
    """
    pre = masks.precentral
    notes: dict[str, Any] = {}
    total = int(pre.sum())
    if total == 0:
        return {"precentral_lost_to_mask": 1.0}
    lost = pre & ~valid
    notes["precentral_lost_to_mask"] = round(float(lost.sum()) / total, 4)
    idx = np.argwhere(pre)
    z = (idx @ masks.affine[2, :3] + masks.affine[2, 3]).astype(np.float64)
    z_top = float(z.max())
    top_cut = np.percentile(z, 75.0)
    top = np.zeros_like(pre)
    top[tuple(idx[z >= top_cut].T)] = True
    notes["precentral_top_lost_to_mask"] = round(float((top & lost).sum())
                                                 / max(int(top.sum()), 1), 4)
    for k, name in enumerate(SEGMENTS):
        seg = masks.segment == k + 1
        if seg.any():
            notes[f"precentral_{name}_lost_to_mask"] = round(
                float((seg & lost).sum()) / float(seg.sum()), 4)
    valid_pre = pre & valid
    notes["precentral_top_z_mm"] = round(z_top, 1)
    if valid_pre.any():
        vidx = np.argwhere(valid_pre)
        vz = vidx @ masks.affine[2, :3] + masks.affine[2, 3]
        notes["precentral_valid_top_z_mm"] = round(float(vz.max()), 1)
    notes["precentral_voxels"] = total
    notes["precentral_valid_voxels"] = int(valid_pre.sum())
    return notes


def motor_cortex_indices(masks: RegionMasks, *, chi: np.ndarray | None = None,
                         r2star: np.ndarray | None = None,
                         vein_percentile: float = VEIN_PERCENTILE,
                         chain_response: Callable[[np.ndarray], np.ndarray] | None = None
                         ) -> MotorCortexIndices:
    """All motor-cortex indices of a session and their QC verdict.

    Parameters
    ----------
    masks : RegionMasks
        On the maps' grid.
    chi : ndarray (X, Y, Z), optional
        Susceptibility [ppm]; NaN outside the QSM mask.
    r2star : ndarray (X, Y, Z), optional
        R2* [1/s]; NaN where the fit failed.
    vein_percentile : float
        Per-region χ trimming percentile (veins).
    chain_response : callable, optional
        ``delta_chi [ppm] -> chi [ppm]``: the QSM chain rerun on the visit with a χ change
        added (:func:`alsiron.qsm.transfer.chain_response`).  Used only with
        partial-volume regions (a finer label image), for the ``gtmrc`` index; one more
        chain run.

    Returns
    -------
    MotorCortexIndices
        ``indices`` is the dict a :class:`~alsiron.cohort.records.SessionRecord` stores.

    Raises
    ------
    ValueError
        Neither map given, or a map on another grid than the masks.
    """
    maps: dict[str, np.ndarray | None] = {}
    for name, data in (("chi", chi), ("r2star", r2star)):
        if data is None:
            continue
        arr = np.asarray(data)
        if arr.shape != masks.shape:
            raise ValueError(f"{name} map has shape {arr.shape}, masks {masks.shape}")
        maps[name] = arr
    if not maps:
        raise ValueError("motor_cortex_indices needs a χ or an R2* map")
    indices = region_indices(maps, masks.regions(), vein_percentile=vein_percentile)
    indices.update(derived_contrasts(indices, list(maps)))
    pv_fits: dict[str, Any] = {}
    if masks.partial_volume is not None and "chi" in maps:
        corrected, pv_fits["chi"] = gtm_indices(maps["chi"], masks.partial_volume,
                                                vein_percentile=vein_percentile,
                                                chain_response=chain_response)
        indices.update(corrected)
    for name in indices:
        index_units(name)  # every name must follow the records convention
    ref = maps.get("chi", maps.get("r2star"))
    assert ref is not None
    notes = mask_coverage(masks, np.isfinite(ref))
    reasons = []
    status: QcStatus = "pass"
    lost = notes.get("precentral_lost_to_mask", 1.0)
    if lost > LOST_FAIL or notes.get("precentral_valid_voxels", 0) < MIN_VOXELS:
        status = "fail"
        reasons.append(f"{lost:.0%} of the precentral cortex has no valid map value")
    elif lost > LOST_WARN or notes.get("precentral_top_lost_to_mask", 0.0) > 2 * LOST_WARN:
        status = "warn"
        reasons.append(f"{lost:.0%} of the precentral cortex (top quarter: "
                       f"{notes.get('precentral_top_lost_to_mask', 0.0):.0%}) lost to the mask")
    if reasons:
        notes["precentral_qc_reasons"] = reasons
    params = {"VeinExclusion": f"per-region trimming of voxels above the "
                               f"{vein_percentile:g}th percentile of "
                               f"{'chi' if 'chi' in maps else 'R2*'}",
              "Statistics": list(STATISTICS), "Masks": masks.provenance}
    if pv_fits:
        params["PartialVolumeFits"] = pv_fits
    return MotorCortexIndices(indices=indices, qc_status=status, qc_notes=notes,
                              parameters=params)


# ---------------------------------------------------------------------------- output

_COLUMNS = {
    "index": {"Description": "index name {map}_{region}_{statistic} (alsiron.cohort.records)"},
    "map": {"Description": "source map", "Levels": {"chi": "magnetic susceptibility (ppm)",
                                                    "r2star": "R2* (1/s)"}},
    "region": {"Description": "region (see Regions below)"},
    "statistic": {"Description": "statistic over the region's voxels after vein trimming",
                  "Levels": {"mean": "mean", "median": "median", "p75": "75th percentile",
                             "p90": "90th percentile", "p95": "95th percentile",
                             "n": "voxel count",
                             "gtm": "partial-volume-corrected band value: geometric "
                                    "transfer matrix on the tissue fractions of a label "
                                    "image finer than the maps (alsiron.motor.pvc); "
                                    "with _minusWM, minus the white matter at the same "
                                    "place (the white matter's column replaced by a "
                                    "second-order polynomial in space)",
                             "gtmrc": "the gtm contrast divided by the QSM chain's transfer "
                                      "of a deep-band change, measured by rerunning the "
                                      "chain on the visit with the band's χ raised"}},
    "value": {"Description": "index value (n/a where the region is empty)"},
    "units": {"Description": "units of value", "Levels": {"ppm": "parts per million",
                                                          "1/s": "per second",
                                                          "voxel": "voxel count"}},
}

REGION_DESCRIPTIONS = {
    "precentral": "precentral gyrus cortical grey matter, both hemispheres",
    "_L / _R": "left / right hemisphere",
    "_leg / _hand / _face": "somatotopic thirds along the gyrus from the midline (leg) "
                            "through the middle (hand knob) to the lateral-inferior end "
                            "(face/bulbar)",
    "_deep / _superficial": "normalised cortical depth below / above 0.5 (deep = next to "
                            "white matter)",
    "underlyingwm": "white matter within 6 mm of the precentral cortex",
    "control": "control cortex (postcentral gyrus or a slab behind the precentral gyrus)",
    "_LminusR": "left minus right", "_minusWM": "minus underlyingwm",
    "_minusControl": "minus control", "_deepminusSuperficial": "deep minus superficial",
}


def _split(name: str) -> tuple[str, str, str]:
    map_name, rest = name.split("_", 1)
    region, stat = rest.rsplit("_", 1)
    return map_name, region, stat


def indices_table(result: MotorCortexIndices) -> str:
    """The indices as TSV text (one row per index, ``n/a`` for NaN)."""
    lines = ["\t".join(_COLUMNS)]
    for name, value in result.indices.items():
        m, region, stat = _split(name)
        text = "n/a" if not np.isfinite(value) else (
            f"{int(value)}" if stat == "n" else f"{value:.6g}")
        lines.append("\t".join([name, m, region, stat, text, index_units(name)]))
    return "\n".join(lines) + "\n"


def write_indices(path_tsv: str | Path, result: MotorCortexIndices, *,
                  overwrite: bool = False,
                  provenance: dict[str, Any] | None = None) -> list[Path]:
    """Write the indices TSV and its JSON data dictionary (same stem, ``.json``).

    The dictionary describes the columns and regions and records the QC verdict, the QC
    notes, every parameter of masks and indices and ``provenance`` (the input files'
    ``Sources`` and ``InputChecksums``, SHA-256) when given.
    """
    path_tsv = Path(path_tsv)
    dictionary = dict(_COLUMNS)
    dictionary.update({"Regions": REGION_DESCRIPTIONS, "HeadlineIndex": HEADLINE_INDEX,
                       "QcStatus": result.qc_status, "QcNotes": result.qc_notes,
                       "Parameters": result.parameters, **(provenance or {})})
    return [save_text(path_tsv, indices_table(result), overwrite=overwrite),
            save_json(path_tsv.with_suffix(".json"), dictionary, overwrite=overwrite)]


def summary_lines(result: MotorCortexIndices) -> list[str]:
    """A few human-readable lines for the command line."""
    ix = result.indices

    def fmt(name: str, scale: float = 1.0, unit: str = "") -> str:
        v = ix.get(name, float("nan"))
        return "n/a" if not np.isfinite(v) else f"{v * scale:+.1f}{unit}"

    lines = []
    if "chi_precentral_mean" in ix:
        lines.append(
            f"  chi precentral mean {fmt('chi_precentral_mean', 1e3)} ppb, deep "
            f"{fmt('chi_precentral_deep_mean', 1e3)} ppb (L "
            f"{fmt('chi_precentral_L_deep_mean', 1e3)}, R "
            f"{fmt('chi_precentral_R_deep_mean', 1e3)}), deep-superficial "
            f"{fmt('chi_precentral_deepminusSuperficial_mean', 1e3)} ppb, minus WM "
            f"{fmt('chi_precentral_minusWM_mean', 1e3)} ppb, minus control "
            f"{fmt('chi_precentral_minusControl_mean', 1e3)} ppb")
    if "r2star_precentral_mean" in ix:
        lines.append(f"  R2* precentral mean {fmt('r2star_precentral_mean')} 1/s, deep "
                     f"{fmt('r2star_precentral_deep_mean')} 1/s")
    notes = result.qc_notes
    lines.append(f"  QC {result.qc_status}: {notes.get('precentral_voxels', 0)} precentral "
                 f"voxels, {notes.get('precentral_lost_to_mask', float('nan')):.1%} lost to "
                 f"the mask (top quarter {notes.get('precentral_top_lost_to_mask', 0.0):.1%})")
    return lines
