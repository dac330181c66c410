//! 3x3 convolutions (stride 1, padding 1; and stride 2, the samplers'), the bulk of the UNet's
//! and the VAE's work, made fast on the CPU.
//!
//! candle 0.11's CPU kernel builds im2col tiles of 512 output pixels with scattered writes and
//! runs a GEMM per tile; it reaches 30-120 GFLOP/s on the SD shapes (2-core EPYC,
//! `cargo run --release -p sdmesh-unet --example conv_shift`). Two CPU f32 paths replace it:
//!
//! - **Shifted GEMMs** (maps over 16 pixels): with the image zero-padded to (h+2) x (w+2), the
//!   output over the padded width is the sum over the nine taps (kh, kw) of
//!   `W[kh, kw] (c_out x c_in) @ X_pad[:, kh * (w+2) + kw ..]` (c_in x h * (w+2)), each a GEMM
//!   straight on a strided view of the padded image, accumulated in place; the two wrapped
//!   columns per row are then dropped. No im2col; 110-180 GFLOP/s on the same shapes (1.2-4x
//!   candle's; 2x on the VAE's 128-channel 256x256 layers).
//!   On x86-64 CPUs with AVX-512, the nine taps' sum is instead one register-tiled kernel
//!   (`conv_direct`: 8 channels x 48 columns in registers through all taps and channels)
//!   where at least 80% of its work is useful: 1.05-1.2x the GEMMs at 64-640 channels (the
//!   GEMMs pack and re-accumulate nine times). Its units write their sums, plus the
//!   additions, straight to the output (no image-sized buffer of sums: 300 MB at the VAE's
//!   768x768 layers). Its AVX2 + FMA version gives the same bits but lost to the GEMMs on a
//!   Zen 3 CPU (up to 1.4x slower), so AVX2 CPUs run the GEMMs. The padded planes (and the
//!   GEMMs' sums) are kept by the calling thread between calls (`Scratch`): fresh buffers
//!   cost a page fault per 4 KiB.
//! - **Winograd F(2x2, 3x3)** (`conv_winograd`, AVX-512 or AVX2; stride 1 on even maps, the
//!   UNet's and VAE's bulk): 2x2 output tiles from 4x4 input patches with 2.25x fewer multiply-adds, on
//!   the same padded planes. Its bands run over the batch's tiles, one image after another, so
//!   a guided step's small maps still fill its 48-tile groups. 1.4-1.9x the direct kernel or
//!   the GEMMs on the SD shapes from 8x8 maps (batch 2) to 256x256 (`conv_shift`) with
//!   AVX-512; with AVX2, from 16x16 maps up, 1.0-1.3x the GEMMs (a 1.16-1.27x VAE decode). Its
//!   weights (16/9 the size) are made the first time a layer runs it.
//! - **One GEMM over the batch** (maps of at most 16 pixels, the deepest UNet levels of small
//!   images): the batch's im2col columns side by side, so the GEMM is not starved of columns.
//! - **Stride 2** (the down-samplers): the padded image split into its four row/column phases,
//!   so each tap is again a shifted GEMM, on one phase (see `Planes`); 2-3.8x candle's.
//!
//! - **Additions and upsampling in the same passes** (`forward_add`, `forward_upsampled`): a
//!   ResNet block's time embedding and skip connection are added while the output is written,
//!   and a 2x nearest upsampling is done while the input is padded, saving a pass (and, for
//!   the upsampling, a 4x-size tensor) each; same bits as the separate ops.
//!
//! Each image's output depends on that image and the map size alone, never on the batch, so
//! batching jobs cannot change a result. An f32 CPU model holds its weights in the CPU paths'
//! layout (candle's copy is dropped), plus the Winograd kernel's for the layers that run it.
//! Other devices and dtypes use candle's kernel.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn as nn;

use crate::conv_direct::Isa;
use crate::cpu_gemm::{cpu_f32, gemm, gemm_row_bias, is_cpu_f32, View};

/// Feature maps of at most this many pixels take the one-GEMM path.
const ONE_GEMM_MAX_PIXELS: usize = 16;

#[derive(Debug, Clone)]
pub struct Conv3x3 {
    weights: Weights,
    c_in: usize,
    c_out: usize,
    /// 1 (with padding 1) or 2 (with padding 0 or 1).
    stride: usize,
    padding: usize,
    span: tracing::Span,
}

/// The weights, held once: in the CPU paths' layout when the model is f32 on the CPU (candle's
/// copy is dropped), else as candle's convolution.
#[derive(Debug, Clone)]
enum Weights {
    /// `weight`: [c_out, 9 * c_in], each row tap-major (tap = 3 * kh + kw, then the input
    /// channel), so tap t is the [c_out, c_in] matrix at column t * c_in (rows 9 * c_in apart)
    /// and the one-GEMM path's columns are (tap, channel) too; then zero rows up to a multiple
    /// of 8 (the direct kernel's blocks).
    CpuF32 {
        weight: Vec<f32>,
        bias: Option<Vec<f32>>,
        /// The Winograd kernel's weights (`conv_winograd::transform_weights`, 16/9 the size of
        /// `weight`), made the first time the layer runs on it: layers whose maps never suit
        /// it (the deepest levels of small images, the samplers) do not hold them.
        winograd: std::sync::OnceLock<Vec<f32>>,
    },
    Candle(nn::Conv2d),
}

impl Conv3x3 {
    /// Loads `weight` [c_out, c_in, 3, 3] and `bias` [c_out] from `vs`.
    pub fn new(in_channels: usize, out_channels: usize, vs: nn::VarBuilder) -> Result<Self> {
        let config = nn::Conv2dConfig { padding: 1, ..Default::default() };
        Self::from_conv(nn::conv2d(in_channels, out_channels, 3, config, vs)?)
    }

    /// Whether `conv` is one this type takes: 3x3, stride 1 with padding 1, or stride 2 (the
    /// samplers) with padding 0 or 1; no dilation, one group.
    pub fn supports(conv: &nn::Conv2d) -> bool {
        let c = conv.config();
        conv.weight().dims().get(2..) == Some(&[3, 3][..])
            && matches!((c.stride, c.padding), (1, 1) | (2, 0) | (2, 1))
            && c.dilation == 1
            && c.groups == 1
    }

    /// Wraps a loaded 3x3 convolution that [`Conv3x3::supports`].
    pub fn from_conv(conv: nn::Conv2d) -> Result<Self> {
        let (c_out, c_in, kh, kw) = conv.weight().dims4()?;
        let config = conv.config();
        let (stride, padding) = (config.stride, config.padding);
        if !Self::supports(&conv) {
            candle_core::bail!("Conv3x3: a {kh}x{kw} convolution with {config:?}");
        }
        let weights = if is_cpu_f32(conv.weight()) {
            // [c_out, c_in, kh, kw] -> [c_out, kh, kw, c_in]
            let mut weight = conv.weight().permute((0, 2, 3, 1))?.flatten_all()?.to_vec1::<f32>()?;
            // The direct kernel reads whole blocks of 8 output channels: zero rows complete the last.
            weight.resize(c_out.next_multiple_of(crate::conv_direct::ROWS) * 9 * c_in, 0.0);
            let bias = conv.bias().map(|b| b.to_vec1::<f32>()).transpose()?;
            Weights::CpuF32 { weight, bias, winograd: std::sync::OnceLock::new() }
        } else {
            Weights::Candle(conv)
        };
        let span = tracing::span!(tracing::Level::TRACE, "conv3x3");
        Ok(Self { weights, c_in, c_out, stride, padding, span })
    }

