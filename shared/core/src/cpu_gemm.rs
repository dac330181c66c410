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

    /// The transpose of a row-major matrix whose rows start `row_stride` elements apart.
    pub fn transposed(data: &'a [f32], row_stride: usize) -> Self {
        Self { data, row_stride: 1, col_stride: row_stride }
    }

    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.row_stride + (cols - 1) * self.col_stride < self.data.len()
    }
}

/// `dst [m, n] = scale · lhs [m, k] @ rhs [k, n]`, plus the old `dst` when `accumulate`; `dst`
/// row-major with rows `dst_row_stride` apart. `parallel`: use candle's thread count (else one
/// thread, for callers that are parallel themselves).
#[allow(unsafe_code)]
pub(crate) fn gemm(
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
