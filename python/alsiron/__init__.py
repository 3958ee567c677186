"""alsiron: quantitative iron maps (QSM, R2*) of the motor cortex from multi-echo MRI.

The numerical kernels live in the compiled module :mod:`alsiron._core` (Rust); the
stage modules (:mod:`alsiron.io.bids`, :mod:`alsiron.field.echo_fit`, :mod:`alsiron.qsm.dipole`,
:mod:`alsiron.relax.r2star`, :mod:`alsiron.sim.phantom`) validate inputs and orchestrate them.
The library logs to ``logging.getLogger("alsiron")`` and never configures logging.
"""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("alsiron")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

logging.getLogger("alsiron").addHandler(logging.NullHandler())

__all__ = ["__version__"]
