//! sdctl: command-line client of the orchestrator's public API.

use anyhow::Context;
use clap::{Parser, Subcommand};
use sdmesh_proto::v1;
use std::path::{Path, PathBuf};
use tokio_stream::StreamExt;

#[derive(Parser, Debug)]
#[command(version, about = "Client for the sdmesh orchestrator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// txt2img: generate images from a prompt.
    Generate(GenerateArgs),
}

#[derive(clap::Args, Debug)]
struct GenerateArgs {
    /// Orchestrator URL.
    #[arg(long, env = "SDMESH_ENDPOINT", default_value = "http://127.0.0.1:50050")]
    endpoint: String,
    /// What to draw.
    #[arg(long)]
    prompt: String,
    /// What to steer away from (the unconditional prompt of guidance).
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// Denoising steps (default 50).
    #[arg(long)]
    steps: Option<u32>,
    /// Classifier-free guidance scale (default 7.5; <= 1 turns guidance off).
    #[arg(long)]
    guidance: Option<f32>,
    /// Guidance rescale, 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    guidance_rescale: f32,
    /// ddim (default), dpm++2m, dpm++2m-karras, dpm++2m-sde, dpm++2s, unipc (unipc-bh1, unipc-bh2),
    /// deis, euler, euler-karras, euler_a, lms, heun, pndm, ddpm, kdpm2, kdpm2_a (Karras variants
    /// with -karras), or a diffusers class name.
    #[arg(long, default_value = "")]
    scheduler: String,
    /// DDIM eta.
    #[arg(long)]
    eta: Option<f32>,
    /// Random when not given; printed, and written into the PNG.
    #[arg(long)]
    seed: Option<u64>,
    /// Pixels, a multiple of 8 (default: the model's native size).
    #[arg(long)]
    height: Option<u32>,
    /// Pixels, a multiple of 8 (default: the model's native size).
    #[arg(long)]
    width: Option<u32>,
    /// Images from one prompt (one batch, consecutive noise from the seed).
    #[arg(long, default_value_t = 1)]
    num_images: u32,
    /// Tenant the job runs for (sent as x-sdmesh-tenant metadata, recorded on its trace).
    #[arg(long, env = "SDMESH_TENANT")]
    tenant: Option<String>,
    /// Initial noise as float32 NCHW .npy (diffusers' `latents=`), instead of the seed's.
    #[arg(long)]
    init_latents: Option<PathBuf>,
    /// Where to write the PNG (with several images: NAME-0.png, NAME-1.png, ...).
    #[arg(long)]
    out: PathBuf,
    /// Also write the images as float32 NHWC in [0, 1] .npy (diffusers' output_type="np").
    #[arg(long)]
    out_array: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Seconds to keep retrying while the mesh is not up yet (UNAVAILABLE).
    #[arg(long, default_value_t = 0)]
    wait: u64,
}

#[tokio::main]
async fn main() {
    let Command::Generate(args) = Cli::parse().command;
    if let Err(e) = generate(args).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn out_path(out: &Path, index: usize, count: usize) -> PathBuf {
    if count == 1 {
        return out.to_path_buf();
    }
    let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let ext = out.extension().map(|e| e.to_string_lossy().into_owned()).unwrap_or_else(|| "png".into());
    out.with_file_name(format!("{stem}-{index}.{ext}"))
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

async fn generate(a: GenerateArgs) -> anyhow::Result<()> {
    let init_latents = match &a.init_latents {
        Some(path) => {
            let t = candle_core::Tensor::read_npy(path).with_context(|| format!("reading {}", path.display()))?;
            Some(v1::Tensor::from_candle(&t.to_dtype(candle_core::DType::F32)?)?)
        }
        None => None,
    };
    let request = v1::GenerateRequest {
        prompt: a.prompt,
        negative_prompt: a.negative_prompt,
        steps: a.steps,
        guidance_scale: a.guidance,
        guidance_rescale: a.guidance_rescale,
        seed: a.seed,
        height: a.height,
        width: a.width,
        num_images: Some(a.num_images),
        scheduler: Some(v1::SchedulerOptions { name: a.scheduler, eta: a.eta, use_karras_sigmas: None }),
        init_latents,
        return_array: a.out_array.is_some(),
    };
    let channel = sdmesh_core::client::lazy_channel(&a.endpoint).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut client = v1::orchestrator_client::OrchestratorClient::new(channel)
        .max_decoding_message_size(sdmesh_core::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(sdmesh_core::MAX_MESSAGE_BYTES);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(a.wait);
    let tenant: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> = match &a.tenant {
        Some(t) => Some(t.parse().map_err(|_| anyhow::anyhow!("--tenant must be printable ASCII"))?),
        None => None,
    };
    let mut events = loop {
        let mut call = tonic::Request::new(request.clone());
        if let Some(tenant) = &tenant {
            call.metadata_mut().insert(sdmesh_orchestrator::server::TENANT_METADATA, tenant.clone());
        }
        match client.generate_stream(call).await {
            Ok(r) => break r.into_inner(),
            Err(s) if s.code() == tonic::Code::Unavailable && std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(s) => return Err(status_error(s)),
        }
    };
    let bar = if a.quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(0) };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] t={msg}")
            .expect("a valid template"),
    );
    let mut result = None;
    while let Some(event) = events.next().await {
        match event.map_err(status_error)?.event {
            Some(v1::generate_event::Event::Progress(p)) => {
                bar.set_length(p.total_steps as u64);
                bar.set_position(p.step as u64);
                bar.set_message(format!("{}", p.timestep));
            }
            Some(v1::generate_event::Event::Result(r)) => result = Some(r),
            None => {}
        }
    }
    bar.finish_and_clear();
    let r = result.context("the stream ended without a result")?;
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    for (i, image) in r.images.iter().enumerate() {
        let path = out_path(&a.out, i, r.images.len());
        std::fs::write(&path, &image.png).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {} ({}x{}, seed {}, {})", path.display(), image.width, image.height, r.seed, r.scheduler);
    }
    if let (Some(path), Some(array)) = (&a.out_array, &r.array) {
        let t = array.to_candle("array", &candle_core::Device::Cpu)?;
        t.write_npy(path).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {} (float32 {:?})", path.display(), t.dims());
    }
    Ok(())
}
