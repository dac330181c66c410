//! Where a job's random numbers come from.
//!
//! Every draw of a job (the initial latents, then any noise a stochastic scheduler or DDIM's
//! eta needs, in the order the loop asks for it) comes from one [`NoiseSource`]. In
//! production it is [`SeededNoise`]; tests substitute recorded draws from the reference so
//! stochastic schedulers can be compared exactly.

use crate::torch_rng::TorchGenerator;
use candle_core::{Device, Result, Tensor};

pub trait NoiseSource: Send {
    /// Standard normal f32 noise of `shape`, on the CPU.
    fn randn(&mut self, shape: &[usize]) -> Result<Tensor>;

    /// Draws from the beginning again, for a job run again from its start; false if this source
    /// cannot.
    fn start_over(&mut self) -> bool {
        false
    }
}

/// Noise from a seed, exactly as diffusers draws it with
/// `generator=torch.Generator("cpu").manual_seed(seed)`: one [`TorchGenerator`] for the whole
/// job, each draw `torch.randn(shape, generator=g)` in float32 (see [`crate::torch_rng`] for
/// what that is bit for bit). Deterministic on every platform and replica: same seed, same
/// draws, and the same draws as PyTorch's CPU generator.
pub struct SeededNoise {
    seed: u64,
    generator: TorchGenerator,
}

impl SeededNoise {
    pub fn new(seed: u64) -> Self {
        Self { seed, generator: TorchGenerator::new(seed) }
    }
}

impl NoiseSource for SeededNoise {
    fn randn(&mut self, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        Tensor::from_vec(self.generator.randn(n), shape, &Device::Cpu)
    }

    fn start_over(&mut self) -> bool {
        self.generator = TorchGenerator::new(self.seed);
        true
    }
}

/// Replays given tensors in order (the reference's recorded draws).
pub struct RecordedNoise {
    draws: std::collections::VecDeque<Tensor>,
}

impl RecordedNoise {
    pub fn new(draws: impl IntoIterator<Item = Tensor>) -> Self {
        Self { draws: draws.into_iter().collect() }
    }
}

impl NoiseSource for RecordedNoise {
    fn randn(&mut self, shape: &[usize]) -> Result<Tensor> {
        let t = self.draws.pop_front().ok_or_else(|| candle_core::Error::Msg("no recorded noise left".into()))?;
        if t.dims() != shape {
            return Err(candle_core::Error::Msg(format!("recorded noise has shape {:?}, {shape:?} asked", t.dims())));
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_draws() {
        let a = SeededNoise::new(7).randn(&[2, 4, 3, 3]).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = SeededNoise::new(7).randn(&[2, 4, 3, 3]).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let c = SeededNoise::new(8).randn(&[2, 4, 3, 3]).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        assert!(mean.abs() < 0.5, "{mean}");
    }
}
