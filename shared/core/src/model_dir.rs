//! Reading a model folder in the Hugging Face diffusers layout: each component in its own
//! sub-folder with a config.json and safetensors weights (`model.safetensors`,
//! `diffusion_pytorch_model.safetensors`, or their `.fp16` variants).
//!
//! Every failure names the file it is about, so a broken folder is fixed at start-up.

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ModelDirError {
    #[error("{path}: missing (expected in a diffusers-layout model folder)")]
    Missing { path: PathBuf },
    #[error("{path}: {message}")]
    Malformed { path: PathBuf, message: String },
    #[error("{dir}: no safetensors weights (looked for {candidates})")]
    NoWeights { dir: PathBuf, candidates: String },
    /// The device cannot run the model in the asked dtype.
    #[error("{0}")]
    Unsupported(String),
}

pub type Result<T> = std::result::Result<T, ModelDirError>;

/// One component folder (unet/, vae/, text_encoder/, ...).
#[derive(Debug, Clone)]
pub struct ComponentDir {
    pub path: PathBuf,
}

impl ComponentDir {
    /// `model/component`, which must exist.
    pub fn open(model: &Path, component: &str) -> Result<Self> {
        let path = model.join(component);
        if !path.is_dir() {
            return Err(ModelDirError::Missing { path });
        }
        Ok(Self { path })
    }

    /// A transformers vision model and its preprocessor config: `model/component` and
    /// `model/feature_extractor/preprocessor_config.json` in a pipeline folder, or `model`
    /// itself holding config.json and preprocessor_config.json.
    pub fn open_with_preprocessor(model: &Path, component: &str) -> Result<(Self, PathBuf)> {
        if model.join(component).is_dir() {
            let dir = Self::open(model, component)?;
            let pre = Self::open(model, "feature_extractor")?.file("preprocessor_config.json")?;
            Ok((dir, pre))
        } else if model.join("config.json").is_file() {
            let dir = Self { path: model.to_path_buf() };
            let pre = dir.file("preprocessor_config.json")?;
            Ok((dir, pre))
        } else {
            Err(ModelDirError::Missing { path: model.join(component) })
        }
    }

    pub fn file(&self, name: &str) -> Result<PathBuf> {
        let path = self.path.join(name);
        if !path.is_file() {
            return Err(ModelDirError::Missing { path });
        }
        Ok(path)
    }

    /// Parses a JSON file of this component.
    pub fn json<T: DeserializeOwned>(&self, name: &str) -> Result<T> {
        read_json(&self.file(name)?)
    }

    /// The weights file: the full-precision one when present, else the `.fp16` variant.
    pub fn weights(&self, stems: &[&str]) -> Result<PathBuf> {
        let mut candidates = Vec::new();
        for variant in ["", ".fp16"] {
            for stem in stems {
                let name = format!("{stem}{variant}.safetensors");
                let path = self.path.join(&name);
                if path.is_file() {
                    return Ok(path);
                }
                candidates.push(name);
            }
        }
        Err(ModelDirError::NoWeights { dir: self.path.clone(), candidates: candidates.join(", ") })
    }

    /// [`fingerprint`] of this component as a service runs it: its config.json, its weights
    /// (`stems`, picked as [`Self::weights`] picks them), then `extra` files (tokenizer,
    /// preprocessor).
    pub fn fingerprint(&self, stems: &[&str], extra: &[PathBuf], device: &Device, dtype: DType) -> Result<String> {
        let mut files = vec![self.file("config.json")?, self.weights(stems)?];
        files.extend_from_slice(extra);
        fingerprint(&files, device, dtype)
    }

    /// Memory-maps the weights, converting to `dtype` as tensors are fetched.
    pub fn var_builder(&self, stems: &[&str], dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        if device.is_cpu() && dtype == DType::BF16 {
            return Err(ModelDirError::Unsupported(
                "bf16 on the CPU: candle's CPU matmul has no bf16 (use f32 or f16 there, bf16 on a CUDA device)".into(),
            ));
        }
        let path = self.weights(stems)?;
        check_safetensors_header(&path)?;
        // SAFETY: the file is mapped read-only; like every safetensors loader we rely on the
        // model folder not being modified while the service runs.
        #[allow(unsafe_code)]
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&path], dtype, device) };
        vb.map_err(|e| ModelDirError::Malformed { path, message: e.to_string() })
    }
}

/// The build, as far as it decides the numbers a model service computes: its release and the
/// kernels compiled in (a rollout of new kernels over the same files is another model).
pub const BUILD: &str = if cfg!(feature = "flash-attn") {
    concat!("sdmesh ", env!("CARGO_PKG_VERSION"), " flash-attn")
} else {
    concat!("sdmesh ", env!("CARGO_PKG_VERSION"))
};

/// What a model service serves, as a hex BLAKE3 digest: every file its outputs depend on (each
/// file's name, not its path, so replicas with the model in different places agree, and its
/// bytes, in the order given), the device kind, the dtype and the [`BUILD`]. Same digest, same
/// bytes out; a replica with other weights, config, tokenizer, dtype, device kind or build has
/// another. The files are hashed on all cores from their memory maps (the weights are mapped
/// anyway).
pub fn fingerprint(files: &[PathBuf], device: &Device, dtype: DType) -> Result<String> {
    fingerprint_of_build(files, device, dtype, BUILD)
}

