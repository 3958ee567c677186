"""Per-stage QSM accuracy on the head phantom, QSM-CI style (docs/qsm_stages.md).

Dipole stage: every inversion with default parameters from the phantom's true local
field, on each phantom of :data:`alsiron.evaluation.stages.CASES`. Prints one Markdown table row per
(stage, phantom, method) in the column order of docs/qsm_stages.md, so other stages can
add rows to the same table.

Whole chain (``--chain``): ROMEO + PDF once per phantom, then each inversion on the
chain's own local field (:func:`alsiron.evaluation.stages.chain_inversions`), scored in the chain's
own QSM mask and in the fixed stage-input mask (:func:`alsiron.evaluation.stages.stage_input_mask`);
``--snr 25`` for the noisier phantom.

Run: ``python bench/qsm_stages.py [--chain] [--snr S] [--seed N] [CASE ...]`` (default:
all cases).
"""

from __future__ import annotations

import sys

from alsiron.evaluation import stages
from alsiron.qsm import inversion

#: Column order of the stage table.
COLUMNS = ("stage", "phantom", "method", "NRMSE %", "HFEN %", "XSIM", "deep-grey slope",
           "R²", "iterations", "time s")


def dipole_rows(case_keys: list[str]) -> list[dict]:
    rows = []
    for key in case_keys:
        case = stages.CASES[key]
        session = stages.simulate(case)
        truth = stages.truth_of(session)
        # The dipole stage starts from the true local field; a single-step method starts
        # from the total field (bench/anatomy_candidates.py measures it).
        variants = [(m, None) for m in inversion.INVERSION_METHODS
                    if m not in inversion.SINGLE_STEP_METHODS]
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


def chain_rows(case_keys: list[str], snr: float, seed: int | None) -> list[dict]:
    rows = []
    methods = [("tvadmm", None), ("ilsqr", None), ("rts", None), ("medi", None),
               ("medi", inversion.InversionSettings(medi_alpha_rule="fixed"))]
    for key in case_keys:
        case = stages.CASES[key]
        session = stages.simulate_stage_phantom(case.matrix, case.voxel_size,
                                                b0_direction=case.b0_direction, snr=snr,
                                                seed=case.seed if seed is None else seed)
        fixed = stages.stage_input_mask(session, None)
        scored = [(s, "own mask") for s in stages.chain_inversions(session, methods)]
        scored += [(s, "stage-input mask")
                   for s in stages.chain_inversions(session, methods, eval_mask=fixed)]
        for s, where in scored:
            rows.append({"stage": f"whole chain (phase → χ), SNR {snr:g}",
                         "phantom": f"{case.name}, seed {case.seed if seed is None else seed}, "
                                    f"{where}",
                         "method": s.method, "NRMSE %": f"{s.chi_nrmse_pct:.1f}",
                         "HFEN %": f"{s.chi_hfen_pct:.1f}", "XSIM": f"{s.xsim:.3f}",
                         "deep-grey slope": f"{s.deep_grey_slope:.2f}",
                         "R²": f"{s.deep_grey_r2:.2f}", "iterations": "—",
                         "time s": f"{s.seconds:.2f}"})
            print("| " + " | ".join(rows[-1][c] for c in COLUMNS) + " |", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    chain = "--chain" in args
    snr, seed = 100.0, None
    for flag in ("--snr", "--seed"):
        if flag in args:
            i = args.index(flag)
            value = args[i + 1]
            del args[i:i + 2]
            if flag == "--snr":
                snr = float(value)
            else:
                seed = int(value)
    keys = [a for a in args if a != "--chain"] or list(stages.CASES)
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    if chain:
        chain_rows(keys, snr, seed)
    else:
        dipole_rows(keys)


if __name__ == "__main__":
    main()
