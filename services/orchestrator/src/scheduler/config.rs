//! A checkpoint's `scheduler/scheduler_config.json`, read the way diffusers'
//! `CLASS.from_config(config, **overrides)` reads it.
//!
//! The file is kept as JSON and interpreted per scheduler class on demand, because the same
//! file means different things to different classes: absent keys take *that class's*
//! defaults (DDIM: `timestep_spacing` "leading", `clip_sample` true, `set_alpha_to_one` true;
//! DPM-Solver: "linspace", ...), keys a class does not know are ignored (SD 2.1-base ships a
//! `PNDMScheduler` config with `skip_prk_steps`), and keys starting with `_` are metadata.

use serde_json::{Map, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PredictionType {
    /// The model predicts the noise.
    Epsilon,
    /// The model predicts v = alpha_t * noise - sigma_t * x0 (SD 2.x 768-v).
    VPrediction,
    /// The model predicts x0 directly.
    Sample,
}

impl PredictionType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Epsilon => "epsilon",
            Self::VPrediction => "v_prediction",
            Self::Sample => "sample",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredcosCapV2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinalSigmasType {
    Zero,
    SigmaMin,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SolverType {
    Midpoint,
    Heun,
}

const DDIM: &str = "DDIMScheduler";
const DPM: &str = "DPMSolverMultistepScheduler";

/// A parsed `scheduler_config.json` (plus any `from_config` keyword overrides).
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// The JSON object with `_use_default_values` already applied.
    raw: Map<String, Value>,
    num_train_timesteps: usize,
    /// What the denoiser predicts (every class reads this key, default "epsilon").
    pub prediction_type: PredictionType,
}

impl SchedulerConfig {
    /// Parses the JSON of a `scheduler_config.json`.
    pub fn from_json(value: &Value) -> Result<Self, String> {
        let Value::Object(map) = value else {
            return Err(format!("scheduler config: expected a JSON object, got {}", kind_of(value)));
        };
        // diffusers drops the keys a saved config lists in `_use_default_values` (they were
        // written from defaults, not chosen), so the loading class's own defaults apply.
        let used_defaults: Vec<&str> = match map.get("_use_default_values") {
            Some(Value::Array(keys)) => keys.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        let raw: Map<String, Value> = map
            .iter()
            .filter(|(k, _)| k.as_str() != "_use_default_values" && !used_defaults.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Self::from_map(raw)
    }

    /// Reads and parses a `scheduler_config.json` file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::from_json(&value).map_err(|e| format!("{}: {e}", path.display()))
    }

    fn from_map(raw: Map<String, Value>) -> Result<Self, String> {
        let keys = Keys { raw: &raw, class: "scheduler config" };
        let num_train_timesteps = keys.usize("num_train_timesteps", 1000)?;
        if num_train_timesteps == 0 {
            return Err("scheduler config: num_train_timesteps must be at least 1".into());
        }
        let prediction_type = match keys.string("prediction_type", "epsilon")?.as_str() {
            "epsilon" => PredictionType::Epsilon,
            "v_prediction" => PredictionType::VPrediction,
            "sample" => PredictionType::Sample,
            other => {
                return Err(format!(
                    "scheduler config: prediction_type {other:?} is not supported; supported: \"epsilon\", \"v_prediction\", \"sample\""
                ))
            }
        };
        Ok(Self { raw, num_train_timesteps, prediction_type })
    }

    /// diffusers' `from_config(config, **overrides)`: `overrides` (a JSON object) replaces or
    /// adds keys, and wins over `_use_default_values`.
    pub fn with_overrides(&self, overrides: &Value) -> Result<Self, String> {
        let Value::Object(overrides) = overrides else {
            return Err(format!("scheduler overrides: expected a JSON object, got {}", kind_of(overrides)));
        };
        let mut raw = self.raw.clone();
        for (k, v) in overrides {
            raw.insert(k.clone(), v.clone());
        }
        Self::from_map(raw)
    }

    /// One key replaced (a convenience over [`Self::with_overrides`]).
    pub fn with(&self, key: &str, value: Value) -> Result<Self, String> {
        let mut raw = self.raw.clone();
        raw.insert(key.to_string(), value);
        Self::from_map(raw)
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.num_train_timesteps
    }

    pub fn prediction_type(&self) -> PredictionType {
        self.prediction_type
    }

    /// `_class_name` of the file (the checkpoint's default scheduler), if any.
    pub fn class_name(&self) -> Option<&str> {
        self.raw.get("_class_name").and_then(Value::as_str)
    }

    /// The JSON object the config was read from (after `_use_default_values` and overrides).
    pub fn raw(&self) -> &Map<String, Value> {
        &self.raw
    }

    /// The config as `DDIMScheduler` reads it.
    pub fn ddim(&self) -> Result<DdimConfig, String> {
        DdimConfig::read(self)
    }

    /// The config as `DPMSolverMultistepScheduler` reads it.
    pub fn dpm_solver(&self) -> Result<DpmSolverConfig, String> {
        DpmSolverConfig::read(self)
    }

    /// The config as one of the k-diffusion style classes (Euler, Euler ancestral, LMS, Heun) reads it.
    pub fn k_diffusion(&self, class: KClass) -> Result<KDiffusionConfig, String> {
        KDiffusionConfig::read(self, class)
    }

    /// The config as `UniPCMultistepScheduler` reads it.
    pub fn unipc(&self) -> Result<UniPcConfig, String> {
        UniPcConfig::read(self)
    }

    /// The config as `DPMSolverSinglestepScheduler` reads it.
    pub fn dpm_singlestep(&self) -> Result<DpmSinglestepConfig, String> {
        DpmSinglestepConfig::read(self)
    }

    /// The config as `DEISMultistepScheduler` reads it.
    pub fn deis(&self) -> Result<DeisConfig, String> {
        DeisConfig::read(self)
    }

    /// The config as `PNDMScheduler` reads it.
    pub fn pndm(&self) -> Result<PndmConfig, String> {
        PndmConfig::read(self)
    }

    /// The config as `DDPMScheduler` reads it.
    pub fn ddpm(&self) -> Result<DdpmConfig, String> {
        DdpmConfig::read(self)
    }
}

/// The keys shared by both classes, with the same defaults in both.
#[derive(Clone, Debug, PartialEq)]
pub struct BetaConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub rescale_betas_zero_snr: bool,
}

impl BetaConfig {
    fn read(keys: &Keys) -> Result<Self, String> {
        let num_train_timesteps = keys.usize("num_train_timesteps", 1000)?;
        let beta_start = keys.f64("beta_start", 0.0001)?;
        let beta_end = keys.f64("beta_end", 0.02)?;
        let beta_schedule = keys.choice(
            "beta_schedule",
            "linear",
            &[
                ("linear", BetaSchedule::Linear),
                ("scaled_linear", BetaSchedule::ScaledLinear),
                ("squaredcos_cap_v2", BetaSchedule::SquaredcosCapV2),
            ],
        )?;
        let trained_betas = keys.opt_f64_list("trained_betas")?;
        if let Some(betas) = &trained_betas {
            if betas.len() != num_train_timesteps {
                return Err(format!(
                    "{}: trained_betas has {} values but num_train_timesteps is {num_train_timesteps}",
                    keys.class,
                    betas.len()
                ));
            }
        }
        let rescale_betas_zero_snr = keys.bool("rescale_betas_zero_snr", false)?;
        Ok(Self { num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr })
    }

    /// The float32 `alphas_cumprod` of the class's `__init__`.
    pub fn alphas_cumprod(&self) -> Vec<f32> {
        let mut betas = super::numerics::betas(
            self.beta_schedule,
            self.beta_start,
            self.beta_end,
            self.num_train_timesteps,
            self.trained_betas.as_deref(),
        );
        if self.rescale_betas_zero_snr {
            betas = super::numerics::rescale_zero_terminal_snr(&betas);
        }
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        super::numerics::torch_cumprod_f32(&alphas)
    }
}

/// Dynamic thresholding settings (`thresholding: true`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Thresholding {
    pub dynamic_thresholding_ratio: f64,
    pub sample_max_value: f64,
}

