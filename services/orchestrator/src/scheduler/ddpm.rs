//! diffusers' `DDPMScheduler` (Ho et al. 2020) for inference: ancestral sampling over the
//! chosen timesteps, stepping from each timestep to the next one of the list, drawing fresh
//! noise (of the model output's shape) at every step whose timestep is above 0.

use super::config::{DdpmConfig, PredictionType, Thresholding, TimestepSpacing, VarianceType};
use super::numerics::{np_arange, np_linspace, np_round, threshold_sample, torch_clamp};
use super::{check_same_shape, check_steps, checked_timesteps, step_out_of_range, to_f32_vec, Scheduler};
use candle_core::{Result, Tensor};

const CLASS: &str = "DDPMScheduler";

#[derive(Clone, Copy, Debug)]
struct Coefficients {
    sqrt_alpha_t: f32,
    sqrt_beta_t: f32,
    /// weight of x0 and of the sample in the posterior mean
    c_x0: f32,
    c_sample: f32,
    /// standard deviation of the added noise; `None` at timestep 0 (no draw)
    std: Option<f32>,
}

pub struct Ddpm {
    timesteps: Vec<f64>,
    coefficients: Vec<Coefficients>,
    prediction_type: PredictionType,
    clip_sample_range: Option<f32>,
    thresholding: Option<Thresholding>,
}

/// `set_timesteps(steps)` (before the range check).
pub fn ddpm_timesteps(spacing: TimestepSpacing, n: usize, steps_offset: i64, steps: usize) -> Vec<i64> {
    match spacing {
        TimestepSpacing::Linspace => {
            np_linspace(0.0, (n - 1) as f64, steps).into_iter().rev().map(|t| np_round(t) as i64).collect()
        }
        TimestepSpacing::Leading => {
            let ratio = (n / steps) as i64;
            (0..steps as i64).rev().map(|i| i * ratio + steps_offset).collect()
        }
        TimestepSpacing::Trailing => {
            np_arange(n as f64, 0.0, -(n as f64 / steps as f64)).into_iter().map(|t| np_round(t) as i64 - 1).collect()
        }
    }
}

impl Ddpm {
    pub fn new(cfg: &DdpmConfig, steps: usize) -> std::result::Result<Self, String> {
        let n = cfg.betas.num_train_timesteps;
        check_steps(n, steps)?;
        let ts = ddpm_timesteps(cfg.timestep_spacing, n, cfg.steps_offset, steps);
        let timesteps = checked_timesteps(CLASS, &ts, n, steps)?;
        let alphas_cumprod = cfg.betas.alphas_cumprod();
        let coefficients = ts
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                // The previous timestep is the next one of the list (-1 after the last).
                let prev = ts.get(i + 1).copied().unwrap_or(-1);
                let alpha_t = alphas_cumprod[t as usize];
                let alpha_prev = if prev >= 0 { alphas_cumprod[prev as usize] } else { 1.0 };
                let beta_t = 1.0 - alpha_t;
                let beta_prev = 1.0 - alpha_prev;
                let current_alpha = alpha_t / alpha_prev;
                let current_beta = 1.0 - current_alpha;
                let std = (t > 0).then(|| {
                    // _get_variance recomputes current_beta the same way.
                    let variance = ((1.0 - alpha_prev) / (1.0 - alpha_t) * current_beta).max(1e-20);
                    let variance = match cfg.variance_type {
                        VarianceType::FixedSmall => variance,
                        VarianceType::FixedSmallLog => (0.5 * variance.ln()).exp(),
                        VarianceType::FixedLarge => current_beta,
                    };
                    variance.sqrt()
                });
                Coefficients {
                    sqrt_alpha_t: alpha_t.sqrt(),
                    sqrt_beta_t: beta_t.sqrt(),
                    c_x0: alpha_prev.sqrt() * current_beta / beta_t,
                    c_sample: current_alpha.sqrt() * beta_prev / beta_t,
                    std,
                }
            })
            .collect();
        Ok(Self {
            timesteps,
            coefficients,
            prediction_type: cfg.prediction_type,
            clip_sample_range: (cfg.clip_sample && cfg.thresholding.is_none()).then_some(cfg.clip_sample_range as f32),
            thresholding: cfg.thresholding,
        })
    }
}

impl Scheduler for Ddpm {
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
        let mut x0: Vec<f32> = match self.prediction_type {
            PredictionType::Epsilon => {
                s.iter().zip(&m).map(|(s, m)| (s - c.sqrt_beta_t * m) / c.sqrt_alpha_t).collect()
            }
            PredictionType::Sample => m.clone(),
            PredictionType::VPrediction => {
                s.iter().zip(&m).map(|(s, m)| c.sqrt_alpha_t * s - c.sqrt_beta_t * m).collect()
            }
        };
        if let Some(th) = self.thresholding {
            let batch = *sample.dims().first().unwrap_or(&1);
            threshold_sample(&mut x0, batch, th.dynamic_thresholding_ratio, th.sample_max_value);
        } else if let Some(range) = self.clip_sample_range {
            x0.iter_mut().for_each(|v| *v = torch_clamp(*v, -range, range));
        }
        let mut prev: Vec<f32> = x0.iter().zip(&s).map(|(x0, s)| c.c_x0 * x0 + c.c_sample * s).collect();
        if let Some(std) = c.std {
            let z = to_f32_vec(&noise.randn(model_output.dims())?)?;
            for (p, z) in prev.iter_mut().zip(&z) {
                *p += std * z;
            }
        }
        Tensor::from_vec(prev, sample.dims(), sample.device())
    }
}
