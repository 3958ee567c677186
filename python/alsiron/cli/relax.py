"""``alsiron relax``: options → :class:`~alsiron.relax.chain.RelaxParameters`, then
:func:`alsiron.runs.relax.run_relax_subject`, printing one summary per visit."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from alsiron.cli._options import method_choice
from alsiron.relax import R2STAR_METHODS


@click.command("relax")
@click.argument("subj_dir", type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Derivatives folder (default: <dataset>/derivatives/alsiron).")
@click.option("--r2star-method", type=method_choice(R2STAR_METHODS),
              default="weighted", show_default=True, help="R2* estimator.")
@click.option("--noise-sigma", type=float, default=None,
              help="Noise SD of the magnitude data (Rician NLLS and CRLB maps).")
@click.option("--b0-gradient-correction/--no-b0-gradient-correction", default=True,
              show_default=True,
              help="Correct R2* for intravoxel dephasing in macroscopic field gradients "
                   "(field map from the MEGRE phase).")
@click.option("--field-strength", type=float, default=None,
              help="B0 in tesla, overriding MagneticFieldStrength.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
def relax_cmd(subj_dir: Path, out: Path | None, r2star_method: str, noise_sigma: float | None,
              b0_gradient_correction: bool, field_strength: float | None,
              overwrite: bool) -> None:
    """R2*/T2*/S0 (MEGRE), R2/T2/B1 (MESE, EPG) and R2' maps for every session."""
    from alsiron.relax.chain import RelaxParameters
    from alsiron.runs.relax import run_relax_subject

    params = RelaxParameters(r2star_method=r2star_method, noise_sigma=noise_sigma,
                             b0_gradient_correction=b0_gradient_correction)
    for oc in run_relax_subject(subj_dir, params, out=out, field_strength=field_strength,
                                overwrite=overwrite):
        result = oc.result
        r2s = result.r2star.r2star[result.brain_mask]
        line = f"{oc.label}: R2* ({r2star_method}) median {np.nanmedian(r2s):.1f} 1/s"
        if result.r2prime is not None:
            neg = result.r2prime_summary
            line += (f", R2 median {np.nanmedian(result.r2_on_megre[result.brain_mask]):.1f}"
                     f" 1/s, R2' negative in {neg['NegativeVoxels']} of {neg['Voxels']} "
                     "voxels")
        else:
            line += " (no MESE: R2, T2, B1, R2' skipped)"
        click.echo(line + f"\n  {len(oc.written)} maps written to {oc.out_root} in "
                   f"{oc.seconds:.1f} s")
