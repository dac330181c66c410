//! text-encoder service: prompts in, CLIP text embeddings out.
//!
//! [`LocalTextEncoder`] runs the model on a worker thread; [`TextEncoderService`] serves it
//! over gRPC; [`TextEncoderClient`] calls a remote one. Both implement
//! [`sdmesh_core::TextEncoder`].

pub mod clip;
pub mod tokenizer;

use candle_core::{DType, Device, Tensor};
use sdmesh_core::client::unary;
use sdmesh_core::model_dir::{ComponentDir, ModelDirError};
use sdmesh_core::serve::{serve_while_loading, Health};
use sdmesh_core::{Error, ModelWorker, Result, TextEmbeddings};
use sdmesh_proto::v1;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::OnceCell;

/// Texts per Encode request; a job needs two (prompt and negative prompt).
pub const MAX_TEXTS: usize = 64;
/// Bytes per text: far past what fits in 77 tokens, small enough to tokenize quickly.
pub const MAX_TEXT_BYTES: usize = 16 * 1024;
/// Context length and hidden size the limits allow for (CLIP: 77; OpenCLIP ViT-H: 1024,
/// bigG: 1280).
pub const MAX_CONTEXT_LENGTH: usize = 77;
pub const MAX_HIDDEN_SIZE: usize = 1280;
/// Largest legitimate Encode request and response.
pub const MAX_REQUEST_BYTES: usize = sdmesh_core::message_limit(MAX_TEXTS * (MAX_TEXT_BYTES + 16));
pub const MAX_RESPONSE_BYTES: usize =
    sdmesh_core::message_limit(sdmesh_core::f32_bytes(MAX_TEXTS * MAX_CONTEXT_LENGTH * MAX_HIDDEN_SIZE));

#[derive(Debug, Clone)]
pub struct TextEncoderOptions {
    /// Diffusers-layout model folder (uses text_encoder/ and tokenizer/).
    pub model: PathBuf,
    pub device: Device,
    /// Weights and activations (embeddings are returned as f32).
    pub dtype: DType,
    pub queue_capacity: usize,
}

impl TextEncoderOptions {
    /// f32, a queue of 64 requests.
    pub fn new(model: PathBuf, device: Device) -> Self {
        Self { model, device, dtype: DType::F32, queue_capacity: 64 }
    }
}

pub struct LocalTextEncoder {
    worker: ModelWorker<Vec<String>, TextEmbeddings>,
    info: v1::TextEncoderInfo,
}

impl sdmesh_core::serve::ModelIdentity for LocalTextEncoder {
    fn fingerprint(&self) -> &str {
        &self.info.fingerprint
    }
}

impl LocalTextEncoder {
    /// Loads tokenizer and weights and runs one warm-up encode.
    pub fn load(opts: &TextEncoderOptions) -> std::result::Result<Self, ModelDirError> {
        let dir = ComponentDir::open(&opts.model, "text_encoder")?;
        let config: clip::ClipTextConfig = dir.json("config.json")?;
        let vb = dir.var_builder(&["model"], opts.dtype, &opts.device)?;
        let model = clip::ClipTextModel::new(vb, &config)
            .map_err(|message| ModelDirError::Malformed { path: dir.path.clone(), message })?;
        let tokenizer_dir = ComponentDir::open(&opts.model, "tokenizer")?;
        let tokenizer = tokenizer::ClipTokenizer::load(&tokenizer_dir, model.max_positions())?;
        if tokenizer.context_length() > MAX_CONTEXT_LENGTH || model.hidden_size() > MAX_HIDDEN_SIZE {
            return Err(ModelDirError::Malformed {
                path: dir.path.clone(),
                message: format!(
                    "context length {} / hidden size {}: this build serves up to {MAX_CONTEXT_LENGTH} / \
                     {MAX_HIDDEN_SIZE} (its gRPC message limits are sized for them)",
                    tokenizer.context_length(),
                    model.hidden_size()
                ),
            });
        }
        let info = v1::TextEncoderInfo {
            context_length: tokenizer.context_length() as u32,
            hidden_size: model.hidden_size() as u32,
            fingerprint: dir.fingerprint(&["model"], &tokenizer_files(&tokenizer_dir), &opts.device, opts.dtype)?,
        };
        let device = opts.device.clone();
        // Warm-up: the first forward pass allocates; do it before reporting SERVING.
        encode_batch(&tokenizer, &model, &device, &[String::new()]).map_err(|e| ModelDirError::Malformed {
            path: dir.path.clone(),
            message: format!("warm-up failed: {e}"),
        })?;
        let worker = ModelWorker::spawn("text-encoder", opts.queue_capacity, move |texts: Vec<String>| {
            encode_batch(&tokenizer, &model, &device, &texts)
        });
        Ok(Self { worker, info })
    }
}

/// What a service with `opts` serves ([`v1::TextEncoderInfo::fingerprint`]), without loading
/// the model: folders with the same one can share one service.
pub fn fingerprint(opts: &TextEncoderOptions) -> std::result::Result<String, ModelDirError> {
    let dir = ComponentDir::open(&opts.model, "text_encoder")?;
    let tokenizer_dir = ComponentDir::open(&opts.model, "tokenizer")?;
    dir.fingerprint(&["model"], &tokenizer_files(&tokenizer_dir), &opts.device, opts.dtype)
}

/// The tokenizer's files its output depends on.
fn tokenizer_files(dir: &ComponentDir) -> Vec<PathBuf> {
    ["vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"]
        .into_iter()
        .filter_map(|name| dir.file(name).ok())
        .collect()
}

