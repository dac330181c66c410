//! One txt2img job, as diffusers' StableDiffusionPipeline runs it: encode prompt and negative
//! prompt, draw the initial latents, run the scheduler loop calling the denoiser each step,
//! decode. The components are traits, so the same code runs in one process or over gRPC.

use crate::image_job::{self, ImageInput, Task};
use crate::noise::NoiseSource;
use crate::scheduler::{self, ResolvedScheduler, SchedulerConfig, SchedulerRequest};
use candle_core::{DType, Tensor};
use sdmesh_core::{DenoiseInput, Denoiser, DepthEstimator, Error, Result, TextEncoder, Vae};
use sdmesh_proto::v1;
use std::sync::Arc;
use tracing::Instrument;

pub const DEFAULT_STEPS: u32 = 50;
pub const DEFAULT_GUIDANCE: f32 = 7.5;

/// Bounds on what one request may ask for.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest height or width in pixels.
    pub max_side: u32,
    pub max_images: u32,
    /// Largest latent side one UNet call of an upscale gets; larger latents are denoised in
    /// overlapping tiles of this size.
    pub upscale_tile_latents: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_side: 2048, max_images: 8, upscale_tile_latents: crate::upscale::DEFAULT_TILE_LATENTS }
    }
}

impl Limits {
    fn pixels(&self) -> usize {
        self.max_images as usize * self.max_side as usize * self.max_side as usize
    }

    /// Largest legitimate Generate request: init latents for the most pixels (up to 16 latent
    /// channels at scale factor 8), or an image and a mask of the largest side, stored at worst
    /// uncompressed (RGBA), with a depth map.
    pub fn max_request_bytes(&self) -> usize {
        let side = self.max_side as usize * self.max_side as usize;
        let init_latents = sdmesh_core::f32_bytes(16 * self.pixels() / 64);
        let image_job = 2 * 4 * side + sdmesh_core::f32_bytes(side);
        sdmesh_core::message_limit(init_latents.max(image_job))
    }

    /// Largest legitimate Generate response: PNGs of the most pixels (RGB, stored at worst
    /// uncompressed) and, when asked, the same images as f32.
    pub fn max_response_bytes(&self) -> usize {
        sdmesh_core::message_limit(3 * self.pixels() + sdmesh_core::f32_bytes(3 * self.pixels()))
    }
}

/// What the model services report about themselves, fetched once.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub unet: v1::UnetInfo,
    pub vae: v1::VaeInfo,
    pub text: v1::TextEncoderInfo,
}

/// How many times a job runs again from its start when its model is no longer served.
pub const MODEL_RESTARTS: usize = 2;

/// Whether the unet service, which reports `now`, still serves the kind of model this
/// pipeline was set up for (`started`, its own scheduler `config`): the same input channels,
/// sample size, text width and class labels, and the prediction type of its config where it
/// reports one. Otherwise FAILED_PRECONDITION: with another prediction type every image would
/// be wrong, and nothing else would fail.
pub fn check_unet_fits(started: &v1::UnetInfo, now: &v1::UnetInfo, config: &SchedulerConfig) -> Result<()> {
    let mut differs = Vec::new();
    let prediction = config.prediction_type().as_str();
    if !now.prediction_type.is_empty() && now.prediction_type != prediction {
        differs.push(format!(
            "prediction_type {:?}, while this orchestrator's config says {prediction:?}",
            now.prediction_type
        ));
    }
    for (name, now, then) in [
        ("in_channels", now.in_channels, started.in_channels),
        ("sample_size", now.sample_size, started.sample_size),
        ("cross_attention_dim", now.cross_attention_dim, started.cross_attention_dim),
        ("num_class_embeds", now.num_class_embeds, started.num_class_embeds),
    ] {
        if now != then {
            differs.push(format!("{name} {now}, was {then}"));
        }
    }
    if differs.is_empty() {
        return Ok(());
    }
    Err(Error::FailedPrecondition(format!(
        "the unet service serves another kind of model than this orchestrator's --model folder describes ({}): \
         roll the orchestrator out with that model's folder",
        differs.join("; ")
    )))
}