    /// The one-GEMM path: the batch's im2col columns [9 * c_in, b * h * w] (tap, channel)
    /// side by side, one product with `weight`, `bias` its starting value.
    fn one_gemm(&self, x: &Tensor, weight: &[f32], bias: Option<&[f32]>) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let (c_out, n) = (self.c_out, b * h * w);
        let padded = x.pad_with_zeros(D::Minus1, 1, 1)?.pad_with_zeros(D::Minus2, 1, 1)?;
        let mut taps = Vec::with_capacity(9);
        for kh in 0..3 {
            for kw in 0..3 {
                taps.push(padded.narrow(2, kh, h)?.narrow(3, kw, w)?);
            }
        }
        // [B, 9, C, H, W] -> [9, C, B, H, W] -> [9 * C, B * H * W]
        let columns = Tensor::stack(&taps, 1)?.permute((1, 2, 0, 3, 4))?.contiguous()?;
        let columns = cpu_f32(&columns)?;
        let mut out = vec![0f32; c_out * n];
        gemm_row_bias(&mut out, View::rows(weight, 9 * c), View::rows(&columns, n), (c_out, n, 9 * c), bias);
        Tensor::from_vec(out, (c_out, b, h, w), &Device::Cpu)?.permute((1, 0, 2, 3))?.contiguous()
    }

    /// The shifted-GEMM path; `upsample`: `x` is the half-size input, doubled (nearest) on the
    /// way into the padded planes.
    fn shifted(&self, x: &Tensor, upsample: bool, adds: Adds<'_>) -> Result<Tensor> {
        let (b, c_in, h, w) = x.dims4()?;
        let x = x.contiguous()?;
        let input = cpu_f32(&x)?;
        let planes = match upsample {
            true => Planes::upsampled((h, w)),
            false => Planes::new((h, w), self.stride, self.padding),
        };
        let (out_h, out_w) = (planes.out_h, planes.out_w);
        let kernel = Kernel::for_shape(&planes, self.c_out);
        // The tensors the output pass adds, checked against the output's shape.
        let per_channel = adds.per_channel.map(|t| t.contiguous()).transpose()?;
        let residual = adds.residual.map(|t| t.contiguous()).transpose()?;
        if let Some(t) = &per_channel {
            if t.dims() != [b, self.c_out] || t.dtype() != DType::F32 {
                candle_core::bail!(
                    "Conv3x3: a per-channel addition of {:?} {:?} to [{b}, {}]",
                    t.dtype(),
                    t.dims(),
                    self.c_out
                )
            }
        }
        if let Some(t) = &residual {
            if t.dims() != [b, self.c_out, out_h, out_w] || t.dtype() != DType::F32 {
                candle_core::bail!(
                    "Conv3x3: a residual of {:?} {:?} to [{b}, {}, {out_h}, {out_w}]",
                    t.dtype(),
                    t.dims(),
                    self.c_out
                )
            }
        }
        let per_channel = per_channel.as_ref().map(cpu_f32).transpose()?;
        let residual = residual.as_ref().map(cpu_f32).transpose()?;
        let epilogue = Epilogue { bias: adds.bias, per_channel: per_channel.as_deref(), residual: residual.as_deref() };
        let out = self.convolve(&input, (b, c_in, h, w), &planes, epilogue, kernel)?;
        Tensor::from_vec(out, (b, self.c_out, out_h, out_w), &Device::Cpu)
    }

    /// `input` (NCHW `dims`, contiguous) laid out as `planes` say, convolved on `kernel`, plus
    /// `epilogue`'s additions: [b, c_out, out_h, out_w]. The Winograd kernel's weights are made
    /// on its first use and kept.
    fn convolve(
        &self,
        input: &[f32],
        dims: (usize, usize, usize, usize),
        planes: &Planes,
        epilogue: Epilogue<'_>,
        kernel: Kernel,
    ) -> Result<Vec<f32>> {
        let Weights::CpuF32 { weight, winograd, .. } = &self.weights else {
            candle_core::bail!("Conv3x3: the CPU paths on candle's weights")
        };
        Ok(match kernel {
            Kernel::Taps(taps) => shifted_conv3x3(input, dims, planes, weight, self.c_out, epilogue, taps),
            Kernel::Winograd { rows, isa } => {
                let u = winograd.get_or_init(|| crate::conv_winograd::transform_weights(weight, dims.1, self.c_out));
                winograd_conv3x3(input, dims, planes, (u, self.c_out), epilogue, (rows, isa))
            }
        })
    }

    /// `conv(x) + per_channel + residual`, the additions done in the convolution's output
    /// pass on the CPU paths (a ResNet block's time embedding and skip connection: two passes
    /// over the activation saved). `per_channel`: [b, c_out], broadcast over the map;
    /// `residual`: the output's shape. The same values as the separate additions, in the same
    /// order.
    pub fn forward_add(&self, x: &Tensor, per_channel: Option<&Tensor>, residual: Option<&Tensor>) -> Result<Tensor> {
        self.run(x, false, per_channel, residual)
    }

    /// `conv(upsample_nearest2d(x, 2h, 2w))`, the upsampling done while the CPU path pads its
    /// input (no 4x-size intermediate tensor). Bitwise the same as the two steps.
    pub fn forward_upsampled(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, true, None, None)
    }

    fn run(
        &self,
        x: &Tensor,
        upsample: bool,
        per_channel: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let _enter = self.span.enter();
        let (_, c_in, h, w) = x.dims4()?;
        if c_in != self.c_in {
            candle_core::bail!("Conv3x3: input has {c_in} channels, the weights {}", self.c_in);
        }
        let (h, w) = if upsample { (2 * h, 2 * w) } else { (h, w) };
        if upsample && self.stride != 1 {
            candle_core::bail!("Conv3x3: upsampling into a stride-{} convolution", self.stride);
        }
        if h.min(w) + 2 * self.padding < 3 {
            // candle's kernel would underflow its output size.
            candle_core::bail!("Conv3x3: a {h}x{w} map with padding {} is smaller than the kernel", self.padding);
        }
        let upsampled = |x: &Tensor| if upsample { x.upsample_nearest2d(h, w) } else { Ok(x.clone()) };
        let out = match &self.weights {
            Weights::Candle(conv) => crate::cudnn::conv2d(conv, &upsampled(x)?)?,
            Weights::CpuF32 { .. } if !is_cpu_f32(x) => {
                candle_core::bail!("Conv3x3: f32 CPU weights, a {:?} input on {:?}", x.dtype(), x.device())
            }
            Weights::CpuF32 { weight, bias, .. } if self.stride == 1 && h * w <= ONE_GEMM_MAX_PIXELS => {
                self.one_gemm(&upsampled(x)?, weight, bias.as_deref())?
            }
            Weights::CpuF32 { bias, .. } => {
                return self.shifted(x, upsample, Adds { bias: bias.as_deref(), per_channel, residual })
            }
        };
        // The paths without an output pass of their own add as candle ops.
        let out = match per_channel {
            Some(t) => out.broadcast_add(&t.unsqueeze(D::Minus1)?.unsqueeze(D::Minus1)?)?,
            None => out,
        };
        match residual {
            Some(t) => out + t,
            None => Ok(out),
        }
    }
}

/// The bias and the tensors `Conv3x3::run` adds to its output.
struct Adds<'a> {
    bias: Option<&'a [f32]>,
    per_channel: Option<&'a Tensor>,
    residual: Option<&'a Tensor>,
}

impl Module for Conv3x3 {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, false, None, None)
    }
}

/// The accumulator a tile of output columns keeps in cache through the nine taps of the
/// shifted path (f32 elements, c_out x columns): 128 KiB, well inside a core's L2 (32, 64 and
/// 128 K elements measured within 5% of each other on the SD shapes, 64 K the slowest).
const TILE_ACC_ELEMENTS: usize = 32 * 1024;

/// The output columns per tile of the shifted path for `c_out` channels over a map's `columns`
/// (all of them when there would be fewer than two tiles per thread). It depends on the map's
/// shape alone, so batching cannot change an image's result.
fn column_tile(c_out: usize, columns: usize) -> usize {
    let tile = (TILE_ACC_ELEMENTS / c_out).max(64).next_multiple_of(16);
    if columns.div_ceil(tile) < 2 * crate::cpu_gemm::cpu_threads() {
        columns
    } else {
        tile
    }
}

