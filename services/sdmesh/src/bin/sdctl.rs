//! sdctl: command-line client of the orchestrator's public API.

use clap::{Parser, Subcommand};
use sdmesh::{status_error, write_results, JobArgs};
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
}

#[derive(clap::Args, Debug)]
struct GenerateArgs {
    /// Orchestrator URL.
    #[arg(long, env = "SDMESH_ENDPOINT", default_value = "http://127.0.0.1:50050")]
    endpoint: String,
    /// Seconds to keep retrying while the mesh is not up yet (UNAVAILABLE).
    #[arg(long, default_value_t = 0)]
    wait: u64,
    #[command(flatten)]
    job: JobArgs,
}

#[tokio::main]
async fn main() {
    let Command::Generate(args) = Cli::parse().command;
    if let Err(e) = generate(args).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
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
        match client.generate_stream(a.job.request()?).await {
            Ok(r) => break r.into_inner(),
            Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => return Err(status_error(s)),
        }
    };
    write_results(&a.job, Box::pin(events)).await
}
