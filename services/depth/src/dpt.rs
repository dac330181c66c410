//! DPT-hybrid (MiDaS v3 "dpt_hybrid", `Intel/dpt-hybrid-midas`) in candle, with transformers'
//! `DPTForDepthEstimation` weight names and config.json.
//!
//! ```text
//! pixels [b,3,H,W]
//!   -> BiT ResNet (weight-standardised convs, TF "SAME" padding, GroupNorm):
//!        stem (7x7/2 conv, 3x3/2 max-pool) -> stage1 (/4) -> stage2 (/8) -> stage3 (/16)
//!   -> ViT-hybrid embeddings: 1x1 conv of stage3 to tokens, + [CLS], + position embeddings
//!      (bilinearly resized to the H/16 x W/16 grid)
//!   -> ViT layers; the outputs of two of them (backbone_out_indices[2..]) go to the neck
//!   -> neck: stage1, stage2 maps as they are; the two token maps reassembled (readout "project",
//!      1x1 conv, resize) -> 3x3 convs to fusion_hidden_size -> fusion blocks, coarsest first,
//!      each upsampling x2 (bilinear, align_corners)
//!   -> head: conv, x2 upsample, conv, ReLU, 1x1 conv, ReLU -> predicted_depth [b,H,W]
//! ```
//!
//! Differences from transformers, on purpose: inputs of any size whose sides are multiples of 16
//! are accepted (transformers' hybrid raises unless the input is exactly `image_size`; here the
//! position embeddings are resized by transformers' own `_resize_pos_embed` rule and the neck uses
//! the real H/16 x W/16 token grid, which is what the original MiDaS code does). At `image_size`
//! the computation is the same.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig, GroupNorm, LayerNorm, VarBuilder};
use sdmesh_core::blocks::Conv2d;
use sdmesh_core::linear::{linear, linear_b, Linear};
use serde::Deserialize;

// ---------------------------------------------------------------------------------------------
// Configuration (transformers' DPTConfig / BitConfig as written in config.json)
// ---------------------------------------------------------------------------------------------

/// An `int` or a `[h, w]` pair in config.json.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
pub enum Size2 {
    Square(usize),
    Pair([usize; 2]),
}

impl Size2 {
    pub fn hw(self) -> (usize, usize) {
        match self {
            Size2::Square(s) => (s, s),
            Size2::Pair([h, w]) => (h, w),
        }
    }
}

/// transformers' `DPTConfig`, the fields a hybrid depth model uses (defaults as transformers').
#[derive(Debug, Clone, Deserialize)]
pub struct DptConfig {
    #[serde(default = "d768")]
    pub hidden_size: usize,
    #[serde(default = "d12")]
    pub num_hidden_layers: usize,
    #[serde(default = "d12")]
    pub num_attention_heads: usize,
    #[serde(default = "d3072")]
    pub intermediate_size: usize,
    #[serde(default = "gelu")]
    pub hidden_act: String,
    #[serde(default = "eps12")]
    pub layer_norm_eps: f64,
    #[serde(default = "d384s")]
    pub image_size: Size2,
    #[serde(default = "d16s")]
    pub patch_size: Size2,
    #[serde(default = "d3")]
    pub num_channels: usize,
    #[serde(default)]
    pub is_hybrid: bool,
    #[serde(default = "yes")]
    pub qkv_bias: bool,
    #[serde(default = "out_indices")]
    pub backbone_out_indices: Vec<usize>,
    #[serde(default = "project")]
    pub readout_type: String,
    #[serde(default = "factors")]
    pub reassemble_factors: Vec<f64>,
    #[serde(default = "neck_sizes")]
    pub neck_hidden_sizes: Vec<usize>,
    #[serde(default = "d256")]
    pub fusion_hidden_size: usize,
    #[serde(default = "minus_one")]
    pub head_in_index: i64,
    #[serde(default)]
    pub use_batch_norm_in_fusion_residual: Option<bool>,
    #[serde(default)]
    pub use_bias_in_fusion_residual: Option<bool>,
    #[serde(default)]
    pub add_projection: bool,
    #[serde(default = "featmap")]
    pub backbone_featmap_shape: Vec<usize>,
    #[serde(default = "ignore_stages")]
    pub neck_ignore_stages: Vec<usize>,
    pub backbone_config: Option<BitConfig>,
}

/// transformers' `BitConfig` (defaults: DPTConfig's hybrid defaults where they differ).
#[derive(Debug, Clone, Deserialize)]
pub struct BitConfig {
    #[serde(default = "d3")]
    pub num_channels: usize,
    #[serde(default = "d64")]
    pub embedding_size: usize,
    #[serde(default = "bit_sizes")]
    pub hidden_sizes: Vec<usize>,
    #[serde(default = "bit_depths")]
    pub depths: Vec<usize>,
    #[serde(default = "bottleneck")]
    pub layer_type: String,
    #[serde(default = "relu")]
    pub hidden_act: String,
    #[serde(default = "same")]
    pub global_padding: Option<String>,
    #[serde(default = "d32")]
    pub num_groups: usize,
    #[serde(default = "yes")]
    pub embedding_dynamic_padding: bool,
    #[serde(default = "d32")]
    pub output_stride: usize,
    #[serde(default = "one")]
    pub width_factor: usize,
    #[serde(default = "out_features")]
    pub out_features: Vec<String>,
}

