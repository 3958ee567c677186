"""Participants per arm to detect a slowing of an index's yearly slope.

Two-arm trial, everyone scanned on the same visit schedule ``t_1 .. t_m`` (years), index
modelled as in :func:`alsiron.cohort.longitudinal.fit_cohort_model`: random intercept and slope
per participant, residual (scan) error.  The per-participant OLS slope then has variance

    V = σ_b² + σ_e² / Σ_j (t_j − t̄)²

(σ_b: SD of the true slopes between participants, σ_e: residual SD; the intercept variance
drops out), and the arms' mean slopes differ by ``Δ = slowing × slope``.  For complete,
balanced data the mixed-model estimate of the group × time effect equals the difference of
the mean OLS slopes, so the standard sample size per arm is

    n = 2 (z_{1−α/2} + z_{1−β})² V / Δ²

(e.g. Diggle et al., *Analysis of Longitudinal Data*, 2002, §2.4; the formula in
REFERENCES.md with ``σ²_slope = V``).  :func:`simulate_power` checks it by simulating
whole trials of the same design (random intercepts and slopes, scan noise, optional visit
jitter) and testing each with Welch's t-test on per-participant slopes.

Dropout and missed visits are not modelled: inflate ``n`` by ``1 / (1 − dropout)`` at least.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from alsiron.cohort.longitudinal import CohortModel
from alsiron.errors import AlsironError, InvalidInputError


@dataclass(frozen=True)
class PowerDesign:
    """A two-arm slope trial.

    Attributes
    ----------
    visit_years : tuple of float
        Visit times since baseline, years (baseline included).
    slope_per_year : float
        Yearly slope of the index that treatment slows, index units/year (by default the
        disease-related part: ALS slope minus control slope).
    slowing : float
        Fraction of that slope removed by treatment (0.3 = 30 % slower).
    residual_sd : float
        Residual (scan) SD of the index, index units.
    random_slope_sd : float
        SD of the true slopes between participants, units/year.
    random_intercept_sd, random_correlation : float
        Used by the simulation only (the slope test does not depend on them).
    alpha, power : float
        Two-sided significance level and target power.
    """

    visit_years: tuple[float, ...]
    slope_per_year: float
    slowing: float
    residual_sd: float
    random_slope_sd: float = 0.0
    random_intercept_sd: float = 0.0
    random_correlation: float = 0.0
    alpha: float = 0.05
    power: float = 0.8

    def __post_init__(self) -> None:
        t = np.asarray(self.visit_years, dtype=float)
        if t.size < 2 or np.ptp(t) <= 0 or not np.all(np.isfinite(t)):
            raise InvalidInputError("visit_years needs at least two distinct finite times")
        if not 0 < self.slowing <= 1:
            raise InvalidInputError(f"slowing must lie in (0, 1], got {self.slowing}")
        if not (self.residual_sd >= 0 and self.random_slope_sd >= 0):
            raise InvalidInputError("SDs must be >= 0")
        if not (0 < self.alpha < 1 and 0 < self.power < 1):
            raise InvalidInputError("alpha and power must lie in (0, 1)")
        if not (math.isfinite(self.slope_per_year) and self.slope_per_year != 0):
            raise InvalidInputError("slope_per_year must be finite and non-zero")
        if not -1 <= self.random_correlation <= 1:
            raise InvalidInputError("random_correlation must lie in [-1, 1]")

    @property
    def effect_per_year(self) -> float:
        """Difference of the arms' yearly slopes, ``slowing × slope``."""
        return self.slowing * self.slope_per_year

    @property
    def sxx(self) -> float:
        """Σ (t_j − t̄)², years²."""
        t = np.asarray(self.visit_years, dtype=float)
        return float(((t - t.mean()) ** 2).sum())

    @property
    def slope_variance(self) -> float:
        """Variance of one participant's OLS slope, ``σ_b² + σ_e² / Sxx``."""
        return self.random_slope_sd**2 + self.residual_sd**2 / self.sxx


def participants_per_arm(design: PowerDesign) -> float:
    """Participants per arm from the mixed-model formula (not rounded; use ``ceil``)."""
    z = stats.norm.ppf(1 - design.alpha / 2) + stats.norm.ppf(design.power)
    return float(2 * z**2 * design.slope_variance / design.effect_per_year**2)


def power_at(design: PowerDesign, n_per_arm: float) -> float:
    """Power of the slope comparison with ``n_per_arm`` participants per arm (normal
    approximation, the inverse of :func:`participants_per_arm`)."""
    se = math.sqrt(2 * design.slope_variance / n_per_arm)
    z = abs(design.effect_per_year) / se - stats.norm.ppf(1 - design.alpha / 2)
    return float(stats.norm.cdf(z))


