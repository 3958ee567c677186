//! 3-D real-to-complex FFT of C-ordered `[nx, ny, nz]` f32 volumes.
//!
//! Layout of the spectrum: the half spectrum `[nx, ny, nz/2 + 1]` in C order, i.e. the
//! layout of `numpy.fft.rfftn(x)` (real transform along the contiguous last axis, complex
//! transforms along y and x). Frequencies along x and y follow `numpy.fft.fftfreq`,
//! along z `numpy.fft.rfftfreq`.
//!
//! The transforms run in single precision ([`Complex32`]) because they are the hot path of
//! every QSM kernel; the round-off is ~1e-6 relative to the signal norm, far below MRI
//! noise. Plans are built once per shape and cached process-wide for the most recently
//! used shapes ([`Fft3Plan::get`]).
//!
//! Strided axes (y and x) are transformed by gathering a block of neighbouring columns
//! into a per-task scratch buffer (so each gathered row is one contiguous FFT input),
//! transforming them together, and scattering them back: no global transpose and no
//! second full-size buffer.

use std::sync::{Arc, Mutex};

use num_complex::Complex32;
use rayon::prelude::*;
use realfft::{ComplexToReal, RealFftPlanner, RealToComplex};
use rustfft::{Fft, FftPlanner};

use crate::error::{CoreError, CoreResult};
use crate::grid::Shape3;

/// Number of neighbouring columns gathered together for a strided-axis FFT: 8 complex
/// f32 values are one 64-byte cache line, so each gathered row touches one whole line
/// (measured fastest of 8/16/32/64 at 256×256×176).
const COLUMN_BLOCK: usize = 8;

/// Smallest `m >= n` whose only prime factors are 2, 3 and 5 (fast FFT lengths).
pub fn fast_len(n: usize) -> usize {
    if n <= 1 {
        return 1;
    }
    let mut m = n;
    loop {
        let mut r = m;
        for p in [2, 3, 5] {
            while r % p == 0 {
                r /= p;
            }
        }
        if r == 1 {
            return m;
        }
        m += 1;
    }
}

/// Precomputed 1-D transforms for one 3-D shape.
pub struct Fft3Plan {
    shape: Shape3,
    r2c: Arc<dyn RealToComplex<f32>>,
    c2r: Arc<dyn ComplexToReal<f32>>,
    y_forward: Arc<dyn Fft<f32>>,
    y_inverse: Arc<dyn Fft<f32>>,
    x_forward: Arc<dyn Fft<f32>>,
    x_inverse: Arc<dyn Fft<f32>>,
}

/// How many shapes keep their plan: a cohort run meets a handful of grids, and a long-lived
/// process that sees many (a server, a test suite) should not keep every plan forever.
const PLAN_CACHE_SHAPES: usize = 8;

/// Most-recently-used list of values by key, at most `capacity` long (tiny, so a linear
/// scan beats hashing).
struct MruCache<K, V> {
    entries: Vec<(K, V)>,
    capacity: usize,
}

impl<K: PartialEq, V: Clone> MruCache<K, V> {
    const fn new(capacity: usize) -> Self {
        Self {
            entries: Vec::new(),
            capacity,
        }
    }

    /// The value for `key`, moved to the front; built by `make` (and the least recently
    /// used entry dropped when full) on a miss.
    fn get_or_insert_with(&mut self, key: K, make: impl FnOnce() -> V) -> V {
        if let Some(pos) = self.entries.iter().position(|(k, _)| *k == key) {
            let entry = self.entries.remove(pos);
            self.entries.insert(0, entry);
        } else {
            self.entries.insert(0, (key, make()));
            self.entries.truncate(self.capacity.max(1));
        }
        self.entries[0].1.clone()
    }
}

type PlanCache = Mutex<MruCache<[usize; 3], Arc<Fft3Plan>>>;

fn plan_cache() -> &'static PlanCache {
    static CACHE: PlanCache = Mutex::new(MruCache::new(PLAN_CACHE_SHAPES));
    &CACHE
}

/// How many spectrum-sized work buffers [`Fft3Plan::keep_workspace`] keeps between calls:
/// the two that NDI's loop needs (≈ 94 MB at 256×256×176).
pub const SPARE_SPECTRA: usize = 2;

