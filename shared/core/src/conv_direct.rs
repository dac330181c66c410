//! The 3x3 convolution's inner kernel on x86-64 CPUs with AVX-512 or AVX2 + FMA: a block of 8
//! output channels x 48 output columns kept in vector registers through all nine taps and all
//! input channels, reading the padded input planes and the tap-major weights where they lie.
//! (The Winograd kernel's 16 products per tile run on it too, as one tap each.)
//!
//! The shifted GEMMs it replaces (one `gemm` call per tap) pack their operands nine times and
//! load and store the accumulator nine times; at 128 channels and fewer, that bookkeeping is
//! a third of the time. On the 2-core EPYC (Zen 4) one thread runs this kernel at 98-113
//! GFLOP/s on the SD shapes, against 63-102 for the nine GEMMs: about the core's peak.
//!
//! With AVX-512 the whole block's 24 accumulators fit the 32 registers; AVX2 has 16 registers
//! of half the width, so it runs the block as six 4 x 16 parts (8 accumulators each). On AVX2
//! the layers use it for the Winograd kernel's products only (see `conv::Kernel::for_shape`).
//!
//! Each output element is one chain of fused multiply-adds in a fixed order (tap, then input
//! channel) whatever the tiling, threads, batch or instruction set, so an image's result
//! depends on the weights and its own pixels alone: AVX-512 and AVX2 machines give the same
//! bits.

/// Output channels per block: the rows of the register tile.
pub(crate) const ROWS: usize = 8;
/// Output columns per kernel call: three vectors of 16.
pub(crate) const COLUMNS: usize = 48;

/// The vector instructions a kernel runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    /// AVX-512F.
    Avx512,
    /// AVX2 and FMA (x86-64 CPUs without AVX-512, e.g. AMD Zen 1-3 and Intel's client cores).
    Avx2,
}

impl Isa {
    /// Whether this CPU has it (std caches the answer).
    pub(crate) fn on_this_cpu(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        return match self {
            Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            Isa::Avx2 => std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
        };
        #[cfg(not(target_arch = "x86_64"))]
        return false;
    }
}

/// The instruction set the kernels run on here: AVX-512 where the CPU has it (unless
/// SDMESH_CONV_AVX512 is 0, for comparing: the results are the same bits), else AVX2 + FMA;
/// `None` on other CPUs, which run the shifted GEMMs. Read once.
pub(crate) fn cpu_isa() -> Option<Isa> {
    static AVX512: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if Isa::Avx512.on_this_cpu() && crate::switched_on(&AVX512, "SDMESH_CONV_AVX512") {
        Some(Isa::Avx512)
    } else if Isa::Avx2.on_this_cpu() {
        Some(Isa::Avx2)
    } else {
        None
    }
}

/// The instruction set the layers run the kernel on: [`cpu_isa`], unless SDMESH_CONV_DIRECT
/// is 0 (for comparing with the shifted GEMMs). Read once.
pub(crate) fn available() -> Option<Isa> {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    cpu_isa().filter(|_| crate::switched_on(&ENABLED, "SDMESH_CONV_DIRECT"))
}

/// For tests: the instruction sets this CPU has, of those the kernels are written for (AVX2
/// wherever the CPU has it, so an x86-64 test machine runs at least one).
#[cfg(test)]
pub(crate) fn isas_here() -> Vec<Isa> {
    let isas: Vec<Isa> = [Isa::Avx512, Isa::Avx2].into_iter().filter(|isa| isa.on_this_cpu()).collect();
    #[cfg(target_arch = "x86_64")]
    assert_eq!(isas.is_empty(), !std::arch::is_x86_feature_detected!("avx2"), "{isas:?}");
    isas
}

