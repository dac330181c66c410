//! `sdmesh_core::attention::multi_head_attention` on the CPU at the SD UNet's shapes (batch 2,
//! heads of 64): self-attention over a level's tokens and cross-attention to 77 text tokens.
//!   cargo run --release -p sdmesh-unet --example attention_shapes [-- "tokens,channels,kv_tokens;..."]
use candle_core::{Device, Tensor};
use sdmesh_core::attention::multi_head_attention;
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    let default = "1024,320,1024;256,640,256;64,1280,64;1024,320,77;1024,128,1024;4096,320,4096";
    let arg = std::env::args().nth(1).unwrap_or_else(|| default.to_string());
    for case in arg.split(';') {
        let v: Vec<usize> = case.split(',').map(|x| x.parse().expect("tokens,channels,kv_tokens")).collect();
        let (tokens, channels, kv) = (v[0], v[1], v[2]);
        let heads = channels / 64;
        let q = Tensor::randn(0f32, 1., (2, tokens, channels), &Device::Cpu)?;
        let k = Tensor::randn(0f32, 1., (2, kv, channels), &Device::Cpu)?;
        let val = Tensor::randn(0f32, 1., (2, kv, channels), &Device::Cpu)?;
        multi_head_attention(&q, &k, &val, heads, 0.125, false)?;
        // Best of ten: this machine's noise only ever slows a run.
        let mut best = f64::INFINITY;
        for _ in 0..10 {
            let t = Instant::now();
            multi_head_attention(&q, &k, &val, heads, 0.125, false)?;
            best = best.min(t.elapsed().as_secs_f64() * 1e3);
        }
        println!("batch 2, {tokens:5} tokens x {channels:4} channels ({heads:2} heads), {kv:5} keys: {best:7.2} ms");
    }
    Ok(())
}
