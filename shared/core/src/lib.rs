//! What every sdmesh component shares: the domain traits (one per model service), the error
//! type and its gRPC mapping, model-folder loading, the model worker thread, and serving
//! (health, reflection, shutdown).

pub mod activation;
pub mod attention;
pub mod batch;
pub mod blocks;
pub mod byte_lru;
pub mod client;
pub mod conv;
mod conv_direct;
mod conv_winograd;
mod cpu_gemm;
pub mod cudnn;
mod error;
mod fast_math;
pub mod images;
pub mod linear;
pub mod model_dir;
pub mod norm;
pub mod replicas;
pub mod serve;
pub mod telemetry;
#[cfg(test)]
mod test_support;
pub mod torch_rng;
mod traits;
mod worker;

pub use error::{retry_after, Error, Result};
pub use traits::{
    DenoiseInput, Denoiser, DepthEstimator, EncodedImages, SafetyChecker, SafetyVerdict, TextEmbeddings, TextEncoder,
    Vae,
};
pub use worker::ModelWorker;

/// An on/off switch in the environment, read once into `cell`: on unless `var` is 0, off or
/// false (for comparing a kernel with the path it replaces).
pub(crate) fn switched_on(cell: &std::sync::OnceLock<bool>, var: &str) -> bool {
    *cell.get_or_init(|| !matches!(std::env::var(var).as_deref(), Ok("0" | "off" | "false")))
}

/// The device a model service runs on: `cpu`, or `cuda` / `cuda:N` in a build with the `cuda`
/// feature (CPU builds, the tests and CI among them, carry no CUDA dependency).
pub fn parse_device(spec: &str) -> std::result::Result<candle_core::Device, String> {
    match spec {
        "cpu" => Ok(candle_core::Device::Cpu),
        cuda if cuda == "cuda" || cuda.starts_with("cuda:") => {
            let ordinal = match cuda.strip_prefix("cuda:") {
                None => 0,
                Some(n) => {
                    n.parse::<usize>().map_err(|_| format!("device {cuda:?}: expected cuda:N with N a GPU index"))?
                }
            };
            cuda_device(ordinal)
        }
        other => Err(format!("unsupported device {other:?}: expected cpu, cuda or cuda:N")),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> std::result::Result<candle_core::Device, String> {
    candle_core::Device::new_cuda(ordinal).map_err(|e| format!("cuda:{ordinal}: {e}"))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(ordinal: usize) -> std::result::Result<candle_core::Device, String> {
    Err(format!("device cuda:{ordinal}: this build has no CUDA support (build with `--features cuda`)"))
}

/// The float type a model's weights and activations use: `f32` (the reference; the default),
/// `f16` or `bf16` (for GPUs: half the memory and the tensor cores). Inputs and outputs on the
/// wire stay f32 whatever the model runs in.
pub fn parse_dtype(spec: &str) -> std::result::Result<candle_core::DType, String> {
    match spec {
        "f32" | "fp32" | "float32" => Ok(candle_core::DType::F32),
        "f16" | "fp16" | "float16" => Ok(candle_core::DType::F16),
        "bf16" | "bfloat16" => Ok(candle_core::DType::BF16),
        other => Err(format!("unsupported dtype {other:?}: expected f32, f16 or bf16")),
    }
}

/// The gRPC message limit for a message whose largest legitimate payload (its tensors) is
/// `payload_bytes`: that plus 1 MiB for framing and the small fields. Each service derives its
/// limits from the largest request and response it accepts, so nothing is unlimited.
pub const fn message_limit(payload_bytes: usize) -> usize {
    payload_bytes + (1 << 20)
}

/// Bytes of an f32 tensor of `elements`.
pub const fn f32_bytes(elements: usize) -> usize {
    elements * 4
}

/// Waits for the model to be ready; returned by services while they load.
pub fn loading() -> tonic::Status {
    tonic::Status::unavailable("the model is still loading; retry shortly")
}

/// A URL fit for logs: the password (and a lone user name, which may be a token) replaced by
/// `***`. `redis://user:secret@host:6379/0` -> `redis://user:***@host:6379/0`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else { return url.to_string() };
    let user = match rest[..at].split_once(':') {
        Some((user, _password)) => format!("{user}:***"),
        None => "***".to_string(),
    };
    format!("{scheme}://{user}@{}", &rest[at + 1..])
}

#[cfg(test)]
mod tests {
    #[test]
    fn redact_url_hides_credentials_only() {
        use super::redact_url;
        assert_eq!(redact_url("redis://:hunter2@cache:6379/1"), "redis://:***@cache:6379/1");
        assert_eq!(redact_url("redis://app:hunter2@cache/0"), "redis://app:***@cache/0");
        assert_eq!(redact_url("rediss://tok3n@cache"), "rediss://***@cache");
        assert_eq!(redact_url("redis://cache:6379/0?x=a@b"), "redis://cache:6379/0?x=a@b");
        assert_eq!(redact_url("http://127.0.0.1:4317"), "http://127.0.0.1:4317");
    }
}
