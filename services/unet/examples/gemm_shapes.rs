//! How fast candle's CPU matmul (the `gemm` crate) runs on the shapes SD spends its time in:
//! 3x3-convolution-like GEMMs and the linear layers' transposed-weight products. Build it
//! with and without `gemm`'s `x86-v4` feature (AVX-512 kernels) to compare them.
//!   cargo run --release -p sdmesh-unet --example gemm_shapes
use candle_core::{Device, Tensor};
use std::time::Instant;
fn main() -> candle_core::Result<()> {
    for &(m, n, k, t) in &[
        (2048usize, 2048usize, 2048usize, false),
        (128, 65536, 1152, false),
        (128, 8192, 128, false),
        (154, 4096, 1024, true),
        (154, 4096, 1024, false),
        (154, 1024, 4096, true),
        (154, 1024, 4096, false),
        (154, 1024, 1024, true),
        (2048, 320, 320, true),
        (2048, 320, 320, false),
        (2048, 2560, 320, true),
        (2048, 2560, 320, false),
        (2048, 320, 1280, true),
        (2048, 320, 1280, false),
        (10240, 1024, 64, false),
        (10240, 64, 1024, false),
    ] {
        let a = Tensor::randn(0f32, 1., (m, k), &Device::Cpu)?;
        let b = if t {
            Tensor::randn(0f32, 1., (n, k), &Device::Cpu)?.t()?
        } else {
            Tensor::randn(0f32, 1., (k, n), &Device::Cpu)?
        };
        a.matmul(&b)?;
        let mut best = f64::MAX;
        for _ in 0..7 {
            let t = Instant::now();
            a.matmul(&b)?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!("{m}x{n}x{k} rhs_t={t}: {:.2} ms {:.0} GFLOP/s", best * 1e3, 2.0 * (m * n * k) as f64 / best / 1e9);
    }
    Ok(())
}