/// How the shifted path lays an image out so that each of the nine taps is one GEMM on a
/// strided view: `channel` floats per input channel, tap t's input for output column j
/// (j = y * row + x, for x < out_w; the rest of each row is dropped) at `offsets[t] + j`.
///
/// - Stride 1 (padding 1): the zero-padded image, (h + 2) x (w + 2); tap (kh, kw) is the
///   image shifted by kh rows and kw columns.
/// - Stride 2: the zero-padded image split into its four phases (even/odd rows x even/odd
///   columns), each (out_h + 1) x (out_w + 1); tap (kh, kw) reads phase (kh % 2, kw % 2)
///   shifted by kh / 2 rows and kw / 2 columns. No im2col, no wasted columns but one per row.
#[derive(Debug, Clone, PartialEq)]
struct Planes {
    stride: usize,
    padding: usize,
    /// The input is the half-size image, each pixel written to a 2x2 block (nearest
    /// upsampling; stride 1 only).
    upsample: bool,
    out_h: usize,
    out_w: usize,
    row: usize,
    /// Floats per phase plane (the whole padded image at stride 1).
    plane: usize,
    channel: usize,
    offsets: [usize; 9],
}

impl Planes {
    /// For an h x w input (`h + 2 * padding >= 3`, likewise w).
    fn new((h, w): (usize, usize), stride: usize, padding: usize) -> Self {
        let (out_h, out_w) = ((h + 2 * padding - 3) / stride + 1, (w + 2 * padding - 3) / stride + 1);
        let row = out_w + 3 - stride; // 2 dropped columns at stride 1, 1 at stride 2
        let plane = (out_h + 3 - stride) * row;
        let phases = stride * stride;
        let offsets = std::array::from_fn(|tap| {
            let (kh, kw) = (tap / 3, tap % 3);
            (kh % stride * stride + kw % stride) * plane + kh / stride * row + kw / stride
        });
        Self { stride, padding, upsample: false, out_h, out_w, row, plane, channel: phases * plane, offsets }
    }

    /// Stride 1, padding 1 over the nearest 2x upsampling of an h x w input.
    fn upsampled((h, w): (usize, usize)) -> Self {
        Self { upsample: true, ..Self::new((2 * h, 2 * w), 1, 1) }
    }

    fn columns(&self) -> usize {
        self.out_h * self.row
    }

    /// Writes one channel's h x w input into its `channel` floats (zero where nothing lands).
    fn fill(&self, dst: &mut [f32], src: &[f32], w: usize) {
        let (stride, padding) = (self.stride, self.padding);
        if self.upsample {
            for (y, src) in src.chunks(w).enumerate() {
                let top = (2 * y + 1) * self.row + 1;
                for (pair, &v) in dst[top..][..2 * w].chunks_exact_mut(2).zip(src) {
                    pair.fill(v);
                }
                dst.copy_within(top..top + 2 * w, top + self.row);
            }
            return;
        }
        for (y, src) in src.chunks(w).enumerate() {
            let y = y + padding;
            let dst_row = (y % stride * stride) * self.plane + y / stride * self.row;
            if stride == 1 {
                dst[dst_row + padding..][..w].copy_from_slice(src);
                continue;
            }
            for (x, &v) in src.iter().enumerate() {
                let x = x + padding;
                dst[dst_row + x % 2 * self.plane + x / 2] = v;
            }
        }
    }
}

/// What the shifted path's output pass adds to each element, in this order (the reference's):
/// the bias [c_out], a value per image and channel [b, c_out], a residual [b, c_out, out_h,
/// out_w].
#[derive(Clone, Copy, Default)]
struct Epilogue<'a> {
    bias: Option<&'a [f32]>,
    per_channel: Option<&'a [f32]>,
    residual: Option<&'a [f32]>,
}

impl<'a> Epilogue<'a> {
    /// Output channel `o` of `image`'s additions, for `c_out` channels of `pixels` pixels: its
    /// bias, its per-image value, its residual plane.
    fn for_channel(
        &self,
        (image, o): (usize, usize),
        c_out: usize,
        pixels: usize,
    ) -> crate::conv_winograd::Additions<'a> {
        let channel = image * c_out + o;
        let residual = self.residual.map(|r| &r[channel * pixels..][..pixels]);
        (self.bias.map_or(0.0, |b| b[o]), self.per_channel.map(|p| p[channel]), residual)
    }
}

/// How a layer computes its convolution on the CPU (besides the one-GEMM path).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kernel {
    /// The sum over the nine taps on the padded planes ([`shifted_conv3x3`]).
    Taps(Taps),
    /// `conv_winograd`'s F(2x2, 3x3) (x86-64 with AVX-512 or AVX2, `isa`; stride 1, even
    /// maps), in bands of `rows` rows of 2x2 tiles (by default `conv_winograd::band_rows` for
    /// the batch; [`winograd_conv3x3`]).
    Winograd { rows: Option<usize>, isa: Isa },
}

/// How the shifted path computes the sum over the nine taps.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Taps {
    /// `conv_direct`'s register-tiled kernel (x86-64 with AVX-512 or AVX2, `isa`), `tile`
    /// output columns (a multiple of 48) per unit of work.
    Direct { tile: usize, isa: Isa },
    /// Nine GEMMs (one per tap) accumulated in place, `tile` output columns at a time: large
    /// maps are cut into tiles, each run through all nine taps by one thread while its
    /// accumulator sits in L2 (a whole-map accumulator, 34 MB for the VAE's 128-channel
    /// 256x256 layers, would stream through memory nine times). With one tile (small maps),
    /// each tap is one multi-threaded GEMM over the whole map.
    Gemms { tile: usize },
}

/// The least share of useful work at which a layer runs the Winograd kernel (it pads each
/// band to whole groups of 48 tiles, and the output channels to blocks of 8). It does 2.25x
/// fewer multiply-adds than the direct kernel, so it is ahead at 67% (an 8x8 map, two
/// images: 2-core EPYC, `conv_shift`, 1280 channels 23.4-24.7 -> 14.5-15.0 ms on the GEMMs).
/// A 4-channel output (50%) stays on the direct kernel.
const WINOGRAD_MIN_USEFUL: f64 = 0.6;

/// The same on AVX2, where the product kernel runs at a smaller share of the core's peak: on
/// an 8x8 map (67% useful) it lost to the GEMMs at 320-1280 channels (2-core EPYC Zen 3,
/// `conv_shift`, best of three: 1280 channels 45.8 against 39.8 ms), and won from 16x16 (100%;
/// 1280 channels 81.5 against 126.2 ms).
const WINOGRAD_MIN_USEFUL_AVX2: f64 = 0.8;

/// The batch on which `Kernel::for_shape` judges the Winograd kernel's useful share: its bands
/// run over the batch's tiles, one image after another, so a guided UNet step (two images, or
/// more when jobs are batched) fills the 48-tile groups that one small map leaves a third
/// full. A single image of an 8x8 map (an unguided job alone) then runs it at a third useful
/// work: slower than the GEMMs (1280 channels 11.8 -> 14.3 ms), the same results.
const WINOGRAD_JUDGED_IMAGES: usize = 2;