fn d3() -> usize {
    3
}
fn d12() -> usize {
    12
}
fn d32() -> usize {
    32
}
fn d64() -> usize {
    64
}
fn d256() -> usize {
    256
}
fn d768() -> usize {
    768
}
fn d3072() -> usize {
    3072
}
fn d384s() -> Size2 {
    Size2::Square(384)
}
fn d16s() -> Size2 {
    Size2::Square(16)
}
fn one() -> usize {
    1
}
fn minus_one() -> i64 {
    -1
}
fn yes() -> bool {
    true
}
fn eps12() -> f64 {
    1e-12
}
fn gelu() -> String {
    "gelu".into()
}
fn relu() -> String {
    "relu".into()
}
fn project() -> String {
    "project".into()
}
fn bottleneck() -> String {
    "bottleneck".into()
}
fn same() -> Option<String> {
    Some("same".into())
}
fn out_indices() -> Vec<usize> {
    vec![2, 5, 8, 11]
}
fn factors() -> Vec<f64> {
    vec![4.0, 2.0, 1.0, 0.5]
}
fn neck_sizes() -> Vec<usize> {
    vec![96, 192, 384, 768]
}
fn featmap() -> Vec<usize> {
    vec![1, 1024, 24, 24]
}
fn ignore_stages() -> Vec<usize> {
    vec![0, 1]
}
fn bit_sizes() -> Vec<usize> {
    vec![256, 512, 1024, 2048]
}
fn bit_depths() -> Vec<usize> {
    vec![3, 4, 9]
}
fn out_features() -> Vec<String> {
    vec!["stage1".into(), "stage2".into(), "stage3".into()]
}

