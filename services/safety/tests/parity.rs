//! Parity with diffusers' StableDiffusionSafetyChecker + transformers' CLIPImageProcessor(Pil) on the
//! committed tiny checker (tests/fixtures/models/safety-checker-tiny, references in
//! tests/fixtures/reference-safety, made by tests/fixtures/generate_safety.py).

use bytes::Bytes;
use candle_core::{DType, Device, Tensor};
use sdmesh_core::{SafetyChecker, SafetyVerdict};
use sdmesh_safety::{LocalSafety, SafetyClient, SafetyOptions, SafetyService};
use sdmesh_testkit::{assert_close, fixtures, load_fixture_json, load_fixture_tensors, max_abs_diff, model};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const MODEL: &str = "safety-checker-tiny";

fn reference() -> &'static HashMap<String, Tensor> {
    static R: OnceLock<HashMap<String, Tensor>> = OnceLock::new();
    R.get_or_init(|| load_fixture_tensors("reference-safety/reference.safetensors"))
}

fn meta() -> serde_json::Value {
    load_fixture_json("reference-safety/reference.json")
}

/// The PNG cases in the reference's order.
fn cases() -> Vec<String> {
    meta()["png_cases"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap().to_string()).collect()
}

fn png_bytes(name: &str) -> Bytes {
    let path = fixtures().join("reference-safety").join(format!("{name}.png"));
    Bytes::from(std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

fn load(dir: &Path) -> LocalSafety {
    LocalSafety::load(&SafetyOptions { queue_capacity: 8, ..SafetyOptions::new(dir.to_path_buf(), Device::Cpu) })
        .unwrap()
}

fn report(what: &str, actual: &Tensor, expected: &Tensor, tol: f32) -> f32 {
    assert_close(what, actual, expected, tol);
    let err = max_abs_diff(actual, expected).0;
    eprintln!("{what}: max abs error {err:e}");
    err
}

/// The expected verdicts for rows of `prefix` (scores from the tensors, flags from the JSON).
fn expected_verdicts(prefix: &str, flags: &[bool]) -> Vec<SafetyVerdict> {
    let r = reference();
    let concept = r[&format!("{prefix}.concept_scores")].to_vec2::<f32>().unwrap();
    let special = r[&format!("{prefix}.special_scores")].to_vec2::<f32>().unwrap();
    concept
        .into_iter()
        .zip(special)
        .zip(flags)
        .map(|((concept_scores, special_scores), &flagged)| SafetyVerdict { flagged, concept_scores, special_scores })
        .collect()
}

fn png_flags() -> Vec<bool> {
    meta()["png_cases"].as_array().unwrap().iter().map(|c| c["flagged"].as_bool().unwrap()).collect()
}

fn pixel_flags() -> Vec<bool> {
    meta()["pixel_case"]["has_nsfw_concepts"].as_array().unwrap().iter().map(|f| f.as_bool().unwrap()).collect()
}

/// Scores to 1e-4 (they are rounded to 1e-3 and the fixtures keep every raw score away from the
/// rounding boundaries, so in practice they are equal) and flags exactly.
fn assert_verdicts(what: &str, actual: &[SafetyVerdict], expected: &[SafetyVerdict]) -> f32 {
    assert_eq!(actual.len(), expected.len(), "{what}: number of verdicts");
    let mut worst = 0f32;
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert_eq!(a.flagged, e.flagged, "{what}[{i}]: flagged ({a:?} vs {e:?})");
        assert_eq!(a.special_care(), e.special_care(), "{what}[{i}]: special care");
        for (kind, x, y) in
            [("concept", &a.concept_scores, &e.concept_scores), ("special", &a.special_scores, &e.special_scores)]
        {
            assert_eq!(x.len(), y.len(), "{what}[{i}]: {kind} score count");
            for (j, (p, q)) in x.iter().zip(y).enumerate() {
                let err = (p - q).abs();
                assert!(err <= 1e-4, "{what}[{i}]: {kind} score {j}: {p} vs {q}");
                worst = worst.max(err);
            }
        }
    }
    eprintln!("{what}: verdicts equal, worst score error {worst:e}");
    worst
}

/// The fixtures cover what they should: flagged through a concept, only through the special-care
/// adjustment, a near miss, clean; in the PNGs and in the decoded batch.
#[test]
fn fixtures_cover_both_sides_of_the_thresholds() {
    let m = meta();
    let outcomes: Vec<&str> =
        m["png_cases"].as_array().unwrap().iter().map(|c| c["outcome"].as_str().unwrap()).collect();
    for o in ["concept", "special", "concept+special", "near", "clean"] {
        assert!(outcomes.contains(&o), "no PNG case is {o}: {outcomes:?}");
    }
    let flags = pixel_flags();
    assert!(flags.contains(&true) && flags.contains(&false), "{flags:?}");
}

/// CLIPImageProcessor(Pil): PNG -> pixel_values (resize shortest edge, center crop, rescale,
/// normalise; greyscale and RGBA inputs; a padding variant).
#[test]
fn preprocessing_matches_transformers() {
    let (_, pre) = sdmesh_safety::load_model(&model(MODEL), &Device::Cpu, DType::F32).unwrap();
    let r = reference();
    let mut worst = 0f32;
    for name in cases() {
        let rgb = sdmesh_safety::decode_image(0, &png_bytes(&name)).unwrap();
        let pv = pre.pixel_values(&rgb, &Device::Cpu).unwrap();
        // PIL's resize and alpha blending are reproduced exactly, so only float rounding remains.
        worst = worst.max(report(&format!("{name}.pixel_values"), &pv, &r[&format!("{name}.pixel_values")], 1e-6));
    }
    // shortest_edge 44 < crop 56: the crop pads with zeros (which are then normalised).
    let mut config = pre.config.clone();
    config.size = sdmesh_safety::preprocess::SizeSpec::ShortestEdge { shortest_edge: 44 };
    let pad = sdmesh_safety::preprocess::Preprocessor::new(config).unwrap();
    for name in ["wide", "thin"] {
        let rgb = sdmesh_safety::decode_image(0, &png_bytes(name)).unwrap();
        let pv = pad.pixel_values(&rgb, &Device::Cpu).unwrap();
        worst = worst.max(report(&format!("pad.{name}"), &pv, &r[&format!("pad.{name}.pixel_values")], 1e-6));
    }
    eprintln!("preprocessing: worst max abs error {worst:e}");
}

/// The decoded-tensor path: numpy_to_pil's quantisation (half to even) and the preprocessing.
#[test]
fn pixels_preprocessing_matches_the_pipeline() {
    let (_, pre) = sdmesh_safety::load_model(&model(MODEL), &Device::Cpu, DType::F32).unwrap();
    let r = reference();
    let images = sdmesh_safety::pixels_to_images(&r["pixels.input"]).unwrap();
    let u8s: Vec<f32> = images.iter().flat_map(|i| i.as_raw().iter().map(|&v| f32::from(v))).collect();
    let u8s = Tensor::from_vec(u8s, r["pixels.u8"].dims(), &Device::Cpu).unwrap();
    assert_eq!(max_abs_diff(&u8s, &r["pixels.u8"]).0, 0.0, "numpy_to_pil quantisation");
    // Rounding halves away from zero would not do: the fixture has x * 255 == k + 0.5 with k even.
    let naive: Vec<f32> = r["pixels.input"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| (x * 255.0).round())
        .collect();
    let naive = Tensor::from_vec(naive, r["pixels.u8"].dims(), &Device::Cpu).unwrap();
    assert!(max_abs_diff(&naive, &r["pixels.u8"]).0 > 0.0, "the fixture should exercise half-to-even");
    let pv: Vec<Tensor> = images.iter().map(|i| pre.pixel_values(i, &Device::Cpu).unwrap()).collect();
    report("pixels.pixel_values", &Tensor::cat(&pv, 0).unwrap(), &r["pixels.pixel_values"], 1e-6);
}

/// The model alone from the reference pixel_values: pooled output, image embeddings, cosine
/// similarities, and the verdicts; one image at a time and batched.
#[test]
fn model_matches_diffusers_from_pixel_values() {
    let (checker, _) = sdmesh_safety::load_model(&model(MODEL), &Device::Cpu, DType::F32).unwrap();
    let r = reference();
    let mut worst = 0f32;
    let mut prefixes: Vec<String> = cases();
    prefixes.push("pixels".into());
    for prefix in &prefixes {
        let key = |k: &str| format!("{prefix}.{k}");
        let t = checker.forward_trace(&r[&key("pixel_values")]).unwrap();
        worst = worst.max(report(&key("pooled_output"), &t.pooled_output, &r[&key("pooled_output")], 1e-4));
        worst = worst.max(report(&key("image_embeds"), &t.image_embeds, &r[&key("image_embeds")], 1e-4));
        worst = worst.max(report(&key("special_cos_dist"), &t.special_cos_dist, &r[&key("special_cos_dist")], 1e-4));
        worst = worst.max(report(&key("cos_dist"), &t.cos_dist, &r[&key("cos_dist")], 1e-4));
    }
    // All PNGs in one batch (their pixel_values are the single ones, concatenated).
    let batch: Vec<Tensor> = cases().iter().map(|n| r[&format!("{n}.pixel_values")].clone()).collect();
    let batch = Tensor::cat(&batch, 0).unwrap();
    let t = checker.forward_trace(&batch).unwrap();
    worst = worst.max(report("png_batch.image_embeds", &t.image_embeds, &r["png_batch.image_embeds"], 1e-4));
    worst = worst.max(report("png_batch.cos_dist", &t.cos_dist, &r["png_batch.cos_dist"], 1e-4));
    worst =
        worst.max(report("png_batch.special_cos_dist", &t.special_cos_dist, &r["png_batch.special_cos_dist"], 1e-4));
    assert_verdicts("png_batch", &checker.forward(&batch).unwrap(), &expected_verdicts("png_batch", &png_flags()));
    assert_verdicts(
        "pixels",
        &checker.forward(&r["pixels.pixel_values"]).unwrap(),
        &expected_verdicts("pixels", &pixel_flags()),
    );
    eprintln!("model only: worst max abs error {worst:e}");
}

/// PNG bytes -> verdicts through the service's local implementation, one per call and all in one call.
#[tokio::test]
async fn check_images_matches_diffusers() {
    let local = load(&model(MODEL));
    let flags = png_flags();
    let expected = expected_verdicts("png_batch", &flags);
    for (i, name) in cases().iter().enumerate() {
        let got = local.check_images(vec![png_bytes(name)]).await.unwrap();
        assert_verdicts(name, &got, &expected_verdicts(name, &flags[i..=i]));
    }
    let all: Vec<Bytes> = cases().iter().map(|n| png_bytes(n)).collect();
    let got = local.check_images(all).await.unwrap();
    assert_verdicts("all PNGs in one call", &got, &expected);
    let m = meta();
    for (v, c) in got.iter().zip(m["png_cases"].as_array().unwrap()) {
        assert_eq!(v.special_care(), c["special_care"].as_bool().unwrap(), "{}", c["name"]);
    }
}

/// Decoded images (f32 NHWC in [0, 1]) -> verdicts through the SafetyChecker trait, and what the
/// pipeline returns for them (flagged -> black).
#[tokio::test]
async fn check_pixels_matches_the_pipeline() {
    let local = load(&model(MODEL));
    let r = reference();
    let flags = pixel_flags();
    let got = SafetyChecker::check(&local, r["pixels.input"].clone()).await.unwrap();
    assert_verdicts("pixels (batch)", &got, &expected_verdicts("pixels", &flags));
    for (i, v) in got.iter().enumerate() {
        let single = SafetyChecker::check(&local, r["pixels.input"].narrow(0, i, 1).unwrap()).await.unwrap();
        assert_eq!(&single[0], v, "pixels[{i}] alone");
        // The pipeline's output: black where flagged, the decoded image otherwise.
        let out = r["pixels.output"].get(i).unwrap();
        let black = out.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() == 0.0;
        assert_eq!(black, v.flagged, "pixels[{i}]: black output iff flagged");
        if !v.flagged {
            assert_eq!(max_abs_diff(&out, &r["pixels.input"].get(i).unwrap()).0, 0.0);
        }
    }
}

/// A diffusers pipeline folder and a checker folder load; so does the transformers 5 weight layout
/// (`vision_model.*` instead of `vision_model.vision_model.*`).
#[tokio::test]
async fn loads_a_checker_folder_and_the_transformers5_layout() {
    let src = model(MODEL);
    let root = std::env::temp_dir().join(format!("sdmesh-safety-flat-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    std::fs::copy(src.join("safety_checker/config.json"), root.join("config.json")).unwrap();
    std::fs::copy(src.join("feature_extractor/preprocessor_config.json"), root.join("preprocessor_config.json"))
        .unwrap();
    let weights = candle_core::safetensors::load(src.join("safety_checker/model.safetensors"), &Device::Cpu).unwrap();
    assert!(weights.keys().any(|k| k.starts_with("vision_model.vision_model.")), "the fixture has the CompVis layout");
    let renamed: HashMap<String, Tensor> = weights
        .into_iter()
        .map(|(k, v)| match k.strip_prefix("vision_model.vision_model.") {
            Some(rest) => (format!("vision_model.{rest}"), v),
            None => (k, v),
        })
        .collect();
    assert!(renamed.keys().all(|k| !k.starts_with("vision_model.vision_model.")));
    candle_core::safetensors::save(&renamed, root.join("model.safetensors")).unwrap();
    let local = load(&root);
    let got = local.check_images(vec![png_bytes("tall_grey"), png_bytes("square")]).await.unwrap();
    let flags = png_flags();
    let names = cases();
    let idx = |n: &str| names.iter().position(|c| c == n).unwrap();
    let expected = expected_verdicts("png_batch", &flags);
    assert_verdicts(
        "transformers 5 layout",
        &got,
        &[expected[idx("tall_grey")].clone(), expected[idx("square")].clone()],
    );
    std::fs::remove_dir_all(root).ok();

    let err = LocalSafety::load(&SafetyOptions { queue_capacity: 1, ..SafetyOptions::new(fixtures(), Device::Cpu) })
        .err()
        .expect("not a model folder")
        .to_string();
    assert!(err.contains("safety_checker"), "{err}");
}

/// A preprocessing whose output is not the model's input size is refused at load, naming the file.
#[test]
fn mismatched_crop_is_refused() {
    let src = model(MODEL);
    let root = temp_pipeline(&src, "crop");
    let path = root.join("feature_extractor/preprocessor_config.json");
    let mut pre: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    pre["crop_size"] = serde_json::json!({"height": 42, "width": 42});
    std::fs::write(&path, pre.to_string()).unwrap();
    let err = LocalSafety::load(&SafetyOptions { queue_capacity: 1, ..SafetyOptions::new(root.clone(), Device::Cpu) })
        .err()
        .expect("crop 42 on a 56 model")
        .to_string();
    assert!(err.contains("preprocessor_config.json") && err.contains("56x56"), "{err}");
    std::fs::remove_dir_all(root).ok();
}

fn temp_pipeline(src: &Path, tag: &str) -> PathBuf {
    let root = std::env::temp_dir().join(format!("sdmesh-safety-{tag}-{}", std::process::id()));
    for sub in ["safety_checker", "feature_extractor"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
        for entry in std::fs::read_dir(src.join(sub)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), root.join(sub).join(entry.file_name())).unwrap();
        }
    }
    root
}

#[tokio::test]
async fn bad_inputs_are_invalid_argument() {
    let local = load(&model(MODEL));
    let good = png_bytes("square");
    let cases: Vec<(&str, Vec<Bytes>, &str)> = vec![
        ("empty request", vec![], "expected 1..="),
        ("too many images", vec![good.clone(); sdmesh_safety::MAX_IMAGES + 1], "expected 1..="),
        ("empty image", vec![good.clone(), Bytes::new()], "images[1]: empty"),
        ("not an image", vec![Bytes::from_static(b"definitely not a png")], "images[0]: not a PNG or JPEG"),
        ("truncated PNG", vec![good.slice(..good.len() / 2)], "images[0]"),
    ];
    for (what, images, message) in cases {
        let err = local.check_images(images).await.expect_err(what);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{what}: {err}");
        assert!(err.to_string().contains(message), "{what}: {err}");
    }
    let cpu = Device::Cpu;
    let pixel_cases: Vec<(&str, Tensor, &str)> = vec![
        ("NCHW", Tensor::zeros((1, 3, 8, 8), DType::F32, &cpu).unwrap(), "expected [n, height, width, 3]"),
        ("3-D", Tensor::zeros((8, 8, 3), DType::F32, &cpu).unwrap(), "expected [n, height, width, 3]"),
        ("no images", Tensor::zeros((0, 8, 8, 3), DType::F32, &cpu).unwrap(), "expected 1..="),
        (
            "too many",
            Tensor::zeros((sdmesh_safety::MAX_IMAGES + 1, 2, 2, 3), DType::F32, &cpu).unwrap(),
            "expected 1..=",
        ),
        ("f16", Tensor::zeros((1, 8, 8, 3), DType::F16, &cpu).unwrap(), "expected F32"),
        ("out of range", (Tensor::ones((1, 4, 4, 3), DType::F32, &cpu).unwrap() * 1.5).unwrap(), "must be in [0, 1]"),
        ("negative", (Tensor::ones((1, 4, 4, 3), DType::F32, &cpu).unwrap() * -0.1).unwrap(), "must be in [0, 1]"),
        ("NaN", (Tensor::zeros((1, 4, 4, 3), DType::F32, &cpu).unwrap() / 0.0).unwrap(), "must be in [0, 1]"),
        ("too large", Tensor::zeros((1, 4097, 4096, 3), DType::U8, &cpu).unwrap(), "pixels each"),
    ];
    for (what, pixels, message) in pixel_cases {
        let err = SafetyChecker::check(&local, pixels).await.expect_err(what);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{what}: {err}");
        assert!(err.to_string().contains(message), "{what}: {err}");
    }
}

/// Check over gRPC in process: both input forms, Info, the trait's client, errors keep their code.
#[tokio::test]
async fn grpc_round_trip() {
    let local = load(&model(MODEL));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(SafetyService::new(local).server())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let url = format!("http://{addr}");
    let client = SafetyClient::new(&url).unwrap();
    let info = client.info().await.unwrap();
    assert_eq!(
        (info.height, info.width, info.shortest_edge, info.concepts, info.special_care_concepts, info.projection_dim),
        (56, 56, 56, 17, 3, 16)
    );
    assert_eq!(info.max_images as usize, sdmesh_safety::MAX_IMAGES);

    let all: Vec<Bytes> = cases().iter().map(|n| png_bytes(n)).collect();
    let got = client.check_images(all).await.unwrap();
    assert_verdicts("gRPC images", &got, &expected_verdicts("png_batch", &png_flags()));

    let r = reference();
    let got = SafetyChecker::check(&client, r["pixels.input"].clone()).await.unwrap();
    assert_verdicts("gRPC pixels", &got, &expected_verdicts("pixels", &pixel_flags()));

    // The raw messages: special_care is set, both / neither input is refused.
    let mut raw = sdmesh_proto::v1::safety_client::SafetyClient::connect(url).await.unwrap();
    let resp = raw
        .check(sdmesh_proto::v1::CheckImagesRequest { images: vec![png_bytes("tall_grey").to_vec()], pixels: None })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.verdicts[0].special_care && resp.verdicts[0].flagged);
    let pixels = sdmesh_proto::v1::Tensor::from_candle(&r["pixels.input"]).unwrap();
    for (what, request, message) in [
        (
            "both",
            sdmesh_proto::v1::CheckImagesRequest {
                images: vec![png_bytes("square").to_vec()],
                pixels: Some(pixels.clone()),
            },
            "exactly one",
        ),
        ("neither", sdmesh_proto::v1::CheckImagesRequest { images: vec![], pixels: None }, "no input"),
        (
            "not an image",
            sdmesh_proto::v1::CheckImagesRequest { images: vec![b"nope".to_vec()], pixels: None },
            "not a PNG or JPEG",
        ),
        (
            "u8 pixels",
            sdmesh_proto::v1::CheckImagesRequest {
                images: vec![],
                pixels: Some(
                    sdmesh_proto::v1::Tensor::from_candle(&r["pixels.input"].to_dtype(DType::U8).unwrap()).unwrap(),
                ),
            },
            "DTYPE_F32",
        ),
        (
            "bad byte length",
            sdmesh_proto::v1::CheckImagesRequest {
                images: vec![],
                pixels: Some(sdmesh_proto::v1::Tensor { data: pixels.data.slice(..16), ..pixels.clone() }),
            },
            "bytes do not match",
        ),
    ] {
        let err = raw.check(request).await.expect_err(what);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{what}: {err:?}");
        assert!(err.message().contains(message), "{what}: {}", err.message());
    }
    server.abort();
}

/// f16 (the GPU dtype) against the f32 reference, on candle's CPU kernels: the cosine
/// similarities the verdicts come from (scored in f32 from f16 embeddings). bf16 is checked on
/// a GPU only (benchmarks/gpu): candle's CPU matmul has no bf16. Measured error 1.2e-3, bound
/// 3e-3.
#[test]
fn half_precision_agrees_with_the_f32_reference() {
    let (checker, _) = sdmesh_safety::load_model(&model(MODEL), &Device::Cpu, DType::F16).unwrap();
    let r = reference();
    let mut worst = 0f32;
    for prefix in cases() {
        let key = |k: &str| format!("{prefix}.{k}");
        let t = checker.forward_trace(&r[&key("pixel_values")]).unwrap();
        worst =
            worst.max(report(&key("f16 special_cos_dist"), &t.special_cos_dist, &r[&key("special_cos_dist")], 3e-3));
        worst = worst.max(report(&key("f16 cos_dist"), &t.cos_dist, &r[&key("cos_dist")], 3e-3));
    }
    eprintln!("f16: worst max abs error {worst:e}");
}
