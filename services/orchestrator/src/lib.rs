//! orchestrator: the public API. It owns each job — validation, prompt embeddings, initial
//! noise, the scheduler loop, decoding, PNG encoding — and calls the model services (or local
//! models: the components are traits) for the heavy work. It needs no GPU.

pub mod embedding_cache;
pub mod noise;
pub mod pipeline;
pub mod png;
pub mod scheduler;
pub mod server;
pub mod torch_rng;

use pipeline::{Limits, Pipeline};
use sdmesh_core::model_dir::{ComponentDir, ModelDirError};
use sdmesh_core::serve::{serve, Health, ServingStatus};
use sdmesh_core::{Denoiser, TextEncoder, Vae};
use sdmesh_proto::v1;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// scheduler/scheduler_config.json of a diffusers model folder.
pub fn load_scheduler_config(model: &Path) -> Result<scheduler::SchedulerConfig, ModelDirError> {
    let dir = ComponentDir::open(model, "scheduler")?;
    let path = dir.file("scheduler_config.json")?;
    let json: serde_json::Value = dir.json("scheduler_config.json")?;
    scheduler::SchedulerConfig::from_json(&json).map_err(|message| ModelDirError::Malformed { path, message })
}

/// The model's display name: its folder name.
pub fn model_name(model: &Path) -> String {
    model
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| model.display().to_string())
}

#[derive(Debug, Clone)]
pub struct OrchestratorOptions {
    /// Diffusers-layout model folder (the orchestrator reads scheduler/ only).
    pub model: PathBuf,
    pub text_encoder_url: String,
    pub unet_url: String,
    pub vae_url: String,
    pub limits: Limits,
    /// How long to wait at start-up for the model services to report their info.
    pub startup_timeout: Duration,
    /// Bytes of prompt embeddings kept in the in-process cache (0 turns it off).
    pub embedding_cache_bytes: usize,
}

/// Puts a prompt-embedding cache in front of the pipeline's text encoder.
pub fn with_embedding_cache(mut pipeline: Pipeline, store: Arc<dyn embedding_cache::EmbeddingStore>) -> Pipeline {
    pipeline.text_encoder = Arc::new(embedding_cache::CachedTextEncoder::new(
        pipeline.text_encoder.clone(),
        store,
        pipeline.info.text.clone(),
    ));
    pipeline
}

/// Builds a pipeline over given components, asking each for its info; retries UNAVAILABLE
/// (services still loading) until `timeout`.
pub async fn pipeline_over(
    model: &Path,
    text_encoder: Arc<dyn TextEncoder>,
    denoiser: Arc<dyn Denoiser>,
    vae: Arc<dyn Vae>,
    limits: Limits,
    timeout: Duration,
) -> anyhow::Result<Pipeline> {
    let scheduler_config = load_scheduler_config(model)?;
    let deadline = tokio::time::Instant::now() + timeout;
    let info = loop {
        match Pipeline::model_info(text_encoder.as_ref(), denoiser.as_ref(), vae.as_ref()).await {
            Ok(info) => break info,
            Err(e) if e.code() == tonic::Code::Unavailable && tokio::time::Instant::now() < deadline => {
                tracing::debug!("waiting for model services: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => anyhow::bail!("model services did not come up: {e}"),
        }
    };
    Ok(Pipeline { text_encoder, denoiser, vae, scheduler_config, info, limits, model_name: model_name(model) })
}

/// Serves the public API on `listener` until `shutdown`; NOT_SERVING (and UNAVAILABLE to
/// calls) until every model service has answered.
pub async fn run(
    opts: OrchestratorOptions,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let health = Health::new(&[v1::orchestrator_server::SERVICE_NAME]).await;
    let service = server::OrchestratorService::default();
    let routes = health.routes().add_service(
        v1::orchestrator_server::OrchestratorServer::new(service.clone())
            .max_decoding_message_size(sdmesh_core::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(sdmesh_core::MAX_MESSAGE_BYTES),
    );
    let server = tokio::spawn(serve(listener, routes, health.clone(), shutdown));
    let pipeline = pipeline_over(
        &opts.model,
        Arc::new(sdmesh_text_encoder::TextEncoderClient::new(&opts.text_encoder_url)?),
        Arc::new(sdmesh_unet::UnetClient::new(&opts.unet_url)?),
        Arc::new(sdmesh_vae::VaeClient::new(&opts.vae_url)?),
        opts.limits,
        opts.startup_timeout,
    )
    .await?;
    let pipeline = match opts.embedding_cache_bytes {
        0 => pipeline,
        bytes => with_embedding_cache(pipeline, Arc::new(embedding_cache::LruStore::new(bytes))),
    };
    service.set_pipeline(pipeline);
    health.set(ServingStatus::Serving).await;
    tracing::info!("orchestrator ready");
    server.await??;
    Ok(())
}
