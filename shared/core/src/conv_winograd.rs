//! The stride-1 3x3 convolution as Winograd's F(2x2, 3x3) on x86-64 CPUs with AVX-512: each
//! 2x2 block of output pixels ("tile") is computed from its 4x4 input patch with 16
//! products per input and output channel instead of 36, 2.25x fewer multiply-adds than the
//! direct kernel (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2015).
//!
//! For a band of tile rows of one image:
//! 1. each input channel's 4x4 patches are transformed (`B^T d B`, additions only) into 16
//!    matrices `V[ξ]` [c_in, tiles];
//! 2. 16 products `M[ξ] = U[ξ] V[ξ]` ([c_out, c_in] x [c_in, tiles]) on a register-tiled
//!    kernel (8 channels x 48 tiles in 24 vector registers), `U` the weights transformed once
//!    (`G g G^T`);
//! 3. each channel's 16 values per tile are transformed back (`A^T M A`, additions only) to
//!    its 2x2 pixels, and the bias and other additions are added on the way to the output.
//!
//! Each output element is a fixed sequence of operations on its own patch (the products sum
//! over the input channels in order), whatever the band, threads or batch: an image's result
//! depends on the weights and its own pixels alone. The transforms' vector and scalar code do
//! the same operations in the same order.
//!
//! Its rounding differs from the direct sum: the transforms add and subtract up to 16 inputs
//! before the products and 9 products after them. On the SD shapes the difference from
//! candle's convolution is of the order of the direct kernel's (module tests).

/// Output channels per block of the weights and of the product kernel.
pub(crate) const ROWS: usize = 8;
/// Tiles per product-kernel call: three vectors of 16.
pub(crate) const GROUP: usize = 48;
/// Output channels whose products are kept at once (the band's `M`).
const CHUNK: usize = 64;
/// The most tiles in a band: its transformed input for 128 channels (3 MB) still streams
/// well from L2/L3 through the 16 products; 2-core EPYC, 128 channels at 256x256, 1 thread:
/// 144 tiles per band 85 ms of products, 384 tiles 78 ms.
const MAX_BAND_TILES: usize = 384;

/// Whether the kernel can run here: an x86-64 CPU with AVX-512F, and SDMESH_CONV_WINOGRAD
/// not set to 0 (for comparing with the direct kernel). Read once.
pub(crate) fn available() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    #[cfg(target_arch = "x86_64")]
    let cpu = std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    let cpu = false;
    cpu && crate::switched_on(&ENABLED, "SDMESH_CONV_WINOGRAD")
}

/// The tile rows per band for a map of `tiles_x` x `tiles_y` tiles: the count that wastes
/// the fewest of the product kernel's 48-tile groups (a band is padded to whole groups),
/// fewer rows on a tie, at most `MAX_BAND_TILES` tiles (or one row). It depends on the map
/// alone.
pub(crate) fn band_rows(tiles_x: usize, tiles_y: usize) -> usize {
    let most = (MAX_BAND_TILES / tiles_x).clamp(1, tiles_y.max(1));
    (1..=most)
        .min_by(|&a, &b| {
            let waste = |r: usize| {
                let tiles = r * tiles_x;
                (tiles.next_multiple_of(GROUP) - tiles) as f64 / tiles as f64
            };
            waste(a).total_cmp(&waste(b))
        })
        .unwrap_or(1)
}

/// The share of the product kernel's work that is useful on a map of `tiles_x` x `tiles_y`
/// tiles in bands of `rows` rows.
pub(crate) fn useful_share(tiles_x: usize, tiles_y: usize, rows: usize) -> f64 {
    let full = tiles_y / rows;
    let last = tiles_y % rows;
    let computed = full * (rows * tiles_x).next_multiple_of(GROUP) + (last * tiles_x).next_multiple_of(GROUP);
    (tiles_x * tiles_y) as f64 / computed as f64
}

