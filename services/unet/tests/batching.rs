//! Step-level batching: steps of different jobs (timesteps, prompts, guidance, batch sizes)
//! share one forward pass, and each job's output is exactly what it gets alone.
//!
//! Bitwise identity needs every matmul to pick the same kernel and blocking whatever the batch
//! size. The CPU gemm chooses by matrix size: for layers wider than 64 channels (every SD
//! checkpoint) the choice depends only on the inner dimension, so results are bitwise equal;
//! the tiny 32-channel fixture falls into gemm's small-matrix kernels, whose summation order
//! depends on the rows, and is held to a stated tolerance instead.

use candle_core::{Device, Tensor};
use sdmesh_core::{DenoiseInput, Denoiser};
use sdmesh_testkit::model;
use sdmesh_unet::{AloneVsBatched, LocalUnet, UnetOptions};
use std::time::Duration;

fn randn(seed: u64, shape: &[usize]) -> Tensor {
    // Deterministic values without a RNG dependency: a hashed counter mapped to [-2, 2).
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n as u64)
        .map(|i| {
            let x = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15 ^ seed.wrapping_mul(0xBF58_476D_1CE4_E5B9));
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

/// Four jobs' steps that can share a forward pass (same latent size and context length).
fn steps() -> Vec<DenoiseInput> {
    steps_of_size(8, 6)
}

fn steps_of_size(h: usize, w: usize) -> Vec<DenoiseInput> {
    let (cond, uncond) = (|s: u64| randn(s, &[1, 77, 32]), |s: u64| randn(s + 100, &[1, 77, 32]));
    vec![
        DenoiseInput {
            latents: randn(1, &[1, 4, h, w]),
            timestep: 999.0,
            cond: cond(1),
            uncond: Some(uncond(1)),
            guidance_scale: 7.5,
            guidance_rescale: 0.0,
            class_label: None,
            extra: None,
        },
        DenoiseInput {
            latents: randn(2, &[2, 4, h, w]),
            timestep: 500.0,
            cond: cond(2),
            uncond: Some(uncond(2)),
            guidance_scale: 4.0,
            guidance_rescale: 0.7,
            class_label: None,
            extra: None,
        },
        // Guidance off: one row per image, no unconditional pass.
        DenoiseInput {
            latents: randn(3, &[1, 4, h, w]),
            timestep: 21.0,
            cond: cond(3),
            uncond: None,
            guidance_scale: 1.0,
            guidance_rescale: 0.0,
            class_label: None,
            extra: None,
        },
        DenoiseInput {
            latents: randn(4, &[1, 4, h, w]),
            timestep: 1.5,
            cond: randn(5, &[1, 77, 32]),
            uncond: Some(uncond(4)),
            guidance_scale: 9.0,
            guidance_rescale: 0.0,
            class_label: None,
            extra: None,
        },
    ]
}

fn batching(dir: &std::path::Path) -> LocalUnet {
    LocalUnet::load(&UnetOptions {
        max_batch_rows: 64,
        batch_max_wait: Duration::from_millis(300),
        ..UnetOptions::new(dir.to_path_buf(), Device::Cpu)
    })
    .unwrap()
}

/// The four steps alone against together (one forward pass), then two of them in the other
/// order; per comparison, with the step's guidance scale.
async fn alone_vs_batched(unet: &LocalUnet, steps: impl Fn() -> Vec<DenoiseInput>) -> Vec<(AloneVsBatched, f32)> {
    let four = steps();
    let mut out = unet.alone_vs_batched(&four).await.unwrap();
    out.extend(unet.alone_vs_batched(&[four[3].clone(), four[2].clone()]).await.unwrap());
    let guidance = [0, 1, 2, 3, 3, 2].map(|i| four[i].guidance_scale);
    for c in &out {
        assert!(c.nonfinite == 0 && c.max_abs > 0.0, "degenerate output: {c:?}");
    }
    out.into_iter().zip(guidance).collect()
}

/// A UNet of the SD layout at 128 channels with random weights, in a temporary folder.
fn wide_unet() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let unet_dir = tmp.path().join("unet");
    std::fs::create_dir_all(&unet_dir).unwrap();
    let text = std::fs::read_to_string(model("sd21-base-tiny").join("unet/config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
    config["block_out_channels"] = serde_json::json!([128, 128, 128]);
    config["attention_head_dim"] = serde_json::json!([8, 8, 8]);
    config["sample_size"] = serde_json::json!(16);
    std::fs::write(unet_dir.join("config.json"), config.to_string()).unwrap();
    sdmesh_unet::write_random_weights(&unet_dir).unwrap();
    tmp
}

#[tokio::test]
async fn at_sd_widths_a_step_gives_the_same_bits_alone_and_in_any_batch() {
    let dir = wide_unet();
    let unet = batching(dir.path());
    for (i, (c, _)) in alone_vs_batched(&unet, || steps_of_size(16, 16)).await.into_iter().enumerate() {
        assert!(c.same_bits, "comparison {i}: differs by {:e} in a batch", c.max_abs_diff);
    }
}

#[tokio::test]
async fn tiny_fixture_batched_within_1e6_of_alone_before_guidance() {
    for name in ["sd21-tiny", "sd21-base-tiny"] {
        let unet = batching(&model(name));
        for (i, (c, g)) in alone_vs_batched(&unet, steps).await.into_iter().enumerate() {
            let diff = c.max_abs_diff;
            // Guidance u + g (c - u) scales a model-output difference by up to 2g + 1.
            let bound = 1e-6 * (2.0 * g.max(1.0) + 1.0);
            eprintln!("{name}: comparison {i}: max abs diff {diff:e} (guidance {g}, bound {bound:e})");
            assert!(diff <= bound, "{name}: comparison {i}: {diff:e} > {bound:e}");
        }
    }
}

#[tokio::test]
async fn steps_of_other_shapes_run_in_their_own_batches() {
    let unet = batching(&model("sd21-base-tiny"));
    let mut other = steps().remove(0);
    other.latents = randn(9, &[1, 4, 8, 8]);
    let alone = unet.denoise(DenoiseInput { ..steps().remove(0) }).await.unwrap();
    let before = unet.batches_run();
    let mixed = futures::future::join_all([steps().remove(0), other].into_iter().map(|s| unet.denoise(s))).await;
    assert_eq!(unet.batches_run() - before, 2, "different latent sizes cannot share a pass");
    assert!(sdmesh_testkit::max_abs_diff(mixed[0].as_ref().unwrap(), &alone).0 < 1e-5);
    assert_eq!(mixed[1].as_ref().unwrap().dims(), &[1, 4, 8, 8]);
}
