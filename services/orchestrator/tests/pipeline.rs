//! End-to-end parity with diffusers' StableDiffusionPipeline (tests/fixtures/reference/cases):
//! the real components in one process, the reference's initial latents and eta noise replayed,
//! every step's latents and the final image compared.

mod common;

use common::{check_case, recorder, Pipelines, LATENT_REL_TOL};
use sdmesh_orchestrator::noise::RecordedNoise;
use sdmesh_proto::v1;
use sdmesh_testkit::{load_json, load_tensors};

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
    let mut pipelines = Pipelines::default();
    let mut report = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let pipeline = pipelines.get(case["model"].as_str().unwrap()).await;
        let r = load_tensors(&format!("cases/{name}.safetensors"));
        let job = pipeline.validate(&request(case, &r["init_latents"])).unwrap();
        let eta_noise = (0..job.steps).filter_map(|i| r.get(&format!("eta_noise_{i}")).cloned());
        let mut seen = Vec::new();
        let out = pipeline.run(&job, &mut RecordedNoise::new(eta_noise), &mut recorder(&mut seen)).await.unwrap();
        check_case(name, &seen, &out.images, &r, 0.0, LATENT_REL_TOL, &mut report);
        let prompt_words = case["prompt"].as_str().unwrap().split_whitespace().count();
        if prompt_words > 75 {
            assert!(out.warnings.iter().any(|w| w.contains("truncated")), "{name}: {:?}", out.warnings);
        }
    }
    println!("{}", report.join("\n"));
}
