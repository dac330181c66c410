//! f32 matrix products on the CPU with the `gemm` crate (candle's own CPU GEMM), on strided
//! views of slices, for the kernels candle's ops would spend copies or passes on (the 3x3
//! convolutions, attention). The one `unsafe` call sits here, behind bounds checks.

/// `rows x cols` f32 values at `data[r * row_stride + c * col_stride]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> View<'a> {
    /// A row-major matrix whose rows start `row_stride` elements apart.
    pub fn rows(data: &'a [f32], row_stride: usize) -> Self {
        Self { data, row_stride, col_stride: 1 }
    }

    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.row_stride + (cols - 1) * self.col_stride < self.data.len()
    }
}

/// The most products one `gemm` call sums per element. `gemm` cuts longer sums into blocks whose
/// size depends on m and n too (k.min(512) when both are at most 64, else k over as many blocks
/// of at least 512 as it takes); handing it at most this many keeps each block whole, so an
/// element's value depends on k alone, never on how callers split m or n (batching, tiling,
/// threads).
const K_BLOCK: usize = 512;

/// `dst [m, n] = scale · lhs [m, k] @ rhs [k, n]`, plus the old `dst` when `accumulate`; `dst`
/// row-major with rows `dst_row_stride` apart. `parallel`: use candle's thread count (else one
/// thread, for callers that are parallel themselves). Each element's sum is the same bits
/// whatever m, n and `parallel` are: blocks of at most `K_BLOCK` products, in order.
pub(crate) fn gemm(
    (dst, dst_row_stride): (&mut [f32], usize),
    lhs: View,
    rhs: View,
    (m, n, k): (usize, usize, usize),
    scale: f32,
    accumulate: bool,
    parallel: bool,
) {
    let blocks = k.div_ceil(K_BLOCK).max(1);
    let block = k.div_ceil(blocks);
    for first in (0..k.max(1)).step_by(block.max(1)) {
        let depth = block.min(k - first);
        let lhs = View { data: &lhs.data[(first * lhs.col_stride).min(lhs.data.len())..], ..lhs };
        let rhs = View { data: &rhs.data[(first * rhs.row_stride).min(rhs.data.len())..], ..rhs };
        gemm_block((dst, dst_row_stride), lhs, rhs, (m, n, depth), scale, accumulate || first > 0, parallel);
    }
}

#[allow(unsafe_code)]
fn gemm_block(
    (dst, dst_row_stride): (&mut [f32], usize),
    lhs: View,
    rhs: View,
    (m, n, k): (usize, usize, usize),
    scale: f32,
    accumulate: bool,
    parallel: bool,
) {
    // Every element gemm touches lies within these bounds: checked, so the unsafe call below
    // reads and writes only inside the slices.
    assert!(View::rows(dst, dst_row_stride).fits(m, n), "gemm: dst too short");
    assert!(lhs.fits(m, k) && rhs.fits(k, n), "gemm: lhs or rhs too short");
    let threads = if parallel { candle_core::utils::get_num_threads() } else { 1 };
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: dst, lhs and rhs are addressed as [row * row_stride + col * col_stride] within
    // their slices (asserted above); dst does not alias lhs or rhs (a &mut and two & borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_row_stride as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        )
    }
}
