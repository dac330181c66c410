//! The UNet transformers' linear layers with and without this project's fusions, on the CPU at
//! the SD UNets' shapes at 512 px (batch 2; a width per level: 128-512 for the medium model,
//! 320-1280 for the full one):
//! - GEGLU's projection and gate apart (`geglu(linear.forward(x))`) and fused
//!   (`Linear::forward_geglu`); the projection is to 8x the width;
//! - `proj_in` and `proj_out` on a transposed copy of the map or tokens (candle's way) and on
//!   them where they lie (`Linear::forward_map_to_tokens`, `forward_tokens_to_map`).
//!   cargo run --release -p sdmesh-unet --example linear_fusions [-- "map_side,width;..."]
use candle_core::{Device, Module, Result, Tensor};
use sdmesh_core::linear::Linear;
use std::time::Instant;

/// Best of seven of each, alternating (this machine's noise only ever slows a run), in ms.
fn best_of_seven(mut a: impl FnMut() -> Result<Tensor>, mut b: impl FnMut() -> Result<Tensor>) -> Result<[f64; 2]> {
    let mut best = [f64::MAX; 2];
    for _ in 0..7 {
        for (i, f) in [&mut a as &mut dyn FnMut() -> Result<Tensor>, &mut b].into_iter().enumerate() {
            let t = Instant::now();
            f()?;
            best[i] = best[i].min(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(best)
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

fn linear(dim_in: usize, dim_out: usize) -> Result<Linear> {
    let w = Tensor::randn(0f32, 0.1, (dim_out, dim_in), &Device::Cpu)?;
    Linear::new(w, Some(Tensor::randn(0f32, 0.1, dim_out, &Device::Cpu)?))
}

fn main() -> Result<()> {
    let default = "64,128;32,256;16,512;64,320;32,640;16,1280";
    let arg = std::env::args().nth(1).unwrap_or_else(|| default.to_string());
    for case in arg.split(';') {
        let v: Vec<usize> = case.split(',').map(|x| x.parse().expect("map_side,width")).collect();
        let (side, dim) = (v[0], v[1]);
        let tokens = 2 * side * side;

        let proj = linear(dim, dim * 8)?;
        let x = Tensor::randn(0f32, 1., (tokens, dim), &Device::Cpu)?;
        let apart = || sdmesh_core::activation::geglu(&proj.forward(&x)?);
        let diff = max_diff(&apart()?, &proj.forward_geglu(&x)?)?;
        let [a, f] = best_of_seven(apart, || proj.forward_geglu(&x))?;
        println!("GEGLU    {tokens:5} x {dim:4}: apart {a:7.2} ms, fused {f:7.2} ms ({:.2}x), diff {diff:e}", a / f);

        let proj = linear(dim, dim)?;
        let map = Tensor::randn(0f32, 1., (2, dim, side, side), &Device::Cpu)?;
        let copied = || proj.forward(&map.transpose(1, 2)?.t()?.reshape((2, side * side, dim))?);
        let diff = max_diff(&copied()?, &proj.forward_map_to_tokens(&map)?)?;
        let [a, f] = best_of_seven(copied, || proj.forward_map_to_tokens(&map))?;
        println!(
            "proj_in  {tokens:5} x {dim:4}: copied {a:6.2} ms, in place {f:6.2} ms ({:.2}x), diff {diff:e}",
            a / f
        );

        let tokens_in = Tensor::randn(0f32, 1., (2, side * side, dim), &Device::Cpu)?;
        // With the residual add after it, as the transformer has it: a transposed view adds slowly.
        let copied = || proj.forward(&tokens_in)?.reshape((2, side, side, dim))?.t()?.transpose(1, 2)? + &map;
        let in_place = || proj.forward_tokens_to_map(&tokens_in, (side, side))? + &map;
        let diff = max_diff(&copied()?, &in_place()?)?;
        let [a, f] = best_of_seven(copied, in_place)?;
        println!(
            "proj_out {tokens:5} x {dim:4}: copied {a:6.2} ms, in place {f:6.2} ms ({:.2}x), diff {diff:e}",
            a / f
        );
    }
    Ok(())
}
