//! What the end-to-end parity tests share: the real components in one process, and the
//! comparison of a run's steps and image with a diffusers reference case.
#![allow(dead_code)] // each test file uses a part

use candle_core::{Device, Tensor};
use sdmesh_orchestrator::pipeline::{Limits, Pipeline, StepProgress};
use sdmesh_proto::v1;
use sdmesh_testkit::{assert_close, max_abs_diff, model};
use std::collections::HashMap;

/// The committed tiny model `name` with local text encoder, UNet and VAE.
pub async fn local_pipeline(name: &str) -> Pipeline {
    sdmesh_orchestrator::local_pipeline(&model(name), &Device::Cpu, candle_core::DType::F32, 8, Limits::default())
        .await
        .unwrap()
}

/// One pipeline per model, loaded on first use.
#[derive(Default)]
pub struct Pipelines(HashMap<String, Pipeline>);

impl Pipelines {
    pub async fn get(&mut self, name: &str) -> &Pipeline {
        if !self.0.contains_key(name) {
            self.0.insert(name.to_string(), local_pipeline(name).await);
        }
        &self.0[name]
    }
}

/// Collects every step's (timestep, latents) through the progress callback.
pub fn recorder(seen: &mut Vec<(f64, Tensor)>) -> impl FnMut(StepProgress) -> bool + Send + '_ {
    move |p| {
        seen.push((p.timestep, p.latents));
        true
    }
}

/// The usual bound on a step's latents, relative to their scale: float32 rounding in UNet and
/// scheduler (latents reach |x| ~ 50 with the random epsilon UNet).
pub const LATENT_REL_TOL: f32 = 2.5e-4;

/// Compares a run with reference case tensors `r` (`timesteps`, `latents_i`, `image`):
/// timesteps within `timestep_tol` (0 = exact as f32), each step's latents within
/// `latent_rel_tol` of their scale, the image within 1e-3. Appends the errors to `report`.
pub fn check_case(
    name: &str,
    seen: &[(f64, Tensor)],
    images: &Tensor,
    r: &HashMap<String, Tensor>,
    timestep_tol: f64,
    latent_rel_tol: f32,
    report: &mut Vec<String>,
) {
    let timesteps = r["timesteps"].to_vec1::<f32>().unwrap();
    assert_eq!(seen.len(), timesteps.len(), "{name}: step count");
    for (i, (t, latents)) in seen.iter().enumerate() {
        let t_ok = *t as f32 == timesteps[i] || (*t - f64::from(timesteps[i])).abs() <= timestep_tol;
        assert!(t_ok, "{name}: timestep {i}: {t} vs {}", timesteps[i]);
        let expected = &r[&format!("latents_{i}")];
        let scale = expected.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1.0);
        report.push(format!("{name} step {i}: {:e} (scale {scale})", max_abs_diff(latents, expected).0));
        assert_close(&format!("{name} latents after step {i}"), latents, expected, latent_rel_tol * scale);
    }
    assert_close(&format!("{name} image"), images, &r["image"], 1e-3);
    report.push(format!("{name}: image max abs error {:e}", max_abs_diff(images, &r["image"]).0));
}

/// Runs a validated job as reference case `case` ran: by its `seed` when it has one (the real
/// draws), else replaying its recorded `noise_k` draws (and checking every one was used); then
/// compares steps and image with [`check_case`] at the usual tolerances.
pub async fn run_and_check_case(
    pipeline: &Pipeline,
    job: &sdmesh_orchestrator::pipeline::Job,
    case: &serde_json::Value,
    r: &HashMap<String, Tensor>,
    report: &mut Vec<String>,
) {
    use sdmesh_orchestrator::noise::{NoiseSource, RecordedNoise, SeededNoise};
    let name = case["name"].as_str().unwrap();
    let mut seen = Vec::new();
    let out = match case["seed"].as_u64() {
        Some(seed) => pipeline.run(job, &mut SeededNoise::new(seed), &mut recorder(&mut seen)).await,
        None => {
            let draws = case["noise_draws"].as_u64().unwrap() as usize;
            let mut noise = RecordedNoise::new((0..draws).map(|k| r[&format!("noise_{k}")].clone()));
            let out = pipeline.run(job, &mut noise, &mut recorder(&mut seen)).await;
            assert!(noise.randn(&[1]).is_err(), "{name}: fewer draws than diffusers' {draws}");
            out
        }
    }
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    check_case(name, &seen, &out.images, r, 0.0, LATENT_REL_TOL, report);
}

/// The request a reference case describes. The scheduler is the case's `short_name` when it has
/// one (which also says Karras), else its diffusers class name with `scheduler_kwargs`'
/// `use_karras_sigmas`; absent `guidance_rescale`, `eta`, `num_images_per_prompt`, `seed` take
/// the pipeline's defaults (seed 0). `init` is the reference's initial latents, if it gave any.
pub fn request(case: &serde_json::Value, init: Option<&Tensor>) -> v1::GenerateRequest {
    let num = |key: &str| case.get(key).and_then(|v| v.as_f64());
    let (name, use_karras_sigmas) = match case.get("short_name").and_then(|v| v.as_str()) {
        Some(short) => (short, None),
        None => (
            case["scheduler"].as_str().unwrap(),
            case["scheduler_kwargs"].get("use_karras_sigmas").and_then(|v| v.as_bool()),
        ),
    };
    v1::GenerateRequest {
        prompt: case["prompt"].as_str().unwrap().into(),
        negative_prompt: case["negative_prompt"].as_str().unwrap_or("").into(),
        steps: Some(case["steps"].as_u64().unwrap() as u32),
        guidance_scale: Some(case["guidance_scale"].as_f64().unwrap() as f32),
        guidance_rescale: num("guidance_rescale").unwrap_or(0.0) as f32,
        seed: Some(case.get("seed").and_then(|v| v.as_u64()).unwrap_or(0)),
        height: Some(case["height"].as_u64().unwrap() as u32),
        width: Some(case["width"].as_u64().unwrap() as u32),
        num_images: Some(num("num_images_per_prompt").unwrap_or(1.0) as u32),
        scheduler: Some(v1::SchedulerOptions {
            name: name.into(),
            eta: num("eta").filter(|e| *e > 0.0).map(|e| e as f32),
            use_karras_sigmas,
        }),
        init_latents: init.map(|t| v1::Tensor::from_candle(t).unwrap()),
        return_array: true,
        ..Default::default()
    }
}
