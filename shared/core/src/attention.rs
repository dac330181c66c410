//! Scaled dot-product attention that materialises a bounded number of scores, for the UNet's
//! transformers and the VAE's mid-block attention.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn as nn;

use crate::fast_math::{exp_nonpositive, lane_fold};

/// Most attention-score elements materialised at once. A 768x768 image at batch 8 has
/// 8 x 5 heads x 9216 x 9216 = 3.4e9 scores in its first blocks; past 2^31 elements cuBLAS
/// fails, and the memory is gigabytes. 2^27 (512 MiB in f32) keeps chunks large enough that
/// splitting costs nothing measurable.
pub const MAX_SCORE_ELEMENTS: usize = 1 << 27;

/// softmax(q kᵀ · scale) v over [batch·heads, tokens, head_dim] tensors, materialising at most
/// `max_scores` score elements at a time: the batch·heads rows are split first, then the query
/// tokens (each query row's softmax is independent, so the split only changes which GEMM calls
/// compute a row). In f16/bf16 the softmax runs in f32, as PyTorch's fused attention keeps it
/// (in the model's dtype the guided UNet step of the medium model at 256 px was twice as far
/// from the f32 reference: 4.7e-2 against 2.4e-2 of its scale, on candle's CPU kernels); with
/// `upcast`, q·k is computed in f32 too, as diffusers' `upcast_attention` does (f16 scores of
/// SD 2.1-768 overflow).
pub fn attention(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    scale: f64,
    upcast: bool,
    max_scores: usize,
) -> Result<Tensor> {
    if let Some(out) = cpu_f32_attention(query, key, value, 1, scale, false)? {
        return Ok(out);
    }
    let (rows, q_len, _) = query.dims3()?;
    let kv_len = key.dim(1)?;
    let per_row = q_len * kv_len;
    if rows * per_row <= max_scores {
        return attention_block(query, key, value, scale, upcast);
    }
    let mut out = Vec::new();
    if per_row <= max_scores {
        let rows_per_chunk = max_scores / per_row;
        for start in (0..rows).step_by(rows_per_chunk) {
            let n = rows_per_chunk.min(rows - start);
            out.push(attention_block(
                &query.narrow(0, start, n)?,
                &key.narrow(0, start, n)?,
                &value.narrow(0, start, n)?,
                scale,
                upcast,
            )?);
        }
        return Tensor::cat(&out, 0);
    }
    let queries_per_chunk = (max_scores / kv_len).max(1);
    for row in 0..rows {
        let (k, v) = (key.narrow(0, row, 1)?, value.narrow(0, row, 1)?);
        let mut parts = Vec::new();
        for start in (0..q_len).step_by(queries_per_chunk) {
            let n = queries_per_chunk.min(q_len - start);
            parts.push(attention_block(&query.narrow(0, row, 1)?.narrow(1, start, n)?, &k, &v, scale, upcast)?);
        }
        out.push(Tensor::cat(&parts, 1)?);
    }
    Tensor::cat(&out, 0)
}

/// Attention over per-token projections: query [batch, q_tokens, heads · head_dim], key and
/// value [batch, kv_tokens, heads · head_dim] (contiguous, as a Linear gives them); returns
/// [batch, q_tokens, heads · head_dim]. On CUDA in f16/bf16, in a build with the `flash-attn`
/// feature, one flash-attention kernel runs on the heads where they lie (no score matrix, no
/// head transposes; unless SDMESH_FLASH_ATTENTION=0); on the CPU in f32 the blocked kernel
/// reads the heads where they lie too; otherwise the heads become rows of [`attention`].
pub fn multi_head_attention(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    heads: usize,
    scale: f64,
    upcast: bool,
) -> Result<Tensor> {
    if let Some(out) = cpu_f32_attention(query, key, value, heads, scale, false)? {
        return Ok(out);
    }
    let (batch, q_len, inner) = query.dims3()?;
    let kv_len = key.dim(1)?;
    let head_dim = inner / heads;
    #[cfg(feature = "flash-attn")]
    if flash_attention_enabled() {
        let q = query.reshape((batch, q_len, heads, head_dim))?;
        if sdmesh_flash_attn::supports(&q) {
            let (k, v) =
                (key.reshape((batch, kv_len, heads, head_dim))?, value.reshape((batch, kv_len, heads, head_dim))?);
            // The kernel's scores and softmax are f32: `upcast` holds either way.
            return sdmesh_flash_attn::flash_attention(&q, &k, &v, scale as f32)?.reshape((batch, q_len, inner));
        }
    }
    let to_rows = |t: &Tensor, len: usize| -> Result<Tensor> {
        t.reshape((batch, len, heads, head_dim))?.transpose(1, 2)?.reshape((batch * heads, len, head_dim))
    };
    let out = attention(
        &to_rows(query, q_len)?,
        &to_rows(key, kv_len)?,
        &to_rows(value, kv_len)?,
        scale,
        upcast,
        MAX_SCORE_ELEMENTS,
    )?;
    out.reshape((batch, heads, q_len, head_dim))?.transpose(1, 2)?.reshape((batch, q_len, inner))
}

