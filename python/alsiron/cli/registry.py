"""``alsiron registry export`` and ``alsiron normative build``: the results registry as
TSV, and the normative model fitted to its control sessions."""

from __future__ import annotations

from pathlib import Path

import click

from alsiron.cli._options import registry_option
from alsiron.cohort.normative import AGE_DF_CHOICES


@click.group("registry")
def registry_group() -> None:
    """Results registry: one record per processed session, with history."""


@registry_group.command("export")
@click.argument("out_tsv", type=click.Path(dir_okay=False, path_type=Path))
@registry_option
@click.option("--all", "include_history", is_flag=True,
              help="Also export superseded records (with is_current and superseded_at).")
@click.option("--overwrite", is_flag=True, help="Replace an existing TSV.")
def registry_export(out_tsv: Path, registry: str | None, include_history: bool,
                    overwrite: bool) -> None:
    """Write the registry's current records as TSV (plus a JSON data dictionary)."""
    from alsiron.cohort.registry import Registry, resolve_location

    with Registry.open(resolve_location(registry), create=False) as reg:
        n = len(reg.rows(include_history=include_history))
        reg.export_tsv(out_tsv, overwrite=overwrite, include_history=include_history)
    click.echo(f"registry: {n} record(s) written to {out_tsv}")


@click.group("normative")
def normative_group() -> None:
    """Normative model of the indices in healthy controls (for z-scores)."""


@normative_group.command("build")
@click.option("--group", default="control", show_default=True,
              help="Reference group label (participants.tsv 'group').")
@registry_option
@click.option("--dataset", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="BIDS dataset whose default registry to read (instead of --registry).")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Model file to write (JSON).")
@click.option("--index", "indices", multiple=True,
              help="Index to model (repeat); default: every index finite in >= 90 % of the "
                   "controls, voxel counts excepted.")
@click.option("--age-df", type=click.Choice(["auto", *map(str, AGE_DF_CHOICES)]), default="auto",
              show_default=True, help="Age spline degrees of freedom (1 = linear; auto = BIC).")
@click.option("--visits", type=click.Choice(["baseline", "all"]), default="baseline",
              show_default=True, help="One scan per control (earliest) or every visit.")
@click.option("--overwrite", is_flag=True, help="Replace an existing model file.")
def normative_build(group: str, registry: str | None, dataset: Path | None, out: Path,
                    indices: tuple[str, ...], age_df: str, visits: str,
                    overwrite: bool) -> None:
    """Fit the normative model to the registry's GROUP sessions and save it as JSON."""
    from alsiron.cohort.normative import build_normative_model
    from alsiron.cohort.registry import Registry, display_location, resolve_location
    from alsiron.errors import OutputExistsError

    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: already exists (use --overwrite to replace it)")
    location = resolve_location(registry, dataset)
    with Registry.open(location, create=False) as reg:
        records = reg.sessions()
    model = build_normative_model(records, group=group, indices=list(indices) or None,
                                  age_df="auto" if age_df == "auto" else int(age_df),
                                  visits=visits, source=display_location(location))  # type: ignore[arg-type]
    model.save(out, overwrite=overwrite)
    c = model.cohort
    click.echo(f"normative: {c['n_sessions']} {group} sessions (sites "
               f"{', '.join(f'{k}: {v}' for k, v in c['n_by_site'].items())}; ages "
               f"{c['age_range_years'][0]:g}-{c['age_range_years'][1]:g}), "
               f"{len(model.indices)} indices, age df {model.age_basis.df}, "
               f"{model.harmonisation_label} -> {out}")
