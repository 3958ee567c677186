"""QSM stage: dipole model, background-field removal, dipole inversion, referencing, and
the chain that runs them on a multi-echo GRE series (:mod:`alsiron.qsm.chain`).

The kernels are re-exported here (``from alsiron import qsm; qsm.pdf(...)``); the chain
is imported from its own module.
"""

from alsiron.qsm.bfr import (
    ISMV_MAX_ITER,
    ISMV_TOL,
    LBV_MAX_ITER,
    LBV_TOL,
    PDF_MAX_ITER,
    PDF_PAD_VOXELS,
    PDF_TOL,
    VSHARP_THRESHOLD,
    edge_distance_mm,
    erode_mm,
    ismv,
    lbv,
    pdf,
    vsharp,
    vsharp_default_radii,
)
from alsiron.qsm.dipole import dipole_kernel, forward_field
from alsiron.qsm.inversion import (
    INVERSION_METHODS,
    TKD_THRESHOLD,
    TV_ALPHA,
    TV_MU,
    InversionSettings,
    ilsqr,
    invert,
    medi,
    ndi,
    rts,
    tikhonov,
    tkd,
    tv_admm,
    tv_admm_masked,
    tv_admm_weighted,
)
from alsiron.qsm.reference import reference_to_mean

__all__ = [
    "INVERSION_METHODS", "ISMV_MAX_ITER", "ISMV_TOL", "LBV_MAX_ITER", "LBV_TOL",
    "PDF_MAX_ITER", "PDF_PAD_VOXELS", "PDF_TOL", "TKD_THRESHOLD", "TV_ALPHA", "TV_MU",
    "VSHARP_THRESHOLD", "InversionSettings", "dipole_kernel", "edge_distance_mm", "erode_mm",
    "forward_field", "ilsqr", "invert", "ismv", "lbv", "medi", "ndi", "pdf",
    "reference_to_mean", "rts", "tikhonov", "tkd", "tv_admm", "tv_admm_masked",
    "tv_admm_weighted", "vsharp", "vsharp_default_radii",
]
