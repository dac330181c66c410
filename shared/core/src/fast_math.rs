//! Elementwise functions the CPU kernels call per element, written as straight-line f32
//! arithmetic the compiler vectorises (libm's `expf` and candle's f64 `erf` are calls per
//! element).
//!
//! A portable build compiles them for SSE2 alone; the loops that call them are declared in
//! [`simd_kernel!`], which compiles them again for AVX-512 and AVX2 + FMA and picks one at run
//! time (the same bits on every target: no reassociation, and FMA is never contracted
//! implicitly in Rust).

/// Declares functions compiled for AVX-512 and for AVX2 + FMA besides the portable build, the
/// best the CPU runs picked at run time (`multiversion`). Its own `"simd"` target list stops at
/// AVX2.
macro_rules! simd_kernel {
    ($($function:item)*) => {$(
        #[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512dq+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
        $function
    )*};
}
pub(crate) use simd_kernel;

/// e^x for x <= 0 within 3 ulp (e^-87.3 and below give ~1e-38, not 0): e^x = 2^i · e^f with
/// i = round(x·log2 e) and f = x - i·ln 2 (ln 2 in two parts, so f is exact; |f| <= ln2 / 2), e^f
/// by its Taylor polynomial to degree 7 (truncation under 6e-9).
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding and subtracting it rounds to an integer
    const LN2_HI: f32 = 0.693_359_4; // 0.693359375, exact in 9 bits
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.max(-87.3);
    let rounded = x * std::f32::consts::LOG2_E + ROUND;
    let i = rounded - ROUND;
    let f = (x - i * LN2_HI) - i * LN2_LO;
    let p = 1.0
        + f * (1.0
            + f * (0.5
                + f * (1.0 / 6.0 + f * (1.0 / 24.0 + f * (1.0 / 120.0 + f * (1.0 / 720.0 + f * (1.0 / 5040.0)))))));
    // 2^i from `rounded`'s bits, which are ROUND's plus i (|i| <= 126): an integer add and a
    // shift, where `i as i32` is a saturating conversion that vectorises poorly (2.4x slower
    // with AVX2).
    p * f32::from_bits(rounded.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23)
}

/// erfc(z) for z >= 0 with a relative error under 1.2e-7 (before f32 rounding): Chebyshev
/// fit t·exp(-z² + P(t)), t = 1 / (1 + z/2) (Press et al., Numerical Recipes, `erfcc`).
#[inline(always)]
#[allow(clippy::excessive_precision)] // the published coefficients, verbatim
fn erfc_nonnegative(z: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.5 * z);
    let p = -1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98 + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    // The exponent is at most ~3e-8 (at z = 0), where the exp is exact enough either way.
    t * exp_nonpositive((-z * z + p).min(0.0))
}

/// The exact (erf) GELU, x · Φ(x), as 0.5·x·erfc(-x/√2): for negative x the tail is computed
/// directly, not as 1 + erf(x/√2) with its cancellation, so it keeps its relative accuracy.
#[inline(always)]
pub(crate) fn gelu_erf(x: f32) -> f32 {
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let tail = erfc_nonnegative(z);
    let phi = if x < 0.0 { 0.5 * tail } else { 1.0 - 0.5 * tail };
    x * phi
}

/// SiLU, y · σ(y), with σ from e^-|y| (so the exp never overflows): within a few ulp down to
/// y = -87, where e^y leaves f32's normals (below, a value under 1e-36 rather than ~0).
#[inline(always)]
pub(crate) fn silu(y: f32) -> f32 {
    let e = exp_nonpositive(-y.abs());
    let sigmoid_abs = 1.0 / (1.0 + e);
    y * if y >= 0.0 { sigmoid_abs } else { e * sigmoid_abs }
}

/// Folds `x` in eight interleaved lanes (element i into lane i mod 8, the last x.len() mod 8
/// into a tail), then merges the tail and the lanes in order: a fixed order the compiler
/// vectorises, where one running accumulator would wait on each step's latency (and a float
/// sum may not be reordered).
#[inline(always)]
pub(crate) fn lane_fold<A: Copy>(x: &[f32], init: A, step: impl Fn(A, f32) -> A, merge: impl Fn(A, A) -> A) -> A {
    let mut lanes = [init; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(init, |a, &v| step(a, v));
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = step(*lane, v);
        }
    }
    lanes.into_iter().fold(tail, merge)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exp against libm's, over the whole range attention's softmax uses.
    #[test]
    fn fast_exp_is_within_three_ulp() {
        let mut x = 0f32;
        while x > -87.0 {
            let (approx, exact) = (exp_nonpositive(x), x.exp());
            assert!((approx - exact).abs() <= 3.0 * exact * f32::EPSILON, "exp({x}) = {approx}, not {exact}");
            x -= 0.0137;
        }
        assert!(exp_nonpositive(-200.0) < 1e-37 && exp_nonpositive(f32::NEG_INFINITY) < 1e-37);
    }

    /// The SiLU against the f64 one, relative to the value.
    #[test]
    fn fast_silu_is_within_a_few_ulp() {
        let mut y = -87.0f32;
        while y < 90.0 {
            let exact = y as f64 / (1.0 + (-(y as f64)).exp());
            let ulps = (silu(y) as f64 - exact).abs() / exact.abs().max(1e-30) / f32::EPSILON as f64;
            assert!(ulps <= 6.0, "silu({y}) = {}, not {exact:e}: {ulps:.1} ulp", silu(y));
            y += 0.00913;
        }
        assert_eq!(silu(0.0), 0.0);
        assert_eq!(silu(f32::INFINITY), f32::INFINITY);
        assert!(silu(-1000.0).abs() < 1e-33);
    }

    /// The GELU against the f64 one (candle's f64 erfc) over the range activations take and
    /// through the negative tail down to where Φ(x) leaves f32's normals. Relative to the value,
    /// within a few ulp plus the rounding of the exponent -z² (z = x/√2) in f32, up to 2·z² ulp: at
    /// x = -13, 1e-5 of a value of 1e-38. (PyTorch's 0.5·x·(1 + erf(x/√2)) is off by ~|x|·3e-8
    /// absolute there: its relative error in the tail is unbounded.)
    #[test]
    fn fast_gelu_is_within_a_few_ulp() {
        let mut worst = 0f64;
        let mut x = -13.0f32;
        while x < 13.0 {
            let exact = 0.5 * x as f64 * candle_core::cpu::erf::erfc_f64(-(x as f64) / std::f64::consts::SQRT_2);
            let approx = gelu_erf(x) as f64;
            let ulps = (approx - exact).abs() / exact.abs().max(1e-30) / f32::EPSILON as f64;
            let allowed = 4.0 + (x as f64).powi(2);
            assert!(ulps <= allowed, "gelu({x}) = {approx:e}, not {exact:e}: {ulps:.1} ulp");
            worst = worst.max(ulps / allowed);
            x += 0.00731;
        }
        println!("worst error: {worst:.2} of the bound");
        assert_eq!(gelu_erf(0.0), 0.0);
        assert_eq!(gelu_erf(f32::INFINITY), f32::INFINITY);
        assert!(gelu_erf(f32::NAN).is_nan());
    }
}
