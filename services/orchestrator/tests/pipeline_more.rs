//! End-to-end parity with diffusers' StableDiffusionPipeline for the schedulers beyond DDIM /
//! DPM-Solver++ (tests/fixtures/reference-schedulers/cases, made by generate_schedulers.py): the
//! real components in one process, the reference's initial latents and the stochastic
//! schedulers' noise (`noise_k`, in draw order) replayed, every step's latents and the final
//! image compared. Structured like tests/pipeline.rs.

mod common;

use candle_core::Tensor;
use common::{check_case, recorder, Pipelines, LATENT_REL_TOL};
use sdmesh_orchestrator::noise::{NoiseSource, RecordedNoise};
use sdmesh_proto::v1;
use sdmesh_testkit::{load_fixture_json, load_fixture_tensors};

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
    let cases = load_fixture_json("reference-schedulers/cases.json");
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 5);
    let mut pipelines = Pipelines::default();
    let mut report = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let pipeline = pipelines.get(case["model"].as_str().unwrap()).await;
        let r = load_fixture_tensors(&format!("reference-schedulers/cases/{name}.safetensors"));
        let job = pipeline.validate(&request(case, &r["init_latents"])).unwrap();
        assert_eq!(job.scheduler.kind.class_name(), case["scheduler"].as_str().unwrap(), "{name}: scheduler");
        let draws = case["noise_draws"].as_u64().unwrap() as usize;
        let mut noise = RecordedNoise::new((0..draws).map(|k| r[&format!("noise_{k}")].clone()));
        let mut seen = Vec::new();
        let out = pipeline.run(&job, &mut noise, &mut recorder(&mut seen)).await.unwrap();
        // Every recorded draw was used: one more must fail.
        assert!(noise.randn(&[1]).is_err(), "{name}: fewer noise draws than diffusers' {draws}");
        // Timesteps from `_sigma_to_t` (Karras, KDPM2 midpoints) can be off by an f32 ulp or two
        // (numpy's float32 log); KDPM2 ancestral's midpoints more (see schedulers_more.rs).
        let timestep_tol = if name.contains("kdpm2_a") {
            0.02
        } else if name.contains("karras") || name.contains("kdpm2") {
            1e-3
        } else {
            0.0
        };
        check_case(name, &seen, &out.images, &r, timestep_tol, LATENT_REL_TOL, &mut report);
    }
    println!("{}", report.join("\n"));
}