/// Every `DDIMScheduler.__init__` key, diffusers' defaults for absent ones.
#[derive(Clone, Debug, PartialEq)]
pub struct DdimConfig {
    pub betas: BetaConfig,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub set_alpha_to_one: bool,
    pub steps_offset: i64,
    pub prediction_type: PredictionType,
    /// `Some` when `thresholding` is true.
    pub thresholding: Option<Thresholding>,
    pub timestep_spacing: TimestepSpacing,
}

impl DdimConfig {
    fn read(config: &SchedulerConfig) -> Result<Self, String> {
        let keys = Keys { raw: &config.raw, class: DDIM };
        Ok(Self {
            betas: BetaConfig::read(&keys)?,
            // Surprising but diffusers': DDIM clips x0 to [-1, 1] unless the config says not to.
            clip_sample: keys.bool("clip_sample", true)?,
            clip_sample_range: keys.f64("clip_sample_range", 1.0)?,
            set_alpha_to_one: keys.bool("set_alpha_to_one", true)?,
            steps_offset: keys.i64("steps_offset", 0)?,
            prediction_type: config.prediction_type,
            thresholding: keys.thresholding()?,
            timestep_spacing: keys.spacing(TimestepSpacing::Leading)?,
        })
    }
}

/// Every `DPMSolverMultistepScheduler.__init__` key this implementation honours, diffusers'
/// defaults for absent ones. Keys whose non-default values are not implemented
/// (`algorithm_type` other than dpmsolver++ / sde-dpmsolver++, `use_exponential_sigmas`, `use_beta_sigmas`,
/// `use_lu_lambdas`, `use_flow_sigmas`, learned `variance_type`, `solver_order` 3) are
/// rejected when read; `flow_shift`, `use_dynamic_shifting` and `time_shift_type` only act
/// on flow sigmas or a `mu` argument SD never passes, so they are accepted and have no effect.
#[derive(Clone, Debug, PartialEq)]
pub struct DpmSolverConfig {
    pub betas: BetaConfig,
    /// 1 or 2.
    pub solver_order: usize,
    /// `algorithm_type` "sde-dpmsolver++" (DPM-Solver++ 2M SDE: draws noise every step)
    /// instead of "dpmsolver++".
    pub sde: bool,
    pub prediction_type: PredictionType,
    pub thresholding: Option<Thresholding>,
    pub solver_type: SolverType,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    pub use_karras_sigmas: bool,
    pub final_sigmas_type: FinalSigmasType,
    /// -inf when absent.
    pub lambda_min_clipped: f64,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
}

