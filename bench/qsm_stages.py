"""Per-stage QSM accuracy on the head phantom, QSM-CI style (docs/qsm_stages.md).

Dipole stage: every inversion with default parameters from the phantom's true local
field, on each phantom of :data:`alsiron.stages.CASES`. Prints one Markdown table row per
(stage, phantom, method) in the column order of docs/qsm_stages.md, so other stages can
add rows to the same table.

Run: ``python bench/qsm_stages.py [CASE ...]`` (default: all cases).
"""

from __future__ import annotations

import sys

from alsiron import inversion, stages

#: Column order of the stage table.
COLUMNS = ("stage", "phantom", "method", "NRMSE %", "HFEN %", "XSIM", "deep-grey slope",
           "R²", "iterations", "time s")


def dipole_rows(case_keys: list[str]) -> list[dict]:
    rows = []
    for key in case_keys:
        case = stages.CASES[key]
        session = stages.simulate(case)
        truth = stages.truth_of(session)
        variants = [(m, None) for m in inversion.INVERSION_METHODS]
        variants.insert(variants.index(("tvadmm", None)) + 1,
                        ("tvadmm", inversion.InversionSettings(tv_weak_harmonic=True)))
        for method, settings in variants:
            s = stages.dipole_stage(session, method, settings, truth=truth)
            name = s["record"]["Method"]
            rows.append({"stage": "dipole (true local field → χ)", "phantom": case.name,
                         "method": name, "NRMSE %": f"{s['NRMSE_pct']:.1f}",
                         "HFEN %": f"{s['HFEN_pct']:.1f}", "XSIM": f"{s['XSIM']:.3f}",
                         "deep-grey slope": f"{s['DeepGreySlope']:.2f}",
                         "R²": f"{s['DeepGreyR2']:.2f}",
                         "iterations": str(s["record"].get("IterationsRun", "—")),
                         "time s": f"{s['seconds']:.2f}"})
            print("| " + " | ".join(rows[-1][c] for c in COLUMNS) + " |", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    keys = (sys.argv[1:] if argv is None else argv) or list(stages.CASES)
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    dipole_rows(keys)


if __name__ == "__main__":
    main()
