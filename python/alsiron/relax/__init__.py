"""Relaxometry stage: R2*/T2* from multi-echo GRE, stimulated-echo corrected T2/B1 from
multi-echo spin echo (extended phase graphs), and the chain that makes R2*, R2 and
R2′ = R2* − R2 maps for a visit (:mod:`alsiron.relax.chain`).

The kernels are re-exported here (``from alsiron import relax; relax.fit_r2star(...)``).
"""

from alsiron.relax.r2star import (
    R2STAR_METHODS,
    R2STAR_STATUS,
    R2starResult,
    fit_r2star,
    fit_r2star_loglinear,
    gradient_dephasing_factor,
)
from alsiron.relax.t2 import T2Result, fit_t2_epg, fit_t2_monoexponential, simulate_mese

__all__ = ["R2STAR_METHODS", "R2STAR_STATUS", "R2starResult", "T2Result", "fit_r2star",
           "fit_r2star_loglinear", "fit_t2_epg", "fit_t2_monoexponential",
           "gradient_dephasing_factor", "simulate_mese"]
