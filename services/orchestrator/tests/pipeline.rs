//! End-to-end parity with diffusers' StableDiffusionPipeline (tests/fixtures/reference/cases):
//! the real components in one process, the reference's initial latents and eta noise replayed,
//! every step's latents and the final image compared.

mod common;

use common::{check_case, recorder, request, Pipelines, LATENT_REL_TOL};
use sdmesh_orchestrator::noise::RecordedNoise;
use sdmesh_testkit::{load_json, load_tensors};

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
        let job = pipeline.validate(&request(case, Some(&r["init_latents"]))).unwrap();
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
