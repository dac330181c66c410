//! Parity with transformers' DPTForDepthEstimation (hybrid) + DPTImageProcessor on the committed
//! tiny model (tests/fixtures/models/dpt-hybrid-tiny, references in tests/fixtures/reference-depth,
//! made by tests/fixtures/generate_depth.py).

use bytes::Bytes;
use candle_core::{DType, Device, Tensor};
use sdmesh_core::DepthEstimator;
use sdmesh_depth::preprocess::Preprocessor;
use sdmesh_depth::{DepthClient, DepthOptions, DepthService, EstimateOptions, LocalDepth};
use sdmesh_testkit::{assert_close, fixtures, load_fixture_tensors, max_abs_diff, model};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const CASES: [&str; 3] = ["square", "wide", "tall_grey"];

fn reference() -> HashMap<String, Tensor> {
    load_fixture_tensors("reference-depth/reference.safetensors")
}

fn png_bytes(name: &str) -> Bytes {
    let path = fixtures().join("reference-depth").join(format!("{name}.png"));
    Bytes::from(std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

fn load(dir: &Path) -> LocalDepth {
    LocalDepth::load(&DepthOptions { queue_capacity: 8, ..DepthOptions::new(dir.to_path_buf(), Device::Cpu) }).unwrap()
}

/// The tiny model with its preprocessor config changed to keep_aspect_ratio + ensure_multiple_of 32
/// (MiDaS's own transform), in a temporary transformers folder.
fn keep_aspect_model() -> PathBuf {
    let src = model("dpt-hybrid-tiny");
    let dir = std::env::temp_dir().join(format!("sdmesh-depth-keep-aspect-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut pre: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("preprocessor_config.json")).unwrap()).unwrap();
    pre["keep_aspect_ratio"] = true.into();
    pre["ensure_multiple_of"] = 32.into();
    std::fs::write(dir.join("preprocessor_config.json"), pre.to_string()).unwrap();
    dir
}

fn report(what: &str, actual: &Tensor, expected: &Tensor, tol: f32) -> f32 {
    assert_close(what, actual, expected, tol);
    let err = max_abs_diff(actual, expected).0;
    eprintln!("{what}: max abs error {err:e}");
    err
}

/// The model alone, from the reference pixel_values: default (64x64) inputs, keep-aspect inputs
/// (64x96, 64x32: resized position embeddings, non-square token grid) and the odd 4x3 grid.
#[test]
fn model_matches_transformers_from_pixel_values() {
    let (dpt, _) = sdmesh_depth::load_model(&model("dpt-hybrid-tiny"), &Device::Cpu, DType::F32).unwrap();
    let r = reference();
    let mut worst = 0f32;
    let mut keys: Vec<String> = CASES.iter().flat_map(|c| [c.to_string(), format!("{c}.keep_aspect")]).collect();
    keys.push("odd".into());
    for key in keys {
        let depth = dpt.forward(&r[&format!("{key}.pixel_values")]).unwrap().squeeze(0).unwrap();
        worst = worst.max(report(&key, &depth, &r[&format!("{key}.predicted_depth")], 1e-4));
    }
    eprintln!("model only: worst max abs error {worst:e}");
}

/// Layer by layer, for the square default input and the wide keep-aspect one.
#[test]
fn intermediates_match_transformers() {
    let (dpt, _) = sdmesh_depth::load_model(&model("dpt-hybrid-tiny"), &Device::Cpu, DType::F32).unwrap();
    let r = reference();
    for prefix in ["square", "wide.keep_aspect"] {
        let t = dpt.forward_trace(&r[&format!("{prefix}.pixel_values")]).unwrap();
        let key = |k: &str| format!("{prefix}.{k}");
        report(&key("backbone.stem"), &t.backbone.stem, &r[&key("backbone.stem")], 1e-4);
        for (s, map) in t.backbone.stages.iter().enumerate() {
            let k = key(&format!("backbone.stage{}", s + 1));
            report(&k, map, &r[&k], 1e-4);
        }
        report(&key("embeddings"), &t.embeddings, &r[&key("embeddings")], 1e-4);
        report(&key("encoder.layer1"), &t.layers[1], &r[&key("encoder.layer1")], 1e-4);
        report(&key("encoder.layer3"), &t.layers[3], &r[&key("encoder.layer3")], 1e-4);
        for (s, map) in t.fused.iter().enumerate() {
            let k = key(&format!("neck.fusion{s}"));
            report(&k, map, &r[&k], 1e-4);
        }
    }
}

/// DPTImageProcessor(Pil): PNG -> pixel_values, default and keep-aspect configs.
#[test]
fn preprocessing_matches_transformers() {
    let (_, pre) = sdmesh_depth::load_model(&model("dpt-hybrid-tiny"), &Device::Cpu, DType::F32).unwrap();
    let mut ka_config = pre.config.clone();
    ka_config.keep_aspect_ratio = true;
    ka_config.ensure_multiple_of = 32;
    let pre_ka = Preprocessor::new(ka_config).unwrap();
    let r = reference();
    for name in CASES {
        let rgb = sdmesh_core::images::decode_rgb(&png_bytes(name)).unwrap();
        for (p, key) in [(&pre, name.to_string()), (&pre_ka, format!("{name}.keep_aspect"))] {
            let pv = p.pixel_values(&rgb, &Device::Cpu).unwrap();
            // PIL's resize is reproduced exactly, so only float rounding of x/255 remains.
            report(&format!("{key}.pixel_values"), &pv, &r[&format!("{key}.pixel_values")], 1e-6);
        }
    }
}

/// PNG bytes -> depth through the service's local implementation (preprocessing + model), and the
/// resized map of post_process_depth_estimation.
#[tokio::test]
async fn estimate_from_png_matches_transformers() {
    let local = load(&model("dpt-hybrid-tiny"));
    let info = DepthEstimator::info(&local).await.unwrap();
    assert_eq!((info.height, info.width, info.ensure_multiple_of, info.keep_aspect_ratio), (64, 64, 1, false));
    let r = reference();
    let images: Vec<Bytes> = CASES.iter().map(|c| png_bytes(c)).collect();
    let depths = local.estimate(images.clone()).await.unwrap();
    let maps = local.estimate_maps(images, EstimateOptions { resize_to_input: true, return_png: false }).await.unwrap();
    for (i, name) in CASES.iter().enumerate() {
        report(&format!("{name} from PNG"), &depths[i], &r[&format!("{name}.predicted_depth")], 1e-4);
        let resized = maps[i].resized.as_ref().expect("resized");
        report(&format!("{name} resized"), resized, &r[&format!("{name}.resized")], 1e-4);
    }

    let ka = keep_aspect_model();
    let local = load(&ka);
    assert!(DepthEstimator::info(&local).await.unwrap().keep_aspect_ratio);
    for name in CASES {
        let depth = local.estimate(vec![png_bytes(name)]).await.unwrap().remove(0);
        report(
            &format!("{name} keep-aspect from PNG"),
            &depth,
            &r[&format!("{name}.keep_aspect.predicted_depth")],
            1e-4,
        );
    }
    std::fs::remove_dir_all(ka).ok();
}

/// A diffusers pipeline folder (depth_estimator/ + feature_extractor/) loads as well.
#[tokio::test]
async fn loads_a_pipeline_folder() {
    let root = std::env::temp_dir().join(format!("sdmesh-depth-pipeline-{}", std::process::id()));
    let (de, fe) = (root.join("depth_estimator"), root.join("feature_extractor"));
    std::fs::create_dir_all(&de).unwrap();
    std::fs::create_dir_all(&fe).unwrap();
    let src = model("dpt-hybrid-tiny");
    std::fs::copy(src.join("config.json"), de.join("config.json")).unwrap();
    std::fs::copy(src.join("model.safetensors"), de.join("model.safetensors")).unwrap();
    std::fs::copy(src.join("preprocessor_config.json"), fe.join("preprocessor_config.json")).unwrap();
    let local = load(&root);
    let depth = local.estimate(vec![png_bytes("square")]).await.unwrap().remove(0);
    assert_close("pipeline folder", &depth, &reference()["square.predicted_depth"], 1e-4);
    std::fs::remove_dir_all(root).ok();
    // A folder that is neither names what it looked for.
    let err = LocalDepth::load(&DepthOptions { queue_capacity: 1, ..DepthOptions::new(fixtures(), Device::Cpu) })
        .err()
        .expect("not a model folder")
        .to_string();
    assert!(err.contains("depth_estimator"), "{err}");
}

#[tokio::test]
async fn bad_inputs_are_invalid_argument() {
    let local = load(&model("dpt-hybrid-tiny"));
    let good = png_bytes("square");
    let cases: Vec<(&str, Vec<Bytes>, &str)> = vec![
        ("empty request", vec![], "expected 1..="),
        ("too many images", vec![good.clone(); sdmesh_depth::MAX_IMAGES + 1], "expected 1..="),
        ("empty image", vec![good.clone(), Bytes::new()], "images[1]: empty"),
        ("not an image", vec![Bytes::from_static(b"definitely not a png")], "images[0]: not a PNG or JPEG"),
        ("truncated PNG", vec![good.slice(..good.len() / 2)], "images[0]"),
    ];
    for (what, images, message) in cases {
        let err = local.estimate(images).await.expect_err(what);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{what}: {err}");
        assert!(err.to_string().contains(message), "{what}: {err}");
    }
    // An image whose aspect ratio collapses the short side under keep_aspect_ratio.
    let ka = keep_aspect_model();
    let local = load(&ka);
    let err = local.estimate(vec![png(600, 2)]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.to_string().contains("too elongated"), "{err}");
    std::fs::remove_dir_all(ka).ok();
}

/// An 8-bit RGB PNG of the given size.
fn png(width: u32, height: u32) -> Bytes {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, width, height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().unwrap();
    w.write_image_data(&vec![128u8; (width * height * 3) as usize]).unwrap();
    w.finish().unwrap();
    Bytes::from(out)
}

/// Estimate over gRPC in process: depth, resized map and 16-bit PNG; Info; errors keep their code.
#[tokio::test]
async fn grpc_round_trip() {
    let local = load(&model("dpt-hybrid-tiny"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(DepthService::new(local).server())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let client = DepthClient::new(&format!("http://{addr}")).unwrap();
    let info = DepthEstimator::info(&client).await.unwrap();
    assert_eq!((info.height, info.width), (64, 64));

    let r = reference();
    let images: Vec<Bytes> = ["wide", "tall_grey"].iter().map(|c| png_bytes(c)).collect();
    let maps = client
        .estimate_maps(images.clone(), EstimateOptions { resize_to_input: true, return_png: true })
        .await
        .unwrap();
    for (map, (name, (w, h))) in maps.iter().zip([("wide", (100u32, 60u32)), ("tall_grey", (45, 70))]) {
        assert_close(name, &map.depth, &r[&format!("{name}.predicted_depth")], 1e-4);
        let resized = map.resized.as_ref().expect("resized");
        assert_close(name, resized, &r[&format!("{name}.resized")], 1e-4);
        let decoder = png::Decoder::new(std::io::Cursor::new(map.png.clone().expect("png")));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let frame = reader.next_frame(&mut buf).unwrap();
        assert_eq!((frame.width, frame.height), (w, h), "{name}: PNG of the resized map");
        assert_eq!((frame.color_type, frame.bit_depth), (png::ColorType::Grayscale, png::BitDepth::Sixteen));
        let values: Vec<u16> = buf[..frame.buffer_size()].chunks(2).map(|b| u16::from_be_bytes([b[0], b[1]])).collect();
        assert_eq!((values.iter().min(), values.iter().max()), (Some(&0), Some(&65535)), "{name}: min..max scaled");
    }
    // Without resize_to_input the PNG is of the model-resolution map; no PNG unless asked.
    let maps = client
        .estimate_maps(images[..1].to_vec(), EstimateOptions { resize_to_input: false, return_png: true })
        .await
        .unwrap();
    assert!(maps[0].resized.is_none());
    let reader = png::Decoder::new(std::io::Cursor::new(maps[0].png.clone().unwrap())).read_info().unwrap();
    assert_eq!((reader.info().width, reader.info().height), (64, 64));
    let depths = client.estimate(images).await.unwrap();
    assert_close("trait over gRPC", &depths[1], &r["tall_grey.predicted_depth"], 1e-4);

    let err = client.estimate_maps(vec![Bytes::from_static(b"nope")], EstimateOptions::default()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.to_string().contains("not a PNG or JPEG"), "{err}");
    server.abort();
}

/// f16 (the GPU dtype) against the f32 reference, on candle's CPU kernels: measured error 1.0e-2
/// on depths up to 3.4, bound 1% of the largest depth. bf16 is checked on a GPU only
/// (benchmarks/gpu): candle's CPU matmul has no bf16.
#[test]
fn half_precision_agrees_with_the_f32_reference() {
    let (dpt, _) = sdmesh_depth::load_model(&model("dpt-hybrid-tiny"), &Device::Cpu, DType::F16).unwrap();
    let r = reference();
    for key in CASES {
        let depth = dpt.forward(&r[&format!("{key}.pixel_values")]).unwrap().squeeze(0).unwrap();
        let expected = &r[&format!("{key}.predicted_depth")];
        let scale = expected.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let err = max_abs_diff(&depth, expected).0;
        eprintln!("f16 {key}: max abs error {err:e} (depth up to {scale})");
        assert!(err <= 1e-2 * scale.max(1.0), "f16 {key}: max abs error {err:e} against depths up to {scale}");
    }
}
