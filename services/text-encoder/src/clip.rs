//! The CLIP text transformer (transformers' `CLIPTextModel`), configured from its
//! config.json, so OpenCLIP ViT-H (SD 2.x: 23 layers, exact GELU) and ViT-L (SD 1.x, quick
//! GELU) load with the same code. Returns the last hidden state after the final layer norm.
//! Any batch size; the causal mask is the only mask (SD pipelines pass no attention mask).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{embedding, layer_norm, Embedding, LayerNorm, LayerNormConfig, VarBuilder};
use sdmesh_core::linear::{linear, Linear};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}

#[derive(Debug, Clone, Copy)]
enum Activation {
    QuickGelu,
    /// transformers' "gelu": the exact erf form.
    GeluErf,
    /// "gelu_new" / "gelu_pytorch_tanh": the tanh approximation.
    GeluTanh,
}

impl Activation {
    fn parse(name: &str) -> std::result::Result<Self, String> {
        match name {
            "quick_gelu" => Ok(Self::QuickGelu),
            "gelu" => Ok(Self::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(Self::GeluTanh),
            other => Err(format!("hidden_act {other:?} is not supported (quick_gelu, gelu, gelu_new)")),
        }
    }

    fn forward(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Self::GeluErf => sdmesh_core::activation::gelu_erf(xs),
            Self::GeluTanh => xs.gelu(),
        }
    }
}

struct Attention {
    /// q_proj, k_proj and v_proj as one projection to [q | k | v] (one GEMM, not three).
    qkv: Linear,
    out: Linear,
    heads: usize,
    hidden: usize,
}

impl Attention {
    fn new(vb: VarBuilder, c: &ClipTextConfig) -> Result<Self> {
        let d = c.hidden_size;
        let (mut weights, mut biases) = (Vec::new(), Vec::new());
        for name in ["q_proj", "k_proj", "v_proj"] {
            weights.push(vb.pp(name).get((d, d), "weight")?);
            biases.push(vb.pp(name).get(d, "bias")?);
        }
        Ok(Self {
            qkv: Linear::new(Tensor::cat(&weights, 0)?, Some(Tensor::cat(&biases, 0)?))?,
            out: linear(d, d, vb.pp("out_proj"))?,
            heads: c.num_attention_heads,
            hidden: d,
        })
    }

    /// `mask`: [`sdmesh_core::attention::causal_mask`] of the tokens (used off the CPU f32 path).
    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let d = self.hidden;
        let qkv = self.qkv.forward(xs)?;
        let (q, k, v) = (qkv.narrow(2, 0, d)?, qkv.narrow(2, d, d)?, qkv.narrow(2, 2 * d, d)?);
        let scale = ((d / self.heads) as f64).powf(-0.5);
        let ys = sdmesh_core::attention::causal_self_attention(&q, &k, &v, self.heads, scale, mask)?;
        self.out.forward(&ys)
    }
}

struct EncoderLayer {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl EncoderLayer {
    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let xs = (xs + self.attn.forward(&self.norm1.forward(xs)?, mask)?)?;
        let h = self.fc2.forward(&self.act.forward(&self.fc1.forward(&self.norm2.forward(&xs)?)?)?)?;
        xs + h
    }
}

pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_norm: LayerNorm,
    max_positions: usize,
    hidden_size: usize,
}

impl ClipTextModel {
    /// `vb` is rooted at the checkpoint's top level (tensors under `text_model.`).
    pub fn new(vb: VarBuilder, c: &ClipTextConfig) -> std::result::Result<Self, String> {
        let act = Activation::parse(&c.hidden_act)?;
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                c.hidden_size, c.num_attention_heads
            ));
        }
        let build = || -> Result<Self> {
            // transformers 4 saved every key under `text_model.`; transformers 5 saves them bare.
            let vb = if vb.contains_tensor("text_model.final_layer_norm.weight") { vb.pp("text_model") } else { vb };
            let ln = LayerNormConfig { eps: c.layer_norm_eps, ..Default::default() };
            let emb = vb.pp("embeddings");
            let layers = (0..c.num_hidden_layers)
                .map(|i| {
                    let l = vb.pp(format!("encoder.layers.{i}"));
                    Ok(EncoderLayer {
                        norm1: layer_norm(c.hidden_size, ln, l.pp("layer_norm1"))?,
                        attn: Attention::new(l.pp("self_attn"), c)?,
                        norm2: layer_norm(c.hidden_size, ln, l.pp("layer_norm2"))?,
                        fc1: linear(c.hidden_size, c.intermediate_size, l.pp("mlp.fc1"))?,
                        fc2: linear(c.intermediate_size, c.hidden_size, l.pp("mlp.fc2"))?,
                        act,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Self {
                token_embedding: embedding(c.vocab_size, c.hidden_size, emb.pp("token_embedding"))?,
                position_embedding: embedding(c.max_position_embeddings, c.hidden_size, emb.pp("position_embedding"))?,
                layers,
                final_norm: layer_norm(c.hidden_size, ln, vb.pp("final_layer_norm"))?,
                max_positions: c.max_position_embeddings,
                hidden_size: c.hidden_size,
            })
        };
        build().map_err(|e| e.to_string())
    }

    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// `input_ids`: u32 [batch, seq] with seq <= max_position_embeddings.
    /// Returns the last hidden state [batch, seq, hidden] in f32.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (_, seq) = input_ids.dims2()?;
        let device = input_ids.device();
        let positions = Tensor::arange(0u32, seq as u32, device)?;
        let mut xs =
            self.token_embedding.forward(input_ids)?.broadcast_add(&self.position_embedding.forward(&positions)?)?;
        // One mask for all layers (on a GPU, one copy from the host per forward pass).
        let mask = sdmesh_core::attention::causal_mask(seq, device)?;
        for layer in &self.layers {
            xs = layer.forward(&xs, &mask)?;
        }
        self.final_norm.forward(&xs)?.to_dtype(DType::F32)
    }
}