impl DpmSolverConfig {
    fn read(config: &SchedulerConfig) -> Result<Self, String> {
        let keys = Keys { raw: &config.raw, class: DPM };
        let solver_order = keys.solver_order()?;
        // diffusers silently rewrites algorithm_type "deis" to "dpmsolver++".
        let algorithm_type = keys.string("algorithm_type", "dpmsolver++")?;
        if !matches!(algorithm_type.as_str(), "dpmsolver++" | "sde-dpmsolver++" | "deis") {
            return Err(format!(
                "{DPM}: algorithm_type {algorithm_type:?} is not supported; supported: \"dpmsolver++\", \"sde-dpmsolver++\" (\"deis\" is read as \"dpmsolver++\", as diffusers does)"
            ));
        }
        let sde = algorithm_type == "sde-dpmsolver++";
        // Likewise "logrho", "bh1" and "bh2" (UniPC / DEIS names) become "midpoint".
        let solver_type = keys.choice(
            "solver_type",
            "midpoint",
            &[
                ("midpoint", SolverType::Midpoint),
                ("heun", SolverType::Heun),
                ("logrho", SolverType::Midpoint),
                ("bh1", SolverType::Midpoint),
                ("bh2", SolverType::Midpoint),
            ],
        )?;
        keys.reject_sigma_schedules(&[
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "use_lu_lambdas",
            "use_flow_sigmas",
        ])?;
        // Only "learned"/"learned_range" change anything in diffusers (they slice the model
        // output to 3 channels, meant for pixel-space models); any other value is inert.
        if let Some(v) = keys.opt_string("variance_type")? {
            if v == "learned" || v == "learned_range" {
                return Err(format!(
                    "{DPM}: variance_type {v:?} is not supported; supported: null (a model with a fixed variance)"
                ));
            }
        }
        let lambda_min_clipped = match keys.raw.get("lambda_min_clipped") {
            None => f64::NEG_INFINITY,
            Some(_) => keys.f64("lambda_min_clipped", f64::NEG_INFINITY)?,
        };
        let final_sigmas_type = keys.choice(
            "final_sigmas_type",
            "zero",
            &[("zero", FinalSigmasType::Zero), ("sigma_min", FinalSigmasType::SigmaMin)],
        )?;
        // diffusers checks the *original* algorithm_type here, so "deis" only loads with sigma_min.
        if algorithm_type == "deis" && final_sigmas_type == FinalSigmasType::Zero {
            return Err(format!(
                "{DPM}: final_sigmas_type \"zero\" is not supported for algorithm_type \"deis\" (diffusers refuses it too); use \"sigma_min\""
            ));
        }
        Ok(Self {
            betas: BetaConfig::read(&keys)?,
            solver_order,
            sde,
            prediction_type: config.prediction_type,
            thresholding: keys.thresholding()?,
            solver_type,
            lower_order_final: keys.bool("lower_order_final", true)?,
            euler_at_final: keys.bool("euler_at_final", false)?,
            use_karras_sigmas: keys.bool("use_karras_sigmas", false)?,
            final_sigmas_type,
            lambda_min_clipped,
            timestep_spacing: keys.spacing(TimestepSpacing::Linspace)?,
            steps_offset: keys.i64("steps_offset", 0)?,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UniPcSolverType {
    /// B(h) = h.
    Bh1,
    /// B(h) = e^h - 1 (diffusers' default).
    Bh2,
}

impl UniPcSolverType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bh1 => "bh1",
            Self::Bh2 => "bh2",
        }
    }
}

/// Every `UniPCMultistepScheduler.__init__` key this implementation honours, diffusers'
/// defaults for absent ones (solver_order 2, bh2, "linspace", final sigma 0). Not implemented,
/// and rejected when read: `solver_order` 3+, `predict_x0` false, a `solver_p`,
/// exponential / beta / flow sigmas, Karras `sigma_min` / `sigma_max` overrides.
#[derive(Clone, Debug, PartialEq)]
pub struct UniPcConfig {
    pub betas: BetaConfig,
    /// 1 or 2.
    pub solver_order: usize,
    pub prediction_type: PredictionType,
    pub thresholding: Option<Thresholding>,
    pub solver_type: UniPcSolverType,
    pub lower_order_final: bool,
    /// Steps whose corrector is skipped (diffusers' `disable_corrector`: the corrector applied at
    /// step i is skipped when i - 1 is listed).
    pub disable_corrector: Vec<i64>,
    pub use_karras_sigmas: bool,
    pub final_sigmas_type: FinalSigmasType,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
}

impl UniPcConfig {
    fn read(config: &SchedulerConfig) -> Result<Self, String> {
        const NAME: &str = "UniPCMultistepScheduler";
        let keys = Keys { raw: &config.raw, class: NAME };
        let solver_order = keys.solver_order()?;
        if !keys.bool("predict_x0", true)? {
            return Err(format!(
                "{NAME}: predict_x0 false (the noise-prediction variant) is not supported; supported: true"
            ));
        }
        // diffusers rewrites the DPM-Solver / DEIS names to "bh2".
        let solver_type = keys.choice(
            "solver_type",
            "bh2",
            &[
                ("bh1", UniPcSolverType::Bh1),
                ("bh2", UniPcSolverType::Bh2),
                ("midpoint", UniPcSolverType::Bh2),
                ("heun", UniPcSolverType::Bh2),
                ("logrho", UniPcSolverType::Bh2),
            ],
        )?;
        if !matches!(keys.raw.get("solver_p"), None | Some(Value::Null)) {
            return Err(format!(
                "{NAME}: solver_p (an external predictor scheduler) is not supported; supported: null"
            ));
        }
        keys.reject_sigma_schedules(&["use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas"])?;
        let use_karras_sigmas = keys.bool("use_karras_sigmas", false)?;
        for key in ["sigma_min", "sigma_max"] {
            if keys.opt_f64(key)?.is_some() {
                return Err(format!(
                    "{NAME}: {key} is not supported; supported: null (the training schedule's own range)"
                ));
            }
        }
        let disable_corrector = match keys.raw.get("disable_corrector") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_i64().ok_or_else(|| keys.bad("disable_corrector", "a list of integers", v)))
                .collect::<Result<Vec<_>, _>>()?,
            Some(v) => return Err(keys.bad("disable_corrector", "a list of integers", v)),
        };
        let prediction_type = config.prediction_type;
        Ok(Self {
            betas: BetaConfig::read(&keys)?,
            solver_order,
            prediction_type,
            thresholding: keys.thresholding()?,
            solver_type,
            lower_order_final: keys.bool("lower_order_final", true)?,
            disable_corrector,
            use_karras_sigmas,
            final_sigmas_type: keys.choice(
                "final_sigmas_type",
                "zero",
                &[("zero", FinalSigmasType::Zero), ("sigma_min", FinalSigmasType::SigmaMin)],
            )?,
            timestep_spacing: keys.spacing(TimestepSpacing::Linspace)?,
            steps_offset: keys.i64("steps_offset", 0)?,
        })
    }
}

