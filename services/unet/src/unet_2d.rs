//! The SD UNet with one timestep per sample, so steps of different jobs share a forward pass.
//!
//! A fork of candle-transformers 0.11.1 `stable_diffusion::unet_2d` (MIT/Apache-2.0, by the
//! candle authors): construction is unchanged (with this crate's fork of the blocks);
//! `forward` takes a timestep tensor `[batch]` instead of one f64 for the whole batch (the
//! time embedding is per sample in every block already), the time-embedding MLP runs row by
//! row (see [`sdmesh_core::blocks::per_row`]), and the ControlNet residual inputs are left out.

use crate::blocks::*;
use candle_core::{DType, Result, Tensor};
use candle_nn as nn;
use candle_nn::Module;
use candle_transformers::models::stable_diffusion::embeddings::Timesteps;
use candle_transformers::models::stable_diffusion::unet_2d::{BlockConfig, UNet2DConditionModelConfig};
use sdmesh_core::blocks::per_row;
use sdmesh_core::conv::Conv3x3;
use sdmesh_core::linear::{linear, Linear};
use sdmesh_core::norm::GroupNorm;

/// What the SD 2 x4 upscaler's UNet adds to candle's configuration.
#[derive(Debug, Clone, Default)]
pub struct UnetExtras {
    /// diffusers' `only_cross_attention`, per down block (the up blocks take it reversed): in
    /// those blocks' transformers attn1 attends to the text as well as attn2.
    pub only_cross_attention: Vec<bool>,
    /// diffusers' `num_class_embeds`: a learned embedding of a per-sample class label (the
    /// upscaler's noise level) added to the time embedding.
    pub num_class_embeds: Option<usize>,
    /// diffusers' `upcast_attention` (SD 2.1-768 sets it): attention scores in f32 whatever the
    /// model's dtype, where f16 would overflow.
    pub upcast_attention: bool,
}

/// linear_1, SiLU, linear_2 (candle's keeps its layers private).
#[derive(Debug)]
struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

#[derive(Debug)]
enum UNetDownBlock {
    Basic(DownBlock2D),
    CrossAttn(CrossAttnDownBlock2D),
}

#[derive(Debug)]
enum UNetUpBlock {
    Basic(UpBlock2D),
    CrossAttn(CrossAttnUpBlock2D),
}

#[derive(Debug)]
pub struct UNet2DConditionModel {
    conv_in: Conv3x3,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    class_embedding: Option<nn::Embedding>,
    down_blocks: Vec<UNetDownBlock>,
    mid_block: UNetMidBlock2DCrossAttn,
    up_blocks: Vec<UNetUpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv3x3,
    config: UNet2DConditionModelConfig,
}

