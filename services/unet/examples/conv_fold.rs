//! Exploration: does folding the batch into one GEMM make batched 3x3 convolutions cheaper per
//! image at the small spatial sizes of the medium UNet?
use candle_core::{Device, Module, Tensor, D};
use std::time::Instant;

fn folded(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let (bs, c, h, wd) = x.dims4()?;
    let co = w.dim(0)?;
    let xp = x.pad_with_zeros(D::Minus1, 1, 1)?.pad_with_zeros(D::Minus2, 1, 1)?;
    let mut cols = Vec::with_capacity(9);
    for kh in 0..3 {
        for kw in 0..3 {
            cols.push(xp.narrow(2, kh, h)?.narrow(3, kw, wd)?);
        }
    }
    // [B, C, 9, H, W] -> [C, 9, B, H, W] -> [C*9, B*H*W]
    let cols = Tensor::stack(&cols, 2)?.permute((1, 2, 0, 3, 4))?.contiguous()?.reshape((c * 9, bs * h * wd))?;
    let out = w.reshape((co, c * 9))?.matmul(&cols)?; // [co, B*H*W]
    out.reshape((co, bs, h, wd))?.permute((1, 0, 2, 3))?.broadcast_add(&b.reshape((1, co, 1, 1))?)
}

fn time<F: FnMut() -> candle_core::Result<Tensor>>(mut f: F) -> f64 {
    f().unwrap();
    let n = 10;
    let t = Instant::now();
    for _ in 0..n {
        f().unwrap();
    }
    t.elapsed().as_secs_f64() * 1000.0 / n as f64
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for (c, s) in [(128usize, 16usize), (256, 8), (256, 16), (128, 32), (512, 8), (512, 4)] {
        let w = Tensor::randn(0f32, 0.05, (c, c, 3, 3), &dev)?;
        let b = Tensor::randn(0f32, 0.05, c, &dev)?;
        let conv = candle_nn::Conv2d::new(
            w.clone(),
            Some(b.clone()),
            candle_nn::Conv2dConfig { padding: 1, ..Default::default() },
        );
        for bs in [2usize, 4, 16] {
            let x = Tensor::randn(0f32, 1., (bs, c, s, s), &dev)?;
            let t_candle = time(|| conv.forward(&x));
            let t_fold = time(|| folded(&x, &w, &b));
            let diff = (conv.forward(&x)? - folded(&x, &w, &b)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
            println!(
                "c={c:4} {s:2}x{s:<2} batch {bs:2}: candle {t_candle:7.2} ms ({:.2}/img)  folded {t_fold:7.2} ms ({:.2}/img)  diff {diff:.1e}",
                t_candle / bs as f64,
                t_fold / bs as f64
            );
        }
    }
    Ok(())
}