fn encode_batch(
    tokenizer: &tokenizer::ClipTokenizer,
    model: &clip::ClipTextModel,
    device: &Device,
    texts: &[String],
) -> Result<TextEmbeddings> {
    let mut ids = Vec::with_capacity(texts.len() * tokenizer.context_length());
    let mut truncated_tokens = Vec::with_capacity(texts.len());
    for text in texts {
        let tokens = tokenizer.encode(text).map_err(Error::invalid)?;
        if tokens.truncated > 0 {
            tracing::warn!(
                dropped = tokens.truncated,
                "prompt truncated: {} tokens beyond the {}-token context were dropped",
                tokens.truncated,
                tokenizer.context_length()
            );
        }
        ids.extend(tokens.ids);
        truncated_tokens.push(tokens.truncated as u32);
    }
    let ids = Tensor::from_vec(ids, (texts.len(), tokenizer.context_length()), device)?;
    let embeddings = model.forward(&ids)?.to_device(&Device::Cpu)?;
    Ok(TextEmbeddings { embeddings, truncated_tokens })
}

fn validate_texts(texts: &[String]) -> Result<()> {
    if texts.is_empty() || texts.len() > MAX_TEXTS {
        return Err(Error::invalid(format!("texts: {} given, 1 to {MAX_TEXTS} allowed", texts.len())));
    }
    if let Some((i, t)) = texts.iter().enumerate().find(|(_, t)| t.len() > MAX_TEXT_BYTES) {
        return Err(Error::invalid(format!("texts[{i}]: {} bytes, at most {MAX_TEXT_BYTES} allowed", t.len())));
    }
    Ok(())
}

#[async_trait::async_trait]
impl sdmesh_core::TextEncoder for LocalTextEncoder {
    async fn encode(&self, texts: Vec<String>) -> Result<TextEmbeddings> {
        validate_texts(&texts)?;
        self.worker.call(texts).await
    }

    async fn info(&self) -> Result<v1::TextEncoderInfo> {
        Ok(self.info.clone())
    }
}

/// The gRPC face of a [`LocalTextEncoder`]; UNAVAILABLE until the model has loaded.
#[derive(Clone)]
pub struct TextEncoderService {
    local: Arc<OnceCell<LocalTextEncoder>>,
}

impl TextEncoderService {
    fn local(&self) -> std::result::Result<&LocalTextEncoder, tonic::Status> {
        self.local.get().ok_or_else(sdmesh_core::loading)
    }
}

#[tonic::async_trait]
impl v1::text_encoder_server::TextEncoder for TextEncoderService {
    async fn encode(
        &self,
        request: tonic::Request<v1::EncodeTextRequest>,
    ) -> std::result::Result<tonic::Response<v1::EncodeTextResponse>, tonic::Status> {
        let local = self.local()?;
        let out = sdmesh_core::TextEncoder::encode(local, request.into_inner().texts).await?;
        Ok(tonic::Response::new(v1::EncodeTextResponse {
            embeddings: Some(v1::Tensor::from_candle(&out.embeddings)?),
            truncated_tokens: out.truncated_tokens,
        }))
    }

    async fn info(
        &self,
        _: tonic::Request<v1::InfoRequest>,
    ) -> std::result::Result<tonic::Response<v1::TextEncoderInfo>, tonic::Status> {
        Ok(tonic::Response::new(self.local()?.info.clone()))
    }
}

/// Serves the text encoder on `listener` until `shutdown`: health NOT_SERVING while the model
/// loads, SERVING once it has warmed up. A model that fails to load ends `run` with the error.
pub async fn run(
    opts: TextEncoderOptions,
    listener: TcpListener,
    shutdown: sdmesh_core::serve::Shutdown,
) -> anyhow::Result<()> {
    let health = Health::new(&[v1::text_encoder_server::SERVICE_NAME]).await;
    let service = TextEncoderService { local: Arc::new(OnceCell::new()) };
    let routes = health.routes().add_service(
        v1::text_encoder_server::TextEncoderServer::new(service.clone())
            .max_decoding_message_size(MAX_REQUEST_BYTES)
            .max_encoding_message_size(MAX_RESPONSE_BYTES),
    );
    let load = move || LocalTextEncoder::load(&opts);
    serve_while_loading("text encoder", listener, health, routes, shutdown, load, |local| {
        let _ = service.local.set(local);
    })
    .await
}

/// A remote text-encoder service.
#[derive(Clone)]
pub struct TextEncoderClient {
    inner: v1::text_encoder_client::TextEncoderClient<sdmesh_core::client::ReplicaSet>,
}

impl TextEncoderClient {
    pub fn new(url: &str) -> Result<Self> {
        let inner = v1::text_encoder_client::TextEncoderClient::new(sdmesh_core::client::lazy_channel(url)?)
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
            .max_encoding_message_size(MAX_REQUEST_BYTES);
        Ok(Self { inner })
    }
}

#[async_trait::async_trait]
impl sdmesh_core::TextEncoder for TextEncoderClient {
    async fn encode(&self, texts: Vec<String>) -> Result<TextEmbeddings> {
        let request = v1::EncodeTextRequest { texts };
        let out = unary(&self.inner, &request, |mut c, r| async move { c.encode(r).await }).await?;
        let embeddings =
            sdmesh_proto::required(&out.embeddings, "embeddings")?.to_candle("embeddings", &Device::Cpu)?;
        Ok(TextEmbeddings { embeddings, truncated_tokens: out.truncated_tokens })
    }

    async fn info(&self) -> Result<v1::TextEncoderInfo> {
        // Retried as every call is: within a job, a dead replica costs a retry.
        unary(&self.inner, &v1::InfoRequest {}, |mut c, r| async move { c.info(r).await }).await
    }
}