/// The additive causal mask [1, 1, tokens, tokens], f32: 0 on and below the diagonal, -inf
/// above. [`causal_self_attention`] adds it to the scores off the CPU f32 path; a model builds
/// it once per forward pass (off the CPU that is a copy from the host) for all its layers.
pub fn causal_mask(tokens: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> =
        (0..tokens).flat_map(|i| (0..tokens).map(move |j| if j > i { f32::NEG_INFINITY } else { 0. })).collect();
    Tensor::from_vec(mask, (1, 1, tokens, tokens), device)
}

/// Causal self-attention (token i attends to tokens 0..=i: CLIP's text transformer) over
/// per-token projections laid out as [`multi_head_attention`] takes them; query, key and value
/// may be column ranges of one fused projection [batch, tokens, 3 · heads · head_dim]. On the
/// CPU in f32 the blocked kernel skips the masked scores; elsewhere candle's ops add `mask`
/// ([`causal_mask`] of the tokens, on the same device), with the softmax in f32 for f16/bf16
/// models.
pub fn causal_self_attention(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    heads: usize,
    scale: f64,
    mask: &Tensor,
) -> Result<Tensor> {
    let (batch, tokens, inner) = query.dims3()?;
    if key.dim(1)? != tokens || value.dim(1)? != tokens {
        candle_core::bail!("causal self-attention: {tokens} query tokens, {} key tokens", key.dim(1)?);
    }
    if let Some(out) = cpu_f32_attention(query, key, value, heads, scale, true)? {
        return Ok(out);
    }
    let head_dim = inner / heads;
    let to_rows =
        |t: &Tensor| -> Result<Tensor> { t.reshape((batch, tokens, heads, head_dim))?.transpose(1, 2)?.contiguous() };
    let (q, k, v) = (to_rows(query)?, to_rows(key)?, to_rows(value)?);
    let scores = (q.matmul(&k.t()?)?.to_dtype(DType::F32)? * scale)?.broadcast_add(mask)?;
    let probs = nn::ops::softmax_last_dim(&scores)?.to_dtype(query.dtype())?;
    probs.matmul(&v)?.transpose(1, 2)?.reshape((batch, tokens, inner))
}

/// Whether [`multi_head_attention`] may use flash attention: a build with the `flash-attn`
/// feature, and SDMESH_FLASH_ATTENTION not set to 0 (for comparing the two paths). Read once.
pub fn flash_attention_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    cfg!(feature = "flash-attn") && crate::switched_on(&ENABLED, "SDMESH_FLASH_ATTENTION")
}

/// For a model in f16/bf16 on a CUDA device: f32 GEMMs on tensor cores (TF32). In such a
/// model they only run on half-precision values cast up (upcast attention, the VAE's
/// attention), whose mantissas TF32 holds exactly, and they still accumulate in f32. It is a
/// process-wide cuBLAS setting, so a process serving an f32 model on a GPU should not also
/// load a half one.
pub fn tf32_for_upcast_attention(device: &Device, dtype: DType) {
    if device.is_cuda() && dtype != DType::F32 {
        candle_core::cuda::set_gemm_reduced_precision_f32(true);
    }
}