/// `U[ξ][block][ci][r] = (G g G^T)[ξ]` for output channel `block * 8 + r` (zero for the rows
/// past `c_out`), from the tap-major weights [c_out, 9 * c_in] (tap = 3 * kh + kw, then the
/// input channel).
pub(crate) fn transform_weights(weight: &[f32], c_in: usize, c_out: usize) -> Vec<f32> {
    let blocks = c_out.div_ceil(ROWS);
    let mut u = vec![0f32; 16 * blocks * ROWS * c_in];
    for o in 0..c_out {
        for ci in 0..c_in {
            let g = |kh: usize, kw: usize| weight[o * 9 * c_in + (3 * kh + kw) * c_in + ci];
            // G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]: rows, then columns.
            let gg: [[f32; 3]; 4] = std::array::from_fn(|i| {
                std::array::from_fn(|kw| {
                    let (a, b, c) = (g(0, kw), g(1, kw), g(2, kw));
                    [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c][i]
                })
            });
            for (i, [a, b, c]) in gg.into_iter().enumerate() {
                for (j, value) in [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c].into_iter().enumerate() {
                    let xi = 4 * i + j;
                    u[((xi * blocks + o / ROWS) * c_in + ci) * ROWS + o % ROWS] = value;
                }
            }
        }
    }
    u
}

/// One channel's additions: the bias, a per-image value, and the residual over the band's
/// output rows (the run's shape), added in that order.
pub(crate) type Additions<'a> = (f32, Option<f32>, Option<&'a [f32]>);

/// The convolution over tile rows `ty0..ty1` of one image.
///
/// `padded`: the image's `c_in` zero-padded planes, `channel` floats apart, each rows of
/// `row = w + 2` floats (w = 2 * tiles_x, the output width) with one zero row and column
/// before the pixels, and at least `2 * ty1 + 2` rows. `u`: [`transform_weights`] for
/// `c_out` channels. `runs[o]`: output channel o's rows `2 * ty0 .. 2 * ty1`, `additions(o)`
/// what to add to them. Panics where [`available`] is false or a slice is too short.
#[allow(clippy::too_many_arguments)]
pub(crate) fn band<'a>(
    (padded, channel, row): (&[f32], usize, usize),
    (ty0, ty1): (usize, usize),
    tiles_x: usize,
    (u, c_in): (&[f32], usize),
    runs: &mut [&mut [f32]],
    additions: impl Fn(usize) -> Additions<'a>,
) {
    assert!(available(), "the Winograd 3x3 kernel needs AVX-512F");
    let (w, c_out) = (2 * tiles_x, runs.len());
    let blocks = c_out.div_ceil(ROWS);
    assert_eq!(row, w + 2, "Winograd 3x3: rows of {row} floats for a {w}-wide map");
    assert!(channel >= (2 * ty1 + 2) * row, "Winograd 3x3: planes too short");
    assert!(c_in == 0 || padded.len() >= (c_in - 1) * channel + (2 * ty1 + 2) * row, "Winograd 3x3: input too short");
    assert!(u.len() >= 16 * blocks * ROWS * c_in, "Winograd 3x3: weights too short");
    let tiles = (ty1 - ty0) * tiles_x;
    let stride = tiles.next_multiple_of(GROUP);
    BUFFERS.with(|buffers| {
        let (mut v, mut m) = buffers.take();
        // V[ξ][ci][tile]; the tiles past the band's stay zero (their products are dropped).
        v.clear();
        v.resize(16 * c_in * stride, 0.0);
        m.resize(16 * CHUNK * stride, 0.0);
        {
            let mut planes = v.chunks_exact_mut((c_in * stride).max(1));
            let mut v: [&mut [f32]; 16] = std::array::from_fn(|_| planes.next().unwrap_or_default());
            for ci in 0..c_in {
                let plane = &padded[ci * channel..];
                for ty in ty0..ty1 {
                    let rows: [&[f32]; 4] = std::array::from_fn(|k| &plane[(2 * ty + k) * row..][..row]);
                    let at = ci * stride + (ty - ty0) * tiles_x;
                    let mut at_row = v.iter_mut();
                    let mut dst: [&mut [f32]; 16] =
                        std::array::from_fn(|_| &mut at_row.next().expect("16 matrices")[at..at + tiles_x]);
                    transform_input(rows, &mut dst);
                }
            }
        }
        for first in (0..c_out).step_by(CHUNK) {
            let count = CHUNK.min(c_out - first);
            for xi in 0..16 {
                for block in 0..count.div_ceil(ROWS) {
                    let weights = &u[((xi * blocks + first / ROWS + block) * c_in) * ROWS..][..c_in * ROWS];
                    let inputs = &v[xi * c_in * stride..][..c_in * stride];
                    let sums = &mut m[(xi * CHUNK + block * ROWS) * stride..][..ROWS * stride];
                    products(sums, weights, inputs, stride, c_in);
                }
            }
            for o in first..first + count {
                let sums: [&[f32]; 16] = std::array::from_fn(|xi| &m[(xi * CHUNK + o - first) * stride..][..stride]);
                let (bias, per_channel, residual) = additions(o);
                for ty in 0..ty1 - ty0 {
                    let q: [&[f32]; 16] = std::array::from_fn(|xi| &sums[xi][ty * tiles_x..][..tiles_x]);
                    let (top, bottom) = runs[o][2 * ty * w..][..2 * w].split_at_mut(w);
                    let residual = residual.map(|r| r[2 * ty * w..][..2 * w].split_at(w));
                    transform_output(&q, [top, bottom], (bias, per_channel, residual));
                }
            }
        }
        buffers.set((v, m));
    });
}

