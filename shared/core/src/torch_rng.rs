//! PyTorch's CPU random generator, bit for bit: what `torch.Generator("cpu").manual_seed(seed)`
//! and `torch.randn(shape, generator=g)` (float32, contiguous) produce, so that a seed here gives
//! the same noise as the same seed in diffusers.
//!
//! What torch does (aten/src/ATen/core/{MT19937RNGEngine.h, DistributionsHelper.h},
//! CPUGeneratorImpl.cpp, native/cpu/DistributionTemplates.h, native/cpu/avx_mathfun.h), each
//! point checked against torch 2.15 on x86-64 (tests/fixtures/reference-seeds):
//!
//! * `manual_seed(seed)` keeps the 64-bit seed (`initial_seed()` returns it) but seeds the
//!   32-bit Mersenne Twister (mt19937, the standard `init_genrand`) with its low 32 bits only:
//!   2**40+5 draws the same numbers as 5, 2**63 the same as 0. It also clears the cached
//!   normal sample below.
//! * `random()` is one mt19937 output; `random64()` is two, the first in the high half.
//! * float uniform in [0, 1): `(random() & (2**24 - 1)) * 2**-24`; double: the low 53 bits of
//!   `random64()` times 2**-53.
//! * randn with **fewer than 16 elements** (or not contiguous, or not float32): one
//!   `at::normal_distribution<double>` sample per element, cast to float. Box-Muller in double:
//!   u1, u2 = two double uniforms, r = sqrt(-2 log1p(-u2)), theta = 2 pi u1; returns r cos(theta)
//!   and keeps r sin(theta) in the generator, which the next such sample returns instead of
//!   drawing. That cache lives in the generator, so it carries over between randn calls (and the
//!   >= 16 path below neither uses nor clears it).
//! * randn with **16 or more** float32 elements: first all n float uniforms in order, then
//!   Box-Muller over blocks of 16 (u1 = 1 - d[j], u2 = d[j + 8], j < 8; d[j] = r cos, d[j + 8] =
//!   r sin). If n % 16 != 0, 16 *fresh* uniforms are drawn afterwards and the last 16 outputs
//!   are recomputed from them (so n = 17 draws 33 uniforms and the first 16 outputs overlap).
//! * On x86-64 builds with AVX2 or AVX-512 (torch picks its kernel at run time; both give the
//!   same numbers) the 16-block math is the AVX2 kernel `normal_fill_16_AVX2`, whose log and
//!   sincos are avx_mathfun's Cephes-style polynomials in float32, not libm. The wheel is
//!   built by GCC, which fuses many of those separate `_mm256_mul_ps` / `_mm256_add_ps` into
//!   FMAs; which ones is visible only in the numbers, so [`log256`] and [`sincos256`] below use
//!   `mul_add` exactly where that reproduces torch bit for bit (96,000 values checked, 0
//!   differences; the unfused formulas differ in ~1% of values by 1 ulp). With
//!   `ATEN_CPU_CAPABILITY=default` (no SIMD) torch uses libm `logf`/`cosf`/`sinf` instead and
//!   its numbers differ in the last bit for some values; that path is not reproduced here.

/// mt19937 as torch's `at::mt19937` (standard 32-bit Mersenne Twister).
#[derive(Clone)]
struct Mt19937 {
    state: Box<[u32; 624]>,
    index: usize,
}

impl Mt19937 {
    fn new(seed: u32) -> Self {
        let mut state = Box::new([0u32; 624]);
        state[0] = seed;
        for i in 1..624 {
            state[i] = 1_812_433_253u32.wrapping_mul(state[i - 1] ^ (state[i - 1] >> 30)).wrapping_add(i as u32);
        }
        Self { state, index: 624 }
    }

    fn twist(&mut self) {
        let s = &mut self.state;
        for k in 0..624 {
            let y = (s[k] & 0x8000_0000) | (s[(k + 1) % 624] & 0x7fff_ffff);
            let mag = if y & 1 != 0 { 0x9908_b0df } else { 0 };
            s[k] = s[(k + 397) % 624] ^ (y >> 1) ^ mag;
        }
        self.index = 0;
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }
}

/// `torch.Generator("cpu")` after `manual_seed(seed)`.
#[derive(Clone)]
pub struct TorchGenerator {
    engine: Mt19937,
    seed: u64,
    /// The second Box-Muller sample of the double normal distribution, waiting to be returned.
    next_double_normal: Option<f64>,
}

impl TorchGenerator {
    /// `torch.Generator("cpu").manual_seed(seed)` (a negative Python seed is its two's complement).
    pub fn new(seed: u64) -> Self {
        Self { engine: Mt19937::new(seed as u32), seed, next_double_normal: None }
    }

