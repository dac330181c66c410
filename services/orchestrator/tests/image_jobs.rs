//! End-to-end parity with diffusers' StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
//! (9-channel UNet, and the 4-channel fallback that blends) and StableDiffusionDepth2ImgPipeline
//! (tests/fixtures/reference-jobs, made by generate_jobs.py): the real components in one
//! process, the committed input PNGs, the reference's draws replayed (`noise_k`, in draw order:
//! VAE samples and starting noise) or, for the `seed_` cases, drawn from the seed as diffusers
//! draws them; every step's latents and the final image compared.

mod common;

use candle_core::Tensor;
use common::{request, run_and_check_case, Pipelines};
use sdmesh_orchestrator::noise::SeededNoise;
use sdmesh_proto::v1;
use sdmesh_testkit::{fixtures, load_fixture_json, load_fixture_tensors};

fn input(name: &str) -> bytes::Bytes {
    std::fs::read(fixtures().join("reference-jobs/inputs").join(name)).unwrap().into()
}

/// The request a job case describes: the txt2img fields plus image, mask, strength, task.
fn job_request(case: &serde_json::Value, r: &std::collections::HashMap<String, Tensor>) -> v1::GenerateRequest {
    let task = match case["job"].as_str().unwrap() {
        "img2img" => v1::Task::Img2img,
        "inpaint" => v1::Task::Inpaint,
        _ => v1::Task::Depth2img,
    };
    v1::GenerateRequest {
        task: task.into(),
        image: input(case["image"].as_str().unwrap()),
        mask: case["mask"].as_str().map(input).unwrap_or_default(),
        strength: Some(case["strength"].as_f64().unwrap() as f32),
        depth_map: case["depth_map_given"]
            .as_bool()
            .unwrap()
            .then(|| v1::Tensor::from_candle(&r["depth_map_input"]).unwrap()),
        ..request(case, None)
    }
}

async fn run_cases(filter: impl Fn(&serde_json::Value) -> bool) -> Vec<String> {
    let cases = load_fixture_json("reference-jobs/cases.json");
    let mut pipelines = Pipelines::default();
    let mut report = Vec::new();
    let mut ran = 0;
    for case in cases.as_array().unwrap().iter().filter(|c| filter(c)) {
        let name = case["name"].as_str().unwrap();
        let pipeline = pipelines.get(case["model"].as_str().unwrap()).await;
        let r = load_fixture_tensors(&format!("reference-jobs/cases/{name}.safetensors"));
        let mut req = job_request(case, &r);
        let seeded = case["seed"].as_u64();
        if seeded.is_none() {
            req.seed = Some(0);
        }
        let job = pipeline.validate(&req).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            (job.height, job.width),
            (case["height"].as_u64().unwrap() as usize, case["width"].as_u64().unwrap() as usize)
        );
        run_and_check_case(pipeline, &job, case, &r, &mut report).await;
        ran += 1;
    }
    assert!(ran > 0, "no case ran");
    report
}

#[tokio::test]
async fn img2img_matches_diffusers() {
    let report = run_cases(|c| c["job"] == "img2img").await;
    println!("{}", report.join("\n"));
}

#[tokio::test]
async fn inpainting_matches_diffusers() {
    let report = run_cases(|c| c["job"] == "inpaint").await;
    println!("{}", report.join("\n"));
}

#[tokio::test]
async fn depth2img_with_a_given_depth_map_matches_diffusers() {
    let report = run_cases(|c| c["job"] == "depth" && c["depth_map_given"] == true).await;
    println!("{}", report.join("\n"));
}

/// A valid small request for `task` on 64x64 inputs.
fn small(task: v1::Task) -> v1::GenerateRequest {
    v1::GenerateRequest {
        prompt: "a red cube".into(),
        steps: Some(4),
        seed: Some(1),
        task: task.into(),
        image: input("img64.png"),
        mask: if task == v1::Task::Inpaint { input("mask64.png") } else { Default::default() },
        ..Default::default()
    }
}

fn expect_error(
    pipeline: &sdmesh_orchestrator::pipeline::Pipeline,
    what: &str,
    r: v1::GenerateRequest,
    code: tonic::Code,
    needle: &str,
) {
    let err = pipeline.validate(&r).err().unwrap_or_else(|| panic!("{what}: accepted"));
    assert_eq!(err.code(), code, "{what}: {err}");
    assert!(err.to_string().contains(needle), "{what}: {err:?} does not mention {needle:?}");
}

