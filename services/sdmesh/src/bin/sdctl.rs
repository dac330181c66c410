//! sdctl: command-line client of the orchestrator's public API.

use clap::{Parser, Subcommand};
use sdmesh::{status_error, write_results, JobArgs};
use sdmesh_core::telemetry::TelemetryArgs;
use sdmesh_orchestrator::pipeline::Limits;
use sdmesh_proto::v1;
use std::time::{Duration, Instant};

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
    /// img2img: redraw --image after a prompt (--strength: how far from it).
    Img2img(GenerateArgs),
    /// Inpainting: repaint the white part of --mask in --image after a prompt.
    Inpaint(GenerateArgs),
    /// depth2img: a new image with --image's depth (estimated by the depth service, or
    /// --depth-map) after a prompt; needs a depth checkpoint.
    Depth(GenerateArgs),
    /// x4 upscaling of --image after a prompt (--noise-level); needs an upscaler checkpoint.
    Upscale(GenerateArgs),
    /// The models the orchestrator serves: one JSON object per model (name, default, tasks,
    /// native size, prediction type, whether jobs can chain an x4 upscale), the default first.
    Models(ModelsArgs),
    /// Ask the safety-checker service about images: one JSON object per image (flagged, the
    /// concept and special-care scores) on stdout.
    Check(CheckArgs),
    /// Make an API key: its [[keys]] entry for the orchestrator's --api-keys-file on stdout
    /// (only the key's SHA-256), the key itself on stderr, to give to its holder
    /// (`sdctl api-key --tenant acme >> keys.toml`).
    ApiKey(ApiKeyArgs),
}

#[derive(clap::Args, Debug)]
#[group(required = true, multiple = false)]
struct ApiKeyArgs {
    /// The tenant the key's calls run for.
    #[arg(long)]
    tenant: Option<String>,
    /// A gateway's key: its calls name their tenant in x-sdmesh-tenant.
    #[arg(long)]
    any_tenant: bool,
}

/// `sdctl api-key`.
fn api_key(a: ApiKeyArgs) -> anyhow::Result<()> {
    let (key, entry) = sdmesh_orchestrator::api_keys::new_key(a.tenant.as_deref()).map_err(anyhow::Error::msg)?;
    eprintln!("API key (not kept anywhere; give it to its holder): {key}");
    print!("{entry}");
    Ok(())
}

#[derive(clap::Args, Debug)]
struct CheckArgs {
    /// Safety-checker service URL.
    #[arg(long, env = "SDMESH_SAFETY_URL", default_value = "http://127.0.0.1:50055")]
    endpoint: String,
    /// An image to check (PNG or JPEG); repeat for several.
    #[arg(long, required = true)]
    image: Vec<std::path::PathBuf>,
}

