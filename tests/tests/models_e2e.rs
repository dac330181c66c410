//! Several models behind one orchestrator, across real processes: an orchestrator over
//! sd21-base-tiny's services (its default model) and, from `--models-file`, over
//! sd2-inpaint-tiny's. ListModels (and `sdctl models`) says what each can do; each request runs
//! on the model it names, with the bytes an orchestrator of that model alone gives; an unknown
//! name is INVALID_ARGUMENT naming the served models. Each model has its own places to run
//! (`--max-jobs` holds per model), and jobs are counted by model. `sdmesh serve --also-model`
//! does the same in one process.

use sdmesh_proto::v1;
use sdmesh_testkit::process::{bin, metric, Mesh, MeshOptions, Service};
use sdmesh_testkit::{fixtures, model};

async fn client(orchestrator: &Service) -> v1::orchestrator_client::OrchestratorClient<tonic::transport::Channel> {
    v1::orchestrator_client::OrchestratorClient::connect(orchestrator.addr.clone()).await.unwrap()
}

fn input(name: &str) -> bytes::Bytes {
    std::fs::read(fixtures().join("reference-jobs/inputs").join(name)).unwrap().into()
}

#[tokio::test]
async fn one_orchestrator_serves_each_request_on_the_model_it_names() {
    let base = Mesh::start("sd21-base-tiny").await;
    let inpaint = Mesh::start("sd2-inpaint-tiny").await;
    let file = std::env::temp_dir().join(format!("sdmesh-models-{}.toml", std::process::id()));
    let toml = format!(
        "[[models]]\nname = \"inpaint\"\nmodel = {:?}\ntext_encoder_url = {:?}\nunet_url = {:?}\nvae_url = {:?}\n",
        model("sd2-inpaint-tiny").to_str().unwrap(),
        inpaint.text_encoder.addr,
        inpaint.unet.addr,
        inpaint.vae.addr
    );
    std::fs::write(&file, toml).unwrap();
    let opts = MeshOptions {
        orchestrator_args: vec![
            "--models-file",
            file.to_str().unwrap(),
            "--metrics-listen",
            "127.0.0.1:0",
            "--max-jobs",
            "1",
            "--max-waiting-jobs",
            "0",
        ],
        ..Default::default()
    };
    let both = base.another_orchestrator("sd21-base-tiny", &opts).await;

    // What each model can do, the default first.
    let models = client(&both).await.list_models(v1::ListModelsRequest {}).await.unwrap().into_inner().models;
    let names: Vec<_> = models.iter().map(|m| (m.name.as_str(), m.is_default)).collect();
    assert_eq!(names, [("sd21-base-tiny", true), ("inpaint", false)]);
    assert_eq!(models[0].tasks, ["txt2img", "img2img", "inpaint"]);
    assert_eq!(models[1].tasks, ["inpaint"]);
    assert_eq!(models[0].prediction_type, "epsilon");
    assert!(models[0].native_height > 0 && models[0].native_height == models[0].native_width);
    assert!(!models[0].chains_upscale);

    // A request that names no model runs on the default, one that names "inpaint" on it: each
    // gives the bytes of its model's own orchestrator.
    let txt2img = v1::GenerateRequest {
        prompt: "a lighthouse".into(),
        steps: Some(4),
        seed: Some(3),
        height: Some(32),
        width: Some(32),
        ..Default::default()
    };
    let expected = client(&base.orchestrator).await.generate(txt2img.clone()).await.unwrap().into_inner();
    let got = client(&both).await.generate(txt2img.clone()).await.unwrap().into_inner();
    assert_eq!(got.images, expected.images);
    let named = v1::GenerateRequest { model: "sd21-base-tiny".into(), ..txt2img.clone() };
    assert_eq!(client(&both).await.generate(named).await.unwrap().into_inner().images, expected.images);

    let repaint = v1::GenerateRequest {
        prompt: "a red door".into(),
        steps: Some(4),
        seed: Some(11),
        image: input("img64.png"),
        mask: input("mask64.png"),
        ..Default::default()
    };
    let expected = client(&inpaint.orchestrator).await.generate(repaint.clone()).await.unwrap().into_inner();
    let request = v1::GenerateRequest { model: "inpaint".into(), ..repaint.clone() };
    let got = client(&both).await.generate_stream(request).await.unwrap().into_inner();
    let got = tokio_stream::StreamExt::collect::<Vec<_>>(got).await;
    let Some(v1::generate_event::Event::Result(got)) = got.last().unwrap().as_ref().unwrap().event.clone() else {
        panic!("the stream ends with the result")
    };
    assert_eq!(got.images.len(), 1);
    // The PNG's parameters name the model; the pixels are the inpainting orchestrator's.
    assert!(got.parameters.contains("inpaint"), "{}", got.parameters);
    let pixels = |png: &[u8]| image::load_from_memory(png).unwrap().to_rgb8().into_raw();
    assert_eq!(pixels(&got.images[0].png), pixels(&expected.images[0].png));
    // The default model cannot take the inpainting checkpoint's jobs' place: its own inpainting
    // (by blending) differs.
    let blended = client(&both).await.generate(repaint.clone()).await.unwrap().into_inner();
    assert_ne!(pixels(&blended.images[0].png), pixels(&expected.images[0].png));

    // An unknown name: INVALID_ARGUMENT, naming what is served.
    let unknown = v1::GenerateRequest { model: "sd15".into(), ..txt2img.clone() };
    let status = client(&both).await.generate(unknown).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("\"inpaint\", \"sd21-base-tiny\""), "{}", status.message());

    // sdctl: the list, and a job on the named model.
    let listed = std::process::Command::new(bin("sdctl")).args(["models", "--endpoint", &both.addr]).output().unwrap();
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8(listed.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!((lines[0]["name"].as_str(), lines[0]["default"].as_bool()), (Some("sd21-base-tiny"), Some(true)));
    assert_eq!(lines[1]["tasks"], serde_json::json!(["inpaint"]));
    let out = std::env::temp_dir().join(format!("sdmesh-models-{}.png", std::process::id()));
    let inputs = fixtures().join("reference-jobs/inputs");
    let sdctl = std::process::Command::new(bin("sdctl"))
        .args(["inpaint", "--endpoint", &both.addr, "--quiet", "--model-name", "inpaint"])
        .args(["--prompt", "a red door", "--steps", "4", "--seed", "11"])
        .arg("--image")
        .arg(inputs.join("img64.png"))
        .arg("--mask")
        .arg(inputs.join("mask64.png"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(sdctl.status.success(), "{}", String::from_utf8_lossy(&sdctl.stderr));
    assert_eq!(pixels(&std::fs::read(&out).unwrap()), pixels(&expected.images[0].png));
    std::fs::remove_file(&out).unwrap();
    std::fs::remove_file(&file).unwrap();
    // Each model has its own places: with the default model's one place taken by a long job,
    // another default job is refused at once, while the inpainting model's job runs.
    let long = v1::GenerateRequest { steps: Some(900), height: Some(128), width: Some(128), ..txt2img.clone() };
    let mut long = client(&both).await.generate_stream(long).await.unwrap().into_inner();
    long.message().await.unwrap().expect("a progress event");
    let status = client(&both).await.generate(txt2img.clone()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    let request = v1::GenerateRequest { model: "inpaint".into(), ..repaint.clone() };
    let got = client(&both).await.generate(request).await.expect("another model's place is free").into_inner();
    assert_eq!(pixels(&got.images[0].png), pixels(&expected.images[0].png));
    let text = both.scrape();
    assert_eq!(metric(&text, "sdmesh_jobs_running", &[("model", "sd21-base-tiny")]), 1.0);
    assert_eq!(metric(&text, "sdmesh_jobs_running", &[("model", "inpaint")]), 0.0);
    drop(long);

    // Jobs are counted by model.
    let text = both.scrape();
    assert_eq!(metric(&text, "sdmesh_jobs_total", &[("model", "inpaint"), ("code", "Ok")]), 3.0);
    assert_eq!(metric(&text, "sdmesh_jobs_total", &[("model", "sd21-base-tiny"), ("code", "Ok")]), 3.0);
    assert_eq!(metric(&text, "sdmesh_job_duration_seconds_count", &[("model", "inpaint")]), 3.0);
}

/// `sdmesh serve --also-model`: one process serves several models, each on its own services,
/// with the bytes of that model's own mesh.
#[tokio::test]
async fn sdmesh_serve_serves_more_models_in_one_process() {
    let inpaint = Mesh::start("sd2-inpaint-tiny").await;
    let also = format!("inpaint={}", model("sd2-inpaint-tiny").to_str().unwrap());
    let base = model("sd21-base-tiny");
    let serve = sdmesh_testkit::process::start(
        "sdmesh",
        &["serve", "--model", base.to_str().unwrap(), "--also-model", &also],
        &[],
    );
    sdmesh_testkit::process::wait_serving(&serve.addr).await;
    let models = client(&serve).await.list_models(v1::ListModelsRequest {}).await.unwrap().into_inner().models;
    let names: Vec<_> = models.iter().map(|m| (m.name.as_str(), m.tasks.clone())).collect();
    assert_eq!(
        names,
        [
            ("sd21-base-tiny", vec!["txt2img".to_string(), "img2img".into(), "inpaint".into()]),
            ("inpaint", vec!["inpaint".into()])
        ]
    );
    let repaint = v1::GenerateRequest {
        prompt: "a red door".into(),
        steps: Some(3),
        seed: Some(5),
        image: input("img64.png"),
        mask: input("mask64.png"),
        ..Default::default()
    };
    let expected = client(&inpaint.orchestrator).await.generate(repaint.clone()).await.unwrap().into_inner();
    let request = v1::GenerateRequest { model: "inpaint".into(), ..repaint };
    let got = client(&serve).await.generate(request).await.unwrap().into_inner();
    let pixels = |png: &[u8]| image::load_from_memory(png).unwrap().to_rgb8().into_raw();
    assert_eq!(pixels(&got.images[0].png), pixels(&expected.images[0].png));

    // A folder that is not a model: sdmesh serve says so and exits.
    let out = std::process::Command::new(bin("sdmesh"))
        .args(["serve", "--model", base.to_str().unwrap(), "--also-model", "x=/nonexistent"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("/nonexistent is not a diffusers-layout model folder"),
        "{stderr}"
    );
}
