//! Edge costs of the unwrapper: the quantised edge quality (phase, magnitude and
//! second-echo coherence), computed a run of voxels at a time with an AVX2 build where
//! the CPU has it, and the seed score of a voxel.

use super::SecondEcho;

/// Cost marking "no edge": the neighbour is outside the volume or inactive.
pub(super) const NO_EDGE: u8 = u8::MAX;

/// Growth state of a voxel that is done (reached) or never reachable.
pub(super) const CLOSED: u8 = 0;
/// Growth state of a reachable voxel with no edge queued towards it. A reachable voxel
/// whose best queued edge costs `c` has state `c + 1` (see `grow`).
pub(super) const OPEN: u8 = u8::MAX;

/// What the edge quality is made of (see the module documentation).
pub(super) struct CostInputs<'a> {
    pub(super) phase: &'a [f32],
    pub(super) magnitude: Option<&'a [f32]>,
    pub(super) second: Option<SecondEcho<'a>>,
    /// 1 / reference magnitude.
    pub(super) inv_ref: f32,
}

/// Quantised cost in 0..=254 (0 best) of the edge from voxel `a` to voxel `b`, given the
/// phases `pa`, `pb`, magnitudes `ma`, `mb` and second-echo phases `sa`, `sb` of both ends.
/// Every caller passes the lower-index voxel as `a`, so both ends of an edge see
/// bit-identical costs. Branch-free so that rows of edges vectorise; values for unusable
/// voxels are garbage (never NaN-trapping) and masked by the caller.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) fn quantised_cost<const MAG: bool, const SECOND: bool>(
    pa: f32,
    pb: f32,
    ma: f32,
    mb: f32,
    sa: f32,
    sb: f32,
    te_ratio: f32,
    inv_ref: f32,
) -> u8 {
    // f32 is plenty here: the quality is quantised to 255 levels.
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23: round to nearest for |x| < 2^22
                                     // Wrapped differences in turns: no trigonometry needed.
    let d = (pb - pa) * std::f32::consts::FRAC_1_PI * 0.5;
    let step_turns = d - ((d + MAGIC) - MAGIC);
    let mut q = 1.0 - 2.0 * step_turns.abs();
    if SECOND {
        let d2 = (sb - sa) * std::f32::consts::FRAC_1_PI * 0.5;
        let step2_turns = d2 - ((d2 + MAGIC) - MAGIC);
        // Both wrapped steps in radians: 2π·turns.
        let mismatch = 2.0 * std::f32::consts::PI * (step_turns - step2_turns * te_ratio);
        q *= (1.0 - mismatch.abs()).max(0.0);
    }
    if MAG {
        let (a, b) = (mb.abs(), ma.abs());
        let (lo, hi) = (a.min(b), a.max(b));
        let coherence = if hi > 0.0 { lo / hi } else { 0.0 };
        q *= coherence * (lo * inv_ref).min(1.0);
    }
    let q = q.clamp(0.0, 1.0);
    ((1.0 - q) * 254.0 + 0.5) as u8
}

/// `out[k]` = cost of the edge from voxel `a0 + k` to voxel `b0 + k` (`a0 < b0`).
pub(super) fn cost_run(inputs: &CostInputs<'_>, a0: usize, b0: usize, out: &mut [u8]) {
    // Absent inputs are replaced by the phase (never read: the flags switch them off).
    let mag = inputs.magnitude.unwrap_or(inputs.phase);
    let (second, te_ratio) = match inputs.second {
        Some(s) => (s.phase, s.te_ratio),
        None => (inputs.phase, 1.0),
    };
    let flags = (inputs.magnitude.is_some(), inputs.second.is_some());
    let values = [inputs.phase, mag, second];
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        unsafe { cost_run_avx2(flags, values, te_ratio, inputs.inv_ref, a0, b0, out) };
        return;
    }
    cost_run_dispatch(flags, values, te_ratio, inputs.inv_ref, a0, b0, out);
}

/// [`cost_run_with`] for the inputs present (`flags` = magnitude, second echo).
#[inline(always)]
pub(super) fn cost_run_dispatch(
    flags: (bool, bool),
    values: [&[f32]; 3],
    te_ratio: f32,
    inv_ref: f32,
    a0: usize,
    b0: usize,
    out: &mut [u8],
) {
    // Direct calls (not a function pointer), so that they inline into the AVX2 build.
    match flags {
        (true, true) => cost_run_with::<true, true>(values, te_ratio, inv_ref, a0, b0, out),
        (true, false) => cost_run_with::<true, false>(values, te_ratio, inv_ref, a0, b0, out),
        (false, true) => cost_run_with::<false, true>(values, te_ratio, inv_ref, a0, b0, out),
        (false, false) => cost_run_with::<false, false>(values, te_ratio, inv_ref, a0, b0, out),
    }
}

/// [`cost_run_dispatch`] compiled for AVX2 (twice the vector width of the x86-64
/// baseline). Bit-identical to the baseline build: the same IEEE operations in the same
/// order (Rust forms no fused multiply-adds on its own).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn cost_run_avx2(
    flags: (bool, bool),
    values: [&[f32]; 3],
    te_ratio: f32,
    inv_ref: f32,
    a0: usize,
    b0: usize,
    out: &mut [u8],
) {
    cost_run_dispatch(flags, values, te_ratio, inv_ref, a0, b0, out);
}

#[inline(always)]
pub(super) fn cost_run_with<const MAG: bool, const SECOND: bool>(
    [phase, mag, second]: [&[f32]; 3],
    te_ratio: f32,
    inv_ref: f32,
    a0: usize,
    b0: usize,
    out: &mut [u8],
) {
    let len = out.len();
    let (pa, pb) = (&phase[a0..a0 + len], &phase[b0..b0 + len]);
    let (ma, mb) = (&mag[a0..a0 + len], &mag[b0..b0 + len]);
    let (sa, sb) = (&second[a0..a0 + len], &second[b0..b0 + len]);
    for k in 0..len {
        out[k] = quantised_cost::<MAG, SECOND>(
            pa[k], pb[k], ma[k], mb[k], sa[k], sb[k], te_ratio, inv_ref,
        );
    }
}

/// Seed quality of a voxel: sum of the qualities (255 − cost) of its usable edges.
pub(super) fn seed_score(costs: [u8; 6]) -> u16 {
    costs
        .iter()
        .filter(|&&c| c != NO_EDGE)
        .map(|&c| 255 - c as u16)
        .sum()
}