impl Kernel {
    /// Where the CPU has AVX-512 or AVX2: the Winograd kernel for stride-1 even maps where at
    /// least `WINOGRAD_MIN_USEFUL` (AVX2: `WINOGRAD_MIN_USEFUL_AVX2`) of its work is useful;
    /// else, on AVX-512, the direct kernel where at least 80% of the work it would do is useful:
    /// it computes whole blocks of 8 channels and 48 columns, so a map of 8x8 (96 columns
    /// computed for 64 pixels) or a 4-channel output runs faster as GEMMs. (2-core EPYC Zen 4,
    /// `conv_shift`: 1280 channels at 8x8, 158 GFLOP/s as GEMMs, 141 direct; at 16x16, 173 and
    /// 194.) On AVX2 the direct kernel's nine taps lost to the GEMMs on most SD shapes (Zen 3,
    /// best of three: 128 channels at 256x256 217 against 152 ms; stride 2, 320 channels at
    /// 64x64, 43 against 36), so the rest runs as GEMMs there. The choice depends on the map's
    /// shape, the channels and the CPU alone, never the batch.
    fn for_shape(planes: &Planes, c_out: usize) -> Self {
        use crate::conv_direct::{available, COLUMNS, ROWS};
        let even = planes.out_h.is_multiple_of(2) && planes.out_w.is_multiple_of(2);
        if let Some(isa) = crate::conv_winograd::available().filter(|_| planes.stride == 1 && even) {
            // Judged on two images, a guided UNet step's batch (never on the actual batch).
            let (tiles_x, tiles_y) = (planes.out_w / 2, WINOGRAD_JUDGED_IMAGES * planes.out_h / 2);
            let rows = crate::conv_winograd::band_rows(tiles_x, tiles_y, crate::conv_winograd::MAX_BAND_TILES);
            let channels = c_out as f64 / c_out.next_multiple_of(crate::conv_winograd::ROWS) as f64;
            let least = match isa {
                Isa::Avx512 => WINOGRAD_MIN_USEFUL,
                Isa::Avx2 => WINOGRAD_MIN_USEFUL_AVX2,
            };
            if crate::conv_winograd::useful_share(tiles_x, tiles_y, rows) * channels >= least {
                return Kernel::Winograd { rows: None, isa };
            }
        }
        let computed = planes.columns().next_multiple_of(COLUMNS) * c_out.next_multiple_of(ROWS);
        match available() {
            Some(isa @ Isa::Avx512) if 5 * planes.out_h * planes.out_w * c_out >= 4 * computed => {
                Kernel::Taps(Taps::Direct { tile: DIRECT_TILE, isa })
            }
            _ => Kernel::Taps(Taps::Gemms { tile: column_tile(c_out, planes.columns()) }),
        }
    }
}

/// Output columns per unit of work of the direct kernel (four kernel calls; a unit is these
/// columns for 8 channels): a unit's input columns, for all input channels, stay in L2 while
/// it runs (363 KB at 128 channels of a 256-wide map), and the VAE's largest layers still
/// split into thousands of units. The kernel's results do not depend on the tiling.
const DIRECT_TILE: usize = 4 * crate::conv_direct::COLUMNS;

/// The shifted 3x3 convolution of `input` (NCHW `dims`, contiguous) laid out as `planes`
/// say, with `weight` ([c_out, 9 * c_in], tap-major rows, zero rows up to a multiple of 8),
/// plus `epilogue`'s additions: [b, c_out, out_h, out_w].
///
/// The direct kernel's units (a tile of columns, 8 channels) each own a run of output pixels
/// in each of their channels (the valid columns of a tile land on one contiguous run of a
/// channel's pixels): a unit's sums go from a small buffer straight to the output with the
/// additions, while still in cache. The GEMMs' tiles are summed into one buffer for the image
/// first, then written out.
fn shifted_conv3x3(
    input: &[f32],
    (b, c_in, h, w): (usize, usize, usize, usize),
    planes: &Planes,
    weight: &[f32],
    c_out: usize,
    epilogue: Epilogue<'_>,
    kernel: Taps,
) -> Vec<f32> {
    use crate::conv_direct::{COLUMNS, ROWS};
    use rayon::prelude::*;
    let (out_h, out_w, row, channel) = (planes.out_h, planes.out_w, planes.row, planes.channel);
    let pixels = out_h * out_w;
    let columns = planes.columns();
    // The direct kernel computes whole 48-column groups (the extra ones are dropped with the
    // wrapped columns) and blocks of 8 channels.
    let computed = match kernel {
        Taps::Direct { .. } => columns.next_multiple_of(COLUMNS),
        Taps::Gemms { .. } => columns,
    };
    let acc_len = match kernel {
        Taps::Direct { .. } => 0,
        Taps::Gemms { tile } => columns.div_ceil(tile) * c_out * tile,
    };
    // The last tap's view of the last channel reads past the planes (into columns that are
    // dropped): 2 elements for the GEMMs, up to the rounded-up column count for the direct
    // kernel.
    let reach = planes.offsets.iter().max().copied().unwrap_or(0);
    let padded_len = (c_in * channel + 2).max((c_in.max(1) - 1) * channel + reach + computed);
    let mut scratch = Scratch::take();
    let (padded, acc) = scratch.buffers(padded_len, (planes, c_in), acc_len);
    // The pixel a column of the padded grid lands on, or the next one if it is dropped.
    let pixel_at = |column: usize| (column / row) * out_w + (column % row).min(out_w);
    let mut out = vec![0f32; b * c_out * pixels];
    for (image, out) in out.chunks_mut(c_out * pixels).enumerate() {
        let input = &input[image * c_in * h * w..][..c_in * h * w];
        padded[..c_in * channel]
            .par_chunks_mut(channel)
            .zip(input.par_chunks(h * w))
            .for_each(|(dst, src)| planes.fill(dst, src, w));
        let additions = |o: usize| epilogue.for_channel((image, o), c_out, pixels);
        match kernel {
            Taps::Direct { tile, isa } => {
                let tile = tile.min(computed);
                let (tiles, groups) = (computed.div_ceil(tile), c_out.div_ceil(ROWS));
                // Each tile's run of pixels in each channel plane, by unit (tile, block of 8
                // channels).
                let bounds: Vec<usize> = (0..=tiles).map(|t| pixel_at((t * tile).min(columns))).collect();
                let mut units: Vec<Vec<&mut [f32]>> = (0..tiles * groups).map(|_| Vec::with_capacity(ROWS)).collect();
                for (o, plane) in out.chunks_mut(pixels).enumerate() {
                    let mut rest = plane;
                    for t in 0..tiles {
                        let (run, tail) = std::mem::take(&mut rest).split_at_mut(bounds[t + 1] - bounds[t]);
                        units[t * groups + o / ROWS].push(run);
                        rest = tail;
                    }
                }
                units.into_par_iter().enumerate().for_each(|(unit, mut runs)| {
                    let (t, group) = (unit / groups, unit % groups);
                    let first = t * tile;
                    let width = tile.min(computed - first);
                    // A last, partial block reads the zero rows that complete the weights.
                    let rows = &weight[group * ROWS * 9 * c_in..];
                    let mut sums = vec![0f32; ROWS * width];
                    let input = &padded[first..];
                    crate::conv_direct::block(
                        isa,
                        (&mut sums, width),
                        width,
                        (rows, 9 * c_in),
                        input,
                        channel,
                        &planes.offsets,
                        c_in,
                    );
                    let end = (first + width).min(columns);
                    for (r, (sums, run)) in sums.chunks(width).zip(runs.iter_mut()).enumerate() {
                        let (bias, per_channel, residual) = additions(group * ROWS + r);
                        let residual = residual.map(|r| &r[bounds[t]..bounds[t + 1]]);
                        write_valid_columns(run, sums, (first, end), planes, (bias, per_channel, residual));
                    }
                });
            }
            Taps::Gemms { tile } => {
                let tiles = columns.div_ceil(tile);
                let run_tile = |(t, acc): (usize, &mut [f32]), parallel: bool| {
                    let first = t * tile;
                    let width = tile.min(columns - first);
                    for (tap, &offset) in planes.offsets.iter().enumerate() {
                        gemm(
                            (acc, tile),
                            View::rows(&weight[tap * c_in..], 9 * c_in),
                            View::rows(&padded[offset + first..], channel),
                            (c_out, width, c_in),
                            1.0,
                            tap > 0,
                            parallel,
                        );
                    }
                };
                if tiles == 1 {
                    run_tile((0, &mut acc[..]), true);
                } else {
                    acc.par_chunks_mut(c_out * tile).enumerate().for_each(|tile_acc| run_tile(tile_acc, false));
                }
                // Tile t holds columns t * tile .. as a [c_out, tile] matrix.
                let acc = &acc[..];
                out.par_chunks_mut(pixels).enumerate().for_each(|(o, out)| {
                    let (bias, per_channel, residual) = additions(o);
                    for t in 0..tiles {
                        let (first, end) = (t * tile, ((t + 1) * tile).min(columns));
                        let (from, to) = (pixel_at(first), pixel_at(end));
                        let sums = &acc[(t * c_out + o) * tile..][..end - first];
                        let residual = residual.map(|r| &r[from..to]);
                        write_valid_columns(
                            &mut out[from..to],
                            sums,
                            (first, end),
                            planes,
                            (bias, per_channel, residual),
                        );
                    }
                });
            }
        }
    }
    scratch.give_back();
    out
}

