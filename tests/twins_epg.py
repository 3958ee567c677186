"""Slow, obviously correct reference for the EPG echo train: a Bloch simulation of
isochromats.

N spins, each dephasing by 2πj/N per half echo spacing, are rotated and relaxed exactly;
the echo is the magnitude of their mean transverse magnetization. With N > 2·(number of
echoes) no dephasing order the train can reach aliases back to zero, so this equals the
EPG result without any of its bookkeeping (state shifts, matrix forms, sign conventions).
"""

from __future__ import annotations

import numpy as np


def _rot_x(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _rot_y(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def cpmg_bloch_reference(t2: float, b1: float, *, n_echoes: int, echo_spacing: float,
                         refocusing_angle: float, t1: float = 1.0, recovery: bool = False
                         ) -> np.ndarray:
    """Echo magnitudes (M0 = 1) of a CPMG train: 90° about y, refocusing about x.

    ``recovery`` adds regrowth of Mz towards M0 between pulses (the Rust EPG leaves it out).
    """
    n_spins = 4 * n_echoes + 4
    phase = 2 * np.pi * np.arange(n_spins) / n_spins
    cos_p, sin_p = np.cos(phase), np.sin(phase)
    m = _rot_y(np.pi / 2) @ np.vstack([np.zeros(n_spins), np.zeros(n_spins),
                                       np.ones(n_spins)])
    e2 = np.exp(-0.5 * echo_spacing / t2)
    e1 = np.exp(-0.5 * echo_spacing / t1)
    refocus = _rot_x(np.deg2rad(b1 * refocusing_angle))

    def half(m):
        x = cos_p * m[0] - sin_p * m[1]
        y = sin_p * m[0] + cos_p * m[1]
        z = m[2] * e1 + ((1 - e1) if recovery else 0.0)
        return np.vstack([x * e2, y * e2, z])

    echoes = np.empty(n_echoes)
    for k in range(n_echoes):
        m = half(refocus @ half(m))
        echoes[k] = np.abs(np.mean(m[0] + 1j * m[1]))
    return echoes
