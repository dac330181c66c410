//! diffusers' sigma-parameterised ("k-diffusion") schedulers: `EulerDiscreteScheduler`,
//! `EulerAncestralDiscreteScheduler`, `LMSDiscreteScheduler`, `HeunDiscreteScheduler`,
//! `KDPM2DiscreteScheduler` and `KDPM2AncestralDiscreteScheduler` (the last three evaluate the
//! model twice per step: their timesteps interleave first- and second-order evaluations).
//!
//! They share one schedule: float32 timesteps (fractional with "linspace" spacing), the
//! training sigmas sqrt((1 - alpha_bar) / alpha_bar) interpolated at them in float64 (numpy),
//! optionally replaced by Karras sigmas, then stored as float32 with a final 0. The model input
//! is `sample / sqrt(sigma^2 + 1)` and the initial noise is scaled by the largest sigma
//! (or sqrt(sigma_max^2 + 1) with "leading" spacing). Each step's scalars are float32 like
//! diffusers' 0-d tensors and the elementwise math keeps diffusers' operation order.

use super::config::{KClass, KDiffusionConfig, PredictionType, TimestepSpacing};
use super::dpm_solver::sigma_to_t;
use super::numerics::{np_arange, np_interp_integer_grid, np_linspace, np_round, torch_clamp, torch_lerp};
use super::{check_same_shape, check_steps, step_out_of_range, to_f32_vec, Scheduler};
use candle_core::{Result, Tensor};

/// The schedule `set_timesteps(steps)` computes: (timesteps, float32 sigmas with the final one
/// appended), before Heun's / KDPM2's repetition. The timesteps are float32 values, except with
/// Karras sigmas: then they are `_sigma_to_t`'s float64 values, which each class then casts
/// (Euler, LMS, Heun: to float32) or rounds (KDPM2).
pub fn k_schedule(cfg: &KDiffusionConfig, steps: usize) -> (Vec<f64>, Vec<f32>) {
    let n = cfg.betas.num_train_timesteps;
    let mut alphas_cumprod = cfg.betas.alphas_cumprod();
    if cfg.betas.rescale_betas_zero_snr {
        alphas_cumprod[n - 1] = 2f32.powi(-24);
    }
    let train_sigmas: Vec<f32> = alphas_cumprod.iter().map(|a| ((1.0 - a) / a).sqrt()).collect();
    let timesteps: Vec<f32> = match cfg.timestep_spacing {
        // np.linspace(..., dtype=float32): computed in float64, then cast.
        TimestepSpacing::Linspace => {
            np_linspace(0.0, (n - 1) as f64, steps).into_iter().rev().map(|t| t as f32).collect()
        }
        TimestepSpacing::Leading => {
            let ratio = n / steps;
            (0..steps).rev().map(|i| (i * ratio) as f32 + cfg.steps_offset as f32).collect()
        }
        TimestepSpacing::Trailing => {
            np_arange(n as f64, 0.0, -(n as f64 / steps as f64)).into_iter().map(|t| np_round(t) as f32 - 1.0).collect()
        }
    };
    let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| np_interp_integer_grid(f64::from(t), &train_sigmas)).collect();
    let mut timesteps: Vec<f64> = timesteps.into_iter().map(f64::from).collect();
    if cfg.use_karras_sigmas && !sigmas.is_empty() {
        // Unlike DPM-Solver, the Karras range is the interpolated schedule's own ends (or the
        // config's sigma_min / sigma_max, Euler only).
        let sigma_min = cfg.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
        let sigma_max = cfg.sigma_max.unwrap_or(sigmas[0]);
        let rho = 7.0;
        let min_inv_rho = sigma_min.powf(1.0 / rho);
        let max_inv_rho = sigma_max.powf(1.0 / rho);
        sigmas = np_linspace(0.0, 1.0, steps)
            .into_iter()
            .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(rho))
            .collect();
        let log_sigmas: Vec<f32> = train_sigmas.iter().map(|s| s.ln()).collect();
        timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas)).collect();
    }
    let last = if cfg.final_sigma_min { train_sigmas[0] } else { 0.0 };
    let sigmas = sigmas.into_iter().map(|s| s as f32).chain(std::iter::once(last)).collect();
    (timesteps, sigmas)
}

/// `init_noise_sigma`: max sigma, or sqrt(max^2 + 1) with "leading" spacing (float32).
fn init_noise_sigma(spacing: TimestepSpacing, sigmas: &[f32]) -> f64 {
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    f64::from(match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
        TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
    })
}

