//! Diffusion schedulers that reproduce diffusers' `DDIMScheduler`,
//! `DPMSolverMultistepScheduler` (DPM-Solver++ 2M and 2M SDE, optionally with Karras sigmas),
//! `EulerDiscreteScheduler`, `EulerAncestralDiscreteScheduler`, `LMSDiscreteScheduler`,
//! `HeunDiscreteScheduler`, `KDPM2DiscreteScheduler`, `KDPM2AncestralDiscreteScheduler`
//! (these six in `kdiffusion`; Karras sigmas except for Euler ancestral), `PNDMScheduler`
//! (PLMS), `DDPMScheduler`, `UniPCMultistepScheduler` (bh1 / bh2), `DEISMultistepScheduler` and
//! `DPMSolverSinglestepScheduler` (DPM-Solver++ 2S; the last three optionally with Karras sigmas).
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
//! give a different count (DDIM/DPM/UniPC `trailing` spacing for some step counts, DPM's
//! `lambda_min_clipped`), and some schedulers always do: Heun and KDPM2 evaluate the model
//! twice per step (2 * steps - 1 timesteps), PNDM repeats its second timestep (steps + 1). DDIM, DPM,
//! UniPC, PNDM and DDPM timesteps are integers (as f64); Euler, Euler ancestral, LMS and Heun ones
//! are diffusers' float32 values, fractional with their default "linspace" spacing; the
//! sigma-based ones also scale the model input (`scale_model_input`) and the initial noise
//! (`init_noise_sigma` > 1). Stochastic schedulers (DDIM with eta > 0, Euler ancestral, DDPM,
//! KDPM2 ancestral, DPM-Solver++ 2M SDE)
//! draw from the job's noise source in `step`.

pub mod config;
pub mod ddim;
pub mod ddpm;
pub mod deis;
pub mod dpm_singlestep;
pub mod dpm_solver;
pub mod kdiffusion;
mod numerics;
pub mod pndm;
pub mod unipc;

pub use config::{PredictionType, SchedulerConfig, UniPcSolverType};

use candle_core::{DType, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchedulerKind {
    Ddim,
    DpmSolverMultistep,
    /// `DPMSolverMultistepScheduler` with `algorithm_type` "sde-dpmsolver++" (DPM-Solver++ 2M SDE).
    DpmSolverSde,
    Euler,
    EulerAncestral,
    Lms,
    Heun,
    Pndm,
    Ddpm,
    KDpm2,
    KDpm2Ancestral,
    /// `UniPCMultistepScheduler`, with the solver type a name asks for (`None`: the config's,
    /// diffusers' default bh2).
    UniPc(Option<UniPcSolverType>),
    Deis,
    DpmSolverSinglestep,
}

impl SchedulerKind {
    /// diffusers' class name.
    pub fn class_name(self) -> &'static str {
        match self {
            Self::Ddim => "DDIMScheduler",
            Self::DpmSolverMultistep | Self::DpmSolverSde => "DPMSolverMultistepScheduler",
            Self::Euler => "EulerDiscreteScheduler",
            Self::EulerAncestral => "EulerAncestralDiscreteScheduler",
            Self::Lms => "LMSDiscreteScheduler",
            Self::Heun => "HeunDiscreteScheduler",
            Self::Pndm => "PNDMScheduler",
            Self::Ddpm => "DDPMScheduler",
            Self::KDpm2 => "KDPM2DiscreteScheduler",
            Self::KDpm2Ancestral => "KDPM2AncestralDiscreteScheduler",
            Self::UniPc(_) => "UniPCMultistepScheduler",
            Self::Deis => "DEISMultistepScheduler",
            Self::DpmSolverSinglestep => "DPMSolverSinglestepScheduler",
        }
    }

    /// Whether the class has a `use_karras_sigmas` option.
    pub fn has_karras(self) -> bool {
        matches!(
            self,
            Self::DpmSolverMultistep
                | Self::DpmSolverSde
                | Self::Euler
                | Self::Lms
                | Self::Heun
                | Self::KDpm2
                | Self::KDpm2Ancestral
                | Self::UniPc(_)
                | Self::Deis
                | Self::DpmSolverSinglestep
        )
    }
}

