//! The stride-1 3x3 convolution as Winograd's F(2x2, 3x3) on x86-64 CPUs with AVX-512 or
//! AVX2 and FMA (the direct kernel's instruction sets, `conv_direct::Isa`): each
//! 2x2 block of output pixels ("tile") is computed from its 4x4 input patch with 16
//! products per input and output channel instead of 36, 2.25x fewer multiply-adds than the
//! direct kernel (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2015).
//!
//! For a band of tile rows (of one image, or of several one after another):
//! 1. each input channel's 4x4 patches are transformed (`B^T d B`, additions only; B^T =
//!    [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]) into 16 matrices `V[ξ]`
//!    [c_in, tiles];
//! 2. 16 products `M[ξ] = U[ξ] V[ξ]` ([c_out, c_in] x [c_in, tiles]) on the direct kernel's
//!    register tile (`conv_direct::block` with one tap: 8 channels x 48 tiles), `U` the
//!    weights transformed once (`G g G^T`);
//! 3. each channel's 16 values per tile are transformed back (`A^T M A`, additions only; A^T =
//!    [[1, 1, 1, 0], [0, 1, -1, -1]]) to its 2x2 pixels, and the bias and other additions
//!    are added on the way to the output.
//!
//! Each output element is a fixed sequence of operations on its own patch (the products sum
//! over the input channels in order), whatever the band, threads or batch: an image's result
//! depends on the weights and its own pixels alone. The transforms have AVX-512 and AVX2
//! versions with the same additions in the same order, so both give the same bits.
//!
//! Its rounding differs from the direct sum: the transforms add and subtract up to 16 inputs
//! before the products and 9 products after them, but each product sums c_in terms where the
//! direct kernel chains 9 x c_in. On the SD shapes its largest difference from candle's
//! convolution is about half the direct kernel's (`conv_shift`: 1.6e-5 against 4.4e-5 at 512
//! channels). F(4x4, 3x3), with 1.78x fewer products again, was 25-40x the direct kernel's
//! error in an f32 check against f64 (1.2e-5 of the output's scale at 512 channels): not used.

use crate::conv_direct::Isa;

/// Output channels per block of the weights and of the product kernel (the direct kernel's
/// rows).
pub(crate) const ROWS: usize = crate::conv_direct::ROWS;
/// Tiles per product-kernel call (the direct kernel's columns): three vectors of 16.
pub(crate) const GROUP: usize = crate::conv_direct::COLUMNS;
/// Output channels whose products are kept at once (the band's `M`).
const CHUNK: usize = 64;
/// The most tiles in a band: its transformed input for 128 channels (3 MB) still streams
/// well from L2/L3 through the 16 products; 2-core EPYC, 128 channels at 256x256, 1 thread:
/// 144 tiles per band 85 ms of products, 384 tiles 78 ms.
pub(crate) const MAX_BAND_TILES: usize = 384;
/// The most floats of transformed input a band holds (4 MB): fewer tiles per band at more
/// input channels, so that a thread's buffers stay a few MB (1280 channels at 384 tiles
/// would be 31 MB, kept by every thread).
const BAND_INPUT_FLOATS: usize = 1 << 20;

/// The most tiles in a band for `c_in` input channels: `MAX_BAND_TILES`, fewer where the
/// transformed input would pass `BAND_INPUT_FLOATS`, but at least one 48-tile group.
pub(crate) fn max_band_tiles(c_in: usize) -> usize {
    (BAND_INPUT_FLOATS / (16 * c_in.max(1))).clamp(GROUP, MAX_BAND_TILES)
}

/// The instruction set the layers run the kernel on: `conv_direct::cpu_isa` (AVX-512 or
/// AVX2 + FMA), unless SDMESH_CONV_WINOGRAD is 0 (for comparing with the direct kernel). Read
/// once.
pub(crate) fn available() -> Option<Isa> {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    crate::conv_direct::cpu_isa().filter(|_| crate::switched_on(&ENABLED, "SDMESH_CONV_WINOGRAD"))
}