/// A validated job, every default resolved.
#[derive(Debug, Clone)]
pub struct Job {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub guidance_scale: f32,
    pub guidance_rescale: f32,
    pub seed: u64,
    pub height: usize,
    pub width: usize,
    pub num_images: usize,
    pub scheduler: ResolvedScheduler,
    /// f32 [num_images, latent_channels, height/f, width/f]; drawn from the seed when None.
    pub init_latents: Option<Tensor>,
    pub task: Task,
    /// The input image (mask, depth map) of img2img, inpainting, depth2img and upscaling.
    pub input: Option<ImageInput>,
    /// Upscale the results x4 afterwards with the chained upscaler.
    pub then_upscale: Option<ChainedUpscale>,
    pub safety: crate::safety::Policy,
    /// A preview in every `preview_every`-th step's progress (0: none).
    pub preview_every: usize,
    pub preview_kind: crate::preview::PreviewKind,
}

/// The second stage of a job that ends with an x4 upscale.
#[derive(Debug, Clone)]
pub struct ChainedUpscale {
    pub steps: u32,
    pub guidance_scale: f32,
    pub noise_level: u32,
}

impl Job {
    pub fn uses_guidance(&self) -> bool {
        self.guidance_scale > 1.0
    }
}

/// Reported after every denoising step.
#[derive(Debug, Clone)]
pub struct StepProgress {
    pub step: usize,
    pub total: usize,
    pub timestep: f64,
    /// The latents after this step (a cheap, shared handle).
    pub latents: Tensor,
    /// Times the job started over from step 1 (see [`Pipeline::run`]).
    pub restarts: usize,
    /// The first image as the model now predicts it, f32 [h, w, 3] in [0, 1] (at the latents'
    /// size, or decoded at the image's), when the job asked for a preview at this step
    /// ([`crate::preview`]).
    pub preview: Option<Tensor>,
}

pub struct JobOutput {
    /// f32 [num_images, height, width, 3] in [0, 1].
    pub images: Tensor,
    pub warnings: Vec<String>,
    /// What the safety checker found.
    pub safety: crate::safety::Outcome,
}

/// A decoded preview on its way (see [`Pipeline::decoded_preview`]).
type PreviewDecode<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Option<Tensor>> + Send + 'a>>;

fn cancelled() -> Error {
    Error::Remote(tonic::Status::cancelled("the client went away"))
}

