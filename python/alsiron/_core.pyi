"""Type stubs of the compiled module ``alsiron._core`` (Rust, PyO3).

Hand-written; keep in step with ``rust/alsiron-py/src``. Array arguments must be
C-contiguous with exactly the dtypes shown; the Python stage modules convert once.
"""

from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

__version__: str

def num_threads() -> int:
    """Threads in the global rayon pool."""

def set_num_threads(n: int) -> bool:
    """Size the global pool before first use; False if it already exists."""

# --- qsm (rust/alsiron-py/src/qsm.rs) ---
# Arrays: 3-D, C-contiguous; float32 volumes, uint8 masks (nonzero = inside).
# Fields and χ in ppm, voxel sizes in mm, B0 direction in voxel-index space.

def fft3_forward(x: npt.NDArray[np.float32]) -> npt.NDArray[np.complex64]: ...
def fft3_inverse(spectrum: npt.NDArray[np.complex64], nz: int) -> npt.NDArray[np.float32]: ...
def dipole_kernel(
    shape: tuple[int, int, int],
    voxel_size: tuple[float, float, float],
    b0_dir: tuple[float, float, float],
) -> npt.NDArray[np.float32]: ...
def forward_field(
    chi: npt.NDArray[np.float32],
    voxel_size: tuple[float, float, float],
    b0_dir: tuple[float, float, float],
) -> npt.NDArray[np.float32]: ...
def tkd(
    field: npt.NDArray[np.float32],
    mask: npt.NDArray[np.uint8],
    voxel_size: tuple[float, float, float],
    b0_dir: tuple[float, float, float],
    threshold: float,
) -> npt.NDArray[np.float32]: ...
def tv_admm(
    field: npt.NDArray[np.float32],
    mask: npt.NDArray[np.uint8],
    voxel_size: tuple[float, float, float],
    b0_dir: tuple[float, float, float],
    alpha: float,
    mu: float,
    max_iter: int,
    tol: float,
    progress: Callable[[int, int], object] | None = None,
) -> tuple[npt.NDArray[np.float32], int]: ...
def vsharp(
    field: npt.NDArray[np.float32],
    mask: npt.NDArray[np.uint8],
    voxel_size: tuple[float, float, float],
    radii_mm: list[float],
    threshold: float,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]: ...
def vsharp_default_radii(voxel_size: tuple[float, float, float]) -> list[float]: ...
def fft_fast_len(n: int) -> int: ...

# --- fit: phase unwrapping, multi-echo field fit, log-linear R2* (rust/alsiron-py/src/fit.rs)
# All array inputs must be C-contiguous with exactly these dtypes.

def unwrap_phase(
    phase: npt.NDArray[np.float32],
    magnitude: npt.NDArray[np.float32],
    mask: npt.NDArray[np.uint8],
) -> npt.NDArray[np.float32]:
    """Quality-guided region-growing unwrap of a 3-D phase [rad]; outside mask unchanged."""

def fit_multi_echo_field(
    magnitude: npt.NDArray[np.float32],
    phase: npt.NDArray[np.float32],
    echo_times: Sequence[float],
    mask: npt.NDArray[np.uint8],
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """(E,X,Y,Z) magnitude/phase, TEs [s] -> (omega [rad/s], phi0 [rad], residual [rad]);
    NaN outside mask."""

def fit_r2star_loglinear(
    magnitude: npt.NDArray[np.float32],
    echo_times: Sequence[float],
    mask: npt.NDArray[np.uint8] | None = None,
    weighted: bool = False,
    voxel_major: bool = False,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
    """(E,N) magnitude (or (N,E) with voxel_major=True), TEs [s] -> (R2* [1/s], S0,
    status) of length N; status 0 ok, 1 bad magnitude, 2 degenerate fit, 3 outside mask;
    NaN where status != 0."""

# --- background field removal: PDF, iSMV, LBV (rust/alsiron-py/src/qsm.rs) ---
def pdf(
    field: npt.NDArray[np.float32],
    mask: npt.NDArray[np.uint8],
    weight: npt.NDArray[np.float32] | None,
    voxel_size: tuple[float, float, float],
    b0_dir: tuple[float, float, float],
    pad_voxels: tuple[int, int, int],
    tol: float,
    max_iter: int,
    kernel: str,
    source_smoothing: float = ...,
    sources: npt.NDArray[np.uint8] | None = ...,
) -> tuple[npt.NDArray[np.float32], int]: ...
def ismv(
    field: npt.NDArray[np.float32],
    mask: npt.NDArray[np.uint8],
    voxel_size: tuple[float, float, float],
    radius_mm: float,
    tol: float,
    max_iter: int,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8], int]: ...
def lbv(
    field: npt.NDArray[np.float32],
    mask: npt.NDArray[np.uint8],
    voxel_size: tuple[float, float, float],
    tol: float,
    max_iter: int,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8], int]: ...

