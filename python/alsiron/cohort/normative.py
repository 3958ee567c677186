"""Normative model of the iron indices in healthy controls, and z-scores of new sessions.

Per index the model is, for participant i at site s(i) and scan j,

    y_ij = a_s(i) + f(age_ij) + b_sex·[sex = M] + u_i + e_ij,   u ~ (0, σb²), e ~ (0, σw²)

with ``a_s`` a site intercept (or, when every site has at least
:data:`COMBAT_MIN_PER_SITE` controls, one intercept after ComBat harmonisation of
location and scale, Johnson et al. 2007: :func:`combat_fit`), ``f`` a natural cubic
spline of age whose degrees of freedom are chosen by BIC under a cap of one parameter
per :data:`PARTICIPANTS_PER_PARAMETER` participants (1 = a straight line), fitted by
least squares to the participants' mean values (one row per participant, so repeated
visits are not counted as independent controls). A new session's score is Student-t:

    t = (y − x₀ᵀβ̂) / sqrt(τ̂²(1 + h₀) + σ̂w²(1 − 1/k̄)),   h₀ = x₀ᵀ(X̄ᵀX̄)⁻¹x₀,
    z = Φ⁻¹(F_t,ν(t))

with τ̂² the residual variance of participant means (every fitted parameter counted),
σ̂w² the scan-to-scan variance (0 with one scan per control), k̄ the harmonic mean of
scans per control and ν from Satterthwaite (= participants − parameters with one scan
each). Held-out controls then have z ~ N(0, 1) whatever the reference size; the model's
own controls are scored leave-one-subject-out by :meth:`NormativeModel.held_out_z_scores`.

The model is stored as a versioned JSON document (:data:`SCHEMA_VERSION`) with the cohort
summary, the site estimates and the provenance; see docs/normative.md.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import os
import platform
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

import alsiron
from alsiron.cohort.records import SessionRecord, index_units
from alsiron.errors import InputError, InvalidInputError
from alsiron.io.atomic import save_json, sha256_file

log = logging.getLogger("alsiron")

#: Version of the JSON layout written by :meth:`NormativeModel.save` (2: participant-level
#: least squares, Student-t z; version 1 files are refused with a message to rebuild).
SCHEMA_VERSION = 2
#: Value of the ``format`` key that identifies a normative-model file.
MODEL_FORMAT = "alsiron-normative-model"
#: Below this many indices the ComBat site estimates are not pooled across indices
#: (empirical Bayes needs a distribution of site effects across features to shrink to).
MIN_FEATURES_FOR_EB = 5
#: Sites with fewer eligible control participants are left out of the fit (their
#: sessions are then scored as from an unknown site). Two is the least that leaves a
#: site intercept estimable after leaving one participant out; the intercept's own
#: uncertainty is in every z of that site.
MIN_CONTROLS_PER_SITE = 2
#: Fewest control participants (not scans) a model is built from.
MIN_PARTICIPANTS = 8
#: Below this many control participants every z-score carries a "small reference" note:
#: still calibrated over cohorts, but the centre of one cohort's z is uncertain.
SMALL_REFERENCE = 20
#: ComBat's per-site scale step (and empirical Bayes) is used only when every site has
#: at least this many control participants; below, a site scale is too noisy to divide
#: by, and the sites enter the regression as intercepts.
COMBAT_MIN_PER_SITE = 20
#: At least this many participants per estimated mean parameter (caps the age-spline df).
PARTICIPANTS_PER_PARAMETER = 10
#: Controls whose participant-level residual exceeds this many robust (Huber) SDs are
#: flagged in the model and the log (kept in the fit).
OUTLIER_CUT = 3.5
#: Knot quantiles of the natural cubic spline by number of knots (Harrell, Regression
#: Modeling Strategies, 2nd ed., table 2.3).
KNOT_QUANTILES = {3: (0.10, 0.50, 0.90), 4: (0.05, 0.35, 0.65, 0.95),
                  5: (0.05, 0.275, 0.50, 0.725, 0.95)}
#: Spline degrees of freedom tried by the BIC selection (1 = linear in age).
AGE_DF_CHOICES = (1, 2, 3, 4)
#: Two-sided 95 % normal quantile (a band edge scores ±Z95).
Z95 = 1.959963984540054

#: What ``alsiron qsm --normative`` (and the report) say when there is no model.
NO_MODEL_MESSAGE = (
    "no normative model: z-scores need one built from healthy controls. Build it from the "
    "registry's control sessions with `alsiron normative build --group control "
    "--registry REGISTRY --out normative_model.json` (the registry fills as sessions are "
    "processed), then pass `--normative normative_model.json`.")

_SEX_CODES = {"m": "M", "male": "M", "f": "F", "female": "F"}


def normalise_sex(value: str | None) -> str | None:
    """``"M"``/``"F"`` from the common spellings (case-insensitive); None otherwise."""
    if value is None:
        return None
    return _SEX_CODES.get(str(value).strip().lower())


# ----------------------------------------------------------------------------- age basis


@dataclass(frozen=True)
class AgeBasis:
    """Natural cubic spline basis of age (linear beyond the outer knots).

    Attributes
    ----------
    centre_years, scale_years : float
        Age is used as ``u = (age − centre) / scale`` (keeps the cubic terms well scaled).
    knots : tuple of float
        Knots in ``u`` units; empty for the linear basis (df = 1).
    """

    centre_years: float
    scale_years: float
    knots: tuple[float, ...] = ()

    @property
    def df(self) -> int:
        """Number of basis columns (the intercept is not part of the basis)."""
        return 1 if not self.knots else len(self.knots) - 1

    @classmethod
    def from_ages(cls, ages: np.ndarray, df: int) -> AgeBasis:
        """Basis with ``df`` columns and knots at Harrell's quantiles of ``ages`` (years)."""
        ages = np.asarray(ages, dtype=float)
        centre, scale = float(np.median(ages)), 10.0
        if df == 1:
            return cls(centre, scale)
        if df + 1 not in KNOT_QUANTILES:
            raise InvalidInputError(f"age spline df must be one of {AGE_DF_CHOICES}, got {df}")
        u = (ages - centre) / scale
        knots = tuple(float(k) for k in np.quantile(u, KNOT_QUANTILES[df + 1]))
        if np.any(np.diff(knots) <= 0):
            raise InvalidInputError(f"too few distinct ages for an age spline with {df} df")
        return cls(centre, scale, knots)

    def __call__(self, ages: np.ndarray | float) -> np.ndarray:
        """Basis matrix (n, df) at ``ages`` (years)."""
        u = (np.atleast_1d(np.asarray(ages, dtype=float)) - self.centre_years) / self.scale_years
        columns = [u]
        if self.knots:
            k = np.asarray(self.knots)

            def d(j: int) -> np.ndarray:
                return ((np.maximum(u - k[j], 0.0) ** 3 - np.maximum(u - k[-1], 0.0) ** 3)
                        / (k[-1] - k[j]))

            last = d(len(k) - 2)
            columns += [d(j) - last for j in range(len(k) - 2)]
        return np.column_stack(columns)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"basis": "natural cubic spline" if self.knots else "linear",
                "centre_years": self.centre_years, "scale_years": self.scale_years,
                "knots_years": [self.centre_years + self.scale_years * k for k in self.knots],
                "df": self.df}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AgeBasis:
        """Inverse of :meth:`to_dict`."""
        centre, scale = float(d["centre_years"]), float(d["scale_years"])
        return cls(centre, scale, tuple((float(k) - centre) / scale for k in d["knots_years"]))


# -------------------------------------------------------------------------------- ComBat


