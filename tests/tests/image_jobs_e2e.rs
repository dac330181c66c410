//! img2img, inpainting and depth2img end to end across real processes (text-encoder, unet,
//! vae, depth and orchestrator binaries, gRPC over loopback), driven by `sdctl img2img`,
//! `sdctl inpaint` and `sdctl depth`: run by seed alone, each equals diffusers run with the same
//! seed (reference-jobs `seed_` cases). Also bad input through sdctl, and the depth service on
//! its own (Estimate with a 16-bit PNG).

use sdmesh_proto::v1;
use sdmesh_testkit::process::{bin, Mesh};
use sdmesh_testkit::{assert_close, fixtures, load_fixture_json, load_fixture_tensors, model};
use std::path::PathBuf;
use std::process::{Command, Output};

fn inputs(name: &str) -> PathBuf {
    fixtures().join("reference-jobs/inputs").join(name)
}

/// A new folder (tests run at once, some on the same case).
fn tmp_dir(tag: &str) -> PathBuf {
    static MADE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("sdmesh-{tag}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `sdctl COMMAND` for reference case `name` against the orchestrator at `endpoint`; the
/// output array's path.
fn sdctl_case(command: &str, endpoint: &str, name: &str, extra: &[&str], tmp: &std::path::Path) -> (Output, PathBuf) {
    let cases = load_fixture_json("reference-jobs/cases.json");
    let case = cases.as_array().unwrap().iter().find(|c| c["name"] == name).unwrap().clone();
    let array = tmp.join(format!("{name}.npy"));
    let mut cmd = Command::new(bin("sdctl"));
    cmd.args([command, "--endpoint", endpoint, "--quiet"])
        .args(["--prompt", case["prompt"].as_str().unwrap()])
        .args(["--steps", &case["steps"].to_string(), "--guidance", &case["guidance_scale"].to_string()])
        .args(["--seed", &case["seed"].to_string()])
        .args(["--scheduler", case["scheduler"].as_str().unwrap()])
        .arg("--image")
        .arg(inputs(case["image"].as_str().unwrap()));
    // `extra` overrides the case's strength and mask.
    if !extra.contains(&"--strength") {
        cmd.args(["--strength", &case["strength"].to_string()]);
    }
    if let Some(neg) = case["negative_prompt"].as_str() {
        cmd.args(["--negative-prompt", neg]);
    }
    if let (Some(mask), false) = (case["mask"].as_str(), extra.contains(&"--mask")) {
        cmd.arg("--mask").arg(inputs(mask));
    }
    let out = cmd
        .args(extra)
        .arg("--out")
        .arg(tmp.join(format!("{name}.png")))
        .arg("--out-array")
        .arg(&array)
        .output()
        .unwrap();
    (out, array)
}

fn check_seed_case(command: &str, endpoint: &str, name: &str, extra: &[&str]) {
    let tmp = tmp_dir(name);
    let (out, array) = sdctl_case(command, endpoint, name, extra, &tmp);
    assert!(out.status.success(), "sdctl {command}: {}", String::from_utf8_lossy(&out.stderr));
    let image = candle_core::Tensor::read_npy(&array).unwrap();
    let r = load_fixture_tensors(&format!("reference-jobs/cases/{name}.safetensors"));
    assert_close(&format!("{name} through the mesh"), &image, &r["image"], 1e-3);
    let png = std::fs::read(tmp.join(format!("{name}.png"))).unwrap();
    assert!(String::from_utf8_lossy(&png).contains("Denoising strength"), "{name}: PNG parameters");
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[tokio::test]
async fn sdctl_img2img_through_separate_processes_equals_diffusers_by_seed() {
    let mesh = Mesh::start("sd21-tiny").await;
    check_seed_case("img2img", &mesh.orchestrator.addr, "seed_i2i_sd21_ddim_s075", &[]);
}

#[tokio::test]
async fn sdctl_inpaint_through_separate_processes_equals_diffusers_by_seed() {
    let mesh = Mesh::start("sd2-inpaint-tiny").await;
    check_seed_case("inpaint", &mesh.orchestrator.addr, "seed_inp_ddim_s07", &[]);

    // Bad input comes back as INVALID_ARGUMENT saying why, and the mesh goes on serving.
    let tmp = tmp_dir("inpaint-bad");
    let wrong_mask = inputs("mask48x64.png");
    let (out, _) = sdctl_case(
        "inpaint",
        &mesh.orchestrator.addr,
        "seed_inp_ddim_s07",
        &["--mask", wrong_mask.to_str().unwrap()],
        &tmp,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("InvalidArgument") && stderr.contains("mask"), "{stderr}");
    let (out, _) = sdctl_case("inpaint", &mesh.orchestrator.addr, "seed_inp_ddim_s07", &["--strength", "1.5"], &tmp);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("InvalidArgument") && stderr.contains("strength"), "{stderr}");
    // img2img on an inpainting checkpoint: FAILED_PRECONDITION.
    let (out, _) = sdctl_case("img2img", &mesh.orchestrator.addr, "seed_inp_ddim_s07", &[], &tmp);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("FailedPrecondition"), "{stderr}");
    check_seed_case("inpaint", &mesh.orchestrator.addr, "seed_inp_ddim_s07", &[]);
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[tokio::test]
async fn sdctl_depth_through_separate_processes_equals_diffusers_by_seed() {
    let mesh = Mesh::start("sd2-depth-tiny").await;
    assert!(mesh.depth.is_some(), "the depth checkpoint starts the depth service");
    check_seed_case("depth", &mesh.orchestrator.addr, "seed_depth_ddim_s08", &[]);

    // The depth service on its own: the map as a tensor and as a 16-bit PNG.
    let depth = mesh.depth.as_ref().unwrap();
    let channel = tonic::transport::Endpoint::from_shared(depth.addr.clone()).unwrap().connect().await.unwrap();
    let mut client = v1::depth_client::DepthClient::new(channel);
    let image = std::fs::read(inputs("img48x64.png")).unwrap();
    let response = client
        .estimate(v1::EstimateDepthRequest { images: vec![image.into()], resize_to_input: true, return_png: true })
        .await
        .unwrap()
        .into_inner();
    let map = &response.maps[0];
    let resized = map.resized.as_ref().unwrap().to_candle("resized", &candle_core::Device::Cpu).unwrap();
    assert_eq!(resized.dims(), &[48, 64]);
    let decoder = png::Decoder::new(std::io::Cursor::new(map.png.clone()));
    let reader = decoder.read_info().unwrap();
    let info = reader.info();
    assert_eq!(
        (info.width, info.height, info.bit_depth, info.color_type),
        (64, 48, png::BitDepth::Sixteen, png::ColorType::Grayscale)
    );
    let err = client
        .estimate(v1::EstimateDepthRequest {
            images: vec![bytes::Bytes::from_static(b"not an image")],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
}

/// `sdmesh serve --also-model`: sd21-tiny, sd2-inpaint-tiny and sd2-depth-tiny have the same
/// text encoder and vae (as every SD 2.x checkpoint but the upscaler does), so one process
/// serves the three on one text-encoder and one vae service, and a unet each (its log says
/// which services each model has); each model's job still equals diffusers by seed.
#[tokio::test]
async fn sdmesh_serve_shares_the_text_encoder_and_vae_its_models_have_in_common() {
    let (inpaint, depth) = (model("sd2-inpaint-tiny"), model("sd2-depth-tiny"));
    let (serve, log) = sdmesh_testkit::process::start_with_json_log(
        "sdmesh",
        &[
            "serve",
            "--model",
            model("sd21-tiny").to_str().unwrap(),
            "--also-model",
            &format!("inpaint={}", inpaint.to_str().unwrap()),
            "--also-model",
            &format!("depth={}", depth.to_str().unwrap()),
        ],
        "warn,sdmesh::mesh=info",
    );
    sdmesh_testkit::process::wait_serving(&serve.addr).await;
    let mut services = Vec::new();
    while services.len() < 3 {
        let line = log.recv_timeout(std::time::Duration::from_secs(30)).expect("a log line per model's services");
        if line["fields"]["message"] == "a model's services" {
            services.push(line["fields"].clone());
        }
    }
    assert_eq!(services.len(), 3, "{services:?}");
    let of = |i: usize, service: &str| services[i][service].as_str().unwrap().to_string();
    for i in 1..3 {
        assert_eq!(of(i, "text_encoder"), of(0, "text_encoder"), "{services:?}");
        assert_eq!(of(i, "vae"), of(0, "vae"), "{services:?}");
        assert_ne!(of(i, "unet"), of(0, "unet"), "{services:?}");
    }
    assert!(of(2, "depth").starts_with("http://") && of(0, "depth").is_empty(), "{services:?}");

    check_seed_case("depth", &serve.addr, "seed_depth_ddim_s08", &["--model-name", "depth"]);
    check_seed_case("inpaint", &serve.addr, "seed_inp_ddim_s07", &["--model-name", "inpaint"]);
    check_seed_case("img2img", &serve.addr, "seed_i2i_sd21_ddim_s075", &[]);
}