/// What a request asks for.
#[derive(Clone, Debug, Default)]
pub struct SchedulerRequest {
    /// "" = the default (DDIM); see [`ACCEPTED_NAMES`].
    pub name: String,
    /// DDIM's eta (0 = deterministic DDIM, 1 = DDPM-like); only DDIM takes it.
    pub eta: Option<f32>,
    /// Schedulers with Karras sigmas (DPM-Solver, Euler, LMS, Heun): overrides the config's
    /// `use_karras_sigmas`.
    pub use_karras_sigmas: Option<bool>,
}

/// A validated request.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedScheduler {
    pub kind: SchedulerKind,
    /// DDIM's eta; 0 for the others.
    pub eta: f64,
    /// `Some` overrides the config's `use_karras_sigmas`; always `None` for schedulers without it.
    pub use_karras_sigmas: Option<bool>,
}

/// The scheduler names a request may use (case-insensitive), for messages and docs.
pub const ACCEPTED_NAMES: &str = "\"\" / \"ddim\" / \"DDIMScheduler\" (DDIM, the default); \
\"dpm++2m\" / \"dpmpp_2m\" / \"dpm++_2m\" / \"dpmsolver++\" / \"DPMSolverMultistep\" / \"DPMSolverMultistepScheduler\" \
(DPM-Solver++ 2M); \"dpm++2m-karras\" / \"dpmpp_2m_karras\" / \"dpm++_2m_karras\" / \"DPMSolverMultistepScheduler (karras)\" \
(DPM-Solver++ 2M with Karras sigmas); \"dpm++2m-sde\" / \"dpmpp_2m_sde\" / \"dpm++_2m_sde\" / \"sde-dpmsolver++\" / \
\"DPMSolverMultistepScheduler (sde-dpmsolver++)\" (DPM-Solver++ 2M SDE); \"dpm++2m-sde-karras\" / \"dpmpp_2m_sde_karras\" / \
\"dpm++_2m_sde_karras\" / \"DPMSolverMultistepScheduler (sde-dpmsolver++, karras)\" (DPM-Solver++ 2M SDE with Karras sigmas); \"euler\" / \"EulerDiscrete\" / \"EulerDiscreteScheduler\" (Euler); \
\"euler-karras\" / \"euler_karras\" / \"EulerDiscreteScheduler (karras)\"; \
\"euler_a\" / \"euler-a\" / \"euler-ancestral\" / \"euler_ancestral\" / \"EulerAncestralDiscrete\" / \"EulerAncestralDiscreteScheduler\" \
(Euler ancestral); \"lms\" / \"LMSDiscrete\" / \"LMSDiscreteScheduler\" (LMS); \"lms-karras\" / \"lms_karras\" / \
\"LMSDiscreteScheduler (karras)\"; \"heun\" / \"HeunDiscrete\" / \"HeunDiscreteScheduler\" (Heun); \"heun-karras\" / \
\"heun_karras\" / \"HeunDiscreteScheduler (karras)\"; \"pndm\" / \"plms\" / \"PNDM\" / \"PNDMScheduler\" (PNDM, PLMS steps); \
\"ddpm\" / \"DDPM\" / \"DDPMScheduler\" (DDPM); \"kdpm2\" / \"dpm2\" / \"KDPM2Discrete\" / \"KDPM2DiscreteScheduler\" \
(KDPM2); \"kdpm2-karras\" / \"kdpm2_karras\" / \"dpm2-karras\" / \"KDPM2DiscreteScheduler (karras)\"; \"kdpm2_a\" / \"kdpm2-a\" / \
\"kdpm2-ancestral\" / \"dpm2_a\" / \"KDPM2AncestralDiscrete\" / \"KDPM2AncestralDiscreteScheduler\" (KDPM2 ancestral); \
\"kdpm2_a-karras\" / \"kdpm2_a_karras\" / \"dpm2_a-karras\" / \"KDPM2AncestralDiscreteScheduler (karras)\"; \
\"unipc\" / \"UniPCMultistep\" / \"UniPCMultistepScheduler\" (UniPC, the config's solver type, default bh2); \"unipc-bh1\" / \
\"UniPCMultistepScheduler (bh1)\"; \"unipc-bh2\" / \"UniPCMultistepScheduler (bh2)\"; with Karras sigmas \"unipc-karras\" / \
\"unipc-bh1-karras\" / \"unipc-bh2-karras\" / \"UniPCMultistepScheduler (karras)\" / \"UniPCMultistepScheduler (bh1, karras)\" / \
\"UniPCMultistepScheduler (bh2, karras)\"; \"deis\" / \"DEISMultistep\" / \"DEISMultistepScheduler\" (DEIS); \
\"deis-karras\" / \"deis_karras\" / \"DEISMultistepScheduler (karras)\"; \"dpm++2s\" / \"dpmpp_2s\" / \
\"dpmsolver_singlestep\" / \"DPMSolverSinglestep\" / \"DPMSolverSinglestepScheduler\" (DPM-Solver++ 2S, single-step); \
\"dpm++2s-karras\" / \"dpmpp_2s_karras\" / \"DPMSolverSinglestepScheduler (karras)\"";

