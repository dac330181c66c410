//! sdmesh_core::conv::Conv3x3 (Winograd, the direct kernel or shifted GEMMs, whichever the layer
//! picks; one GEMM over the batch for maps of at most 16 pixels) against candle's CPU
//! convolution at the SD UNet's and VAE's shapes; also the first call's time, which includes
//! making the layer's Winograd weights.
//!   cargo run --release -p sdmesh-unet --example conv_shift [-- "c_in,c_out,side,batch[,stride];..."]
//! (stride 2: the samplers' convolutions, padding 1; SKIP_CANDLE=1 times ours only;
//! SDMESH_CONV_WINOGRAD=0 / SDMESH_CONV_DIRECT=0 to compare kernels)
use candle_core::{Device, Module, Tensor};
use sdmesh_core::conv::Conv3x3;
use std::time::Instant;

fn time<F: FnMut() -> candle_core::Result<Tensor>>(mut f: F) -> candle_core::Result<f64> {
    // Best of ten: this machine's noise is one-sided (other work only ever slows a run).
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..10 {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(best)
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let default = "128,128,256,1;256,256,128,1;512,512,64,1;320,320,32,2;640,640,16,2;1280,1280,8,2;512,512,4,2;4,320,32,2;320,4,32,2";
    let arg = std::env::args().nth(1).unwrap_or_else(|| default.to_string());
    for case in arg.split(';') {
        let v: Vec<usize> = case.split(',').map(|x| x.parse().expect("c_in,c_out,side,batch[,stride]")).collect();
        let (ci, co, s, b) = (v[0], v[1], v[2], v[3]);
        let stride = v.get(4).copied().unwrap_or(1);
        let w = Tensor::randn(0f32, 0.05, (co, ci, 3, 3), &dev)?;
        let bias = Tensor::randn(0f32, 0.05, co, &dev)?;
        let candle =
            candle_nn::Conv2d::new(w, Some(bias), candle_nn::Conv2dConfig { padding: 1, stride, ..Default::default() });
        let ours = Conv3x3::from_conv(candle.clone())?;
        let x = Tensor::randn(0f32, 1., (b, ci, s, s), &dev)?;
        // The first call also makes the layer's Winograd weights, where it runs that kernel.
        let start = Instant::now();
        ours.forward(&x)?;
        let t_first = start.elapsed().as_secs_f64() * 1000.0;
        let t_ours = time(|| ours.forward(&x))?;
        let t_candle = if std::env::var("SKIP_CANDLE").is_ok() { f64::NAN } else { time(|| candle.forward(&x))? };
        let diff = (candle.forward(&x)? - ours.forward(&x)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let out_side = (s - 1) / stride + 1;
        let gflop = 2.0 * (b * co * ci * 9 * out_side * out_side) as f64 / 1e9;
        println!(
            "c_in {ci:4} c_out {co:4} {s:3}x{s:<3} stride {stride} batch {b:2}: candle {t_candle:8.2} ms ({:3.0} GFLOP/s)  Conv3x3 {t_ours:8.2} ms ({:3.0} GFLOP/s)  {:.2}x  diff {diff:.1e}  first call {t_first:.2} ms",
            gflop / t_candle * 1e3,
            gflop / t_ours * 1e3,
            t_candle / t_ours
        );
    }
    Ok(())
}