/// `sample / (sigma**2 + 1) ** 0.5`, elementwise float32 division.
fn scale_input(sample: &Tensor, sigma: f32) -> Result<Tensor> {
    let c = (sigma * sigma + 1.0).sqrt();
    let v: Vec<f32> = to_f32_vec(sample)?.iter().map(|x| x / c).collect();
    Tensor::from_vec(v, sample.dims(), sample.device())
}

/// The denoised sample x0 for `sigma` (float32, diffusers' operation order).
fn denoised(prediction: PredictionType, m: &[f32], s: &[f32], sigma: f32) -> Vec<f32> {
    match prediction {
        PredictionType::Epsilon => s.iter().zip(m).map(|(s, m)| s - sigma * m).collect(),
        PredictionType::VPrediction => {
            let c_in2 = sigma * sigma + 1.0;
            let c_out = -sigma / c_in2.sqrt();
            s.iter().zip(m).map(|(s, m)| m * c_out + s / c_in2).collect()
        }
        PredictionType::Sample => m.to_vec(),
    }
}

fn sigma_at(sigmas: &[f32], i: usize, steps: usize) -> Result<f32> {
    sigmas.get(i).copied().ok_or_else(|| step_out_of_range(i, steps))
}

/// KDPM2's `cat([a[:1], a[1:].repeat_interleave(2), a[-1:]])` (empty stays empty).
fn repeat_kdpm2(a: &[f32]) -> Vec<f32> {
    let (Some(first), Some(last)) = (a.first(), a.last()) else {
        return Vec::new();
    };
    let mut out = vec![*first];
    out.extend(a[1..].iter().flat_map(|&x| [x, x]));
    out.push(*last);
    out
}

/// `_sigma_to_t` as diffusers runs it on a float32 sigma and float32 log-sigmas (KDPM2's
/// midpoints): every operation in float32.
fn sigma_to_t_f32(sigma: f32, log_sigmas: &[f32]) -> f32 {
    let log_sigma = sigma.max(1e-10).ln();
    let (mut count, mut best, mut low_idx) = (0usize, 0usize, 0usize);
    for (i, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - ls >= 0.0 {
            count += 1;
        }
        if count > best {
            best = count;
            low_idx = i;
        }
    }
    let low_idx = low_idx.min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let (low, high) = (log_sigmas[low_idx], log_sigmas[high_idx]);
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f32 + w * high_idx as f32
}

/// numpy's float32 log of the float32 training sigmas (for `_sigma_to_t`).
fn train_log_sigmas(cfg: &KDiffusionConfig) -> Vec<f32> {
    cfg.betas.alphas_cumprod().iter().map(|a| ((1.0 - a) / a).sqrt().ln()).collect()
}

/// The state of one step-by-step run.
enum State {
    Euler,
    EulerAncestral,
    /// The last (up to 4) derivatives, oldest first.
    Lms {
        derivatives: Vec<Vec<f32>>,
    },
    /// After a first-order step: (derivative, dt, sample).
    Heun {
        pending: Option<(Vec<f32>, f32, Vec<f32>)>,
    },
    /// KDPM2 (ancestral or not): the sample of the last first-order step.
    KDpm2 {
        pending: Option<Vec<f32>>,
    },
}

pub struct KDiffusion {
    class: KClass,
    timesteps: Vec<f64>,
    /// Heun: the repeated sigmas, `2 * steps` of them; KDPM2: `2 * steps + 2`; otherwise `steps + 1`.
    sigmas: Vec<f32>,
    /// KDPM2 only (repeated like `sigmas`): the midpoint sigmas, and the ancestral up / down sigmas.
    sigmas_interpol: Vec<f32>,
    sigmas_up: Vec<f32>,
    sigmas_down: Vec<f32>,
    init_noise_sigma: f64,
    prediction_type: PredictionType,
    clip_sample_range: Option<f32>,
    state: State,
    next_step: usize,
    /// Where the loop starts (set_begin_index).
    begin: usize,
}

