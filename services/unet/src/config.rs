//! unet/config.json (diffusers' UNet2DConditionModel) -> candle's UNet configuration.
//! Everything comes from the file; what this UNet cannot run is rejected by name.

use crate::unet_2d::UnetExtras;
use candle_transformers::models::stable_diffusion::unet_2d::{BlockConfig, UNet2DConditionModelConfig};
use serde::Deserialize;

/// diffusers accepts a single value or one per block for several keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    fn get(&self, i: usize) -> Option<usize> {
        match self {
            PerBlock::One(v) => Some(*v),
            PerBlock::Each(v) => v.get(i).copied(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct UnetConfigJson {
    #[serde(default = "four")]
    pub in_channels: usize,
    #[serde(default = "four")]
    pub out_channels: usize,
    pub sample_size: Option<usize>,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "two")]
    pub layers_per_block: usize,
    #[serde(default = "eight")]
    pub attention_head_dim: PerBlock,
    /// diffusers' `num_attention_heads`; when null, `attention_head_dim` is the head count
    /// (a naming mistake diffusers keeps for compatibility).
    pub num_attention_heads: Option<PerBlock>,
    pub cross_attention_dim: usize,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "eps")]
    pub norm_eps: f64,
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "one")]
    pub downsample_padding: usize,
    #[serde(default = "one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "transformer_layers")]
    pub transformer_layers_per_block: PerBlock,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default)]
    pub only_cross_attention: serde_json::Value,
    pub class_embed_type: Option<String>,
    pub num_class_embeds: Option<usize>,
    pub addition_embed_type: Option<String>,
    pub time_cond_proj_dim: Option<usize>,
    pub encoder_hid_dim: Option<usize>,
    pub mid_block_type: Option<String>,
    #[serde(default = "positional")]
    pub time_embedding_type: String,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default = "default_shift")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "three")]
    pub conv_in_kernel: usize,
    #[serde(default = "three")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub dual_cross_attention: bool,
}

fn one() -> usize {
    1
}
fn two() -> usize {
    2
}
fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn eight() -> PerBlock {
    PerBlock::One(8)
}
fn thirty_two() -> usize {
    32
}
fn eps() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}
fn one_f() -> f64 {
    1.0
}
fn transformer_layers() -> PerBlock {
    PerBlock::One(1)
}
fn positional() -> String {
    "positional".into()
}
fn silu() -> String {
    "silu".into()
}
fn default_shift() -> String {
    "default".into()
}

impl UnetConfigJson {
    /// The candle configuration and what this crate's fork adds to it, or what in this config
    /// is not supported.
    pub fn to_candle(&self) -> Result<(UNet2DConditionModelConfig, UnetExtras), String> {
        let unsupported = |what: &str| Err(format!("{what} is not supported by this UNet"));
        if let Some(t) = &self.class_embed_type {
            return unsupported(&format!("class_embed_type {t:?} (only a plain num_class_embeds embedding)"));
        }
        if self.addition_embed_type.is_some() || self.time_cond_proj_dim.is_some() || self.encoder_hid_dim.is_some() {
            return unsupported("addition_embed_type / time_cond_proj_dim / encoder_hid_dim");
        }
        let n = self.block_out_channels.len();
        let only_cross_attention: Vec<bool> = match &self.only_cross_attention {
            serde_json::Value::Null => vec![false; n],
            serde_json::Value::Bool(b) => vec![*b; n],
            serde_json::Value::Array(v) if v.len() == n && v.iter().all(|b| b.is_boolean()) => {
                v.iter().map(|b| b.as_bool().unwrap_or(false)).collect()
            }
            other => return Err(format!("only_cross_attention {other}: expected a bool or one per block ({n})")),
        };
        let extras = UnetExtras {
            only_cross_attention,
            num_class_embeds: self.num_class_embeds,
            upcast_attention: self.upcast_attention,
        };
        if self.dual_cross_attention {
            return unsupported("dual_cross_attention");
        }
        if self.time_embedding_type != "positional" {
            return unsupported(&format!("time_embedding_type {:?}", self.time_embedding_type));
        }
        if self.act_fn != "silu" || self.resnet_time_scale_shift != "default" {
            return unsupported(&format!(
                "act_fn {:?} / resnet_time_scale_shift {:?}",
                self.act_fn, self.resnet_time_scale_shift
            ));
        }
        if self.conv_in_kernel != 3 || self.conv_out_kernel != 3 {
            return unsupported("conv_in_kernel / conv_out_kernel other than 3");
        }
        if let Some(mid) = &self.mid_block_type {
            if mid != "UNetMidBlock2DCrossAttn" {
                return unsupported(&format!("mid_block_type {mid:?}"));
            }
        }
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(format!(
                "block_out_channels ({n}), down_block_types ({}) and up_block_types ({}) must have the same, non-zero length",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        let heads = self.num_attention_heads.as_ref().unwrap_or(&self.attention_head_dim);
        let mut blocks = Vec::with_capacity(n);
        for (i, down) in self.down_block_types.iter().enumerate() {
            let cross = match down.as_str() {
                "CrossAttnDownBlock2D" => true,
                "DownBlock2D" => false,
                other => return unsupported(&format!("down block type {other:?}")),
            };
            let up = &self.up_block_types[n - 1 - i];
            let up_cross = match up.as_str() {
                "CrossAttnUpBlock2D" => true,
                "UpBlock2D" => false,
                other => return unsupported(&format!("up block type {other:?}")),
            };
            if up_cross != cross {
                return Err(format!("up block {up:?} does not mirror down block {down:?}"));
            }
            let out_channels = self.block_out_channels[i];
            let attention_head_dim = heads.get(i).ok_or("attention_head_dim has fewer entries than blocks")?;
            if attention_head_dim == 0
                || !out_channels.is_multiple_of(attention_head_dim)
                || !out_channels.is_multiple_of(self.norm_num_groups)
            {
                return Err(format!(
                    "block {i}: {out_channels} channels do not divide into {attention_head_dim} heads / {} groups",
                    self.norm_num_groups
                ));
            }
            let layers = self
                .transformer_layers_per_block
                .get(i)
                .ok_or("transformer_layers_per_block has fewer entries than blocks")?;
            blocks.push(BlockConfig { out_channels, use_cross_attn: cross.then_some(layers), attention_head_dim });
        }
        let candle = UNet2DConditionModelConfig {
            center_input_sample: self.center_input_sample,
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
            blocks,
            layers_per_block: self.layers_per_block,
            downsample_padding: self.downsample_padding,
            mid_block_scale_factor: self.mid_block_scale_factor,
            norm_num_groups: self.norm_num_groups,
            norm_eps: self.norm_eps,
            cross_attention_dim: self.cross_attention_dim,
            sliced_attention_size: None,
            use_linear_projection: self.use_linear_projection,
        };
        Ok((candle, extras))
    }
}