/// Every `DPMSolverSinglestepScheduler.__init__` key this implementation honours, diffusers'
/// defaults for absent ones (solver_order 2, midpoint, lower_order_final false). The class has no
/// `timestep_spacing` / `steps_offset` (always "linspace") nor `rescale_betas_zero_snr`; keys
/// it does not know are ignored. Rejected: `algorithm_type` other than dpmsolver++ ("deis" is
/// read as dpmsolver++ like diffusers), solver_order 3, exponential / beta / flow sigmas,
/// learned `variance_type`.
#[derive(Clone, Debug, PartialEq)]
pub struct DpmSinglestepConfig {
    pub betas: BetaConfig,
    /// 1 or 2.
    pub solver_order: usize,
    pub prediction_type: PredictionType,
    pub thresholding: Option<Thresholding>,
    pub solver_type: SolverType,
    /// As configured; diffusers forces it on for a zero final sigma or a step count not a
    /// multiple of the order (see `dpm_singlestep`).
    pub lower_order_final: bool,
    pub use_karras_sigmas: bool,
    pub final_sigmas_type: FinalSigmasType,
    pub lambda_min_clipped: f64,
}

impl DpmSinglestepConfig {
    fn read(config: &SchedulerConfig) -> Result<Self, String> {
        const NAME: &str = "DPMSolverSinglestepScheduler";
        let keys = Keys { raw: &config.raw, class: NAME };
        let solver_order = keys.solver_order()?;
        let algorithm_type = keys.string("algorithm_type", "dpmsolver++")?;
        if algorithm_type != "dpmsolver++" && algorithm_type != "deis" {
            return Err(format!(
                "{NAME}: algorithm_type {algorithm_type:?} is not supported; supported: \"dpmsolver++\" (\"deis\" is read as \"dpmsolver++\", as diffusers does)"
            ));
        }
        let solver_type = keys.choice(
            "solver_type",
            "midpoint",
            &[
                ("midpoint", SolverType::Midpoint),
                ("heun", SolverType::Heun),
                ("logrho", SolverType::Midpoint),
                ("bh1", SolverType::Midpoint),
                ("bh2", SolverType::Midpoint),
            ],
        )?;
        keys.reject_sigma_schedules(&["use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas"])?;
        if let Some(v) = keys.opt_string("variance_type")? {
            if v == "learned" || v == "learned_range" {
                return Err(format!("{NAME}: variance_type {v:?} is not supported; supported: null"));
            }
        }
        let lambda_min_clipped = match keys.raw.get("lambda_min_clipped") {
            None => f64::NEG_INFINITY,
            Some(_) => keys.f64("lambda_min_clipped", f64::NEG_INFINITY)?,
        };
        let final_sigmas_type = keys.choice(
            "final_sigmas_type",
            "zero",
            &[("zero", FinalSigmasType::Zero), ("sigma_min", FinalSigmasType::SigmaMin)],
        )?;
        let mut betas = BetaConfig::read(&keys)?;
        betas.rescale_betas_zero_snr = false;
        Ok(Self {
            betas,
            solver_order,
            prediction_type: config.prediction_type,
            thresholding: keys.thresholding()?,
            solver_type,
            lower_order_final: keys.bool("lower_order_final", false)?,
            use_karras_sigmas: keys.bool("use_karras_sigmas", false)?,
            final_sigmas_type,
            lambda_min_clipped,
        })
    }
}

