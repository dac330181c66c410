//! diffusers' `UniPCMultistepScheduler` (Zhao et al. 2023) with its defaults' `predict_x0`
//! (data prediction), solver_order 1 or 2, B(h) "bh1" or "bh2": at every step after the first,
//! the UniC corrector refines the incoming sample with the new model output, then the UniP
//! predictor steps to the next sigma.
//!
//! Same schedule as DPM-Solver (`dpm_solver::vp_schedule`, UniPC's variant); every scalar is a
//! float32 0-d tensor like in diffusers. The order-2 corrector's 2x2 system (torch's
//! `linalg.solve`, LAPACK `gesv`) is solved the way LAPACK does: partial pivoting, the pivot
//! row scaled by the pivot's reciprocal, then the triangular solves.

use super::config::{PredictionType, Thresholding, UniPcConfig, UniPcSolverType};
use super::dpm_solver::{alpha_sigma, data_prediction, lambda, vp_schedule, VpSchedule};
use super::{begin_ordered_step, check_steps, checked_timesteps, push_history, to_f32_vec, Scheduler};
use candle_core::{Result, Tensor};

const CLASS: &str = "UniPCMultistepScheduler";

pub struct UniPc {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    solver_order: usize,
    solver_type: UniPcSolverType,
    prediction_type: PredictionType,
    thresholding: Option<Thresholding>,
    lower_order_final: bool,
    disable_corrector: Vec<i64>,
    /// The last `solver_order` data predictions, oldest first.
    model_outputs: Vec<Option<Vec<f32>>>,
    /// The sample the previous predictor started from (for the corrector).
    last_sample: Option<Vec<f32>>,
    /// The previous predictor's order (the corrector's).
    this_order: usize,
    lower_order_nums: usize,
    next_step: usize,
    /// Where the loop starts (set_begin_index).
    begin: usize,
}

/// `(hh, h_phi_1, B_h, [b_1, b_2])` for step size h (predict_x0: hh = -h), as diffusers'
/// 0-d float32 tensors.
fn phi_terms(h: f32, solver_type: UniPcSolverType) -> (f32, f32, [f32; 2]) {
    let hh = -h;
    let h_phi_1 = hh.exp_m1();
    let b_h = match solver_type {
        UniPcSolverType::Bh1 => hh,
        UniPcSolverType::Bh2 => hh.exp_m1(),
    };
    let mut h_phi_k = h_phi_1 / hh - 1.0;
    let b1 = h_phi_k * 1.0 / b_h;
    h_phi_k = h_phi_k / hh - 0.5;
    let b2 = h_phi_k * 2.0 / b_h;
    (h_phi_1, b_h, [b1, b2])
}

/// `torch.linalg.solve([[1, 1], [rk, 1]], [b1, b2])` like LAPACK's sgesv.
fn solve2(rk: f32, b: [f32; 2]) -> [f32; 2] {
    let (mut a, mut rhs) = ([[1.0f32, 1.0], [rk, 1.0]], b);
    if rk.abs() > 1.0 {
        a.swap(0, 1);
        rhs.swap(0, 1);
    }
    let l = a[1][0] * (1.0 / a[0][0]);
    let u22 = a[1][1] - l * a[0][1];
    let y2 = rhs[1] - l * rhs[0];
    let x2 = y2 / u22;
    let x1 = (rhs[0] - x2 * a[0][1]) / a[0][0];
    [x1, x2]
}

