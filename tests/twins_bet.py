"""NumPy twin of the BET surface evolution (``_core.bet_evolve_surface``): slow, plain."""

from __future__ import annotations

import numpy as np
from scipy import sparse


def evolve(mag: np.ndarray, voxel_size, vertices: np.ndarray, faces: np.ndarray,
           settings: tuple[float, ...], iterations: int) -> tuple[np.ndarray, int]:
    """Same forces and early stop as the Rust kernel, vectorised over vertices."""
    (t2, t, tm, f, step_mm, d_min, d_max, r_min, r_max, w_intensity,
     w_tangential, settle_mm) = settings
    vsz = np.asarray(voxel_size, np.float64)
    pos = np.array(vertices, np.float64)
    nv = len(pos)
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    edges = np.unique(np.sort(edges, axis=1), axis=0)
    rows = np.concatenate([edges[:, 0], edges[:, 1]])
    cols = np.concatenate([edges[:, 1], edges[:, 0]])
    adj = sparse.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(nv, nv))
    averaging = sparse.diags(1.0 / np.asarray(adj.sum(axis=1)).ravel()) @ adj
    incidence = sparse.csr_matrix(
        (np.ones(faces.size), (faces.ravel(), np.repeat(np.arange(len(faces)), 3))),
        shape=(nv, len(faces)))
    e_curv = 0.5 * (1.0 / r_min + 1.0 / r_max)
    f_curv = 6.0 / (1.0 / r_min - 1.0 / r_max)
    depths = np.arange(int(np.floor((d_min + 1e-9) / step_mm)) + 1) * step_mm
    n_max = int(np.count_nonzero(depths <= d_max))
    # Outside the image reads NaN, ignored by fmin/fmax.
    padded = np.pad(np.asarray(mag, np.float32), 1, constant_values=np.nan)
    upper = np.array(padded.shape) - 1
    low, high = -0.5 * vsz, (np.array(mag.shape) - 0.5) * vsz
    checkpoint = pos.copy()
    for done in range(1, int(iterations) + 1):
        p0, p1, p2 = pos[faces[:, 0]], pos[faces[:, 1]], pos[faces[:, 2]]
        normals = incidence @ np.cross(p1 - p0, p2 - p0)
        normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
        s = averaging @ pos - pos
        sn_len = np.einsum("ij,ij->i", s, normals)
        s_n = sn_len[:, None] * normals
        s_t = s - s_n
        mean_edge = float(np.linalg.norm(pos[edges[:, 0]] - pos[edges[:, 1]], axis=1).mean())
        f2 = 0.5 * (1.0 + np.tanh(f_curv * (2.0 * np.abs(sn_len) / mean_edge**2 - e_curv)))
        probe = pos[None, :, :] - depths[:, None, None] * normals[None, :, :]
        index = np.clip(np.rint(probe / vsz).astype(np.int64) + 1, 0, upper)
        profile = padded[index[..., 0], index[..., 1], index[..., 2]].astype(np.float64)
        i_min = np.maximum(t2, np.fmin(tm, np.fmin.reduce(profile, axis=0)))
        i_max = np.minimum(tm, np.fmax(t, np.fmax.reduce(profile[:n_max], axis=0)))
        f3 = 2.0 * (i_min - (t2 + f * (i_max - t2))) / np.maximum(i_max - t2, 1e-12)
        pos = (pos + w_tangential * s_t + f2[:, None] * s_n
               + (w_intensity * mean_edge) * f3[:, None] * normals)
        pos = np.clip(pos, low, high)
        if settle_mm > 0 and done % 100 == 0:
            if done >= 300 and np.linalg.norm(pos - checkpoint, axis=1).mean() < settle_mm:
                return pos, done
            checkpoint = pos.copy()
    return pos, int(iterations)
