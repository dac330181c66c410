//! diffusers' `DPMSolverMultistepScheduler` with `algorithm_type` "dpmsolver++" (Lu et al.
//! 2022): solver_order 2 is DPM-Solver++ 2M, optionally on Karras sigmas; and with
//! "sde-dpmsolver++" (DPM-Solver++ 2M SDE), which draws one noise tensor every step (the last
//! one included, although its coefficient is 0 with a zero final sigma).
//!
//! The schedule (timesteps, sigmas) is computed like diffusers: numpy float64 for the
//! timesteps and Karras sigmas, the float32 torch sigmas otherwise, all stored as float32.
//! Each step's scalars are float32 like diffusers' 0-d tensors.

use super::config::{
    BetaSchedule, DpmSolverConfig, FinalSigmasType, PredictionType, SolverType, Thresholding, TimestepSpacing,
};
use super::numerics::{np_arange, np_interp_integer_grid, np_linspace, np_round, threshold_sample};
use super::{begin_ordered_step, check_steps, checked_timesteps, push_history, to_f32_vec, Scheduler};
use candle_core::{Result, Tensor};

const CLASS: &str = "DPMSolverMultistepScheduler";

pub struct DpmSolverMultistep {
    timesteps: Vec<f64>,
    /// `timesteps.len() + 1` noise levels; the last is 0 or sigma_min.
    sigmas: Vec<f32>,
    solver_order: usize,
    sde: bool,
    solver_type: SolverType,
    prediction_type: PredictionType,
    thresholding: Option<Thresholding>,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigmas_zero: bool,
    /// The last `solver_order` data predictions (x0), oldest first.
    model_outputs: Vec<Option<Vec<f32>>>,
    lower_order_nums: usize,
    next_step: usize,
    /// Where the loop starts (set_begin_index).
    begin: usize,
}

/// The schedule diffusers' `set_timesteps(steps)` computes: (integer timesteps, float32 sigmas).
pub fn dpm_schedule(cfg: &DpmSolverConfig, steps: usize) -> (Vec<i64>, Vec<f32>) {
    vp_schedule(
        &VpSchedule {
            betas: &cfg.betas,
            timestep_spacing: cfg.timestep_spacing,
            steps_offset: cfg.steps_offset,
            use_karras_sigmas: cfg.use_karras_sigmas,
            final_sigmas_type: cfg.final_sigmas_type,
            lambda_min_clipped: cfg.lambda_min_clipped,
            karras_always_rounded: false,
            karras_final_sigma_min_is_last: false,
        },
        steps,
    )
}

/// What the multistep VP-schedule solvers' `set_timesteps` depends on.
pub(super) struct VpSchedule<'a> {
    pub betas: &'a super::config::BetaConfig,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
    pub use_karras_sigmas: bool,
    pub final_sigmas_type: FinalSigmasType,
    /// -inf: no clipping.
    pub lambda_min_clipped: f64,
    /// Karras timesteps always rounded (UniPC, DEIS, DPM-Solver singlestep); DPM-Solver
    /// multistep keeps the cosine schedule's fractional ones, then truncates.
    pub karras_always_rounded: bool,
    /// With Karras sigmas, `final_sigmas_type` "sigma_min" ends on the Karras schedule's last
    /// sigma instead of the training sigma_min (UniPC, DEIS).
    pub karras_final_sigma_min_is_last: bool,
}

