//! diffusers' `PNDMScheduler` with `skip_prk_steps` (PLMS, Liu et al. 2022): the default
//! scheduler of Stable Diffusion 2.1-base. A linear multistep method on the noise prediction;
//! the second timestep repeats (N steps give N + 1 timesteps): the first step is an Euler
//! step, the second redoes it from the same sample with the average of both model outputs.

use super::config::{PndmConfig, PredictionType, TimestepSpacing};
use super::numerics::{np_arange, np_linspace, np_round};
use super::{check_same_shape, check_steps, checked_timesteps, step_out_of_range, to_f32_vec, Scheduler};
use candle_core::{Result, Tensor};

const CLASS: &str = "PNDMScheduler";

pub struct Pndm {
    timesteps: Vec<f64>,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    /// num_train_timesteps // steps: PLMS always steps back by this much.
    ratio: i64,
    prediction_type: PredictionType,
    /// The past model outputs (at most 4 kept).
    ets: Vec<Vec<f32>>,
    cur_sample: Option<Vec<f32>>,
    counter: usize,
    /// Where the loop starts (set_begin_index); the counter runs from there.
    begin: usize,
}

/// `set_timesteps(steps)` with skip_prk_steps: the PLMS timesteps, descending.
pub fn pndm_timesteps(spacing: TimestepSpacing, n: usize, steps_offset: i64, steps: usize) -> Vec<i64> {
    let ts: Vec<i64> = match spacing {
        TimestepSpacing::Linspace => {
            np_linspace(0.0, (n - 1) as f64, steps).into_iter().map(|t| np_round(t) as i64).collect()
        }
        TimestepSpacing::Leading => {
            let ratio = (n / steps) as i64;
            (0..steps as i64).map(|i| i * ratio + steps_offset).collect()
        }
        TimestepSpacing::Trailing => {
            let mut t: Vec<i64> = np_arange(n as f64, 0.0, -(n as f64 / steps as f64))
                .into_iter()
                .map(|t| np_round(t) as i64 - 1)
                .collect();
            t.reverse();
            t
        }
    };
    // concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1]
    let len = ts.len();
    let mut plms: Vec<i64> = ts[..len.saturating_sub(1)].to_vec();
    if len >= 2 {
        plms.push(ts[len - 2]);
    }
    if len >= 1 {
        plms.push(ts[len - 1]);
    }
    plms.reverse();
    plms
}

impl Pndm {
    pub fn new(cfg: &PndmConfig, steps: usize) -> std::result::Result<Self, String> {
        let n = cfg.betas.num_train_timesteps;
        check_steps(n, steps)?;
        let ts = pndm_timesteps(cfg.timestep_spacing, n, cfg.steps_offset, steps);
        let timesteps = checked_timesteps(CLASS, &ts, n, steps)?;
        let ratio = (n / steps) as i64;
        // The second step evaluates at its timestep + ratio: it must be in range too.
        if let Some(&t) = ts.get(1) {
            if t + ratio >= n as i64 {
                return Err(format!(
                    "{CLASS}: {steps} steps give timestep {} outside the model's 0..{n} with this config; choose another step count",
                    t + ratio
                ));
            }
        }
        let alphas_cumprod = cfg.betas.alphas_cumprod();
        let final_alpha_cumprod = if cfg.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] };
        Ok(Self {
            timesteps,
            alphas_cumprod,
            final_alpha_cumprod,
            ratio,
            prediction_type: cfg.prediction_type,
            ets: Vec::new(),
            cur_sample: None,
            counter: 0,
            begin: 0,
        })
    }

    /// `_get_prev_sample` (formula (9) of the PNDM paper), float32.
    fn prev_sample(&self, sample: &[f32], timestep: i64, prev_timestep: i64, model_output: &[f32]) -> Vec<f32> {
        let alpha_t = self.alphas_cumprod[timestep as usize];
        let alpha_prev =
            if prev_timestep >= 0 { self.alphas_cumprod[prev_timestep as usize] } else { self.final_alpha_cumprod };
        let beta_t = 1.0 - alpha_t;
        let beta_prev = 1.0 - alpha_prev;
        let converted: Vec<f32>;
        let model_output = match self.prediction_type {
            PredictionType::VPrediction => {
                let (a, b) = (alpha_t.sqrt(), beta_t.sqrt());
                converted = model_output.iter().zip(sample).map(|(m, s)| a * m + b * s).collect();
                &converted
            }
            _ => model_output,
        };
        let sample_coeff = (alpha_prev / alpha_t).sqrt();
        let denom = alpha_t * beta_prev.sqrt() + (alpha_t * beta_t * alpha_prev).sqrt();
        let diff = alpha_prev - alpha_t;
        sample.iter().zip(model_output).map(|(s, m)| sample_coeff * s - diff * m / denom).collect()
    }
}

impl Scheduler for Pndm {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn set_begin_index(&mut self, begin: usize) {
        self.begin = begin;
    }

    fn noise_scales(&self, index: usize) -> (f32, f32) {
        let alpha = self.alphas_cumprod[self.timesteps[index] as usize];
        (alpha.sqrt(), (1.0 - alpha).sqrt())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut dyn crate::noise::NoiseSource,
    ) -> Result<Tensor> {
        check_same_shape(model_output, sample)?;
        let len = self.timesteps.len();
        if step_index >= len {
            return Err(step_out_of_range(step_index, len));
        }
        if step_index == self.begin || step_index == 0 {
            self.ets.clear();
            self.cur_sample = None;
            self.counter = 0;
        } else if step_index != self.begin + self.counter {
            return Err(candle_core::Error::Msg(format!(
                "PNDM is multistep: steps must be taken in order; step {step_index} asked, {} expected",
                self.begin + self.counter
            )));
        }
        let m = to_f32_vec(model_output)?;
        let mut s = to_f32_vec(sample)?;
        let mut timestep = self.timesteps[step_index] as i64;
        let mut prev_timestep = timestep - self.ratio;
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.remove(0);
            }
            self.ets.push(m.clone());
        } else {
            prev_timestep = timestep;
            timestep += self.ratio;
        }
        let e = &self.ets;
        let k = e.len();
        let model_output: Vec<f32> = if k == 1 && self.counter == 0 {
            self.cur_sample = Some(s.clone());
            m
        } else if k == 1 && self.counter == 1 {
            s = self.cur_sample.take().unwrap_or(s);
            m.iter().zip(&e[0]).map(|(m, e)| (m + e) / 2.0).collect()
        } else if k == 2 {
            e[1].iter().zip(&e[0]).map(|(a, b)| (3.0 * a - b) / 2.0).collect()
        } else if k == 3 {
            (0..m.len()).map(|j| (23.0 * e[2][j] - 16.0 * e[1][j] + 5.0 * e[0][j]) / 12.0).collect()
        } else {
            let c = (1.0f64 / 24.0) as f32;
            (0..m.len()).map(|j| c * (55.0 * e[3][j] - 59.0 * e[2][j] + 37.0 * e[1][j] - 9.0 * e[0][j])).collect()
        };
        let prev = self.prev_sample(&s, timestep, prev_timestep, &model_output);
        self.counter += 1;
        Tensor::from_vec(prev, sample.dims(), sample.device())
    }
}