impl DptConfig {
    /// Checks that this is a configuration this implementation runs (a DPT-hybrid depth model);
    /// the message says what is not supported.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let bit =
            self.backbone_config.as_ref().ok_or("backbone_config is missing (a DPT-hybrid has a BiT backbone)")?;
        let mut problems = Vec::new();
        if !self.is_hybrid {
            problems.push("is_hybrid is false: only DPT-hybrid (BiT + ViT) is implemented".to_string());
        }
        if self.readout_type != "project" {
            problems.push(format!("readout_type {:?}: a hybrid uses \"project\"", self.readout_type));
        }
        if self.hidden_act != "gelu" {
            problems.push(format!("hidden_act {:?}: only \"gelu\" is implemented", self.hidden_act));
        }
        if bit.hidden_act != "relu" {
            problems.push(format!("backbone hidden_act {:?}: only \"relu\" is implemented", bit.hidden_act));
        }
        if bit.layer_type != "bottleneck" {
            problems.push(format!("backbone layer_type {:?}: only \"bottleneck\" is implemented", bit.layer_type));
        }
        if bit.depths.len() != 3 || bit.hidden_sizes.len() < 3 || bit.depths.contains(&0) {
            problems.push(format!(
                "backbone depths {:?} / hidden_sizes {:?}: a hybrid's BiT has three non-empty stages",
                bit.depths, bit.hidden_sizes
            ));
        }
        if bit.out_features != ["stage1", "stage2", "stage3"] {
            problems.push(format!("backbone out_features {:?}: expected stage1..stage3", bit.out_features));
        }
        if !matches!(
            bit.global_padding.as_deref().map(str::to_ascii_uppercase).as_deref(),
            None | Some("SAME") | Some("VALID")
        ) {
            problems.push(format!("backbone global_padding {:?}: expected same, valid or null", bit.global_padding));
        }
        if self.neck_hidden_sizes.len() != 4
            || self.reassemble_factors.len() != 4
            || self.backbone_out_indices.len() != 4
        {
            problems.push("neck_hidden_sizes, reassemble_factors and backbone_out_indices must have 4 entries".into());
        }
        if self.neck_ignore_stages != [0, 1] {
            problems.push(format!("neck_ignore_stages {:?}: a hybrid ignores [0, 1]", self.neck_ignore_stages));
        }
        if self.use_batch_norm_in_fusion_residual == Some(true) {
            problems.push("use_batch_norm_in_fusion_residual is not implemented".into());
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads.max(1)) {
            problems.push(format!("hidden_size {} is not a multiple of num_attention_heads", self.hidden_size));
        }
        if self.backbone_featmap_shape.len() != 4 {
            problems.push(format!("backbone_featmap_shape {:?}: expected 4 entries", self.backbone_featmap_shape));
        }
        let (ph, pw) = self.patch_size.hw();
        if ph != pw || ph == 0 {
            problems.push(format!("patch_size {:?}: expected a square patch", self.patch_size));
        }
        if problems.is_empty() && self.layer_indices().len() != 2 {
            problems.push(format!(
                "backbone_out_indices {:?}: the last two must name two different ViT layers below num_hidden_layers {}",
                self.backbone_out_indices, self.num_hidden_layers
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    /// The ViT layers whose outputs feed the neck, in layer order: transformers keeps
    /// `hidden_states[1:][idx]` for each layer idx in `backbone_out_indices[2:]`.
    pub fn layer_indices(&self) -> Vec<usize> {
        let wanted = self.backbone_out_indices.get(2..).unwrap_or(&[]);
        (0..self.num_hidden_layers).filter(|i| wanted.contains(i)).collect()
    }

    pub fn patch(&self) -> usize {
        self.patch_size.hw().0
    }

    fn bit(&self) -> &BitConfig {
        self.backbone_config.as_ref().expect("validated")
    }
}

// ---------------------------------------------------------------------------------------------
// BiT backbone
// ---------------------------------------------------------------------------------------------

/// How a BiT conv / max-pool pads (timm's `get_padding_value`, as transformers' BiT copies it).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Padding {
    /// Symmetric, inside the conv.
    Static(usize),
    /// TF "SAME": computed from the input size, the odd pixel on the bottom/right.
    DynamicSame,
}

fn padding_for(global: Option<&str>, kernel: usize, stride: usize, dilation: usize) -> Padding {
    let symmetric = ((stride - 1) + dilation * (kernel - 1)) / 2;
    match global.map(str::to_ascii_lowercase).as_deref() {
        Some("same") if stride == 1 && (dilation * (kernel - 1)).is_multiple_of(2) => Padding::Static(symmetric),
        Some("same") => Padding::DynamicSame,
        Some("valid") => Padding::Static(0),
        _ => Padding::Static(symmetric),
    }
}

/// TF "SAME" padding of one side of length `x`: (before, after).
fn same_padding(x: usize, kernel: usize, stride: usize, dilation: usize) -> (usize, usize) {
    let total = ((x.div_ceil(stride) - 1) * stride + (kernel - 1) * dilation + 1).saturating_sub(x);
    (total / 2, total - total / 2)
}

/// Zero-pads `x` [b,c,h,w] as `DynamicPad2d` does (pads with 0, also before a max-pool).
fn pad_same(x: &Tensor, kernel: usize, stride: usize, dilation: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (top, bottom) = same_padding(h, kernel, stride, dilation);
    let (left, right) = same_padding(w, kernel, stride, dilation);
    let mut x = x.clone();
    if top + bottom > 0 {
        x = x.pad_with_zeros(2, top, bottom)?;
    }
    if left + right > 0 {
        x = x.pad_with_zeros(3, left, right)?;
    }
    Ok(x)
}

/// `WeightStandardizedConv2d`: each output filter is standardised to zero mean and unit variance
/// (biased, over in_channels x kh x kw) before the conv: w' = (w - mean) / sqrt(var + eps), which
/// transformers computes with `batch_norm(training=True)` on every forward. The weights are fixed
/// here, so it is done once at load time. No bias.
struct StdConv {
    weight: Tensor,
    kernel: usize,
    stride: usize,
    dilation: usize,
    padding: Padding,
}

impl StdConv {
    #[allow(clippy::too_many_arguments)]
    fn new(
        vb: VarBuilder,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        dilation: usize,
        eps: f64,
        global_padding: Option<&str>,
    ) -> Result<Self> {
        let w = vb.get((c_out, c_in, kernel, kernel), "weight")?;
        let flat = w.reshape((c_out, c_in * kernel * kernel))?.to_dtype(DType::F32)?;
        let mean = flat.mean_keepdim(1)?;
        let centred = flat.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(1)?;
        let weight = centred.broadcast_div(&(var + eps)?.sqrt()?)?.reshape(w.dims())?.to_dtype(w.dtype())?;
        Ok(Self { weight, kernel, stride, dilation, padding: padding_for(global_padding, kernel, stride, dilation) })
    }
}

impl Module for StdConv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (x, pad) = match self.padding {
            Padding::DynamicSame => (pad_same(x, self.kernel, self.stride, self.dilation)?, 0),
            Padding::Static(p) => (x.clone(), p),
        };
        x.conv2d(&self.weight, pad, self.stride, self.dilation, 1)
    }
}

/// `BitGroupNormActivation`: GroupNorm (eps 1e-5), then ReLU unless it is the pre-residual norm.
struct GroupNormAct {
    norm: GroupNorm,
    relu: bool,
}

impl GroupNormAct {
    fn new(vb: VarBuilder, groups: usize, channels: usize, relu: bool) -> Result<Self> {
        Ok(Self { norm: candle_nn::group_norm(groups, channels, 1e-5, vb)?, relu })
    }
}

impl Module for GroupNormAct {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.norm.forward(x)?;
        if self.relu {
            x.relu()
        } else {
            Ok(x)
        }
    }
}

