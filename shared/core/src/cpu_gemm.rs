//! f32 matrix products on the CPU with the `gemm` crate (candle's own CPU GEMM), on strided
//! views of slices, for the kernels candle's ops would spend copies or passes on (the 3x3
//! convolutions, attention, linear layers), and the f32 values of a CPU tensor they read. The
//! one `unsafe` call sits here, behind bounds checks.

use candle_core::{Result, Storage, StorageRef, Tensor};

/// f32 values of a CPU tensor (a range of its storage), read in place (the guard holds the tensor's
/// storage for reading while they are in use).
pub(crate) struct CpuF32<'a> {
    storage: StorageRef<'a>,
    range: std::ops::Range<usize>,
}

/// Whether `t` is an f32 tensor on the CPU: what the CPU kernels here take (the layers keep
/// their weights in these kernels' layouts exactly then, and use candle's ops otherwise).
pub(crate) fn is_cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

/// `t`'s values, or an error if it is not a contiguous f32 CPU tensor.
pub(crate) fn cpu_f32(t: &Tensor) -> Result<CpuF32<'_>> {
    let Some((start, end)) = t.layout().contiguous_offsets() else {
        candle_core::bail!("a contiguous tensor expected, not one of stride {:?}", t.stride())
    };
    in_storage(t, start..end)
}

/// The `range` of `t`'s f32 CPU storage, read in place (checked to lie within it).
fn in_storage(t: &Tensor, range: std::ops::Range<usize>) -> Result<CpuF32<'_>> {
    let (storage, _) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else { candle_core::bail!("a CPU tensor expected, not {:?}", t.device()) };
    if cpu.as_slice::<f32>()?.len() < range.end {
        candle_core::bail!("values past the end of the tensor's storage");
    }
    Ok(CpuF32 { storage, range })
}

/// The stride between `t`'s rows (its last dimension) when they lie evenly apart with unit
/// column stride: a contiguous tensor, or a column range of one (a part of a fused projection).
pub(crate) fn row_stride(t: &Tensor) -> Option<usize> {
    let layout = t.layout();
    let (dims, strides) = (layout.dims(), layout.stride());
    let (&cols, leading) = dims.split_last()?;
    if cols > 1 && strides[leading.len()] != 1 {
        return None;
    }
    // The leading dimensions, innermost first, must flatten to one run of rows.
    let (mut step, mut span) = (None, 1);
    for (&dim, &stride) in leading.iter().zip(strides).rev().filter(|(&dim, _)| dim > 1) {
        match step {
            None => step = Some(stride),
            Some(s) if stride == s * span => {}
            Some(_) => return None,
        }
        span *= dim;
    }
    let stride = step.unwrap_or(cols);
    (stride >= cols).then_some(stride)
}

/// `t`'s values from its first element to its last, read in place, and the stride between its
/// rows: for an f32 CPU tensor whose rows lie evenly apart ([`row_stride`]); an error otherwise.
pub(crate) fn cpu_f32_rows(t: &Tensor) -> Result<(CpuF32<'_>, usize)> {
    let Some(stride) = row_stride(t) else {
        candle_core::bail!("rows evenly apart expected, not strides {:?}", t.stride())
    };
    let cols = t.dims().last().copied().unwrap_or(1);
    let rows = t.elem_count().checked_div(cols).unwrap_or(0);
    let len = if rows == 0 || cols == 0 { 0 } else { (rows - 1) * stride + cols };
    let start = t.layout().start_offset();
    Ok((in_storage(t, start..start + len)?, stride))
}

impl std::ops::Deref for CpuF32<'_> {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        let Storage::Cpu(cpu) = &*self.storage else { unreachable!("checked by cpu_f32") };
        &cpu.as_slice::<f32>().expect("checked by cpu_f32")[self.range.clone()]
    }
}

/// The threads the CPU kernels split work over: candle's count, read once. (candle re-reads
/// it on every call, and without `RAYON_NUM_THREADS` that parses /proc/cpuinfo each time.)
pub(crate) fn cpu_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(candle_core::utils::get_num_threads)
}