impl UniPc {
    pub fn new(cfg: &UniPcConfig, steps: usize) -> std::result::Result<Self, String> {
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
                final_sigmas_type: cfg.final_sigmas_type,
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
            solver_type: cfg.solver_type,
            prediction_type: cfg.prediction_type,
            thresholding: cfg.thresholding,
            lower_order_final: cfg.lower_order_final,
            disable_corrector: cfg.disable_corrector.clone(),
            model_outputs: vec![None; cfg.solver_order],
            last_sample: None,
            this_order: 1,
            lower_order_nums: 0,
            next_step: 0,
            begin: 0,
        })
    }

    /// `convert_model_output` with predict_x0: the data prediction.
    fn data_prediction(&self, m: Vec<f32>, s: &[f32], sigma: f32, batch: usize) -> Vec<f32> {
        data_prediction(m, s, sigma, batch, self.prediction_type, self.thresholding)
    }

    fn lambda_at(&self, i: usize) -> (f32, f32, f32) {
        let (alpha, sigma) = alpha_sigma(self.sigmas[i]);
        (alpha, sigma, lambda(alpha, sigma))
    }

    /// `multistep_uni_c_bh_update` at step i (>= 1): this step's sample, recomputed from the
    /// previous step's sample `last` with this step's data prediction `model_t` (the sample the
    /// predictor gave is not an input).
    fn corrector(&self, i: usize, model_t: &[f32], last: &[f32], order: usize) -> Vec<f32> {
        let m0 = self.model_outputs[self.solver_order - 1].as_deref().unwrap_or_default();
        let (alpha_t, sigma_t, lambda_t) = self.lambda_at(i);
        let (_, sigma_s0, lambda_s0) = self.lambda_at(i - 1);
        let h = lambda_t - lambda_s0;
        let (h_phi_1, b_h, b) = phi_terms(h, self.solver_type);
        let c_x = sigma_t / sigma_s0;
        let c_m0 = alpha_t * h_phi_1;
        let c_res = alpha_t * b_h;
        if order >= 2 && self.solver_order >= 2 {
            let m1 = self.model_outputs[self.solver_order - 2].as_deref().unwrap_or_default();
            let (_, _, lambda_s1) = self.lambda_at(i - 2);
            let rk = (lambda_s1 - lambda_s0) / h;
            let rhos = solve2(rk, b);
            last.iter()
                .zip(m0.iter().zip(m1))
                .zip(model_t)
                .map(|((x, (m0, m1)), mt)| {
                    let x_t_ = c_x * x - c_m0 * m0;
                    let d1 = (m1 - m0) / rk;
                    let corr_res = rhos[0] * d1;
                    x_t_ - c_res * (corr_res + rhos[1] * (mt - m0))
                })
                .collect()
        } else {
            last.iter()
                .zip(m0)
                .zip(model_t)
                .map(|((x, m0), mt)| {
                    let x_t_ = c_x * x - c_m0 * m0;
                    // corr_res is the Python int 0 here: 0 + rho * D1_t is exact.
                    x_t_ - c_res * (0.5 * (mt - m0))
                })
                .collect()
        }
    }

    /// `multistep_uni_p_bh_update` at step i from `x`.
    fn predictor(&self, i: usize, x: &[f32], order: usize) -> Vec<f32> {
        let m0 = self.model_outputs[self.solver_order - 1].as_deref().unwrap_or_default();
        let (alpha_t, sigma_t, lambda_t) = self.lambda_at(i + 1);
        let (_, sigma_s0, lambda_s0) = self.lambda_at(i);
        let h = lambda_t - lambda_s0;
        let (h_phi_1, b_h, _) = phi_terms(h, self.solver_type);
        let c_x = sigma_t / sigma_s0;
        let c_m0 = alpha_t * h_phi_1;
        let c_res = alpha_t * b_h;
        if order >= 2 && self.solver_order >= 2 {
            let m1 = self.model_outputs[self.solver_order - 2].as_deref().unwrap_or_default();
            let (_, _, lambda_s1) = self.lambda_at(i - 1);
            let rk = (lambda_s1 - lambda_s0) / h;
            x.iter()
                .zip(m0.iter().zip(m1))
                .map(|(x, (m0, m1))| {
                    let x_t_ = c_x * x - c_m0 * m0;
                    let d1 = (m1 - m0) / rk;
                    x_t_ - c_res * (0.5 * d1)
                })
                .collect()
        } else {
            // diffusers subtracts `alpha_t * B_h * 0` (pred_res is the Python int 0), a no-op
            // except into a zero final sigma with bh1, where B_h = -h = -inf and diffusers
            // returns NaN; here that step gives the data prediction, as bh2 does.
            let _ = c_res;
            x.iter().zip(m0).map(|(x, m0)| c_x * x - c_m0 * m0).collect()
        }
    }
}

impl Scheduler for UniPc {
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
            "UniPC is multistep",
            model_output,
            sample,
            step_index,
            len,
            (self.begin, self.next_step),
        )? {
            self.model_outputs.iter_mut().for_each(|m| *m = None);
            self.last_sample = None;
            self.lower_order_nums = 0;
            self.this_order = 1;
        }
        let i = step_index;
        let batch = *sample.dims().first().unwrap_or(&1);
        let mut s = to_f32_vec(sample)?;
        let model_t = self.data_prediction(to_f32_vec(model_output)?, &s, self.sigmas[i], batch);
        let use_corrector = i > 0 && !self.disable_corrector.contains(&(i as i64 - 1));
        if use_corrector {
            if let Some(last) = self.last_sample.as_deref() {
                s = self.corrector(i, &model_t, last, self.this_order);
            }
        }
        push_history(&mut self.model_outputs, model_t);
        let this_order = if self.lower_order_final { self.solver_order.min(len - i) } else { self.solver_order };
        self.this_order = this_order.min(self.lower_order_nums + 1);
        let prev = self.predictor(i, &s, self.this_order);
        self.last_sample = Some(s);
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        self.next_step = i + 1;
        Tensor::from_vec(prev, sample.dims(), sample.device())
    }
}