@dataclass
class CombatEstimates:
    """ComBat location/scale model fitted to a (samples × features) table.

    Attributes
    ----------
    sites : list of str
        Site labels, in the row order of the per-site arrays.
    n_per_site : list of int
    grand_mean : ndarray (g,)
        Sample-size-weighted mean of the site intercepts, feature units.
    beta : ndarray (q, g)
        Covariate coefficients (fitted together with the site intercepts).
    var_pooled : ndarray (g,)
        Pooled residual variance (divisor n, as in sva::ComBat), feature units².
    gamma_hat, delta_hat : ndarray (s, g)
        Per-site mean and variance of the standardised residuals.
    gamma_star, delta_star : ndarray (s, g)
        Their empirical-Bayes posterior estimates (= the hats without EB).
    empirical_bayes : bool
    priors : dict
        gamma_bar, tau2, a, b per site (EB only).
    iterations : list of int
        EB fixed-point iterations per site.
    """

    sites: list[str]
    n_per_site: list[int]
    grand_mean: np.ndarray
    beta: np.ndarray
    var_pooled: np.ndarray
    gamma_hat: np.ndarray
    delta_hat: np.ndarray
    gamma_star: np.ndarray
    delta_star: np.ndarray
    empirical_bayes: bool
    priors: dict[str, list[float]] = field(default_factory=dict)
    iterations: list[int] = field(default_factory=list)

    def covariate_mean(self, covariates: np.ndarray) -> np.ndarray:
        """``grand_mean + C·beta`` (n, g): the site-free expected value."""
        c = np.asarray(covariates, dtype=float).reshape(-1, self.beta.shape[0])
        return self.grand_mean[None, :] + c @ self.beta

    def harmonise(self, values: np.ndarray, sites: Sequence[str | None],
                  covariates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Remove the site effects from new rows with the fitted estimates.

        Parameters
        ----------
        values : ndarray (n, g)
        sites : sequence of str or None, length n
        covariates : ndarray (n, q)

        Returns
        -------
        harmonised : ndarray (n, g)
            Rows of unknown sites are returned unchanged.
        known : ndarray of bool (n,)
        """
        y = np.asarray(values, dtype=float).reshape(len(sites), -1)
        mean = self.covariate_mean(covariates)
        sd = np.sqrt(self.var_pooled)[None, :]
        out = y.copy()
        known = np.zeros(len(sites), dtype=bool)
        for i, site in enumerate(sites):
            if site in self.sites:
                s = self.sites.index(site)
                z = (y[i] - mean[i]) / sd[0]
                out[i] = (z - self.gamma_star[s]) / np.sqrt(self.delta_star[s]) * sd[0] + mean[i]
                known[i] = True
        return out, known

    def unharmonise(self, harmonised: np.ndarray, site: str, covariates: np.ndarray
                    ) -> np.ndarray:
        """Inverse of :meth:`harmonise` for one known site (maps bands to site scale)."""
        s = self.sites.index(site)
        mean = self.covariate_mean(covariates)
        sd = np.sqrt(self.var_pooled)[None, :]
        z = (np.asarray(harmonised, dtype=float) - mean) / sd
        return (z * np.sqrt(self.delta_star[s]) + self.gamma_star[s]) * sd + mean

    def to_dict(self, feature_names: Sequence[str]) -> dict[str, Any]:
        """JSON form keyed by site and feature name."""
        def per_site(a: np.ndarray) -> dict[str, dict[str, float]]:
            return {site: dict(zip(feature_names, map(float, a[s]), strict=True))
                    for s, site in enumerate(self.sites)}
        return {
            "method": ("parametric empirical Bayes (Johnson et al. 2007)"
                       if self.empirical_bayes else
                       "location/scale per site without empirical Bayes (too few indices)"),
            "sites": list(self.sites),
            "n_per_site": dict(zip(self.sites, map(int, self.n_per_site), strict=True)),
            "grand_mean": dict(zip(feature_names, map(float, self.grand_mean), strict=True)),
            "var_pooled": dict(zip(feature_names, map(float, self.var_pooled), strict=True)),
            "beta": {name: [float(v) for v in self.beta[:, j]]
                     for j, name in enumerate(feature_names)},
            "gamma_hat": per_site(self.gamma_hat), "delta_hat": per_site(self.delta_hat),
            "gamma_star": per_site(self.gamma_star), "delta_star": per_site(self.delta_star),
            "priors": self.priors, "iterations": list(self.iterations),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], feature_names: Sequence[str]) -> CombatEstimates:
        """Inverse of :meth:`to_dict`."""
        sites = [str(s) for s in d["sites"]]

        def per_site(key: str) -> np.ndarray:
            return np.array([[float(d[key][s][f]) for f in feature_names] for s in sites])
        return cls(
            sites=sites, n_per_site=[int(d["n_per_site"][s]) for s in sites],
            grand_mean=np.array([float(d["grand_mean"][f]) for f in feature_names]),
            beta=np.array([[float(v) for v in d["beta"][f]] for f in feature_names]).T
            .reshape(-1, len(feature_names)),
            var_pooled=np.array([float(d["var_pooled"][f]) for f in feature_names]),
            gamma_hat=per_site("gamma_hat"), delta_hat=per_site("delta_hat"),
            gamma_star=per_site("gamma_star"), delta_star=per_site("delta_star"),
            empirical_bayes=str(d["method"]).startswith("parametric"),
            priors={k: [float(x) for x in v] for k, v in d.get("priors", {}).items()},
            iterations=[int(i) for i in d.get("iterations", [])])


def combat_fit(values: np.ndarray, sites: Sequence[str], covariates: np.ndarray | None = None,
               *, empirical_bayes: bool | None = None, tol: float = 1e-4,
               max_iter: int = 1000) -> tuple[np.ndarray, CombatEstimates]:
    """ComBat harmonisation (Johnson, Li & Rabinovic, Biostatistics 2007; parametric priors).

    Model per feature g and sample j at site i:
    ``y = α + C·β + γ_i + δ_i·ε``. Steps: OLS of y on [site indicators, C]; α = the
    sample-size-weighted mean of the site intercepts; pooled variance with divisor n;
    standardised residuals Z; per site γ̂ = mean Z, δ̂² = var Z (ddof 1); normal prior on
    γ (mean and variance across features) and inverse-gamma prior on δ² (method of
    moments); posterior γ*, δ*² by the fixed-point iteration of the paper, stopped when
    the largest relative change is below ``tol`` (the rule of sva and neuroCombat).

    Parameters
    ----------
    values : ndarray (n, g)
        One row per sample (session), one column per feature (index).
    sites : sequence of str, length n
    covariates : ndarray (n, q) or None
        Biological covariates to preserve (age basis, sex), without an intercept.
    empirical_bayes : bool or None
        None: EB when there are at least :data:`MIN_FEATURES_FOR_EB` features.
    tol, max_iter : float, int
        Convergence of the EB iteration.

    Returns
    -------
    harmonised : ndarray (n, g)
    estimates : CombatEstimates

    Raises
    ------
    ValueError
        Non-finite values, a site with fewer than 2 samples, a constant feature, or a
        design that is not of full rank.
    """
    y = np.asarray(values, dtype=float)
    if y.ndim != 2 or y.shape[0] != len(sites):
        raise ValueError("values must be (n_samples, n_features) with one site per sample")
    if not np.all(np.isfinite(y)):
        raise InvalidInputError("ComBat needs finite values")
    n, g = y.shape
    c = np.zeros((n, 0)) if covariates is None else np.asarray(covariates, dtype=float)
    c = c.reshape(n, -1)
    site_list = sorted(set(sites))
    site_idx = np.array([site_list.index(s) for s in sites])
    counts = np.bincount(site_idx, minlength=len(site_list))
    if counts.min() < 2:
        raise InvalidInputError(f"ComBat needs at least 2 samples per site: "
                                f"{dict(zip(site_list, counts.tolist(), strict=True))}")
    onehot = np.eye(len(site_list))[site_idx]
    design = np.hstack([onehot, c])
    coef, _, rank, _ = np.linalg.lstsq(design, y, rcond=None)
    if rank < design.shape[1]:
        raise InvalidInputError("ComBat design (sites + covariates) is not of full rank: a "
                                "covariate is constant or confounded with site")
    n_sites = len(site_list)
    grand_mean = (counts / n) @ coef[:n_sites]
    beta = coef[n_sites:]
    var_pooled = ((y - design @ coef) ** 2).mean(axis=0)
    if np.any(var_pooled <= 0):
        raise InvalidInputError("ComBat: a feature has no residual variance")
    mean = grand_mean[None, :] + c @ beta
    z = (y - mean) / np.sqrt(var_pooled)
    gamma_hat = np.array([z[site_idx == s].mean(axis=0) for s in range(n_sites)])
    delta_hat = np.array([z[site_idx == s].var(axis=0, ddof=1) for s in range(n_sites)])
    if empirical_bayes is None:
        empirical_bayes = g >= MIN_FEATURES_FOR_EB
    if empirical_bayes and g < 2:
        raise InvalidInputError("empirical Bayes ComBat needs at least 2 features")
    gamma_star, delta_star = gamma_hat.copy(), delta_hat.copy()
    priors: dict[str, list[float]] = {}
    iterations: list[int] = []
    if empirical_bayes:
        gamma_bar = gamma_hat.mean(axis=1)
        tau2 = gamma_hat.var(axis=1, ddof=1)
        m = delta_hat.mean(axis=1)
        s2 = delta_hat.var(axis=1, ddof=1)
        a = (2 * s2 + m**2) / s2
        b = (m * s2 + m**3) / s2
        priors = {"gamma_bar": gamma_bar.tolist(), "tau2": tau2.tolist(),
                  "a": a.tolist(), "b": b.tolist()}
        for s in range(n_sites):
            zs = z[site_idx == s]
            ns = zs.shape[0]
            g_old, d_old = gamma_hat[s], delta_hat[s]
            for n_iter in range(1, max_iter + 1):  # noqa: B007 - count kept after the loop
                g_new = (tau2[s] * ns * gamma_hat[s] + d_old * gamma_bar[s]) / (tau2[s] * ns
                                                                                 + d_old)
                sum2 = ((zs - g_new) ** 2).sum(axis=0)
                d_new = (0.5 * sum2 + b[s]) / (ns / 2.0 + a[s] - 1.0)
                change = max(np.max(np.abs(g_new - g_old) / np.abs(g_old)),
                             np.max(np.abs(d_new - d_old) / d_old))
                g_old, d_old = g_new, d_new
                if change < tol:
                    break
            else:
                raise InvalidInputError(f"ComBat EB iteration did not converge for site "
                                        f"{site_list[s]} in {max_iter} iterations")
            gamma_star[s], delta_star[s] = g_new, d_new
            iterations.append(n_iter)
    harmonised = np.empty_like(y)
    for s in range(n_sites):
        rows = site_idx == s
        harmonised[rows] = ((z[rows] - gamma_star[s]) / np.sqrt(delta_star[s])
                            * np.sqrt(var_pooled) + mean[rows])
    est = CombatEstimates(sites=site_list, n_per_site=counts.tolist(), grand_mean=grand_mean,
                          beta=beta, var_pooled=var_pooled, gamma_hat=gamma_hat,
                          delta_hat=delta_hat, gamma_star=gamma_star, delta_star=delta_star,
                          empirical_bayes=bool(empirical_bayes), priors=priors,
                          iterations=iterations)
    return harmonised, est


# ----------------------------------------------------------------------- robust fitting


def huber_regression(y: np.ndarray, x: np.ndarray, *, c: float = 1.345,
                     max_iter: int = 100) -> tuple[np.ndarray, float, np.ndarray]:
    """Huber M-regression with Huber's proposal-2 scale (statsmodels RLM, HuberScale).

    Returns
    -------
    coef : ndarray (p,)
    scale : float
        Robust residual SD (consistent at the normal model).
    cov : ndarray (p, p)
        Covariance of ``coef`` (Huber's H1 sandwich form).
    """
    import statsmodels.api as sm

    model = sm.RLM(y, x, M=sm.robust.norms.HuberT(t=c))
    fit = model.fit(scale_est=sm.robust.scale.HuberScale(), maxiter=max_iter)
    return np.asarray(fit.params), float(fit.scale), np.asarray(fit.bcov_scaled)


# ------------------------------------------------------------------------ the model


def subject_hash(subject: str) -> str:
    """Short one-way digest of a participant label, as stored in a model (16 hex digits).

    The model records which participants it was fitted to without listing their labels,
    so that a report can score those controls leave-one-subject-out.
    """
    return hashlib.sha256(f"alsiron-normative:{subject}".encode()).hexdigest()[:16]


def t_to_z(t: float, df: float) -> float:
    """Normal quantile with the same tail probability as ``t`` under Student's t(``df``).

    ``z = Φ⁻¹(F_t,df(t))``, computed from the smaller tail so that large ``|t|`` keeps its
    precision; an infinite ``df`` returns ``t``.
    """
    from scipy.special import ndtri, stdtr

    if not math.isfinite(t) or not df > 0:
        return math.nan if not math.isinf(t) else t
    if math.isinf(df):
        return t
    tail = float(stdtr(df, -abs(t)))
    if tail <= 0.0:  # beyond double precision: the t and normal tails both vanish
        return t
    return math.copysign(-float(ndtri(tail)), t)


@dataclass(frozen=True)
class ZScore:
    """One index of one session against the normative model.

    Attributes
    ----------
    index : str
    value : float
        As measured (index units).
    harmonised : float
        With the site's effect removed (= value for an unknown site).
    expected : float
        Normative mean for the session's age and sex (harmonised scale).
    sd : float
        Predictive SD of one new control scan at these covariates (index units): the
        reference's residual variance plus the variance of its fitted mean.
    z : float
        ``Φ⁻¹(F_t,df(t))``: the standard-normal score with the tail probability of ``t``
        under the reference's t distribution; NaN when not computable (see ``notes``).
    site_harmonised : bool
    notes : tuple of str
        Why the z-score is missing or should be read with care.
    t : float
        ``(harmonised − expected) / sd``: the predictive t statistic.
    df : float
        Its degrees of freedom ν (Satterthwaite for a model fitted to every visit).
    centre_sd : float
        SD of the reference's fitted mean in z units (how far the centre of z could be
        off because the reference is finite): ``sqrt(Var ŷ) / sd``.
    """

    index: str
    value: float
    harmonised: float
    expected: float
    sd: float
    z: float
    site_harmonised: bool
    notes: tuple[str, ...] = ()
    t: float = math.nan
    df: float = math.nan
    centre_sd: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"index": self.index, "units": index_units(self.index), "value": self.value,
                "harmonised": self.harmonised, "expected": self.expected, "sd": self.sd,
                "z": self.z, "t": self.t, "df": self.df, "centre_sd": self.centre_sd,
                "site_harmonised": self.site_harmonised, "notes": list(self.notes)}


@dataclass
class IndexFit:
    """Normative fit of one index: least squares on the participants' mean values.

    Attributes
    ----------
    coef : ndarray (p,)
        Coefficients of :attr:`NormativeModel.design_columns` (index units).
    xtx_inv : ndarray (p, p)
        ``(X̄ᵀX̄)⁻¹`` of the participant-level design.
    between_var : float
        ``τ̂²``: residual variance of a participant's mean value, index units².
    df_between : float
        Its degrees of freedom: participants − p (− 2S − 1 after ComBat).
    within_var : float
        ``σ̂w²``: scan-to-scan variance around a participant's mean (0 with one scan
        each), index units².
    df_within : float
        Its degrees of freedom: scans − participants.
    robust_sd : float
        Huber proposal-2 scale of the participant-level residuals (outlier flag only).
    n : int
        Scans used.
    n_subjects : int
    outliers : list of str
        :func:`subject_hash` of the controls whose residual exceeds
        :data:`OUTLIER_CUT` robust SDs.
    """

    coef: np.ndarray
    xtx_inv: np.ndarray
    between_var: float
    df_between: float
    within_var: float
    df_within: float
    robust_sd: float
    n: int
    n_subjects: int
    outliers: list[str] = field(default_factory=list)

    @property
    def cov(self) -> np.ndarray:
        """Covariance of ``coef``: ``τ̂² (X̄ᵀX̄)⁻¹``."""
        return self.between_var * self.xtx_inv


@dataclass(frozen=True)
class _Reference:
    """What a prediction needs from one index's fit (the full one or a leave-one-out)."""

    coef: np.ndarray
    xtx_inv: np.ndarray
    between_var: float
    df_between: float
    within_var: float
    df_within: float
    visit_factor: float

    def predict(self, x0: np.ndarray) -> tuple[float, float, float, float]:
        """(mean, predictive SD, ν, centre SD in z units) of one new scan at ``x0``."""
        h0 = float(x0 @ self.xtx_inv @ x0)
        a = self.between_var * (1.0 + h0)
        w = self.within_var * self.visit_factor
        var = a + w
        denom = a**2 / self.df_between + (w**2 / self.df_within if w > 0 else 0.0)
        nu = var**2 / denom if denom > 0 else math.inf
        return (float(x0 @ self.coef), math.sqrt(var), nu,
                math.sqrt(self.between_var * h0 / var) if var > 0 else math.nan)


