//! Diffusion schedulers that reproduce diffusers' `DDIMScheduler` and
//! `DPMSolverMultistepScheduler` (DPM-Solver++ 2M, optionally with Karras sigmas).
//!
//! Every torch / numpy operation diffusers performs is reproduced with its exact rounding
//! (see `numerics`), except that torch evaluates float32 `sqrt`/`log`/`exp` with MKL VML,
//! whose results are up to ~0.75 ulp off and undocumented; here those are correctly rounded
//! (sqrt) or glibc's. With torch's sqrt/log/exp swapped for these, diffusers' outputs are
//! reproduced bit for bit; against stock torch a coefficient can differ by an ulp, i.e. a
//! relative error of a few 1e-7 in each step's output.
//!
//! A job resolves the request's scheduler name ([`resolve`]), builds a scheduler for its step
//! count from the checkpoint's `scheduler_config.json` ([`build`]), then runs the usual loop:
//!
//! ```text
//! x = init_noise * scheduler.init_noise_sigma()
//! for (i, t) in scheduler.timesteps().iter().enumerate():
//!     model_input = scheduler.scale_model_input(x, i)
//!     x = scheduler.step(denoiser(model_input, t), i, x, noise)
//! ```
//!
//! Iterate over [`Scheduler::timesteps`], not `0..steps`: like diffusers, some configurations
//! give a different count (DDIM/DPM `trailing` spacing for some step counts, DPM's
//! `lambda_min_clipped`). Timesteps are integers (as f64); Karras schedules can repeat one.

pub mod config;
pub mod ddim;
pub mod dpm_solver;
mod numerics;

pub use config::{PredictionType, SchedulerConfig};

use candle_core::{DType, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchedulerKind {
    Ddim,
    DpmSolverMultistep,
}

/// What a request asks for.
#[derive(Clone, Debug, Default)]
pub struct SchedulerRequest {
    /// "" = the default (DDIM); see [`ACCEPTED_NAMES`].
    pub name: String,
    /// DDIM's eta (0 = deterministic DDIM, 1 = DDPM-like); only DDIM takes it.
    pub eta: Option<f32>,
    /// DPM-Solver only: overrides the config's `use_karras_sigmas`.
    pub use_karras_sigmas: Option<bool>,
}

/// A validated request.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedScheduler {
    pub kind: SchedulerKind,
    /// DDIM's eta; 0 for DPM-Solver.
    pub eta: f64,
    /// DPM-Solver only: `Some` overrides the config's `use_karras_sigmas`; always `None` for DDIM.
    pub use_karras_sigmas: Option<bool>,
}

/// The scheduler names a request may use (case-insensitive), for messages and docs.
pub const ACCEPTED_NAMES: &str = "\"\" / \"ddim\" / \"DDIMScheduler\" (DDIM, the default); \
\"dpm++2m\" / \"dpmpp_2m\" / \"dpm++_2m\" / \"dpmsolver++\" / \"DPMSolverMultistep\" / \"DPMSolverMultistepScheduler\" \
(DPM-Solver++ 2M); \"dpm++2m-karras\" / \"dpmpp_2m_karras\" / \"dpm++_2m_karras\" / \"DPMSolverMultistepScheduler (karras)\" \
(DPM-Solver++ 2M with Karras sigmas)";

const DDIM_NAMES: &[&str] = &["", "ddim", "ddimscheduler"];
const DPM_NAMES: &[&str] =
    &["dpm++2m", "dpmpp_2m", "dpm++_2m", "dpmsolver++", "dpmsolvermultistep", "dpmsolvermultistepscheduler"];
const DPM_KARRAS_NAMES: &[&str] =
    &["dpm++2m-karras", "dpmpp_2m_karras", "dpm++_2m_karras", "dpmsolvermultistepscheduler (karras)"];

/// Parses a request's scheduler: the name (case-insensitive, surrounding spaces ignored), and
/// the options that go with it. Errors are messages for the user.
pub fn resolve(req: &SchedulerRequest) -> Result<ResolvedScheduler, String> {
    let name = req.name.trim().to_lowercase();
    let (kind, name_karras) = if DDIM_NAMES.contains(&name.as_str()) {
        (SchedulerKind::Ddim, false)
    } else if DPM_NAMES.contains(&name.as_str()) {
        (SchedulerKind::DpmSolverMultistep, false)
    } else if DPM_KARRAS_NAMES.contains(&name.as_str()) {
        (SchedulerKind::DpmSolverMultistep, true)
    } else {
        return Err(format!("unknown scheduler {:?}; accepted names: {ACCEPTED_NAMES}", req.name));
    };
    if let Some(eta) = req.eta {
        if !eta.is_finite() || eta < 0.0 {
            return Err(format!("eta must be a finite number >= 0, got {eta}"));
        }
    }
    match kind {
        SchedulerKind::Ddim => {
            if req.use_karras_sigmas == Some(true) {
                return Err(format!(
                    "use_karras_sigmas applies to DPM-Solver++ only, not DDIM; for Karras sigmas use \"dpm++2m-karras\" (accepted names: {ACCEPTED_NAMES})"
                ));
            }
            Ok(ResolvedScheduler { kind, eta: f64::from(req.eta.unwrap_or(0.0)), use_karras_sigmas: None })
        }
        SchedulerKind::DpmSolverMultistep => {
            // eta 0 is what an unset proto field reads as, and means "no noise": accept it.
            if req.eta.is_some_and(|eta| eta != 0.0) {
                return Err(format!(
                    "eta applies to DDIM only; DPM-Solver++ 2M is deterministic (accepted names: {ACCEPTED_NAMES})"
                ));
            }
            if name_karras && req.use_karras_sigmas == Some(false) {
                return Err(format!("scheduler {:?} means Karras sigmas, but use_karras_sigmas is false", req.name));
            }
            let use_karras_sigmas = if name_karras { Some(true) } else { req.use_karras_sigmas };
            Ok(ResolvedScheduler { kind, eta: 0.0, use_karras_sigmas })
        }
    }
}