/// Query tokens per block of the CPU path: a block's scores (kv_len x 64) stay in cache.
const CPU_QUERY_BLOCK: usize = 64;

/// The CPU f32 path, over [batch, tokens, heads · head_dim] with the heads side by side (as
/// the projections give them; `heads` = 1 for rows already split): for each (image, block of
/// 64 query tokens), in parallel, and each head, the block's scores transposed, k·qᵀ·scale
/// [kv_len, 64] (one GEMM on the image's k as it lies and a strided view of the block's q),
/// their exponentials in place column by column, then vᵀ times them (one GEMM, [dv, 64]),
/// written into the head's columns of the output scaled by the softmax's 1 / sum there (dv
/// values a query, not kv_len). The transposed order keeps k and v, the operands every block
/// shares, on the side `gemm` reads where they lie: the other way round it copied (packed) all
/// of k and v again for every block, a quarter of the CPU samples (perf) at 4096 tokens, and
/// the attention took 10-20% more CPU time (`examples/attention_shapes` at 4096 x 128, user
/// time of the whole run, 5.5-6.0 s against 4.8-5.0). candle's
/// ops write the whole score matrix to memory and read it back twice, its softmax calls libm's
/// exp per element, and the heads would be transposed to rows and back. A block's result does
/// not depend on the other images, so batching changes nothing. `causal`: query token t
/// attends to keys 0..=t only (queries and keys the same tokens).
fn cpu_f32_attention(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    heads: usize,
    scale: f64,
    causal: bool,
) -> Result<Option<Tensor>> {
    use crate::cpu_gemm::{cpu_f32_rows, gemm, is_cpu_f32, row_stride, View};
    use rayon::prelude::*;
    if ![query, key, value].into_iter().all(is_cpu_f32) {
        return Ok(None);
    }
    let (batch, q_len, inner) = query.dims3()?;
    let (kv_len, inner_v) = (key.dim(1)?, value.dim(2)?);
    let (d, dv) = (inner / heads, inner_v / heads);
    // Rows are read where they lie, `*_stride` apart (wider than a row for one part of a fused
    // projection); other layouts are copied first.
    let evenly = |t: &Tensor| if row_stride(t).is_some() { Ok(t.clone()) } else { t.contiguous() };
    let (query, key, value) = (evenly(query)?, evenly(key)?, evenly(value)?);
    let ((q, q_stride), (k, k_stride), (v, v_stride)) =
        (cpu_f32_rows(&query)?, cpu_f32_rows(&key)?, cpu_f32_rows(&value)?);
    // An image's `len` rows of a matrix whose rows lie `stride` apart.
    let image_rows = |image: usize, len: usize, stride: usize, width: usize| -> std::ops::Range<usize> {
        let start = image * len * stride;
        start..start + (len - 1) * stride + width
    };
    let mut out = vec![0f32; batch * q_len * inner_v];
    if q_len == 0 || kv_len == 0 {
        return Ok(Some(Tensor::from_vec(out, (batch, q_len, inner_v), &Device::Cpu)?));
    }
    out.par_chunks_mut(q_len * inner_v).enumerate().for_each(|(image, image_out)| {
        let k = &k[image_rows(image, kv_len, k_stride, inner)];
        let v = &v[image_rows(image, kv_len, v_stride, inner_v)];
        let q = &q[image_rows(image, q_len, q_stride, inner)];
        // vᵀ per head, [heads][dv][kv_len] row-major, once for all query blocks: the left side
        // of the second GEMM, which `gemm` reads in place only with unit column stride.
        let mut v_t = vec![0f32; kv_len * inner_v];
        v_t.par_chunks_mut(dv * kv_len).enumerate().for_each(|(head, v_t)| {
            for (j, v_row) in v.chunks(v_stride).enumerate() {
                for (i, &x) in v_row[head * dv..][..dv].iter().enumerate() {
                    v_t[i * kv_len + j] = x;
                }
            }
        });
        image_out.par_chunks_mut(CPU_QUERY_BLOCK * inner_v).enumerate().for_each(|(block, block_out)| {
            let n = block_out.len() / inner_v;
            let first_query = block * CPU_QUERY_BLOCK;
            let q_block = &q[first_query * q_stride..];
            let mut scores_t = vec![0f32; kv_len * n];
            let mut out_t = vec![0f32; dv * n];
            let mut softmax = ColumnSoftmax::new(n);
            for head in 0..heads {
                let (k_head, q_head_t) =
                    (View::rows(&k[head * d..], k_stride), View::transposed(&q_block[head * d..], q_stride));
                gemm((&mut scores_t, n), k_head, q_head_t, (kv_len, n, d), scale as f32, false, false);
                if causal {
                    softmax.exp_shifted_causal(&mut scores_t, first_query);
                } else {
                    softmax.exp_shifted(&mut scores_t);
                }
                let v_head_t = View::rows(&v_t[head * dv * kv_len..], kv_len);
                gemm((&mut out_t, n), v_head_t, View::rows(&scores_t, n), (dv, n, kv_len), 1.0, false, false);
                // The softmax's normalisation, on the dv outputs instead of the kv_len scores.
                for (query, (row, &inv_sum)) in block_out.chunks_mut(inner_v).zip(&softmax.inv_sums).enumerate() {
                    for (c, x) in row[head * dv..][..dv].iter_mut().enumerate() {
                        *x = out_t[c * n + query] * inv_sum;
                    }
                }
            }
        });
    });
    Ok(Some(Tensor::from_vec(out, (batch, q_len, inner_v), &Device::Cpu)?))
}

