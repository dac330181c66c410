//! End-to-end parity with diffusers' StableDiffusionPipeline for the schedulers beyond DDIM /
//! DPM-Solver++ (tests/fixtures/reference-schedulers/cases, made by generate_schedulers.py): the
//! real components in one process, the reference's initial latents and the stochastic
//! schedulers' noise (`noise_k`, in draw order) replayed, every step's latents and the final
//! image compared. Structured like tests/pipeline.rs.

use candle_core::{Device, Tensor};
use sdmesh_orchestrator::noise::RecordedNoise;
use sdmesh_orchestrator::pipeline::{Limits, Pipeline};
use sdmesh_proto::v1;
use sdmesh_testkit::{assert_close, fixtures, max_abs_diff, model};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

fn load_json(rel: &str) -> serde_json::Value {
    let path = fixtures().join("reference-schedulers").join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn load_tensors(rel: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join("reference-schedulers").join(rel);
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

async fn local_pipeline(name: &str) -> Pipeline {
    let dir = model(name);
    let te = sdmesh_text_encoder::LocalTextEncoder::load(&sdmesh_text_encoder::TextEncoderOptions {
        model: dir.clone(),
        device: Device::Cpu,
        queue_capacity: 8,
    })
    .unwrap();
    let unet = sdmesh_unet::LocalUnet::load(&sdmesh_unet::UnetOptions { model: dir.clone(), device: Device::Cpu, queue_capacity: 8 }).unwrap();
    let vae = sdmesh_vae::LocalVae::load(&sdmesh_vae::VaeOptions { model: dir.clone(), device: Device::Cpu, queue_capacity: 8 }).unwrap();
    sdmesh_orchestrator::pipeline_over(&dir, Arc::new(te), Arc::new(unet), Arc::new(vae), Limits::default(), Duration::from_secs(1))
        .await
        .unwrap()
}

/// The request a case describes (by the scheduler's short name), with the reference's initial latents.
fn request(case: &serde_json::Value, init: &Tensor) -> v1::GenerateRequest {
    v1::GenerateRequest {
        prompt: case["prompt"].as_str().unwrap().into(),
        negative_prompt: case["negative_prompt"].as_str().unwrap_or("").into(),
        steps: Some(case["steps"].as_u64().unwrap() as u32),
        guidance_scale: Some(case["guidance_scale"].as_f64().unwrap() as f32),
        guidance_rescale: 0.0,
        seed: Some(0),
        height: Some(case["height"].as_u64().unwrap() as u32),
        width: Some(case["width"].as_u64().unwrap() as u32),
        num_images: Some(1),
        scheduler: Some(v1::SchedulerOptions {
            name: case["short_name"].as_str().unwrap().into(),
            eta: None,
            use_karras_sigmas: None,
        }),
        init_latents: Some(v1::Tensor::from_candle(init).unwrap()),
        return_array: true,
    }
}

#[tokio::test]
async fn every_scheduler_case_matches_diffusers() {
    let cases = load_json("cases.json");
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 5);
    let mut pipelines = HashMap::new();
    let mut report = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let model_name = case["model"].as_str().unwrap().to_string();
        if !pipelines.contains_key(&model_name) {
            pipelines.insert(model_name.clone(), local_pipeline(&model_name).await);
        }
        let pipeline = &pipelines[&model_name];
        let r = load_tensors(&format!("cases/{name}.safetensors"));
        let job = pipeline.validate(&request(case, &r["init_latents"])).unwrap();
        assert_eq!(job.scheduler.kind.class_name(), case["scheduler"].as_str().unwrap(), "{name}: scheduler");
        let draws = case["noise_draws"].as_u64().unwrap() as usize;
        let recorded: Vec<Tensor> = (0..draws).map(|k| r[&format!("noise_{k}")].clone()).collect();
        let mut noise = RecordedNoise::new(recorded);
        let mut seen = Vec::new();
        let out = pipeline
            .run(&job, &mut noise, &mut |p| {
                seen.push((p.timestep, p.latents));
                true
            })
            .await
            .unwrap();
        // Every recorded draw was used: one more must fail.
        assert!(
            sdmesh_orchestrator::noise::NoiseSource::randn(&mut noise, &[1]).is_err(),
            "{name}: fewer noise draws than diffusers' {draws}"
        );
        let timesteps = r["timesteps"].to_vec1::<f32>().unwrap();
        assert_eq!(seen.len(), timesteps.len(), "{name}: step count");
        for (i, (t, latents)) in seen.iter().enumerate() {
            // Timesteps from `_sigma_to_t` (Karras, KDPM2 midpoints) can be off by an f32 ulp or two
            // (numpy's float32 log); KDPM2 ancestral's midpoints more (see schedulers_more.rs).
            let tol = if name.contains("kdpm2_a") {
                0.02
            } else if name.contains("karras") || name.contains("kdpm2") {
                1e-3
            } else {
                0.0
            };
            let t_ok = *t as f32 == timesteps[i] || (*t - f64::from(timesteps[i])).abs() <= tol;
            assert!(t_ok, "{name}: timestep {i}: {t} vs {}", timesteps[i]);
            // As tests/pipeline.rs: relative to the latents' scale (float32 rounding in UNet and scheduler).
            let expected = &r[&format!("latents_{i}")];
            let scale = expected.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1.0);
            report.push(format!("{name} step {i}: {:e} (scale {scale})", max_abs_diff(latents, expected).0));
            assert_close(&format!("{name} latents after step {i}"), latents, expected, 2.5e-4 * scale);
        }
        assert_close(&format!("{name} image"), &out.images, &r["image"], 1e-3);
        report.push(format!("{name}: image max abs error {:e}", max_abs_diff(&out.images, &r["image"]).0));
    }
    println!("{}", report.join("\n"));
}