impl ResolvedScheduler {
    /// A human-readable name that [`resolve`] accepts back.
    pub fn canonical_name(&self) -> String {
        match (self.kind, self.use_karras_sigmas) {
            (SchedulerKind::Ddim, _) => "DDIMScheduler".into(),
            (SchedulerKind::DpmSolverMultistep, Some(true)) => "DPMSolverMultistepScheduler (karras)".into(),
            (SchedulerKind::DpmSolverMultistep, _) => "DPMSolverMultistepScheduler".into(),
        }
    }
}

/// One configured scheduler run (a fixed step count); stateful for multistep solvers.
pub trait Scheduler: Send {
    /// The timesteps to denoise at, in order (integers; fed to the denoiser as they are).
    fn timesteps(&self) -> &[f64];

    /// Standard deviation of the initial noise (1 for DDIM and DPM-Solver).
    fn init_noise_sigma(&self) -> f64;

    /// The denoiser's input at step `step_index` (the identity for DDIM and DPM-Solver).
    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> candle_core::Result<Tensor>;

    /// One step x_t -> x_{t-1}, for the model output at `timesteps()[step_index]`; steps must
    /// be taken in order (step 0 starts over). Draws noise from `noise` only when it needs it
    /// (DDIM with eta > 0), in the shape of `model_output`. Returns f32.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn crate::noise::NoiseSource,
    ) -> candle_core::Result<Tensor>;

    /// The noise levels sigma_i = sqrt((1 - alpha_bar) / alpha_bar), `timesteps().len() + 1`
    /// of them, for schedulers that have them (DPM-Solver), as diffusers' float32 `sigmas`.
    fn sigmas(&self) -> Option<&[f32]> {
        None
    }
}

/// Builds a scheduler for `steps` inference steps. Errors are messages for the user: `steps`
/// of 0 or above `num_train_timesteps`, unsupported config values, or a schedule diffusers
/// would run with an out-of-range timestep.
pub fn build(
    config: &SchedulerConfig,
    resolved: &ResolvedScheduler,
    steps: usize,
) -> Result<Box<dyn Scheduler>, String> {
    check_steps(config.num_train_timesteps(), steps)?;
    match resolved.kind {
        SchedulerKind::Ddim => Ok(Box::new(ddim::Ddim::new(&config.ddim()?, steps, resolved.eta)?)),
        SchedulerKind::DpmSolverMultistep => {
            let mut cfg = config.dpm_solver()?;
            if let Some(karras) = resolved.use_karras_sigmas {
                cfg.use_karras_sigmas = karras;
            }
            Ok(Box::new(dpm_solver::DpmSolverMultistep::new(&cfg, steps)?))
        }
    }
}

fn check_steps(num_train_timesteps: usize, steps: usize) -> Result<(), String> {
    if steps == 0 {
        return Err("steps must be at least 1".into());
    }
    if steps > num_train_timesteps {
        return Err(format!(
            "steps must be at most {num_train_timesteps} (the model's num_train_timesteps), got {steps}"
        ));
    }
    Ok(())
}

/// Integer timesteps -> f64, rejecting any outside the model's `[0, num_train_timesteps)`
/// (diffusers would index with them: -1 silently wraps to the last timestep).
fn checked_timesteps(
    class: &str,
    timesteps: &[i64],
    num_train_timesteps: usize,
    steps: usize,
) -> Result<Vec<f64>, String> {
    if timesteps.is_empty() {
        return Err(format!("{class}: {steps} steps give no timesteps with this scheduler config"));
    }
    if let Some(bad) = timesteps.iter().find(|&&t| t < 0 || t >= num_train_timesteps as i64) {
        return Err(format!(
            "{class}: {steps} steps give timestep {bad}, outside the model's 0..{num_train_timesteps} with this config \
             (timestep_spacing / steps_offset); choose another step count"
        ));
    }
    Ok(timesteps.iter().map(|&t| t as f64).collect())
}

/// A tensor's elements as contiguous f32.
fn to_f32_vec(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

fn check_same_shape(model_output: &Tensor, sample: &Tensor) -> candle_core::Result<()> {
    if model_output.dims() != sample.dims() {
        return Err(candle_core::Error::Msg(format!(
            "scheduler step: model output has shape {:?} but the sample has {:?}",
            model_output.dims(),
            sample.dims()
        )));
    }
    Ok(())
}

fn step_out_of_range(step_index: usize, len: usize) -> candle_core::Error {
    candle_core::Error::Msg(format!("scheduler step {step_index} is out of range: the schedule has {len} steps"))
}