fn fingerprint_of_build(files: &[PathBuf], device: &Device, dtype: DType, build: &str) -> Result<String> {
    let mut hasher = blake3::Hasher::new();
    for path in files {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        hasher.update(name.as_bytes()).update(&[0]);
        hasher
            .update_mmap_rayon(path)
            .map_err(|e| ModelDirError::Malformed { path: path.clone(), message: e.to_string() })?;
    }
    let kind = match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu",
        candle_core::DeviceLocation::Cuda { .. } => "cuda",
        candle_core::DeviceLocation::Metal { .. } => "metal",
    };
    hasher.update(kind.as_bytes()).update(&[0]).update(dtype.as_str().as_bytes()).update(&[0]);
    hasher.update(build.as_bytes());
    Ok(hasher.finalize().to_hex().to_string())
}

pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ModelDirError::Missing { path: path.into() },
        _ => ModelDirError::Malformed { path: path.into(), message: e.to_string() },
    })?;
    serde_json::from_str(&text)
        .map_err(|e| ModelDirError::Malformed { path: path.into(), message: format!("invalid JSON: {e}") })
}

/// Checks the safetensors header before mapping, so a truncated or foreign file fails with
/// its name instead of deep inside a model constructor.
fn check_safetensors_header(path: &Path) -> Result<()> {
    use std::io::Read;
    let malformed = |message: String| ModelDirError::Malformed { path: path.into(), message };
    let mut file = std::fs::File::open(path).map_err(|e| malformed(e.to_string()))?;
    let file_len = file.metadata().map_err(|e| malformed(e.to_string()))?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|_| malformed("not a safetensors file (shorter than its header)".into()))?;
    let header_len = u64::from_le_bytes(len);
    if header_len == 0 || header_len.saturating_add(8) > file_len || header_len > 100 << 20 {
        return Err(malformed(format!("not a safetensors file (header length {header_len}, file {file_len} bytes)")));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(|e| malformed(e.to_string()))?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| malformed(format!("safetensors header is not JSON: {e}")))?;
    // The data section must hold every tensor the header promises.
    let data_len = file_len - 8 - header_len;
    for (name, info) in &header {
        if name == "__metadata__" {
            continue;
        }
        let end = info
            .get("data_offsets")
            .and_then(|o| o.get(1))
            .and_then(|v| v.as_u64())
            .ok_or_else(|| malformed(format!("tensor {name} has no data_offsets")))?;
        if end > data_len {
            return Err(malformed(format!(
                "truncated: tensor {name} ends at byte {end} of a {data_len}-byte data section"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefers_full_precision_and_falls_back_to_fp16_variant() {
        let dir = tempfile::tempdir().unwrap();
        let comp = dir.path().join("unet");
        std::fs::create_dir(&comp).unwrap();
        let c = ComponentDir::open(dir.path(), "unet").unwrap();
        assert!(matches!(c.weights(&["diffusion_pytorch_model"]), Err(ModelDirError::NoWeights { .. })));
        std::fs::write(comp.join("diffusion_pytorch_model.fp16.safetensors"), b"x").unwrap();
        assert!(c.weights(&["diffusion_pytorch_model"]).unwrap().ends_with("diffusion_pytorch_model.fp16.safetensors"));
        std::fs::write(comp.join("diffusion_pytorch_model.safetensors"), b"x").unwrap();
        assert!(c.weights(&["diffusion_pytorch_model"]).unwrap().ends_with("diffusion_pytorch_model.safetensors"));
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = ComponentDir::open(dir.path(), "vae").unwrap_err().to_string();
        assert!(err.contains("vae"), "{err}");
        std::fs::create_dir(dir.path().join("vae")).unwrap();
        let c = ComponentDir::open(dir.path(), "vae").unwrap();
        std::fs::write(dir.path().join("vae/config.json"), b"{not json").unwrap();
        let err = c.json::<serde_json::Value>("config.json").unwrap_err().to_string();
        assert!(err.contains("vae/config.json") && err.contains("invalid JSON"), "{err}");
        std::fs::write(dir.path().join("vae/diffusion_pytorch_model.safetensors"), b"garbage!garbage").unwrap();
        let err = c.var_builder(&["diffusion_pytorch_model"], DType::F32, &Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("diffusion_pytorch_model.safetensors") && err.contains("not a safetensors"), "{err}");
    }

    #[test]
    fn fingerprints_follow_names_bytes_dtype_and_build_not_paths() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        for dir in [&a, &b] {
            std::fs::write(dir.path().join("config.json"), b"{}").unwrap();
            std::fs::write(dir.path().join("model.safetensors"), vec![7u8; 1 << 20]).unwrap();
        }
        let files = |d: &tempfile::TempDir| vec![d.path().join("config.json"), d.path().join("model.safetensors")];
        let fp = |d: &tempfile::TempDir, dtype| fingerprint(&files(d), &Device::Cpu, dtype).unwrap();
        assert_eq!(fp(&a, DType::F32), fp(&b, DType::F32), "the same files elsewhere");
        assert_eq!(fp(&a, DType::F32).len(), 64);
        assert_ne!(fp(&a, DType::F32), fp(&a, DType::F16), "another dtype");
        let next_release = fingerprint_of_build(&files(&a), &Device::Cpu, DType::F32, "sdmesh 99.0.0").unwrap();
        assert_ne!(fp(&a, DType::F32), next_release, "another build");
        let mut bytes = vec![7u8; 1 << 20];
        bytes[123_456] = 8;
        std::fs::write(b.path().join("model.safetensors"), bytes).unwrap();
        assert_ne!(fp(&a, DType::F32), fp(&b, DType::F32), "one weight byte");
        let err = fingerprint(&[a.path().join("gone")], &Device::Cpu, DType::F32).unwrap_err().to_string();
        assert!(err.contains("gone"), "{err}");
    }
}