/// Every `DEISMultistepScheduler.__init__` key this implementation honours, diffusers'
/// defaults for absent ones (solver_order 2, "linspace"; the last sigma is always the schedule's
/// smallest, never 0). `algorithm_type` "dpmsolver"/"dpmsolver++" and `solver_type`
/// "midpoint"/"heun"/"bh1"/"bh2" are read as "deis"/"logrho", as diffusers does; solver_order
/// 3 and exponential / beta / flow sigmas are rejected.
#[derive(Clone, Debug, PartialEq)]
pub struct DeisConfig {
    pub betas: BetaConfig,
    /// 1 or 2.
    pub solver_order: usize,
    pub prediction_type: PredictionType,
    pub thresholding: Option<Thresholding>,
    pub lower_order_final: bool,
    pub use_karras_sigmas: bool,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
}

impl DeisConfig {
    fn read(config: &SchedulerConfig) -> Result<Self, String> {
        const NAME: &str = "DEISMultistepScheduler";
        let keys = Keys { raw: &config.raw, class: NAME };
        let solver_order = keys.solver_order()?;
        keys.choice("algorithm_type", "deis", &[("deis", ()), ("dpmsolver", ()), ("dpmsolver++", ())])?;
        keys.choice(
            "solver_type",
            "logrho",
            &[("logrho", ()), ("midpoint", ()), ("heun", ()), ("bh1", ()), ("bh2", ())],
        )?;
        keys.reject_sigma_schedules(&["use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas"])?;
        let mut betas = BetaConfig::read(&keys)?;
        // DEIS has no rescale_betas_zero_snr.
        betas.rescale_betas_zero_snr = false;
        Ok(Self {
            betas,
            solver_order,
            prediction_type: config.prediction_type,
            thresholding: keys.thresholding()?,
            lower_order_final: keys.bool("lower_order_final", true)?,
            use_karras_sigmas: keys.bool("use_karras_sigmas", false)?,
            timestep_spacing: keys.spacing(TimestepSpacing::Linspace)?,
            steps_offset: keys.i64("steps_offset", 0)?,
        })
    }
}

