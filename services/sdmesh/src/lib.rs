//! The `sdmesh` and `sdctl` binaries' library: the in-process mesh ([`mesh`]), and what
//! `sdctl generate` (through the mesh) and `sdmesh generate` (in one process) share: the job's
//! flags, the request they make, and writing the results.

pub mod mesh;

use anyhow::Context;
use sdmesh_proto::v1;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use tokio_stream::{Stream, StreamExt};

#[derive(clap::Args, Debug)]
pub struct JobArgs {
    /// What to draw.
    #[arg(long)]
    pub prompt: String,
    /// What to steer away from (the unconditional prompt of guidance).
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Denoising steps (default 50).
    #[arg(long)]
    pub steps: Option<u32>,
    /// Classifier-free guidance scale (default 7.5; <= 1 turns guidance off).
    #[arg(long)]
    pub guidance: Option<f32>,
    /// Guidance rescale, 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    pub guidance_rescale: f32,
    /// ddim (default), dpm++2m, dpm++2m-karras, dpm++2m-sde, dpm++2s, unipc (unipc-bh1, unipc-bh2),
    /// deis, euler, euler-karras, euler_a, lms, heun, pndm, ddpm, kdpm2, kdpm2_a (Karras variants
    /// with -karras), or a diffusers class name.
    #[arg(long, default_value = "")]
    pub scheduler: String,
    /// DDIM eta.
    #[arg(long)]
    pub eta: Option<f32>,
    /// Random when not given; printed, and written into the PNG.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Pixels, a multiple of 8 (default: the model's native size).
    #[arg(long)]
    pub height: Option<u32>,
    /// Pixels, a multiple of 8 (default: the model's native size).
    #[arg(long)]
    pub width: Option<u32>,
    /// Images from one prompt (one batch, consecutive noise from the seed).
    #[arg(long, default_value_t = 1)]
    pub num_images: u32,
    /// Tenant the job runs for (sent as x-sdmesh-tenant metadata, recorded on its trace).
    #[arg(long, env = "SDMESH_TENANT")]
    pub tenant: Option<String>,
    /// API key, for an orchestrator started with --api-keys-file (sent as `authorization:
    /// Bearer KEY`).
    #[arg(long, env = "SDMESH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// How soon the job runs next to others waiting for a place: high, normal (the default) or
    /// low (sent as x-sdmesh-priority metadata).
    #[arg(long, value_parser = ["high", "normal", "low"])]
    pub priority: Option<String>,
    /// Which of the orchestrator's models runs the job (`sdctl models` lists them; default: its
    /// default model).
    #[arg(long)]
    pub model_name: Option<String>,
    /// Initial noise as float32 NCHW .npy (diffusers' `latents=`), instead of the seed's.
    #[arg(long)]
    pub init_latents: Option<PathBuf>,
    /// img2img / inpaint / depth2img: the starting image (PNG or JPEG). Its size, rounded down
    /// to a multiple of 8, is the output's unless --height/--width resize it.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// inpaint: the mask (PNG or JPEG, the image's size; white = repaint, black = keep).
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// How far from the image to go, 0 < S <= 1 (default 0.8; inpaint 1.0).
    #[arg(long)]
    pub strength: Option<f32>,
    /// depth2img: a depth map as float32 [H, W] or [N, H, W] .npy (larger = nearer) instead of
    /// the depth service's estimate.
    #[arg(long)]
    pub depth_map: Option<PathBuf>,
    /// upscale: the noise added to the low-resolution image, 0 to 350 (default 20). With
    /// --then-upscale: the chained upscale's.
    #[arg(long)]
    pub noise_level: Option<u32>,
    /// Upscale the results x4 afterwards, in the same job (needs an orchestrator started with
    /// --upscaler-model).
    #[arg(long)]
    pub then_upscale: bool,
    /// Steps of the chained upscale (default 75).
    #[arg(long, requires = "then_upscale")]
    pub upscale_steps: Option<u32>,
    /// Guidance of the chained upscale (default 9).
    #[arg(long, requires = "then_upscale")]
    pub upscale_guidance: Option<f32>,
    /// What to do with images the safety checker flags: off, flag (report, keep), replace
    /// (black image). Default: the orchestrator's setting.
    #[arg(long, value_parser = ["off", "flag", "replace"])]
    pub safety: Option<String>,
    /// What the job is (set by the command: generate, img2img, inpaint, depth, upscale).
    #[arg(skip)]
    pub task: v1::Task,
    /// Where to write the image (with several images: NAME-0.png, NAME-1.png, ...). A .jpg or
    /// .jpeg name asks for JPEG unless --format says otherwise.
    #[arg(long)]
    pub out: PathBuf,
    /// png (lossless, the default) or jpeg (lossy, far fewer bytes).
    #[arg(long, value_parser = ["png", "jpeg"])]
    pub format: Option<String>,
    /// JPEG quality, 1 to 100 (default 90).
    #[arg(long)]
    pub jpeg_quality: Option<u32>,
    /// Also write the images as float32 NHWC in [0, 1] .npy (diffusers' output_type="np").
    #[arg(long)]
    pub out_array: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Ask for a live preview every N steps.
    #[arg(long, default_value_t = 0)]
    pub preview_every: u32,
    /// What previews are: latent (approximate colours, an eighth of the size, free) or decoded
    /// (by the VAE: exact, full size, one decode each).
    #[arg(long, requires = "preview_every", value_parser = ["latent", "decoded"])]
    pub preview_kind: Option<String>,
    /// Write the previews there as step-NNN.jpg (with --preview-every).
    #[arg(long, requires = "preview_every")]
    pub previews: Option<PathBuf>,
}