# --- relax: R2* fitters with quality maps, EPG (CPMG) simulation and T2/B1 fit
# (rust/alsiron-py/src/fit.rs; kernels rust/alsiron-core/src/{r2star_fit,epg}.rs)
# All array inputs must be C-contiguous with exactly these dtypes; (E, N) is echo-major.

def fit_r2star(
    magnitude: npt.NDArray[np.float32],
    echo_times: Sequence[float],
    mask: npt.NDArray[np.uint8] | None = None,
    method: str = "weighted",
    noise_sigma: float | None = None,
    max_iter: int = 100,
    quality: bool = True,
    voxel_major: bool = False,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32],
           npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
    """(E,N) magnitude (or (N,E) with voxel_major=True), TEs [s], method
    loglinear|weighted|arlo|nlls -> (R2* [1/s], S0, CRLB SD of R2* [1/s], R², status);
    status 0 ok, 1 bad magnitude, 2 degenerate, 3 outside mask, 4 not converged; NaN
    where status != 0."""

def cpmg_echo_trains(
    t2: npt.NDArray[np.float64],
    b1: npt.NDArray[np.float64],
    n_echo: int,
    echo_spacing: float,
    refocusing_deg: float,
    t1: float = 1.0,
) -> npt.NDArray[np.float32]:
    """Per-voxel T2 [s] and B1 scale (N,) -> (E, N) EPG echo amplitudes with S0 = 1."""

def fit_t2_epg(
    magnitude: npt.NDArray[np.float32],
    echo_spacing: float,
    refocusing_deg: float,
    mask: npt.NDArray[np.uint8] | None = None,
    t1: float = 1.0,
    t2_min: float = 0.005,
    t2_max: float = 2.0,
    b1_min: float = 0.3,
    max_iter: int = 200,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32],
           npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
    """(E,N) MESE magnitude at k·ESP -> (T2 [s], S0, B1, R², status), codes as fit_r2star."""

# --- multi-echo field mapping (alsiron.field.echo_fit: ROMEO / Laplacian / complex fit) ---

def unwrap_romeo(
    phase: npt.NDArray[np.float32],
    magnitude: npt.NDArray[np.float32],
    mask: npt.NDArray[np.uint8],
    second_phase: npt.NDArray[np.float32] | None = None,
    te_ratio: float = 1.0,
) -> npt.NDArray[np.float32]:
    """ROMEO-weighted region growing of one echo [rad]; second echo adds the
    phase-gradient coherence (te_ratio = TE_this / TE_second)."""

