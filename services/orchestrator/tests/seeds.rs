//! Seeds compatible with diffusers (tests/fixtures/reference-seeds, made by generate_seeds.py):
//! `SeededNoise::new(seed)` draws exactly what `torch.randn(shape,
//! generator=torch.Generator("cpu").manual_seed(seed))` does, bit for bit, and a job given only a
//! seed reproduces diffusers' StableDiffusionPipeline run with that generator.

mod common;

use candle_core::Tensor;
use common::{check_case, recorder, request, Pipelines, LATENT_REL_TOL};
use sdmesh_orchestrator::noise::{NoiseSource, SeededNoise};
use sdmesh_testkit::{load_fixture_json, load_fixture_tensors};
use std::collections::HashMap;

fn load_json(rel: &str) -> serde_json::Value {
    load_fixture_json(&format!("reference-seeds/{rel}"))
}

fn load_tensors(rel: &str) -> HashMap<String, Tensor> {
    load_fixture_tensors(&format!("reference-seeds/{rel}"))
}

fn shape_of(v: &serde_json::Value) -> Vec<usize> {
    v.as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Exact equality of the bits (so -0 vs +0 or NaN payloads would count), naming the first mismatch.
fn assert_bits_equal(what: &str, actual: &Tensor, expected: &Tensor) {
    assert_eq!(actual.dims(), expected.dims(), "{what}: shape");
    let (a, e) = (flat(actual), flat(expected));
    if let Some(i) = a.iter().zip(&e).position(|(x, y)| x.to_bits() != y.to_bits()) {
        let mismatches = a.iter().zip(&e).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
        panic!(
            "{what}: first mismatch at flat index {i} of {}: got {:e} ({:#010x}), torch {:e} ({:#010x}); {mismatches} mismatches",
            a.len(),
            a[i],
            a[i].to_bits(),
            e[i],
            e[i].to_bits()
        );
    }
}

#[test]
fn randn_equals_torch_bit_for_bit() {
    let spec = load_json("randn.json");
    let t = load_tensors("randn.safetensors");
    let mut checked = 0;
    for single in spec["singles"].as_array().unwrap() {
        let seed = single["seed"].as_u64().unwrap();
        let shape = shape_of(&single["shape"]);
        let key = single["key"].as_str().unwrap();
        let got = SeededNoise::new(seed).randn(&shape).unwrap();
        assert_bits_equal(&format!("seed {seed} shape {shape:?}"), &got, &t[key]);
        checked += shape.iter().product::<usize>();
    }
    assert!(spec["singles"].as_array().unwrap().len() >= 60);
    for seq in spec["sequences"].as_array().unwrap() {
        let seed = seq["seed"].as_u64().unwrap();
        let mut noise = SeededNoise::new(seed);
        for (i, (shape, key)) in
            seq["shapes"].as_array().unwrap().iter().zip(seq["keys"].as_array().unwrap()).enumerate()
        {
            let shape = shape_of(shape);
            let got = noise.randn(&shape).unwrap();
            assert_bits_equal(
                &format!("seed {seed}, draw {i} {shape:?} of a sequence"),
                &got,
                &t[key.as_str().unwrap()],
            );
            checked += shape.iter().product::<usize>();
        }
    }
    println!("{checked} values equal to torch's bit for bit");
}

/// The by-seed cases (tests/fixtures/reference-seeds/cases.json), all checked.
const CASES: &[&str] =
    &["seed_sd21_ddim", "seed_base_ddim_eta_two_images", "seed_sd21_dpmpp2m_nonsquare", "seed_sd21_euler_ancestral"];

#[tokio::test]
async fn same_seed_same_image_as_diffusers() {
    let cases = load_json("cases.json");
    let cases: HashMap<&str, &serde_json::Value> =
        cases.as_array().unwrap().iter().map(|c| (c["name"].as_str().unwrap(), c)).collect();
    let mut pipelines = Pipelines::default();
    let mut report = Vec::new();
    for &name in CASES {
        let case = cases.get(name).unwrap_or_else(|| panic!("{name} missing from reference-seeds/cases.json"));
        let pipeline = pipelines.get(case["model"].as_str().unwrap()).await;
        let r = load_tensors(&format!("cases/{name}.safetensors"));
        let job = pipeline.validate(&request(case, None)).unwrap();
        assert!(job.init_latents.is_none());
        let seed = case["seed"].as_u64().unwrap();
        assert_eq!(job.seed, seed);
        // The first draw is the pipeline's initial noise, exactly.
        let init = SeededNoise::new(seed).randn(r["init_noise"].dims()).unwrap();
        assert_bits_equal(&format!("{name} initial noise"), &init, &r["init_noise"]);
        let mut seen = Vec::new();
        let out = pipeline.run(&job, &mut SeededNoise::new(job.seed), &mut recorder(&mut seen)).await.unwrap();
        check_case(name, &seen, &out.images, &r, 0.0, LATENT_REL_TOL, &mut report);
    }
    println!("{}", report.join("\n"));
}