impl JobArgs {
    /// --format, else what --out's extension says (.jpg, .jpeg: JPEG), else PNG.
    fn image_format(&self) -> v1::ImageFormat {
        let by_name = self.out.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
        match (self.format.as_deref(), by_name.as_deref()) {
            (Some("jpeg"), _) | (None, Some("jpg" | "jpeg")) => v1::ImageFormat::Jpeg,
            _ => v1::ImageFormat::Png,
        }
    }

    /// The request these flags describe.
    pub fn request(&self) -> anyhow::Result<tonic::Request<v1::GenerateRequest>> {
        let init_latents = match &self.init_latents {
            Some(path) => {
                let t = candle_core::Tensor::read_npy(path).with_context(|| format!("reading {}", path.display()))?;
                Some(v1::Tensor::from_candle(&t.to_dtype(candle_core::DType::F32)?)?)
            }
            None => None,
        };
        let read = |what: &str, path: &Option<PathBuf>| -> anyhow::Result<bytes::Bytes> {
            match path {
                Some(p) => Ok(std::fs::read(p).with_context(|| format!("reading --{what} {}", p.display()))?.into()),
                None => Ok(bytes::Bytes::new()),
            }
        };
        let depth_map = match &self.depth_map {
            Some(path) => {
                let t = candle_core::Tensor::read_npy(path).with_context(|| format!("reading {}", path.display()))?;
                let t = if t.rank() == 2 { t.unsqueeze(0)? } else { t };
                Some(v1::Tensor::from_candle(&t.to_dtype(candle_core::DType::F32)?)?)
            }
            None => None,
        };
        let mut request = tonic::Request::new(v1::GenerateRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            steps: self.steps,
            guidance_scale: self.guidance,
            guidance_rescale: self.guidance_rescale,
            seed: self.seed,
            height: self.height,
            width: self.width,
            num_images: Some(self.num_images),
            scheduler: Some(v1::SchedulerOptions {
                name: self.scheduler.clone(),
                eta: self.eta,
                use_karras_sigmas: None,
            }),
            init_latents,
            return_array: self.out_array.is_some(),
            task: self.task.into(),
            image: read("image", &self.image)?,
            mask: read("mask", &self.mask)?,
            strength: self.strength,
            depth_map,
            noise_level: if self.then_upscale { None } else { self.noise_level },
            upscale: self.then_upscale.then_some(v1::ChainedUpscale {
                steps: self.upscale_steps,
                guidance_scale: self.upscale_guidance,
                noise_level: self.noise_level,
            }),
            safety: match self.safety.as_deref() {
                Some("off") => v1::SafetyPolicy::Off,
                Some("flag") => v1::SafetyPolicy::Flag,
                Some("replace") => v1::SafetyPolicy::Replace,
                _ => v1::SafetyPolicy::Unspecified,
            }
            .into(),
            model: self.model_name.clone().unwrap_or_default(),
            image_format: self.image_format().into(),
            jpeg_quality: self.jpeg_quality,
            preview_every: self.preview_every,
            preview_kind: match self.preview_kind.as_deref() {
                Some("decoded") => v1::PreviewKind::Decoded,
                Some(_) => v1::PreviewKind::Latent,
                None => v1::PreviewKind::Unspecified,
            }
            .into(),
        });
        if let Some(priority) = &self.priority {
            let value = priority.parse().expect("one of clap's values");
            request.metadata_mut().insert(sdmesh_orchestrator::server::PRIORITY_METADATA, value);
        }
        if let Some(tenant) = &self.tenant {
            let value = tenant.parse().map_err(|_| anyhow::anyhow!("--tenant must be printable ASCII"))?;
            request.metadata_mut().insert(sdmesh_orchestrator::server::TENANT_METADATA, value);
        }
        with_api_key(&mut request, self.api_key.as_deref())?;
        Ok(request)
    }
}

