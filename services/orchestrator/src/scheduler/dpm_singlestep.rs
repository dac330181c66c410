//! diffusers' `DPMSolverSinglestepScheduler` with `algorithm_type` "dpmsolver++" (DPM-Solver++
//! 2S), solver_order 1 or 2, midpoint or heun, optionally on Karras sigmas.
//!
//! Steps follow diffusers' order list: with order 2, pairs of a first-order step (which also
//! remembers its input sample) and a second-order step that restarts from that remembered
//! sample using both data predictions. Timesteps are always "linspace" (the class has no
//! `timestep_spacing` / `steps_offset`); the schedule is otherwise DPM-Solver multistep's.

use super::config::{DpmSinglestepConfig, FinalSigmasType, PredictionType, SolverType, Thresholding, TimestepSpacing};
use super::dpm_solver::{alpha_sigma, data_prediction, lambda, vp_schedule, VpSchedule};
use super::{begin_ordered_step, check_steps, checked_timesteps, push_history, to_f32_vec, Scheduler};
use candle_core::{Result, Tensor};

const CLASS: &str = "DPMSolverSinglestepScheduler";

pub struct DpmSinglestep {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    /// The order of each step (diffusers' `get_order_list`).
    orders: Vec<usize>,
    solver_order: usize,
    solver_type: SolverType,
    prediction_type: PredictionType,
    thresholding: Option<Thresholding>,
    /// The last `solver_order` data predictions, oldest first.
    model_outputs: Vec<Option<Vec<f32>>>,
    /// The sample the current single-step pair started from.
    sample: Option<Vec<f32>>,
    next_step: usize,
    /// Where the loop starts (set_begin_index).
    begin: usize,
}

/// diffusers' `get_order_list(steps)` for order 1 or 2, after `set_timesteps` forced
/// `lower_order_final` on (a zero final sigma, or a step count not a multiple of the order).
pub fn order_list(steps: usize, order: usize, lower_order_final: bool, final_sigma_zero: bool) -> Vec<usize> {
    let lower_order_final = lower_order_final || final_sigma_zero || !steps.is_multiple_of(order);
    let mut orders: Vec<usize> = if order == 1 {
        vec![1; steps]
    } else if lower_order_final {
        let pairs = if steps.is_multiple_of(2) { (steps / 2).saturating_sub(1) } else { steps / 2 };
        let tail: &[usize] = if steps.is_multiple_of(2) { &[1, 1] } else { &[1] };
        (0..pairs).flat_map(|_| [1, 2]).chain(tail.iter().copied()).collect()
    } else {
        (0..steps / 2).flat_map(|_| [1, 2]).collect()
    };
    if final_sigma_zero {
        if let Some(last) = orders.last_mut() {
            *last = 1;
        }
    }
    orders
}

impl DpmSinglestep {
    pub fn new(cfg: &DpmSinglestepConfig, steps: usize) -> std::result::Result<Self, String> {
        let n = cfg.betas.num_train_timesteps;
        check_steps(n, steps)?;
        if n < 2 {
            return Err(format!("{CLASS}: num_train_timesteps must be at least 2"));
        }
        let (timesteps, sigmas) = vp_schedule(
            &VpSchedule {
                betas: &cfg.betas,
                timestep_spacing: TimestepSpacing::Linspace,
                steps_offset: 0,
                use_karras_sigmas: cfg.use_karras_sigmas,
                final_sigmas_type: cfg.final_sigmas_type,
                lambda_min_clipped: cfg.lambda_min_clipped,
                karras_always_rounded: true,
                karras_final_sigma_min_is_last: false,
            },
            steps,
        );
        let timesteps = checked_timesteps(CLASS, &timesteps, n, steps)?;
        let orders =
            order_list(steps, cfg.solver_order, cfg.lower_order_final, cfg.final_sigmas_type == FinalSigmasType::Zero);
        if orders.len() != timesteps.len() {
            return Err(format!(
                "{CLASS}: {steps} steps give {} timesteps but {} solver orders with this config",
                timesteps.len(),
                orders.len()
            ));
        }
        Ok(Self {
            timesteps,
            sigmas,
            orders,
            solver_order: cfg.solver_order,
            solver_type: cfg.solver_type,
            prediction_type: cfg.prediction_type,
            thresholding: cfg.thresholding,
            model_outputs: vec![None; cfg.solver_order],
            sample: None,
            next_step: 0,
            begin: 0,
        })
    }

    fn data_prediction(&self, m: Vec<f32>, s: &[f32], sigma: f32, batch: usize) -> Vec<f32> {
        data_prediction(m, s, sigma, batch, self.prediction_type, self.thresholding)
    }
}

impl Scheduler for DpmSinglestep {
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
        if begin_ordered_step(
            "DPM-Solver singlestep",
            model_output,
            sample,
            step_index,
            len,
            (self.begin, self.next_step),
        )? {
            self.model_outputs.iter_mut().for_each(|m| *m = None);
            self.sample = None;
        }
        let i = step_index;
        let batch = *sample.dims().first().unwrap_or(&1);
        let s = to_f32_vec(sample)?;
        let x0 = self.data_prediction(to_f32_vec(model_output)?, &s, self.sigmas[i], batch);
        push_history(&mut self.model_outputs, x0);
        let mut order = self.orders[i];
        while order > 1 && self.model_outputs[self.solver_order - order].is_none() {
            order -= 1;
        }
        if order == 1 || self.sample.is_none() {
            self.sample = Some(s);
        }
        let x = self.sample.as_deref().unwrap_or_default();
        let m0 = self.model_outputs[self.solver_order - 1].as_deref().unwrap_or_default();
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let prev: Vec<f32> = if order == 1 {
            let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[i]);
            let h = lambda_t - lambda(alpha_s, sigma_s);
            let c_sample = sigma_t / sigma_s;
            let c_d0 = alpha_t * ((-h).exp() - 1.0);
            x.iter().zip(m0).map(|(x, d0)| c_sample * x - c_d0 * d0).collect()
        } else {
            // singlestep_dpm_solver_second_order_update: from s1 = the pair's first sigma.
            let m1 = self.model_outputs[self.solver_order - 2].as_deref().unwrap_or_default();
            let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
            let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
            let lambda_s0 = lambda(alpha_s0, sigma_s0);
            let lambda_s1 = lambda(alpha_s1, sigma_s1);
            let h = lambda_t - lambda_s1;
            let h_0 = lambda_s0 - lambda_s1;
            let r0 = h_0 / h;
            let inv_r0 = 1.0 / r0;
            let c_sample = sigma_t / sigma_s1;
            let c_d0 = alpha_t * ((-h).exp() - 1.0);
            let c_d1 = match self.solver_type {
                SolverType::Midpoint => 0.5 * c_d0,
                SolverType::Heun => alpha_t * (((-h).exp() - 1.0) / h + 1.0),
            };
            x.iter()
                .zip(m0.iter().zip(m1))
                .map(|(x, (m0, m1))| {
                    // D0 = m1 (the pair's first prediction), D1 = (m0 - m1) / r0.
                    let d1 = inv_r0 * (m0 - m1);
                    match self.solver_type {
                        SolverType::Midpoint => c_sample * x - c_d0 * m1 - c_d1 * d1,
                        SolverType::Heun => c_sample * x - c_d0 * m1 + c_d1 * d1,
                    }
                })
                .collect()
        };
        self.next_step = i + 1;
        Tensor::from_vec(prev, sample.dims(), sample.device())
    }
}