/// The stem: 7x7/2 standardised conv, GroupNorm + ReLU, 3x3/2 max-pool.
struct BitEmbeddings {
    conv: StdConv,
    /// `ConstantPad2d(1)` after the conv when global padding is not SAME.
    pad_after_conv: bool,
    norm: GroupNormAct,
    dynamic_pool_padding: bool,
}

impl BitEmbeddings {
    fn new(vb: VarBuilder, c: &BitConfig) -> Result<Self> {
        let global = c.global_padding.as_deref();
        Ok(Self {
            conv: StdConv::new(vb.pp("convolution"), c.num_channels, c.embedding_size, 7, 2, 1, 1e-8, global)?,
            pad_after_conv: !global.is_some_and(|g| g.eq_ignore_ascii_case("same")),
            norm: GroupNormAct::new(vb.pp("norm"), c.num_groups, c.embedding_size, true)?,
            dynamic_pool_padding: c.embedding_dynamic_padding,
        })
    }
}

impl Module for BitEmbeddings {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.conv.forward(x)?;
        if self.pad_after_conv {
            x = x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
        }
        let x = self.norm.forward(&x)?;
        // BitMaxPool2d: dynamic SAME padding with zeros (the input is post-ReLU, so zeros never win
        // over a real value), then a floor-mode 3x3/2 max-pool.
        let x = if self.dynamic_pool_padding { pad_same(&x, 3, 2, 1)? } else { x };
        x.max_pool2d_with_stride(3, 2)
    }
}

/// `BitBottleneckLayer` (non-pre-activation, ResNet v1.5): 1x1 -> 3x3 (stride) -> 1x1, each
/// followed by GroupNorm (+ ReLU but the last), plus the (downsampled) shortcut, then ReLU.
struct BitBottleneck {
    downsample: Option<(StdConv, GroupNormAct)>,
    conv1: StdConv,
    norm1: GroupNormAct,
    conv2: StdConv,
    norm2: GroupNormAct,
    conv3: StdConv,
    norm3: GroupNormAct,
}

impl BitBottleneck {
    #[allow(clippy::too_many_arguments)]
    fn new(
        vb: VarBuilder,
        c: &BitConfig,
        c_in: usize,
        c_out: usize,
        stride: usize,
        first_dilation: usize,
        first_layer: bool,
    ) -> Result<Self> {
        let g = c.global_padding.as_deref();
        let mid = make_div(c_out as f64 * 0.25);
        let downsample = if first_layer {
            Some((
                StdConv::new(vb.pp("downsample.conv"), c_in, c_out, 1, stride, 1, 1e-8, g)?,
                GroupNormAct::new(vb.pp("downsample.norm"), c.num_groups, c_out, false)?,
            ))
        } else {
            None
        };
        Ok(Self {
            downsample,
            conv1: StdConv::new(vb.pp("conv1"), c_in, mid, 1, 1, 1, 1e-8, g)?,
            norm1: GroupNormAct::new(vb.pp("norm1"), c.num_groups, mid, true)?,
            conv2: StdConv::new(vb.pp("conv2"), mid, mid, 3, stride, first_dilation, 1e-8, g)?,
            norm2: GroupNormAct::new(vb.pp("norm2"), c.num_groups, mid, true)?,
            conv3: StdConv::new(vb.pp("conv3"), mid, c_out, 1, 1, 1, 1e-8, g)?,
            norm3: GroupNormAct::new(vb.pp("norm3"), c.num_groups, c_out, false)?,
        })
    }
}

impl Module for BitBottleneck {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let shortcut = match &self.downsample {
            Some((conv, norm)) => norm.forward(&conv.forward(x)?)?,
            None => x.clone(),
        };
        let h = self.norm1.forward(&self.conv1.forward(x)?)?;
        let h = self.norm2.forward(&self.conv2.forward(&h)?)?;
        let h = self.norm3.forward(&self.conv3.forward(&h)?)?;
        (h + shortcut)?.relu()
    }
}

/// timm's `make_div`: round to a multiple of 8, at least 8, not below 90% of `value`.
fn make_div(value: f64) -> usize {
    let divisor = 8usize;
    let mut new = divisor.max(((value + divisor as f64 / 2.0) as usize) / divisor * divisor);
    if (new as f64) < 0.9 * value {
        new += divisor;
    }
    new
}

/// `BitBackbone` restricted to what DPT-hybrid uses: the outputs of stages 1, 2 and 3.
pub struct BitBackbone {
    embedder: BitEmbeddings,
    stages: Vec<Vec<BitBottleneck>>,
}

/// The BiT feature maps, for debugging layer by layer.
pub struct BitFeatures {
    /// After the stem (conv, norm, max-pool).
    pub stem: Tensor,
    /// The output of each stage: stride 4, 8, 16.
    pub stages: Vec<Tensor>,
}