    /// The seed as given (`initial_seed()`); only its low 32 bits seed the engine.
    pub fn initial_seed(&self) -> u64 {
        self.seed
    }

    /// `CPUGeneratorImpl::random()`.
    pub fn random(&mut self) -> u32 {
        self.engine.next_u32()
    }

    /// `CPUGeneratorImpl::random64()`: two draws, the first one the high half.
    pub fn random64(&mut self) -> u64 {
        let hi = self.random() as u64;
        let lo = self.random() as u64;
        (hi << 32) | lo
    }

    /// `at::uniform_real_distribution<float>(0, 1)`.
    fn uniform_f32(&mut self) -> f32 {
        ((self.random() & ((1 << 24) - 1)) as f64 * (1.0 / (1u64 << 24) as f64)) as f32
    }

    /// `at::uniform_real_distribution<double>(0, 1)`.
    fn uniform_f64(&mut self) -> f64 {
        (self.random64() & ((1u64 << 53) - 1)) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// `at::normal_distribution<double>(0, 1)`, with the generator's cached second sample.
    pub fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.next_double_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `torch.randn(n, generator=self)` in float32, flattened (row-major for any shape).
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        for block in data.chunks_exact_mut(16) {
            normal_fill_16(block.try_into().unwrap());
        }
        if !n.is_multiple_of(16) {
            let tail: &mut [f32; 16] = (&mut data[n - 16..]).try_into().unwrap();
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            normal_fill_16(tail);
        }
        data
    }
}

/// `torch.randn(shape, generator=torch.Generator().manual_seed(seed))` as a float32 tensor.
pub fn randn_tensor(
    seed: u64,
    shape: &[usize],
    device: &candle_core::Device,
) -> candle_core::Result<candle_core::Tensor> {
    let draws = TorchGenerator::new(seed).randn(shape.iter().product());
    candle_core::Tensor::from_vec(draws, shape, device)
}

/// `normal_fill_16_AVX2` with mean 0, std 1: 16 uniforms in, 16 normals out.
fn normal_fill_16(d: &mut [f32; 16]) {
    let two_pi = (2.0f32 as f64 * std::f64::consts::PI) as f32;
    for j in 0..8 {
        let u1 = 1.0f32 - d[j];
        let u2 = d[j + 8];
        let radius = (-2.0f32 * log256(u1)).sqrt();
        let theta = two_pi * u2;
        let (sin, cos) = sincos256(theta);
        // _mm256_fmadd_ps(n, std = 1, mean = 0): n * 1 + 0 (turns -0 into +0).
        d[j] = radius * cos + 0.0;
        d[j + 8] = radius * sin + 0.0;
    }
}

/// A float constant as C writes it: the double literal rounded to float.
const fn c(v: f64) -> f32 {
    v as f32
}

/// avx_mathfun's `log256_ps` for one lane, for x in (0, 1] (all normal_fill_16 passes it), with
/// GCC's FMA contractions. The constants are avx_mathfun's literals as written.
#[allow(clippy::excessive_precision, clippy::approx_constant)]
fn log256(x: f32) -> f32 {
    const SQRTHF: f32 = c(0.707106781186547524);
    const P: [f32; 9] = [
        c(7.0376836292E-2),
        c(-1.1514610310E-1),
        c(1.1676998740E-1),
        c(-1.2420140846E-1),
        c(1.4249322787E-1),
        c(-1.6668057665E-1),
        c(2.0000714765E-1),
        c(-2.4999993993E-1),
        c(3.3333331174E-1),
    ];
    const Q1: f32 = c(-2.12194440e-4);
    const Q2: f32 = c(0.693359375);
    let x = x.max(f32::from_bits(0x0080_0000));
    let bits = x.to_bits();
    let imm0 = (bits >> 23) as i32 - 0x7f;
    let mut x = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    let mut e = imm0 as f32 + 1.0;
    let below = x < SQRTHF;
    let tmp = if below { x } else { 0.0 };
    x -= 1.0;
    e -= if below { 1.0 } else { 0.0 };
    x += tmp;
    let z = x * x;
    let mut y = P[0];
    for &p in &P[1..] {
        y = y.mul_add(x, p);
    }
    y *= x;
    y = y.mul_add(z, e * Q1);
    y -= z * 0.5; // z * 0.5 is exact, fused or not
    x += y;
    e.mul_add(Q2, x)
}

