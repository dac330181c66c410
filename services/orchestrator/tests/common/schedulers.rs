//! What the scheduler parity tests (schedulers*.rs) share.
// Each test binary includes this file and uses a subset of it.
#![allow(dead_code)]

use candle_core::Tensor;
use sdmesh_orchestrator::noise::{NoiseSource, RecordedNoise};
use sdmesh_orchestrator::scheduler::{SchedulerConfig, SchedulerRequest};
use serde_json::Value;

/// A committed tiny model's scheduler/scheduler_config.json.
pub fn model_config(model: &str) -> SchedulerConfig {
    let path = sdmesh_testkit::model(model).join("scheduler").join("scheduler_config.json");
    SchedulerConfig::from_file(&path).expect("scheduler config")
}

/// A request naming a scheduler, everything else default.
pub fn req(name: &str) -> SchedulerRequest {
    SchedulerRequest { name: name.into(), ..Default::default() }
}

pub fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().expect("array").iter().map(|v| v.as_f64().expect("number")).collect()
}

pub fn rel_err(a: f64, e: f64) -> f64 {
    (a - e).abs() / e.abs().max(f64::MIN_POSITIVE)
}

/// Replays recorded draws and counts them.
pub struct CountingNoise {
    pub inner: RecordedNoise,
    pub draws: usize,
}

impl NoiseSource for CountingNoise {
    fn randn(&mut self, shape: &[usize]) -> candle_core::Result<Tensor> {
        self.draws += 1;
        self.inner.randn(shape)
    }
}