impl BitBackbone {
    fn new(vb: VarBuilder, c: &BitConfig) -> Result<Self> {
        let embedder = BitEmbeddings::new(vb.pp("bit.embedder"), c)?;
        let mut stages = Vec::new();
        let (mut c_prev, mut current_stride, mut dilation) = (c.embedding_size, 4usize, 1usize);
        for (idx, (&depth, &hidden)) in c.depths.iter().zip(&c.hidden_sizes).enumerate() {
            // BitEncoder._get_updated_hyperparameters
            let c_out = make_div((hidden * c.width_factor) as f64);
            let mut stride = if idx == 0 { 1 } else { 2 };
            if current_stride >= c.output_stride {
                dilation *= stride;
                stride = 1;
            }
            // BitStage
            let mut first_dilation = if dilation == 1 || dilation == 2 { 1 } else { 2 };
            let vb_stage = vb.pp(format!("bit.encoder.stages.{idx}.layers"));
            let mut layers = Vec::new();
            for layer in 0..depth {
                let layer_stride = if layer == 0 { stride } else { 1 };
                let c_in = if layer == 0 { c_prev } else { c_out };
                layers.push(BitBottleneck::new(
                    vb_stage.pp(layer),
                    c,
                    c_in,
                    c_out,
                    layer_stride,
                    first_dilation,
                    layer == 0,
                )?);
                first_dilation = dilation;
            }
            stages.push(layers);
            c_prev = c_out;
            current_stride *= stride;
        }
        Ok(Self { embedder, stages })
    }

    pub fn forward(&self, x: &Tensor) -> Result<BitFeatures> {
        let stem = self.embedder.forward(x)?;
        let mut h = stem.clone();
        let mut outs = Vec::new();
        for stage in &self.stages {
            for layer in stage {
                h = layer.forward(&h)?;
            }
            outs.push(h.clone());
        }
        Ok(BitFeatures { stem, stages: outs })
    }
}

// ---------------------------------------------------------------------------------------------
// ViT-hybrid embeddings and encoder
// ---------------------------------------------------------------------------------------------

/// `DPTViTHybridEmbeddings`: tokens from the last BiT map, [CLS] first, plus position embeddings.
struct HybridEmbeddings {
    projection: Conv2d,
    cls_token: Tensor,
    position_embeddings: Tensor,
    patch: usize,
}

impl HybridEmbeddings {
    fn new(vb: VarBuilder, c: &DptConfig) -> Result<Self> {
        let (ih, iw) = c.image_size.hw();
        let patch = c.patch();
        let feature_dim = c.backbone_featmap_shape[1];
        Ok(Self {
            projection: Conv2d::new(feature_dim, c.hidden_size, 1, Default::default(), vb.pp("projection"))?,
            cls_token: vb.get((1, 1, c.hidden_size), "cls_token")?,
            position_embeddings: vb.get((1, (ih / patch) * (iw / patch) + 1, c.hidden_size), "position_embeddings")?,
            patch,
        })
    }

    /// `_resize_pos_embed`: the [CLS] embedding as is; the square grid of the others bilinearly
    /// resized (align_corners=False) to `gh` x `gw`. At the native grid this is the identity.
    fn resized_position_embeddings(&self, gh: usize, gw: usize) -> Result<Tensor> {
        let (_, n, dim) = self.position_embeddings.dims3()?;
        let tok = self.position_embeddings.narrow(1, 0, 1)?;
        let grid = self.position_embeddings.narrow(1, 1, n - 1)?;
        let old = ((n - 1) as f64).sqrt() as usize;
        if old * old != n - 1 {
            candle_core::bail!("position_embeddings: {} grid entries are not a square", n - 1);
        }
        if (old, old) == (gh, gw) {
            return Ok(self.position_embeddings.clone());
        }
        let grid = grid.reshape((1, old, old, dim))?.permute((0, 3, 1, 2))?.contiguous()?;
        let grid = grid.upsample_bilinear2d(gh, gw, false)?;
        let grid = grid.permute((0, 2, 3, 1))?.reshape((1, gh * gw, dim))?;
        Tensor::cat(&[tok, grid], 1)
    }

    /// `features`: the last BiT map [b, c, H/16, W/16]; `(h, w)`: the input's size.
    fn forward(&self, features: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        let (gh, gw) = (h / self.patch, w / self.patch);
        let pos = self.resized_position_embeddings(gh, gw)?;
        let x = self.projection.forward(features)?;
        let (b, dim, fh, fw) = x.dims4()?;
        if (fh, fw) != (gh, gw) {
            candle_core::bail!("backbone map {fh}x{fw} does not match the {gh}x{gw} patch grid of a {h}x{w} input");
        }
        let x = x.flatten_from(2)?.transpose(1, 2)?;
        let cls = self.cls_token.expand((b, 1, dim))?;
        Tensor::cat(&[cls, x], 1)?.broadcast_add(&pos)
    }
}

/// One pre-norm ViT block (`DPTViTLayer`).
struct VitLayer {
    norm1: LayerNorm,
    query: Linear,
    key: Linear,
    value: Linear,
    out: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
}