/// The sigma-based ("k-diffusion") classes that share one schedule computation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KClass {
    Euler,
    EulerAncestral,
    Lms,
    Heun,
    KDpm2,
    KDpm2Ancestral,
}

impl KClass {
    pub fn class_name(self) -> &'static str {
        match self {
            Self::Euler => "EulerDiscreteScheduler",
            Self::EulerAncestral => "EulerAncestralDiscreteScheduler",
            Self::Lms => "LMSDiscreteScheduler",
            Self::Heun => "HeunDiscreteScheduler",
            Self::KDpm2 => "KDPM2DiscreteScheduler",
            Self::KDpm2Ancestral => "KDPM2AncestralDiscreteScheduler",
        }
    }
}

/// The `__init__` keys of `EulerDiscreteScheduler`, `EulerAncestralDiscreteScheduler`,
/// `LMSDiscreteScheduler` and `HeunDiscreteScheduler` this implementation honours, with each
/// class's defaults (all "linspace", steps_offset 0). Keys a class does not have are ignored
/// like diffusers does (e.g. `use_karras_sigmas` for Euler ancestral, which has no Karras option
/// in diffusers 0.42); non-default values that are not implemented are rejected.
#[derive(Clone, Debug, PartialEq)]
pub struct KDiffusionConfig {
    pub class: KClass,
    pub betas: BetaConfig,
    pub prediction_type: PredictionType,
    pub use_karras_sigmas: bool,
    /// Euler only: the Karras range's ends (default: the schedule's own sigmas).
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
    /// Euler only: the last sigma is sigma_min instead of 0 (`final_sigmas_type` "sigma_min").
    pub final_sigma_min: bool,
    /// Heun only: `clip_sample` (default false) with its range.
    pub clip_sample_range: Option<f64>,
}

impl KDiffusionConfig {
    fn read(config: &SchedulerConfig, class: KClass) -> Result<Self, String> {
        let name = class.class_name();
        let keys = Keys { raw: &config.raw, class: name };
        let mut betas = BetaConfig::read(&keys)?;
        // Heun's and KDPM2's beta defaults differ from the others' (0.00085 .. 0.012, still "linear").
        if matches!(class, KClass::Heun | KClass::KDpm2 | KClass::KDpm2Ancestral) {
            betas.beta_start = keys.f64("beta_start", 0.00085)?;
            betas.beta_end = keys.f64("beta_end", 0.012)?;
        }
        // Only Euler and Euler ancestral have rescale_betas_zero_snr.
        if !matches!(class, KClass::Euler | KClass::EulerAncestral) {
            betas.rescale_betas_zero_snr = false;
        }
        let prediction_type = config.prediction_type;
        if matches!(class, KClass::EulerAncestral | KClass::KDpm2 | KClass::KDpm2Ancestral)
            && prediction_type == PredictionType::Sample
        {
            return Err(format!("{name}: prediction_type \"sample\" is not supported (diffusers does not implement it either); supported: \"epsilon\", \"v_prediction\""));
        }
        let has_karras = class != KClass::EulerAncestral;
        if has_karras {
            keys.reject_sigma_schedules(&["use_exponential_sigmas", "use_beta_sigmas"])?;
        }
        let mut out = Self {
            class,
            betas,
            prediction_type,
            use_karras_sigmas: has_karras && keys.bool("use_karras_sigmas", false)?,
            sigma_min: None,
            sigma_max: None,
            timestep_spacing: keys.spacing(TimestepSpacing::Linspace)?,
            steps_offset: keys.i64("steps_offset", 0)?,
            final_sigma_min: false,
            clip_sample_range: None,
        };
        match class {
            KClass::Euler => {
                keys.choice("interpolation_type", "linear", &[("linear", ())])
                    .map_err(|e| format!("{e} (\"log_linear\" is not implemented here)"))?;
                let continuous =
                    keys.choice("timestep_type", "discrete", &[("discrete", false), ("continuous", true)])?;
                if continuous && prediction_type == PredictionType::VPrediction {
                    return Err(format!(
                        "{name}: timestep_type \"continuous\" with v_prediction (EDM timesteps) is not supported; supported: \"discrete\""
                    ));
                }
                out.sigma_min = keys.opt_f64("sigma_min")?;
                out.sigma_max = keys.opt_f64("sigma_max")?;
                out.final_sigma_min =
                    keys.choice("final_sigmas_type", "zero", &[("zero", false), ("sigma_min", true)])?;
            }
            KClass::Heun => {
                if keys.bool("clip_sample", false)? {
                    out.clip_sample_range = Some(keys.f64("clip_sample_range", 1.0)?);
                }
            }
            KClass::EulerAncestral | KClass::Lms | KClass::KDpm2 | KClass::KDpm2Ancestral => {}
        }
        Ok(out)
    }
}