#[tokio::test]
async fn bad_image_job_requests_say_why() {
    use tonic::Code::{FailedPrecondition, InvalidArgument};
    let mut pipelines = Pipelines::default();
    let txt2img_model = pipelines.get("sd21-tiny").await.clone();
    let p = &txt2img_model;
    let garbage = bytes::Bytes::from_static(b"GIF89a not really an image");
    expect_error(
        p,
        "undecodable image",
        v1::GenerateRequest { image: garbage.clone(), ..small(v1::Task::Img2img) },
        InvalidArgument,
        "image",
    );
    let truncated = input("img64.png").slice(..60);
    expect_error(
        p,
        "truncated image",
        v1::GenerateRequest { image: truncated, ..small(v1::Task::Img2img) },
        InvalidArgument,
        "image",
    );
    expect_error(
        p,
        "undecodable mask",
        v1::GenerateRequest { mask: garbage, ..small(v1::Task::Inpaint) },
        InvalidArgument,
        "mask",
    );
    expect_error(
        p,
        "mask of another size",
        v1::GenerateRequest { mask: input("mask48x64.png"), ..small(v1::Task::Inpaint) },
        InvalidArgument,
        "mask: 64x48",
    );
    expect_error(
        p,
        "inpainting without a mask",
        v1::GenerateRequest { mask: Default::default(), ..small(v1::Task::Inpaint) },
        InvalidArgument,
        "mask",
    );
    expect_error(
        p,
        "img2img without an image",
        v1::GenerateRequest { image: Default::default(), ..small(v1::Task::Img2img) },
        InvalidArgument,
        "image",
    );
    expect_error(
        p,
        "a mask on img2img",
        v1::GenerateRequest { mask: input("mask64.png"), ..small(v1::Task::Img2img) },
        InvalidArgument,
        "mask",
    );
    expect_error(p, "an image on txt2img", small(v1::Task::Txt2img), InvalidArgument, "not txt2img");
    for strength in [0.0, -0.1, 1.5, f32::NAN] {
        expect_error(
            p,
            "strength",
            v1::GenerateRequest { strength: Some(strength), ..small(v1::Task::Img2img) },
            InvalidArgument,
            "strength",
        );
    }
    // int(4 * 0.2) = 0 steps to run.
    expect_error(
        p,
        "strength too low for the steps",
        v1::GenerateRequest { strength: Some(0.2), ..small(v1::Task::Img2img) },
        InvalidArgument,
        "runs no step",
    );
    expect_error(
        p,
        "depth2img on a txt2img checkpoint",
        small(v1::Task::Depth2img),
        FailedPrecondition,
        "not possible with this model",
    );
    expect_error(
        p,
        "init_latents with an image",
        v1::GenerateRequest {
            init_latents: Some(
                v1::Tensor::from_candle(
                    &Tensor::zeros((1, 4, 8, 8), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
                )
                .unwrap(),
            ),
            ..small(v1::Task::Img2img)
        },
        InvalidArgument,
        "init_latents",
    );
    expect_error(
        p,
        "an image larger than max_side",
        v1::GenerateRequest { height: Some(4096), ..small(v1::Task::Img2img) },
        InvalidArgument,
        "height",
    );

    let inpaint_model = pipelines.get("sd2-inpaint-tiny").await.clone();
    expect_error(
        &inpaint_model,
        "img2img on an inpainting checkpoint",
        small(v1::Task::Img2img),
        FailedPrecondition,
        "inpainting checkpoint",
    );
    expect_error(
        &inpaint_model,
        "txt2img on an inpainting checkpoint",
        v1::GenerateRequest { prompt: "x".into(), ..Default::default() },
        FailedPrecondition,
        "inpainting checkpoint",
    );
    let depth_model = pipelines.get("sd2-depth-tiny").await.clone();
    expect_error(
        &depth_model,
        "inpainting on a depth checkpoint",
        small(v1::Task::Inpaint),
        FailedPrecondition,
        "depth checkpoint",
    );
    let mut no_estimator = depth_model.clone();
    no_estimator.depth = None;
    expect_error(
        &no_estimator,
        "depth2img with no depth service or map",
        small(v1::Task::Depth2img),
        FailedPrecondition,
        "depth service",
    );
    let bad_map = v1::Tensor::from_candle(
        &Tensor::zeros((1, 1, 2, 2), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
    )
    .unwrap();
    expect_error(
        &no_estimator,
        "a depth map of the wrong rank",
        v1::GenerateRequest { depth_map: Some(bad_map), ..small(v1::Task::Depth2img) },
        InvalidArgument,
        "depth_map",
    );
}

/// An unspecified task is inferred from what the request carries and the checkpoint.
#[tokio::test]
async fn the_task_is_inferred() {
    use sdmesh_orchestrator::image_job::Task;
    let mut pipelines = Pipelines::default();
    let p = pipelines.get("sd21-tiny").await.clone();
    let job = |r: v1::GenerateRequest| p.validate(&v1::GenerateRequest { task: 0, ..r }).unwrap().task;
    assert_eq!(job(small(v1::Task::Img2img)), Task::Img2Img);
    assert_eq!(job(small(v1::Task::Inpaint)), Task::Inpaint);
    assert_eq!(job(v1::GenerateRequest { prompt: "x".into(), ..Default::default() }), Task::Txt2Img);
    let depth = pipelines.get("sd2-depth-tiny").await.clone();
    assert_eq!(
        depth.validate(&v1::GenerateRequest { task: 0, ..small(v1::Task::Img2img) }).unwrap().task,
        Task::Depth2Img
    );
}

/// RGBA (alpha dropped, as PIL's convert("RGB")), greyscale and JPEG inputs are accepted; the
/// RGBA version of an image gives the same picture as the RGB one.
#[tokio::test]
async fn rgba_grey_and_jpeg_inputs_work() {
    let mut pipelines = Pipelines::default();
    let p = pipelines.get("sd21-tiny").await.clone();
    let run = |image: &str| {
        let p = p.clone();
        let r = v1::GenerateRequest { image: input(image), ..small(v1::Task::Img2img) };
        async move {
            let job = p.validate(&r).unwrap();
            let mut noise = SeededNoise::new(1);
            p.run(&job, &mut noise, &mut |_| true).await.unwrap().images
        }
    };
    let rgb = run("img64.png").await;
    let rgba = run("img64_rgba.png").await;
    assert_eq!(sdmesh_testkit::max_abs_diff(&rgb, &rgba).0, 0.0);
    for other in ["img64_grey.png", "img64.jpg"] {
        let out = run(other).await;
        assert_eq!(out.dims(), &[1, 64, 64, 3], "{other}");
    }
}

/// depth2img with the depth estimated by the DPT-hybrid model in the checkpoint's folder.
#[tokio::test]
async fn depth2img_with_the_estimator_matches_diffusers() {
    let report = run_cases(|c| c["job"] == "depth" && c["depth_map_given"] == false).await;
    println!("{}", report.join("\n"));
}