/// Sends `key` (if any) as `authorization: Bearer KEY`.
pub fn with_api_key<T>(request: &mut tonic::Request<T>, key: Option<&str>) -> anyhow::Result<()> {
    if let Some(key) = key {
        let value =
            format!("Bearer {key}").parse().map_err(|_| anyhow::anyhow!("--api-key must be printable ASCII"))?;
        request.metadata_mut().insert("authorization", value);
    }
    Ok(())
}

/// The events of one GenerateStream call, from the mesh or from an in-process orchestrator.
pub type Events = Pin<Box<dyn Stream<Item = Result<v1::GenerateEvent, tonic::Status>> + Send>>;

pub fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

/// Shows progress, then writes the PNGs (and the array) where `args` says.
pub async fn write_results(args: &JobArgs, mut events: Events) -> anyhow::Result<()> {
    let bar = if args.quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(0) };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] t={msg}")
            .expect("a valid template"),
    );
    if let Some(dir) = &args.previews {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut result = None;
    let mut restarts = 0;
    while let Some(event) = events.next().await {
        match event.map_err(status_error)?.event {
            Some(v1::generate_event::Event::Progress(p)) => {
                if p.restarts > restarts && !args.quiet {
                    bar.suspend(|| eprintln!("the job started over from step 1: the model it ran on left the pool"));
                }
                restarts = p.restarts;
                if let (Some(dir), false) = (&args.previews, p.preview.is_empty()) {
                    let path = dir.join(format!("step-{:03}.jpg", p.step));
                    std::fs::write(&path, &p.preview).with_context(|| format!("writing {}", path.display()))?;
                }
                bar.set_length(p.total_steps as u64);
                bar.set_position(p.step as u64);
                bar.set_message(format!("{}", p.timestep));
            }
            Some(v1::generate_event::Event::Result(r)) => result = Some(r),
            Some(v1::generate_event::Event::Waiting(w)) if !args.quiet => {
                eprintln!(
                    "waiting for a place to run: {} jobs waiting ahead, {} running",
                    w.jobs_ahead, w.jobs_running
                );
            }
            Some(v1::generate_event::Event::Waiting(_)) | None => {}
        }
    }
    bar.finish_and_clear();
    let r = result.context("the stream ended without a result")?;
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    for (i, image) in r.images.iter().enumerate() {
        let path = out_path(&args.out, i, r.images.len());
        let bytes = if image.jpeg.is_empty() { &image.png } else { &image.jpeg };
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        let safety = match (image.checked, image.flagged) {
            (true, true) => ", flagged by the safety checker",
            (true, false) => ", passed the safety checker",
            (false, _) => "",
        };
        println!(
            "wrote {} ({}x{}, seed {}, {}{safety})",
            path.display(),
            image.width,
            image.height,
            r.seed,
            r.scheduler
        );
    }
    if let (Some(path), Some(array)) = (&args.out_array, &r.array) {
        let t = array.to_candle("array", &candle_core::Device::Cpu)?;
        t.write_npy(path).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {} (float32 {:?})", path.display(), t.dims());
    }
    Ok(())
}

fn out_path(out: &Path, index: usize, count: usize) -> PathBuf {
    if count == 1 {
        return out.to_path_buf();
    }
    let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let ext = out.extension().map(|e| e.to_string_lossy().into_owned()).unwrap_or_else(|| "png".into());
    out.with_file_name(format!("{stem}-{index}.{ext}"))
}