/// (lowercase names, kind, whether the name means Karras sigmas)
const NAMES: &[(&[&str], SchedulerKind, bool)] = &[
    (&["", "ddim", "ddimscheduler"], SchedulerKind::Ddim, false),
    (
        &["dpm++2m", "dpmpp_2m", "dpm++_2m", "dpmsolver++", "dpmsolvermultistep", "dpmsolvermultistepscheduler"],
        SchedulerKind::DpmSolverMultistep,
        false,
    ),
    (
        &["dpm++2m-karras", "dpmpp_2m_karras", "dpm++_2m_karras", "dpmsolvermultistepscheduler (karras)"],
        SchedulerKind::DpmSolverMultistep,
        true,
    ),
    (
        &[
            "dpm++2m-sde",
            "dpmpp_2m_sde",
            "dpm++_2m_sde",
            "sde-dpmsolver++",
            "dpmsolvermultistepscheduler (sde-dpmsolver++)",
        ],
        SchedulerKind::DpmSolverSde,
        false,
    ),
    (
        &[
            "dpm++2m-sde-karras",
            "dpmpp_2m_sde_karras",
            "dpm++_2m_sde_karras",
            "dpmsolvermultistepscheduler (sde-dpmsolver++, karras)",
        ],
        SchedulerKind::DpmSolverSde,
        true,
    ),
    (&["euler", "eulerdiscrete", "eulerdiscretescheduler"], SchedulerKind::Euler, false),
    (&["euler-karras", "euler_karras", "eulerdiscretescheduler (karras)"], SchedulerKind::Euler, true),
    (
        &[
            "euler_a",
            "euler-a",
            "euler-ancestral",
            "euler_ancestral",
            "eulerancestraldiscrete",
            "eulerancestraldiscretescheduler",
        ],
        SchedulerKind::EulerAncestral,
        false,
    ),
    (&["lms", "lmsdiscrete", "lmsdiscretescheduler"], SchedulerKind::Lms, false),
    (&["lms-karras", "lms_karras", "lmsdiscretescheduler (karras)"], SchedulerKind::Lms, true),
    (&["heun", "heundiscrete", "heundiscretescheduler"], SchedulerKind::Heun, false),
    (&["heun-karras", "heun_karras", "heundiscretescheduler (karras)"], SchedulerKind::Heun, true),
    (&["pndm", "plms", "pndmscheduler"], SchedulerKind::Pndm, false),
    (&["ddpm", "ddpmscheduler"], SchedulerKind::Ddpm, false),
    (&["kdpm2", "dpm2", "kdpm2discrete", "kdpm2discretescheduler"], SchedulerKind::KDpm2, false),
    (
        &["kdpm2-karras", "kdpm2_karras", "dpm2-karras", "dpm2_karras", "kdpm2discretescheduler (karras)"],
        SchedulerKind::KDpm2,
        true,
    ),
    (
        &[
            "kdpm2_a",
            "kdpm2-a",
            "kdpm2-ancestral",
            "kdpm2_ancestral",
            "dpm2_a",
            "dpm2-a",
            "kdpm2ancestraldiscrete",
            "kdpm2ancestraldiscretescheduler",
        ],
        SchedulerKind::KDpm2Ancestral,
        false,
    ),
    (
        &[
            "kdpm2_a-karras",
            "kdpm2_a_karras",
            "kdpm2-a-karras",
            "dpm2_a-karras",
            "dpm2_a_karras",
            "kdpm2ancestraldiscretescheduler (karras)",
        ],
        SchedulerKind::KDpm2Ancestral,
        true,
    ),
    (&["unipc", "unipcmultistep", "unipcmultistepscheduler"], SchedulerKind::UniPc(None), false),
    (&["unipc-karras", "unipc_karras", "unipcmultistepscheduler (karras)"], SchedulerKind::UniPc(None), true),
    (
        &["unipc-bh1", "unipc_bh1", "unipcmultistepscheduler (bh1)"],
        SchedulerKind::UniPc(Some(UniPcSolverType::Bh1)),
        false,
    ),
    (
        &["unipc-bh1-karras", "unipc_bh1_karras", "unipcmultistepscheduler (bh1, karras)"],
        SchedulerKind::UniPc(Some(UniPcSolverType::Bh1)),
        true,
    ),
    (
        &["unipc-bh2", "unipc_bh2", "unipcmultistepscheduler (bh2)"],
        SchedulerKind::UniPc(Some(UniPcSolverType::Bh2)),
        false,
    ),
    (
        &["unipc-bh2-karras", "unipc_bh2_karras", "unipcmultistepscheduler (bh2, karras)"],
        SchedulerKind::UniPc(Some(UniPcSolverType::Bh2)),
        true,
    ),
    (&["deis", "deismultistep", "deismultistepscheduler"], SchedulerKind::Deis, false),
    (&["deis-karras", "deis_karras", "deismultistepscheduler (karras)"], SchedulerKind::Deis, true),
    (
        &[
            "dpm++2s",
            "dpmpp_2s",
            "dpm++_2s",
            "dpmsolver_singlestep",
            "dpmsolversinglestep",
            "dpmsolversinglestepscheduler",
        ],
        SchedulerKind::DpmSolverSinglestep,
        false,
    ),
    (
        &[
            "dpm++2s-karras",
            "dpmpp_2s_karras",
            "dpm++_2s_karras",
            "dpmsolver_singlestep_karras",
            "dpmsolversinglestepscheduler (karras)",
        ],
        SchedulerKind::DpmSolverSinglestep,
        true,
    ),
];