/// The tile rows per band for `tiles_y` rows of `tiles_x` tiles (a batch's, one image after
/// another): the count that wastes the fewest of the product kernel's 48-tile groups (a band
/// is padded to whole groups), fewer rows on a tie, at most `most_tiles` tiles (or one row).
/// Each tile's result is the same in any band.
pub(crate) fn band_rows(tiles_x: usize, tiles_y: usize, most_tiles: usize) -> usize {
    let most = (most_tiles / tiles_x).clamp(1, tiles_y.max(1));
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

/// The share of the product kernel's work that is useful on `tiles_y` rows of `tiles_x`
/// tiles in bands of `rows` rows.
pub(crate) fn useful_share(tiles_x: usize, tiles_y: usize, rows: usize) -> f64 {
    let full = tiles_y / rows;
    let last = tiles_y % rows;
    let computed = full * (rows * tiles_x).next_multiple_of(GROUP) + (last * tiles_x).next_multiple_of(GROUP);
    (tiles_x * tiles_y) as f64 / computed as f64
}

/// `U[block][ξ][r][ci] = (G g G^T)[ξ]` for output channel `block * 8 + r` (zero for the rows
/// past `c_out`), from the tap-major weights [c_out, 9 * c_in] (tap = 3 * kh + kw, then the
/// input channel). Blocks in parallel: a layer's first call makes these, and the full SD 2.1
/// UNet has 58M (output, input) channel pairs to transform.
pub(crate) fn transform_weights(weight: &[f32], c_in: usize, c_out: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let blocks = c_out.div_ceil(ROWS);
    let mut u = vec![0f32; blocks * 16 * c_in * ROWS];
    u.par_chunks_mut((16 * c_in * ROWS).max(1)).enumerate().for_each(|(block, u)| {
        // One output channel at a time, each step over all input channels at once (vectorised
        // loops over contiguous slices), then copied to its row r of each ξ's 8 rows.
        let mut gg = vec![0f32; 12 * c_in];
        let mut values = vec![0f32; 16 * c_in];
        for o in block * ROWS..((block + 1) * ROWS).min(c_out) {
            let taps: [&[f32]; 9] = std::array::from_fn(|tap| &weight[o * 9 * c_in + tap * c_in..][..c_in]);
            // G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]: on the rows (kh),
            // gg[i][kw], then on the columns (kw), values[4 * i + j].
            for kw in 0..3 {
                let (a, b, c) = (taps[kw], taps[3 + kw], taps[6 + kw]);
                let mut rows = gg.chunks_exact_mut(c_in).skip(kw).step_by(3);
                let mut next = || rows.next().expect("4 rows of G g");
                let (g0, g1, g2, g3) = (next(), next(), next(), next());
                for ci in 0..c_in {
                    let (a, b, c) = (a[ci], b[ci], c[ci]);
                    (g0[ci], g1[ci], g2[ci], g3[ci]) = (a, 0.5 * (a + b + c), 0.5 * (a - b + c), c);
                }
            }
            for (gg, values) in gg.chunks_exact(3 * c_in).zip(values.chunks_exact_mut(4 * c_in)) {
                let (a, rest) = gg.split_at(c_in);
                let (b, c) = rest.split_at(c_in);
                let mut rows = values.chunks_exact_mut(c_in);
                let mut next = || rows.next().expect("4 rows of G g G^T");
                let (v0, v1, v2, v3) = (next(), next(), next(), next());
                for ci in 0..c_in {
                    let (a, b, c) = (a[ci], b[ci], c[ci]);
                    (v0[ci], v1[ci], v2[ci], v3[ci]) = (a, 0.5 * (a + b + c), 0.5 * (a - b + c), c);
                }
            }
            for (values, u) in values.chunks_exact(c_in).zip(u.chunks_exact_mut(c_in * ROWS)) {
                u[o % ROWS * c_in..][..c_in].copy_from_slice(values);
            }
        }
    });
    u
}

/// One channel's additions: the bias, a per-image value, and the residual (the channel's
/// whole output plane), added in that order.
pub(crate) type Additions<'a> = (f32, Option<f32>, Option<&'a [f32]>);

