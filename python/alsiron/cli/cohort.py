"""``alsiron report``, ``alsiron longitudinal`` and ``alsiron power``: the cohort commands,
reading the results registry (tables printed by :mod:`alsiron.cli._cohort_text`)."""

from __future__ import annotations

from pathlib import Path

import click

from alsiron.cli._cohort_text import cohort_text, fmt, model_text, retest_line, trajectory_text
from alsiron.cli._options import normative_option, out_file_option, registry_option


@click.command("report")
@click.argument("path", type=click.Path(path_type=Path), required=False)
@click.option("--cohort", is_flag=True,
              help="Write the cohort page (PATH, if given, is the dataset folder).")
@registry_option
@normative_option("Normative model JSON for z-scores and bands.")
@click.option("--qc", "qc_images", multiple=True, type=click.Path(path_type=Path),
              help="QC montage PNG to embed (repeat); default: every PNG under the subject's "
                   "derivatives folder.")
@out_file_option("HTML file (default: <derivatives>/alsiron/sub-X/sub-X_report.html or "
                 "<derivatives>/alsiron/cohort_report.html).")
@click.option("--overwrite", is_flag=True, help="Replace an existing page.")
def report_cmd(path: Path | None, cohort: bool, registry: str | None,
               normative: Path | None, qc_images: tuple[Path, ...], out: Path | None,
               overwrite: bool) -> None:
    """Self-contained HTML report of a subject (PATH = sub-XX folder) or of the cohort."""
    from alsiron.cohort import report
    from alsiron.cohort.normative import NO_MODEL_MESSAGE, load_model
    from alsiron.cohort.registry import Registry, display_location, resolve_location
    from alsiron.io import bids as ingest

    if path is None and not cohort:
        raise click.UsageError("give a subject folder, or --cohort")
    root = ingest.dataset_root(path) if path is not None else None
    location = resolve_location(registry, root)
    model = load_model(normative) if normative is not None else None
    if model is None:
        click.echo(f"report: {NO_MODEL_MESSAGE}", err=True)
    derivs = (root / "derivatives" / "alsiron") if root is not None else Path(".")
    with Registry.open(location, create=False) as reg:
        if cohort:
            records = reg.sessions()
            if not records:
                raise click.UsageError(f"the registry {display_location(location)} has no sessions")
            page = report.render_cohort_report(records, model=model, model_path=normative)
            target = out or derivs / "cohort_report.html"
        else:
            subject = Path(path).resolve().name  # type: ignore[arg-type]
            records = reg.sessions(subject)
            if not records:
                raise click.UsageError(f"the registry {display_location(location)} has no "
                                       f"sessions of {subject}: process it first "
                                       "(alsiron qsm)")
            qc = list(qc_images) or report.find_qc_images(derivs / subject)
            page = report.render_subject_report(records, model=model, model_path=normative,
                                                qc_images=qc)
            target = out or derivs / subject / f"{subject}_report.html"
    report.write_report(target, page, overwrite=overwrite)
    click.echo(f"report: {target}")


def _open_registry_records(registry: str | None, dataset_root: Path | None):
    """Current records of the registry named by --registry/$ALSIRON_REGISTRY/the dataset."""
    from alsiron.cohort.registry import Registry, default_registry_path, resolve_location

    if registry is None and dataset_root is None:
        local = default_registry_path(Path.cwd() / "derivatives")
        if local.exists():
            dataset_root = Path.cwd()
    with Registry.open(resolve_location(registry, dataset_root), create=False) as reg:
        return reg.sessions()


def _retest_from_option(retest_sd: float | None, normative: Path | None, records, index: str):
    """--retest-sd if given, else same-day repeats in the registry, else the normative
    model's residual SD (conservative), else None."""
    from alsiron.cohort import longitudinal as lg

    if retest_sd is not None:
        if not retest_sd > 0:
            raise click.BadParameter("--retest-sd must be positive")
        return lg.RetestSD(sd=retest_sd, source="given")
    found = lg.within_subject_sd(records, index)
    if found is None and normative is not None:
        found = lg.retest_from_normative(normative, index)
    return found