impl UNet2DConditionModel {
    pub fn new(
        vs: nn::VarBuilder,
        in_channels: usize,
        out_channels: usize,
        config: UNet2DConditionModelConfig,
        extras: &UnetExtras,
    ) -> Result<Self> {
        let n_blocks = config.blocks.len();
        // The transformers of down block `block` (and of its mirror up block), if it has any.
        let cross_attn = |block: usize| -> Option<CrossAttnConfig> {
            let BlockConfig { use_cross_attn, attention_head_dim, .. } = config.blocks[block];
            Some(CrossAttnConfig {
                attn_num_head_channels: attention_head_dim,
                cross_attention_dim: config.cross_attention_dim,
                upcast_attention: extras.upcast_attention,
                use_linear_projection: config.use_linear_projection,
                transformer_layers_per_block: use_cross_attn?,
                only_cross_attention: extras.only_cross_attention.get(block).copied().unwrap_or(false),
            })
        };
        let Some(last) = config.blocks.last() else { candle_core::bail!("the UNet config has no blocks") };
        let b_channels = config.blocks[0].out_channels;
        let (bl_channels, bl_attention_head_dim) = (last.out_channels, last.attention_head_dim);
        let time_embed_dim = b_channels * 4;
        let conv_in = Conv3x3::new(in_channels, b_channels, vs.pp("conv_in"))?;

        let time_proj = Timesteps::new(b_channels, config.flip_sin_to_cos, config.freq_shift);
        let time_embedding = TimestepEmbedding {
            linear_1: linear(b_channels, time_embed_dim, vs.pp("time_embedding").pp("linear_1"))?,
            linear_2: linear(time_embed_dim, time_embed_dim, vs.pp("time_embedding").pp("linear_2"))?,
        };
        let class_embedding = match extras.num_class_embeds {
            Some(n) => Some(nn::embedding(n, time_embed_dim, vs.pp("class_embedding"))?),
            None => None,
        };

        let vs_db = vs.pp("down_blocks");
        let down_blocks = (0..n_blocks)
            .map(|i| {
                let out_channels = config.blocks[i].out_channels;

                let in_channels = if i > 0 { config.blocks[i - 1].out_channels } else { b_channels };
                let db_cfg = DownBlock2DConfig {
                    num_layers: config.layers_per_block,
                    resnet_eps: config.norm_eps,
                    resnet_groups: config.norm_num_groups,
                    add_downsample: i < n_blocks - 1,
                    downsample_padding: config.downsample_padding,
                    ..Default::default()
                };
                if let Some(attn) = cross_attn(i) {
                    let config = CrossAttnDownBlock2DConfig { downblock: db_cfg, attn };
                    let block = CrossAttnDownBlock2D::new(
                        vs_db.pp(i.to_string()),
                        in_channels,
                        out_channels,
                        Some(time_embed_dim),
                        config,
                    )?;
                    Ok(UNetDownBlock::CrossAttn(block))
                } else {
                    let block = DownBlock2D::new(
                        vs_db.pp(i.to_string()),
                        in_channels,
                        out_channels,
                        Some(time_embed_dim),
                        db_cfg,
                    )?;
                    Ok(UNetDownBlock::Basic(block))
                }
            })
            .collect::<Result<Vec<_>>>()?;

        // https://github.com/huggingface/diffusers/blob/a76f2ad538e73b34d5fe7be08c8eb8ab38c7e90c/src/diffusers/models/unet_2d_condition.py#L462
        let mid_transformer_layers_per_block = match config.blocks.last() {
            None => 1,
            Some(block) => block.use_cross_attn.unwrap_or(1),
        };
        let mid_cfg = UNetMidBlock2DCrossAttnConfig {
            resnet_eps: config.norm_eps,
            output_scale_factor: config.mid_block_scale_factor,
            cross_attn_dim: config.cross_attention_dim,
            attn_num_head_channels: bl_attention_head_dim,
            resnet_groups: Some(config.norm_num_groups),
            use_linear_projection: config.use_linear_projection,
            transformer_layers_per_block: mid_transformer_layers_per_block,
            upcast_attention: extras.upcast_attention,
            ..Default::default()
        };

        let mid_block = UNetMidBlock2DCrossAttn::new(vs.pp("mid_block"), bl_channels, Some(time_embed_dim), mid_cfg)?;

        let vs_ub = vs.pp("up_blocks");
        let up_blocks = (0..n_blocks)
            .map(|i| {
                let out_channels = config.blocks[n_blocks - 1 - i].out_channels;

                let prev_out_channels = if i > 0 { config.blocks[n_blocks - i].out_channels } else { bl_channels };
                let in_channels = {
                    let index = if i == n_blocks - 1 { 0 } else { n_blocks - i - 2 };
                    config.blocks[index].out_channels
                };
                let ub_cfg = UpBlock2DConfig {
                    num_layers: config.layers_per_block + 1,
                    resnet_eps: config.norm_eps,
                    resnet_groups: config.norm_num_groups,
                    add_upsample: i < n_blocks - 1,
                    ..Default::default()
                };
                if let Some(attn) = cross_attn(n_blocks - 1 - i) {
                    let config = CrossAttnUpBlock2DConfig { upblock: ub_cfg, attn };
                    let block = CrossAttnUpBlock2D::new(
                        vs_ub.pp(i.to_string()),
                        in_channels,
                        prev_out_channels,
                        out_channels,
                        Some(time_embed_dim),
                        config,
                    )?;
                    Ok(UNetUpBlock::CrossAttn(block))
                } else {
                    let block = UpBlock2D::new(
                        vs_ub.pp(i.to_string()),
                        in_channels,
                        prev_out_channels,
                        out_channels,
                        Some(time_embed_dim),
                        ub_cfg,
                    )?;
                    Ok(UNetUpBlock::Basic(block))
                }
            })
            .collect::<Result<Vec<_>>>()?;

        let conv_norm_out =
            GroupNorm::new(config.norm_num_groups, b_channels, config.norm_eps, vs.pp("conv_norm_out"))?;
        let conv_out = Conv3x3::new(b_channels, out_channels, vs.pp("conv_out"))?;
        Ok(Self {
            conv_in,
            time_proj,
            time_embedding,
            class_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            config,
        })
    }