/// A band's tile rows in one image: bands run over the batch's tile rows one image after
/// another, so on small maps one band holds several images' tiles (the product kernel's
/// 48-tile groups stay full) while each tile's result stays its own.
pub(crate) struct Segment<'s> {
    pub image: usize,
    /// The image's `c_in` zero-padded planes (see [`band`]).
    pub padded: &'s [f32],
    /// Its tile rows `ty0..ty1`.
    pub tile_rows: (usize, usize),
    /// Rows `2 * ty0 .. 2 * ty1` of this image's output channels `first..`, the band's
    /// channels (see [`band`]).
    pub runs: Vec<&'s mut [f32]>,
}

/// The convolution over one band (its `segments`, one after another) for the output
/// channels `first..first + runs` (`first` a multiple of 8): bands with few tiles are split by
/// channels too, so that every thread has work.
///
/// Each segment's `padded`: its image's `c_in` zero-padded planes, `channel` floats apart,
/// each rows of `row = w + 2` floats (w = 2 * tiles_x, the output width) with one zero row and
/// column before the pixels, and at least `2 * ty1 + 2` rows. `u`: [`transform_weights`] for
/// `c_out` channels. `additions(image, o)`: what to add to output channel o of the image.
/// Runs on `isa`; panics where this CPU lacks it or a slice is too short.
#[allow(clippy::too_many_arguments)]
pub(crate) fn band<'a>(
    isa: Isa,
    segments: &mut [Segment<'_>],
    first: usize,
    (channel, row): (usize, usize),
    tiles_x: usize,
    (u, c_in, c_out): (&[f32], usize, usize),
    additions: impl Fn(usize, usize) -> Additions<'a>,
) {
    assert!(isa.on_this_cpu(), "the Winograd 3x3 kernel on {isa:?}, which this CPU lacks");
    let w = 2 * tiles_x;
    let count = segments.first().map_or(0, |s| s.runs.len());
    let blocks = c_out.div_ceil(ROWS);
    assert_eq!(row, w + 2, "Winograd 3x3: rows of {row} floats for a {w}-wide map");
    assert!(first.is_multiple_of(ROWS) && first + count <= c_out, "Winograd 3x3: channels {first}.. of {c_out}");
    assert!(u.len() >= 16 * blocks * ROWS * c_in, "Winograd 3x3: weights too short");
    for segment in segments.iter() {
        let (ty0, ty1) = segment.tile_rows;
        assert!(ty0 <= ty1 && channel >= (2 * ty1 + 2) * row, "Winograd 3x3: planes too short");
        assert!(
            c_in == 0 || segment.padded.len() >= (c_in - 1) * channel + (2 * ty1 + 2) * row,
            "Winograd 3x3: input too short"
        );
        assert_eq!(segment.runs.len(), count, "Winograd 3x3: segments with different channels");
    }
    // Where each segment's tiles start in the band.
    let starts: Vec<usize> = segments
        .iter()
        .scan(0, |at, s| {
            let start = *at;
            *at += (s.tile_rows.1 - s.tile_rows.0) * tiles_x;
            Some(start)
        })
        .collect();
    let tiles: usize = segments.iter().map(|s| (s.tile_rows.1 - s.tile_rows.0) * tiles_x).sum();
    let stride = tiles.next_multiple_of(GROUP);
    BUFFERS.with(|buffers| {
        let (mut v, mut m) = buffers.take();
        // V[ξ][ci][tile]; the tiles past the band's are zeroed (their products are dropped).
        v.resize(16 * c_in * stride, 0.0);
        m.resize(16 * CHUNK * stride, 0.0);
        for row in v[..16 * c_in * stride].chunks_exact_mut(stride) {
            row[tiles..].fill(0.0);
        }
        {
            let mut planes = v.chunks_exact_mut((c_in * stride).max(1));
            let mut v: [&mut [f32]; 16] = std::array::from_fn(|_| planes.next().unwrap_or_default());
            for (segment, &start) in segments.iter().zip(&starts) {
                let (ty0, ty1) = segment.tile_rows;
                let tiles = (ty1 - ty0) * tiles_x;
                for ci in 0..c_in {
                    let at = ci * stride + start;
                    let mut rows = v.iter_mut();
                    let mut dst: [&mut [f32]; 16] =
                        std::array::from_fn(|_| &mut rows.next().expect("16 matrices")[at..at + tiles]);
                    transform_input(isa, &segment.padded[ci * channel..][..channel], row, (ty0, ty1), &mut dst);
                }
            }
        }
        for chunk in (first..first + count).step_by(CHUNK) {
            let chunk_count = CHUNK.min(first + count - chunk);
            for xi in 0..16 {
                for block in 0..chunk_count.div_ceil(ROWS) {
                    // M[ξ] rows = U[ξ] rows (c_in apart) x V[ξ]: one tap of the direct kernel.
                    let weights = &u[(((chunk / ROWS + block) * 16 + xi) * ROWS) * c_in..][..ROWS * c_in];
                    let inputs = &v[xi * c_in * stride..][..c_in * stride];
                    let sums = &mut m[(xi * CHUNK + block * ROWS) * stride..][..ROWS * stride];
                    let (acc, weights) = ((sums, stride), (weights, c_in));
                    crate::conv_direct::block(isa, acc, stride, weights, inputs, stride, &[0], c_in);
                }
            }
            for (segment, &start) in segments.iter_mut().zip(&starts) {
                let (ty0, ty1) = segment.tile_rows;
                for o in chunk..chunk + chunk_count {
                    let sums: [&[f32]; 16] =
                        std::array::from_fn(|xi| &m[(xi * CHUNK + o - chunk) * stride + start..][..stride - start]);
                    let (bias, per_channel, residual) = additions(segment.image, o);
                    let residual = residual.map(|r| &r[2 * ty0 * w..2 * ty1 * w]);
                    let run = &mut segment.runs[o - first];
                    transform_output(isa, &sums, (ty1 - ty0, tiles_x), run, (bias, per_channel, residual));
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

/// `B^T d B` for each tile of tile rows `ty0..ty1` of one input channel: `plane`, its padded
/// plane (rows of `row` = 2 * tiles_x + 2 floats); `dst[ξ][t]`, element ξ (4 * i + j) of tile
/// t's transform, t counted from the first tile of row ty0. On `isa`, which the CPU has
/// (checked by `band`).
fn transform_input(isa: Isa, plane: &[f32], row: usize, (ty0, ty1): (usize, usize), dst: &mut [&mut [f32]; 16]) {
    let tiles_x = (row - 2) / 2;
    let tiles = (ty1 - ty0) * tiles_x;
    assert!(row >= 2 && row.is_multiple_of(2), "Winograd input: rows of {row} floats");
    assert!(dst.iter().all(|d| d.len() == tiles), "Winograd input: {tiles} tiles to write");
    assert!(plane.len() >= (2 * ty1 + 2) * row, "Winograd input: plane too short");
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: AVX-512F is present (checked by `band`); tile row ty reads plane rows 2 * ty
        // ..= 2 * ty + 3 (< 2 * ty1 + 2, asserted) at columns < row, and writes dst[..][(ty -
        // ty0) * tiles_x..][..tiles_x] (asserted lengths); masked lanes are not touched.
        #[allow(unsafe_code)]
        Isa::Avx512 => unsafe {
            let dst = std::array::from_fn(|xi| dst[xi].as_mut_ptr());
            avx512::transform_input(plane.as_ptr(), row, (ty0, ty1), dst)
        },
        // SAFETY: AVX2 and FMA are present (checked by `band`); its accesses are bounds-checked.
        #[allow(unsafe_code)]
        Isa::Avx2 => unsafe { avx2::transform_input(plane, row, (ty0, ty1), dst) },
    }
    // Off x86-64 no CPU has an `Isa` and no layer gets here.
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("the Winograd kernel on {isa:?} off x86-64");
}

/// `A^T m A` for each of `rows` rows of `tiles_x` tiles (`q[ξ][t]`, tile t's 16 products) to
/// the output rows `run` (2 * rows rows of 2 * tiles_x pixels), plus the additions (the
/// residual over the same rows). On `isa`, which the CPU has (checked by `band`).
fn transform_output(
    isa: Isa,
    q: &[&[f32]; 16],
    (rows, tiles_x): (usize, usize),
    run: &mut [f32],
    additions: Additions<'_>,
) {
    let pixels = 4 * rows * tiles_x;
    assert!(q.iter().all(|q| q.len() >= rows * tiles_x), "Winograd output: products too short");
    assert!(run.len() >= pixels, "Winograd output: rows too short");
    assert!(additions.2.is_none_or(|r| r.len() >= pixels), "Winograd output: residual too short");
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: AVX-512F is present (checked by `band`); the reads of q (rows * tiles_x
        // each) and the reads and writes of the rows (4 * rows * tiles_x pixels) lie within
        // the asserted lengths; masked lanes are not touched.
        #[allow(unsafe_code)]
        Isa::Avx512 => unsafe {
            let q = std::array::from_fn(|xi| q[xi].as_ptr());
            let (bias, per_channel, residual) = additions;
            avx512::transform_output(
                q,
                (rows, tiles_x),
                run.as_mut_ptr(),
                (bias, per_channel, residual.map(<[f32]>::as_ptr)),
            )
        },
        // SAFETY: AVX2 and FMA are present (checked by `band`); its accesses are bounds-checked.
        #[allow(unsafe_code)]
        Isa::Avx2 => unsafe { avx2::transform_output(q, (rows, tiles_x), run, additions) },
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("the Winograd kernel on {isa:?} off x86-64");
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use super::Additions;
    use std::arch::x86_64::*;

    /// The even (`ODD` = 0) or odd elements of `a` then `b` (16 floats), in order.
    #[target_feature(enable = "avx2,fma")]
    fn deinterleave<const ODD: i32>(a: __m256, b: __m256) -> __m256 {
        // Within each 128-bit lane [a0 a2 b0 b2 | a4 a6 b4 b6] (odd: a1 a3 ...), then the
        // 64-bit pairs reordered 0, 2, 1, 3.
        let pairs =
            if ODD == 0 { _mm256_shuffle_ps::<0b10_00_10_00>(a, b) } else { _mm256_shuffle_ps::<0b11_01_11_01>(a, b) };
        _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(pairs)))
    }

    /// [`super::transform_input`] on AVX2: 8 tiles of a row at a time, the rest one by one,
    /// each with the AVX-512 kernel's additions in its order (the same bits).
    ///
    /// # Safety
    /// AVX2 and FMA must be present; the arguments must pass `transform_input`'s checks.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn transform_input(
        plane: &[f32],
        row: usize,
        (ty0, ty1): (usize, usize),
        dst: &mut [&mut [f32]; 16],
    ) {
        let tiles_x = (row - 2) / 2;
        let vectors = tiles_x / 8;
        for ty in ty0..ty1 {
            let top = 2 * ty * row;
            let out = (ty - ty0) * tiles_x;
            for k in (0..8 * vectors).step_by(8) {
                // Tiles k..k + 8 read columns 2k ..= 2k + 17 < row of rows 2 ty ..= 2 ty + 3.
                let mut d = [[_mm256_setzero_ps(); 4]; 4];
                for (i, d) in d.iter_mut().enumerate() {
                    let p = plane[top + i * row + 2 * k..][..18].as_ptr();
                    let (a, b) = (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)));
                    let (a2, b2) = (_mm256_loadu_ps(p.add(2)), _mm256_loadu_ps(p.add(10)));
                    *d = [
                        deinterleave::<0>(a, b),
                        deinterleave::<1>(a, b),
                        deinterleave::<0>(a2, b2),
                        deinterleave::<1>(a2, b2),
                    ];
                }
                let mut w = [[_mm256_setzero_ps(); 4]; 4];
                for (j, w) in w.iter_mut().enumerate() {
                    let (r0, r1, r2, r3) = (d[0][j], d[1][j], d[2][j], d[3][j]);
                    *w = [_mm256_sub_ps(r0, r2), _mm256_add_ps(r1, r2), _mm256_sub_ps(r2, r1), _mm256_sub_ps(r1, r3)];
                }
                for i in 0..4 {
                    let (d0, d1, d2, d3) = (w[0][i], w[1][i], w[2][i], w[3][i]);
                    let values =
                        [_mm256_sub_ps(d0, d2), _mm256_add_ps(d1, d2), _mm256_sub_ps(d2, d1), _mm256_sub_ps(d1, d3)];
                    for (j, value) in values.into_iter().enumerate() {
                        _mm256_storeu_ps(dst[4 * i + j][out + k..][..8].as_mut_ptr(), value);
                    }
                }
            }
            for t in 8 * vectors..tiles_x {
                let patch = |i: usize, j: usize| plane[top + i * row + 2 * t + j];
                let w: [[f32; 4]; 4] = std::array::from_fn(|j| {
                    let (r0, r1, r2, r3) = (patch(0, j), patch(1, j), patch(2, j), patch(3, j));
                    [r0 - r2, r1 + r2, r2 - r1, r1 - r3]
                });
                for i in 0..4 {
                    let (d0, d1, d2, d3) = (w[0][i], w[1][i], w[2][i], w[3][i]);
                    for (j, value) in [d0 - d2, d1 + d2, d2 - d1, d1 - d3].into_iter().enumerate() {
                        dst[4 * i + j][out + t] = value;
                    }
                }
            }
        }
    }

    /// [`super::transform_output`] on AVX2: 8 tiles of a row at a time, the rest one by one,
    /// each with the AVX-512 kernel's additions in its order (the same bits).
    ///
    /// # Safety
    /// AVX2 and FMA must be present; the arguments must pass `transform_output`'s checks.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn transform_output(
        q: &[&[f32]; 16],
        (rows, tiles_x): (usize, usize),
        run: &mut [f32],
        (bias, per_channel, residual): Additions<'_>,
    ) {
        let w = 2 * tiles_x;
        let vectors = tiles_x / 8;
        // The additions in the AVX-512 kernel's order: bias, per-channel value, residual.
        let finish = |value: __m256, at: usize| {
            let mut value = _mm256_add_ps(value, _mm256_set1_ps(bias));
            if let Some(p) = per_channel {
                value = _mm256_add_ps(value, _mm256_set1_ps(p));
            }
            if let Some(r) = residual {
                value = _mm256_add_ps(value, _mm256_loadu_ps(r[at..][..8].as_ptr()));
            }
            value
        };
        for ty in 0..rows {
            for k in (0..8 * vectors).step_by(8) {
                let m: [__m256; 16] =
                    std::array::from_fn(|xi| _mm256_loadu_ps(q[xi][ty * tiles_x + k..][..8].as_ptr()));
                let (mut s0, mut s1) = ([_mm256_setzero_ps(); 4], [_mm256_setzero_ps(); 4]);
                for j in 0..4 {
                    s0[j] = _mm256_add_ps(_mm256_add_ps(m[j], m[4 + j]), m[8 + j]);
                    s1[j] = _mm256_sub_ps(_mm256_sub_ps(m[4 + j], m[8 + j]), m[12 + j]);
                }
                for (dy, s) in [s0, s1].into_iter().enumerate() {
                    let even = _mm256_add_ps(_mm256_add_ps(s[0], s[1]), s[2]);
                    let odd = _mm256_sub_ps(_mm256_sub_ps(s[1], s[2]), s[3]);
                    // [e0 o0 e1 o1 | e4 o4 e5 o5] and [e2 o2 e3 o3 | e6 o6 e7 o7], then halves.
                    let (low, high) = (_mm256_unpacklo_ps(even, odd), _mm256_unpackhi_ps(even, odd));
                    let halves = [_mm256_permute2f128_ps::<0x20>(low, high), _mm256_permute2f128_ps::<0x31>(low, high)];
                    for (half, pixels) in halves.into_iter().enumerate() {
                        let at = (2 * ty + dy) * w + 2 * k + 8 * half;
                        _mm256_storeu_ps(run[at..][..8].as_mut_ptr(), finish(pixels, at));
                    }
                }
            }
            for t in 8 * vectors..tiles_x {
                let m = |xi: usize| q[xi][ty * tiles_x + t];
                for dy in 0..2 {
                    let s: [f32; 4] = std::array::from_fn(|j| {
                        if dy == 0 {
                            m(j) + m(4 + j) + m(8 + j)
                        } else {
                            m(4 + j) - m(8 + j) - m(12 + j)
                        }
                    });
                    for (dx, value) in [s[0] + s[1] + s[2], s[1] - s[2] - s[3]].into_iter().enumerate() {
                        let at = (2 * ty + dy) * w + 2 * t + dx;
                        let mut value = value + bias;
                        if let Some(p) = per_channel {
                            value += p;
                        }
                        if let Some(r) = residual {
                            value += r[at];
                        }
                        run[at] = value;
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx512 {
    use std::arch::x86_64::*;

    /// Lanes 0..16 of the even (`odd` = 0) or odd elements of `a` then `b` (32 floats).
    #[target_feature(enable = "avx512f")]
    fn deinterleave(a: __m512, b: __m512, odd: i32) -> __m512 {
        let index = _mm512_add_epi32(
            _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30),
            _mm512_set1_epi32(odd),
        );
        _mm512_permutex2var_ps(a, index, b)
    }

    /// The lanes below `count` (at most 16).
    fn lanes(count: usize) -> __mmask16 {
        if count >= 16 {
            0xffff
        } else {
            ((1u32 << count) - 1) as __mmask16
        }
    }

    /// [`super::transform_input`], 16 tiles of a row at a time (the last ones masked).
    ///
    /// # Safety
    /// AVX-512F must be present; `plane` readable at rows 0..2 * ty1 + 2 of `row` floats, each
    /// `dst[ξ]` writable at 0..(ty1 - ty0) * tiles_x.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transform_input(
        plane: *const f32,
        row: usize,
        (ty0, ty1): (usize, usize),
        dst: [*mut f32; 16],
    ) {
        let tiles_x = (row - 2) / 2;
        for ty in ty0..ty1 {
            let top = plane.add(2 * ty * row);
            let out = (ty - ty0) * tiles_x;
            for k in (0..tiles_x).step_by(16) {
                // Tile t < n reads columns 2 * (k + t) ..= 2 * (k + t) + 3: 2n + 2 floats.
                let n = (tiles_x - k).min(16);
                let (a_lanes, b_lanes) = (lanes(2 * n + 2), lanes((2 * n + 2).saturating_sub(16)));
                let (a2_lanes, b2_lanes) = (lanes(2 * n), lanes((2 * n).saturating_sub(16)));
                // d[i][j]: element j of each tile's patch in row i. (Loops, not closures: a
                // closure does not inherit the function's target features.)
                let mut d = [[_mm512_setzero_ps(); 4]; 4];
                for (i, d) in d.iter_mut().enumerate() {
                    let p = top.add(i * row + 2 * k);
                    let (a, b) = (_mm512_maskz_loadu_ps(a_lanes, p), _mm512_maskz_loadu_ps(b_lanes, p.add(16)));
                    let (a2, b2) =
                        (_mm512_maskz_loadu_ps(a2_lanes, p.add(2)), _mm512_maskz_loadu_ps(b2_lanes, p.add(18)));
                    *d = [
                        deinterleave(a, b, 0),
                        deinterleave(a, b, 1),
                        deinterleave(a2, b2, 0),
                        deinterleave(a2, b2, 1),
                    ];
                }
                let mut w = [[_mm512_setzero_ps(); 4]; 4];
                for (j, w) in w.iter_mut().enumerate() {
                    let (r0, r1, r2, r3) = (d[0][j], d[1][j], d[2][j], d[3][j]);
                    *w = [_mm512_sub_ps(r0, r2), _mm512_add_ps(r1, r2), _mm512_sub_ps(r2, r1), _mm512_sub_ps(r1, r3)];
                }
                for i in 0..4 {
                    let (d0, d1, d2, d3) = (w[0][i], w[1][i], w[2][i], w[3][i]);
                    let values =
                        [_mm512_sub_ps(d0, d2), _mm512_add_ps(d1, d2), _mm512_sub_ps(d2, d1), _mm512_sub_ps(d1, d3)];
                    for (j, value) in values.into_iter().enumerate() {
                        _mm512_mask_storeu_ps(dst[4 * i + j].add(out + k), lanes(n), value);
                    }
                }
            }
        }
    }

    /// [`super::transform_output`], 16 tiles of a row at a time (the last ones masked).
    ///
    /// # Safety
    /// AVX-512F must be present; each `q[ξ]` readable at 0..rows * tiles_x; `run` writable,
    /// and `residual` readable, at 0..4 * rows * tiles_x.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transform_output(
        q: [*const f32; 16],
        (rows, tiles_x): (usize, usize),
        run: *mut f32,
        (bias, per_channel, residual): (f32, Option<f32>, Option<*const f32>),
    ) {
        let w = 2 * tiles_x;
        let low = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let high = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        for ty in 0..rows {
            for k in (0..tiles_x).step_by(16) {
                let n = (tiles_x - k).min(16);
                let mut m = [_mm512_setzero_ps(); 16];
                for (xi, m) in m.iter_mut().enumerate() {
                    *m = _mm512_maskz_loadu_ps(lanes(n), q[xi].add(ty * tiles_x + k));
                }
                let (mut s0, mut s1) = ([_mm512_setzero_ps(); 4], [_mm512_setzero_ps(); 4]);
                for j in 0..4 {
                    s0[j] = _mm512_add_ps(_mm512_add_ps(m[j], m[4 + j]), m[8 + j]);
                    s1[j] = _mm512_sub_ps(_mm512_sub_ps(m[4 + j], m[8 + j]), m[12 + j]);
                }
                let y = [
                    [
                        _mm512_add_ps(_mm512_add_ps(s0[0], s0[1]), s0[2]),
                        _mm512_sub_ps(_mm512_sub_ps(s0[1], s0[2]), s0[3]),
                    ],
                    [
                        _mm512_add_ps(_mm512_add_ps(s1[0], s1[1]), s1[2]),
                        _mm512_sub_ps(_mm512_sub_ps(s1[1], s1[2]), s1[3]),
                    ],
                ];
                for (dy, [even, odd]) in y.into_iter().enumerate() {
                    for (half, index) in [low, high].into_iter().enumerate() {
                        let pixels = lanes((2 * n).saturating_sub(16 * half));
                        let at = (2 * ty + dy) * w + 2 * k + 16 * half;
                        let mut value = _mm512_add_ps(_mm512_permutex2var_ps(even, index, odd), _mm512_set1_ps(bias));
                        if let Some(p) = per_channel {
                            value = _mm512_add_ps(value, _mm512_set1_ps(p));
                        }
                        if let Some(r) = residual {
                            value = _mm512_add_ps(value, _mm512_maskz_loadu_ps(pixels, r.add(at)));
                        }
                        _mm512_mask_storeu_ps(run.add(at), pixels, value);
                    }
                }
            }
        }
    }
}