/// The Winograd kernel's convolution (stride 1, even maps; inputs and output as
/// [`shifted_conv3x3`] takes and gives them): all images padded at once,
/// then bands of `rows` tile rows (`None`: `conv_winograd::band_rows`) over the batch's tile
/// rows, one image after another. A band with few tiles is also split by output channels,
/// so that every thread has work. Each tile's result is the same in any band and split.
fn winograd_conv3x3(
    input: &[f32],
    (b, c_in, h, w): (usize, usize, usize, usize),
    planes: &Planes,
    (winograd, c_out): (&[f32], usize),
    epilogue: Epilogue<'_>,
    (rows, isa): (Option<usize>, Isa),
) -> Vec<f32> {
    use crate::conv_winograd::{band, band_rows, max_band_tiles, Segment, ROWS};
    use rayon::prelude::*;
    let (out_h, out_w, channel) = (planes.out_h, planes.out_w, planes.channel);
    let pixels = out_h * out_w;
    let (tiles_x, tiles_y) = (out_w / 2, out_h / 2);
    let all_rows = b * tiles_y;
    let rows = rows.unwrap_or_else(|| band_rows(tiles_x, all_rows, max_band_tiles(c_in))).max(1);
    let bands = all_rows.div_ceil(rows);
    // Channel splits (whole blocks of 8) so that there are at least two units per thread.
    let blocks = c_out.div_ceil(ROWS);
    let splits = (2 * crate::cpu_gemm::cpu_threads()).div_ceil(bands.max(1)).clamp(1, blocks.max(1));
    let split_channels = blocks.div_ceil(splits) * ROWS;
    let splits = c_out.div_ceil(split_channels).max(1);
    let image_len = c_in * channel;
    let mut scratch = Scratch::take();
    let (padded, _) = scratch.buffers(b * image_len, (planes, c_in), 0);
    padded.par_chunks_mut(channel).zip(input.par_chunks(h * w)).for_each(|(dst, src)| planes.fill(dst, src, w));
    let padded = &padded[..];
    let mut out = vec![0f32; b * c_out * pixels];
    // Unit (band k, split j): the segments of band k, with the runs of split j's channels.
    let mut units: Vec<Vec<Segment>> = (0..bands * splits).map(|_| Vec::new()).collect();
    for (image, out) in out.chunks_mut(c_out * pixels).enumerate() {
        let (first, last) = (image * tiles_y, (image + 1) * tiles_y);
        let in_image = first / rows..last.div_ceil(rows);
        let padded = &padded[image * image_len..][..image_len];
        for k in in_image.clone() {
            let tile_rows = ((k * rows).max(first) - first, ((k + 1) * rows).min(last) - first);
            for j in 0..splits {
                let runs = Vec::with_capacity(split_channels);
                units[k * splits + j].push(Segment { image, padded, tile_rows, runs });
            }
        }
        for (o, plane) in out.chunks_mut(pixels).enumerate() {
            let mut rest = plane;
            for k in in_image.clone() {
                let segment = units[k * splits + o / split_channels].last_mut().expect("the image's segment");
                let (ty0, ty1) = segment.tile_rows;
                let (run, tail) = std::mem::take(&mut rest).split_at_mut(2 * (ty1 - ty0) * out_w);
                segment.runs.push(run);
                rest = tail;
            }
        }
    }
    let additions = |image: usize, o: usize| epilogue.for_channel((image, o), c_out, pixels);
    units.into_par_iter().enumerate().for_each(|(unit, mut segments)| {
        let first = unit % splits * split_channels;
        band(isa, &mut segments, first, (channel, planes.row), tiles_x, (winograd, c_in, c_out), additions);
    });
    scratch.give_back();
    out
}

/// Writes one channel's sums for the padded-grid columns `first..end` (`sums[0]` is column
/// `first`) to the pixels they land on (`dst`, and `residual`, start at column `first`'s
/// pixel), dropping the wrapped columns and adding the bias, the per-channel value and the
/// residual in the reference's order.
fn write_valid_columns(
    dst: &mut [f32],
    sums: &[f32],
    (first, end): (usize, usize),
    planes: &Planes,
    (bias, per_channel, residual): (f32, Option<f32>, Option<&[f32]>),
) {
    let (row, out_w) = (planes.row, planes.out_w);
    let (mut column, mut done) = (first, 0);
    while column < end {
        let x = column % row;
        let len = out_w.saturating_sub(x).min(end - column);
        if len > 0 {
            let src = &sums[column - first..][..len];
            let dst = &mut dst[done..done + len];
            for (d, s) in dst.iter_mut().zip(src) {
                *d = s + bias;
            }
            if let Some(p) = per_channel {
                dst.iter_mut().for_each(|d| *d += p);
            }
            if let Some(r) = residual {
                dst.iter_mut().zip(&r[done..]).for_each(|(d, r)| *d += r);
            }
            done += len;
        }
        // On to the next row's first column.
        column += row - x;
    }
}

/// The shifted path's large buffers (the padded input planes, and the GEMMs' sums), kept by
/// each thread between calls: fresh ones every call cost a page fault per 4 KiB (the VAE's
/// 128-channel 256x256 layers allocated 67 MB a call; on this VM the faults took about as long
/// as the arithmetic's last 15%). Buffers over `SCRATCH_KEPT_BYTES` are freed after the call.
#[derive(Default)]
struct Scratch {
    padded: Vec<f32>,
    /// The layout whose zero padding `padded` holds: the same layout only rewrites the pixels.
    padded_for: Option<(Planes, usize)>,
    acc: Vec<f32>,
}

/// The most bytes a thread keeps in each scratch buffer between calls.
const SCRATCH_KEPT_BYTES: usize = 128 << 20;

thread_local! {
    static SCRATCH: std::cell::Cell<Scratch> = std::cell::Cell::new(Scratch::default());
}

impl Scratch {
    fn take() -> Self {
        SCRATCH.with(|s| s.take())
    }

    fn give_back(mut self) {
        for buffer in [&mut self.padded, &mut self.acc] {
            if buffer.capacity() * 4 > SCRATCH_KEPT_BYTES {
                *buffer = Vec::new();
            }
        }
        SCRATCH.with(|s| s.set(self));
    }