def unwrap_laplacian(
    phase: npt.NDArray[np.float32],
    mask: npt.NDArray[np.uint8],
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Laplacian unwrapping: (input + 2πk snapped, raw smooth estimate) [rad]."""

def unwrap_echoes_temporal(
    phase: npt.NDArray[np.float32],
    echo_times: list[float],
    reference: npt.NDArray[np.float32],
    reference_echo: int,
) -> npt.NDArray[np.float32]:
    """Temporal unwrapping of offset-free (E, X, Y, Z) phase from one unwrapped echo."""

def fit_field_linear(
    magnitude: npt.NDArray[np.float32],
    unwrapped_phase: npt.NDArray[np.float32],
    echo_times: list[float],
    mask: npt.NDArray[np.uint8],
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Magnitude²-weighted linear fit over TE: (ω [rad/s], φ0 [rad])."""

def fit_field_complex(
    magnitude: npt.NDArray[np.float32],
    phase: npt.NDArray[np.float32],
    echo_times: list[float],
    mask: npt.NDArray[np.uint8],
    omega_init: npt.NDArray[np.float32],
    phase_offset_init: npt.NDArray[np.float32] | None = None,
    max_iter: int = 20,
    tol: float = 1e-4,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32],
           npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
    """Gauss-Newton complex fit: (ω, φ0, residual [rad], sd(ω)/σ, σ̂, iterations)."""

# --- dipole inversions (rust/alsiron-py/src/qsm_inversion.rs) ---------------------------

def tikhonov(
    field: npt.NDArray[np.float32],
    mask: npt.NDArray[np.uint8],
    voxel_size: tuple[float, float, float],
    b0_dir: tuple[float, float, float],
    lam: float,
) -> npt.NDArray[np.float32]: ...
def weighted_tv_admm(
    field: npt.NDArray[np.float32],
    data_weight: npt.NDArray[np.float32],
    tv_weight: npt.NDArray[np.float32] | None,
    mask: npt.NDArray[np.uint8],
    voxel_size: tuple[float, float, float],
    b0_dir: tuple[float, float, float],
    alpha: float,
    mu_gradient: float,
    mu_data: float,
    max_iter: int,
    tol: float,
    phase_scale: float | None = None,
    wh_beta: float | None = None,
    wh_mu: float | None = None,
    progress: Callable[[int, int], object] | None = None,
) -> tuple[npt.NDArray[np.float32], int]: ...
def edge_weight(
    magnitude: npt.NDArray[np.float32],
    mask: npt.NDArray[np.uint8],
    voxel_size: tuple[float, float, float],
    edge_fraction: float,
) -> npt.NDArray[np.float32]: ...
def rts(
    field: npt.NDArray[np.float32],
    mask: npt.NDArray[np.uint8],
    voxel_size: tuple[float, float, float],
    b0_dir: tuple[float, float, float],
    delta: float,
    mu: float,
    rho: float,
    max_iter: int,
    tol: float,
    lsqr_iter: int = 16,
    progress: Callable[[int, int], object] | None = None,
) -> tuple[npt.NDArray[np.float32], int]: ...
def ndi(
    field: npt.NDArray[np.float32],
    weight: npt.NDArray[np.float32],
    mask: npt.NDArray[np.uint8],
    voxel_size: tuple[float, float, float],
    b0_dir: tuple[float, float, float],
    phase_scale: float,
    lam: float,
    step: float,
    max_iter: int,
    tol: float,
    progress: Callable[[int, int], object] | None = None,
) -> tuple[npt.NDArray[np.float32], int]: ...
def sstv_admm(
    laplacian_data: npt.NDArray[np.float32],
    laplacian_weight: npt.NDArray[np.float32],
    local_field: npt.NDArray[np.float32],
    local_weight: npt.NDArray[np.float32],
    voxel_size: tuple[float, float, float],
    b0_dir: tuple[float, float, float],
    alpha: float,
    beta: float,
    mu1: float,
    mu2: float,
    mu3: float,
    tol: float,
    max_iter: int,
    progress: Callable[[int, int], object] | None = None,
) -> tuple[npt.NDArray[np.float32], int]: ...
def ilsqr(
    field: npt.NDArray[np.float32],
    weight: npt.NDArray[np.float32],
    mask: npt.NDArray[np.uint8],
    voxel_size: tuple[float, float, float],
    b0_dir: tuple[float, float, float],
    tol: float,
    max_iter: int,
    progress: Callable[[int, int], object] | None = None,
) -> tuple[npt.NDArray[np.float32], int]: ...
def ilsqr_streaking(
    field: npt.NDArray[np.float32],
    weight: npt.NDArray[np.float32],
    mask: npt.NDArray[np.uint8],
    voxel_size: tuple[float, float, float],
    b0_dir: tuple[float, float, float],
    tol: float,
    max_iter: int,
    ill_threshold: float = 0.1,
    streak_tol: float = 1e-2,
    streak_max_iter: int = 50,
    progress: Callable[[int, int], object] | None = None,
) -> tuple[npt.NDArray[np.float32], int, int]: ...
def ilsqr_fast_estimate(
    field: npt.NDArray[np.float32],
    mask: npt.NDArray[np.uint8],
    voxel_size: tuple[float, float, float],
    b0_dir: tuple[float, float, float],
) -> npt.NDArray[np.float32]: ...

# --- brain surface (BET-like), rust/alsiron-py/src/surface.rs
def bet_evolve_surface(
    magnitude: npt.NDArray[np.float32],
    voxel_size: tuple[float, float, float],
    vertices: npt.NDArray[np.float64],
    faces: npt.NDArray[np.uint32],
    settings: tuple[float, ...],
    iterations: int,
) -> tuple[npt.NDArray[np.float64], int]:
    """Evolve a BET surface (vertices in mm of the index frame); settings = (t2, t, tm, f,
    step_mm, d_min_mm, d_max_mm, r_min_mm, r_max_mm, intensity_step, tangential_step, settle_mm);
    returns (vertices, iterations run)."""
    ...