/// The unnormalised softmax of each column of transposed scores [keys, queries] (rows n
/// apart), in place, with 1 / each column's sum, summed in [`exp_shifted_in_place`]'s order
/// (so a column's values are what that function gives on it as a row). Scratch kept across
/// heads.
struct ColumnSoftmax {
    /// One per column (query).
    maxes: Vec<f32>,
    /// Eight partial sums per column (key j adds to lane j % 8), then the rest of the keys.
    lanes: Vec<f32>,
    tails: Vec<f32>,
    inv_sums: Vec<f32>,
    /// One column, for the causal case.
    column: Vec<f32>,
}

impl ColumnSoftmax {
    fn new(n: usize) -> Self {
        let zeros = |len| vec![0f32; len];
        Self { maxes: zeros(n), lanes: zeros(8 * n), tails: zeros(n), inv_sums: zeros(n), column: Vec::new() }
    }

    fn exp_shifted(&mut self, scores_t: &mut [f32]) {
        exp_shifted_columns(scores_t, &mut self.maxes, &mut self.lanes, &mut self.tails, &mut self.inv_sums);
    }

    /// Query column i (token `first_query + i`) sees keys 0..=first_query + i; the rest weigh
    /// exactly 0. Column by column through [`exp_shifted_in_place`] (causal attention is the
    /// text encoder's, 77 tokens, where this pass costs nothing that matters).
    fn exp_shifted_causal(&mut self, scores_t: &mut [f32], first_query: usize) {
        let n = self.maxes.len();
        let keys = scores_t.len() / n;
        for (i, inv_sum) in self.inv_sums.iter_mut().enumerate() {
            let seen = (first_query + i + 1).min(keys);
            self.column.clear();
            self.column.extend((0..seen).map(|j| scores_t[j * n + i]));
            *inv_sum = exp_shifted_in_place(&mut self.column);
            for (j, &x) in self.column.iter().enumerate() {
                scores_t[j * n + i] = x;
            }
            (seen..keys).for_each(|j| scores_t[j * n + i] = 0.0);
        }
    }
}