    /// The padded planes, `padded_len` floats, zero wherever `fill` does not write for
    /// `layout` (planes, input channels); and `acc_len` floats of any value for the sums (the
    /// kernels overwrite them).
    fn buffers(
        &mut self,
        padded_len: usize,
        (planes, c_in): (&Planes, usize),
        acc_len: usize,
    ) -> (&mut [f32], &mut [f32]) {
        let layout = Some((planes.clone(), c_in));
        if self.padded_for != layout || self.padded.len() != padded_len {
            self.padded.clear();
            self.padded.resize(padded_len, 0.0);
            self.padded_for = layout;
        }
        if self.acc.len() < acc_len {
            self.acc.resize(acc_len, 0.0);
        }
        (&mut self.padded, &mut self.acc[..acc_len])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{max_abs, max_diff, randn};

    /// Ours and candle's convolution, with the same random weights.
    fn conv(c_in: usize, c_out: usize, bias: bool) -> (Conv3x3, nn::Conv2d) {
        let w = (randn(1, &[c_out, c_in, 3, 3]) * 0.2).unwrap();
        let b = bias.then(|| (randn(2, &[c_out]) * 0.2).unwrap());
        let candle = nn::Conv2d::new(w, b, nn::Conv2dConfig { padding: 1, ..Default::default() });
        (Conv3x3::from_conv(candle.clone()).unwrap(), candle)
    }

    /// `conv` of `x` on the shifted GEMMs laid out as `planes`, `tile` output columns at a time.
    fn shifted_with_tile(conv: &Conv3x3, x: &Tensor, planes: &Planes, tile: usize) -> Tensor {
        shifted_with(conv, x, planes, Kernel::Taps(Taps::Gemms { tile }))
    }

    /// `conv` of `x` laid out as `planes`, on `kernel`.
    fn shifted_with(conv: &Conv3x3, x: &Tensor, planes: &Planes, kernel: Kernel) -> Tensor {
        added_with(conv, x, planes, kernel, (None, None))
    }

    /// `conv` of `x` laid out as `planes`, plus a per-channel value and a residual, on `kernel`.
    fn added_with(
        conv: &Conv3x3,
        x: &Tensor,
        planes: &Planes,
        kernel: Kernel,
        (per_channel, residual): (Option<&[f32]>, Option<&[f32]>),
    ) -> Tensor {
        let Weights::CpuF32 { bias, .. } = &conv.weights else { panic!("an f32 CPU convolution keeps candle's") };
        let input = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let epilogue = Epilogue { bias: bias.as_deref(), per_channel, residual };
        let out = conv.convolve(&input, x.dims4().unwrap(), planes, epilogue, kernel).unwrap();
        let b = x.dim(0).unwrap();
        Tensor::from_vec(out, (b, conv.c_out, planes.out_h, planes.out_w), &Device::Cpu).unwrap()
    }

    /// Both CPU paths give candle's convolution up to f32 rounding, at every map shape
    /// (including 1-pixel-wide maps and odd sizes) and with or without bias. The two sum the
    /// 9 x c_in products in different orders, so the bound is relative to the output's scale
    /// (a wrong tap or offset would be off by the order of the scale itself).
    #[test]
    fn cpu_paths_match_candles_convolution() {
        for (seed, (c_in, c_out, bias)) in [(24, 40, true), (5, 3, false), (1, 7, true)].into_iter().enumerate() {
            let (conv, candle) = conv(c_in, c_out, bias);
            for (b, h, w) in [(1, 4, 4), (3, 2, 2), (2, 1, 3), (5, 4, 2), (1, 5, 4), (2, 7, 1), (3, 9, 13), (1, 32, 32)]
            {
                let x = randn(10 + seed as u64, &[b, c_in, h, w]);
                let expected = candle.forward(&x).unwrap();
                let actual = conv.forward(&x).unwrap();
                assert_eq!(actual.dims(), expected.dims());
                let diff = max_diff(&actual, &expected);
                let scale = max_abs(&expected).max(1.0);
                assert!(diff <= 1e-5 * scale, "{c_in}->{c_out} {b}x{h}x{w}: {diff:e} at scale {scale}");
            }
        }
    }

    /// The shifted path gives the same result whatever the tiling of its output columns: tiles
    /// that cut rows anywhere, a short last tile, one tile per row, one tile for all.
    #[test]
    fn tiling_the_shifted_path_keeps_the_result() {
        let (conv, candle) = conv(24, 40, true);
        let (b, h, w) = (2, 9, 13);
        let x = randn(7, &[b, 24, h, w]);
        let expected = candle.forward(&x).unwrap();
        let scale = max_abs(&expected).max(1.0);
        let planes = Planes::new((h, w), 1, 1);
        for tile in [16, 37, w + 2, 64, h * (w + 2)] {
            let out = shifted_with_tile(&conv, &x, &planes, tile);
            let diff = max_diff(&out, &expected);
            assert!(diff <= 1e-5 * scale, "tile {tile}: {diff:e} at scale {scale}");
        }
    }

    /// A kernel is on exactly where the CPU has AVX2 and FMA, unless its `switch` is set, and
    /// on AVX-512 where the CPU has it, unless SDMESH_CONV_AVX512 is 0.
    fn assert_on_where_the_cpu_allows(available: Option<Isa>, switch: &str) {
        #[cfg(target_arch = "x86_64")]
        if std::env::var(switch).is_err() {
            use std::arch::is_x86_feature_detected as has;
            let avx512_switch = crate::switched_on(&std::sync::OnceLock::new(), "SDMESH_CONV_AVX512");
            let expected = if has!("avx512f") && avx512_switch {
                Some(Isa::Avx512)
            } else {
                (has!("avx2") && has!("fma")).then_some(Isa::Avx2)
            };
            assert_eq!(available, expected, "{switch}");
        }
        #[cfg(not(target_arch = "x86_64"))]
        assert_eq!(available, None, "{switch}");
    }

    /// The Winograd convolution of `x` (stride 1, padding 1, even map) by its definition, one
    /// tile and output channel at a time, in the order of operations the kernels promise: the
    /// input patch transformed down its columns then along its rows, each of the 16 products a
    /// chain of fused multiply-adds over the input channels in order, the output transform, then
    /// the bias, per-channel value and residual added.
    fn winograd_by_definition(conv: &Conv3x3, x: &Tensor, (per_channel, residual): (&[f32], &[f32])) -> Tensor {
        use std::array::from_fn;
        let Weights::CpuF32 { weight, bias, .. } = &conv.weights else { panic!("an f32 CPU convolution") };
        let (b, c_in, h, w) = x.dims4().unwrap();
        let (c_out, rows) = (conv.c_out, crate::conv_winograd::ROWS);
        let u = crate::conv_winograd::transform_weights(weight, c_in, c_out);
        let input = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut out = vec![0f32; b * c_out * h * w];
        for (image, ty, tx) in (0..b).flat_map(|i| (0..h / 2).flat_map(move |ty| (0..w / 2).map(move |tx| (i, ty, tx))))
        {
            let v: Vec<[f32; 16]> = (0..c_in)
                .map(|ci| {
                    // Pixel (2 ty + i - 1, 2 tx + j - 1) of the zero-padded image.
                    let d = |i: usize, j: usize| {
                        let (y, x) = ((2 * ty + i).wrapping_sub(1), (2 * tx + j).wrapping_sub(1));
                        if y < h && x < w {
                            input[((image * c_in + ci) * h + y) * w + x]
                        } else {
                            0.0
                        }
                    };
                    let column: [[f32; 4]; 4] = from_fn(|j| {
                        let (r0, r1, r2, r3) = (d(0, j), d(1, j), d(2, j), d(3, j));
                        [r0 - r2, r1 + r2, r2 - r1, r1 - r3]
                    });
                    let mut v = [0f32; 16];
                    for i in 0..4 {
                        let (d0, d1, d2, d3) = (column[0][i], column[1][i], column[2][i], column[3][i]);
                        v[4 * i..4 * i + 4].copy_from_slice(&[d0 - d2, d1 + d2, d2 - d1, d1 - d3]);
                    }
                    v
                })
                .collect();
            for o in 0..c_out {
                let u = |xi: usize, ci: usize| u[(((o / rows) * 16 + xi) * rows + o % rows) * c_in + ci];
                let m: [f32; 16] = from_fn(|xi| (0..c_in).fold(0f32, |sum, ci| u(xi, ci).mul_add(v[ci][xi], sum)));
                for dy in 0..2 {
                    let s: [f32; 4] =
                        from_fn(|j| if dy == 0 { m[j] + m[4 + j] + m[8 + j] } else { m[4 + j] - m[8 + j] - m[12 + j] });
                    for (dx, value) in [s[0] + s[1] + s[2], s[1] - s[2] - s[3]].into_iter().enumerate() {
                        let at = ((image * c_out + o) * h + 2 * ty + dy) * w + 2 * tx + dx;
                        let bias = bias.as_ref().map_or(0.0, |bias| bias[o]);
                        out[at] = value + bias + per_channel[image * c_out + o] + residual[at];
                    }
                }
            }
        }
        Tensor::from_vec(out, (b, c_out, h, w), &Device::Cpu).unwrap()
    }

    /// On every instruction set the CPU has (AVX-512 and AVX2 on an AVX-512 CPU), the Winograd
    /// kernel gives the bits of its definition, and the direct kernel the same bits on each
    /// (its own definition is checked in `conv_direct`), with the bias, per-channel values and
    /// residual added, at tile rows shorter than a vector of either width, a vector and a
    /// tail, and several: a layer gives the same bits on AVX-512 and AVX2 CPUs wherever both
    /// pick the same kernel.
    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        let isas = crate::conv_direct::isas_here();
        for (c_in, c_out) in [(24, 40), (70, 13)] {
            let (conv, _) = conv(c_in, c_out, true);
            for (b, h, w) in [(2, 10, 12), (1, 6, 40), (1, 34, 70), (2, 2, 2)] {
                let x = randn(60, &[b, c_in, h, w]);
                let per_channel = randn(61, &[b * c_out]).to_vec1::<f32>().unwrap();
                let residual = randn(62, &[b * c_out * h * w]).to_vec1::<f32>().unwrap();
                let adds = (Some(&per_channel[..]), Some(&residual[..]));
                let planes = Planes::new((h, w), 1, 1);
                let by_definition = winograd_by_definition(&conv, &x, (&per_channel, &residual));
                let direct =
                    |isa| added_with(&conv, &x, &planes, Kernel::Taps(Taps::Direct { tile: DIRECT_TILE, isa }), adds);
                for &isa in &isas {
                    let case = format!("{c_in}->{c_out} {b}x{h}x{w} on {isa:?}");
                    let winograd = added_with(&conv, &x, &planes, Kernel::Winograd { rows: None, isa }, adds);
                    assert_eq!(max_diff(&winograd, &by_definition), 0.0, "{case}: Winograd");
                    assert_eq!(max_diff(&direct(isa), &direct(isas[0])), 0.0, "{case}: direct");
                }
            }
        }
    }