/// avx_mathfun's `sincos256_ps` for one lane (x >= 0 here), with GCC's FMA contractions:
/// (sin, cos).
#[allow(clippy::excessive_precision)]
fn sincos256(x: f32) -> (f32, f32) {
    const FOPI: f32 = c(1.27323954473516);
    const DP1: f32 = c(-0.78515625);
    const DP2: f32 = c(-2.4187564849853515625e-4);
    const DP3: f32 = c(-3.77489497744594108e-8);
    const COS: [f32; 3] = [c(2.443315711809948E-005), c(-1.388731625493765E-003), c(4.166664568298827E-002)];
    const SIN: [f32; 3] = [c(-1.9515295891E-4), c(8.3321608736E-3), c(-1.6666654611E-1)];
    let sign_bit_sin = x.to_bits() & 0x8000_0000;
    let mut x = x.abs();
    let y = x * FOPI;
    let mut j = y as i32; // cvttps: truncation (y is small and finite)
    j = j.wrapping_add(1) & !1;
    let y = j as f32;
    let swap_sign_bit_sin = ((j & 4) as u32) << 29;
    let poly_mask = (j & 2) == 0;
    x = y.mul_add(DP1, x);
    x = y.mul_add(DP2, x);
    x = y.mul_add(DP3, x);
    let sign_bit_cos = ((!(j.wrapping_sub(2)) & 4) as u32) << 29;
    let sign_bit_sin = sign_bit_sin ^ swap_sign_bit_sin;
    let z = x * x;
    let mut yc = COS[0];
    yc = yc.mul_add(z, COS[1]);
    yc = yc.mul_add(z, COS[2]);
    yc *= z;
    yc = yc.mul_add(z, -(z * 0.5));
    yc += 1.0;
    let mut y2 = SIN[0];
    y2 = y2.mul_add(z, SIN[1]);
    y2 = y2.mul_add(z, SIN[2]);
    y2 *= z;
    y2 = y2.mul_add(x, x);
    let ysin2 = if poly_mask { y2 } else { 0.0 };
    let ysin1 = if poly_mask { 0.0 } else { yc };
    let y2 = y2 - ysin2;
    let yc = yc - ysin1;
    let s = ysin1 + ysin2;
    let c = yc + y2;
    (f32::from_bits(s.to_bits() ^ sign_bit_sin), f32::from_bits(c.to_bits() ^ sign_bit_cos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_the_standard() {
        // std::mt19937 with the default seed 5489: the 10000th output is 4123659995 (C++ standard).
        let mut mt = Mt19937::new(5489);
        let v = (0..10000).map(|_| mt.next_u32()).last().unwrap();
        assert_eq!(v, 4_123_659_995);
    }

    #[test]
    fn seed_uses_low_32_bits() {
        let a = TorchGenerator::new(5).randn(40);
        assert_eq!(a, TorchGenerator::new((1 << 40) + 5).randn(40));
        assert_eq!(TorchGenerator::new(0).randn(3), TorchGenerator::new(1 << 63).randn(3));
        assert_eq!(TorchGenerator::new(1 << 40).initial_seed(), 1 << 40);
    }

    #[test]
    fn known_torch_values() {
        // torch.randn(3, generator=torch.Generator().manual_seed(0)) = [1.5410, -0.2934, -2.1788]
        let v = TorchGenerator::new(0).randn(3);
        let want = [1.5410f32, -0.2934, -2.1788];
        for (a, b) in v.iter().zip(want) {
            assert!((a - b).abs() < 1e-4, "{v:?}");
        }
    }

    #[test]
    fn small_draws_share_the_cached_sample() {
        // randn(1) twice uses one Box-Muller pair: the second call returns the cached sine.
        let mut g = TorchGenerator::new(9);
        let a = g.randn(1)[0];
        let b = g.randn(1)[0];
        let mut h = TorchGenerator::new(9);
        assert_eq!(h.randn(2), vec![a, b]);
        // A >= 16 draw in between does not touch the cache.
        let mut g = TorchGenerator::new(9);
        let a = g.randn(1)[0];
        g.randn(16);
        let b = g.randn(1)[0];
        assert_eq!([a, b], [h_pair(9)[0], h_pair(9)[1]]);
    }

    fn h_pair(seed: u64) -> Vec<f32> {
        TorchGenerator::new(seed).randn(2)
    }

    #[test]
    fn math_is_accurate() {
        for i in 1..=4096 {
            let x = i as f32 / 4096.0;
            assert!((log256(x) as f64 - (x as f64).ln()).abs() < 1e-6, "log {x}");
            let t = x * 6.2831855;
            let (s, c) = sincos256(t);
            assert!((s as f64 - (t as f64).sin()).abs() < 1e-6, "sin {t}");
            assert!((c as f64 - (t as f64).cos()).abs() < 1e-6, "cos {t}");
        }
    }
}