/// DPM-Solver's / UniPC's `set_timesteps(steps)`: (integer timesteps, float32 sigmas).
pub(super) fn vp_schedule(cfg: &VpSchedule, steps: usize) -> (Vec<i64>, Vec<f32>) {
    let n = cfg.betas.num_train_timesteps;
    let mut alphas_cumprod = cfg.betas.alphas_cumprod();
    if cfg.betas.rescale_betas_zero_snr {
        // diffusers: "close to 0 without being 0 so first sigma is not inf" (2^-24).
        alphas_cumprod[n - 1] = 2f32.powi(-24);
    }
    // float32 like `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5`.
    let train_sigmas: Vec<f32> = alphas_cumprod.iter().map(|a| ((1.0 - a) / a).sqrt()).collect();

    // `lambda_min_clipped`: searchsorted over the flipped (ascending) float32 log-SNRs, with the
    // bound cast to float32 like torch does.
    let clipped_idx = if cfg.lambda_min_clipped == f64::NEG_INFINITY {
        0
    } else {
        let bound = cfg.lambda_min_clipped as f32;
        let lambdas: Vec<f32> = alphas_cumprod.iter().rev().map(|a| a.sqrt().ln() - (1.0 - a).sqrt().ln()).collect();
        lambdas.partition_point(|&l| l < bound)
    };
    let last_timestep = n - clipped_idx;

    let mut timesteps: Vec<i64> = match cfg.timestep_spacing {
        TimestepSpacing::Linspace => {
            let mut t: Vec<i64> = np_linspace(0.0, last_timestep as f64 - 1.0, steps + 1)
                .into_iter()
                .rev()
                .map(|t| np_round(t) as i64)
                .collect();
            t.pop();
            t
        }
        TimestepSpacing::Leading => {
            let ratio = (last_timestep / (steps + 1)) as i64;
            (1..=steps as i64).rev().map(|i| i * ratio + cfg.steps_offset).collect()
        }
        // Surprising but diffusers': the ratio uses num_train_timesteps even when
        // lambda_min_clipped lowered the last timestep, so the count can differ from steps.
        TimestepSpacing::Trailing => np_arange(last_timestep as f64, 0.0, -(n as f64 / steps as f64))
            .into_iter()
            .map(|t| np_round(t) as i64 - 1)
            .collect(),
    };

    let sigmas: Vec<f64> = if cfg.use_karras_sigmas {
        // Karras et al. (rho = 7) between the training sigmas' extremes, then each sigma
        // mapped back to a (fractional) timestep by log-linear interpolation.
        let sigma_min = f64::from(train_sigmas[0]);
        let sigma_max = f64::from(train_sigmas[n - 1]);
        let rho = 7.0;
        let min_inv_rho = sigma_min.powf(1.0 / rho);
        let max_inv_rho = sigma_max.powf(1.0 / rho);
        let sigmas: Vec<f64> = np_linspace(0.0, 1.0, steps)
            .into_iter()
            .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(rho))
            .collect();
        // numpy float32 log of the float32 sigmas.
        let log_sigmas: Vec<f32> = train_sigmas.iter().map(|s| s.ln()).collect();
        timesteps = sigmas
            .iter()
            .map(|&s| {
                let t = sigma_to_t(s, &log_sigmas);
                // diffusers rounds except for squaredcos_cap_v2; the int64 cast then truncates.
                let t = if cfg.betas.beta_schedule == BetaSchedule::SquaredcosCapV2 && !cfg.karras_always_rounded {
                    t
                } else {
                    np_round(t)
                };
                t as i64
            })
            .collect();
        sigmas
    } else {
        timesteps.iter().map(|&t| np_interp_integer_grid(t as f64, &train_sigmas)).collect()
    };
    let sigma_last = match cfg.final_sigmas_type {
        FinalSigmasType::Zero => 0.0,
        FinalSigmasType::SigmaMin if cfg.karras_final_sigma_min_is_last && cfg.use_karras_sigmas => {
            sigmas.last().map_or(train_sigmas[0], |&s| s as f32)
        }
        FinalSigmasType::SigmaMin => train_sigmas[0],
    };
    let sigmas = sigmas.into_iter().map(|s| s as f32).chain(std::iter::once(sigma_last)).collect();
    (timesteps, sigmas)
}