/// `rows x cols` f32 values at `data[r * row_stride + c * col_stride]`: a row-major matrix
/// whose rows start `row_stride` elements apart ([`View::rows`]), or the transpose of one
/// ([`View::transposed`]).
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> View<'a> {
    pub fn rows(data: &'a [f32], row_stride: usize) -> Self {
        Self { data, row_stride, col_stride: 1 }
    }

    /// The transpose of the row-major matrix in `data` whose rows start `stride` apart: element
    /// (r, c) is `data[c * stride + r]`.
    pub fn transposed(data: &'a [f32], stride: usize) -> Self {
        Self { data, row_stride: 1, col_stride: stride }
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

/// `dst [m, n] = weight [m, k] @ columns [k, n] + bias[row]` (`dst` rows n apart): a
/// convolution's weights times its input columns, the bias the sum's starting value.
pub(crate) fn gemm_row_bias(
    dst: &mut [f32],
    weight: View,
    columns: View,
    (m, n, k): (usize, usize, usize),
    bias: Option<&[f32]>,
) {
    if let Some(bias) = bias {
        for (row, &b) in dst.chunks_mut(n).zip(bias) {
            row.fill(b);
        }
    }
    gemm((dst, n), weight, columns, (m, n, k), 1.0, bias.is_some(), true);
}

/// `dst [m, n] = scale · lhs [m, k] @ rhs [k, n]`, plus the old `dst` when `accumulate`; `dst`
/// row-major with rows `dst_row_stride` apart. `parallel`: use candle's thread count (else one
/// thread, for callers that are parallel themselves). Each element's sum is the same bits
/// whatever m, n and `parallel` are: blocks of at most `K_BLOCK` products, in order.
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
    // Every element gemm touches lies within these bounds: checked, so the unsafe calls below
    // read and write only inside the slices.
    assert!(View::rows(dst, dst_row_stride).fits(m, n), "gemm: dst too short");
    assert!(lhs.fits(m, k) && rhs.fits(k, n), "gemm: lhs or rhs too short");
    if m == 0 || n == 0 {
        return; // no dst element (and the views may be empty)
    }
    let threads = if parallel { cpu_threads() } else { 1 };
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    let block = k.div_ceil(k.div_ceil(K_BLOCK).max(1)).max(1);
    let mut first = 0;
    loop {
        let depth = block.min(k - first);
        // SAFETY: dst is addressed as [row * row_stride + col], lhs and rhs as [row * row_stride
        // + col * col_stride], within their slices (asserted above for the whole of k; this
        // block's columns of lhs and rows of rhs are a part of it); dst does not alias lhs or
        // rhs (a &mut and two & borrows).
        unsafe {
            gemm::gemm(
                m,
                n,
                depth,
                dst.as_mut_ptr(),
                1,
                dst_row_stride as isize,
                accumulate || first > 0,
                lhs.data.as_ptr().add(first * lhs.col_stride),
                lhs.col_stride as isize,
                lhs.row_stride as isize,
                rhs.data.as_ptr().add(first * rhs.row_stride),
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
        first += depth;
        if first >= k {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::randn;

    #[test]
    fn row_stride_finds_evenly_spaced_rows() {
        let t = randn(1, &[2, 5, 12]);
        assert_eq!(row_stride(&t), Some(12));
        assert_eq!(row_stride(&t.narrow(2, 4, 4).unwrap()), Some(12), "a column range of each row");
        assert_eq!(row_stride(&t.narrow(1, 1, 3).unwrap()), None, "rows of two images not one run");
        assert_eq!(row_stride(&t.narrow(0, 1, 1).unwrap().narrow(1, 1, 3).unwrap()), Some(12), "one image");
        assert_eq!(row_stride(&t.transpose(1, 2).unwrap()), None, "columns not unit-strided");
        let columns = t.narrow(2, 4, 4).unwrap();
        let (values, stride) = cpu_f32_rows(&columns).unwrap();
        let all = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(stride, 12);
        assert_eq!(&values[..], &all[4..4 + 9 * 12 + 4]);
    }
}