thread_local! {
    /// Each thread's V and M buffers, kept between bands (a few MB).
    static BUFFERS: std::cell::Cell<(Vec<f32>, Vec<f32>)> = const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

/// `sums[r * stride + t] = Σ_ci weights[ci * 8 + r] · inputs[ci * stride + t]` for 8 rows
/// and `stride` (a multiple of 48) tiles, summed in input-channel order.
fn products(sums: &mut [f32], weights: &[f32], inputs: &[f32], stride: usize, c_in: usize) {
    assert!(stride.is_multiple_of(GROUP) && sums.len() >= ROWS * stride, "Winograd products: sums too short");
    assert!(weights.len() >= c_in * ROWS && inputs.len() >= c_in * stride, "Winograd products: inputs too short");
    #[cfg(target_arch = "x86_64")]
    for first in (0..stride).step_by(GROUP) {
        // SAFETY: AVX-512F is present (checked by `band`); rows < 8, tiles first..first + 48
        // <= stride and channels < c_in lie within the slices (asserted above).
        #[allow(unsafe_code)]
        unsafe {
            avx512::products(sums.as_mut_ptr().add(first), stride, weights.as_ptr(), inputs.as_ptr().add(first), c_in)
        }
    }
}

/// `B^T d B` for each tile of one tile row: `rows`, the four padded input rows the row's
/// patches span; `dst[ξ][k]`, element ξ (4 * i + j) of tile k's transform.
fn transform_input(rows: [&[f32]; 4], dst: &mut [&mut [f32]; 16]) {
    let tiles = dst[0].len();
    assert!(dst.iter().all(|d| d.len() == tiles), "Winograd input: rows of tiles of unequal lengths");
    assert!(rows.iter().all(|r| r.len() >= 2 * tiles + 2), "Winograd input: patch rows too short");
    let mut k = 0;
    #[cfg(target_arch = "x86_64")]
    if tiles >= 16 {
        // SAFETY: AVX-512F is present (checked by `band`); tiles k..k + 16 read row elements
        // up to 2 * k + 33 < 2 * tiles + 2 = the rows' length (sliced so by `band`), and
        // write dst[..][k..k + 16].
        #[allow(unsafe_code)]
        unsafe {
            while k + 16 <= tiles {
                avx512::transform_input(rows, dst, k);
                k += 16;
            }
        }
    }
    for k in k..tiles {
        let d = |i: usize, j: usize| rows[i][2 * k + j];
        // B^T on the columns, then on the rows.
        let w: [[f32; 4]; 4] = std::array::from_fn(|j| {
            let (r0, r1, r2, r3) = (d(0, j), d(1, j), d(2, j), d(3, j));
            [r0 - r2, r1 + r2, r2 - r1, r1 - r3]
        });
        for i in 0..4 {
            let (d0, d1, d2, d3) = (w[0][i], w[1][i], w[2][i], w[3][i]);
            for (j, value) in [d0 - d2, d1 + d2, d2 - d1, d1 - d3].into_iter().enumerate() {
                dst[4 * i + j][k] = value;
            }
        }
    }
}

/// `A^T m A` for each tile of one tile row (`q[ξ][k]`, tile k's 16 products) to the two
/// output rows, plus the additions (`residual`: the same two rows).
fn transform_output(q: &[&[f32]; 16], [top, bottom]: [&mut [f32]; 2], additions: Additions2<'_>) {
    let tiles = q[0].len();
    assert!(q.iter().all(|q| q.len() == tiles), "Winograd output: products of unequal lengths");
    let pixels = 2 * tiles;
    assert!(top.len() >= pixels && bottom.len() >= pixels, "Winograd output: rows too short");
    assert!(
        additions.2.is_none_or(|(r0, r1)| r0.len() >= pixels && r1.len() >= pixels),
        "Winograd output: residual too short"
    );
    let mut k = 0;
    #[cfg(target_arch = "x86_64")]
    if tiles >= 16 {
        // SAFETY: AVX-512F is present (checked by `band`); tiles k..k + 16 read q[..][k..k +
        // 16] and write (and read the residual at) pixels 2 * k..2 * k + 32 <= 2 * tiles =
        // the rows' length.
        #[allow(unsafe_code)]
        unsafe {
            while k + 16 <= tiles {
                avx512::transform_output(q, [&mut *top, &mut *bottom], additions, k);
                k += 16;
            }
        }
    }
    let (bias, per_channel, residual) = additions;
    // k indexes the 16 product rows and places the pixels.
    #[allow(clippy::needless_range_loop)]
    for k in k..tiles {
        let [[y00, y01], [y10, y11]] = untransform(std::array::from_fn(|xi| q[xi][k]));
        for (dy, (row, pair)) in [(&mut *top, [y00, y01]), (&mut *bottom, [y10, y11])].into_iter().enumerate() {
            for (dx, y) in pair.into_iter().enumerate() {
                let x = 2 * k + dx;
                let mut value = y + bias;
                if let Some(p) = per_channel {
                    value += p;
                }
                if let Some((r0, r1)) = residual {
                    value += [r0, r1][dy][x];
                }
                row[x] = value;
            }
        }
    }
}

/// The additions with the residual split into the tile row's two output rows.
type Additions2<'a> = (f32, Option<f32>, Option<(&'a [f32], &'a [f32])>);

/// One tile's 2x2 outputs from its 16 products: A^T = [[1, 1, 1, 0], [0, 1, -1, -1]] on the
/// columns, then on the rows.
fn untransform(m: [f32; 16]) -> [[f32; 2]; 2] {
    let s0: [f32; 4] = std::array::from_fn(|j| m[j] + m[4 + j] + m[8 + j]);
    let s1: [f32; 4] = std::array::from_fn(|j| m[4 + j] - m[8 + j] - m[12 + j]);
    [[s0[0] + s0[1] + s0[2], s0[1] - s0[2] - s0[3]], [s1[0] + s1[1] + s1[2], s1[1] - s1[2] - s1[3]]]
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx512 {
    use super::{Additions2, GROUP, ROWS};
    use std::arch::x86_64::*;

    const VECTORS: usize = GROUP / 16;
    const _: () = assert!(VECTORS == 3, "the loads below are written out for three vectors");

    /// 8 rows x 48 tiles of [`super::products`], the sums in registers.
    ///
    /// # Safety
    /// AVX-512F must be present; `sums` writable at `r * stride + t`, `weights` readable at
    /// `ci * 8 + r` and `inputs` at `ci * stride + t`, for r < 8, t < 48, ci < c_in.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn products(sums: *mut f32, stride: usize, weights: *const f32, inputs: *const f32, c_in: usize) {
        let mut acc = [[_mm512_setzero_ps(); VECTORS]; ROWS];
        for ci in 0..c_in {
            let x = inputs.add(ci * stride);
            let xs = [_mm512_loadu_ps(x), _mm512_loadu_ps(x.add(16)), _mm512_loadu_ps(x.add(32))];
            let w = weights.add(ci * ROWS);
            for (r, acc) in acc.iter_mut().enumerate() {
                let w = _mm512_set1_ps(*w.add(r));
                for v in 0..VECTORS {
                    acc[v] = _mm512_fmadd_ps(w, xs[v], acc[v]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (v, &sum) in acc.iter().enumerate() {
                _mm512_storeu_ps(sums.add(r * stride + 16 * v), sum);
            }
        }
    }

    /// Lanes 0..16 of the even (`odd` = 0) or odd elements of `a` then `b` (32 floats).
    #[target_feature(enable = "avx512f")]
    fn deinterleave(a: __m512, b: __m512, odd: i32) -> __m512 {
        let index = _mm512_add_epi32(
            _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30),
            _mm512_set1_epi32(odd),
        );
        _mm512_permutex2var_ps(a, index, b)
    }

    /// Tiles k..k + 16 of [`super::transform_input`], the same operations in the same order.
    ///
    /// # Safety
    /// AVX-512F must be present; each row readable at 2 * k..2 * k + 34, each dst at
    /// k..k + 16.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transform_input(rows: [&[f32]; 4], dst: &mut [&mut [f32]; 16], k: usize) {
        // d[i][j]: element j of each tile's patch in row i.
        let d: [[__m512; 4]; 4] = std::array::from_fn(|i| {
            let p = rows[i].as_ptr().add(2 * k);
            let (a, b) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
            let (a2, b2) = (_mm512_loadu_ps(p.add(2)), _mm512_loadu_ps(p.add(18)));
            [deinterleave(a, b, 0), deinterleave(a, b, 1), deinterleave(a2, b2, 0), deinterleave(a2, b2, 1)]
        });
        let w: [[__m512; 4]; 4] = std::array::from_fn(|j| {
            let (r0, r1, r2, r3) = (d[0][j], d[1][j], d[2][j], d[3][j]);
            [_mm512_sub_ps(r0, r2), _mm512_add_ps(r1, r2), _mm512_sub_ps(r2, r1), _mm512_sub_ps(r1, r3)]
        });
        for i in 0..4 {
            let (d0, d1, d2, d3) = (w[0][i], w[1][i], w[2][i], w[3][i]);
            let values = [_mm512_sub_ps(d0, d2), _mm512_add_ps(d1, d2), _mm512_sub_ps(d2, d1), _mm512_sub_ps(d1, d3)];
            for (j, value) in values.into_iter().enumerate() {
                _mm512_storeu_ps(dst[4 * i + j].as_mut_ptr().add(k), value);
            }
        }
    }

    /// Tiles k..k + 16 of [`super::transform_output`], the same operations in the same order.
    ///
    /// # Safety
    /// AVX-512F must be present; each q readable at k..k + 16; both rows (and the residual's)
    /// at 2 * k..2 * k + 32.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transform_output(
        q: &[&[f32]; 16],
        [top, bottom]: [&mut [f32]; 2],
        (bias, per_channel, residual): Additions2<'_>,
        k: usize,
    ) {
        let m: [__m512; 16] = std::array::from_fn(|xi| _mm512_loadu_ps(q[xi].as_ptr().add(k)));
        let s0: [__m512; 4] = std::array::from_fn(|j| _mm512_add_ps(_mm512_add_ps(m[j], m[4 + j]), m[8 + j]));
        let s1: [__m512; 4] = std::array::from_fn(|j| _mm512_sub_ps(_mm512_sub_ps(m[4 + j], m[8 + j]), m[12 + j]));
        let y = [
            [_mm512_add_ps(_mm512_add_ps(s0[0], s0[1]), s0[2]), _mm512_sub_ps(_mm512_sub_ps(s0[1], s0[2]), s0[3])],
            [_mm512_add_ps(_mm512_add_ps(s1[0], s1[1]), s1[2]), _mm512_sub_ps(_mm512_sub_ps(s1[1], s1[2]), s1[3])],
        ];
        let low = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let high = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        for (dy, row) in [top, bottom].into_iter().enumerate() {
            let [even, odd] = y[dy];
            for (half, index) in [low, high].into_iter().enumerate() {
                let x = 2 * k + 16 * half;
                let mut value = _mm512_add_ps(_mm512_permutex2var_ps(even, index, odd), _mm512_set1_ps(bias));
                if let Some(p) = per_channel {
                    value = _mm512_add_ps(value, _mm512_set1_ps(p));
                }
                if let Some((r0, r1)) = residual {
                    value = _mm512_add_ps(value, _mm512_loadu_ps([r0, r1][dy].as_ptr().add(x)));
                }
                _mm512_storeu_ps(row.as_mut_ptr().add(x), value);
            }
        }
    }
}