fn spare_spectra() -> &'static Mutex<Vec<Vec<Complex32>>> {
    static SPARES: Mutex<Vec<Vec<Complex32>>> = Mutex::new(Vec::new());
    &SPARES
}

/// Free the work buffers kept by [`Fft3Plan::keep_workspace`] (a long-lived process that
/// is done with the large transforms).
pub fn release_workspaces() {
    spare_spectra()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
}

/// A raw pointer that rayon tasks may share because each task touches a disjoint set of
/// elements (see the SAFETY notes where it is dereferenced).
#[derive(Clone, Copy)]
struct SharedMut(*mut Complex32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl Fft3Plan {
    /// The cached plan for `shape`, building it on first use (the last
    /// [`PLAN_CACHE_SHAPES`] shapes keep theirs; plans in use stay alive through their `Arc`).
    pub fn get(shape: Shape3) -> CoreResult<Arc<Fft3Plan>> {
        if shape.is_empty() {
            return Err(CoreError::ShapeMismatch(format!(
                "cannot plan an FFT for the empty shape {:?}",
                shape.0
            )));
        }
        // A poisoned lock only means another thread panicked while inserting; the map
        // itself is still a valid cache.
        let mut cache = plan_cache().lock().unwrap_or_else(|e| e.into_inner());
        Ok(cache.get_or_insert_with(shape.0, || Arc::new(Self::build(shape))))
    }

    fn build(shape: Shape3) -> Fft3Plan {
        let [nx, ny, nz] = shape.0;
        let mut real_planner = RealFftPlanner::<f32>::new();
        let mut planner = FftPlanner::<f32>::new();
        Fft3Plan {
            shape,
            r2c: real_planner.plan_fft_forward(nz),
            c2r: real_planner.plan_fft_inverse(nz),
            y_forward: planner.plan_fft_forward(ny),
            y_inverse: planner.plan_fft_inverse(ny),
            x_forward: planner.plan_fft_forward(nx),
            x_inverse: planner.plan_fft_inverse(nx),
        }
    }

    /// Shape of the real volume.
    pub fn shape(&self) -> Shape3 {
        self.shape
    }

    /// Number of complex values in the half spectrum.
    pub fn spectrum_len(&self) -> usize {
        self.shape.half_spectrum().len()
    }

    /// A zeroed half-spectrum buffer.
    ///
    /// Filled in parallel: `vec![zero; n]` would write (and page-fault) tens of MB from
    /// one thread, which costs as much as a whole FFT pass on large volumes.
    pub fn make_spectrum(&self) -> Vec<Complex32> {
        (0..self.spectrum_len())
            .into_par_iter()
            .with_min_len(1 << 14)
            .map(|_| Complex32::new(0.0, 0.0))
            .collect()
    }

    /// A half-spectrum-sized work buffer with unspecified (initialised) contents: a spare
    /// kept by [`Fft3Plan::keep_workspace`] when one of this length is there, else fresh
    /// zeroed pages ([`zeroed_complex`]).
    ///
    /// Why: faulting in fresh pages is about a third of the CPU time of a fused filter
    /// at 256×256×176 (46 MB of spectrum are 11 000 page faults), so the passes that
    /// only need scratch reuse the previous call's.
    pub fn take_workspace(&self) -> Vec<Complex32> {
        let len = self.spectrum_len();
        let mut spares = spare_spectra().lock().unwrap_or_else(|e| e.into_inner());
        match spares.iter().position(|b| b.len() == len) {
            Some(pos) => spares.swap_remove(pos),
            None => {
                drop(spares);
                zeroed_complex(len)
            }
        }
    }

    /// Keep a buffer from [`Fft3Plan::take_workspace`] for later calls. At most
    /// [`SPARE_SPECTRA`] buffers are kept process-wide (the oldest goes first); see
    /// [`release_workspaces`].
    pub fn keep_workspace(&self, buffer: Vec<Complex32>) {
        let mut spares = spare_spectra().lock().unwrap_or_else(|e| e.into_inner());
        if spares.len() >= SPARE_SPECTRA {
            spares.remove(0);
        }
        spares.push(buffer);
    }

    /// Forward transform (unnormalised, like `numpy.fft.rfftn`).
    pub fn forward(&self, input: &[f32], spectrum: &mut [Complex32]) -> CoreResult<()> {
        self.shape.check_len(input.len(), "FFT input")?;
        self.check_spectrum(spectrum.len())?;
        self.forward_planes(input, None, spectrum)?;
        self.x_axis(spectrum, &self.x_forward);
        Ok(())
    }

    /// Inverse transform normalised by 1/N, so `inverse(forward(x)) == x`.
    ///
    /// `spectrum` is used as workspace and is overwritten. As in `numpy.fft.irfftn`, the
    /// imaginary parts of the DC (and, for even `nz`, Nyquist) bins of each last-axis line
    /// are ignored.
    pub fn inverse(&self, spectrum: &mut [Complex32], output: &mut [f32]) -> CoreResult<()> {
        self.shape.check_len(output.len(), "FFT output")?;
        self.check_spectrum(spectrum.len())?;
        self.x_axis(spectrum, &self.x_inverse);
        self.inverse_planes(spectrum, output, None)
    }

    /// Real-to-real spectral filter: `output = F⁻¹{H · F{input}}`, with `input` taken as
    /// zero where `input_mask` is 0 and `output` set to zero where `output_mask` is 0.
    ///
    /// `multiply(column, values, line)` applies H in place to one column of the half
    /// spectrum: `column = j·(nz/2 + 1) + k` names the (ky, kz) bin and `values[a]` is the
    /// bin (kx = a, ky = j, kz = k) of the forward transform (unnormalised, as
    /// [`Fft3Plan::forward`]); the 1/N of the inverse is applied afterwards. `line` is
    /// scratch of nx f32 for the caller (the column of H, say): H is computed on the fly,
    /// so no kernel array exists.
    ///
    /// Equal to `forward` → multiply → `inverse` to float round-off, but cheaper: each
    /// column block of the x axis is gathered once, transformed forward, filtered and
    /// transformed back while in cache (one strided sweep instead of two), the masks are
    /// applied while the lines are copied in the plane passes, and the only temporary is
    /// the half spectrum.
    pub fn filter<F>(
        &self,
        input: &[f32],
        input_mask: Option<&[u8]>,
        output: &mut [f32],
        output_mask: Option<&[u8]>,
        multiply: F,
    ) -> CoreResult<()>
    where
        F: Fn(usize, &mut [Complex32], &mut [f32]) + Sync,
    {
        self.shape.check_len(input.len(), "filter input")?;
        self.shape.check_len(output.len(), "filter output")?;
        for mask in [input_mask, output_mask].into_iter().flatten() {
            self.shape.check_len(mask.len(), "filter mask")?;
        }
        let n = self.shape.0[0];
        // Every element is written by the forward plane pass before it is read.
        let mut spectrum = self.take_workspace();
        self.forward_planes(input, input_mask, &mut spectrum)?;
        self.x_blocks(&mut spectrum, &mut [], true, |mut block| {
            block.forward();
            for (c, values) in block.rows.chunks_exact_mut(n).enumerate() {
                multiply(block.first_column + c, values, block.line);
            }
            block.inverse();
            [0.0; 2]
        });
        let result = self.inverse_planes(&mut spectrum, output, output_mask);
        self.keep_workspace(spectrum);
        result
    }

    /// Real transforms along z and complex transforms along y of every x-plane (the
    /// forward transform without its x axis). Voxels where `mask` is 0 count as 0.
    fn forward_planes(
        &self,
        input: &[f32],
        mask: Option<&[u8]>,
        spectrum: &mut [Complex32],
    ) -> CoreResult<()> {
        let [_, ny, nz] = self.shape.0;
        let nh = nz / 2 + 1;
        let r2c = &self.r2c;
        let y_fft = &self.y_forward;
        // Real transforms of the lines of one x-plane, then the y transforms of that plane
        // while it is still in cache (a plane is ny·nh complex values).
        spectrum
            .par_chunks_mut(ny * nh)
            .zip(input.par_chunks(ny * nz))
            .enumerate()
            .try_for_each_init(
                || self.plane_scratch(r2c.get_scratch_len(), y_fft.get_inplace_scratch_len()),
                |ws, (i, (plane_out, plane_in))| {
                    let plane_mask = mask.map(|m| &m[i * ny * nz..(i + 1) * ny * nz]);
                    for (j, (out, inp)) in plane_out
                        .chunks_exact_mut(nh)
                        .zip(plane_in.chunks_exact(nz))
                        .enumerate()
                    {
                        // realfft uses its input as workspace, so transform a copy
                        // (masked on the way in).
                        match plane_mask {
                            None => ws.line.copy_from_slice(inp),
                            Some(m) => {
                                let m = &m[j * nz..(j + 1) * nz];
                                for ((l, &v), &keep) in ws.line.iter_mut().zip(inp).zip(m) {
                                    *l = keep_where(v, keep);
                                }
                            }
                        }
                        r2c.process_with_scratch(&mut ws.line, out, &mut ws.real_scratch)
                            .map_err(|e| CoreError::InvalidArgument(format!("real FFT: {e}")))?;
                    }
                    ws.transform_columns(plane_out, ny, nh, y_fft);
                    Ok::<(), CoreError>(())
                },
            )
    }

    /// Inverse of [`Fft3Plan::forward_planes`] including the 1/N of the whole inverse
    /// transform; voxels where `mask` is 0 are set to 0. `spectrum` is overwritten.
    pub(crate) fn inverse_planes(
        &self,
        spectrum: &mut [Complex32],
        output: &mut [f32],
        mask: Option<&[u8]>,
    ) -> CoreResult<()> {
        let [_, ny, nz] = self.shape.0;
        let nh = nz / 2 + 1;
        let scale = 1.0 / self.shape.len() as f32;
        let c2r = &self.c2r;
        let y_fft = &self.y_inverse;
        output
            .par_chunks_mut(ny * nz)
            .zip(spectrum.par_chunks_mut(ny * nh))
            .enumerate()
            .try_for_each_init(
                || self.plane_scratch(c2r.get_scratch_len(), y_fft.get_inplace_scratch_len()),
                |ws, (i, (plane_out, plane_spec))| {
                    let plane_mask = mask.map(|m| &m[i * ny * nz..(i + 1) * ny * nz]);
                    ws.transform_columns(plane_spec, ny, nh, y_fft);
                    for (j, (out, spec)) in plane_out
                        .chunks_exact_mut(nz)
                        .zip(plane_spec.chunks_exact_mut(nh))
                        .enumerate()
                    {
                        self.inverse_line(spec, out, &mut ws.real_scratch)?;
                        match plane_mask {
                            None => out.iter_mut().for_each(|v| *v *= scale),
                            Some(m) => {
                                let m = &m[j * nz..(j + 1) * nz];
                                for (v, &keep) in out.iter_mut().zip(m) {
                                    *v = keep_where(*v * scale, keep);
                                }
                            }
                        }
                    }
                    Ok::<(), CoreError>(())
                },
            )
    }

    /// Unnormalised inverse real FFT of one last-axis line (its DC and, for even nz,
    /// Nyquist imaginary parts ignored as in `numpy.fft.irfft`); `spec` is overwritten.
    #[inline]
    fn inverse_line(
        &self,
        spec: &mut [Complex32],
        out: &mut [f32],
        scratch: &mut [Complex32],
    ) -> CoreResult<()> {
        let nh = spec.len();
        spec[0].im = 0.0;
        if self.shape.0[2] % 2 == 0 {
            spec[nh - 1].im = 0.0;
        }
        self.c2r
            .process_with_scratch(spec, out, scratch)
            .map_err(|e| CoreError::InvalidArgument(format!("inverse real FFT: {e}")))
    }

    /// One sweep over a spectrum whose x axis is already transformed back (the state
    /// between the x pass and the plane pass of [`Fft3Plan::inverse`]): per x-plane, the
    /// inverse y and z transforms give the real lines, `map(offset, line)` changes each
    /// line in place (`offset` is the index of the line's first voxel in the C-ordered
    /// volume; the line already carries the 1/N of the inverse), and the forward z and y
    /// transforms put the plane back, all while the plane is in cache. Iterative solvers
    /// that alternate a voxel-wise nonlinearity with spectral operators use it to avoid a
    /// real volume and two memory sweeps per iteration.
    pub(crate) fn map_real_lines<F>(&self, spectrum: &mut [Complex32], map: F) -> CoreResult<()>
    where
        F: Fn(usize, &mut [f32]) + Sync,
    {
        self.check_spectrum(spectrum.len())?;
        let [_, ny, nz] = self.shape.0;
        let nh = nz / 2 + 1;
        let scale = 1.0 / self.shape.len() as f32;
        let scratch_len = self.c2r.get_scratch_len().max(self.r2c.get_scratch_len());
        let fft_scratch_len = self
            .y_inverse
            .get_inplace_scratch_len()
            .max(self.y_forward.get_inplace_scratch_len());
        spectrum
            .par_chunks_mut(ny * nh)
            .enumerate()
            .try_for_each_init(
                || self.plane_scratch(scratch_len, fft_scratch_len),
                |ws, (i, plane)| {
                    ws.transform_columns(plane, ny, nh, &self.y_inverse);
                    for (j, spec) in plane.chunks_exact_mut(nh).enumerate() {
                        self.inverse_line(spec, &mut ws.line, &mut ws.real_scratch)?;
                        ws.line.iter_mut().for_each(|v| *v *= scale);
                        map((i * ny + j) * nz, &mut ws.line);
                        self.r2c
                            .process_with_scratch(&mut ws.line, spec, &mut ws.real_scratch)
                            .map_err(|e| CoreError::InvalidArgument(format!("real FFT: {e}")))?;
                    }
                    ws.transform_columns(plane, ny, nh, &self.y_forward);
                    Ok::<(), CoreError>(())
                },
            )
    }

    fn plane_scratch(&self, real_scratch: usize, fft_scratch: usize) -> PlaneScratch {
        let [_, ny, nz] = self.shape.0;
        PlaneScratch::new(nz, ny, real_scratch, fft_scratch)
    }

    fn check_spectrum(&self, len: usize) -> CoreResult<()> {
        if len != self.spectrum_len() {
            return Err(CoreError::ShapeMismatch(format!(
                "half spectrum has {len} elements, expected {} for shape {:?}",
                self.spectrum_len(),
                self.shape.0
            )));
        }
        Ok(())
    }

    /// In-place complex FFT along x of the half spectrum.
    fn x_axis(&self, spectrum: &mut [Complex32], fft: &Arc<dyn Fft<f32>>) {
        let n = self.shape.0[0];
        self.x_blocks(spectrum, &mut [], true, |block| {
            if n > 1 {
                fft.process_with_scratch(block.rows, block.scratch);
            }
            [0.0; 2]
        });
    }

    /// One sweep over the x columns of the half spectrum, a block of neighbouring columns
    /// at a time: the block's x-lines are gathered into contiguous rows (skipped when
    /// `gather` is false: the hook then fills the rows itself), `hook` works on them, and
    /// they are scattered back. Returns the sum over blocks of the hook's two numbers
    /// (energies for a stopping rule, say).
    ///
    /// `companion` is either empty or one spectrum-sized buffer in *block layout*: block b
    /// owns `companion[b·B·nx ..][..width·nx]` (B = [`COLUMN_BLOCK`]), column by column,
    /// x fastest — the layout of the gathered rows, so a solver can keep a spectrum there
    /// and read it contiguously next to the gathered block.
    ///
    /// The spectrum is viewed as `[nx, inner]` (inner = ny·nh columns); each work item
    /// owns a disjoint set of elements.
    pub(crate) fn x_blocks<H>(
        &self,
        spectrum: &mut [Complex32],
        companion: &mut [Complex32],
        gather: bool,
        hook: H,
    ) -> [f64; 2]
    where
        H: Fn(XBlock<'_>) -> [f64; 2] + Sync,
    {
        let [n, ny, nz] = self.shape.0;
        let inner = ny * (nz / 2 + 1);
        debug_assert_eq!(spectrum.len(), n * inner);
        debug_assert!(companion.is_empty() || companion.len() == n * inner);
        let base = SharedMut(spectrum.as_mut_ptr());
        let scratch_len = self
            .x_forward
            .get_inplace_scratch_len()
            .max(self.x_inverse.get_inplace_scratch_len());
        let init = || {
            (
                vec![Complex32::new(0.0, 0.0); COLUMN_BLOCK * n],
                vec![Complex32::new(0.0, 0.0); scratch_len],
                vec![0.0f32; n],
            )
        };
        let body = |(rows, scratch, line): &mut (Vec<Complex32>, Vec<Complex32>, Vec<f32>),
                    block: usize,
                    companion: &mut [Complex32]| {
            let c0 = block * COLUMN_BLOCK;
            let width = COLUMN_BLOCK.min(inner - c0);
            let rows = &mut rows[..width * n];
            let ptr = base;
            if gather {
                // SAFETY: this task reads and writes only the elements a·inner + c for
                // a < n and c in [c0, c0 + width). Column blocks of different tasks never
                // overlap, so no two tasks touch the same element, and every index is
                // < n·inner = spectrum.len() (checked by the callers).
                unsafe {
                    for a in 0..n {
                        let src = ptr.0.add(a * inner + c0);
                        for c in 0..width {
                            *rows.get_unchecked_mut(c * n + a) = *src.add(c);
                        }
                    }
                }
            }
            let sums = hook(XBlock {
                first_column: c0,
                rows: &mut *rows,
                scratch,
                line,
                companion,
                plan: self,
            });
            // SAFETY: same disjoint element set as the gather above.
            unsafe {
                for a in 0..n {
                    let dst = ptr.0.add(a * inner + c0);
                    for c in 0..width {
                        *dst.add(c) = *rows.get_unchecked(c * n + a);
                    }
                }
            }
            sums
        };
        let add = |a: [f64; 2], b: [f64; 2]| [a[0] + b[0], a[1] + b[1]];
        let blocks = inner.div_ceil(COLUMN_BLOCK);
        if companion.is_empty() {
            (0..blocks)
                .into_par_iter()
                .map_init(init, |ws, block| body(ws, block, &mut []))
                .reduce(|| [0.0; 2], add)
        } else {
            companion
                .par_chunks_mut(COLUMN_BLOCK * n)
                .enumerate()
                .map_init(init, |ws, (block, part)| body(ws, block, part))
                .reduce(|| [0.0; 2], add)
        }
    }
}

/// One block of x columns inside [`Fft3Plan::x_blocks`].
pub(crate) struct XBlock<'a> {
    /// Half-spectrum column index (j·nh + k) of the block's first column.
    pub first_column: usize,
    /// The block's columns, each `nx` values long, x fastest.
    pub rows: &'a mut [Complex32],
    scratch: &'a mut [Complex32],
    /// Scratch of nx f32 for the hook.
    pub line: &'a mut [f32],
    /// This block's part of the companion buffer (empty when there is none).
    pub companion: &'a mut [Complex32],
    plan: &'a Fft3Plan,
}

impl XBlock<'_> {
    /// Forward FFT along x of every row of the block.
    pub fn forward(&mut self) {
        if self.plan.shape.0[0] > 1 {
            self.plan
                .x_forward
                .process_with_scratch(self.rows, self.scratch);
        }
    }

    /// Inverse (unnormalised) FFT along x of every row of the block.
    pub fn inverse(&mut self) {
        if self.plan.shape.0[0] > 1 {
            self.plan
                .x_inverse
                .process_with_scratch(self.rows, self.scratch);
        }
    }
}

