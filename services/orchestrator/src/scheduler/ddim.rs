//! diffusers' `DDIMScheduler` (Song et al. 2020), eta = 0 (deterministic) or eta > 0.
//!
//! Every per-step coefficient is a float32 scalar computed as diffusers computes its 0-d
//! float32 tensors (up to torch's MKL sqrt, see the module docs), and the elementwise math
//! keeps diffusers' operation order.

use super::config::{DdimConfig, PredictionType, Thresholding, TimestepSpacing};
use super::numerics::{np_arange, np_linspace, np_round, threshold_sample, torch_clamp};
use super::{check_same_shape, check_steps, checked_timesteps, step_out_of_range, to_f32_vec, Scheduler};
use candle_core::{Result, Tensor};

const CLASS: &str = "DDIMScheduler";

/// Float32 coefficients of one step.
#[derive(Clone, Copy, Debug)]
struct Coefficients {
    /// sqrt(alpha_bar_t)
    sqrt_alpha_t: f32,
    /// sqrt(1 - alpha_bar_t)
    sqrt_beta_t: f32,
    /// sqrt(alpha_bar_prev)
    sqrt_alpha_prev: f32,
    /// sqrt(1 - alpha_bar_prev - std_dev_t^2), the weight of the predicted noise
    direction: f32,
    /// eta * sqrt(variance), the weight of fresh noise
    std_dev_t: f32,
}

pub struct Ddim {
    timesteps: Vec<f64>,
    coefficients: Vec<Coefficients>,
    prediction_type: PredictionType,
    clip_sample_range: Option<f32>,
    thresholding: Option<Thresholding>,
    stochastic: bool,
}

/// diffusers' `DDIMScheduler.set_timesteps(steps)` (before the range check).
pub fn ddim_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    steps_offset: i64,
    steps: usize,
) -> Vec<i64> {
    let n = num_train_timesteps;
    match spacing {
        TimestepSpacing::Linspace => {
            np_linspace(0.0, (n - 1) as f64, steps).into_iter().rev().map(|t| np_round(t) as i64).collect()
        }
        TimestepSpacing::Leading => {
            let ratio = (n / steps) as i64;
            (0..steps as i64).rev().map(|i| i * ratio + steps_offset).collect()
        }
        // A float step: np.arange can give steps + 1 values (e.g. 61 steps), the last of
        // which rounds to 0 and becomes timestep -1 (rejected by the range check).
        TimestepSpacing::Trailing => {
            np_arange(n as f64, 0.0, -(n as f64 / steps as f64)).into_iter().map(|t| np_round(t) as i64 - 1).collect()
        }
    }
}

impl Ddim {
    pub fn new(cfg: &DdimConfig, steps: usize, eta: f64) -> std::result::Result<Self, String> {
        if !eta.is_finite() || eta < 0.0 {
            return Err(format!("eta must be a finite number >= 0, got {eta}"));
        }
        let n = cfg.betas.num_train_timesteps;
        check_steps(n, steps)?;
        let timesteps =
            checked_timesteps(CLASS, &ddim_timesteps(cfg.timestep_spacing, n, cfg.steps_offset, steps), n, steps)?;
        let alphas_cumprod = cfg.betas.alphas_cumprod();
        let final_alpha_cumprod = if cfg.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] };
        // Surprising but diffusers': the previous timestep is always t - n // steps, whatever
        // the spacing (with "trailing" or "linspace" it is not the next timestep of the list).
        let gap = (n / steps) as i64;
        // `eta * variance ** 0.5`: the Python float is cast to float32 by torch.
        let eta32 = eta as f32;
        let mut coefficients = Vec::with_capacity(timesteps.len());
        for &t in &timesteps {
            let t = t as i64;
            let prev = t - gap;
            let alpha_t = alphas_cumprod[t as usize];
            let alpha_prev = if prev >= 0 { alphas_cumprod[prev as usize] } else { final_alpha_cumprod };
            let beta_t = 1.0 - alpha_t;
            let beta_prev = 1.0 - alpha_prev;
            let variance = (beta_prev / beta_t) * (1.0 - alpha_t / alpha_prev);
            let std_dev_t = eta32 * variance.sqrt();
            let direction = (1.0 - alpha_prev - std_dev_t * std_dev_t).sqrt();
            if eta > 0.0 && direction.is_nan() {
                return Err(format!(
                    "eta {eta} is too large for this noise schedule: at timestep {t} the DDIM noise weight \
                     exceeds sqrt(1 - alpha_bar_prev) (eta <= 1 always works)"
                ));
            }
            coefficients.push(Coefficients {
                sqrt_alpha_t: alpha_t.sqrt(),
                sqrt_beta_t: beta_t.sqrt(),
                sqrt_alpha_prev: alpha_prev.sqrt(),
                direction,
                std_dev_t,
            });
        }
        Ok(Self {
            timesteps,
            coefficients,
            prediction_type: cfg.prediction_type,
            // Thresholding replaces clipping when both are set.
            clip_sample_range: (cfg.clip_sample && cfg.thresholding.is_none()).then_some(cfg.clip_sample_range as f32),
            thresholding: cfg.thresholding,
            stochastic: eta > 0.0,
        })
    }
}

impl Scheduler for Ddim {
    fn noise_scales(&self, index: usize) -> (f32, f32) {
        let c = &self.coefficients[index];
        (c.sqrt_alpha_t, c.sqrt_beta_t)
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn crate::noise::NoiseSource,
    ) -> Result<Tensor> {
        check_same_shape(model_output, sample)?;
        let c =
            *self.coefficients.get(step_index).ok_or_else(|| step_out_of_range(step_index, self.timesteps.len()))?;
        let m = to_f32_vec(model_output)?;
        let s = to_f32_vec(sample)?;
        // x0 and epsilon as diffusers forms them (epsilon never uses the clipped x0:
        // the pipeline does not pass use_clipped_model_output).
        let (mut x0, eps): (Vec<f32>, Vec<f32>) = match self.prediction_type {
            PredictionType::Epsilon => {
                (s.iter().zip(&m).map(|(s, m)| (s - c.sqrt_beta_t * m) / c.sqrt_alpha_t).collect(), m)
            }
            PredictionType::Sample => {
                let eps = s.iter().zip(&m).map(|(s, m)| (s - c.sqrt_alpha_t * m) / c.sqrt_beta_t).collect();
                (m, eps)
            }
            PredictionType::VPrediction => s
                .iter()
                .zip(&m)
                .map(|(s, m)| (c.sqrt_alpha_t * s - c.sqrt_beta_t * m, c.sqrt_alpha_t * m + c.sqrt_beta_t * s))
                .unzip(),
        };
        if let Some(th) = self.thresholding {
            let batch = *sample.dims().first().unwrap_or(&1);
            threshold_sample(&mut x0, batch, th.dynamic_thresholding_ratio, th.sample_max_value);
        } else if let Some(range) = self.clip_sample_range {
            for v in &mut x0 {
                *v = torch_clamp(*v, -range, range);
            }
        }
        let mut prev: Vec<f32> = x0.iter().zip(&eps).map(|(x0, e)| c.sqrt_alpha_prev * x0 + c.direction * e).collect();
        if self.stochastic {
            let z = to_f32_vec(&noise.randn(model_output.dims())?)?;
            for (p, z) in prev.iter_mut().zip(&z) {
                *p += c.std_dev_t * z;
            }
        }
        Tensor::from_vec(prev, sample.dims(), sample.device())
    }
}