/// Parses a request's scheduler: the name (case-insensitive, surrounding spaces ignored), and
/// the options that go with it. Errors are messages for the user.
pub fn resolve(req: &SchedulerRequest) -> Result<ResolvedScheduler, String> {
    let name = req.name.trim().to_lowercase();
    let Some(&(_, kind, name_karras)) = NAMES.iter().find(|(names, _, _)| names.contains(&name.as_str())) else {
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
                    "use_karras_sigmas applies to DPM-Solver++, Euler, LMS, Heun, KDPM2, UniPC, DEIS and DPM-Solver singlestep, not DDIM; for Karras sigmas use e.g. \"dpm++2m-karras\" (accepted names: {ACCEPTED_NAMES})"
                ));
            }
            Ok(ResolvedScheduler { kind, eta: f64::from(req.eta.unwrap_or(0.0)), use_karras_sigmas: None })
        }
        _ => {
            // eta 0 is what an unset proto field reads as, and means "no noise": accept it.
            if req.eta.is_some_and(|eta| eta != 0.0) {
                return Err(format!(
                    "eta applies to DDIM only, not {} (accepted names: {ACCEPTED_NAMES})",
                    kind.class_name()
                ));
            }
            if !kind.has_karras() {
                if req.use_karras_sigmas == Some(true) {
                    return Err(format!(
                        "use_karras_sigmas applies to DPM-Solver++, Euler, LMS, Heun, KDPM2, UniPC, DEIS and DPM-Solver singlestep, not {} (accepted names: {ACCEPTED_NAMES})",
                        kind.class_name()
                    ));
                }
                return Ok(ResolvedScheduler { kind, eta: 0.0, use_karras_sigmas: None });
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
        if let SchedulerKind::UniPc(solver_type) = self.kind {
            let karras = self.use_karras_sigmas == Some(true);
            return match (solver_type, karras) {
                (None, false) => "UniPCMultistepScheduler".into(),
                (None, true) => "UniPCMultistepScheduler (karras)".into(),
                (Some(t), false) => format!("UniPCMultistepScheduler ({})", t.as_str()),
                (Some(t), true) => format!("UniPCMultistepScheduler ({}, karras)", t.as_str()),
            };
        }
        if self.kind == SchedulerKind::DpmSolverSde {
            return match self.use_karras_sigmas {
                Some(true) => "DPMSolverMultistepScheduler (sde-dpmsolver++, karras)".into(),
                _ => "DPMSolverMultistepScheduler (sde-dpmsolver++)".into(),
            };
        }
        match (self.kind.has_karras(), self.use_karras_sigmas) {
            (true, Some(true)) => format!("{} (karras)", self.kind.class_name()),
            _ => self.kind.class_name().into(),
        }
    }
}