impl VitLayer {
    fn new(vb: VarBuilder, c: &DptConfig) -> Result<Self> {
        let d = c.hidden_size;
        let att = vb.pp("attention.attention");
        Ok(Self {
            norm1: candle_nn::layer_norm(d, c.layer_norm_eps, vb.pp("layernorm_before"))?,
            query: linear_b(d, d, c.qkv_bias, att.pp("query"))?,
            key: linear_b(d, d, c.qkv_bias, att.pp("key"))?,
            value: linear_b(d, d, c.qkv_bias, att.pp("value"))?,
            out: linear(d, d, vb.pp("attention.output.dense"))?,
            norm2: candle_nn::layer_norm(d, c.layer_norm_eps, vb.pp("layernorm_after"))?,
            fc1: linear(d, c.intermediate_size, vb.pp("intermediate.dense"))?,
            fc2: linear(c.intermediate_size, d, vb.pp("output.dense"))?,
            heads: c.num_attention_heads,
        })
    }
}

impl Module for VitLayer {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let hd = d / self.heads;
        let h = self.norm1.forward(x)?;
        let split = |t: Tensor| t.reshape((b, n, self.heads, hd))?.transpose(1, 2)?.contiguous();
        let q = split(self.query.forward(&h)?)?;
        let k = split(self.key.forward(&h)?)?;
        let v = split(self.value.forward(&h)?)?;
        let scores = (q.matmul(&k.t()?)? * (hd as f64).powf(-0.5))?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, d))?;
        let x = (self.out.forward(&ctx)? + x)?;
        let h = sdmesh_core::activation::gelu_erf(&self.fc1.forward(&self.norm2.forward(&x)?)?)?;
        self.fc2.forward(&h)? + x
    }
}

// ---------------------------------------------------------------------------------------------
// Neck (reassemble + fusion) and head
// ---------------------------------------------------------------------------------------------

/// `DPTReassembleLayer` with its readout projection: tokens [b, 1+gh*gw, d] -> map [b, ch, ., .].
struct Reassemble {
    readout: Linear,
    projection: Conv2d,
    resize: Resize,
}

enum Resize {
    Up(ConvTranspose2d),
    Same,
    Down(Conv2d),
}

impl Reassemble {
    fn new(vb: VarBuilder, c: &DptConfig, i: usize) -> Result<Self> {
        let (d, ch, factor) = (c.hidden_size, c.neck_hidden_sizes[i], c.reassemble_factors[i]);
        let layer = vb.pp(format!("layers.{i}"));
        let resize = if factor > 1.0 {
            let f = factor as usize;
            let cfg = ConvTranspose2dConfig { stride: f, ..Default::default() };
            Resize::Up(candle_nn::conv_transpose2d(ch, ch, f, cfg, layer.pp("resize"))?)
        } else if factor == 1.0 {
            Resize::Same
        } else {
            let cfg = Conv2dConfig { padding: 1, stride: (1.0 / factor) as usize, ..Default::default() };
            Resize::Down(Conv2d::new(ch, ch, 3, cfg, layer.pp("resize"))?)
        };
        Ok(Self {
            readout: linear(2 * d, d, vb.pp(format!("readout_projects.{i}.0")))?,
            projection: Conv2d::new(d, ch, 1, Default::default(), layer.pp("projection"))?,
            resize,
        })
    }

    fn forward(&self, tokens: &Tensor, gh: usize, gw: usize) -> Result<Tensor> {
        let (b, n, d) = tokens.dims3()?;
        let cls = tokens.narrow(1, 0, 1)?;
        let x = tokens.narrow(1, 1, n - 1)?;
        // readout "project": concat [token, cls] per token, Linear(2d, d), GELU.
        let x = Tensor::cat(&[x.clone(), cls.expand((b, n - 1, d))?], 2)?;
        let x = sdmesh_core::activation::gelu_erf(&self.readout.forward(&x)?)?;
        let x = x.transpose(1, 2)?.reshape((b, d, gh, gw))?;
        let x = self.projection.forward(&x)?;
        match &self.resize {
            Resize::Up(conv) => conv.forward(&x),
            Resize::Same => Ok(x),
            Resize::Down(conv) => conv.forward(&x),
        }
    }
}

/// `DPTPreActResidualLayer`: x + conv(relu(conv(relu(x)))).
struct ResidualUnit {
    conv1: Conv2d,
    conv2: Conv2d,
}

impl ResidualUnit {
    fn new(vb: VarBuilder, ch: usize, bias: bool) -> Result<Self> {
        let cfg = Conv2dConfig { padding: 1, ..Default::default() };
        let conv = |name: &str| {
            if bias {
                Conv2d::new(ch, ch, 3, cfg, vb.pp(name))
            } else {
                Conv2d::from_conv(candle_nn::conv2d_no_bias(ch, ch, 3, cfg, vb.pp(name))?)
            }
        };
        Ok(Self { conv1: conv("convolution1")?, conv2: conv("convolution2")? })
    }
}

