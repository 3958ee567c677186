"""Cohort stage: per-visit records, the results registry, the normative model and
z-scores, longitudinal change, trial power and HTML reports."""
