//! x4 upscaling against diffusers' StableDiffusionUpscalePipeline (tests/fixtures/reference-upscaler,
//! made by generate_upscaler.py): the real components in one process, the committed input
//! PNGs, the reference's draws replayed (the low-resolution image's noise, then the starting
//! latents) or drawn from the seed; every step's latents and the final image compared. One
//! case decodes with diffusers' `vae.enable_tiling()`, matched by the vae's tiled decode.

mod common;

use common::{request, run_and_check_case, Pipelines};
use sdmesh_orchestrator::noise::SeededNoise;
use sdmesh_proto::v1;
use sdmesh_testkit::{fixtures, load_fixture_json, load_fixture_tensors, model};
use std::sync::Arc;

fn input(name: &str) -> bytes::Bytes {
    std::fs::read(fixtures().join("reference-upscaler/inputs").join(name)).unwrap().into()
}

fn upscale_request(case: &serde_json::Value) -> v1::GenerateRequest {
    v1::GenerateRequest {
        task: v1::Task::Upscale.into(),
        image: input(case["image"].as_str().unwrap()),
        noise_level: Some(case["noise_level"].as_u64().unwrap() as u32),
        height: None,
        width: None,
        ..request(case, None)
    }
}

#[tokio::test]
async fn upscaling_matches_diffusers() {
    let cases = load_fixture_json("reference-upscaler/cases.json");
    let mut pipelines = Pipelines::default();
    let mut report = Vec::new();
    for case in cases.as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let mut pipeline = pipelines.get("sd2-upscaler-tiny").await.clone();
        if case["vae_tiling"].as_bool().unwrap() {
            // diffusers' enable_tiling() with this VAE's sample_size 32: tiles of 8 latents.
            let options = sdmesh_vae::VaeOptions {
                decode_tile_latents: 8,
                ..sdmesh_vae::VaeOptions::new(model("sd2-upscaler-tiny"), candle_core::Device::Cpu)
            };
            pipeline.vae = Arc::new(sdmesh_vae::LocalVae::load(&options).unwrap());
        }
        let r = load_fixture_tensors(&format!("reference-upscaler/cases/{name}.safetensors"));
        let mut req = upscale_request(case);
        req.seed = Some(case["seed"].as_u64().unwrap_or(0));
        let job = pipeline.validate(&req).unwrap_or_else(|e| panic!("{name}: {e}"));
        let expected_size = (case["height"].as_u64().unwrap() as usize, case["width"].as_u64().unwrap() as usize);
        assert_eq!((job.height, job.width), expected_size, "{name}: output size");
        run_and_check_case(&pipeline, &job, case, &r, &mut report).await;
    }
    println!("{}", report.join("\n"));
}

/// Defaults are diffusers' (75 steps, guidance 9, noise level 20), and bad upscale requests say
/// why: noise level above max_noise_level, images too small or whose x4 exceeds --max-side,
/// options that do not apply, and upscaling on a checkpoint that is not an upscaler.
#[tokio::test]
async fn upscale_defaults_and_bad_requests() {
    let mut pipelines = Pipelines::default();
    let p = pipelines.get("sd2-upscaler-tiny").await.clone();
    let base = v1::GenerateRequest { prompt: "a cat".into(), image: input("img16.png"), ..Default::default() };
    let job = p.validate(&base).unwrap();
    assert_eq!(job.task, sdmesh_orchestrator::image_job::Task::Upscale, "inferred from the checkpoint");
    assert_eq!((job.steps, job.guidance_scale, job.input.as_ref().unwrap().noise_level), (75, 9.0, 20));
    assert_eq!((job.height, job.width), (64, 64));
    let invalid = |r: v1::GenerateRequest, needle: &str| {
        let err = p.validate(&r).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{needle}: {err}");
        assert!(err.to_string().contains(needle), "{err:?} does not mention {needle:?}");
    };
    invalid(v1::GenerateRequest { noise_level: Some(351), ..base.clone() }, "noise_level: 351");
    invalid(v1::GenerateRequest { height: Some(64), ..base.clone() }, "do not apply to upscaling");
    invalid(v1::GenerateRequest { strength: Some(0.5), ..base.clone() }, "do not apply to upscaling");
    invalid(v1::GenerateRequest { preview_every: 5, ..base.clone() }, "preview_every");
    let tiny = sdmesh_core::images::encode_png_rgb8(&image::RgbImage::new(6, 20)).unwrap();
    invalid(v1::GenerateRequest { image: tiny.into(), ..base.clone() }, "too small");
    let mut small_limits = p.clone();
    small_limits.limits.max_side = 32;
    let err = small_limits.validate(&base).unwrap_err();
    assert!(err.to_string().contains("upscales to 64x64"), "{err}");
    // txt2img on the upscaler, and upscaling on a txt2img checkpoint.
    let err = p.validate(&v1::GenerateRequest { prompt: "x".into(), ..Default::default() }).unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    let sd = pipelines.get("sd21-tiny").await.clone();
    let err = sd.validate(&v1::GenerateRequest { task: v1::Task::Upscale.into(), ..base.clone() }).unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(err.to_string().contains("upscale"), "{err}");
    // A chained upscale needs an orchestrator with an upscaler.
    let chained = v1::GenerateRequest { prompt: "x".into(), upscale: Some(Default::default()), ..Default::default() };
    let err = sd.validate(&chained).unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
}