/// diffusers' `_sigma_to_t`: float64 log of the sigma against the float32 log-sigmas.
pub(super) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // low_idx = argmax(cumsum(dists >= 0)) (the first index reaching the maximum count),
    // clipped to len - 2.
    let (mut count, mut best, mut low_idx) = (0usize, 0usize, 0usize);
    for (i, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - f64::from(ls) >= 0.0 {
            count += 1;
        }
        if count > best {
            best = count;
            low_idx = i;
        }
    }
    let low_idx = low_idx.min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let low = f64::from(log_sigmas[low_idx]);
    let high = f64::from(log_sigmas[high_idx]);
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// `_sigma_to_alpha_sigma_t` in float32: alpha = 1 / sqrt(sigma^2 + 1), sigma_t = sigma * alpha.
pub(super) fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// `convert_model_output`'s data prediction x0 from the model output `m` at `s` (noise level
/// `sigma`), thresholded when configured: the first step of every multistep solver here.
pub(super) fn data_prediction(
    m: Vec<f32>,
    s: &[f32],
    sigma: f32,
    batch: usize,
    prediction_type: PredictionType,
    thresholding: Option<Thresholding>,
) -> Vec<f32> {
    let (alpha_t, sigma_t) = alpha_sigma(sigma);
    let mut x0: Vec<f32> = match prediction_type {
        PredictionType::Epsilon => s.iter().zip(&m).map(|(s, m)| (s - sigma_t * m) / alpha_t).collect(),
        PredictionType::VPrediction => s.iter().zip(&m).map(|(s, m)| alpha_t * s - sigma_t * m).collect(),
        PredictionType::Sample => m,
    };
    if let Some(th) = thresholding {
        threshold_sample(&mut x0, batch, th.dynamic_thresholding_ratio, th.sample_max_value);
    }
    x0
}

/// log-SNR lambda = log(alpha) - log(sigma), float32.
pub(super) fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

impl DpmSolverMultistep {
    pub fn new(cfg: &DpmSolverConfig, steps: usize) -> std::result::Result<Self, String> {
        let n = cfg.betas.num_train_timesteps;
        check_steps(n, steps)?;
        if n < 2 {
            return Err(format!("{CLASS}: num_train_timesteps must be at least 2"));
        }
        let (timesteps, sigmas) = dpm_schedule(cfg, steps);
        let timesteps = checked_timesteps(CLASS, &timesteps, n, steps)?;
        Ok(Self {
            timesteps,
            sigmas,
            solver_order: cfg.solver_order,
            sde: cfg.sde,
            solver_type: cfg.solver_type,
            prediction_type: cfg.prediction_type,
            thresholding: cfg.thresholding,
            lower_order_final: cfg.lower_order_final,
            euler_at_final: cfg.euler_at_final,
            final_sigmas_zero: cfg.final_sigmas_type == FinalSigmasType::Zero,
            model_outputs: vec![None; cfg.solver_order],
            lower_order_nums: 0,
            next_step: 0,
            begin: 0,
        })
    }

    /// `convert_model_output` for dpmsolver++: the data prediction x0.
    fn data_prediction(&self, m: Vec<f32>, s: &[f32], sigma: f32, batch: usize) -> Vec<f32> {
        data_prediction(m, s, sigma, batch, self.prediction_type, self.thresholding)
    }
}