/// One configured scheduler run (a fixed step count); stateful for multistep solvers.
pub trait Scheduler: Send {
    /// The timesteps to denoise at, in order (fed to the denoiser as they are; see the module docs).
    fn timesteps(&self) -> &[f64];

    /// Standard deviation of the initial noise (1 for DDIM, DPM-Solver, PNDM and DDPM; the
    /// largest sigma, or sqrt(sigma_max^2 + 1) with "leading" spacing, for the sigma-based ones).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// The denoiser's input at step `step_index` (the identity for DDIM, DPM-Solver, PNDM and
    /// DDPM; `sample / sqrt(sigma^2 + 1)` for the sigma-based ones).
    fn scale_model_input(&self, sample: &Tensor, _step_index: usize) -> candle_core::Result<Tensor> {
        Ok(sample.clone())
    }

    /// One step x_t -> x_{t-1}, for the model output at `timesteps()[step_index]`; steps must
    /// be taken in order (step 0 starts over). Draws noise from `noise` only when it needs it
    /// (DDIM with eta > 0, Euler ancestral every step, DDPM at every timestep above 0, KDPM2
    /// ancestral at every second-order evaluation, DPM-Solver++ 2M SDE every step), once per
    /// step, in the shape of `model_output`. Returns f32.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn crate::noise::NoiseSource,
    ) -> candle_core::Result<Tensor>;

    /// Entries of `timesteps()` per inference step (diffusers' `order`: 2 for Heun and KDPM2,
    /// whose steps evaluate the model twice; 1 otherwise).
    fn order(&self) -> usize {
        1
    }

    /// Starts the loop at `timesteps()[begin]` instead of 0 (img2img and inpainting skip the
    /// first steps by strength; diffusers' `set_begin_index`): that step then starts afresh, as
    /// step 0 does.
    fn set_begin_index(&mut self, _begin: usize) {}

    /// The weights (a, b) of diffusers' `add_noise` at `timesteps()[index]`: noisy = a * x + b * noise
    /// (sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t) for DDIM, PNDM and DDPM; 1 and sigma for the
    /// k-diffusion ones; alpha_t and sigma_t of the sigma for DPM-Solver, UniPC and DEIS).
    fn noise_scales(&self, index: usize) -> (f32, f32);

    /// The noise levels sigma_i = sqrt((1 - alpha_bar) / alpha_bar), for schedulers that have
    /// them, as diffusers' float32 `sigmas`: `timesteps().len() + 1` of them (DPM-Solver,
    /// Euler, Euler ancestral, LMS), or Heun's `timesteps().len() + 1` / KDPM2's
    /// `timesteps().len() + 3` repeated ones.
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
        SchedulerKind::DpmSolverMultistep | SchedulerKind::DpmSolverSde => {
            let mut cfg = config.dpm_solver()?;
            // The name picks the algorithm, whatever the config's algorithm_type says.
            cfg.sde = resolved.kind == SchedulerKind::DpmSolverSde;
            if let Some(karras) = resolved.use_karras_sigmas {
                cfg.use_karras_sigmas = karras;
            }
            Ok(Box::new(dpm_solver::DpmSolverMultistep::new(&cfg, steps)?))
        }
        SchedulerKind::Euler
        | SchedulerKind::EulerAncestral
        | SchedulerKind::Lms
        | SchedulerKind::Heun
        | SchedulerKind::KDpm2
        | SchedulerKind::KDpm2Ancestral => {
            let class = match resolved.kind {
                SchedulerKind::Euler => config::KClass::Euler,
                SchedulerKind::EulerAncestral => config::KClass::EulerAncestral,
                SchedulerKind::Lms => config::KClass::Lms,
                SchedulerKind::Heun => config::KClass::Heun,
                SchedulerKind::KDpm2 => config::KClass::KDpm2,
                _ => config::KClass::KDpm2Ancestral,
            };
            let mut cfg = config.k_diffusion(class)?;
            if let Some(karras) = resolved.use_karras_sigmas {
                cfg.use_karras_sigmas = karras;
            }
            Ok(Box::new(kdiffusion::KDiffusion::new(&cfg, steps)?))
        }
        SchedulerKind::UniPc(solver_type) => {
            let mut cfg = config.unipc()?;
            if let Some(t) = solver_type {
                cfg.solver_type = t;
            }
            if let Some(karras) = resolved.use_karras_sigmas {
                cfg.use_karras_sigmas = karras;
            }
            Ok(Box::new(unipc::UniPc::new(&cfg, steps)?))
        }
        SchedulerKind::Deis => {
            let mut cfg = config.deis()?;
            if let Some(karras) = resolved.use_karras_sigmas {
                cfg.use_karras_sigmas = karras;
            }
            Ok(Box::new(deis::Deis::new(&cfg, steps)?))
        }
        SchedulerKind::DpmSolverSinglestep => {
            let mut cfg = config.dpm_singlestep()?;
            if let Some(karras) = resolved.use_karras_sigmas {
                cfg.use_karras_sigmas = karras;
            }
            Ok(Box::new(dpm_singlestep::DpmSinglestep::new(&cfg, steps)?))
        }
        SchedulerKind::Pndm => Ok(Box::new(pndm::Pndm::new(&config.pndm()?, steps)?)),
        SchedulerKind::Ddpm => Ok(Box::new(ddpm::Ddpm::new(&config.ddpm()?, steps)?)),
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

