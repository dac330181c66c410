//! End to end across real processes: text-encoder, unet, vae and orchestrator binaries each in
//! their own OS process on ephemeral loopback ports, talking gRPC; `sdctl` as the client.
//! Needs the workspace binaries built (`make test` builds them first).

use candle_core::Device;
use sdmesh_proto::v1;
use sdmesh_testkit::process::{bin, Mesh};
use sdmesh_testkit::{assert_close, load_json, load_tensors};
use std::process::Command;

#[tokio::test]
async fn sdctl_through_separate_processes_gives_the_reference_image() {
    let mesh = Mesh::start("sd21-tiny").await;
    let case = load_json("cases.json").as_array().unwrap().iter().find(|c| c["name"] == "sd21_ddim").unwrap().clone();
    let r = load_tensors("cases/sd21_ddim.safetensors");
    let tmp = std::env::temp_dir().join(format!("sdmesh-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    r["init_latents"].write_npy(tmp.join("init.npy")).unwrap();
    let out = Command::new(bin("sdctl"))
        .args(["generate", "--endpoint", &mesh.orchestrator.addr, "--quiet"])
        .args(["--prompt", case["prompt"].as_str().unwrap()])
        .args(["--steps", &case["steps"].to_string(), "--guidance", &case["guidance_scale"].to_string()])
        .args(["--height", &case["height"].to_string(), "--width", &case["width"].to_string()])
        .args(["--scheduler", "DDIMScheduler", "--seed", "1234"])
        .arg("--init-latents")
        .arg(tmp.join("init.npy"))
        .arg("--out")
        .arg(tmp.join("out.png"))
        .arg("--out-array")
        .arg(tmp.join("out.npy"))
        .output()
        .unwrap();
    assert!(out.status.success(), "sdctl failed: {}", String::from_utf8_lossy(&out.stderr));
    let array = candle_core::Tensor::read_npy(tmp.join("out.npy")).unwrap();
    assert_close("image through the mesh", &array, &r["image"], 1e-3);
    // The PNG carries the parameters that regenerate it.
    let png = std::fs::read(tmp.join("out.png")).unwrap();
    let text = String::from_utf8_lossy(&png);
    assert!(
        text.contains("parameters") && text.contains("Seed: 1234") && text.contains("Sampler: DDIMScheduler"),
        "PNG text chunk"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[tokio::test]
async fn same_request_same_bytes_and_bad_input_is_invalid_argument() {
    let mesh = Mesh::start("sd21-base-tiny").await;
    let mut client =
        v1::orchestrator_client::OrchestratorClient::connect(mesh.orchestrator.addr.clone()).await.unwrap();
    let base = v1::GenerateRequest {
        prompt: "a red cube".into(),
        steps: Some(3),
        seed: Some(7),
        height: Some(64),
        width: Some(48),
        num_images: Some(2),
        scheduler: Some(v1::SchedulerOptions { name: "dpm++2m-karras".into(), ..Default::default() }),
        ..Default::default()
    };
    let a = client.generate(base.clone()).await.unwrap().into_inner();
    let b = client.generate(base.clone()).await.unwrap().into_inner();
    assert_eq!(a.images.len(), 2);
    assert_eq!(a.images, b.images, "same request, same bytes");
    assert_eq!((a.seed, a.scheduler.as_str()), (7, "DPMSolverMultistepScheduler (karras)"));
    let c = client.generate(v1::GenerateRequest { seed: Some(8), ..base.clone() }).await.unwrap().into_inner();
    assert_ne!(a.images, c.images, "another seed, another image");

    let bad: Vec<(&str, v1::GenerateRequest)> = vec![
        ("height", v1::GenerateRequest { height: Some(60), ..base.clone() }),
        ("height", v1::GenerateRequest { height: Some(0), ..base.clone() }),
        ("width", v1::GenerateRequest { width: Some(4096), ..base.clone() }),
        ("width", v1::GenerateRequest { width: Some(0), ..base.clone() }),
        ("steps", v1::GenerateRequest { steps: Some(0), ..base.clone() }),
        ("steps", v1::GenerateRequest { steps: Some(100_000), ..base.clone() }),
        ("guidance_scale", v1::GenerateRequest { guidance_scale: Some(f32::NAN), ..base.clone() }),
        ("guidance_scale", v1::GenerateRequest { guidance_scale: Some(-2.0), ..base.clone() }),
        ("guidance_rescale", v1::GenerateRequest { guidance_rescale: 3.0, ..base.clone() }),
        ("num_images", v1::GenerateRequest { num_images: Some(1000), ..base.clone() }),
        ("num_images", v1::GenerateRequest { num_images: Some(0), ..base.clone() }),
        (
            "scheduler",
            v1::GenerateRequest {
                scheduler: Some(v1::SchedulerOptions { name: "warp-drive".into(), ..Default::default() }),
                ..base.clone()
            },
        ),
        (
            "jpeg_quality",
            v1::GenerateRequest { image_format: v1::ImageFormat::Jpeg.into(), jpeg_quality: Some(101), ..base.clone() },
        ),
        ("model", v1::GenerateRequest { model: "sd15".into(), ..base.clone() }),
        (
            "init_latents",
            v1::GenerateRequest {
                init_latents: Some(v1::Tensor {
                    dtype: v1::Dtype::F32 as i32,
                    shape: vec![2, 4, 8, 6],
                    data: vec![0; 7].into(),
                }),
                ..base.clone()
            },
        ),
        (
            "init_latents",
            v1::GenerateRequest {
                init_latents: Some(
                    v1::Tensor::from_candle(
                        &candle_core::Tensor::zeros((1, 4, 8, 8), candle_core::DType::F32, &Device::Cpu).unwrap(),
                    )
                    .unwrap(),
                ),
                ..base.clone()
            },
        ),
    ];
    for (field, request) in bad {
        let err = client.generate(request).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{field}: {err:?}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }

    // The unet service itself: a tensor whose bytes do not match its shape, a wrong latent shape.
    let mut unet = v1::unet_client::UnetClient::connect(mesh.unet.addr.clone()).await.unwrap();
    let cond = v1::Tensor::from_candle(
        &candle_core::Tensor::zeros((1, 77, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
    )
    .unwrap();
    let request = |latents: v1::Tensor| v1::DenoiseRequest {
        latents: Some(latents),
        timestep: 10.0,
        cond: Some(cond.clone()),
        uncond: None,
        guidance_scale: 1.0,
        guidance_rescale: 0.0,
        ..Default::default()
    };
    let short = v1::Tensor { dtype: v1::Dtype::F32 as i32, shape: vec![1, 4, 8, 8], data: vec![0; 100].into() };
    let err = unet.denoise(request(short)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("latents") && err.message().contains("bytes"), "{}", err.message());
    let wrong = v1::Tensor::from_candle(
        &candle_core::Tensor::zeros((1, 3, 8, 8), candle_core::DType::F32, &Device::Cpu).unwrap(),
    )
    .unwrap();
    let err = unet.denoise(request(wrong)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    // Nothing crashed: the mesh still serves the same bytes.
    let again = client.generate(base).await.unwrap().into_inner();
    assert_eq!(again.images, a.images);
}

#[test]
fn a_broken_model_folder_stops_the_service_naming_the_file() {
    let tmp = std::env::temp_dir().join(format!("sdmesh-e2e-broken-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(tmp.join("unet")).unwrap();
    std::fs::write(tmp.join("unet/config.json"), b"{\"block_out_channels\": [32, 64], oops").unwrap();
    let out = Command::new(bin("sdmesh-unet"))
        .args(["--listen", "127.0.0.1:0", "--model"])
        .arg(&tmp)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("unet/config.json") && stderr.contains("invalid JSON"), "{stderr}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[tokio::test]
async fn sdmesh_generate_in_process_writes_the_same_png_as_the_mesh() {
    let mesh = Mesh::start("sd21-base-tiny").await;
    let tmp = std::env::temp_dir().join(format!("sdmesh-e2e-inproc-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let job = ["--prompt", "a lighthouse", "--negative-prompt", "fog", "--steps", "4", "--seed", "11"];
    let job = [&job[..], &["--height", "64", "--width", "48", "--scheduler", "euler_a", "--quiet"]].concat();
    let mesh_png = tmp.join("mesh.png");
    let out = Command::new(bin("sdctl"))
        .args(["generate", "--endpoint", &mesh.orchestrator.addr])
        .args(&job)
        .arg("--out")
        .arg(&mesh_png)
        .output()
        .unwrap();
    assert!(out.status.success(), "sdctl: {}", String::from_utf8_lossy(&out.stderr));
    let local_png = tmp.join("local.png");
    let out = Command::new(bin("sdmesh"))
        .args(["generate", "--model", sdmesh_testkit::model("sd21-base-tiny").to_str().unwrap()])
        .args(&job)
        .arg("--out")
        .arg(&local_png)
        .output()
        .unwrap();
    assert!(out.status.success(), "sdmesh generate: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("seed 11"), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(std::fs::read(&mesh_png).unwrap(), std::fs::read(&local_png).unwrap(), "same job, same bytes");

    // Live previews every second step: written as they come, an eighth of the image a side,
    // and the image is the same.
    let previews = tmp.join("previews");
    let with_previews = tmp.join("with-previews.png");
    let out = Command::new(bin("sdctl"))
        .args(["generate", "--endpoint", &mesh.orchestrator.addr])
        .args(&job)
        .args(["--preview-every", "2", "--previews", previews.to_str().unwrap()])
        .arg("--out")
        .arg(&with_previews)
        .output()
        .unwrap();
    assert!(out.status.success(), "sdctl: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(&with_previews).unwrap(), std::fs::read(&mesh_png).unwrap());
    let mut written: Vec<_> = std::fs::read_dir(&previews).unwrap().map(|e| e.unwrap().file_name()).collect();
    written.sort();
    assert_eq!(written, ["step-002.jpg", "step-004.jpg"]);
    let preview = image::open(previews.join("step-004.jpg")).unwrap();
    assert_eq!((preview.width(), preview.height()), (48 / 8, 64 / 8));

    // Decoded previews (through the vae service): the image's size, and the last one is the
    // image (euler_a's last step lands on sigma 0, so its prediction is the final latents): the
    // same pixels as the result as a JPEG of the previews' quality (80), to rounding.
    let decoded = tmp.join("decoded-previews");
    let result_jpeg = tmp.join("decoded.jpg");
    let out = Command::new(bin("sdctl"))
        .args(["generate", "--endpoint", &mesh.orchestrator.addr])
        .args(&job)
        .args(["--preview-every", "2", "--preview-kind", "decoded", "--previews", decoded.to_str().unwrap()])
        .args(["--jpeg-quality", "80", "--out", result_jpeg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "sdctl: {}", String::from_utf8_lossy(&out.stderr));
    let image = image::open(&result_jpeg).unwrap().to_rgb8();
    let error = |preview: &str| {
        let preview = image::open(decoded.join(preview)).unwrap().to_rgb8();
        assert_eq!(preview.dimensions(), image.dimensions(), "{preview:?}");
        let diffs = preview.as_raw().iter().zip(image.as_raw()).map(|(&a, &b)| (f64::from(a) - f64::from(b)).abs());
        diffs.sum::<f64>() / image.as_raw().len() as f64
    };
    let (last, earlier) = (error("step-004.jpg"), error("step-002.jpg"));
    assert!(last < 0.5, "the last decoded preview is {last} per channel from the image");
    assert!(earlier > 1.0, "step 2's preview, {earlier} from the image ({last} for step 4's), is a noisier prediction");

    // JPEG out (named by --out's extension), the same bytes both ways, with the parameters in
    // its comment segment, and the PNG's pixels within JPEG's loss.
    let write_jpeg = |command: &mut Command, name: &str| {
        let path = tmp.join(name);
        let out = command.args(&job).args(["--jpeg-quality", "95"]).arg("--out").arg(&path).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        std::fs::read(path).unwrap()
    };
    let mesh_jpeg =
        write_jpeg(Command::new(bin("sdctl")).args(["generate", "--endpoint", &mesh.orchestrator.addr]), "mesh.jpg");
    let model = sdmesh_testkit::model("sd21-base-tiny");
    let local_jpeg =
        write_jpeg(Command::new(bin("sdmesh")).args(["generate", "--model", model.to_str().unwrap()]), "local.jpeg");
    assert_eq!(mesh_jpeg, local_jpeg);
    assert_eq!(&mesh_jpeg[..2], b"\xFF\xD8", "a JPEG");
    assert!(String::from_utf8_lossy(&mesh_jpeg).contains("Seed: 11"), "the parameters ride along");
    let rgb = |bytes: &[u8]| image::load_from_memory(bytes).unwrap().to_rgb8();
    let (png, jpeg) = (rgb(&std::fs::read(&mesh_png).unwrap()), rgb(&mesh_jpeg));
    assert_eq!(png.dimensions(), jpeg.dimensions());
    let mean_error = png.as_raw().iter().zip(jpeg.as_raw()).map(|(a, b)| a.abs_diff(*b) as f64).sum::<f64>()
        / png.as_raw().len() as f64;
    assert!(mean_error < 8.0, "JPEG q95 is {mean_error:.2}/255 from the PNG on average");
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// Two orchestrator processes over one text-encoder process and one redis-server: the second
/// finds the first one's prompt embeddings, so the text encoder is called once for both.
#[tokio::test]
async fn two_orchestrator_processes_share_prompt_embeddings_through_redis() {
    let redis = sdmesh_testkit::process::RedisServer::start();
    let url = redis.url();
    let opts = sdmesh_testkit::process::MeshOptions {
        common_args: vec!["--metrics-listen", "127.0.0.1:0"],
        orchestrator_args: vec!["--redis-url", &url],
        ..Default::default()
    };
    let mesh = Mesh::start_with("sd21-base-tiny", &opts).await;
    let second = mesh.another_orchestrator("sd21-base-tiny", &opts).await;
    let request = v1::GenerateRequest {
        prompt: "a shared prompt".into(),
        negative_prompt: "a shared negative".into(),
        steps: Some(2),
        seed: Some(5),
        height: Some(32),
        width: Some(32),
        ..Default::default()
    };
    let mut images = Vec::new();
    for orchestrator in [&mesh.orchestrator, &second] {
        let mut client = v1::orchestrator_client::OrchestratorClient::connect(orchestrator.addr.clone()).await.unwrap();
        images.push(client.generate(request.clone()).await.unwrap().into_inner().images);
    }
    assert_eq!(images[0], images[1], "same job, same bytes, cached or not");
    let encodes = |text: &str| {
        sdmesh_testkit::process::metric(
            text,
            "sdmesh_rpc_requests_total",
            &[("method", "/sd.v1.TextEncoder/Encode"), ("code", "Ok")],
        )
    };
    assert_eq!(encodes(&mesh.text_encoder.scrape()), 1.0, "the second orchestrator used the first one's entries");
    let hits = sdmesh_testkit::process::metric(
        &second.scrape(),
        "sdmesh_embedding_cache_requests_total",
        &[("result", "hit")],
    );
    assert_eq!(hits, 2.0, "prompt and negative prompt came from Redis");
}