/// txt2img then x4 upscale in one job: the same images as running the two stages one after the
/// other (the second on the first's 8-bit output), drawing from one seed stream.
#[tokio::test]
async fn a_chained_upscale_equals_the_two_stages_run_in_turn() {
    let mut pipelines = Pipelines::default();
    let upscaler = Arc::new(pipelines.get("sd2-upscaler-tiny").await.clone());
    let mut sd = pipelines.get("sd21-tiny").await.clone();
    sd.chained_upscaler = Some(upscaler.clone());
    let first = v1::GenerateRequest {
        prompt: "a red fox".into(),
        steps: Some(3),
        height: Some(32),
        width: Some(32),
        seed: Some(5),
        ..Default::default()
    };
    let chain = v1::ChainedUpscale { steps: Some(3), guidance_scale: Some(9.0), noise_level: Some(40) };
    let job = sd.validate(&v1::GenerateRequest { upscale: Some(chain), ..first.clone() }).unwrap();
    let mut noise = SeededNoise::new(5);
    let mut steps = 0;
    let out = sd
        .run(&job, &mut noise, &mut |_| {
            steps += 1;
            true
        })
        .await
        .unwrap();
    assert_eq!(out.images.dims(), &[1, 128, 128, 3]);
    assert_eq!(steps, 6, "progress covers both stages");

    // The same by hand.
    let mut noise = SeededNoise::new(5);
    let stage1 = sd.validate(&first).unwrap();
    let low = sd.run(&stage1, &mut noise, &mut |_| true).await.unwrap().images;
    let png = sdmesh_orchestrator::image_out::Encoding::Png.encode(&low, "").unwrap().remove(0);
    let up = upscaler
        .validate(&v1::GenerateRequest {
            prompt: "a red fox".into(),
            image: png.into(),
            steps: Some(3),
            guidance_scale: Some(9.0),
            noise_level: Some(40),
            seed: Some(5),
            ..Default::default()
        })
        .unwrap();
    let high = upscaler.run(&up, &mut noise, &mut |_| true).await.unwrap().images;
    assert_eq!(sdmesh_testkit::max_abs_diff(&out.images, &high).0, 0.0);
}

/// Records the largest latents any UNet call gets.
struct Largest {
    inner: Arc<dyn sdmesh_core::Denoiser>,
    seen: std::sync::Mutex<(usize, usize, usize)>,
}

#[async_trait::async_trait]
impl sdmesh_core::Denoiser for Largest {
    async fn denoise(&self, x: sdmesh_core::DenoiseInput) -> sdmesh_core::Result<candle_core::Tensor> {
        let (_, _, h, w) = x.latents.dims4()?;
        {
            let mut seen = self.seen.lock().unwrap();
            *seen = (seen.0.max(h), seen.1.max(w), seen.2 + 1);
        }
        self.inner.denoise(x).await
    }
    async fn info(&self) -> sdmesh_core::Result<v1::UnetInfo> {
        self.inner.info().await
    }
}

/// A 512x512 input upscales to 2048x2048 with no UNet call above the 128-latent tile (36
/// overlapping windows a step) and the decode tiled; the seams leave no black or NaN pixels.
#[tokio::test]
async fn a_512_input_upscales_to_2048_within_the_tile_bound() {
    let mut pipelines = Pipelines::default();
    let mut p = pipelines.get("sd2-upscaler-tiny").await.clone();
    let largest = Arc::new(Largest { inner: p.denoiser.clone(), seen: Default::default() });
    p.denoiser = largest.clone();
    // Decode tiles of 64 latents (the VAE's mid-block attention over a tile's 64 x 64 tokens is
    // a 64 MiB score matrix; at the default 128 it is 1 GiB, and on this CPU 4x slower).
    let options = sdmesh_vae::VaeOptions {
        decode_tile_latents: 64,
        ..sdmesh_vae::VaeOptions::new(model("sd2-upscaler-tiny"), candle_core::Device::Cpu)
    };
    p.vae = Arc::new(sdmesh_vae::LocalVae::load(&options).unwrap());
    let mut big = image::RgbImage::new(512, 512);
    for (x, y, px) in big.enumerate_pixels_mut() {
        *px = image::Rgb([(x / 2) as u8, (y / 2) as u8, ((x + y) / 4) as u8]);
    }
    let png = sdmesh_core::images::encode_png_rgb8(&big).unwrap();
    let r = v1::GenerateRequest {
        prompt: "a cat".into(),
        image: png.into(),
        steps: Some(1),
        guidance_scale: Some(1.0),
        ..Default::default()
    };
    let job = p.validate(&r).unwrap();
    let t = std::time::Instant::now();
    let mut step_done = None;
    let out = p
        .run(&job, &mut SeededNoise::new(1), &mut |_| {
            step_done = Some(t.elapsed());
            true
        })
        .await
        .unwrap();
    eprintln!("512 upscale: UNet step {:?}, total {:?}", step_done, t.elapsed());
    assert_eq!(out.images.dims(), &[1, 2048, 2048, 3]);
    let (h, w, calls) = *largest.seen.lock().unwrap();
    assert_eq!((h, w), (128, 128), "every UNet call within the tile");
    assert_eq!(calls, 25, "5 x 5 windows of 128 (starts 0, 96, 192, 288, 384) cover 512");
    let mean = out.images.mean_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(mean.is_finite() && mean > 0.01, "mean {mean}");
}