/// `value` where `keep` is nonzero, +0 elsewhere (NaN and ±∞ included), as bit operations
/// so that masked copies vectorise.
#[inline(always)]
fn keep_where(value: f32, keep: u8) -> f32 {
    f32::from_bits(value.to_bits() & 0u32.wrapping_sub(u32::from(keep != 0)))
}

/// A zeroed complex buffer of `len` values from zeroed allocator memory (`calloc`, which
/// for large sizes maps fresh zero pages without writing them). Writing the zeros, even in
/// parallel, costs a whole extra memory pass plus the page faults before the first real
/// pass over the buffer.
pub fn zeroed_complex(len: usize) -> Vec<Complex32> {
    // `vec![0.0; n]` allocates zeroed memory and exactly n elements of capacity.
    let mut floats = std::mem::ManuallyDrop::new(vec![0.0f32; 2 * len]);
    let (ptr, cap) = (floats.as_mut_ptr(), floats.capacity());
    debug_assert_eq!(cap, 2 * len);
    // SAFETY: Complex32 is `#[repr(C)] { re: f32, im: f32 }`: the alignment of f32 and
    // the size of two, so the allocation (2·len f32, alignment of f32) has exactly the
    // layout of `len` Complex32 and is freed with that layout; all-zero bits are 0 + 0i.
    unsafe { Vec::from_raw_parts(ptr.cast::<Complex32>(), len, cap / 2) }
}