impl KDiffusion {
    pub fn new(cfg: &KDiffusionConfig, steps: usize) -> std::result::Result<Self, String> {
        let n = cfg.betas.num_train_timesteps;
        check_steps(n, steps)?;
        if n < 2 {
            return Err(format!("{}: num_train_timesteps must be at least 2", cfg.class.class_name()));
        }
        let (timesteps, sigmas) = k_schedule(cfg, steps);
        if timesteps.is_empty() {
            return Err(format!(
                "{}: {steps} steps give no timesteps with this scheduler config",
                cfg.class.class_name()
            ));
        }
        let init_noise_sigma = init_noise_sigma(cfg.timestep_spacing, &sigmas);
        let as_f32 = |t: Vec<f64>| -> Vec<f64> { t.into_iter().map(|t| f64::from(t as f32)).collect() };
        let mut out = Self {
            class: cfg.class,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            sigmas_interpol: Vec::new(),
            sigmas_up: Vec::new(),
            sigmas_down: Vec::new(),
            init_noise_sigma,
            prediction_type: cfg.prediction_type,
            clip_sample_range: cfg.clip_sample_range.map(|r| r as f32),
            state: State::Euler,
            next_step: 0,
            begin: 0,
        };
        match cfg.class {
            KClass::Euler | KClass::EulerAncestral | KClass::Lms => {
                out.timesteps = as_f32(timesteps);
                out.sigmas = sigmas;
                out.state = match cfg.class {
                    KClass::Euler => State::Euler,
                    KClass::EulerAncestral => State::EulerAncestral,
                    _ => State::Lms { derivatives: Vec::new() },
                };
            }
            KClass::Heun => {
                // Every timestep but the first twice, every sigma but the first and last twice.
                let timesteps = as_f32(timesteps);
                let mut t = vec![timesteps[0]];
                t.extend(timesteps[1..].iter().flat_map(|&x| [x, x]));
                let mut s = vec![sigmas[0]];
                s.extend(sigmas[1..sigmas.len() - 1].iter().flat_map(|&x| [x, x]));
                s.push(sigmas[sigmas.len() - 1]);
                out.timesteps = t;
                out.sigmas = s;
                out.state = State::Heun { pending: None };
            }
            KClass::KDpm2 | KClass::KDpm2Ancestral => {
                let ancestral = cfg.class == KClass::KDpm2Ancestral;
                // Karras timesteps are rounded float64, otherwise float32; the midpoints' are
                // float32 either way (`_sigma_to_t` of float32 tensors runs in float32).
                let timesteps: Vec<f64> = if cfg.use_karras_sigmas {
                    timesteps.into_iter().map(np_round).collect()
                } else {
                    as_f32(timesteps)
                };
                let log_sigmas = train_log_sigmas(cfg);
                let n = sigmas.len() - 1;
                let ln = |s: f32| if s == 0.0 { f32::NEG_INFINITY } else { s.ln() };
                let geo_mean = |a: f32, b: f32| torch_lerp(ln(a), ln(b), 0.5).exp();
                let (interpol, up, down) = if ancestral {
                    let mut up = Vec::with_capacity(n + 1);
                    let mut down = Vec::with_capacity(n + 1);
                    for i in 0..=n {
                        let (s, next) = (sigmas[i], if i < n { sigmas[i + 1] } else { 0.0 });
                        let (s2, next2) = (s * s, next * next);
                        let u = (next2 * (s2 - next2) / s2).sqrt();
                        up.push(u);
                        down.push(if i == n { 0.0 } else { (next2 - u * u).sqrt() });
                    }
                    let mut interpol: Vec<f32> = (0..=n).map(|i| geo_mean(sigmas[i], down[i])).collect();
                    for v in interpol.iter_mut().skip(n.saturating_sub(1)) {
                        *v = 0.0;
                    }
                    (interpol, up, down)
                } else {
                    // The geometric mean of each sigma and the previous one (roll(1)).
                    let interpol = (0..=n).map(|i| geo_mean(sigmas[i], sigmas[(i + n) % (n + 1)])).collect();
                    (interpol, Vec::new(), Vec::new())
                };
                let t_interpol = |i: usize| f64::from(sigma_to_t_f32(interpol[i], &log_sigmas));
                let mut t = vec![timesteps[0]];
                for (j, &tj) in timesteps.iter().enumerate().take(n).skip(1) {
                    let ti = if ancestral { t_interpol(j - 1) } else { t_interpol(j) };
                    t.extend([ti, tj]);
                }
                out.timesteps = t;
                out.sigmas = repeat_kdpm2(&sigmas);
                out.sigmas_interpol = repeat_kdpm2(&interpol);
                out.sigmas_up = repeat_kdpm2(&up);
                out.sigmas_down = repeat_kdpm2(&down);
                out.state = State::KDpm2 { pending: None };
            }
        }
        Ok(out)
    }
}