crate::fast_math::simd_kernel! {
    /// [`ColumnSoftmax::exp_shifted`]: three passes over the rows (the columns' maxes; the
    /// exps and the partial sums; the sums folded), each vectorised along a row of queries.
    fn exp_shifted_columns(
        scores_t: &mut [f32],
        maxes: &mut [f32],
        lanes: &mut [f32],
        tails: &mut [f32],
        inv_sums: &mut [f32],
    ) {
        let n = maxes.len();
        maxes.fill(f32::NEG_INFINITY);
        for row in scores_t.chunks(n) {
            maxes.iter_mut().zip(row).for_each(|(m, &x)| *m = m.max(x));
        }
        lanes.fill(0.0);
        tails.fill(0.0);
        let keys = scores_t.len() / n;
        let (whole, rest) = scores_t.split_at_mut(keys / 8 * 8 * n);
        for (j, row) in whole.chunks_mut(n).enumerate() {
            let lane = &mut lanes[(j % 8) * n..][..n];
            for ((x, &m), sum) in row.iter_mut().zip(maxes.iter()).zip(lane) {
                *x = exp_nonpositive(*x - m);
                *sum += *x;
            }
        }
        for row in rest.chunks_mut(n) {
            for ((x, &m), sum) in row.iter_mut().zip(maxes.iter()).zip(tails.iter_mut()) {
                *x = exp_nonpositive(*x - m);
                *sum += *x;
            }
        }
        for (i, (inv_sum, &tail)) in inv_sums.iter_mut().zip(tails.iter()).enumerate() {
            *inv_sum = 1.0 / (0..8).fold(tail, |a, lane| a + lanes[lane * n + i]);
        }
    }
}

crate::fast_math::simd_kernel! {
    /// The unnormalised softmax of one row of scores in place, e^(x - max), and 1 / its sum: two
    /// passes (the max, then the exp and the sum together in eight lanes, in `lane_fold`'s order).
    fn exp_shifted_in_place(row: &mut [f32]) -> f32 {
        let max = lane_fold(row, f32::NEG_INFINITY, f32::max, f32::max);
        let mut lanes = [0f32; 8];
        let mut chunks = row.chunks_exact_mut(8);
        for chunk in &mut chunks {
            for (lane, x) in lanes.iter_mut().zip(chunk) {
                *x = exp_nonpositive(*x - max);
                *lane += *x;
            }
        }
        let tail = chunks.into_remainder().iter_mut().fold(0.0, |sum, x| {
            *x = exp_nonpositive(*x - max);
            sum + *x
        });
        1.0 / lanes.into_iter().fold(tail, |a, b| a + b)
    }
}

