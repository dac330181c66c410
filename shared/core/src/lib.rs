//! What every sdmesh component shares: the domain traits (one per model service), the error
//! type and its gRPC mapping, model-folder loading, the model worker thread, and serving
//! (health, reflection, shutdown).

pub mod client;
mod error;
pub mod model_dir;
pub mod serve;
mod traits;
mod worker;

pub use error::{Error, Result};
pub use traits::{DenoiseInput, Denoiser, TextEmbeddings, TextEncoder, Vae};
pub use worker::ModelWorker;

/// Devices a model service can run on. Only the CPU in this build.
pub fn parse_device(spec: &str) -> std::result::Result<candle_core::Device, String> {
    match spec {
        "cpu" => Ok(candle_core::Device::Cpu),
        other => Err(format!("unsupported device {other:?}: this build supports \"cpu\"")),
    }
}

/// Largest gRPC message a service accepts or sends: the largest legitimate tensor is a batch
/// of decoded images, 8 images of 1024x1024 as f32 NHWC = 96 MiB; 4 MiB more for framing.
pub const MAX_MESSAGE_BYTES: usize = 100 << 20;

/// Waits for the model to be ready; returned by services while they load.
pub fn loading() -> tonic::Status {
    tonic::Status::unavailable("the model is still loading; retry shortly")
}