@dataclass
class NormativeModel:
    """Per-index normative model (see the module docstring); build with
    :func:`build_normative_model`, persist with :meth:`save` / :func:`load_model`.

    ``combat`` is None when the sites enter the regression as intercepts (the default
    below :data:`COMBAT_MIN_PER_SITE` participants per site); ``sites`` and
    ``site_weights`` (participant share per site) hold for both.
    """

    indices: list[str]
    age_basis: AgeBasis
    sex_term: bool
    combat: CombatEstimates | None
    fits: dict[str, IndexFit]
    cohort: dict[str, Any]
    provenance: dict[str, Any]
    selection: dict[str, Any] = field(default_factory=dict)
    sites: list[str] = field(default_factory=list)
    site_weights: list[float] = field(default_factory=list)
    reference: dict[str, Any] = field(default_factory=dict)

    # -- design
    def covariates(self, ages: np.ndarray, sexes: Sequence[str | None]) -> np.ndarray:
        """Covariate matrix (n, q) without intercept: age basis, then [sex = M]."""
        basis = self.age_basis(ages)
        if not self.sex_term:
            return basis
        male = np.array([1.0 if normalise_sex(s) == "M" else 0.0 for s in sexes])
        return np.column_stack([basis, male])

    @property
    def design_columns(self) -> list[str]:
        """Names of the regression columns (site intercepts or one intercept, age, sex)."""
        lead = (["intercept"] if self.combat is not None
                else [f"site:{s}" for s in self.sites])
        return (lead + [f"age{k + 1}" for k in range(self.age_basis.df)]
                + (["sex=M"] if self.sex_term else []))

    def design(self, sites: Sequence[str | None], ages: np.ndarray,
               sexes: Sequence[str | None]) -> np.ndarray:
        """Design rows (n, p); an unknown site gets the participant-weighted site mix."""
        cov = self.covariates(ages, sexes)
        if self.combat is not None:
            return np.column_stack([np.ones(len(cov)), cov])
        lead = np.array([[1.0 if s == site else 0.0 for s in self.sites] if site in self.sites
                         else self.site_weights for site in sites]).reshape(len(cov), -1)
        return np.column_stack([lead, cov])

    @property
    def harmonisation_method(self) -> str:
        """How site effects are removed, in words."""
        if self.combat is not None:
            return self.combat.to_dict(self.indices)["method"]
        return ("site intercepts in the regression (too few controls per site for "
                "ComBat's scale step)" if len(self.sites) > 1 else "single site")

    @property
    def harmonisation_label(self) -> str:
        """Short name of the site harmonisation, for one-line summaries."""
        if self.combat is None:
            return "site intercepts"
        return f"{'EB ' if self.combat.empirical_bayes else ''}ComBat"

    @property
    def n_subjects(self) -> int:
        """Participants in the reference."""
        return int(self.reference.get("n_subjects", self.cohort.get("n_subjects", 0)))

    @property
    def age_range(self) -> tuple[float, float]:
        """Youngest and oldest control age in the fit, years."""
        lo, hi = self.cohort["age_range_years"]
        return float(lo), float(hi)

    def _full_reference(self, index: str) -> _Reference:
        f = self.fits[index]
        return _Reference(f.coef, f.xtx_inv, f.between_var, f.df_between, f.within_var,
                          f.df_within, float(self.reference["visit_factor"]))

    def _scoring_problems(self, age: float | None, sex: str | None) -> list[str]:
        problems = []
        if age is None or not math.isfinite(age):
            problems.append("age unknown")
        if self.sex_term and normalise_sex(sex) is None:
            problems.append("sex unknown")
        return problems

    def _notes(self, record: SessionRecord, problems: list[str]) -> list[str]:
        notes: list[str] = list(problems)
        if record.site not in self.sites:
            notes.append(f"site {record.site!r} is not in the normative model: "
                         "not harmonised")
        if not problems:
            lo, hi = self.age_range
            if not lo <= float(record.age) <= hi:  # type: ignore[arg-type]
                notes.append(f"age {record.age:g} outside the control range "
                             f"{lo:g}-{hi:g} years (extrapolated)")
        if record.qc_status == "fail":
            notes.append("session QC failed")
        if self.n_subjects < SMALL_REFERENCE:
            notes.append(f"small reference: {self.n_subjects} controls")
        return notes

    def _harmonise(self, k: int, value: float, record: SessionRecord, x0: np.ndarray,
                   cov_row: np.ndarray) -> tuple[float, float]:
        """(harmonised value, shift that takes the site's mean to the pooled mean)."""
        if record.site not in self.sites:
            return value, 0.0
        if self.combat is not None:
            row = np.full((1, len(self.indices)), np.nan)
            row[0, k] = value
            adj, _ = self.combat.harmonise(row, [record.site], cov_row)
            return float(adj[0, k]), 0.0
        coef = self.fits[self.indices[k]].coef
        s = len(self.sites)
        shift = float(np.dot(x0[:s] - np.asarray(self.site_weights), coef[:s]))
        return value - shift, shift

    # -- scores
    def z_scores(self, record: SessionRecord) -> dict[str, ZScore]:
        """z-score of every model index present in ``record``.

        The prediction is Student-t: ``t = (y − ŷ) / sd`` with the predictive SD of one
        new control scan, mapped to the normal scale as ``z = Φ⁻¹(F_t,ν(t))``. Sites the
        model knows have their effect removed (site intercept, or ComBat); a site the
        model has not seen is compared with the participant-weighted site mix: the z
        then includes that site's unknown offset (a note and a warning say so). Ages
        outside the control range are extrapolated linearly (natural spline) and noted;
        a reference of fewer than :data:`SMALL_REFERENCE` controls is noted. Missing age
        (or sex, when the model has a sex term) gives NaN with a note. A participant who
        is one of the model's own controls is scored in-sample here (noted); see
        :meth:`held_out_z_scores`.
        """
        return self._z_scores(record, None)

    def held_out_z_scores(self, record: SessionRecord,
                          subject_records: Sequence[SessionRecord]) -> dict[str, ZScore]:
        """z-scores of ``record`` against the model refitted without its participant.

        For the model's own controls (their :func:`subject_hash` is in the model) the
        fit is updated in closed form (leave-one-subject-out: the participant's mean
        row removed from the least squares; for a one-scan-per-control model this is the
        externally studentised residual, ``t ~ t_ν−1``). ``subject_records`` are the
        participant's sessions, from which the rows the model used are selected again.
        ComBat estimates, when used, are held fixed. Anyone else is scored as by
        :meth:`z_scores`.
        """
        if subject_hash(record.subject) not in set(self.reference.get("subject_hashes", ())):
            return self._z_scores(record, None)
        return self._z_scores(record, [r for r in subject_records
                                       if r.subject == record.subject])

    def _z_scores(self, record: SessionRecord, leave_out: Sequence[SessionRecord] | None
                  ) -> dict[str, ZScore]:
        out: dict[str, ZScore] = {}
        problems = self._scoring_problems(record.age, record.sex)
        notes = self._notes(record, problems)
        refs: dict[str, _Reference] | None = None
        if leave_out is not None:
            refs, why = self._leave_one_out(leave_out)
            notes.append(why)
        elif subject_hash(record.subject) in set(self.reference.get("subject_hashes", ())):
            notes.append("participant is one of the model's controls (in-sample z)")
        known_site = record.site in self.sites
        if not known_site and any(k in record.indices for k in self.indices):
            log.warning("%s %s: site %r is not in the normative model; z-scores are not "
                        "site-harmonised", record.subject, record.session, record.site)
        for k, index in enumerate(self.indices):
            if index not in record.indices:
                continue
            value = float(record.indices[index])
            if problems or not math.isfinite(value) or (leave_out is not None and not refs):
                extra = () if problems or math.isfinite(value) else ("value not finite",)
                out[index] = ZScore(index, value, math.nan, math.nan, math.nan, math.nan,
                                    known_site, (*notes, *extra))
                continue
            cov_row = self.covariates(np.array([record.age]), [record.sex])
            x0 = self.design([record.site], np.array([record.age]), [record.sex])[0]
            harmonised, shift = self._harmonise(k, value, record, x0, cov_row)
            ref = refs[index] if refs else self._full_reference(index)
            mean, sd, nu, centre = ref.predict(x0)
            t = (value - mean) / sd if self.combat is None else (harmonised - mean) / sd
            out[index] = ZScore(index, value, harmonised, mean - shift, sd, t_to_z(t, nu),
                                known_site, tuple(notes), t, nu, centre)
        return out

    def _leave_one_out(self, subject_records: Sequence[SessionRecord]
                       ) -> tuple[dict[str, _Reference] | None, str]:
        """Per-index references without one participant (closed-form update), and a note.

        The participant's rows are selected as the build selected them; their mean row
        ``x̄ᵢ`` and value ``ȳᵢ`` leave the least squares by the rank-one update
        ``β̂₍ᵢ₎ = β̂ − A x̄ᵢ eᵢ/(1 − hᵢ)``, ``A₍ᵢ₎ = A + A x̄ᵢ x̄ᵢᵀ A/(1 − hᵢ)``,
        ``τ̂²₍ᵢ₎ = (ν τ̂² − eᵢ²/(1 − hᵢ))/(ν − 1)``; their scans leave the within-participant
        variance and the harmonic mean of visits.
        """
        rows, _ = _select_rows(subject_records, str(self.selection.get("group", "control")),
                               str(self.selection.get("visits", "baseline")))
        rows = [r for r in rows if r.site in self.sites
                and all(math.isfinite(float(r.indices.get(k, math.nan))) for k in self.indices)]
        if not rows:
            return None, ("in the normative model, but its scans there were not found: "
                          "not scored")
        ages = np.array([float(r.age) for r in rows])  # type: ignore[arg-type]
        x = self.design([r.site for r in rows], ages, [r.sex for r in rows])
        y = np.array([[float(r.indices[k]) for k in self.indices] for r in rows])
        if self.combat is not None:
            y, _ = self.combat.harmonise(y, [r.site for r in rows],
                                         self.covariates(ages, [r.sex for r in rows]))
        xbar, ybar, k_i = x.mean(axis=0), y.mean(axis=0), len(rows)
        m = self.n_subjects
        sum_inv = float(self.reference["sum_inverse_visits"]) - 1.0 / k_i
        visit_factor = 1.0 - sum_inv / (m - 1)
        refs = {}
        for j, name in enumerate(self.indices):
            f = self.fits[name]
            ax = f.xtx_inv @ xbar
            h = float(xbar @ ax)
            if h > 1.0 - 1e-9 or f.df_between < 2:
                return None, ("cannot be left out of the normative model (the only control "
                              "of its site, or too few controls): not scored")
            e = float(ybar[j] - xbar @ f.coef)
            between = (f.df_between * f.between_var - e**2 / (1.0 - h)) / (f.df_between - 1)
            dev = (y[:, j] - ybar[j]) - (x - xbar) @ f.coef
            df_w = f.df_within - (k_i - 1)
            within = (max(f.df_within * f.within_var - float(dev @ dev), 0.0) / df_w
                      if df_w > 0 else 0.0)
            refs[name] = _Reference(f.coef - ax * e / (1.0 - h),
                                    f.xtx_inv + np.outer(ax, ax) / (1.0 - h),
                                    max(between, 1e-300), f.df_between - 1, within, df_w,
                                    visit_factor)
        return refs, "leave-one-subject-out (model refitted without this control)"

    def band(self, index: str, age: float, sex: str | None, site: str | None,
             level: float = 0.95) -> tuple[float, float, float]:
        """Normative mean and central ``level`` predictive band on the scale of ``site``.

        The band is ``ŷ ± t_ν,(1+level)/2 · sd`` (Student t with the reference's degrees of
        freedom), so its edges score ``z = ±Φ⁻¹((1+level)/2)``. For a known site it is on
        that site's scale (site intercept included, or mapped back through the site's
        ComBat adjustment), so it can be drawn with the site's raw values; otherwise on
        the pooled scale. Returns (mean, low, high), index units; NaN when age (or a
        needed sex) is unknown.
        """
        if self._scoring_problems(age, sex):
            return (math.nan, math.nan, math.nan)
        from scipy.stats import norm
        from scipy.stats import t as student

        x0 = self.design([site], np.array([age]), [sex])[0]
        mean, sd, nu, _ = self._full_reference(index).predict(x0)
        p = 0.5 + level / 2
        q = float(student.ppf(p, nu)) if math.isfinite(nu) else float(norm.ppf(p))
        triple = np.array([mean, mean - q * sd, mean + q * sd])
        if self.combat is not None and site in self.combat.sites:
            cov_row = self.covariates(np.array([age]), [sex])
            k = self.indices.index(index)
            full = np.tile(self.combat.covariate_mean(cov_row), (3, 1))
            full[:, k] = triple
            triple = self.combat.unharmonise(full, site, np.tile(cov_row, (3, 1)))[:, k]
        return (float(triple[0]), float(triple[1]), float(triple[2]))

    # -- persistence
    def to_dict(self) -> dict[str, Any]:
        """The JSON document written by :meth:`save`."""
        vf = float(self.reference["visit_factor"])
        return {
            "format": MODEL_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "provenance": self.provenance,
            "cohort": self.cohort,
            "selection": self.selection,
            "covariates": {"age": self.age_basis.to_dict(),
                           "sex": {"term": self.sex_term, "coded": "1 if M else 0"}},
            "sites": {"method": self.harmonisation_method, "names": list(self.sites),
                      "participant_weights": dict(zip(self.sites, self.site_weights,
                                                      strict=True))},
            "reference": self.reference,
            "design_columns": self.design_columns,
            "indices": {
                name: {"units": index_units(name), "n": fit.n, "n_subjects": fit.n_subjects,
                       "coef": [float(v) for v in fit.coef],
                       "xtx_inv": [[float(v) for v in row] for row in fit.xtx_inv],
                       "coef_cov": [[float(v) for v in row] for row in fit.cov],
                       "between_var": fit.between_var, "df_between": fit.df_between,
                       "within_var": fit.within_var, "df_within": fit.df_within,
                       "residual_sd": math.sqrt(fit.between_var + fit.within_var * vf),
                       "residual_sd_method": "least squares on participant means: "
                                             "sqrt(between_var + within_var (1 - 1/k))",
                       "robust_residual_sd": fit.robust_sd,
                       "robust_residual_sd_method": "Huber proposal 2 (statsmodels "
                                                    "HuberScale), outlier flag only",
                       "outliers": list(fit.outliers)}
                for name, fit in self.fits.items()},
            "combat": None if self.combat is None else self.combat.to_dict(self.indices),
        }

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the model atomically as JSON; refuses to replace unless ``overwrite``."""
        return save_json(path, self.to_dict(), overwrite=overwrite)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], path: str | os.PathLike[str] | None = None
                  ) -> NormativeModel:
        """Model from its JSON document; one-line :class:`InputError` if unusable."""
        if not isinstance(doc, Mapping) or doc.get("format") != MODEL_FORMAT:
            raise InputError(path, f"not an alsiron normative model (no format "
                                   f"{MODEL_FORMAT!r})")
        version = doc.get("schema_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise InputError(path, "normative model has no integer schema_version")
        if version > SCHEMA_VERSION:
            raise InputError(path, f"normative model schema version {version} is newer than "
                                   f"this alsiron ({alsiron.__version__}) reads (up to "
                                   f"{SCHEMA_VERSION}): upgrade alsiron")
        if version == 1:
            raise InputError(path, "normative model schema version 1 (alsiron before "
                                   "calibrated z-scores) is no longer read: rebuild it with "
                                   "`alsiron normative build`")
        if version < 1:
            raise InputError(path, f"unknown normative model schema version {version}")
        try:
            return cls._from_v2(doc)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise InputError(path, f"malformed normative model ({type(exc).__name__}: "
                                   f"{exc})") from None

    @classmethod
    def _from_v2(cls, doc: Mapping[str, Any]) -> NormativeModel:
        indices = list(doc["indices"])
        for name in indices:
            index_units(name)
        fits = {}
        for name in indices:
            d = doc["indices"][name]
            fits[name] = IndexFit(
                np.array(d["coef"], dtype=float), np.array(d["xtx_inv"], dtype=float),
                float(d["between_var"]), float(d["df_between"]), float(d["within_var"]),
                float(d["df_within"]), float(d.get("robust_residual_sd", math.nan)),
                int(d["n"]), int(d["n_subjects"]), [str(h) for h in d.get("outliers", [])])
        sites = [str(s) for s in doc["sites"]["names"]]
        weights = doc["sites"]["participant_weights"]
        combat = (None if doc.get("combat") is None
                  else CombatEstimates.from_dict(doc["combat"], indices))
        model = cls(indices=indices, age_basis=AgeBasis.from_dict(doc["covariates"]["age"]),
                    sex_term=bool(doc["covariates"]["sex"]["term"]), combat=combat,
                    fits=fits, cohort=dict(doc["cohort"]),
                    provenance=dict(doc["provenance"]),
                    selection=dict(doc.get("selection", {})), sites=sites,
                    site_weights=[float(weights[s]) for s in sites],
                    reference=dict(doc["reference"]))
        p = len(model.design_columns)
        for name, fit in fits.items():
            if (fit.coef.shape != (p,) or fit.xtx_inv.shape != (p, p)
                    or not fit.between_var > 0 or not fit.df_between > 0
                    or not fit.within_var >= 0 or not np.all(np.isfinite(fit.coef))):
                raise ValueError(f"index {name}: coefficients do not match the design")
        q = p - 1 if combat is not None else p - len(sites)
        if combat is not None and combat.beta.shape != (q, len(indices)):
            raise ValueError("ComBat covariate coefficients do not match the design")
        float(model.reference["visit_factor"])
        float(model.reference["sum_inverse_visits"])
        model.age_range  # noqa: B018 - checks the cohort summary has it
        return model


def load_model(path: str | os.PathLike[str]) -> NormativeModel:
    """Read a model written by :meth:`NormativeModel.save`.

    Raises
    ------
    InputError
        Missing or unreadable file, not JSON, not a normative model, a newer schema
        version, or a malformed document (one line, naming the file).
    """
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise InputError(p, "normative model not found. " + NO_MODEL_MESSAGE) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(p, f"cannot read normative model: {exc}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(p, f"normative model is not valid JSON ({exc.msg}, line "
                            f"{exc.lineno})") from None
    return NormativeModel.from_dict(doc, p)


# ------------------------------------------------------------------------- building


def _select_rows(records: Iterable[SessionRecord], group: str, visits: str
                 ) -> tuple[list[SessionRecord], dict[str, int]]:
    """Eligible control scans: group match, QC not failed, run 1, one per subject
    (earliest visit) unless ``visits == "all"``."""
    dropped = {"qc_failed": 0, "repeat_runs": 0, "later_visits": 0, "missing_covariates": 0}
    chosen: dict[tuple[str, str], SessionRecord] = {}
    for r in records:
        if r.group != group:
            continue
        if r.qc_status == "fail":
            dropped["qc_failed"] += 1
            continue
        if r.run != 1:
            dropped["repeat_runs"] += 1
            continue
        if r.age is None or not math.isfinite(r.age) or r.site is None:
            dropped["missing_covariates"] += 1
            continue
        chosen[(r.subject, r.session)] = r
    rows = sorted(chosen.values(), key=lambda r: (r.subject, _visit_order(r)))
    if visits == "baseline":
        first: dict[str, SessionRecord] = {}
        for r in rows:
            if r.subject in first:
                dropped["later_visits"] += 1
            else:
                first[r.subject] = r
        rows = list(first.values())
    return rows, dropped


def _visit_order(r: SessionRecord) -> tuple[float, str, str]:
    t = r.years_since_baseline
    return (t if t is not None and math.isfinite(t) else math.inf, r.acq_time or "", r.session)


def _choose_indices(rows: Sequence[SessionRecord], indices: Sequence[str] | None,
                    min_fraction: float = 0.9) -> list[str]:
    if indices is not None:
        chosen = list(indices)
        for name in chosen:
            index_units(name)
        return chosen
    names = sorted({k for r in rows for k in r.indices})
    chosen = []
    for name in names:
        if name.endswith("_n"):
            continue
        present = sum(1 for r in rows if math.isfinite(r.indices.get(name, math.nan)))
        if present >= min_fraction * len(rows):
            chosen.append(name)
        else:
            log.warning("normative: index %s left out (finite in %d of %d controls)",
                        name, present, len(rows))
    return chosen


def _bic_by_df(y: np.ndarray, ages: np.ndarray, sites: Sequence[str], male: np.ndarray | None,
               subjects: Sequence[str] | None = None) -> dict[int, float]:
    """Summed (over indices) Gaussian BIC of OLS fits with site intercepts, per age df.

    With ``subjects`` the fits are to participant means (one row per participant, as the
    model is fitted), so BIC counts participants, not scans.
    """
    site_list = sorted(set(sites))
    onehot = np.eye(len(site_list))[[site_list.index(s) for s in sites]]
    groups = None
    if subjects is not None:
        _, groups = np.unique(np.asarray(subjects), return_inverse=True)
    out = {}
    for df in AGE_DF_CHOICES:
        if len(np.unique(ages)) < df + 3:
            continue
        try:
            basis = AgeBasis.from_ages(ages, df)(ages)
        except ValueError:
            continue
        x = np.hstack([onehot, basis] + ([male[:, None]] if male is not None else []))
        yy = y
        if groups is not None:
            x, yy = _subject_means(x, groups), _subject_means(y, groups)
        n = yy.shape[0]
        if n <= x.shape[1] + 1:
            continue
        coef = np.linalg.lstsq(x, yy, rcond=None)[0]
        rss = ((yy - x @ coef) ** 2).sum(axis=0)
        k = x.shape[1] + 1
        out[df] = float(np.sum(n * np.log(rss / n) + k * math.log(n)))
    return out


def _subject_means(a: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Row means of ``a`` per group label 0..m-1 (participant means)."""
    counts = np.bincount(groups).astype(float)
    out = np.zeros((counts.size, *a.shape[1:]))
    np.add.at(out, groups, a)
    return out / counts.reshape(-1, *([1] * (a.ndim - 1)))