/// The `PNDMScheduler.__init__` keys, diffusers' defaults for absent ones. Only the PLMS
/// variant (`skip_prk_steps` true, as every Stable Diffusion config sets) is implemented.
#[derive(Clone, Debug, PartialEq)]
pub struct PndmConfig {
    pub betas: BetaConfig,
    pub set_alpha_to_one: bool,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
}

impl PndmConfig {
    fn read(config: &SchedulerConfig) -> Result<Self, String> {
        let name = "PNDMScheduler";
        let keys = Keys { raw: &config.raw, class: name };
        let mut betas = BetaConfig::read(&keys)?;
        betas.rescale_betas_zero_snr = false;
        // The class default is false; Stable Diffusion configs all set it.
        if !keys.bool("skip_prk_steps", false)? {
            return Err(format!(
                "{name}: skip_prk_steps false (Runge-Kutta warm-up steps) is not supported; supported: true (PLMS, what Stable Diffusion configs set)"
            ));
        }
        if config.prediction_type == PredictionType::Sample {
            return Err(format!(
                "{name}: prediction_type \"sample\" is not supported (nor by diffusers); supported: \"epsilon\", \"v_prediction\""
            ));
        }
        Ok(Self {
            betas,
            set_alpha_to_one: keys.bool("set_alpha_to_one", false)?,
            prediction_type: config.prediction_type,
            timestep_spacing: keys.spacing(TimestepSpacing::Leading)?,
            steps_offset: keys.i64("steps_offset", 0)?,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VarianceType {
    FixedSmall,
    FixedSmallLog,
    FixedLarge,
}

/// The `DDPMScheduler.__init__` keys, diffusers' defaults for absent ones.
#[derive(Clone, Debug, PartialEq)]
pub struct DdpmConfig {
    pub betas: BetaConfig,
    pub variance_type: VarianceType,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub prediction_type: PredictionType,
    pub thresholding: Option<Thresholding>,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
}

impl DdpmConfig {
    fn read(config: &SchedulerConfig) -> Result<Self, String> {
        let keys = Keys { raw: &config.raw, class: "DDPMScheduler" };
        Ok(Self {
            betas: BetaConfig::read(&keys)?,
            variance_type: keys.choice(
                "variance_type",
                "fixed_small",
                &[
                    ("fixed_small", VarianceType::FixedSmall),
                    ("fixed_small_log", VarianceType::FixedSmallLog),
                    ("fixed_large", VarianceType::FixedLarge),
                ],
            )?,
            // Like DDIM, DDPM clips x0 to [-1, 1] unless the config says not to.
            clip_sample: keys.bool("clip_sample", true)?,
            clip_sample_range: keys.f64("clip_sample_range", 1.0)?,
            prediction_type: config.prediction_type,
            thresholding: keys.thresholding()?,
            timestep_spacing: keys.spacing(TimestepSpacing::Leading)?,
            steps_offset: keys.i64("steps_offset", 0)?,
        })
    }
}

/// Typed access to the keys of one class, with that class's defaults.
struct Keys<'a> {
    raw: &'a Map<String, Value>,
    class: &'a str,
}

impl Keys<'_> {
    /// `solver_order`: 1 or 2 (3 is not implemented); diffusers' default 2.
    fn solver_order(&self) -> Result<usize, String> {
        match self.usize("solver_order", 2)? {
            order @ 1..=2 => Ok(order),
            order => Err(format!("{}: solver_order {order} is not supported; supported: 1, 2", self.class)),
        }
    }

    /// Every one of `flags` (alternative sigma schedules) must be off.
    fn reject_sigma_schedules(&self, flags: &[&str]) -> Result<(), String> {
        for key in flags {
            if self.bool(key, false)? {
                return Err(format!(
                    "{}: {key} is not supported; supported sigma schedules: the default (from the timesteps) and use_karras_sigmas",
                    self.class
                ));
            }
        }
        Ok(())
    }

    fn bad(&self, key: &str, expected: &str, got: &Value) -> String {
        format!("{}: {key} must be {expected}, got {got}", self.class)
    }

    /// Booleans: diffusers only tests them for truth, so `null` reads as false.
    fn bool(&self, key: &str, default: bool) -> Result<bool, String> {
        match self.raw.get(key) {
            None => Ok(default),
            Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.bad(key, "true or false", v)),
        }
    }

    fn f64(&self, key: &str, default: f64) -> Result<f64, String> {
        match self.raw.get(key) {
            None => Ok(default),
            Some(Value::Number(n)) => n
                .as_f64()
                .filter(|v| v.is_finite())
                .ok_or_else(|| self.bad(key, "a finite number", &Value::Number(n.clone()))),
            Some(v) => Err(self.bad(key, "a number", v)),
        }
    }

    fn i64(&self, key: &str, default: i64) -> Result<i64, String> {
        match self.raw.get(key) {
            None => Ok(default),
            Some(Value::Number(n)) => {
                if let Some(i) = n.as_i64() {
                    return Ok(i);
                }
                match n.as_f64() {
                    Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => Ok(f as i64),
                    _ => Err(self.bad(key, "an integer", &Value::Number(n.clone()))),
                }
            }
            Some(v) => Err(self.bad(key, "an integer", v)),
        }
    }

    fn usize(&self, key: &str, default: usize) -> Result<usize, String> {
        let v = self.i64(key, default as i64)?;
        usize::try_from(v).map_err(|_| self.bad(key, "a non-negative integer", &Value::from(v)))
    }

    fn string(&self, key: &str, default: &str) -> Result<String, String> {
        match self.raw.get(key) {
            None => Ok(default.to_string()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(self.bad(key, "a string", v)),
        }
    }

    fn opt_string(&self, key: &str) -> Result<Option<String>, String> {
        match self.raw.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.bad(key, "a string or null", v)),
        }
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>, String> {
        match self.raw.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => self.f64(key, 0.0).map(Some),
        }
    }