    /// Where the CPU has AVX-512 or AVX2, the direct kernel gives candle's convolution up to
    /// f32 rounding at stride 1 and 2, with channel counts off its 8-row blocks and maps off its
    /// 48-column groups, and the same bits at any tiling of its work (one chain of
    /// multiply-adds per element); the layers run it where `Kernel::for_shape` says, and the
    /// shifted GEMMs elsewhere (and on CPUs without either).
    #[test]
    fn the_direct_kernel_matches_candle_at_any_tiling() {
        let available = crate::conv_direct::available();
        assert_on_where_the_cpu_allows(available, "SDMESH_CONV_DIRECT");
        let mut layers_on_direct = 0;
        for (c_in, c_out, stride, padding) in [(24, 40, 1, 1), (5, 3, 1, 1), (17, 13, 2, 1), (9, 8, 2, 0)] {
            let (conv, candle) = conv_with(c_in, c_out, stride, padding);
            for (b, h, w) in [(2, 9, 13), (1, 5, 4), (1, 40, 33), (2, 3, 70)] {
                let x = randn(40, &[b, c_in, h, w]);
                let expected = candle.forward(&x).unwrap();
                let scale = max_abs(&expected).max(1.0);
                let actual = conv.forward(&x).unwrap();
                let case = format!("{c_in}->{c_out} stride {stride} {b}x{h}x{w}");
                let planes = Planes::new((h, w), stride, padding);
                let chosen = Kernel::for_shape(&planes, c_out);
                let on_chosen = shifted_with(&conv, &x, &planes, chosen);
                assert_eq!(max_diff(&actual, &on_chosen), 0.0, "{case}: the layer runs {chosen:?}");
                let Some(isa) = available else {
                    assert!(matches!(chosen, Kernel::Taps(Taps::Gemms { .. })), "{case}");
                    continue;
                };
                layers_on_direct += matches!(chosen, Kernel::Taps(Taps::Direct { .. })) as usize;
                let direct = shifted_with(&conv, &x, &planes, Kernel::Taps(Taps::Direct { tile: DIRECT_TILE, isa }));
                let diff = max_diff(&direct, &expected);
                assert!(diff <= 1e-5 * scale, "{case}: {diff:e} at scale {scale}");
                for tile in [48, 96, 480] {
                    let tiled = shifted_with(&conv, &x, &planes, Kernel::Taps(Taps::Direct { tile, isa }));
                    assert_eq!(max_diff(&tiled, &direct), 0.0, "{case}, tile {tile}");
                }
            }
        }
        // On AVX2 the layers run the GEMMs instead (see `Kernel::for_shape`).
        match available {
            Some(Isa::Avx512) => assert!(layers_on_direct >= 4, "only {layers_on_direct} cases ran the direct kernel"),
            _ => assert_eq!(layers_on_direct, 0, "the direct kernel chosen on {available:?}"),
        }
    }

    /// Where the CPU has AVX-512 or AVX2, the Winograd kernel gives candle's convolution up to
    /// f32 rounding on even maps (tile rows shorter than its vectors of 16 tiles, or 8 on AVX2,
    /// a vector and a tail, several vectors; channel counts off its 8-channel blocks and 64-channel chunks), and the
    /// same bits in any bands; the layers run it where `Kernel::for_shape` says.
    #[test]
    fn the_winograd_kernel_matches_candle_in_any_bands() {
        let available = crate::conv_winograd::available();
        assert_on_where_the_cpu_allows(available, "SDMESH_CONV_WINOGRAD");
        let mut layers_on_winograd = 0;
        for (c_in, c_out) in [(24, 40), (5, 3), (70, 130)] {
            let (conv, candle) = conv_with(c_in, c_out, 1, 1);
            for (b, h, w) in [(2, 10, 12), (1, 6, 40), (1, 34, 70), (2, 2, 2), (2, 16, 24)] {
                let x = randn(50, &[b, c_in, h, w]);
                let expected = candle.forward(&x).unwrap();
                let scale = max_abs(&expected).max(1.0);
                let actual = conv.forward(&x).unwrap();
                let case = format!("{c_in}->{c_out} {b}x{h}x{w}");
                let planes = Planes::new((h, w), 1, 1);
                let chosen = Kernel::for_shape(&planes, c_out);
                if h * w > ONE_GEMM_MAX_PIXELS {
                    let on_chosen = shifted_with(&conv, &x, &planes, chosen);
                    assert_eq!(max_diff(&actual, &on_chosen), 0.0, "{case}: the layer runs {chosen:?}");
                }
                let Some(isa) = available else {
                    assert!(!matches!(chosen, Kernel::Winograd { .. }), "{case}");
                    continue;
                };
                layers_on_winograd += matches!(chosen, Kernel::Winograd { .. }) as usize;
                let winograd = shifted_with(&conv, &x, &planes, Kernel::Winograd { rows: Some(1), isa });
                let diff = max_diff(&winograd, &expected);
                assert!(diff <= 1e-5 * scale, "{case}: {diff:e} at scale {scale}");
                for rows in [2, 3, h / 2, b * h / 2] {
                    let banded = shifted_with(&conv, &x, &planes, Kernel::Winograd { rows: Some(rows), isa });
                    assert_eq!(max_diff(&banded, &winograd), 0.0, "{case}, {rows} rows");
                }
            }
        }
        assert!(
            available.is_none() || layers_on_winograd >= 4,
            "only {layers_on_winograd} cases ran the Winograd kernel"
        );
    }