impl Module for ResidualUnit {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&x.relu()?)?;
        let h = self.conv2.forward(&h.relu()?)?;
        h + x
    }
}

/// `DPTFeatureFusionLayer`.
struct FusionLayer {
    residual1: ResidualUnit,
    residual2: ResidualUnit,
    projection: Conv2d,
}

impl FusionLayer {
    fn new(vb: VarBuilder, ch: usize, bias: bool) -> Result<Self> {
        Ok(Self {
            residual1: ResidualUnit::new(vb.pp("residual_layer1"), ch, bias)?,
            residual2: ResidualUnit::new(vb.pp("residual_layer2"), ch, bias)?,
            projection: Conv2d::new(ch, ch, 1, Default::default(), vb.pp("projection"))?,
        })
    }

    fn forward(&self, x: &Tensor, skip: Option<&Tensor>) -> Result<Tensor> {
        let mut x = x.clone();
        if let Some(skip) = skip {
            let (_, _, h, w) = x.dims4()?;
            // A skip map of another size (odd token grids) is resized to this one first.
            let skip = if skip.dims() != x.dims() { skip.upsample_bilinear2d(h, w, false)? } else { skip.clone() };
            x = (x + self.residual1.forward(&skip)?)?;
        }
        let x = self.residual2.forward(&x)?;
        let (_, _, h, w) = x.dims4()?;
        let x = x.upsample_bilinear2d(2 * h, 2 * w, true)?;
        self.projection.forward(&x)
    }
}

/// `DPTDepthEstimationHead`.
struct DepthHead {
    projection: Option<Conv2d>,
    conv1: Conv2d,
    conv2: Conv2d,
    conv3: Conv2d,
}

impl DepthHead {
    fn new(vb: VarBuilder, c: &DptConfig) -> Result<Self> {
        let f = c.fusion_hidden_size;
        let pad1 = Conv2dConfig { padding: 1, ..Default::default() };
        let projection = if c.add_projection { Some(Conv2d::new(f, f, 3, pad1, vb.pp("projection"))?) } else { None };
        Ok(Self {
            projection,
            conv1: Conv2d::new(f, f / 2, 3, pad1, vb.pp("head.0"))?,
            conv2: Conv2d::new(f / 2, 32, 3, pad1, vb.pp("head.2"))?,
            conv3: Conv2d::new(32, 1, 1, Default::default(), vb.pp("head.4"))?,
        })
    }
}

impl Module for DepthHead {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = match &self.projection {
            Some(p) => p.forward(x)?.relu()?,
            None => x.clone(),
        };
        let x = self.conv1.forward(&x)?;
        let (_, _, h, w) = x.dims4()?;
        let x = x.upsample_bilinear2d(2 * h, 2 * w, true)?;
        let x = self.conv2.forward(&x)?.relu()?;
        self.conv3.forward(&x)?.relu()?.squeeze(1)
    }
}

// ---------------------------------------------------------------------------------------------
// The whole model
// ---------------------------------------------------------------------------------------------

/// Everything a forward pass computes, for parity tests layer by layer.
pub struct DptTrace {
    pub backbone: BitFeatures,
    /// Tokens after the embeddings [b, 1 + gh*gw, hidden].
    pub embeddings: Tensor,
    /// Output of each ViT layer that ran (pre layer norm), in layer order.
    pub layers: Vec<Tensor>,
    /// The fusion stage's outputs, coarsest first (the last goes into the head).
    pub fused: Vec<Tensor>,
    /// [b, h, w].
    pub predicted_depth: Tensor,
}

/// `DPTForDepthEstimation` with a hybrid (BiT) backbone.
pub struct DptDepth {
    backbone: BitBackbone,
    embeddings: HybridEmbeddings,
    layers: Vec<VitLayer>,
    /// ViT layers whose outputs go to the neck.
    taps: Vec<usize>,
    reassemble: Vec<Reassemble>,
    convs: Vec<Conv2d>,
    fusion: Vec<FusionLayer>,
    head: DepthHead,
    head_in_index: usize,
    patch: usize,
    /// The weights' dtype; inputs are cast to it.
    dtype: DType,
}