/// Per-task buffers for the fused (last axis + y) plane pass.
struct PlaneScratch {
    line: Vec<f32>,
    real_scratch: Vec<Complex32>,
    columns: Vec<Complex32>,
    fft_scratch: Vec<Complex32>,
}

impl PlaneScratch {
    fn new(nz: usize, ny: usize, real_scratch: usize, fft_scratch: usize) -> Self {
        let zero = Complex32::new(0.0, 0.0);
        PlaneScratch {
            line: vec![0.0; nz],
            real_scratch: vec![zero; real_scratch],
            columns: vec![zero; COLUMN_BLOCK * ny],
            fft_scratch: vec![zero; fft_scratch],
        }
    }

    /// FFT along the rows axis of a `[rows, cols]` plane, a block of columns at a time
    /// (gathered into contiguous rows of `columns`, transformed, scattered back).
    fn transform_columns(
        &mut self,
        plane: &mut [Complex32],
        rows: usize,
        cols: usize,
        fft: &Arc<dyn Fft<f32>>,
    ) {
        if rows == 1 {
            return; // a length-1 DFT is the identity
        }
        for c0 in (0..cols).step_by(COLUMN_BLOCK) {
            let width = COLUMN_BLOCK.min(cols - c0);
            let buf = &mut self.columns[..width * rows];
            assert!(plane.len() >= rows * cols && c0 + width <= cols);
            // SAFETY: a < rows, c < width, so c·rows + a < width·rows = buf.len() and
            // a·cols + c0 + c < rows·cols <= plane.len() (asserted above). Unchecked
            // because this gather/scatter is a hot loop of every FFT.
            unsafe {
                for a in 0..rows {
                    let row = plane.as_ptr().add(a * cols + c0);
                    for c in 0..width {
                        *buf.get_unchecked_mut(c * rows + a) = *row.add(c);
                    }
                }
            }
            fft.process_with_scratch(buf, &mut self.fft_scratch);
            // SAFETY: the same index bounds as the gather.
            unsafe {
                for a in 0..rows {
                    let row = plane.as_mut_ptr().add(a * cols + c0);
                    for c in 0..width {
                        *row.add(c) = *buf.get_unchecked(c * rows + a);
                    }
                }
            }
        }
    }
}

/// Forward FFT of `input` with the cached plan for `shape` (allocating convenience).
pub fn forward(input: &[f32], shape: Shape3) -> CoreResult<Vec<Complex32>> {
    let plan = Fft3Plan::get(shape)?;
    // Written by the (parallel) plane pass before anything reads it.
    let mut spectrum = zeroed_complex(plan.spectrum_len());
    plan.forward(input, &mut spectrum)?;
    Ok(spectrum)
}

/// Inverse FFT of a half spectrum back to a real volume of `shape` (allocating convenience).
pub fn inverse(spectrum: &[Complex32], shape: Shape3) -> CoreResult<Vec<f32>> {
    let plan = Fft3Plan::get(shape)?;
    let mut work: Vec<Complex32> = spectrum.par_iter().with_min_len(1 << 14).copied().collect();
    let mut out = vec![0.0f32; shape.len()];
    plan.inverse(&mut work, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests;