    /// Model output for `xs` [batch, channels, h, w] at `timesteps` [batch] (any float
    /// dtype) under `encoder_hidden_states` [batch, tokens, dim]; `class_labels` [batch] (u32)
    /// when the model has a class embedding.
    pub fn forward(
        &self,
        xs: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        class_labels: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (bsize, _channels, height, width) = xs.dims4()?;
        if timesteps.dims() != [bsize] {
            candle_core::bail!("timesteps: shape {:?}, expected [{bsize}]", timesteps.dims());
        }
        let n_blocks = self.config.blocks.len();
        let num_upsamplers = n_blocks - 1;
        let default_overall_up_factor = 2usize.pow(num_upsamplers as u32);
        let forward_upsample_size = height % default_overall_up_factor != 0 || width % default_overall_up_factor != 0;
        // 0. center input if necessary
        let xs = if self.config.center_input_sample { ((xs * 2.0)? - 1.0)? } else { xs.clone() };
        // 1. time, per sample
        // The sinusoids in f32 whatever the model's dtype, as diffusers (f16 cannot hold t * freq).
        let emb = self.time_proj.forward(&timesteps.to_dtype(DType::F32)?)?.to_dtype(xs.dtype())?;
        let emb = per_row(&self.time_embedding.linear_1, &emb)?;
        let emb = per_row(&self.time_embedding.linear_2, &nn::ops::silu(&emb)?)?;
        let emb = match (&self.class_embedding, class_labels) {
            (Some(embedding), Some(labels)) if labels.dims() == [bsize] => {
                (emb + embedding.forward(labels)?.to_dtype(xs.dtype())?)?
            }
            (Some(_), labels) => {
                candle_core::bail!(
                    "class_labels: {:?}, expected [{bsize}] (this UNet has a class embedding)",
                    labels.map(|l| l.dims().to_vec())
                )
            }
            (None, None) => emb,
            (None, Some(_)) => candle_core::bail!("class_labels given, but this UNet has no class embedding"),
        };
        // 2. pre-process
        let xs = self.conv_in.forward(&xs)?;
        // 3. down
        let mut down_block_res_xs = vec![xs.clone()];
        let mut xs = xs;
        for down_block in self.down_blocks.iter() {
            let (next, res_xs) = match down_block {
                UNetDownBlock::Basic(b) => b.forward(&xs, Some(&emb))?,
                UNetDownBlock::CrossAttn(b) => b.forward(&xs, Some(&emb), Some(encoder_hidden_states))?,
            };
            down_block_res_xs.extend(res_xs);
            xs = next;
        }
        // 4. mid
        let mut xs = self.mid_block.forward(&xs, Some(&emb), Some(encoder_hidden_states))?;
        // 5. up
        let mut upsample_size = None;
        for (i, up_block) in self.up_blocks.iter().enumerate() {
            let n_resnets = match up_block {
                UNetUpBlock::Basic(b) => b.resnets.len(),
                UNetUpBlock::CrossAttn(b) => b.upblock.resnets.len(),
            };
            let res_xs = down_block_res_xs.split_off(down_block_res_xs.len() - n_resnets);
            if i < n_blocks - 1 && forward_upsample_size {
                if let Some(last) = down_block_res_xs.last() {
                    let (_, _, h, w) = last.dims4()?;
                    upsample_size = Some((h, w))
                }
            }
            xs = match up_block {
                UNetUpBlock::Basic(b) => b.forward(&xs, &res_xs, Some(&emb), upsample_size)?,
                UNetUpBlock::CrossAttn(b) => {
                    b.forward(&xs, &res_xs, Some(&emb), upsample_size, Some(encoder_hidden_states))?
                }
            };
        }
        // 6. post-process
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&xs)?)
    }
}