impl DptDepth {
    /// `vb` at the root of transformers' state dict (`dpt.`, `neck.`, `head.`). The config must
    /// have passed [`DptConfig::validate`].
    pub fn new(vb: VarBuilder, c: &DptConfig) -> Result<Self> {
        if let Err(e) = c.validate() {
            candle_core::bail!("unsupported DPT config: {e}");
        }
        let emb = vb.pp("dpt.embeddings");
        let backbone = BitBackbone::new(emb.pp("backbone"), c.bit())?;
        let embeddings = HybridEmbeddings::new(emb, c)?;
        let taps = c.layer_indices();
        // Layers after the last tapped one cannot change the depth (the final layernorm is unused too).
        let n_layers = taps.iter().max().map_or(0, |m| m + 1);
        let layers =
            (0..n_layers).map(|i| VitLayer::new(vb.pp(format!("dpt.encoder.layer.{i}")), c)).collect::<Result<_>>()?;
        let neck = vb.pp("neck");
        let reassemble =
            (2..4).map(|i| Reassemble::new(neck.pp("reassemble_stage"), c, i)).collect::<Result<Vec<_>>>()?;
        let f = c.fusion_hidden_size;
        let pad1 = Conv2dConfig { padding: 1, ..Default::default() };
        let convs = c
            .neck_hidden_sizes
            .iter()
            .enumerate()
            .map(|(i, &ch)| {
                Conv2d::from_conv(candle_nn::conv2d_no_bias(ch, f, 3, pad1, neck.pp(format!("convs.{i}")))?)
            })
            .collect::<Result<_>>()?;
        let bias = c.use_bias_in_fusion_residual.unwrap_or(!c.use_batch_norm_in_fusion_residual.unwrap_or(false));
        let fusion = (0..c.neck_hidden_sizes.len())
            .map(|i| FusionLayer::new(neck.pp(format!("fusion_stage.layers.{i}")), f, bias))
            .collect::<Result<_>>()?;
        let n = c.neck_hidden_sizes.len() as i64;
        let head_in_index = c.head_in_index.rem_euclid(n) as usize;
        Ok(Self {
            backbone,
            embeddings,
            layers,
            taps,
            reassemble,
            convs,
            fusion,
            head: DepthHead::new(vb.pp("head"), c)?,
            head_in_index,
            patch: c.patch(),
            dtype: vb.dtype(),
        })
    }

    /// The input side lengths must be multiples of this.
    pub fn patch_size(&self) -> usize {
        self.patch
    }

    /// pixel_values [b, 3, h, w] (h, w multiples of the patch size) -> predicted_depth [b, h', w'].
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        Ok(self.forward_trace(pixel_values)?.predicted_depth)
    }

    /// [`Self::forward`], keeping the intermediate activations.
    pub fn forward_trace(&self, pixel_values: &Tensor) -> Result<DptTrace> {
        let (_, _, h, w) = pixel_values.dims4()?;
        if h == 0 || w == 0 || h % self.patch != 0 || w % self.patch != 0 {
            candle_core::bail!("pixel_values {h}x{w}: the sides must be positive multiples of {}", self.patch);
        }
        let (gh, gw) = (h / self.patch, w / self.patch);
        let backbone = self.backbone.forward(&pixel_values.to_dtype(self.dtype)?)?;
        let embeddings = self.embeddings.forward(&backbone.stages[2], h, w)?;
        let mut x = embeddings.clone();
        let mut outputs = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            x = layer.forward(&x)?;
            outputs.push(x.clone());
        }
        // Neck inputs: BiT stage1, stage2 as they are, then the reassembled tapped layers.
        let mut maps = vec![backbone.stages[0].clone(), backbone.stages[1].clone()];
        for (re, &tap) in self.reassemble.iter().zip(&self.taps) {
            maps.push(re.forward(&outputs[tap], gh, gw)?);
        }
        let maps = maps.iter().zip(&self.convs).map(|(m, conv)| conv.forward(m)).collect::<Result<Vec<_>>>()?;
        // Fusion, coarsest first.
        let mut fused: Vec<Tensor> = Vec::with_capacity(maps.len());
        for (map, layer) in maps.iter().rev().zip(&self.fusion) {
            let next = match fused.last() {
                None => layer.forward(map, None)?,
                Some(prev) => layer.forward(prev, Some(map))?,
            };
            fused.push(next);
        }
        let predicted_depth = self.head.forward(&fused[self.head_in_index])?;
        Ok(DptTrace { backbone, embeddings, layers: outputs, fused, predicted_depth })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_padding_matches_tf() {
        // 7x7/2 on 64: out 32, total pad (31*2 + 7) - 64 = 5 -> (2, 3).
        assert_eq!(same_padding(64, 7, 2, 1), (2, 3));
        assert_eq!(same_padding(65, 7, 2, 1), (3, 3));
        // 3x3/2 max-pool on 32 -> (0, 1); 1x1/2 never pads.
        assert_eq!(same_padding(32, 3, 2, 1), (0, 1));
        assert_eq!(same_padding(33, 1, 2, 1), (0, 0));
        assert_eq!(padding_for(Some("SAME"), 3, 1, 1), Padding::Static(1));
        assert_eq!(padding_for(Some("SAME"), 3, 2, 1), Padding::DynamicSame);
        assert_eq!(padding_for(None, 7, 2, 1), Padding::Static(3));
    }

    #[test]
    fn make_div_matches_timm() {
        assert_eq!(make_div(64.0), 64);
        assert_eq!(make_div(4.0), 8);
        assert_eq!(make_div(256.0 * 0.25), 64);
        assert_eq!(make_div(1024.0 * 0.25), 256);
    }
}