def age_df_cap(n_subjects: int, n_sites: int, sex_term: bool) -> int:
    """Largest age-spline df allowed: ≥ :data:`PARTICIPANTS_PER_PARAMETER` participants
    per estimated mean parameter, ``max(1, ⌊m/10⌋ − S − [sex])``."""
    return max(1, n_subjects // PARTICIPANTS_PER_PARAMETER - n_sites - int(sex_term))


def _usable_rows(records: list[SessionRecord], group: str, visits: str,
                 indices: Sequence[str] | None, min_per_site: int, source: str | None
                 ) -> tuple[list[SessionRecord], list[str], np.ndarray, dict[str, int]]:
    """Selected control rows (complete on the chosen indices, at sites with enough
    participants), the index names, the values (n, g) and the drop counts."""
    rows, dropped = _select_rows(records, group, visits)
    groups_seen = sorted({str(r.group) for r in records})
    if not rows:
        raise InputError(source, f"no usable {group!r} sessions (groups present: "
                                 f"{', '.join(groups_seen) or 'none'})")
    names = _choose_indices(rows, indices)
    if not names:
        raise InputError(source, "no index is finite in enough control sessions")
    y_all = np.array([[float(r.indices.get(k, math.nan)) for k in names] for r in rows])
    complete = np.all(np.isfinite(y_all), axis=1)
    dropped["missing_values"] = int((~complete).sum())
    rows = [r for r, ok in zip(rows, complete, strict=True) if ok]
    y = y_all[complete]
    per_site: dict[str, set[str]] = {}
    for r in rows:
        per_site.setdefault(str(r.site), set()).add(r.subject)
    small = sorted(s for s, subs in per_site.items() if len(subs) < min_per_site)
    if small:
        log.warning("normative: sites with fewer than %d control participants left out: %s",
                    min_per_site, ", ".join(small))
        keep = np.array([str(r.site) not in small for r in rows])
        rows = [r for r, k in zip(rows, keep, strict=True) if k]
        y = y[keep]
        dropped["small_sites"] = int((~keep).sum())
    m = len({r.subject for r in rows})
    if m < MIN_PARTICIPANTS:
        raise InputError(source, f"only {m} usable {group!r} participants ({len(rows)} "
                                 f"scans); a normative model needs at least "
                                 f"{MIN_PARTICIPANTS}")
    if m < SMALL_REFERENCE:
        log.warning("normative: small reference of %d %s participants (z-scores are "
                    "calibrated, but their centre is uncertain; %d or more recommended)",
                    m, group, SMALL_REFERENCE)
    return rows, names, y, dropped


def build_normative_model(
    records: Iterable[SessionRecord],
    *,
    group: str = "control",
    indices: Sequence[str] | None = None,
    age_df: int | Literal["auto"] = "auto",
    visits: Literal["baseline", "all"] = "baseline",
    empirical_bayes: bool | None = None,
    min_per_site: int = MIN_CONTROLS_PER_SITE,
    source: str | None = None,
) -> NormativeModel:
    """Fit the normative model to the ``group`` sessions of ``records``.

    Parameters
    ----------
    records : iterable of SessionRecord
        Typically ``Registry.sessions()``; only ``group`` sessions with QC not failed,
        run 1 (no same-day repeats), known age and site are used.
    group : str
        Reference group label (participants.tsv ``group``).
    indices : sequence of str or None
        Indices to model; None: every index finite in ≥ 90 % of the eligible controls
        except voxel counts (``*_n``).
    age_df : int or "auto"
        Degrees of freedom of the age spline (1 = linear, up to 4); "auto" picks the one
        with the lowest BIC summed over indices, up to :func:`age_df_cap`.
    visits : {"baseline", "all"}
        One scan per control (earliest visit; default) or every visit (fitted at the
        participant level: participant means, plus the scan-to-scan variance).
    empirical_bayes : bool or None
        ComBat EB pooling across indices when ComBat is used (every site has at least
        :data:`COMBAT_MIN_PER_SITE` participants); None: when ≥
        :data:`MIN_FEATURES_FOR_EB` indices.
    min_per_site : int
        Sites with fewer eligible control participants are left out (logged).
    source : str or None
        Where the records came from (registry location), for the provenance.

    Raises
    ------
    InputError
        Fewer than :data:`MIN_PARTICIPANTS` usable control participants, no index, or a
        design that cannot be fitted.
    """
    if visits not in ("baseline", "all"):
        raise InvalidInputError(f"visits must be 'baseline' or 'all', got {visits!r}")
    if source is not None:
        from alsiron.cohort.registry import display_location

        # The source goes into messages and the model file: never a password.
        source = display_location(source)
    records = list(records)
    rows, names, y, dropped = _usable_rows(records, group, visits, indices, min_per_site,
                                           source)
    ages = np.array([float(r.age) for r in rows])  # type: ignore[arg-type]
    sexes = [normalise_sex(r.sex) for r in rows]
    sites = [str(r.site) for r in rows]
    subjects = [r.subject for r in rows]
    site_list = sorted(set(sites))
    participants = {s: len({r.subject for r in rows if r.site == s}) for s in site_list}
    m = len(set(subjects))
    sex_known = all(s is not None for s in sexes)
    sex_term = sex_known and len(set(sexes)) == 2
    if not sex_known:
        log.warning("normative: sex missing for some controls; model has no sex term")
    male = np.array([1.0 if s == "M" else 0.0 for s in sexes]) if sex_term else None
    bic = _bic_by_df(y, ages, sites, male, subjects)
    cap = age_df_cap(m, len(site_list), sex_term)
    if age_df == "auto":
        allowed = {k: v for k, v in bic.items() if k <= cap}
        df = min(allowed, key=lambda k: allowed[k]) if allowed else 1
    else:
        df = int(age_df)
        if df > cap:
            log.warning("normative: age df %d asked for; %d participants support at most %d "
                        "(%d per parameter)", df, m, cap, PARTICIPANTS_PER_PARAMETER)
    try:
        basis = AgeBasis.from_ages(ages, df)
    except ValueError as exc:
        raise InputError(source, str(exc)) from None
    use_combat = len(site_list) > 1 and min(participants.values()) >= COMBAT_MIN_PER_SITE
    model = NormativeModel(indices=names, age_basis=basis, sex_term=sex_term, combat=None,
                           fits={}, cohort={}, provenance={}, sites=site_list,
                           site_weights=[participants[s] / m for s in site_list])
    if use_combat:
        try:
            y, model.combat = combat_fit(y, sites, model.covariates(ages, sexes),
                                         empirical_bayes=empirical_bayes)
        except ValueError as exc:
            raise InputError(source, f"ComBat: {exc}") from None
    _fit_indices(model, y, model.design(sites, ages, sexes), subjects, source)
    model.cohort = _cohort_summary(rows, group)
    model.selection = {"group": group, "visits": visits, "dropped": dropped,
                       "age_df": df, "age_df_selection": "BIC" if age_df == "auto" else "fixed",
                       "age_df_cap": cap, "bic_by_df": {str(k): v for k, v in bic.items()},
                       "min_per_site": min_per_site}
    model.provenance = {
        "software": "alsiron", "software_version": alsiron.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "python": platform.python_version(), "numpy": np.__version__,
        "source": source, "indices": list(names),
        "method": ("per index: least squares of the participants' mean values on "
                   + ("an intercept after ComBat (Johnson 2007)" if use_combat
                      else "site intercepts")
                   + ", age spline and sex; residual variance with every fitted parameter "
                     "counted; scan-to-scan variance from deviations around participant "
                     "means; z from the Student-t predictive distribution"),
        "input_software_versions": sorted({r.software_version for r in rows
                                           if r.software_version}),
    }
    return model


def _fit_indices(model: NormativeModel, y: np.ndarray, x: np.ndarray,
                 subjects: Sequence[str], source: str | None) -> None:
    """Participant-level least squares of every index; fills ``model.fits`` and
    ``model.reference`` (see docs/normative.md for the equations)."""
    labels, groups = np.unique(np.asarray(subjects), return_inverse=True)
    counts = np.bincount(groups).astype(float)
    m, n, p = labels.size, len(subjects), x.shape[1]
    xbar, ybar = _subject_means(x, groups), _subject_means(y, groups)
    if np.linalg.matrix_rank(xbar) < p:
        raise InputError(source, "the design (sites, age, sex) is not of full rank: a "
                                 "covariate is constant or confounded with site")
    n_site_par = 2 * len(model.sites) - 1 if model.combat is not None else 0
    df_between = m - p - n_site_par
    if df_between < 2:
        raise InputError(source, f"{m} control participants leave {df_between} degrees of "
                                 f"freedom for {p + n_site_par} fitted parameters; at least "
                                 "2 are needed")
    xtx_inv = np.linalg.inv(xbar.T @ xbar)
    coef = xtx_inv @ xbar.T @ ybar
    resid = ybar - xbar @ coef
    between = (resid**2).sum(axis=0) / df_between
    dev = (y - ybar[groups]) - (x - xbar[groups]) @ coef
    df_within = n - m
    within = (dev**2).sum(axis=0) / df_within if df_within > 0 else np.zeros(y.shape[1])
    sum_inv = float((1.0 / counts).sum())
    model.reference = {"n_subjects": m, "n_scans": n, "sum_inverse_visits": sum_inv,
                       "harmonic_mean_visits": m / sum_inv, "visit_factor": 1.0 - sum_inv / m,
                       "small": m < SMALL_REFERENCE,
                       "subject_hash": "sha256('alsiron-normative:' + label), first 16 hex",
                       "subject_hashes": sorted(subject_hash(str(s)) for s in labels)}
    for j, name in enumerate(model.indices):
        robust, outliers = _outlier_flag(resid[:, j], ybar[:, j], xbar, labels, name)
        model.fits[name] = IndexFit(coef[:, j], xtx_inv, float(between[j]), float(df_between),
                                    float(within[j]), float(df_within), robust, n, m,
                                    outliers)
        if not between[j] > 0:
            raise InputError(source, f"index {name}: the control values fit the design "
                                     "exactly (no residual variance)")


def _outlier_flag(resid: np.ndarray, y: np.ndarray, x: np.ndarray, labels: np.ndarray,
                  name: str) -> tuple[float, list[str]]:
    """Huber's robust residual SD and the controls beyond :data:`OUTLIER_CUT` of it."""
    try:
        _, robust, _ = huber_regression(y, x)
    except (ValueError, np.linalg.LinAlgError, ZeroDivisionError):
        return math.nan, []
    if not robust > 0:
        return float(robust), []
    far = np.abs(resid) > OUTLIER_CUT * robust
    if far.any():
        log.warning("normative: %s: control(s) %s lie beyond %.1f robust SDs of the "
                    "reference (kept; check their QC)", name,
                    ", ".join(map(str, labels[far])), OUTLIER_CUT)
    return float(robust), sorted(subject_hash(str(s)) for s in labels[far])


def _cohort_summary(rows: Sequence[SessionRecord], group: str) -> dict[str, Any]:
    def counts(key: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in rows:
            label = str(getattr(r, key))
            out[label] = out.get(label, 0) + 1
        return dict(sorted(out.items()))
    by_site_sex: dict[str, dict[str, int]] = {}
    for r in rows:
        per = by_site_sex.setdefault(str(r.site), {})
        sex = normalise_sex(r.sex) or "unknown"
        per[sex] = per.get(sex, 0) + 1
    ages = [float(r.age) for r in rows]  # type: ignore[arg-type]
    return {"n_sessions": len(rows), "n_subjects": len({r.subject for r in rows}),
            "n_by_group": {group: len(rows)}, "n_by_site": counts("site"),
            "n_by_sex": {k: v for k, v in sorted(
                (s, sum(1 for r in rows if (normalise_sex(r.sex) or "unknown") == s))
                for s in {normalise_sex(r.sex) or "unknown" for r in rows})},
            "n_by_site_sex": by_site_sex,
            "age_range_years": [min(ages), max(ages)],
            "age_mean_years": float(np.mean(ages)),
            "field_strength_t": sorted({r.field_strength_t for r in rows
                                        if r.field_strength_t is not None})}


# ------------------------------------------------------------------- session outputs


def zscore_table(zscores: Mapping[str, ZScore]) -> str:
    """Plain-text table of z-scores for the terminal (one index a line).

    Beside z: ν (the reference's degrees of freedom) and ``±centre``, the SD of the
    reference's fitted mean in z units (how uncertain the centre of z is).
    """
    lines = [f"{'index':<36} {'value':>10} {'expected':>10} {'SD':>9} {'z':>7} {'nu':>6} "
             f"{'+-centre':>8}  notes"]
    for zs in zscores.values():
        scale = 1000.0 if index_units(zs.index) == "ppm" else 1.0
        unit = "ppb" if scale == 1000.0 else index_units(zs.index)
        lines.append(f"{zs.index:<36} {zs.value * scale:>10.2f} {zs.expected * scale:>10.2f} "
                     f"{zs.sd * scale:>9.2f} {zs.z:>7.2f} {zs.df:>6.1f} {zs.centre_sd:>8.2f}"
                     f"  {unit}" + (f"; {'; '.join(zs.notes)}" if zs.notes else ""))
    return "\n".join(lines)


def session_zscores(record: SessionRecord, model_path: str | os.PathLike[str] | None
                    ) -> dict[str, ZScore]:
    """z-scores of one session against the model at ``model_path``.

    For ``alsiron qsm SUBJ_DIR --normative MODEL``: with ``model_path`` None it raises
    :class:`InputError` with :data:`NO_MODEL_MESSAGE` (how to build one).
    """
    if model_path is None:
        raise InputError(None, NO_MODEL_MESSAGE)
    return load_model(model_path).z_scores(record)


def score_session(record: SessionRecord, model_path: str | os.PathLike[str] | None, *,
                  out: str | os.PathLike[str] | None = None, overwrite: bool = False
                  ) -> tuple[dict[str, ZScore], str]:
    """What ``alsiron qsm ... --normative MODEL`` does with one session's record.

    Returns the z-scores and the text to print (:func:`zscore_table`); with ``out`` also
    stores them as JSON there (:func:`write_zscores`). With ``model_path`` None nothing
    is computed and the text is :data:`NO_MODEL_MESSAGE` (how to build a model).
    """
    if model_path is None:
        return {}, NO_MODEL_MESSAGE
    zscores = session_zscores(record, model_path)
    if out is not None:
        write_zscores(out, record, zscores, model_path, overwrite=overwrite)
    return zscores, f"{record.subject} {record.session}: z-scores against {model_path}\n" \
        + zscore_table(zscores)


def write_zscores(path: str | os.PathLike[str], record: SessionRecord,
                  zscores: Mapping[str, ZScore], model_path: str | os.PathLike[str], *,
                  overwrite: bool = False) -> Path:
    """Store one session's z-scores as JSON (atomic) with the model they came from and
    the session's inputs (``sources`` relative to the dataset, ``input_checksums``:
    file → SHA-256, as in the record)."""
    p = Path(model_path)
    digest = sha256_file(p) if p.is_file() else None
    qsm = record.parameters.get("qsm") if isinstance(record.parameters, dict) else None
    doc = {"subject": record.subject, "session": record.session, "run": record.run,
           "site": record.site, "age": record.age, "sex": record.sex,
           "normative_model": {"path": str(p), "sha256": digest},
           "software_version": alsiron.__version__,
           "sources": list(qsm.get("Sources", [])) if isinstance(qsm, dict) else [],
           "input_checksums": dict(record.input_checksums),
           "zscores": [z.to_dict() for z in zscores.values()]}
    return save_json(path, doc, overwrite=overwrite)