def simulate_power(design: PowerDesign, n_per_arm: int, *, n_sims: int = 2000,
                   seed: int = 0, visit_jitter_years: float = 0.0) -> tuple[float, float]:
    """Fraction of simulated trials whose slope difference is significant.

    Each trial draws ``n_per_arm`` participants per arm with correlated random intercepts
    and slopes, adds scan noise at every visit (times jittered by ±``visit_jitter_years``
    after baseline, as visits drift in practice), fits each participant's OLS slope and
    compares the arms with Welch's t-test at ``alpha``.

    Returns
    -------
    power, standard_error : float
    """
    if n_per_arm < 2 or n_sims < 1:
        raise ValueError("need n_per_arm >= 2 and n_sims >= 1")
    rng = np.random.default_rng([seed, 0x90_3E])
    t = np.asarray(design.visit_years, dtype=float)
    shape = (n_sims, 2, n_per_arm)
    times = np.broadcast_to(t, (*shape, t.size)).copy()
    if visit_jitter_years > 0:
        times[..., 1:] += rng.uniform(-visit_jitter_years, visit_jitter_years,
                                      (*shape, t.size - 1))
    z1 = rng.standard_normal(shape)
    z2 = rng.standard_normal(shape)
    rho = design.random_correlation
    intercept = design.random_intercept_sd * z1
    slope_dev = design.random_slope_sd * (rho * z1 + math.sqrt(1 - rho**2) * z2)
    arm_slope = np.array([design.slope_per_year,
                          design.slope_per_year - design.effect_per_year])[None, :, None]
    slope = arm_slope + slope_dev
    y = (intercept[..., None] + slope[..., None] * times
         + design.residual_sd * rng.standard_normal((*shape, t.size)))
    tc = times - times.mean(axis=-1, keepdims=True)
    fitted = (tc * (y - y.mean(axis=-1, keepdims=True))).sum(-1) / (tc**2).sum(-1)
    _, p = stats.ttest_ind(fitted[:, 0], fitted[:, 1], axis=-1, equal_var=False)
    hits = float(np.mean(p < design.alpha))
    return hits, math.sqrt(max(hits * (1 - hits), 1e-12) / n_sims)


def simulated_participants_per_arm(design: PowerDesign, *, n_sims: int = 2000, seed: int = 0,
                                   visit_jitter_years: float = 0.0) -> float:
    """Smallest ``n`` per arm whose simulated power reaches ``design.power``.

    Bisection over integers, every candidate simulated with the same seed (common random
    numbers keep the power curve monotone), then linear interpolation of the power between
    the two bracketing sizes.
    """
    def sim(n: int) -> float:
        return simulate_power(design, n, n_sims=n_sims, seed=seed,
                              visit_jitter_years=visit_jitter_years)[0]

    lo, hi = 2, max(4, math.ceil(participants_per_arm(design)))
    while sim(hi) < design.power:
        lo, hi = hi, hi * 2
        if hi > 1_000_000:
            raise AlsironError("more than a million participants per arm would be needed")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if sim(mid) >= design.power:
            hi = mid
        else:
            lo = mid
    p_lo, p_hi = sim(lo), sim(hi)
    if p_hi <= p_lo:
        return float(hi)
    return lo + (design.power - p_lo) / (p_hi - p_lo)


def design_from_model(model: CohortModel, slowing: float, *,
                      visit_years: tuple[float, ...] | None = None,
                      treated_group: str | None = None, slope: str = "excess",
                      alpha: float = 0.05, power: float = 0.8) -> PowerDesign:
    """Trial design from a fitted cohort model's slopes and variance components.

    Parameters
    ----------
    model : CohortModel
    slowing : float
        Fraction of the slope removed by treatment.
    visit_years : tuple of float, optional
        Planned visit schedule (default: the cohort's median schedule).
    treated_group : str, optional
        Group to be treated (default: the first non-reference group, e.g. ``ALS``).
    slope : {"excess", "total"}
        ``excess``: the group's slope minus the reference (control) slope, i.e. the
        disease-related change (treatment is not expected to slow ageing); ``total``: the
        group's whole slope.  With a single group both mean its slope.
    alpha, power : float

    Raises
    ------
    AlsironError
        Unknown group, or a slope of zero.
    """
    if slope not in ("excess", "total"):
        raise InvalidInputError("slope must be 'excess' or 'total'")
    groups = [g for g in model.groups if g != model.reference_group]
    group = treated_group or (groups[0] if groups else model.groups[0])
    if group not in model.slope_per_year:
        raise AlsironError(f"group {group!r} is not in the cohort model "
                           f"(groups: {', '.join(model.groups)})")
    value = model.slope_per_year[group]
    if slope == "excess" and model.reference_group is not None and group != model.reference_group:
        value -= model.slope_per_year[model.reference_group]
    if value == 0 or not math.isfinite(value):
        raise AlsironError(f"the {slope} slope of {group} is {value}: nothing to slow")
    corr = model.random_correlation if math.isfinite(model.random_correlation) else 0.0
    return PowerDesign(visit_years=tuple(visit_years or model.visit_years), slope_per_year=value,
                       slowing=slowing, residual_sd=model.residual_sd,
                       random_slope_sd=model.random_slope_sd,
                       random_intercept_sd=model.random_intercept_sd,
                       random_correlation=corr, alpha=alpha, power=power)


def schedule(duration_years: float, interval_months: float) -> tuple[float, ...]:
    """Visit times 0, interval, 2 × interval, ... up to ``duration_years`` (inclusive)."""
    if duration_years <= 0 or interval_months <= 0:
        raise InvalidInputError("duration and interval must be positive")
    step = interval_months / 12.0
    n = int(math.floor(duration_years / step + 1e-9))
    return tuple(round(k * step, 6) for k in range(n + 1))


__all__ = ["PowerDesign", "participants_per_arm", "power_at", "simulate_power",
           "simulated_participants_per_arm", "design_from_model", "schedule"]