/// diffusers' `add_noise`: `original` noised to the level of `timesteps()[index]`.
pub fn add_noise(
    scheduler: &dyn Scheduler,
    original: &Tensor,
    noise: &Tensor,
    index: usize,
) -> candle_core::Result<Tensor> {
    if index >= scheduler.timesteps().len() {
        return Err(step_out_of_range(index, scheduler.timesteps().len()));
    }
    let (a, b) = scheduler.noise_scales(index);
    let (x, n) = (original.to_dtype(DType::F32)?, noise.to_dtype(DType::F32)?);
    // Elementwise in f32, rounded as torch rounds `a * x + b * noise`.
    (x * f64::from(a))? + (n * f64::from(b))?
}

/// The start of a multistep scheduler's step: shapes match, the index is in range and follows
/// the previous step. Returns true for the first step (`begin`, 0 unless img2img set it), where
/// the caller clears its history.
fn begin_ordered_step(
    name: &str,
    model_output: &Tensor,
    sample: &Tensor,
    step_index: usize,
    len: usize,
    (begin, next_step): (usize, usize),
) -> candle_core::Result<bool> {
    check_same_shape(model_output, sample)?;
    if step_index >= len {
        return Err(step_out_of_range(step_index, len));
    }
    if step_index == begin {
        return Ok(true);
    }
    if step_index != 0 && step_index != next_step {
        return Err(candle_core::Error::Msg(format!(
            "{name}: steps must be taken in order; step {step_index} asked, {next_step} expected"
        )));
    }
    Ok(step_index == 0)
}

/// Appends the newest model output to a fixed-length history, dropping the oldest.
fn push_history(history: &mut [Option<Vec<f32>>], latest: Vec<f32>) {
    history.rotate_left(1);
    if let Some(last) = history.last_mut() {
        *last = Some(latest);
    }
}

fn step_out_of_range(step_index: usize, len: usize) -> candle_core::Error {
    candle_core::Error::Msg(format!("scheduler step {step_index} is out of range: the schedule has {len} steps"))
}
