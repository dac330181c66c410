//! The 3x3 convolution's inner kernel on x86-64 CPUs with AVX-512: a block of 8 output
//! channels x 48 output columns kept in 24 vector registers through all nine taps and all
//! input channels, reading the padded input planes and the tap-major weights where they lie.
//! (The Winograd kernel's 16 products per tile run on it too, as one tap each.)
//!
//! The shifted GEMMs it replaces (one `gemm` call per tap) pack their operands nine times and
//! load and store the accumulator nine times; at 128 channels and fewer, that bookkeeping is
//! a third of the time. On the 2-core EPYC (Zen 4) one thread runs this kernel at 98-113
//! GFLOP/s on the SD shapes, against 63-102 for the nine GEMMs: about the core's peak.
//!
//! Each output element is one chain of fused multiply-adds in a fixed order (tap, then input
//! channel) whatever the tiling, threads or batch, so an image's result depends on the
//! weights and its own pixels alone.

/// Output channels per block: the rows of the register tile.
pub(crate) const ROWS: usize = 8;
/// Output columns per kernel call: three vectors of 16.
pub(crate) const COLUMNS: usize = 48;

/// Whether this CPU has what the kernel needs: x86-64 with AVX-512F (std caches the answer).
pub(crate) fn cpu_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

/// Whether the layers use the kernel: [`cpu_supported`], and SDMESH_CONV_DIRECT not set to 0
/// (for comparing with the shifted GEMMs). Read once.
pub(crate) fn available() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    cpu_supported() && crate::switched_on(&ENABLED, "SDMESH_CONV_DIRECT")
}

/// `acc[r * acc_stride + j] = Σ_tap Σ_ci weight[r * weight_stride + tap * c_in + ci] ·
/// input[ci * channel + offsets[tap] + j]` over the taps `offsets` names (the 3x3
/// convolution's nine; one for the Winograd kernel's products) for the `ROWS` rows and
/// `width` columns (a multiple of `COLUMNS`), summed in that order. Panics where
/// [`cpu_supported`] is false, or if a slice is too short for the elements it names.
#[allow(clippy::too_many_arguments)]
pub(crate) fn block(
    (acc, acc_stride): (&mut [f32], usize),
    width: usize,
    (weight, weight_stride): (&[f32], usize),
    input: &[f32],
    channel: usize,
    offsets: &[usize],
    c_in: usize,
) {
    assert!(cpu_supported(), "the direct 3x3 kernel needs AVX-512F");
    assert!(width.is_multiple_of(COLUMNS), "width {width} is not a multiple of {COLUMNS}");
    if width == 0 || c_in == 0 {
        for row in acc.chunks_mut(acc_stride).take(ROWS) {
            row[..width].fill(0.0);
        }
        return;
    }
    // Every element the kernel reads or writes lies within these bounds: checked, so the
    // unsafe code below stays inside the slices.
    assert!(acc_stride >= width && acc.len() >= (ROWS - 1) * acc_stride + width, "direct 3x3: acc too short");
    assert!(
        weight_stride >= offsets.len() * c_in && weight.len() >= (ROWS - 1) * weight_stride + offsets.len() * c_in,
        "direct 3x3: weights too short"
    );
    let reach = offsets.iter().max().copied().unwrap_or(0);
    assert!(input.len() >= (c_in - 1) * channel + reach + width, "direct 3x3: input too short");
    #[cfg(target_arch = "x86_64")]
    for first in (0..width).step_by(COLUMNS) {
        // SAFETY: AVX-512F is present (asserted); the accesses lie within the slices (asserted
        // above: columns first..first + COLUMNS <= width of rows < ROWS, channels < c_in, taps
        // < offsets.len()); acc is a &mut not aliased by the & inputs.
        #[allow(unsafe_code)]
        unsafe {
            avx512::block(
                acc.as_mut_ptr().add(first),
                acc_stride,
                weight.as_ptr(),
                weight_stride,
                input.as_ptr().add(first),
                channel,
                offsets,
                c_in,
            )
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx512 {
    use super::{COLUMNS, ROWS};
    use std::arch::x86_64::*;

    const VECTORS: usize = COLUMNS / 16;
    const _: () = assert!(VECTORS == 3, "the loads below are written out for three vectors");

    /// One ROWS x COLUMNS block (see [`super::block`]), the accumulators in registers.
    ///
    /// # Safety
    /// AVX-512F must be present; `acc` must be writable at `r * acc_stride + j`, `weight`
    /// readable at `r * weight_stride + tap * c_in + ci`, and `input` readable at
    /// `ci * channel + offsets[tap] + j`, for r < ROWS, j < COLUMNS, tap < offsets.len(),
    /// ci < c_in.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn block(
        acc: *mut f32,
        acc_stride: usize,
        weight: *const f32,
        weight_stride: usize,
        input: *const f32,
        channel: usize,
        offsets: &[usize],
        c_in: usize,
    ) {
        let mut sums = [[_mm512_setzero_ps(); VECTORS]; ROWS];
        for (tap, &offset) in offsets.iter().enumerate() {
            let (input, weight) = (input.add(offset), weight.add(tap * c_in));
            for ci in 0..c_in {
                let x = input.add(ci * channel);
                let xs = [_mm512_loadu_ps(x), _mm512_loadu_ps(x.add(16)), _mm512_loadu_ps(x.add(32))];
                for (r, sums) in sums.iter_mut().enumerate() {
                    let w = _mm512_set1_ps(*weight.add(r * weight_stride + ci));
                    for v in 0..VECTORS {
                        sums[v] = _mm512_fmadd_ps(w, xs[v], sums[v]);
                    }
                }
            }
        }
        for (r, sums) in sums.iter().enumerate() {
            for (v, &sum) in sums.iter().enumerate() {
                _mm512_storeu_ps(acc.add(r * acc_stride + 16 * v), sum);
            }
        }
    }
}