/// diffusers' `get_lms_coefficient(order, t, current_order)`: the integral from sigma_t to
/// sigma_{t+1} of the Lagrange basis polynomial of node `t - current_order` over the nodes
/// `t, t-1, .., t-order+1`. diffusers integrates it numerically (scipy's `quad`, with the
/// integrand evaluated in float32); it is a polynomial of degree < 4, so a 4-point
/// Gauss-Legendre rule in float64 gives the exact value (within float32 rounding of diffusers').
fn lms_coefficient(sigmas: &[f32], order: usize, t: usize, current_order: usize) -> f64 {
    let node = |k: usize| f64::from(sigmas[t - k]);
    let basis = |tau: f64| {
        (0..order)
            .filter(|&k| k != current_order)
            .fold(1.0, |p, k| p * (tau - node(k)) / (node(current_order) - node(k)))
    };
    let (a, b) = (f64::from(sigmas[t]), f64::from(sigmas[t + 1]));
    let x1 = (3.0 / 7.0 - 2.0 / 7.0 * (6.0f64 / 5.0).sqrt()).sqrt();
    let x2 = (3.0 / 7.0 + 2.0 / 7.0 * (6.0f64 / 5.0).sqrt()).sqrt();
    let w1 = (18.0 + 30f64.sqrt()) / 36.0;
    let w2 = (18.0 - 30f64.sqrt()) / 36.0;
    let (mid, half) = ((a + b) / 2.0, (b - a) / 2.0);
    half * [(x1, w1), (-x1, w1), (x2, w2), (-x2, w2)].iter().map(|&(x, w)| w * basis(mid + half * x)).sum::<f64>()
}

impl Scheduler for KDiffusion {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn order(&self) -> usize {
        match self.class {
            KClass::Heun | KClass::KDpm2 | KClass::KDpm2Ancestral => 2,
            KClass::Euler | KClass::EulerAncestral | KClass::Lms => 1,
        }
    }

    fn set_begin_index(&mut self, begin: usize) {
        self.begin = begin;
        self.next_step = begin;
    }

