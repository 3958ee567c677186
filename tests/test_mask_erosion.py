"""Mask erosion in mm (alsiron.qsm.bfr.erode_mm) and its use before background removal.

Ground truth for the physical depth: the Euclidean distance transform in mm and, for a
sphere, the analytic distance to its surface. The twin is a brute-force erosion by an
ellipsoidal structuring element built voxel by voxel from the voxel edges.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from alsiron import qsm
from alsiron.cli._options import MaskErosion
from alsiron.qsm.chain import bfr_input_mask, erosion_depth_mm, erosion_record
from alsiron.qsm.settings import BackgroundSettings


def ellipsoid_erosion_twin(mask: np.ndarray, voxel_size, depth_mm: float) -> np.ndarray:
    """Erode by the set of voxel offsets whose length in mm is <= depth_mm (voxels beyond
    the array are outside): slow and obviously correct."""
    reach = [int(np.floor(depth_mm / v + 1e-6)) for v in voxel_size]
    padded = np.pad(mask, [(r, r) for r in reach], constant_values=False)
    out = mask.copy()
    for di in range(-reach[0], reach[0] + 1):
        for dj in range(-reach[1], reach[1] + 1):
            for dk in range(-reach[2], reach[2] + 1):
                length = np.sqrt((di * voxel_size[0]) ** 2 + (dj * voxel_size[1]) ** 2
                                 + (dk * voxel_size[2]) ** 2)
                if length > depth_mm + 1e-6:
                    continue
                out &= padded[reach[0] + di: reach[0] + di + mask.shape[0],
                              reach[1] + dj: reach[1] + dj + mask.shape[1],
                              reach[2] + dk: reach[2] + dk + mask.shape[2]]
    return out


def sphere(radius_mm: float, voxel_size, fov_mm: float = 150.0, centre_shift=(0.3, -0.2, 0.1)):
    """Ball of ``radius_mm`` on a grid covering ``fov_mm``; also the analytic depth of
    every voxel centre below the sphere surface [mm]."""
    n = [int(round(fov_mm / v)) for v in voxel_size]
    axes = [(np.arange(k) - (k - 1) / 2 + s) * v
            for k, v, s in zip(n, voxel_size, centre_shift, strict=True)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    r = np.sqrt(x * x + y * y + z * z)
    return r <= radius_mm, radius_mm - r


@pytest.mark.parametrize("voxel_size, depth", [
    ((3.0, 3.0, 3.0), 4.0), ((2.0, 2.0, 2.0), 4.0), ((1.5, 1.5, 3.0), 4.5),
    ((1.0, 1.3, 2.2), 3.0), ((2.0, 2.0, 2.0), 0.5),
])
def test_erode_mm_equals_the_ellipsoid_twin(voxel_size, depth):
    rng = np.random.default_rng(7)
    mask = ndimage.binary_opening(rng.random((28, 26, 20)) < 0.8, iterations=1)
    mask[0, 5:10, 5:10] = True  # touches the array border: outside beyond it
    got = qsm.erode_mm(mask, voxel_size, depth)
    np.testing.assert_array_equal(got, ellipsoid_erosion_twin(mask, voxel_size, depth))


def test_one_and_two_voxel_edges_match_the_voxel_erosions():
    ball, _ = sphere(40.0, (3.0, 3.0, 3.0))
    np.testing.assert_array_equal(qsm.erode_mm(ball, (3, 3, 3), 3.0),
                                  ndimage.binary_erosion(ball))
    np.testing.assert_array_equal(qsm.erode_mm(ball, (3, 3, 3), 2.9), ball)
    np.testing.assert_array_equal(qsm.erode_mm(ball, (3, 3, 3), 0.0), ball)
    # Header rounding of the voxel size does not change which layer goes.
    np.testing.assert_array_equal(qsm.erode_mm(ball, (3.0000004,) * 3, 3.0),
                                  ndimage.binary_erosion(ball))
    # Two edges also take the cube-diagonal voxels that two 6-connected erosions keep.
    two = ndimage.binary_erosion(ball, iterations=2)
    mm6 = qsm.erode_mm(ball, (3, 3, 3), 6.0)
    assert not np.any(mm6 & ~two) and (two & ~mm6).sum() < 0.03 * two.sum()


def removed_thickness_mm(ball: np.ndarray, kept: np.ndarray, radius_mm: float, vs) -> float:
    """Thickness [mm] of the shell removed from a ball, from the volumes: difference of
    the volume-equivalent radii before and after."""
    def radius(m):
        return np.cbrt(m.sum() * np.prod(vs) * 3 / (4 * np.pi))
    return float(radius(ball) - radius(kept))


@pytest.mark.parametrize("depth", [3.0, 4.0, 6.0])
def test_same_physical_depth_at_1p5_and_3_mm(depth):
    thickness = {}
    for vs in [(1.5, 1.5, 1.5), (3.0, 3.0, 3.0), (1.5, 1.5, 3.0)]:
        ball, true_depth = sphere(60.0, vs)
        kept = qsm.erode_mm(ball, vs, depth)
        # EDT ground truth: exactly the voxels deeper than `depth` are kept.
        np.testing.assert_array_equal(kept, qsm.edge_distance_mm(ball, vs) > depth + 1e-3)
        removed = ball & ~kept
        # Physical depth below the surface (analytic, a 1-Lipschitz function): a removed
        # centre lies within `depth` of an outside centre, so it is less than `depth`
        # deep; a kept centre is farther than `depth` from every outside centre, and
        # those lie within half a voxel diagonal beyond the surface.
        assert true_depth[removed].max() < depth + 1e-9
        assert true_depth[removed].max() > depth - max(vs) / 2
        assert true_depth[kept].min() > depth - np.sqrt(3) / 2 * max(vs)
        thickness[vs] = removed_thickness_mm(ball, kept, 60.0, vs)
        # Whole voxel layers go, so the shell is up to one voxel edge thinner than asked
        # (measured 2.5-5.9 mm for 3-6 mm), never thicker.
        assert depth - max(vs) - 0.05 < thickness[vs] <= depth + 0.05, (vs, thickness[vs])
    if depth == 6.0:
        # Both isotropic grids remove the same shell within half a mm (measured 5.6 vs
        # 5.2 mm) where the former two-voxel erosion removed 2.5 vs 5.1 mm.
        assert abs(thickness[(1.5,) * 3] - thickness[(3.0,) * 3]) < 0.5
        legacy = {}
        for v in (1.5, 3.0):
            ball, _ = sphere(60.0, (v,) * 3)
            legacy[v] = removed_thickness_mm(ball, ndimage.binary_erosion(ball, iterations=2),
                                             60.0, (v,) * 3)
        assert legacy[3.0] - legacy[1.5] > 2.0


def test_erode_mm_rejects_bad_input():
    m = np.ones((4, 4, 4), bool)
    with pytest.raises(ValueError, match="depth"):
        qsm.erode_mm(m, (1, 1, 1), -1.0)
    with pytest.raises(ValueError, match="depth"):
        qsm.erode_mm(m, (1, 1, 1), float("nan"))
    with pytest.raises(ValueError, match="voxel_size"):
        qsm.erode_mm(m, (1, 0, 1), 2.0)


def test_bfr_input_mask_modes_and_record():
    ball, _ = sphere(30.0, (2.0, 2.0, 2.0), fov_mm=80.0)
    vs = (2.0, 2.0, 2.0)
    p = BackgroundSettings()
    assert p.erode_mm is None and p.erode_voxels is None and p.method == "pdf"
    np.testing.assert_array_equal(bfr_input_mask(ball, vs, p), qsm.erode_mm(ball, vs, 4.0))
    assert erosion_record(p, vs)["MaskErosionMm"] == 4.0
    vsharp = BackgroundSettings(method="vsharp")
    np.testing.assert_array_equal(bfr_input_mask(ball, vs, vsharp), qsm.erode_mm(ball, vs, 6.0))
    assert erosion_record(BackgroundSettings(erode_mm=2.5), vs)["MaskErosionMm"] == 2.5
    # The default never leaves the outer voxel layer (coarse or thick-slice voxels); an
    # explicit depth is taken as given.
    assert erosion_depth_mm(p, (6.0, 6.0, 6.0)) == 6.0
    assert erosion_depth_mm(p, (1.0, 1.0, 5.0)) == 5.0
    assert erosion_depth_mm(p, (3.0, 3.0, 3.5)) == 4.0
    assert erosion_depth_mm(BackgroundSettings(erode_mm=2.0), (6.0, 6.0, 6.0)) == 2.0
    coarse, _ = sphere(30.0, (6.0, 6.0, 6.0), fov_mm=90.0)
    np.testing.assert_array_equal(bfr_input_mask(coarse, (6.0,) * 3, p),
                                  ndimage.binary_erosion(coarse))
    legacy = BackgroundSettings(erode_voxels=1)
    np.testing.assert_array_equal(bfr_input_mask(ball, vs, legacy),
                                  ndimage.binary_erosion(ball))
    rec = erosion_record(legacy, vs)
    assert rec["MaskErosionVoxels"] == 1 and rec["MaskErosionMm"] == 2.0
    # Reliability trim: only edge-band voxels with a high field SD go.
    sd = np.full(ball.shape, 0.01)
    noisy_edge = ball & (qsm.edge_distance_mm(ball, vs) <= 8.0)
    noisy_edge[:, :, : ball.shape[2] // 2] = False
    sd[noisy_edge] = 0.05
    sd[ball.shape[0] // 2, ball.shape[1] // 2, ball.shape[2] // 2] = 0.05  # deep: kept
    trim = BackgroundSettings(erode_mm=0.0, trim_sd_factor=3.0, trim_band_mm=8.0)
    got = bfr_input_mask(ball, vs, trim, field_sd=sd)
    np.testing.assert_array_equal(got, ball & ~noisy_edge)
    assert erosion_record(trim, vs)["ReliabilityTrim"]["FieldSDFactor"] == 3.0
    with pytest.raises(ValueError, match="bfr_trim_sd_factor"):
        bfr_input_mask(ball, vs, BackgroundSettings(trim_sd_factor=0.0), field_sd=sd)


@pytest.mark.parametrize("text, parsed", [("4", ("mm", 4.0)), ("4.5mm", ("mm", 4.5)),
                                          ("2vox", ("vox", 2.0)), ("0", ("mm", 0.0))])
def test_cli_mask_erode_values(text, parsed):
    assert MaskErosion().convert(text, None, None) == parsed


@pytest.mark.parametrize("text", ["-1", "abc", "1.5vox", "40", "nan"])
def test_cli_mask_erode_rejects(text):
    import click
    with pytest.raises(click.BadParameter):
        MaskErosion().convert(text, None, None)
