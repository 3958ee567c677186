"""Index-level simulation of a trial cohort (no images): fast ground truth for the
normative, longitudinal and power statistics.

It draws participants exactly as the image phantom does (:func:`alsiron.sim.phantom.draw_cohort`:
age, sex, site, between-subject residual, visit times) and adds, per scan, a
measurement error with the test-retest SD, so statistics fitted to these records can be
checked against known effects in seconds where the image pipeline would take hours.
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass

import numpy as np

import alsiron
from alsiron.cohort.records import HEADLINE_INDEX, SessionRecord
from alsiron.sim.phantom import PRECENTRAL_BETWEEN_SUBJECT_SD_PPM, draw_cohort

#: Control precentral χ at the age centre, ppm (Chimap truth of the image phantom).
CONTROL_LEVEL_PPM = 0.0285
#: Same-scanner within-subject SD of a χ index, ppm (2.36 ppb, REFERENCES.md).
WITHIN_SUBJECT_SD_PPM = 0.00236


@dataclass(frozen=True)
class CohortTruth:
    """Simulated effects, to compare the fitted statistics with.

    Attributes
    ----------
    als_effect_ppm : float
        ALS − control difference at baseline, ppm.
    progression_ppm_per_year : float
        Yearly growth of that difference in ALS, ppm/year (controls: 0 beyond ageing).
    between_subject_sd_ppm, within_subject_sd_ppm : float
        SD across participants (age and site terms included) and across repeat scans.
    cohens_d : float
        Baseline effect over the observed single-scan SD,
        ``effect / sqrt(between² + within²)``.
    """

    als_effect_ppm: float
    progression_ppm_per_year: float
    between_subject_sd_ppm: float
    within_subject_sd_ppm: float
    cohens_d: float


def simulate_index_cohort(
    n_subjects: int,
    n_sessions: int,
    *,
    seed: int = 0,
    als_fraction: float = 0.5,
    als_effect_ppm: float = 0.003,
    progression_ppm_per_year: float = 0.002,
    within_subject_sd_ppm: float = WITHIN_SUBJECT_SD_PPM,
    repeat_fraction: float = 0.0,
    index: str = HEADLINE_INDEX,
) -> tuple[list[SessionRecord], CohortTruth]:
    """Simulate one χ index for every visit of a cohort.

    Parameters
    ----------
    n_subjects, n_sessions : int
        Participants and visits per participant (about 6 months apart).
    seed : int
        Same seed, same records.
    als_fraction : float
        Fraction of ALS participants (interleaved as in the image phantom).
    als_effect_ppm : float
        ALS excess at baseline, ppm.
    progression_ppm_per_year : float
        Yearly growth of the ALS excess, ppm/year.
    within_subject_sd_ppm : float
        Measurement (test-retest) SD of one scan, ppm.
    repeat_fraction : float
        Fraction of visits with a same-day repeat scan (``run=2``).
    index : str
        Name under which the value is stored in ``SessionRecord.indices``.

    Returns
    -------
    records : list of SessionRecord
        One per scan, ordered by participant, visit, run.
    truth : CohortTruth
    """
    if within_subject_sd_ppm < 0 or not 0.0 <= repeat_fraction <= 1.0:
        raise ValueError("within_subject_sd_ppm must be >= 0 and repeat_fraction in [0, 1]")
    cohort = draw_cohort(n_subjects, n_sessions, seed=seed, als_fraction=als_fraction)
    rng = np.random.default_rng([seed, 0xC0_4087])
    records = []
    for subj in cohort:
        for k, years in enumerate(subj.session_years):
            true_value = CONTROL_LEVEL_PPM + subj.precentral_offset_ppm(years)
            if subj.group == "ALS":
                true_value += als_effect_ppm + progression_ppm_per_year * years
            runs = 2 if rng.random() < repeat_fraction else 1
            for run in range(1, runs + 1):
                value = true_value + rng.normal(0.0, within_subject_sd_ppm)
                acq = subj.baseline + _dt.timedelta(days=365.25 * years, minutes=30 * (run - 1))
                records.append(SessionRecord(
                    subject=subj.participant_id, session=f"ses-{k + 1:02d}", run=run,
                    acq_time=acq.replace(microsecond=0).isoformat(),
                    years_since_baseline=years, site=subj.site, group=subj.group,
                    sex=subj.sex, age=round(subj.age + years, 2), field_strength_t=3.0,
                    indices={index: float(value)}, qc_status="pass",
                    software_version=alsiron.__version__,
                    parameters={"simulation": "alsiron.sim.cohort.simulate_index_cohort",
                                "seed": seed}))
    total_sd = math.hypot(PRECENTRAL_BETWEEN_SUBJECT_SD_PPM, within_subject_sd_ppm)
    truth = CohortTruth(als_effect_ppm=als_effect_ppm,
                        progression_ppm_per_year=progression_ppm_per_year,
                        between_subject_sd_ppm=PRECENTRAL_BETWEEN_SUBJECT_SD_PPM,
                        within_subject_sd_ppm=within_subject_sd_ppm,
                        cohens_d=als_effect_ppm / total_sd)
    return records, truth