impl Scheduler for DpmSolverMultistep {
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
        noise: &mut dyn crate::noise::NoiseSource,
    ) -> Result<Tensor> {
        let len = self.timesteps.len();
        if begin_ordered_step(
            "DPM-Solver++ is multistep",
            model_output,
            sample,
            step_index,
            len,
            (self.begin, self.next_step),
        )? {
            self.model_outputs.iter_mut().for_each(|m| *m = None);
            self.lower_order_nums = 0;
        }
        // diffusers finds the first step's index by looking its timestep up, taking the
        // *second* match when the value repeats (meant for img2img). Karras sigmas on the
        // cosine schedule start with repeated timesteps, so diffusers skips the first sigma
        // there and fails with an IndexError on the last step; the index is explicit here.
        let i = step_index;
        // Lower orders near the end for stability: always first order into a zero sigma
        // (its log-SNR is infinite), and with lower_order_final on short schedules (< 15 steps).
        let lower_order_final =
            i == len - 1 && (self.euler_at_final || (self.lower_order_final && len < 15) || self.final_sigmas_zero);
        // (diffusers' `lower_order_second` only matters for solver_order 3.)

        let s = to_f32_vec(sample)?;
        let batch = *sample.dims().first().unwrap_or(&1);
        let x0 = self.data_prediction(to_f32_vec(model_output)?, &s, self.sigmas[i], batch);
        push_history(&mut self.model_outputs, x0);

        // diffusers draws the SDE noise after converting the model output, every step.
        let z = if self.sde { Some(to_f32_vec(&noise.randn(model_output.dims())?)?) } else { None };

        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda_t - lambda_s0;
        let m0 = self.model_outputs[self.solver_order - 1].as_deref().unwrap_or_default();
        let first_order = self.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final;
        // D1 = (1 / r0) * (m0 - m1), for the second-order update.
        let d1_scale = if first_order {
            0.0
        } else {
            let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
            let lambda_s1 = lambda(alpha_s1, sigma_s1);
            let h_0 = lambda_s0 - lambda_s1;
            let r0 = h_0 / h;
            1.0 / r0
        };
        let m1: &[f32] =
            if first_order { m0 } else { self.model_outputs[self.solver_order - 2].as_deref().unwrap_or_default() };

        let prev: Vec<f32> = if let Some(z) = z {
            // sde-dpmsolver++: x = (sigma_t / sigma_s0 * e^-h) x + alpha_t (1 - e^-2h) D0
            //   [+ c D1] + sigma_t sqrt(1 - e^-2h) z, each coefficient a float32 0-d tensor.
            let c_sample = sigma_t / sigma_s0 * (-h).exp();
            let e2 = (-2.0 * h).exp();
            let c_d0 = alpha_t * (1.0 - e2);
            let c_noise = sigma_t * (1.0 - e2).sqrt();
            if first_order {
                s.iter().zip(m0).zip(&z).map(|((s, d0), z)| c_sample * s + c_d0 * d0 + c_noise * z).collect()
            } else {
                let c_d1 = match self.solver_type {
                    SolverType::Midpoint => 0.5 * c_d0,
                    SolverType::Heun => alpha_t * ((1.0 - e2) / (-2.0 * h) + 1.0),
                };
                s.iter()
                    .zip(m0.iter().zip(m1))
                    .zip(&z)
                    .map(|((s, (d0, x1)), z)| {
                        let d1 = d1_scale * (d0 - x1);
                        c_sample * s + c_d0 * d0 + c_d1 * d1 + c_noise * z
                    })
                    .collect()
            }
        } else {
            let c_sample = sigma_t / sigma_s0;
            let c_d0 = alpha_t * ((-h).exp() - 1.0);
            if first_order {
                // dpm_solver_first_order_update
                s.iter().zip(m0).map(|(s, d0)| c_sample * s - c_d0 * d0).collect()
            } else {
                // multistep_dpm_solver_second_order_update
                let c_d1 = match self.solver_type {
                    SolverType::Midpoint => 0.5 * c_d0,
                    SolverType::Heun => alpha_t * (((-h).exp() - 1.0) / h + 1.0),
                };
                s.iter()
                    .zip(m0.iter().zip(m1))
                    .map(|(s, (d0, x1))| {
                        let d1 = d1_scale * (d0 - x1);
                        match self.solver_type {
                            SolverType::Midpoint => c_sample * s - c_d0 * d0 - c_d1 * d1,
                            SolverType::Heun => c_sample * s - c_d0 * d0 + c_d1 * d1,
                        }
                    })
                    .collect()
            }
        };
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        self.next_step = i + 1;
        Tensor::from_vec(prev, sample.dims(), sample.device())
    }
}