    fn noise_scales(&self, index: usize) -> (f32, f32) {
        (1.0, self.sigmas[index])
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        if step_index >= self.timesteps.len() {
            return Err(step_out_of_range(step_index, self.timesteps.len()));
        }
        let k = step_index;
        let sigma = match self.class {
            // Second-order evaluations (odd indices) are at the midpoint sigma.
            KClass::KDpm2 if k % 2 == 1 => self.sigmas_interpol[k],
            KClass::KDpm2Ancestral if k % 2 == 1 => self.sigmas_interpol[k - 1],
            _ => self.sigmas[k],
        };
        scale_input(sample, sigma)
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
        check_same_shape(model_output, sample)?;
        let len = self.timesteps.len();
        let i = step_index;
        if i >= len {
            return Err(step_out_of_range(i, len));
        }
        if i == 0 || i == self.begin {
            match &mut self.state {
                State::Lms { derivatives } => derivatives.clear(),
                State::Heun { pending } => *pending = None,
                State::KDpm2 { pending } => *pending = None,
                State::Euler | State::EulerAncestral => {}
            }
        } else if i != self.next_step && !matches!(self.class, KClass::Euler | KClass::EulerAncestral) {
            return Err(candle_core::Error::Msg(format!(
                "{} is multistep: steps must be taken in order; step {i} asked, {} expected",
                self.class.class_name(),
                self.next_step
            )));
        }
        let m = to_f32_vec(model_output)?;
        let s = to_f32_vec(sample)?;
        let sigmas = &self.sigmas;
        let prev: Vec<f32> = match &mut self.state {
            State::Euler => {
                // s_churn 0 (what pipelines use): sigma_hat = sigma, no noise.
                let sigma = sigmas[i];
                let dt = sigma_at(sigmas, i + 1, len)? - sigma;
                let x0 = denoised(self.prediction_type, &m, &s, sigma);
                s.iter().zip(&x0).map(|(s, x0)| s + (s - x0) / sigma * dt).collect()
            }
            State::EulerAncestral => {
                let sigma_from = sigmas[i];
                let sigma_to = sigma_at(sigmas, i + 1, len)?;
                let (from2, to2) = (sigma_from * sigma_from, sigma_to * sigma_to);
                let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
                let sigma_down = (to2 - sigma_up * sigma_up).sqrt();
                let dt = sigma_down - sigma_from;
                let x0 = denoised(self.prediction_type, &m, &s, sigma_from);
                let z = to_f32_vec(&noise.randn(model_output.dims())?)?;
                if z.len() != s.len() {
                    return Err(candle_core::Error::Msg("noise source returned the wrong shape".into()));
                }
                s.iter().zip(&x0).zip(&z).map(|((s, x0), z)| (s + (s - x0) / sigma_from * dt) + z * sigma_up).collect()
            }
            State::Lms { derivatives } => {
                const ORDER: usize = 4;
                let sigma = sigmas[i];
                sigma_at(sigmas, i + 1, len)?;
                let x0 = denoised(self.prediction_type, &m, &s, sigma);
                derivatives.push(s.iter().zip(&x0).map(|(s, x0)| (s - x0) / sigma).collect());
                if derivatives.len() > ORDER {
                    derivatives.remove(0);
                }
                let order = (i + 1).min(ORDER);
                let coeffs: Vec<f32> = (0..order).map(|c| lms_coefficient(sigmas, order, i, c) as f32).collect();
                let mut sum = vec![0f32; s.len()];
                for (c, d) in coeffs.iter().zip(derivatives.iter().rev()) {
                    for (acc, d) in sum.iter_mut().zip(d) {
                        *acc += c * d;
                    }
                }
                s.iter().zip(&sum).map(|(s, d)| s + d).collect()
            }
            State::Heun { pending } => {
                let first_order = pending.is_none();
                let (sigma, sigma_next) =
                    if first_order { (sigmas[i], sigma_at(sigmas, i + 1, len)?) } else { (sigmas[i - 1], sigmas[i]) };
                let sigma_input = if first_order { sigma } else { sigma_next };
                let mut x0 = denoised(self.prediction_type, &m, &s, sigma_input);
                if let Some(r) = self.clip_sample_range {
                    x0.iter_mut().for_each(|v| *v = torch_clamp(*v, -r, r));
                }
                if first_order {
                    let derivative: Vec<f32> = s.iter().zip(&x0).map(|(s, x0)| (s - x0) / sigma).collect();
                    let dt = sigma_next - sigma;
                    let prev = s.iter().zip(&derivative).map(|(s, d)| s + d * dt).collect();
                    *pending = Some((derivative, dt, s));
                    prev
                } else {
                    let (prev_derivative, dt, first_sample) = pending.take().unwrap_or_default();
                    first_sample
                        .iter()
                        .zip(s.iter().zip(&x0))
                        .zip(&prev_derivative)
                        .map(|((fs, (s, x0)), pd)| {
                            let d = (pd + (s - x0) / sigma_next) / 2.0;
                            fs + d * dt
                        })
                        .collect()
                }
            }
            State::KDpm2 { pending } => {
                let ancestral = self.class == KClass::KDpm2Ancestral;
                let first_order = pending.is_none();
                let (sigma, sigma_interpol) = match (first_order, ancestral) {
                    (true, false) => (sigmas[i], sigma_at(&self.sigmas_interpol, i + 1, len)?),
                    (true, true) => (sigmas[i], self.sigmas_interpol[i]),
                    (false, false) => (sigmas[i - 1], self.sigmas_interpol[i]),
                    (false, true) => (sigmas[i - 1], self.sigmas_interpol[i - 1]),
                };
                let sigma_input = if first_order { sigma } else { sigma_interpol };
                let x0 = denoised(self.prediction_type, &m, &s, sigma_input);
                if first_order {
                    let dt = sigma_interpol - sigma;
                    let prev = s.iter().zip(&x0).map(|(s, x0)| s + (s - x0) / sigma * dt).collect();
                    *pending = Some(s);
                    prev
                } else {
                    let first_sample = pending.take().unwrap_or_default();
                    let dt = if ancestral { self.sigmas_down[i - 1] - sigma } else { sigmas[i] - sigma };
                    let mut prev: Vec<f32> = first_sample
                        .iter()
                        .zip(s.iter().zip(&x0))
                        .map(|(fs, (s, x0))| fs + (s - x0) / sigma_interpol * dt)
                        .collect();
                    if ancestral {
                        let sigma_up = self.sigmas_up[i - 1];
                        let z = to_f32_vec(&noise.randn(model_output.dims())?)?;
                        if z.len() != prev.len() {
                            return Err(candle_core::Error::Msg("noise source returned the wrong shape".into()));
                        }
                        prev.iter_mut().zip(&z).for_each(|(p, z)| *p += z * sigma_up);
                    }
                    prev
                }
            }
        };
        self.next_step = i + 1;
        Tensor::from_vec(prev, sample.dims(), sample.device())
    }
}