fn attention_block(query: &Tensor, key: &Tensor, value: &Tensor, scale: f64, upcast: bool) -> Result<Tensor> {
    let dtype = query.dtype();
    if dtype == DType::F32 {
        let scores = query.matmul(&(key.t()? * scale)?)?;
        return nn::ops::softmax_last_dim(&scores)?.matmul(value);
    }
    let scores = if upcast {
        query.to_dtype(DType::F32)?.matmul(&(key.to_dtype(DType::F32)?.t()? * scale)?)?
    } else {
        query.matmul(&(key.t()? * scale)?)?.to_dtype(DType::F32)?
    };
    nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?.matmul(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{max_diff, randn};

    fn qkv(rows: usize, q_len: usize, kv_len: usize, dtype: DType) -> (Tensor, Tensor, Tensor) {
        // Seeded, so a failure reproduces.
        let r = |seed: u64, n: usize| randn(seed, &[rows, n, 8]).to_dtype(dtype).unwrap();
        (r(1, q_len), r(2, kv_len), r(3, kv_len))
    }

    /// The run-time-dispatched softmax pass (AVX-512 or AVX2 where the CPU has them) gives the
    /// bits of the same arithmetic compiled here for the baseline target, element by element.
    #[test]
    fn dispatched_exp_pass_has_the_baseline_bits() {
        let row = randn(4, &[1000]).flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let row: Vec<f32> = row.iter().map(|x| x * 30.0).collect();
        let mut dispatched = row.clone();
        let inv_sum = exp_shifted_in_place(&mut dispatched);
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let baseline: Vec<f32> = row.iter().map(|&x| exp_nonpositive(x - max)).collect();
        let (lanes, tail) = baseline.split_at(baseline.len() / 8 * 8);
        let mut sums = [0f32; 8];
        for chunk in lanes.chunks(8) {
            sums.iter_mut().zip(chunk).for_each(|(s, x)| *s += x);
        }
        let sum = sums.into_iter().fold(tail.iter().sum::<f32>(), |a, b| a + b);
        assert_eq!(dispatched, baseline);
        assert_eq!(inv_sum, 1.0 / sum);
    }

    /// The column pass gives each column the bits the row pass gives it as a row, with rows
    /// past the last whole chunk of 8 keys and without.
    #[test]
    fn column_softmax_has_the_row_passes_bits() {
        for (keys, n) in [(77, 13), (64, 8), (1000, 64), (3, 5)] {
            let scores = (randn(14, &[keys, n]) * 30.0).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut columns = scores.clone();
            let mut softmax = ColumnSoftmax::new(n);
            softmax.exp_shifted(&mut columns);
            for i in 0..n {
                let mut row: Vec<f32> = (0..keys).map(|j| scores[j * n + i]).collect();
                let inv_sum = exp_shifted_in_place(&mut row);
                assert_eq!(softmax.inv_sums[i], inv_sum, "{keys} keys, column {i}");
                assert!((0..keys).all(|j| columns[j * n + i] == row[j]), "{keys} keys, column {i}");
            }
        }
    }

    /// Splitting by rows and by query tokens gives what the one-block computation gives.
    #[test]
    fn chunked_attention_matches_one_block() {
        // f16: the chunked path is the one off the CPU f32 kernel (GPUs without flash attention).
        let (q, k, v) = qkv(6, 40, 24, DType::F16);
        let whole = attention(&q, &k, &v, 0.3, false, usize::MAX).unwrap();
        // 2 rows per chunk; then 7 query tokens per chunk (one row's scores exceed the budget).
        for budget in [2 * 40 * 24, 7 * 24, 1] {
            let chunked = attention(&q, &k, &v, 0.3, false, budget).unwrap();
            let err = max_diff(&chunked, &whole);
            // A few f16 ulps: one-token chunks take another matmul kernel.
            assert!(err <= 4e-3, "budget {budget}: max abs error {err:e}");
        }
    }

    /// Heads laid side by side in the projections give, head by head, plain softmax(q kᵀ) v.
    #[test]
    fn multi_head_attention_is_attention_per_head() {
        let draw = |seed: u64, len: usize| randn(seed, &[2, len, 3 * 8]);
        // 150 query tokens: several of the CPU path's 64-token blocks, the last one short.
        let (q, k, v) = (draw(4, 150), draw(5, 7), draw(6, 7));
        let out = multi_head_attention(&q, &k, &v, 3, 0.4, false).unwrap();
        assert_eq!(out.dims(), &[2, 150, 24]);
        for head in 0..3 {
            let part = |t: &Tensor| t.narrow(2, head * 8, 8).unwrap().contiguous().unwrap();
            let scores = (part(&q).matmul(&part(&k).t().unwrap()).unwrap() * 0.4).unwrap();
            let expected = nn::ops::softmax_last_dim(&scores).unwrap().matmul(&part(&v)).unwrap();
            let err = max_diff(&part(&out), &expected);
            assert!(err <= 1e-6, "head {head}: max abs error {err:e}");
        }
    }

    /// softmax(q kᵀ · scale + causal mask) v per head, with candle's ops.
    fn causal_reference(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Tensor {
        let (_, tokens, inner) = q.dims3().unwrap();
        let d = inner / heads;
        let mask: Vec<f32> =
            (0..tokens).flat_map(|i| (0..tokens).map(move |j| if j > i { f32::NEG_INFINITY } else { 0. })).collect();
        let mask = Tensor::from_vec(mask, (tokens, tokens), &Device::Cpu).unwrap();
        let per_head: Vec<Tensor> = (0..heads)
            .map(|h| {
                let part = |t: &Tensor| t.narrow(2, h * d, d).unwrap().contiguous().unwrap();
                let scores = (part(q).matmul(&part(k).t().unwrap()).unwrap() * scale).unwrap();
                let probs = nn::ops::softmax_last_dim(&scores.broadcast_add(&mask).unwrap()).unwrap();
                probs.matmul(&part(v)).unwrap()
            })
            .collect();
        Tensor::cat(&per_head, 2).unwrap()
    }

    /// The CPU kernel's causal mode, on q, k and v given as column ranges of one fused
    /// projection (read in place), is per-head masked softmax attention, gives the bits it gives
    /// on contiguous copies, and matches the candle-ops path other devices and dtypes take.
    #[test]
    fn causal_self_attention_masks_later_tokens() {
        // 77 tokens: a full 64-query block and a short one, as CLIP's text transformer has.
        let (heads, d, tokens) = (3, 8, 77);
        let qkv = randn(11, &[2, tokens, 3 * heads * d]);
        let part = |i: usize| qkv.narrow(2, i * heads * d, heads * d).unwrap();
        let (q, k, v) = (part(0), part(1), part(2));
        assert!(!q.is_contiguous(), "the test must cover rows read in place");
        let mask = causal_mask(tokens, &Device::Cpu).unwrap();
        let out = causal_self_attention(&q, &k, &v, heads, 0.35, &mask).unwrap();
        let expected = causal_reference(&q, &k, &v, heads, 0.35);
        let err = max_diff(&out, &expected);
        assert!(err <= 1e-6, "max abs error {err:e}");

        let copy = |t: &Tensor| t.contiguous().unwrap();
        let from_copies = causal_self_attention(&copy(&q), &copy(&k), &copy(&v), heads, 0.35, &mask).unwrap();
        assert_eq!(max_diff(&out, &from_copies), 0.0, "strided and contiguous inputs give the same bits");

        // The first token sees only itself: its output is its own value.
        let first = out.narrow(1, 0, 1).unwrap();
        assert_eq!(max_diff(&first, &v.narrow(1, 0, 1).unwrap()), 0.0);

        let half = |t: &Tensor| t.to_dtype(DType::F16).unwrap();
        let other_path = causal_self_attention(&half(&q), &half(&k), &half(&v), heads, 0.35, &mask).unwrap();
        let err = max_diff(&other_path.to_dtype(DType::F32).unwrap(), &expected);
        assert!(err <= 5e-3, "f16 (candle's ops): max abs error {err:e}");
    }

    #[test]
    fn causal_self_attention_needs_as_many_keys_as_queries() {
        let (q, k) = (randn(12, &[1, 5, 8]), randn(13, &[1, 6, 8]));
        assert!(causal_self_attention(&q, &k, &k, 1, 1.0, &causal_mask(5, &Device::Cpu).unwrap()).is_err());
    }

    #[test]
    fn cpu_path_matches_candles_ops() {
        let (q, k, v) = (randn(7, &[3, 150, 16]), randn(8, &[3, 77, 16]), randn(9, &[3, 77, 24]));
        let fast = attention(&q, &k, &v, 0.3, false, MAX_SCORE_ELEMENTS).unwrap();
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * 0.3).unwrap();
        let expected = nn::ops::softmax_last_dim(&scores).unwrap().matmul(&v).unwrap();
        let err = max_diff(&fast, &expected);
        assert!(err <= 1e-5, "max abs error {err:e}");
    }

    /// f16 scores that would overflow (|q·k| > 65504) stay finite with upcast.
    #[test]
    fn upcast_keeps_large_f16_scores_finite() {
        let (q, k, v) = qkv(1, 4, 4, DType::F32);
        let (q, k) = ((q * 200.0).unwrap(), (k * 200.0).unwrap());
        let half = |t: &Tensor| t.to_dtype(DType::F16).unwrap();
        let reference = attention(&q, &k, &v, 1.0, false, usize::MAX).unwrap();
        let plain = attention(&half(&q), &half(&k), &half(&v), 1.0, false, usize::MAX).unwrap();
        let plain = plain.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(
            plain.iter().any(|x| !x.is_finite()),
            "the inputs must overflow f16 scores for this test to mean anything"
        );
        let upcast = attention(&half(&q), &half(&k), &half(&v), 1.0, true, usize::MAX).unwrap();
        let err = (upcast.to_dtype(DType::F32).unwrap() - &reference)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(err <= 1e-2, "upcast f16 attention: max abs error {err:e}");
    }
}