    fn opt_f64_list(&self, key: &str) -> Result<Option<Vec<f64>>, String> {
        match self.raw.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_f64().filter(|f| f.is_finite()).ok_or_else(|| self.bad(key, "a list of finite numbers", v))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(v) => Err(self.bad(key, "a list of numbers or null", v)),
        }
    }

    /// A string key with a fixed set of values; the error lists them.
    fn choice<T: Copy>(&self, key: &str, default: &str, options: &[(&str, T)]) -> Result<T, String> {
        let value = self.string(key, default)?;
        options.iter().find(|(name, _)| *name == value).map(|(_, v)| *v).ok_or_else(|| {
            let names: Vec<String> = options.iter().map(|(n, _)| format!("{n:?}")).collect();
            format!("{}: {key} {value:?} is not supported; supported: {}", self.class, names.join(", "))
        })
    }

    fn spacing(&self, default: TimestepSpacing) -> Result<TimestepSpacing, String> {
        let default = match default {
            TimestepSpacing::Leading => "leading",
            TimestepSpacing::Trailing => "trailing",
            TimestepSpacing::Linspace => "linspace",
        };
        self.choice(
            "timestep_spacing",
            default,
            &[
                ("leading", TimestepSpacing::Leading),
                ("trailing", TimestepSpacing::Trailing),
                ("linspace", TimestepSpacing::Linspace),
            ],
        )
    }

    fn thresholding(&self) -> Result<Option<Thresholding>, String> {
        if !self.bool("thresholding", false)? {
            return Ok(None);
        }
        let ratio = self.f64("dynamic_thresholding_ratio", 0.995)?;
        if !(0.0..=1.0).contains(&ratio) {
            return Err(format!("{}: dynamic_thresholding_ratio must be in [0, 1], got {ratio}", self.class));
        }
        Ok(Some(Thresholding {
            dynamic_thresholding_ratio: ratio,
            sample_max_value: self.f64("sample_max_value", 1.0)?,
        }))
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
