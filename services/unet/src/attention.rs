//! The SD UNet's transformer blocks: a fork of candle-transformers 0.11.1
//! `stable_diffusion::attention` (MIT/Apache-2.0, by the candle authors), without the VAE's
//! attention block and without flash attention (a CUDA-only feature candle gates). Changes:
//! attention is `sdmesh_core::attention` (bounded chunks, `upcast_attention`); GEGLU is
//! `sdmesh_core::linear::Linear::forward_geglu` (projection and gate fused on the CPU), with
//! the exact (erf) GELU as diffusers' GEGLU has it (candle's used the tanh approximation on
//! strided views: off by up to ~5e-4 per activation, and slow).
use candle_core::{Result, Tensor};
use candle_nn as nn;
use candle_nn::Module;
use sdmesh_core::attention::multi_head_attention;
use sdmesh_core::blocks::Conv2d;
use sdmesh_core::linear::{linear, linear_no_bias, Linear};

#[derive(Debug)]
struct GeGlu {
    proj: Linear,
    span: tracing::Span,
}

impl GeGlu {
    fn new(vs: nn::VarBuilder, dim_in: usize, dim_out: usize) -> Result<Self> {
        let proj = linear(dim_in, dim_out * 2, vs.pp("proj"))?;
        let span = tracing::span!(tracing::Level::TRACE, "geglu");
        Ok(Self { proj, span })
    }
}

impl Module for GeGlu {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let _enter = self.span.enter();
        self.proj.forward_geglu(xs)
    }
}

/// A feed-forward layer.
#[derive(Debug)]
struct FeedForward {
    project_in: GeGlu,
    linear: Linear,
    span: tracing::Span,
}

impl FeedForward {
    // The glu parameter in the python code is unused?
    // https://github.com/huggingface/diffusers/blob/d3d22ce5a894becb951eec03e663951b28d45135/src/diffusers/models/attention.py#L347
    /// Creates a new feed-forward layer based on some given input dimension, some
    /// output dimension, and a multiplier to be used for the intermediary layer.
    fn new(vs: nn::VarBuilder, dim: usize, dim_out: Option<usize>, mult: usize) -> Result<Self> {
        let inner_dim = dim * mult;
        let dim_out = dim_out.unwrap_or(dim);
        let vs = vs.pp("net");
        let project_in = GeGlu::new(vs.pp("0"), dim, inner_dim)?;
        let linear = linear(inner_dim, dim_out, vs.pp("2"))?;
        let span = tracing::span!(tracing::Level::TRACE, "ff");
        Ok(Self { project_in, linear, span })
    }
}

impl Module for FeedForward {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let _enter = self.span.enter();
        let xs = self.project_in.forward(xs)?;
        self.linear.forward(&xs)
    }
}

#[derive(Debug)]
pub struct CrossAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
    /// Scores (q·k) in f32 even when the model runs in f16/bf16 (diffusers' `upcast_attention`).
    upcast: bool,
    span: tracing::Span,
    span_attn: tracing::Span,
}

impl CrossAttention {
    pub fn new(
        vs: nn::VarBuilder,
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        dim_head: usize,
        upcast: bool,
    ) -> Result<Self> {
        let inner_dim = dim_head * heads;
        let context_dim = context_dim.unwrap_or(query_dim);
        let scale = 1.0 / f64::sqrt(dim_head as f64);
        let to_q = linear_no_bias(query_dim, inner_dim, vs.pp("to_q"))?;
        let to_k = linear_no_bias(context_dim, inner_dim, vs.pp("to_k"))?;
        let to_v = linear_no_bias(context_dim, inner_dim, vs.pp("to_v"))?;
        let to_out = linear(inner_dim, query_dim, vs.pp("to_out.0"))?;
        let span = tracing::span!(tracing::Level::TRACE, "xa");
        let span_attn = tracing::span!(tracing::Level::TRACE, "xa-attn");
        Ok(Self { to_q, to_k, to_v, to_out, heads, scale, upcast, span, span_attn })
    }

    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let _enter = self.span.enter();
        let query = self.to_q.forward(xs)?;
        let context = context.unwrap_or(xs).contiguous()?;
        let key = self.to_k.forward(&context)?;
        let value = self.to_v.forward(&context)?;
        let xs = {
            let _enter = self.span_attn.enter();
            multi_head_attention(&query, &key, &value, self.heads, self.scale, self.upcast)?
        };
        self.to_out.forward(&xs)
    }
}

/// A basic Transformer block.
#[derive(Debug)]
struct BasicTransformerBlock {
    attn1: CrossAttention,
    /// diffusers' `only_cross_attention` (the x4 upscaler): attn1 attends to the context too.
    only_cross_attention: bool,
    ff: FeedForward,
    attn2: CrossAttention,
    norm1: nn::LayerNorm,
    norm2: nn::LayerNorm,
    norm3: nn::LayerNorm,
    span: tracing::Span,
}