/// Runs `call`, and the preview `held` (if any) at the same time; then sends the held step's
/// progress, its preview in it. `call`'s error comes first: the job ends without that progress.
async fn with_held_preview<T>(
    call: impl std::future::Future<Output = Result<T>>,
    held: &mut Option<(StepProgress, PreviewDecode<'_>)>,
    progress: &mut (dyn FnMut(StepProgress) -> bool + Send),
) -> Result<T> {
    let Some((mut step, preview)) = held.take() else { return call.await };
    let (out, preview) = tokio::join!(call, preview);
    let out = out?;
    step.preview = preview;
    if !progress(step) {
        return Err(cancelled());
    }
    Ok(out)
}

#[derive(Clone)]
pub struct Pipeline {
    pub text_encoder: Arc<dyn TextEncoder>,
    pub denoiser: Arc<dyn Denoiser>,
    pub vae: Arc<dyn Vae>,
    /// depth2img's depth estimator, when there is one.
    pub depth: Option<Arc<dyn DepthEstimator>>,
    /// Set when this pipeline's checkpoint is an x4 upscaler.
    pub upscaler: Option<crate::upscale::Upscaler>,
    /// The upscaler jobs can chain after themselves (GenerateRequest.upscale).
    pub chained_upscaler: Option<Arc<Pipeline>>,
    /// Checks finished images, when configured.
    pub safety: Option<Arc<dyn sdmesh_core::SafetyChecker>>,
    pub safety_settings: crate::safety::SafetySettings,
    pub scheduler_config: SchedulerConfig,
    pub info: ModelInfo,
    pub limits: Limits,
    /// Name written into the PNG parameters (the model folder's name).
    pub model_name: String,
}

impl Pipeline {
    /// Asks each component for its info.
    pub async fn model_info(text: &dyn TextEncoder, unet: &dyn Denoiser, vae: &dyn Vae) -> Result<ModelInfo> {
        Ok(ModelInfo { text: text.info().await?, unet: unet.info().await?, vae: vae.info().await? })
    }

    fn latent_shape(&self, job: &Job) -> [usize; 4] {
        let f = self.info.vae.scale_factor as usize;
        [job.num_images, self.info.vae.latent_channels as usize, job.height / f, job.width / f]
    }

    /// Checks a request and resolves its defaults. Every error is INVALID_ARGUMENT and says
    /// what is allowed.
    pub fn validate(&self, r: &v1::GenerateRequest) -> Result<Job> {
        let limits = &self.limits;
        let f = self.info.vae.scale_factor;
        let default_side = self.info.unet.sample_size * f;
        let side = |name: &str, v: Option<u32>| -> Result<usize> {
            let v = v.unwrap_or(default_side);
            if v == 0 || !v.is_multiple_of(f) || v > limits.max_side {
                return Err(Error::invalid(format!(
                    "{name}: {v} is not allowed; use a multiple of {f} from {f} to {} (unset = the model's native {default_side})",
                    limits.max_side
                )));
            }
            Ok(v as usize)
        };
        let in_channels = self.info.unet.in_channels;
        let task = Task::of(r, in_channels)?;
        image_job::check_model_can(task, in_channels, self.depth.is_some(), r.depth_map.is_some())?;
        let (input, height, width) = if task == Task::Txt2Img {
            if !r.image.is_empty() || !r.mask.is_empty() || r.depth_map.is_some() || r.strength.is_some() {
                return Err(Error::invalid(
                    "image, mask, depth_map and strength are for img2img, inpainting and depth2img, not txt2img",
                ));
            }
            (None, side("height", r.height)?, side("width", r.width)?)
        } else {
            let (input, h, w) = image_job::prepare_input(task, r, (r.height, r.width), f, limits.max_side)?;
            if let (Task::Upscale, Some(upscaler)) = (task, &self.upscaler) {
                upscaler.check_noise_level(input.noise_level)?;
            }
            (Some(input), h, w)
        };
        if task == Task::Txt2Img && r.noise_level.is_some() {
            return Err(Error::invalid("noise_level: only upscaling takes a noise level, not txt2img"));
        }
        let then_upscale = match (&r.upscale, &self.chained_upscaler) {
            (None, _) => None,
            (Some(_), None) => return Err(Error::failed_precondition(
                "upscale: this orchestrator has no upscaler to chain (start it with --upscaler-model and its services)",
            )),
            (Some(_), Some(_)) if task == Task::Upscale => {
                return Err(Error::invalid("upscale: an upscale job cannot chain another upscale"))
            }
            (Some(u), Some(chained)) => Some(chained.validate_chained(u, height, width)?),
        };
        let max_steps = self.scheduler_config.num_train_timesteps() as u32;
        let (default_steps, default_guidance) = match self.upscaler {
            Some(_) => (crate::upscale::DEFAULT_STEPS, crate::upscale::DEFAULT_GUIDANCE),
            None => (DEFAULT_STEPS, DEFAULT_GUIDANCE),
        };
        let steps = r.steps.unwrap_or(default_steps);
        if steps == 0 || steps > max_steps {
            return Err(Error::invalid(format!(
                "steps: {steps} is not allowed; use 1 to {max_steps} (unset = {default_steps})"
            )));
        }
        let guidance_scale = r.guidance_scale.unwrap_or(default_guidance);
        if !guidance_scale.is_finite() || guidance_scale < 0.0 {
            return Err(Error::invalid(format!(
                "guidance_scale: {guidance_scale} is not allowed; use a finite value >= 0"
            )));
        }
        if !(0.0..=1.0).contains(&r.guidance_rescale) {
            return Err(Error::invalid(format!("guidance_rescale: {} is not allowed; use 0 to 1", r.guidance_rescale)));
        }
        let num_images = r.num_images.unwrap_or(1);
        if num_images == 0 || num_images > limits.max_images {
            return Err(Error::invalid(format!(
                "num_images: {num_images} is not allowed; use 1 to {}",
                limits.max_images
            )));
        }
        let options = r.scheduler.clone().unwrap_or_default();
        let scheduler = scheduler::resolve(&SchedulerRequest {
            name: options.name,
            eta: options.eta,
            use_karras_sigmas: options.use_karras_sigmas,
        })
        .map_err(|e| Error::invalid(format!("scheduler: {e}")))?;
        // Building it checks the step count against the config (e.g. spacing limits).
        let built = scheduler::build(&self.scheduler_config, &scheduler, steps as usize)
            .map_err(|e| Error::invalid(format!("scheduler: {e}")))?;
        if let Some(input) = input.as_ref().filter(|_| task != Task::Upscale) {
            if image_job::begin_index(steps as usize, input.strength_f64(), built.order()).is_none() {
                return Err(Error::invalid(format!(
                    "strength: {} of {steps} steps runs no step (int(steps * strength) = 0); raise strength or steps",
                    input.strength
                )));
            }
        }
        let mut job = Job {
            prompt: r.prompt.clone(),
            negative_prompt: r.negative_prompt.clone(),
            steps: steps as usize,
            guidance_scale,
            guidance_rescale: r.guidance_rescale,
            seed: r.seed.unwrap_or_else(rand::random),
            height,
            width,
            num_images: num_images as usize,
            scheduler,
            init_latents: None,
            task,
            input,
            then_upscale,
            safety: crate::safety::resolve(r.safety, &self.safety_settings, self.safety.is_some())?,
            preview_every: r.preview_every as usize,
            preview_kind: crate::preview::PreviewKind::from_request(r.preview_kind, r.preview_every)?,
        };
        if r.preview_every > 0 && task == Task::Upscale {
            return Err(Error::invalid(
                "preview_every: previews are for txt2img, img2img, inpainting and depth2img, not upscaling",
            ));
        }
        if let Some(t) = &r.init_latents {
            if task != Task::Txt2Img {
                return Err(Error::invalid("init_latents: only txt2img takes initial latents"));
            }
            let latents = t.to_candle("init_latents", &candle_core::Device::Cpu)?.to_dtype(DType::F32)?;
            let expected = self.latent_shape(&job);
            if latents.dims() != expected {
                return Err(Error::invalid(format!(
                    "init_latents: shape {:?}, expected {expected:?} ([num_images, channels, height/{f}, width/{f}])",
                    latents.dims()
                )));
            }
            job.init_latents = Some(latents);
        }
        Ok(job)
    }

    /// This (upscaler) pipeline's checks of a chained upscale of `height` x `width` images.
    fn validate_chained(&self, u: &v1::ChainedUpscale, height: usize, width: usize) -> Result<ChainedUpscale> {
        let upscaler = self.upscaler.as_ref().ok_or_else(|| Error::internal("the chained pipeline is no upscaler"))?;
        let f = self.info.vae.scale_factor as usize;
        if height * f > self.limits.max_side as usize || width * f > self.limits.max_side as usize {
            return Err(Error::invalid(format!(
                "upscale: {width}x{height} images upscale to {}x{}, above the largest side {} (--max-side)",
                width * f,
                height * f,
                self.limits.max_side
            )));
        }
        let noise_level = u.noise_level.unwrap_or(crate::upscale::DEFAULT_NOISE_LEVEL);
        upscaler.check_noise_level(noise_level)?;
        let steps = u.steps.unwrap_or(crate::upscale::DEFAULT_STEPS);
        let max_steps = self.scheduler_config.num_train_timesteps() as u32;
        if steps == 0 || steps > max_steps {
            return Err(Error::invalid(format!("upscale.steps: {steps} is not allowed; use 1 to {max_steps}")));
        }
        let guidance_scale = u.guidance_scale.unwrap_or(crate::upscale::DEFAULT_GUIDANCE);
        if !guidance_scale.is_finite() || guidance_scale < 0.0 {
            return Err(Error::invalid(format!("upscale.guidance_scale: {guidance_scale} is not allowed")));
        }
        Ok(ChainedUpscale { steps, guidance_scale, noise_level })
    }

    /// Runs a validated job. `progress` is called after every step; returning false cancels.
    /// A job that chains an upscale runs it on each image in turn, drawing on from the same
    /// noise (as diffusers' pipelines called one after the other with one generator).
    /// Each service serves the whole job with one model, even in a pool in the middle of a
    /// rollout ([`sdmesh_core::replicas::one_job`]). A job whose model a pool no longer serves
    /// (the rollout finished under it) runs again from its start, on the model the pool serves
    /// now, at most [`MODEL_RESTARTS`] times, when `noise` can start over: the result is the
    /// one a job sent now would give, and the caller's progress goes back to step 1.
    pub async fn run(
        &self,
        job: &Job,
        noise: &mut dyn NoiseSource,
        progress: &mut (dyn FnMut(StepProgress) -> bool + Send),
    ) -> Result<JobOutput> {
        let mut restarts = 0;
        loop {
            let mut counted = |p: StepProgress| progress(StepProgress { restarts, ..p });
            let (out, went) = sdmesh_core::replicas::one_job(self.run_on_one_model(job, noise, &mut counted)).await;
            match out {
                Err(e)
                    if e.code() == tonic::Code::Unavailable
                        && went.refused_for_model
                        && restarts < MODEL_RESTARTS
                        && noise.start_over() =>
                {
                    restarts += 1;
                    metrics::counter!("sdmesh_jobs_restarted_total").increment(1);
                    tracing::warn!(
                        "the model this job began on is no longer served ({e}): running it again from the start"
                    );
                }
                other => return other,
            }
        }
    }

    async fn run_on_one_model(
        &self,
        job: &Job,
        noise: &mut dyn NoiseSource,
        progress: &mut (dyn FnMut(StepProgress) -> bool + Send),
    ) -> Result<JobOutput> {
        let first = self.run_stage(job, noise, progress).await?;
        let (images, mut warnings) = match (&job.then_upscale, &self.chained_upscaler) {
            (Some(chain), Some(upscaler)) => {
                let mut warnings = first.warnings;
                let mut upscaled = Vec::with_capacity(job.num_images);
                for k in 0..job.num_images {
                    let image = first.images.narrow(0, k, 1)?;
                    let second = upscaler.chained_job(job, chain, &image)?;
                    let out = upscaler.run_stage(&second, noise, progress).await?;
                    warnings.extend(out.warnings);
                    upscaled.push(out.images);
                }
                (Tensor::cat(&upscaled, 0)?, warnings)
            }
            _ => (first.images, first.warnings),
        };
        let (images, safety) = crate::safety::apply(
            self.safety.as_deref(),
            job.safety,
            self.safety_settings.on_unavailable,
            images,
            &mut warnings,
        )
        .instrument(tracing::info_span!("safety_check", policy = ?job.safety))
        .await?;
        Ok(JobOutput { images, warnings, safety })
    }

    /// The upscale of one first-stage image: as a user would hand it on, 8-bit (diffusers'
    /// PIL output), to [-1, 1].
    fn chained_job(&self, first: &Job, chain: &ChainedUpscale, image_nhwc: &Tensor) -> Result<Job> {
        let f = self.info.vae.scale_factor as usize;
        let rgb8 = sdmesh_core::images::nhwc_to_rgb8(&image_nhwc.clamp(0f32, 1f32)?)?;
        let image = sdmesh_core::images::to_tensor_nchw(&rgb8[0]).affine(2.0, -1.0)?;
        let (_, _, h, w) = image.dims4()?;
        Ok(Job {
            steps: chain.steps as usize,
            guidance_scale: chain.guidance_scale,
            guidance_rescale: 0.0,
            height: h * f,
            width: w * f,
            num_images: 1,
            scheduler: crate::scheduler::resolve(&Default::default()).map_err(Error::internal)?,
            init_latents: None,
            task: Task::Upscale,
            input: Some(ImageInput {
                image,
                encoded: Default::default(),
                mask: None,
                depth_map: None,
                strength: 1.0,
                noise_level: chain.noise_level,
            }),
            then_upscale: None,
            safety: crate::safety::Policy::Off,
            preview_every: 0,
            ..first.clone()
        })
    }

    async fn run_stage(
        &self,
        job: &Job,
        noise: &mut dyn NoiseSource,
        progress: &mut (dyn FnMut(StepProgress) -> bool + Send),
    ) -> Result<JobOutput> {
        // The unet pool may have been rolled over to another kind of model since start-up (the
        // first call of the job also pins it to the model it then runs on).
        check_unet_fits(&self.info.unet, &self.denoiser.info().await?, &self.scheduler_config)?;
        let mut warnings = Vec::new();
        // Prompt embeddings: [negative; prompt] in one call when guidance is on.
        let texts = if job.uses_guidance() {
            vec![job.negative_prompt.clone(), job.prompt.clone()]
        } else {
            vec![job.prompt.clone()]
        };
        let encode_span = tracing::info_span!(
            "encode_prompts",
            texts = texts.len(),
            cache_hits = tracing::field::Empty,
            cache_misses = tracing::field::Empty
        );
        let encoded = self.text_encoder.encode(texts).instrument(encode_span).await?;
        for (which, dropped) in ["negative prompt", "prompt"].iter().rev().zip(encoded.truncated_tokens.iter().rev()) {
            if *dropped > 0 {
                let msg = format!(
                    "{which} truncated: {dropped} tokens beyond the {}-token context were dropped",
                    self.info.text.context_length
                );
                tracing::warn!("{msg}");
                warnings.push(msg);
            }
        }
        let (cond, uncond) = if job.uses_guidance() {
            (encoded.embeddings.narrow(0, 1, 1)?, Some(encoded.embeddings.narrow(0, 0, 1)?))
        } else {
            (encoded.embeddings, None)
        };

        let mut scheduler =
            scheduler::build(&self.scheduler_config, &job.scheduler, job.steps).map_err(Error::invalid)?;
        let (mut latents, begin, extra_channels, blend) = match &job.input {
            None => {
                let latents = match &job.init_latents {
                    Some(t) => t.clone(),
                    None => noise.randn(&self.latent_shape(job))?,
                };
                ((latents * scheduler.init_noise_sigma())?, 0, None, None)
            }
            Some(input) if job.task == Task::Upscale => {
                let upscaler =
                    self.upscaler.as_ref().ok_or_else(|| Error::internal("no upscaler for an upscale job"))?;
                let [num_images, latent_channels, _, _] = self.latent_shape(job);
                let prepared = image_job::prepare_upscale(
                    input,
                    upscaler,
                    num_images,
                    latent_channels,
                    scheduler.as_ref(),
                    noise,
                )?;
                (prepared.latents, 0, prepared.extra_channels, prepared.blend)
            }
            Some(input) => {
                let begin = image_job::begin_index(job.steps, input.strength_f64(), scheduler.order())
                    .ok_or_else(|| Error::invalid("strength: runs no step"))?;
                let [num_images, latent_channels, h, w] = self.latent_shape(job);
                let shape = image_job::Shape {
                    num_images,
                    latent_channels,
                    h,
                    w,
                    unet_in_channels: self.info.unet.in_channels,
                };
                let prepared = image_job::prepare(
                    job.task,
                    input,
                    &shape,
                    scheduler.as_mut(),
                    begin,
                    self.vae.as_ref(),
                    self.depth.as_deref(),
                    noise,
                )
                .instrument(tracing::info_span!("prepare_image", task = job.task.name()))
                .await?;
                (prepared.latents, begin, prepared.extra_channels, prepared.blend)
            }
        };
        let timesteps = scheduler.timesteps().to_vec();
        let total = timesteps.len() - begin;
        // Upscales larger than a tile denoise window by window, planned once for the job.
        let tiling = match job.task {
            Task::Upscale => {
                let (_, _, h, w) = latents.dims4()?;
                crate::upscale::Tiling::plan(h, w, self.limits.upscale_tile_latents, extra_channels.as_ref())?
            }
            _ => None,
        };
        // A decoded preview is made while the job's next call (the next step, or the final
        // decode) runs: both are calls to other services, and the unet need not wait for the
        // vae. Its step's progress is held until it is ready, so progress stays in order, at
        // most one step late.
        let mut held: Option<(StepProgress, PreviewDecode<'_>)> = None;
        for (i, &t) in timesteps.iter().enumerate().skip(begin) {
            let span = tracing::info_span!("step", step = i, timestep = t, batch = job.num_images);
            let model_input = span.in_scope(|| scheduler.scale_model_input(&latents, i))?;
            let step_input = DenoiseInput {
                latents: model_input,
                // The same tensor every step: it crosses the wire once, then by digest.
                extra: extra_channels.clone(),
                timestep: t,
                cond: cond.clone(),
                uncond: uncond.clone(),
                guidance_scale: job.guidance_scale,
                guidance_rescale: job.guidance_rescale,
                class_label: job.input.as_ref().filter(|_| job.task == Task::Upscale).map(|i| i.noise_level),
            };
            let denoise = async {
                match &tiling {
                    Some(tiling) => tiling.denoise(self.denoiser.as_ref(), step_input).instrument(span.clone()).await,
                    None => self.denoiser.denoise(step_input).instrument(span.clone()).await,
                }
            };
            let model_output = with_held_preview(denoise, &mut held, progress).await?;
            let step = i + 1 - begin;
            let mut decode_preview = None;
            let preview = match job.preview_every {
                every if every > 0 && step % every == 0 => {
                    let (scales, prediction) = (scheduler.noise_scales(i), self.scheduler_config.prediction_type());
                    let x0 = span.in_scope(|| crate::preview::first_x0(&latents, &model_output, scales, prediction))?;
                    match (x0, job.preview_kind) {
                        (Some(x0), crate::preview::PreviewKind::Decoded) => {
                            decode_preview =
                                Some(Box::pin(self.decoded_preview(job, x0).instrument(span.clone())) as _);
                            None
                        }
                        (Some(x0), crate::preview::PreviewKind::Latent) => crate::preview::latent_rgb(&x0)?,
                        (None, _) => None,
                    }
                }
                _ => None,
            };
            latents = span.in_scope(|| scheduler.step(&model_output, i, &latents, noise))?;
            if let Some(blend) = &blend {
                latents = blend.apply(scheduler.as_ref(), &latents, i, timesteps.len())?;
            }
            metrics::counter!("sdmesh_steps_total").increment(1);
            let step = StepProgress { step, total, timestep: t, latents: latents.clone(), restarts: 0, preview };
            match decode_preview {
                Some(decode) => held = Some((step, decode)),
                None if !progress(step) => return Err(cancelled()),
                None => {}
            }
        }
        let decode = self.vae.decode(latents).instrument(tracing::info_span!("decode", batch = job.num_images));
        let images = with_held_preview(decode, &mut held, progress).await?;
        Ok(JobOutput { images, warnings, safety: Default::default() })
    }

    /// The first image's predicted latents `x0` decoded, f32 [h, w, 3]; None, logged, where it
    /// could not be made or must not be shown: the safety checker flagged it under the replace
    /// policy, or could not check it. A preview never fails its job.
    async fn decoded_preview(&self, job: &Job, x0: Tensor) -> Option<Tensor> {
        let left_out = |why: String| {
            tracing::warn!("preview left out: {why}");
            metrics::counter!("sdmesh_previews_left_out_total").increment(1);
            None
        };
        let image = match self.vae.decode(x0).instrument(tracing::info_span!("preview_decode")).await {
            Ok(image) => image,
            Err(e) => return left_out(format!("the VAE could not decode it: {e}")),
        };
        if job.safety != crate::safety::Policy::Off {
            let Some(checker) = self.safety.as_deref() else { return left_out("no safety checker".into()) };
            match checker.check(image.clone()).await {
                Ok(verdicts) if job.safety == crate::safety::Policy::Replace && verdicts.iter().any(|v| v.flagged) => {
                    return left_out("the safety checker flagged it".into())
                }
                Ok(_) => {}
                Err(e) => return left_out(format!("the safety checker could not check it: {e}")),
            }
        }
        image.get(0).ok()
    }

    /// The generation parameters, A1111-style, as written into each PNG.
    pub fn parameters(&self, job: &Job) -> String {
        let mut s = job.prompt.clone();
        if !job.negative_prompt.is_empty() {
            s.push_str(&format!("\nNegative prompt: {}", job.negative_prompt));
        }
        s.push_str(&format!(
            "\nSteps: {}, Sampler: {}, CFG scale: {}, Guidance rescale: {}, Seed: {}, Size: {}x{}, Model: {}",
            job.steps,
            job.scheduler.canonical_name(),
            job.guidance_scale,
            job.guidance_rescale,
            job.seed,
            job.width,
            job.height,
            self.model_name
        ));
        if job.scheduler.eta > 0.0 {
            s.push_str(&format!(", Eta: {}", job.scheduler.eta));
        }
        if job.init_latents.is_some() {
            s.push_str(", Initial latents: given");
        }
        if let Some(u) = &job.then_upscale {
            s.push_str(&format!(
                ", Upscaled x4: {} steps, CFG scale {}, noise level {}",
                u.steps, u.guidance_scale, u.noise_level
            ));
        }
        if let (Some(input), Task::Upscale) = (&job.input, job.task) {
            s.push_str(&format!(", Task: upscale, Noise level: {}", input.noise_level));
        } else if let Some(input) = &job.input {
            s.push_str(&format!(", Task: {}, Denoising strength: {}", job.task.name(), input.strength));
            if input.depth_map.is_some() {
                s.push_str(", Depth map: given");
            }
        }
        s
    }
}
