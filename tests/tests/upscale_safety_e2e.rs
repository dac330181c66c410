//! The x4 upscaler and the safety checker end to end across real processes, driven by sdctl:
//! `sdctl upscale` by seed equals diffusers; a txt2img job chained with an upscale (the
//! upscaler's unet and vae as their own processes, or inside `sdmesh serve`, or `sdmesh
//! generate` with no gRPC) equals the same chain run in process;
//! `sdctl check` prints the reference verdicts; an orchestrator with --safety-url reports
//! flags, fails closed with UNAVAILABLE when the safety service is gone, or (flag-only)
//! delivers with a warning.

use sdmesh_testkit::process::{bin, start, wait_serving, Mesh, MeshOptions};
use sdmesh_testkit::{assert_close, fixtures, load_fixture_json, load_fixture_tensors, model};
use std::path::PathBuf;
use std::process::{Command, Output};

fn tmp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sdmesh-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn sdctl(args: &[&str]) -> Output {
    Command::new(bin("sdctl")).args(args).output().unwrap()
}

fn ok(out: &Output, what: &str) {
    assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn sdctl_upscale_through_separate_processes_equals_diffusers_by_seed() {
    let mesh = Mesh::start("sd2-upscaler-tiny").await;
    let cases = load_fixture_json("reference-upscaler/cases.json");
    let case = cases.as_array().unwrap().iter().find(|c| c["name"] == "seed_up_nl20_negative").unwrap().clone();
    let tmp = tmp_dir("upscale");
    let (png, npy) = (tmp.join("up.png"), tmp.join("up.npy"));
    let image = fixtures().join("reference-upscaler/inputs").join(case["image"].as_str().unwrap());
    let out = sdctl(&[
        "upscale",
        "--endpoint",
        &mesh.orchestrator.addr,
        "--quiet",
        "--prompt",
        case["prompt"].as_str().unwrap(),
        "--negative-prompt",
        case["negative_prompt"].as_str().unwrap_or(""),
        "--steps",
        &case["steps"].to_string(),
        "--guidance",
        &case["guidance_scale"].to_string(),
        "--noise-level",
        &case["noise_level"].to_string(),
        "--seed",
        &case["seed"].to_string(),
        "--image",
        image.to_str().unwrap(),
        "--out",
        png.to_str().unwrap(),
        "--out-array",
        npy.to_str().unwrap(),
    ]);
    ok(&out, "sdctl upscale");
    let r = load_fixture_tensors("reference-upscaler/cases/seed_up_nl20_negative.safetensors");
    let array = candle_core::Tensor::read_npy(&npy).unwrap();
    assert_close("upscaled through the mesh", &array, &r["image"], 1e-3);
    assert!(String::from_utf8_lossy(&std::fs::read(&png).unwrap()).contains("Noise level: 20"));
    // Out of range: INVALID_ARGUMENT, and the mesh goes on.
    let bad = sdctl(&[
        "upscale",
        "--endpoint",
        &mesh.orchestrator.addr,
        "--quiet",
        "--prompt",
        "x",
        "--noise-level",
        "351",
        "--image",
        image.to_str().unwrap(),
        "--out",
        png.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && stderr.contains("InvalidArgument") && stderr.contains("noise_level"), "{stderr}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[tokio::test]
async fn a_txt2img_job_chained_with_an_upscale_through_separate_processes() {
    let upscaler = Mesh::start("sd2-upscaler-tiny").await;
    let up_model = model("sd2-upscaler-tiny");
    let args = [
        "--upscaler-model",
        up_model.to_str().unwrap(),
        "--upscaler-unet-url",
        &upscaler.unet.addr,
        "--upscaler-vae-url",
        &upscaler.vae.addr,
    ];
    let mesh =
        Mesh::start_with("sd21-tiny", &MeshOptions { orchestrator_args: args.to_vec(), ..Default::default() }).await;
    let tmp = tmp_dir("chain");
    let npy = tmp.join("chain.npy");
    let job = |npy: &std::path::Path| -> Vec<String> {
        [
            "--quiet",
            "--prompt",
            "a red fox",
            "--steps",
            "3",
            "--height",
            "32",
            "--width",
            "32",
            "--seed",
            "5",
            "--then-upscale",
            "--upscale-steps",
            "3",
            "--noise-level",
            "40",
            "--out",
            npy.with_extension("png").to_str().unwrap(),
            "--out-array",
            npy.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };
    let out =
        Command::new(bin("sdctl")).args(["generate", "--endpoint", &mesh.orchestrator.addr]).args(job(&npy)).output();
    ok(&out.unwrap(), "sdctl generate --then-upscale");
    let array = candle_core::Tensor::read_npy(&npy).unwrap();
    assert_eq!(array.dims(), &[1, 128, 128, 3]);

    // The same with `sdmesh serve --upscaler-model` (the upscaler's services in its process),
    // and in-process with `sdmesh generate --upscaler-model`: the same numbers.
    let sd = model("sd21-tiny");
    let serve = start(
        "sdmesh",
        &["serve", "--model", sd.to_str().unwrap(), "--upscaler-model", up_model.to_str().unwrap()],
        &[],
    );
    wait_serving(&serve.addr).await;
    let served = tmp.join("served.npy");
    let out = Command::new(bin("sdctl")).args(["generate", "--endpoint", &serve.addr]).args(job(&served)).output();
    ok(&out.unwrap(), "sdctl generate --then-upscale against sdmesh serve");
    let in_process = tmp.join("in-process.npy");
    let out = Command::new(bin("sdmesh"))
        .args(["generate", "--model", sd.to_str().unwrap(), "--upscaler-model", up_model.to_str().unwrap()])
        .args(job(&in_process))
        .output();
    ok(&out.unwrap(), "sdmesh generate --then-upscale");
    for (what, path) in [("sdmesh serve", &served), ("sdmesh generate", &in_process)] {
        let other = candle_core::Tensor::read_npy(path).unwrap();
        assert_close(&format!("chain through {what} vs the mesh"), &other, &array, 1e-6);
    }
    // An --upscaler-model that is no upscaler: refused.
    let out = Command::new(bin("sdmesh"))
        .args(["generate", "--model", sd.to_str().unwrap(), "--upscaler-model", sd.to_str().unwrap()])
        .args(job(&in_process))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("not an x4 upscaler"), "{stderr}");

    // The same chain in this process.
    let limits = sdmesh_orchestrator::pipeline::Limits::default();
    let up =
        sdmesh_orchestrator::local_pipeline(&up_model, &candle_core::Device::Cpu, candle_core::DType::F32, 8, limits)
            .await
            .unwrap();
    let mut sd = sdmesh_orchestrator::local_pipeline(
        &model("sd21-tiny"),
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
        8,
        limits,
    )
    .await
    .unwrap();
    sd.chained_upscaler = Some(std::sync::Arc::new(up));
    let request = sdmesh_proto::v1::GenerateRequest {
        prompt: "a red fox".into(),
        steps: Some(3),
        height: Some(32),
        width: Some(32),
        seed: Some(5),
        num_images: Some(1),
        upscale: Some(sdmesh_proto::v1::ChainedUpscale { steps: Some(3), guidance_scale: None, noise_level: Some(40) }),
        ..Default::default()
    };
    let job = sd.validate(&request).unwrap();
    let local = sd.run(&job, &mut sdmesh_orchestrator::noise::SeededNoise::new(5), &mut |_| true).await.unwrap();
    assert_close("chain through the mesh vs in process", &array, &local.images, 1e-5);
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[tokio::test]
async fn sdctl_check_prints_the_reference_verdicts() {
    let checker_model = model("safety-checker-tiny");
    let safety = start("sdmesh-safety", &["--model", checker_model.to_str().unwrap()], &[]);
    wait_serving(&safety.addr).await;
    let reference = load_fixture_json("reference-safety/reference.json");
    let cases = reference["png_cases"].as_array().unwrap();
    let paths: Vec<String> = cases
        .iter()
        .map(|c| fixtures().join("reference-safety").join(c["png"].as_str().unwrap()).display().to_string())
        .collect();
    let mut args = vec!["check", "--endpoint", safety.addr.as_str()];
    for p in &paths {
        args.extend(["--image", p.as_str()]);
    }
    let out = sdctl(&args);
    ok(&out, "sdctl check");
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), cases.len());
    let mut outcomes = std::collections::HashSet::new();
    for (line, case) in lines.iter().zip(cases) {
        assert_eq!(line["flagged"], case["flagged"], "{}", case["name"]);
        assert_eq!(line["special_care"], case["special_care"], "{}", case["name"]);
        assert_eq!(line["concept_scores"], case["concept_scores"], "{}", case["name"]);
        outcomes.insert(case["flagged"].as_bool().unwrap());
    }
    assert_eq!(outcomes.len(), 2, "images on both sides of the thresholds");
}

#[tokio::test]
async fn the_orchestrator_applies_the_safety_policy_and_fails_closed() {
    let checker_model = model("safety-checker-tiny");
    let mut safety = start("sdmesh-safety", &["--model", checker_model.to_str().unwrap()], &[]);
    wait_serving(&safety.addr).await;
    let url = safety.addr.clone();
    let fail_closed = ["--safety-url", url.as_str()];
    let mesh =
        Mesh::start_with("sd21-tiny", &MeshOptions { orchestrator_args: fail_closed.to_vec(), ..Default::default() })
            .await;
    let flag_only = ["--safety-url", url.as_str(), "--safety-on-unavailable", "flag-only"];
    let lenient = mesh
        .another_orchestrator("sd21-tiny", &MeshOptions { orchestrator_args: flag_only.to_vec(), ..Default::default() })
        .await;
    let tmp = tmp_dir("safety");
    let out_png = tmp.join("s.png");
    let job = |endpoint: &str| {
        sdctl(&[
            "generate",
            "--endpoint",
            endpoint,
            "--quiet",
            "--prompt",
            "a cat",
            "--steps",
            "2",
            "--height",
            "32",
            "--width",
            "32",
            "--seed",
            "9",
            "--safety",
            "flag",
            "--out",
            out_png.to_str().unwrap(),
        ])
    };
    ok(&job(&mesh.orchestrator.addr), "checked job");
    safety.child.kill().unwrap();
    safety.child.wait().unwrap();
    let closed = job(&mesh.orchestrator.addr);
    let stderr = String::from_utf8_lossy(&closed.stderr);
    assert!(!closed.status.success() && stderr.contains("Unavailable") && stderr.contains("safety"), "{stderr}");
    let open = job(&lenient.addr);
    ok(&open, "flag-only job");
    assert!(String::from_utf8_lossy(&open.stderr).contains("not checked"), "{}", String::from_utf8_lossy(&open.stderr));
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// `sdmesh serve --safety-model` (the checker's service in its process) and `sdmesh generate
/// --safety-model` (no gRPC) check a job as a mesh with its own safety service does: the same
/// verdict, the same image, by default (replace) and under flag; without one, flag is refused.
#[tokio::test]
async fn sdmesh_serve_and_generate_check_with_a_safety_model() {
    let checker = model("safety-checker-tiny");
    let safety = start("sdmesh-safety", &["--model", checker.to_str().unwrap()], &[]);
    wait_serving(&safety.addr).await;
    let with_safety = ["--safety-url", safety.addr.as_str()];
    let mesh =
        Mesh::start_with("sd21-tiny", &MeshOptions { orchestrator_args: with_safety.to_vec(), ..Default::default() })
            .await;
    let sd = model("sd21-tiny");
    let serve =
        start("sdmesh", &["serve", "--model", sd.to_str().unwrap(), "--safety-model", checker.to_str().unwrap()], &[]);
    wait_serving(&serve.addr).await;
    let tmp = tmp_dir("safety-model");
    // Each way's stdout line (its verdict) and PNG.
    let run = |how: &[&str], policy: &[&str], tag: &str| {
        let png = tmp.join(format!("{tag}.png"));
        let job = ["--quiet", "--prompt", "a cat", "--steps", "2", "--height", "32", "--width", "32", "--seed", "9"];
        let out =
            Command::new(bin(how[0])).args(&how[1..]).args(job).args(policy).arg("--out").arg(&png).output().unwrap();
        ok(&out, tag);
        let line = String::from_utf8_lossy(&out.stdout).replace(png.to_str().unwrap(), "OUT");
        (line, std::fs::read(&png).unwrap())
    };
    let generate = ["sdmesh", "generate", "--model", sd.to_str().unwrap(), "--safety-model", checker.to_str().unwrap()];
    for policy in [&[][..], &["--safety", "flag"][..]] {
        let expected = run(&["sdctl", "generate", "--endpoint", &mesh.orchestrator.addr], policy, "mesh");
        assert!(expected.0.contains("the safety checker"), "{}", expected.0);
        assert_eq!(run(&["sdctl", "generate", "--endpoint", &serve.addr], policy, "serve"), expected, "{policy:?}");
        assert_eq!(run(&generate, policy, "in-process"), expected, "{policy:?}");
    }
    let unchecked = Command::new(bin("sdmesh"))
        .args(["generate", "--model", sd.to_str().unwrap(), "--prompt", "a cat", "--steps", "2", "--safety", "flag"])
        .args(["--height", "32", "--width", "32", "--out", tmp.join("x.png").to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&unchecked.stderr);
    assert!(!unchecked.status.success() && stderr.contains("no safety checker"), "{stderr}");
    std::fs::remove_dir_all(&tmp).unwrap();
}