    /// An image's output is the same bits alone or in any batch, on either path.
    #[test]
    fn an_images_output_does_not_depend_on_its_batch() {
        let (conv, _) = conv(16, 8, true);
        for (h, w) in [(4, 4), (12, 10)] {
            let batch = randn(3, &[4, 16, h, w]);
            let together = conv.forward(&batch).unwrap();
            for i in 0..4 {
                let alone = conv.forward(&batch.narrow(0, i, 1).unwrap()).unwrap();
                assert_eq!(max_diff(&alone, &together.narrow(0, i, 1).unwrap()), 0.0, "{h}x{w} image {i}");
            }
        }
    }

    fn conv_with(c_in: usize, c_out: usize, stride: usize, padding: usize) -> (Conv3x3, nn::Conv2d) {
        let w = (randn(8, &[c_out, c_in, 3, 3]) * 0.2).unwrap();
        let b = (randn(9, &[c_out]) * 0.2).unwrap();
        let config = nn::Conv2dConfig { stride, padding, ..Default::default() };
        let candle = nn::Conv2d::new(w, Some(b), config);
        (Conv3x3::from_conv(candle.clone()).unwrap(), candle)
    }

    /// Stride 2 (the samplers), with padding 1 (UNet) and 0 (VAE, after its own right/bottom
    /// pad): candle's convolution up to f32 rounding at even, odd, square and thin maps, tiled
    /// or not; each image's output is the same bits alone or in a batch; maps smaller than the
    /// kernel are an error.
    #[test]
    fn stride_two_matches_candles_convolution() {
        for padding in [0, 1] {
            let (conv, candle) = conv_with(12, 20, 2, padding);
            assert!(Conv3x3::from_conv(nn::Conv2d::new(
                candle.weight().clone(),
                None,
                nn::Conv2dConfig { stride: 2, padding: 2, ..Default::default() }
            ))
            .is_err());
            for (b, h, w) in [(2, 8, 8), (1, 9, 7), (3, 4, 13), (1, 3, 3), (2, 17, 3), (1, 33, 32)] {
                let x = randn(11, &[b, 12, h, w]);
                let expected = candle.forward(&x).unwrap();
                let actual = conv.forward(&x).unwrap();
                assert_eq!(actual.dims(), expected.dims(), "padding {padding}, {h}x{w}");
                let scale = max_abs(&expected).max(1.0);
                let diff = max_diff(&actual, &expected);
                assert!(diff <= 1e-5 * scale, "padding {padding}, {b}x{h}x{w}: {diff:e} at scale {scale}");
                let planes = Planes::new((h, w), 2, padding);
                for tile in [7, planes.row, planes.columns()] {
                    let out = shifted_with_tile(&conv, &x, &planes, tile);
                    assert!(max_diff(&out, &expected) <= 1e-5 * scale, "tile {tile}, {h}x{w}");
                }
                for i in 0..b {
                    let alone = conv.forward(&x.narrow(0, i, 1).unwrap()).unwrap();
                    assert_eq!(max_diff(&alone, &actual.narrow(0, i, 1).unwrap()), 0.0, "{h}x{w} image {i}");
                }
            }
        }
        let error = conv_with(3, 4, 2, 0).0.forward(&randn(12, &[1, 3, 2, 5])).unwrap_err();
        assert!(error.to_string().contains("smaller than the kernel"), "{error}");
    }

    /// The fused additions give the same bits as the separate candle ops, on both CPU paths,
    /// at stride 1 and 2, tiled or not; shapes that do not match are errors.
    #[test]
    fn fused_additions_are_the_separate_ops() {
        let (conv, _) = conv(16, 24, true);
        let (down, _) = conv_with(16, 24, 2, 1);
        for (conv, (b, h, w)) in [(&conv, (2, 4, 4)), (&conv, (3, 9, 13)), (&conv, (1, 96, 80)), (&down, (2, 17, 10))] {
            let x = randn(21, &[b, 16, h, w]);
            let plain = conv.forward(&x).unwrap();
            let (_, _, oh, ow) = plain.dims4().unwrap();
            let per_channel = randn(22, &[b, 24]);
            let residual = randn(23, &[b, 24, oh, ow]);
            let expected = plain.broadcast_add(&per_channel.unsqueeze(2).unwrap().unsqueeze(3).unwrap()).unwrap();
            let expected = (expected + &residual).unwrap();
            let fused = conv.forward_add(&x, Some(&per_channel), Some(&residual)).unwrap();
            assert_eq!(max_diff(&fused, &expected), 0.0, "{b}x{h}x{w}");
            let only_residual = conv.forward_add(&x, None, Some(&residual)).unwrap();
            assert_eq!(max_diff(&only_residual, &(&plain + &residual).unwrap()), 0.0, "{b}x{h}x{w}");
            // A strided residual is read in its logical order.
            let transposed = residual.transpose(2, 3).unwrap().contiguous().unwrap().transpose(2, 3).unwrap();
            let strided = conv.forward_add(&x, None, Some(&transposed)).unwrap();
            assert_eq!(max_diff(&strided, &only_residual), 0.0, "{b}x{h}x{w}");
        }
        let x = randn(24, &[2, 16, 9, 9]);
        assert!(conv.forward_add(&x, Some(&randn(25, &[2, 23])), None).is_err());
        assert!(conv.forward_add(&x, None, Some(&randn(26, &[2, 24, 9, 8]))).is_err());
    }

    /// Upsampling while padding gives the same bits as upsampling first, on both paths;
    /// a stride-2 convolution refuses it.
    #[test]
    fn fused_upsampling_is_upsample_then_convolve() {
        let (conv, _) = conv(8, 12, true);
        for (b, h, w) in [(2, 2, 2), (1, 3, 5), (2, 16, 9), (1, 40, 33)] {
            let x = randn(31, &[b, 8, h, w]);
            let expected = conv.forward(&x.upsample_nearest2d(2 * h, 2 * w).unwrap()).unwrap();
            let fused = conv.forward_upsampled(&x).unwrap();
            assert_eq!(fused.dims(), expected.dims());
            assert_eq!(max_diff(&fused, &expected), 0.0, "{b}x{h}x{w}");
        }
        let (down, _) = conv_with(8, 12, 2, 1);
        let error = down.forward_upsampled(&randn(32, &[1, 8, 6, 6])).unwrap_err();
        assert!(error.to_string().contains("upsampling into a stride-2"), "{error}");
    }

    /// A strided (non-contiguous) input is handled; other dtypes keep candle's weights and
    /// kernel; an input of another dtype than f32 weights is an error, not a crash.
    #[test]
    fn strided_inputs_and_other_dtypes() {
        let (conv, candle) = conv(6, 4, true);
        let x = randn(4, &[2, 6, 9, 7]);
        let transposed = x.transpose(2, 3).unwrap();
        let diff =
            max_diff(&conv.forward(&transposed).unwrap(), &candle.forward(&transposed.contiguous().unwrap()).unwrap());
        assert!(diff < 1e-5, "strided input: {diff}");
        let half = candle.weight().to_dtype(DType::F16).unwrap();
        let conv16 = Conv3x3::from_conv(nn::Conv2d::new(half, None, *candle.config())).unwrap();
        assert!(matches!(conv16.weights, Weights::Candle(_)));
        let x16 = x.to_dtype(DType::F16).unwrap();
        let out = conv16.forward(&x16).unwrap();
        assert_eq!(out.dtype(), DType::F16);
        let error = conv.forward(&x16).unwrap_err();
        assert!(error.to_string().contains("f32 CPU weights"), "{error}");
    }
}
