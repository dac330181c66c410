//! End-to-end parity with diffusers' StableDiffusionPipeline (tests/fixtures/reference/cases):
//! the real components in one process, the reference's initial latents and eta noise replayed,
//! every step's latents and the final image compared.

use candle_core::Device;
use sdmesh_orchestrator::noise::RecordedNoise;
use sdmesh_orchestrator::pipeline::{Limits, Pipeline};
use sdmesh_proto::v1;
use sdmesh_testkit::{assert_close, load_json, load_tensors, max_abs_diff, model};
use std::sync::Arc;
use std::time::Duration;

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

/// The request a case describes, with the reference's initial latents.
fn request(case: &serde_json::Value, init: &candle_core::Tensor) -> v1::GenerateRequest {
    let kwargs = &case["scheduler_kwargs"];
    v1::GenerateRequest {
        prompt: case["prompt"].as_str().unwrap().into(),
        negative_prompt: case["negative_prompt"].as_str().unwrap_or("").into(),
        steps: Some(case["steps"].as_u64().unwrap() as u32),
        guidance_scale: Some(case["guidance_scale"].as_f64().unwrap() as f32),
        guidance_rescale: case["guidance_rescale"].as_f64().unwrap() as f32,
        seed: Some(0),
        height: Some(case["height"].as_u64().unwrap() as u32),
        width: Some(case["width"].as_u64().unwrap() as u32),
        num_images: Some(case["num_images_per_prompt"].as_u64().unwrap() as u32),
        scheduler: Some(v1::SchedulerOptions {
            name: case["scheduler"].as_str().unwrap().into(),
            eta: case["eta"].as_f64().filter(|e| *e > 0.0).map(|e| e as f32),
            use_karras_sigmas: kwargs.get("use_karras_sigmas").and_then(|v| v.as_bool()),
        }),
        init_latents: Some(v1::Tensor::from_candle(init).unwrap()),
        return_array: true,
    }
}

#[tokio::test]
async fn every_reference_case_matches_diffusers() {
    let cases = load_json("cases.json");
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 6);
    let mut pipelines = std::collections::HashMap::new();
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
        let steps = job.steps;
        let eta_noise = (0..steps).filter_map(|i| r.get(&format!("eta_noise_{i}")).cloned());
        let mut noise = RecordedNoise::new(eta_noise);
        let mut seen = Vec::new();
        let out = pipeline
            .run(&job, &mut noise, &mut |p| {
                seen.push((p.timestep, p.latents));
                true
            })
            .await
            .unwrap();
        let timesteps = r["timesteps"].to_vec1::<f32>().unwrap();
        assert_eq!(seen.len(), timesteps.len(), "{name}: step count");
        for (i, (t, latents)) in seen.iter().enumerate() {
            assert_eq!(*t as f32, timesteps[i], "{name}: timestep {i}");
            // Latents grow to |x| ~ 50 with the random epsilon UNet, so the bound is relative to their
            // scale; float32 rounding in UNet and scheduler gives ~1.3e-4 relative at worst.
            let expected = &r[&format!("latents_{i}")];
            let scale = expected.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1.0);
            report.push(format!("{name} step {i}: {:e} (scale {scale})", max_abs_diff(latents, expected).0));
            assert_close(&format!("{name} latents after step {i}"), latents, expected, 2.5e-4 * scale);
        }
        assert_close(&format!("{name} image"), &out.images, &r["image"], 1e-3);
        report.push(format!("{name}: image max abs error {:e}", max_abs_diff(&out.images, &r["image"]).0));
        let prompt_tokens = case["prompt"].as_str().unwrap().split_whitespace().count();
        if prompt_tokens > 75 {
            assert!(out.warnings.iter().any(|w| w.contains("truncated")), "{name}: {:?}", out.warnings);
        }
    }
    println!("{}", report.join("\n"));
}