impl BasicTransformerBlock {
    /// Attention settings (context, only-cross-attention, upcast) from its transformer's config.
    fn new(
        vs: nn::VarBuilder,
        dim: usize,
        n_heads: usize,
        d_head: usize,
        config: &SpatialTransformerConfig,
    ) -> Result<Self> {
        let SpatialTransformerConfig { context_dim, only_cross_attention, upcast_attention, .. } = *config;
        let attn1_context = if only_cross_attention { context_dim } else { None };
        let attn1 = CrossAttention::new(vs.pp("attn1"), dim, attn1_context, n_heads, d_head, upcast_attention)?;
        let ff = FeedForward::new(vs.pp("ff"), dim, None, 4)?;
        let attn2 = CrossAttention::new(vs.pp("attn2"), dim, context_dim, n_heads, d_head, upcast_attention)?;
        let norm1 = nn::layer_norm(dim, 1e-5, vs.pp("norm1"))?;
        let norm2 = nn::layer_norm(dim, 1e-5, vs.pp("norm2"))?;
        let norm3 = nn::layer_norm(dim, 1e-5, vs.pp("norm3"))?;
        let span = tracing::span!(tracing::Level::TRACE, "basic-transformer");
        Ok(Self { attn1, only_cross_attention, ff, attn2, norm1, norm2, norm3, span })
    }

    fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let _enter = self.span.enter();
        let attn1_context = if self.only_cross_attention { context } else { None };
        let xs = (self.attn1.forward(&self.norm1.forward(xs)?, attn1_context)? + xs)?;
        let xs = (self.attn2.forward(&self.norm2.forward(&xs)?, context)? + xs)?;
        self.ff.forward(&self.norm3.forward(&xs)?)? + xs
    }
}

#[derive(Debug, Clone, Copy)]
pub struct SpatialTransformerConfig {
    pub depth: usize,
    pub num_groups: usize,
    pub context_dim: Option<usize>,
    /// Attention scores in f32 (diffusers' `upcast_attention`).
    pub upcast_attention: bool,
    pub use_linear_projection: bool,
    pub only_cross_attention: bool,
}

impl Default for SpatialTransformerConfig {
    fn default() -> Self {
        Self {
            depth: 1,
            num_groups: 32,
            context_dim: None,
            upcast_attention: false,
            use_linear_projection: false,
            only_cross_attention: false,
        }
    }
}

#[derive(Debug)]
enum Proj {
    Conv2d(Conv2d),
    Linear(Linear),
}

// Aka Transformer2DModel
#[derive(Debug)]
#[allow(dead_code)] // config kept as candle keeps it
pub struct SpatialTransformer {
    norm: sdmesh_core::norm::GroupNorm,
    proj_in: Proj,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Proj,
    span: tracing::Span,
    pub config: SpatialTransformerConfig,
}

impl SpatialTransformer {
    pub fn new(
        vs: nn::VarBuilder,
        in_channels: usize,
        n_heads: usize,
        d_head: usize,
        config: SpatialTransformerConfig,
    ) -> Result<Self> {
        let inner_dim = n_heads * d_head;
        let norm = sdmesh_core::norm::GroupNorm::new(config.num_groups, in_channels, 1e-6, vs.pp("norm"))?;
        let proj_in = if config.use_linear_projection {
            Proj::Linear(linear(in_channels, inner_dim, vs.pp("proj_in"))?)
        } else {
            Proj::Conv2d(Conv2d::new(in_channels, inner_dim, 1, Default::default(), vs.pp("proj_in"))?)
        };
        let mut transformer_blocks = vec![];
        let vs_tb = vs.pp("transformer_blocks");
        for index in 0..config.depth {
            let tb = BasicTransformerBlock::new(vs_tb.pp(index.to_string()), inner_dim, n_heads, d_head, &config)?;
            transformer_blocks.push(tb)
        }
        let proj_out = if config.use_linear_projection {
            Proj::Linear(linear(in_channels, inner_dim, vs.pp("proj_out"))?)
        } else {
            Proj::Conv2d(Conv2d::new(inner_dim, in_channels, 1, Default::default(), vs.pp("proj_out"))?)
        };
        let span = tracing::span!(tracing::Level::TRACE, "spatial-transformer");
        Ok(Self { norm, proj_in, transformer_blocks, proj_out, span, config })
    }

    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let _enter = self.span.enter();
        let (batch, _channel, height, weight) = xs.dims4()?;
        let residual = xs;
        let xs = self.norm.forward(xs)?;
        let (inner_dim, xs) = match &self.proj_in {
            Proj::Conv2d(p) => {
                let xs = p.forward(&xs)?;
                let inner_dim = xs.dim(1)?;
                let xs = xs.transpose(1, 2)?.t()?.reshape((batch, height * weight, inner_dim))?;
                (inner_dim, xs)
            }
            Proj::Linear(p) => (xs.dim(1)?, p.forward_map_to_tokens(&xs)?),
        };
        let mut xs = xs;
        for block in self.transformer_blocks.iter() {
            xs = block.forward(&xs, context)?
        }
        let xs = match &self.proj_out {
            Proj::Conv2d(p) => p.forward(&xs.reshape((batch, height, weight, inner_dim))?.t()?.transpose(1, 2)?)?,
            Proj::Linear(p) => p.forward_tokens_to_map(&xs, (height, weight))?,
        };
        xs + residual
    }
}