@click.command("longitudinal")
@click.argument("subj_dir", type=click.Path(file_okay=False, path_type=Path), required=False)
@click.option("--cohort", is_flag=True, help="Every subject, plus the cohort mixed model.")
@click.option("--index", "index", default=None,
              help="Index name (default: chi_precentral_deep_mean).")
@registry_option
@click.option("--retest-sd", type=float, default=None,
              help="Within-subject (test-retest) SD in index units (ppm for χ), e.g. a "
                   "published value; overrides the SD from same-day repeats in the registry.")
@normative_option("Normative model JSON whose residual SD stands in for the test-retest SD "
                  "when the registry has no same-day repeats (conservative).")
@out_file_option("Also write the per-visit table as TSV (+ JSON dictionary; with --cohort "
                 "the mixed model as <stem>_model.json).")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
def longitudinal_cmd(subj_dir: Path | None, cohort: bool, index: str | None,
                     registry: str | None, retest_sd: float | None, normative: Path | None,
                     out: Path | None, overwrite: bool) -> None:
    """Change from baseline (with RCI and MDC95), yearly slopes and the cohort model."""
    from alsiron.cohort import longitudinal as lg
    from alsiron.cohort.records import HEADLINE_INDEX, index_units
    from alsiron.errors import InputError
    from alsiron.io import bids as ingest

    if (subj_dir is None) == (not cohort):
        raise click.UsageError("give SUBJ_DIR or --cohort (not both)")
    index = index or HEADLINE_INDEX
    units = index_units(index)
    dataset_root = ingest.dataset_root(subj_dir) if subj_dir is not None else None
    records = _open_registry_records(registry, dataset_root)
    retest = _retest_from_option(retest_sd, normative, records, index)
    if subj_dir is not None:
        subject = subj_dir.resolve().name
        mine = [r for r in records if r.subject == subject]
        if not mine:
            raise InputError(subj_dir, f"{subject} has no records in the registry (process "
                                       "its sessions first)")
        trajectories = [lg.subject_trajectory(mine, index, retest=retest)]
    else:
        trajectories = lg.cohort_trajectories(records, index, retest=retest)
        if not trajectories:
            raise click.ClickException(f"no subject has a usable {index}")
    click.echo(retest_line(retest, units))
    model = None
    if subj_dir is not None:
        click.echo(trajectory_text(trajectories[0], units))
    else:
        click.echo(cohort_text(trajectories, units))
        model = lg.fit_cohort_model(records, index)
        click.echo(model_text(model))
    click.echo(f"note: {lg.SINGLE_SUBJECT_CAVEAT}")
    if out is not None:
        lg.write_visit_table(out, trajectories, overwrite=overwrite)
        if model is not None:
            from alsiron.io.atomic import save_json

            save_json(out.with_name(out.stem + "_model.json"), lg.model_summary(model),
                      overwrite=overwrite)
        click.echo(f"written: {out}")


@click.command("power")
@registry_option
@click.option("--index", "index", default=None,
              help="Index name (default: chi_precentral_deep_mean).")
@click.option("--slowing", type=click.FloatRange(0, 1, min_open=True), default=0.3,
              show_default=True, help="Fraction of the yearly slope removed by treatment.")
@click.option("--alpha", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=0.05, show_default=True, help="Two-sided significance level.")
@click.option("--power", "target_power", type=click.FloatRange(0, 1, min_open=True,
              max_open=True), default=0.8, show_default=True, help="Target power.")
@click.option("--visits", default=None, metavar="T0,T1,...",
              help="Visit times in years (default: the cohort's median schedule).")
@click.option("--duration", type=float, default=None,
              help="Trial length in years (with --interval-months).")
