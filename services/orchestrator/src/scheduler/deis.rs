//! diffusers' `DEISMultistepScheduler` (Zhang & Chen 2022, "log-rho" DEIS), solver_order 1 or 2.
//!
//! Same schedule as DPM-Solver except that the last sigma is always the smallest training sigma
//! (or the Karras schedule's last), never 0 (`dpm_solver::vp_schedule`, UniPC's variant with
//! `final_sigmas_type` "sigma_min"). The model output is converted to a noise prediction through
//! the data prediction (`(x - alpha x0) / sigma`), and the second-order coefficients integrate
//! the Lagrange interpolant in rho = sigma / alpha with numpy's float32 `log`, as diffusers does
//! (it calls `np.log` on 0-d float32 tensors).

use super::config::{DeisConfig, FinalSigmasType, PredictionType, Thresholding};
use super::dpm_solver::{alpha_sigma, data_prediction, lambda, vp_schedule, VpSchedule};
use super::{begin_ordered_step, check_steps, checked_timesteps, push_history, to_f32_vec, Scheduler};
use candle_core::{Result, Tensor};

const CLASS: &str = "DEISMultistepScheduler";

pub struct Deis {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    solver_order: usize,
    prediction_type: PredictionType,
    thresholding: Option<Thresholding>,
    lower_order_final: bool,
    /// The last `solver_order` converted (noise) predictions, oldest first.
    model_outputs: Vec<Option<Vec<f32>>>,
    lower_order_nums: usize,
    next_step: usize,
    /// Where the loop starts (set_begin_index).
    begin: usize,
}

/// `ind_fn(t, b, c) = t * (-log(c) + log(t) - 1) / (log(b) - log(c))` in float32.
fn ind_fn(t: f32, b: f32, c: f32) -> f32 {
    t * (-c.ln() + t.ln() - 1.0) / (b.ln() - c.ln())
}

impl Deis {
    pub fn new(cfg: &DeisConfig, steps: usize) -> std::result::Result<Self, String> {
        let n = cfg.betas.num_train_timesteps;
        check_steps(n, steps)?;
        if n < 2 {
            return Err(format!("{CLASS}: num_train_timesteps must be at least 2"));
        }
        let (timesteps, sigmas) = vp_schedule(
            &VpSchedule {
                betas: &cfg.betas,
                timestep_spacing: cfg.timestep_spacing,
                steps_offset: cfg.steps_offset,
                use_karras_sigmas: cfg.use_karras_sigmas,
                final_sigmas_type: FinalSigmasType::SigmaMin,
                lambda_min_clipped: f64::NEG_INFINITY,
                karras_always_rounded: true,
                karras_final_sigma_min_is_last: true,
            },
            steps,
        );
        let timesteps = checked_timesteps(CLASS, &timesteps, n, steps)?;
        Ok(Self {
            timesteps,
            sigmas,
            solver_order: cfg.solver_order,
            prediction_type: cfg.prediction_type,
            thresholding: cfg.thresholding,
            lower_order_final: cfg.lower_order_final,
            model_outputs: vec![None; cfg.solver_order],
            lower_order_nums: 0,
            next_step: 0,
            begin: 0,
        })
    }

    /// `convert_model_output`: x0, thresholded if configured, then back to a noise prediction.
    fn noise_prediction(&self, m: Vec<f32>, s: &[f32], sigma: f32, batch: usize) -> Vec<f32> {
        let (alpha_t, sigma_t) = alpha_sigma(sigma);
        let x0 = data_prediction(m, s, sigma, batch, self.prediction_type, self.thresholding);
        s.iter().zip(&x0).map(|(s, x0)| (s - alpha_t * x0) / sigma_t).collect()
    }
}

impl Scheduler for Deis {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn set_begin_index(&mut self, begin: usize) {
        self.begin = begin;
        self.next_step = begin;
    }

    fn noise_scales(&self, index: usize) -> (f32, f32) {
        super::dpm_solver::alpha_sigma(self.sigmas[index])
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut dyn crate::noise::NoiseSource,
    ) -> Result<Tensor> {
        let len = self.timesteps.len();
        if begin_ordered_step("DEIS is multistep", model_output, sample, step_index, len, (self.begin, self.next_step))?
        {
            self.model_outputs.iter_mut().for_each(|m| *m = None);
            self.lower_order_nums = 0;
        }
        let i = step_index;
        let lower_order_final = i == len - 1 && self.lower_order_final && len < 15;
        let s = to_f32_vec(sample)?;
        let batch = *sample.dims().first().unwrap_or(&1);
        let eps = self.noise_prediction(to_f32_vec(model_output)?, &s, self.sigmas[i], batch);
        push_history(&mut self.model_outputs, eps);
        let m0 = self.model_outputs[self.solver_order - 1].as_deref().unwrap_or_default();
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let prev: Vec<f32> = if self.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            // deis_first_order_update
            let h = lambda(alpha_t, sigma_t) - lambda(alpha_s0, sigma_s0);
            let c_sample = alpha_t / alpha_s0;
            let c_m = sigma_t * (h.exp() - 1.0);
            s.iter().zip(m0).map(|(s, m)| c_sample * s - c_m * m).collect()
        } else {
            // multistep_deis_second_order_update
            let m1 = self.model_outputs[self.solver_order - 2].as_deref().unwrap_or_default();
            let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
            let (rho_t, rho_s0, rho_s1) = (sigma_t / alpha_t, sigma_s0 / alpha_s0, sigma_s1 / alpha_s1);
            let coef1 = ind_fn(rho_t, rho_s0, rho_s1) - ind_fn(rho_s0, rho_s0, rho_s1);
            let coef2 = ind_fn(rho_t, rho_s1, rho_s0) - ind_fn(rho_s0, rho_s1, rho_s0);
            s.iter()
                .zip(m0.iter().zip(m1))
                .map(|(s, (m0, m1))| alpha_t * (s / alpha_s0 + coef1 * m0 + coef2 * m1))
                .collect()
        };
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        self.next_step = i + 1;
        Tensor::from_vec(prev, sample.dims(), sample.device())
    }
}
