//! Several models behind one orchestrator: a platform offers SD 2.1 (768-v), 2.1-base, the
//! inpainting, depth and upscaler checkpoints at one address, and each request names the model
//! it wants (`GenerateRequest.model`). Each model has its own unet and vae services (the text
//! encoder, OpenCLIP ViT-H in every SD 2.x checkpoint, can be one pool for all), and so its own
//! admission: `--max-jobs`, `--max-waiting-jobs` and `--max-jobs-per-tenant` hold per model
//! (a file entry may set its own), so a flood of one model's jobs never keeps another model's
//! pool idle. The fleet-wide tenant quota, the safety checker and the chained upscaler are
//! shared.
//!
//! The default model comes from `--model` and the service flags; the others from a TOML file
//! (`--models-file`):
//!
//! ```toml
//! [[models]]
//! name = "sd2-inpaint"                 # what requests call it (default: the folder's name)
//! model = "/models/sd2-inpaint"        # its diffusers folder (the orchestrator reads scheduler/)
//! unet_url = "dns:///sdmesh-unet-inpaint:50051"
//! vae_url = "dns:///sdmesh-vae-inpaint:50051"
//! # text_encoder_url = "..."           # default: --text-encoder-url
//! # depth_url = "..."                  # depth2img checkpoints: the depth service
//! # max_jobs = 16                      # this model's own job limits (default: the flags')
//! # max_waiting_jobs = 64
//! # max_jobs_per_tenant = 4
//! ```

use crate::admission::{Admission, JobLimits};
use crate::image_job::Task;
use crate::pipeline::Pipeline;
use anyhow::Context;
use sdmesh_core::{Error, Result};
use sdmesh_proto::v1;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One model besides the default, and its services (URLs as --text-encoder-url takes them).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelServices {
    /// What requests call it; default the folder's name.
    pub name: Option<String>,
    /// Its diffusers-layout folder.
    pub model: PathBuf,
    /// Default: the default model's text encoder (--text-encoder-url).
    pub text_encoder_url: Option<String>,
    pub unet_url: String,
    pub vae_url: String,
    /// The depth service, for a depth2img checkpoint.
    pub depth_url: Option<String>,
    /// This model's job limits, where they differ from --max-jobs, --max-waiting-jobs and
    /// --max-jobs-per-tenant.
    pub max_jobs: Option<usize>,
    pub max_waiting_jobs: Option<usize>,
    pub max_jobs_per_tenant: Option<usize>,
}

impl ModelServices {
    /// The name requests use.
    pub fn name(&self) -> String {
        self.name.clone().unwrap_or_else(|| crate::model_name(&self.model))
    }

    /// Its job limits: its own where set, else `defaults` (the flags').
    pub fn job_limits(&self, defaults: JobLimits) -> JobLimits {
        JobLimits {
            max_running: self.max_jobs.unwrap_or(defaults.max_running),
            max_waiting: self.max_waiting_jobs.unwrap_or(defaults.max_waiting),
            max_running_per_tenant: self.max_jobs_per_tenant.unwrap_or(defaults.max_running_per_tenant),
        }
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelsFile {
    #[serde(default)]
    models: Vec<ModelServices>,
}

/// The models of a `--models-file`.
pub fn read_models_file(path: &Path) -> anyhow::Result<Vec<ModelServices>> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let file: ModelsFile = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    for m in &file.models {
        let name = m.name();
        anyhow::ensure!(
            !name.is_empty() && name.len() <= 128,
            "{}: a model name must be 1 to 128 bytes (got {name:?})",
            path.display()
        );
    }
    Ok(file.models)
}

/// Checks that no two of `models` share a name (before any service is asked).
pub fn check_names(models: &[ModelServices]) -> anyhow::Result<()> {
    unique(models.iter().map(ModelServices::name))
}

fn unique(names: impl IntoIterator<Item = String>) -> anyhow::Result<()> {
    let mut seen = std::collections::BTreeSet::new();
    for name in names {
        anyhow::ensure!(
            !seen.contains(&name),
            "two models are named {name:?}: give one another name (name = \"...\" in --models-file)"
        );
        seen.insert(name);
    }
    Ok(())
}

/// A served model: its pipeline, and the admission of its jobs.
pub struct Served {
    pub pipeline: Pipeline,
    pub admission: Admission,
}

impl Served {
    pub fn new(pipeline: Pipeline, limits: JobLimits) -> Self {
        let admission = Admission::new(limits, &pipeline.model_name);
        Self { pipeline, admission }
    }
}

/// The models an orchestrator serves, by name; the default first.
pub struct Models {
    default: String,
    by_name: BTreeMap<String, Served>,
}

impl Models {
    /// One model.
    pub fn one(model: Served) -> Self {
        let name = model.pipeline.model_name.clone();
        Self { default: name.clone(), by_name: BTreeMap::from([(name, model)]) }
    }