@click.option("--interval-months", type=float, default=None, help="Months between visits.")
@click.option("--group", default=None, help="Group to treat (default: the non-control group).")
@click.option("--slope", "slope_kind", type=click.Choice(["excess", "total"]), default="excess",
              show_default=True, help="Slow the group's slope beyond controls' (excess) or "
                                      "its whole slope (total).")
@click.option("--slope-per-year", type=float, default=None,
              help="Planning without a registry: the yearly slope to slow (index units).")
@click.option("--residual-sd", type=float, default=None,
              help="Planning without a registry: residual (scan) SD (index units).")
@click.option("--slope-sd", type=float, default=0.0, show_default=True,
              help="Planning without a registry: between-subject SD of slopes (units/year).")
@click.option("--simulate", "n_sims", type=click.IntRange(0, 100_000), default=1000,
              show_default=True, help="Trials to simulate to check the formula (0: skip).")
@click.option("--seed", type=int, default=0, show_default=True, help="Simulation seed.")
def power_cmd(registry: str | None, index: str | None, slowing: float, alpha: float,
              target_power: float, visits: str | None, duration: float | None,
              interval_months: float | None, group: str | None, slope_kind: str,
              slope_per_year: float | None, residual_sd: float | None, slope_sd: float,
              n_sims: int, seed: int) -> None:
    """Participants per arm to detect a slowing of the index's yearly slope."""
    import math

    from alsiron.cohort import longitudinal as lg
    from alsiron.cohort import power as pw
    from alsiron.cohort.records import HEADLINE_INDEX, index_units

    index = index or HEADLINE_INDEX
    units = index_units(index)
    schedule = None
    if visits is not None:
        try:
            schedule = tuple(float(x) for x in visits.split(","))
        except ValueError:
            raise click.BadParameter(f"--visits must be comma-separated years, got {visits!r}"
                                     ) from None
    elif (duration is None) != (interval_months is None):
        raise click.UsageError("--duration and --interval-months go together")
    elif duration is not None:
        schedule = pw.schedule(duration, interval_months)
    if (slope_per_year is None) != (residual_sd is None):
        raise click.UsageError("--slope-per-year and --residual-sd go together")
    if slope_per_year is not None:
        if schedule is None:
            raise click.UsageError("planning without a registry needs --visits or "
                                   "--duration with --interval-months")
        design = pw.PowerDesign(visit_years=schedule, slope_per_year=slope_per_year,
                                slowing=slowing, residual_sd=residual_sd,
                                random_slope_sd=slope_sd, alpha=alpha, power=target_power)
        click.echo("from the given slope and SDs")
    else:
        model = lg.fit_cohort_model(_open_registry_records(registry, None), index)
        click.echo(model_text(model))
        design = pw.design_from_model(model, slowing, visit_years=schedule,
                                      treated_group=group, slope=slope_kind, alpha=alpha,
                                      power=target_power)
    n = pw.participants_per_arm(design)
    visits_text = ", ".join(f"{t:.2f}" for t in design.visit_years)
    slope_text = fmt(design.slope_per_year, units, signed=True)
    click.echo(f"design: visits at {visits_text} years; slope {slope_text}/year, "
               f"{slowing:.0%} slowing = {fmt(design.effect_per_year, units, signed=True)}/year; "
               f"alpha {alpha:g}, power {target_power:g}")
    click.echo(f"participants per arm: {math.ceil(n)} (formula 2(z_a/2+z_b)^2 (s_slope^2 + "
               f"s_e^2/Sxx) / D^2 = {n:.1f}; no dropout)")
    if n_sims > 0:
        achieved, se = pw.simulate_power(design, math.ceil(n), n_sims=n_sims, seed=seed)
        click.echo(f"simulation ({n_sims} trials, Welch t-test on per-subject slopes): power "
                   f"{achieved:.3f} +/- {se:.3f} with {math.ceil(n)} per arm")