/// `acc[r * acc_stride + j] = Σ_tap Σ_ci weight[r * weight_stride + tap * c_in + ci] ·
/// input[ci * channel + offsets[tap] + j]` over the taps `offsets` names (the 3x3
/// convolution's nine; one for the Winograd kernel's products) for the `ROWS` rows and
/// `width` columns (a multiple of `COLUMNS`), summed in that order, on `isa`. Panics where
/// this CPU lacks `isa`, or if a slice is too short for the elements it names.
#[allow(clippy::too_many_arguments)]
pub(crate) fn block(
    isa: Isa,
    (acc, acc_stride): (&mut [f32], usize),
    width: usize,
    (weight, weight_stride): (&[f32], usize),
    input: &[f32],
    channel: usize,
    offsets: &[usize],
    c_in: usize,
) {
    assert!(isa.on_this_cpu(), "the direct 3x3 kernel on {isa:?}, which this CPU lacks");
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
        // SAFETY: the CPU has `isa` (asserted); the accesses lie within the slices (asserted
        // above: columns first..first + COLUMNS <= width of rows < ROWS, channels < c_in, taps
        // < offsets.len()); acc is a &mut not aliased by the & inputs.
        #[allow(unsafe_code)]
        unsafe {
            let (acc, input) = (acc.as_mut_ptr().add(first), input.as_ptr().add(first));
            match isa {
                Isa::Avx512 => {
                    avx512::block(acc, acc_stride, weight.as_ptr(), weight_stride, input, channel, offsets, c_in)
                }
                Isa::Avx2 => {
                    // The block's six parts: rows 0..4 and 4..8, columns 0..16, 16..32, 32..48.
                    for (r, j) in (0..ROWS)
                        .step_by(avx2::ROWS)
                        .flat_map(|r| (0..COLUMNS).step_by(avx2::COLUMNS).map(move |j| (r, j)))
                    {
                        avx2::part(
                            acc.add(r * acc_stride + j),
                            acc_stride,
                            weight.as_ptr().add(r * weight_stride),
                            weight_stride,
                            input.add(j),
                            channel,
                            offsets,
                            c_in,
                        )
                    }
                }
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("no CPU off x86-64 has {isa:?}");
}

/// Defines `$name`, a register tile of `$rows` output channels x `$vectors` vectors of
/// `$lanes` columns on one instruction set (its intrinsics named): each element's sum is one
/// chain of fused multiply-adds in the order tap, then input channel, so every instruction
/// set gives the same bits.
///
/// The function's safety contract: the instruction set must be present; `acc` must be writable
/// at `r * acc_stride + j`, `weight` readable at `r * weight_stride + tap * c_in + ci`, and
/// `input` readable at `ci * channel + offsets[tap] + j`, for r < `$rows`, j < `$vectors` x
/// `$lanes`, tap < offsets.len(), ci < c_in.
#[cfg(target_arch = "x86_64")]
macro_rules! register_tile {
    (
        $(#[$doc:meta])*
        fn $name:ident on $feature:literal: $rows:expr, $vectors:expr, $lanes:literal,
        $zero:ident, $load:ident, $splat:ident, $fma:ident, $store:ident
    ) => {
        $(#[$doc])*
        ///
        /// # Safety
        /// See `register_tile!`'s contract.
        #[target_feature(enable = $feature)]
        #[allow(clippy::too_many_arguments)]
        pub(super) unsafe fn $name(
            acc: *mut f32,
            acc_stride: usize,
            weight: *const f32,
            weight_stride: usize,
            input: *const f32,
            channel: usize,
            offsets: &[usize],
            c_in: usize,
        ) {
            let mut sums = [[$zero(); $vectors]; $rows];
            for (tap, &offset) in offsets.iter().enumerate() {
                let (input, weight) = (input.add(offset), weight.add(tap * c_in));
                for ci in 0..c_in {
                    let x = input.add(ci * channel);
                    let mut xs = [$zero(); $vectors];
                    for (v, xs) in xs.iter_mut().enumerate() {
                        *xs = $load(x.add($lanes * v));
                    }
                    for (r, sums) in sums.iter_mut().enumerate() {
                        let w = $splat(*weight.add(r * weight_stride + ci));
                        for v in 0..$vectors {
                            sums[v] = $fma(w, xs[v], sums[v]);
                        }
                    }
                }
            }
            for (r, sums) in sums.iter().enumerate() {
                for (v, &sum) in sums.iter().enumerate() {
                    $store(acc.add(r * acc_stride + $lanes * v), sum);
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx512 {
    use super::{COLUMNS, ROWS};
    use std::arch::x86_64::*;

    register_tile! {
        /// One whole ROWS x COLUMNS block (see [`super::block`]): 24 accumulators in the 32
        /// registers.
        fn block on "avx512f": ROWS, COLUMNS / 16, 16,
        _mm512_setzero_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_storeu_ps
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use std::arch::x86_64::*;

    /// Output channels per part of a block.
    pub(super) const ROWS: usize = super::ROWS / 2;
    /// Output columns per part of a block: two vectors of 8. (Three, with 12 accumulators,
    /// left the compiler one register short: it spilled an accumulator and shuffled registers
    /// every step, and ran at about 60% of this one's speed.)
    pub(super) const COLUMNS: usize = super::COLUMNS / 3;

    register_tile! {
        /// A ROWS x COLUMNS part of [`super::block`]'s block: 8 accumulators in registers (as
        /// many as 2 FMA units x 4 cycles of latency keep busy) of AVX2's 16.
        fn part on "avx2,fma": ROWS, COLUMNS / 8, 8,
        _mm256_setzero_ps, _mm256_loadu_ps, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_storeu_ps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's definition, one `mul_add` chain per element in its order (tap, then input
    /// channel): a fused multiply-add rounds once, as the vector instructions do.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        width: usize,
        (weight, weight_stride): (&[f32], usize),
        input: &[f32],
        channel: usize,
        offsets: &[usize],
        c_in: usize,
    ) -> Vec<f32> {
        let mut acc = vec![0f32; ROWS * width];
        for r in 0..ROWS {
            for j in 0..width {
                let mut sum = 0f32;
                for (tap, offset) in offsets.iter().enumerate() {
                    for ci in 0..c_in {
                        let w = weight[r * weight_stride + tap * c_in + ci];
                        sum = w.mul_add(input[ci * channel + offset + j], sum);
                    }
                }
                acc[r * width + j] = sum;
            }
        }
        acc
    }

    /// Each instruction set this CPU has gives the definition's bits exactly (so AVX-512 and
    /// AVX2 machines agree), with one tap or nine, strided accumulators and weights, and
    /// several column groups. Off x86-64, or on a CPU with neither, there is nothing to run.
    #[test]
    fn every_instruction_set_gives_the_same_bits_as_the_definition() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut random = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let isas = isas_here();
        let nine: Vec<usize> = (0..9).map(|tap| (tap / 3) * 100 + tap % 3).collect();
        for (offsets, c_in, width) in [(vec![0], 37, 48), (nine.clone(), 5, 96), (nine, 20, 144), (vec![3], 1, 48)] {
            let (weight_stride, acc_stride, channel) = (offsets.len() * c_in + 3, width + 5, width + 300);
            let weight: Vec<f32> = (0..ROWS * weight_stride).map(|_| random()).collect();
            let input: Vec<f32> = (0..c_in * channel).map(|_| random()).collect();
            let expected = reference(width, (&weight, weight_stride), &input, channel, &offsets, c_in);
            for &isa in &isas {
                let mut acc = vec![f32::NAN; ROWS * acc_stride];
                block(isa, (&mut acc, acc_stride), width, (&weight, weight_stride), &input, channel, &offsets, c_in);
                for r in 0..ROWS {
                    let (got, want) = (&acc[r * acc_stride..][..width], &expected[r * width..][..width]);
                    let same = got.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{isa:?}, {} taps, {c_in} channels, row {r}", offsets.len());
                }
            }
        }
    }
}