#[derive(clap::Args, Debug)]
struct ModelsArgs {
    /// Orchestrator URL.
    #[arg(long, env = "SDMESH_ENDPOINT", default_value = "http://127.0.0.1:50050")]
    endpoint: String,
    /// API key, for an orchestrator started with --api-keys-file.
    #[arg(long, env = "SDMESH_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

/// `sdctl models`: one JSON line per served model.
async fn models(a: ModelsArgs) -> anyhow::Result<()> {
    let channel = sdmesh_core::client::lazy_channel(&a.endpoint).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut client = v1::orchestrator_client::OrchestratorClient::new(channel);
    let mut request = tonic::Request::new(v1::ListModelsRequest {});
    sdmesh::with_api_key(&mut request, a.api_key.as_deref())?;
    let list = client.list_models(request).await.map_err(status_error)?.into_inner();
    for m in list.models {
        let line = serde_json::json!({
            "name": m.name,
            "default": m.is_default,
            "tasks": m.tasks,
            "native_height": m.native_height,
            "native_width": m.native_width,
            "prediction_type": m.prediction_type,
            "chains_upscale": m.chains_upscale,
        });
        println!("{line}");
    }
    Ok(())
}

/// `sdctl check`: one JSON line per image.
async fn check(a: CheckArgs) -> anyhow::Result<()> {
    let client = sdmesh_safety::SafetyClient::new(&a.endpoint).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut images = Vec::with_capacity(a.image.len());
    for path in &a.image {
        let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        images.push(bytes::Bytes::from(bytes));
    }
    let mut verdicts = Vec::with_capacity(images.len());
    for chunk in images.chunks(sdmesh_safety::MAX_IMAGES) {
        verdicts.extend(client.check_images(chunk.to_vec()).await.map_err(|e| anyhow::anyhow!("{e}"))?);
    }
    for (path, v) in a.image.iter().zip(verdicts) {
        let line = serde_json::json!({
            "image": path.display().to_string(),
            "flagged": v.flagged,
            "special_care": v.special_care(),
            "concept_scores": v.concept_scores,
            "special_scores": v.special_scores,
        });
        println!("{line}");
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
struct GenerateArgs {
    /// Orchestrator URL.
    #[arg(long, env = "SDMESH_ENDPOINT", default_value = "http://127.0.0.1:50050")]
    endpoint: String,
    /// Seconds to keep retrying while the mesh is not up yet (UNAVAILABLE) or too busy to take
    /// the job (RESOURCE_EXHAUSTED: retried after the orchestrator's hint).
    #[arg(long, default_value_t = 0)]
    wait: u64,
    /// Seconds the job may take, waiting for its turn included (its gRPC deadline); past it the
    /// orchestrator stops the job and answers DEADLINE_EXCEEDED.
    #[arg(long, value_parser = positive_seconds)]
    timeout: Option<Duration>,
    #[command(flatten)]
    job: JobArgs,
    /// OTLP/gRPC endpoint: the generation's trace then starts here, with sdctl's span as its root.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
}

#[tokio::main]
async fn main() {
    let command = Cli::parse().command;
    let (task, mut args) = match command {
        Command::Check(a) => return exit_on_error(check(a).await),
        Command::Models(a) => return exit_on_error(models(a).await),
        Command::ApiKey(a) => return exit_on_error(api_key(a)),
        // generate infers the task from what is given (an image: img2img, a mask too: inpaint).
        Command::Generate(a) => (v1::Task::Unspecified, a),
        Command::Img2img(a) => (v1::Task::Img2img, a),
        Command::Inpaint(a) => (v1::Task::Inpaint, a),
        Command::Depth(a) => (v1::Task::Depth2img, a),
        Command::Upscale(a) => (v1::Task::Upscale, a),
    };
    args.job.task = task;
    if std::env::var_os("RUST_LOG").is_none() {
        // Not the endpoint's connection failures while --wait waits for the mesh to come up:
        // the final error says what went wrong.
        std::env::set_var("RUST_LOG", "warn,sdmesh_core::replicas=error");
    }
    let telemetry = TelemetryArgs { otlp_endpoint: args.otlp_endpoint.clone(), ..Default::default() };
    let telemetry = match sdmesh_core::telemetry::init("sdctl", &telemetry).await {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    };
    let span = tracing::info_span!("sdctl generate", tenant = args.job.tenant.as_deref().unwrap_or(""));
    let result = tracing::Instrument::instrument(generate(args), span).await;
    telemetry.shutdown().await;
    exit_on_error(result);
}

/// Exits with status 1 after printing the error, if there is one.
fn exit_on_error(result: anyhow::Result<()>) {
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn positive_seconds(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!("{s:?} is not a positive number of seconds")),
    }
}

async fn generate(a: GenerateArgs) -> anyhow::Result<()> {
    let channel = sdmesh_core::client::lazy_channel(&a.endpoint).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut client = v1::orchestrator_client::OrchestratorClient::new(channel)
        // An orchestrator with the default limits sends at most this much.
        .max_decoding_message_size(Limits::default().max_response_bytes())
        .max_encoding_message_size(Limits::default().max_request_bytes());
    let deadline = Instant::now() + Duration::from_secs(a.wait);
    let events = loop {
        let mut request = a.job.request()?;
        sdmesh_core::telemetry::inject_current(request.metadata_mut());
        if let Some(timeout) = a.timeout {
            request.set_timeout(timeout);
        }
        match client.generate_stream(request).await {
            Ok(r) => break r.into_inner(),
            Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                let hint = sdmesh_core::retry_after(&s).unwrap_or(Duration::from_secs(1));
                if Instant::now() + hint > deadline {
                    return Err(status_error(s));
                }
                tracing::info!(?hint, "the orchestrator is busy: retrying after its hint");
                tokio::time::sleep(hint).await;
            }
            Err(s) => return Err(status_error(s)),
        }
    };
    write_results(&a.job, Box::pin(events)).await
}