    /// `models` (the first is the default), each under its `model_name`, which must differ.
    pub fn new(models: Vec<Served>) -> anyhow::Result<Self> {
        unique(models.iter().map(|m| m.pipeline.model_name.clone()))?;
        let default = models.first().map(|m| m.pipeline.model_name.clone()).context("no model to serve")?;
        let by_name = models.into_iter().map(|m| (m.pipeline.model_name.clone(), m)).collect();
        Ok(Self { default, by_name })
    }

    /// The model a request names; "" is the default. INVALID_ARGUMENT naming the served models
    /// for any other name.
    pub fn get(&self, name: &str) -> Result<&Served> {
        let name = if name.is_empty() { &self.default } else { name };
        self.by_name.get(name).ok_or_else(|| {
            Error::invalid(format!(
                "model: {name:?} is not served here; this orchestrator serves {} (default {:?})",
                self.by_name.keys().map(|k| format!("{k:?}")).collect::<Vec<_>>().join(", "),
                self.default
            ))
        })
    }

    /// What ListModels answers: the default model first, then the others by name.
    pub fn list(&self) -> v1::ListModelsResponse {
        let default = self.by_name.get(&self.default).map(|m| summary(&m.pipeline, true));
        let others =
            self.by_name.iter().filter(|(name, _)| **name != self.default).map(|(_, m)| summary(&m.pipeline, false));
        v1::ListModelsResponse { models: default.into_iter().chain(others).collect() }
    }
}

fn summary(pipeline: &Pipeline, is_default: bool) -> v1::ServedModel {
    let in_channels = pipeline.info.unet.in_channels;
    let tasks = [Task::Txt2Img, Task::Img2Img, Task::Inpaint, Task::Depth2Img, Task::Upscale]
        .into_iter()
        // A depth checkpoint without a depth service still takes the request's depth map.
        .filter(|&task| crate::image_job::check_model_can(task, in_channels, true, true).is_ok())
        .map(|task| task.name().to_string())
        .collect();
    // An upscaler's output size is four times its input image's.
    let side = match pipeline.upscaler {
        Some(_) => 0,
        None => pipeline.info.unet.sample_size * pipeline.info.vae.scale_factor,
    };
    v1::ServedModel {
        name: pipeline.model_name.clone(),
        is_default,
        tasks,
        native_height: side,
        native_width: side,
        prediction_type: pipeline.scheduler_config.prediction_type().as_str().to_string(),
        chains_upscale: pipeline.chained_upscaler.is_some(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> anyhow::Result<Vec<ModelServices>> {
        let path = std::env::temp_dir().join(format!("sdmesh-models-test-{}-{}.toml", std::process::id(), text.len()));
        std::fs::write(&path, text).unwrap();
        let models = read_models_file(&path);
        std::fs::remove_file(&path).unwrap();
        models
    }

    #[test]
    fn a_models_file_names_each_model_and_its_services() {
        let models = read(
            r#"
            [[models]]
            model = "/models/sd2-inpaint"
            unet_url = "dns:///unet-inpaint:50051"
            vae_url = "http://a:1,http://b:1"

            [[models]]
            name = "depth"
            model = "/models/sd2-depth"
            text_encoder_url = "http://te:1"
            unet_url = "http://u:1"
            vae_url = "http://v:1"
            depth_url = "http://d:1"
            max_jobs = 2
            max_jobs_per_tenant = 1
            "#,
        )
        .unwrap();
        assert_eq!(models.len(), 2);
        assert_eq!(models[0].name(), "sd2-inpaint", "the folder's name by default");
        assert_eq!(
            (models[0].text_encoder_url.as_deref(), models[0].vae_url.as_str()),
            (None, "http://a:1,http://b:1")
        );
        assert_eq!((models[1].name(), models[1].depth_url.as_deref()), ("depth".into(), Some("http://d:1")));
        let flags = JobLimits { max_running: 64, max_waiting: 256, max_running_per_tenant: 0 };
        assert_eq!(models[0].job_limits(flags), flags, "the flags' limits unless the entry says");
        let own = JobLimits { max_running: 2, max_waiting: 256, max_running_per_tenant: 1 };
        assert_eq!(models[1].job_limits(flags), own);
        assert!(read("").unwrap().is_empty());
        check_names(&models).unwrap();
        let twice = check_names(&[models.clone(), models[1..].to_vec()].concat()).unwrap_err().to_string();
        assert!(twice.contains("two models are named \"depth\""), "{twice}");
    }

    #[test]
    fn a_models_file_with_a_mistake_says_where() {
        let unknown = read("[[models]]\nmodel = \"/m\"\nunet_url = \"u\"\nvae_url = \"v\"\nunet = \"x\"\n");
        let unknown = unknown.unwrap_err().to_string();
        assert!(unknown.contains("unknown field `unet`"), "{unknown}");
        let missing = read("[[models]]\nmodel = \"/m\"\nunet_url = \"u\"\n").unwrap_err().to_string();
        assert!(missing.contains("missing field `vae_url`"), "{missing}");
        let empty = read("[[models]]\nname = \"\"\nmodel = \"/m\"\nunet_url = \"u\"\nvae_url = \"v\"\n");
        assert!(empty.unwrap_err().to_string().contains("1 to 128 bytes"));
    }
}
