//! sdmesh_core::images against PIL 13 / torch 2.15 references (tests/fixtures/reference-images/,
//! made by tests/fixtures/generate_images.py). Run with `--nocapture` to see the measured diffs.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use image::{GrayImage, RgbImage};
use sdmesh_core::images::{self, Filter};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/reference-images")
}

fn input(name: &str) -> Vec<u8> {
    std::fs::read(dir().join("inputs").join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn load(file: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join(file), &Device::Cpu).unwrap()
}

fn meta() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("images.json")).unwrap()).unwrap()
}

fn bytes_of(t: &Tensor) -> Vec<u8> {
    assert_eq!(t.dtype(), DType::U8);
    t.flatten_all().unwrap().to_vec1::<u8>().unwrap()
}

fn rgb_of(t: &Tensor) -> RgbImage {
    let (h, w, _) = t.dims3().unwrap();
    RgbImage::from_raw(w as u32, h as u32, bytes_of(t)).unwrap()
}

fn luma_of(t: &Tensor) -> GrayImage {
    let (h, w) = t.dims2().unwrap();
    GrayImage::from_raw(w as u32, h as u32, bytes_of(t)).unwrap()
}

/// (max abs diff, count of differing samples)
fn diff_u8(got: &[u8], want: &[u8]) -> (u8, usize) {
    assert_eq!(got.len(), want.len(), "size mismatch");
    got.iter().zip(want).fold((0, 0), |(m, n), (a, b)| {
        let d = a.abs_diff(*b);
        (m.max(d), n + usize::from(d != 0))
    })
}

fn inputs() -> Vec<(String, String)> {
    let m = meta();
    let mut v: Vec<(String, String)> = m["inputs"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(file, e)| (file.clone(), e["key"].as_str().unwrap().to_string()))
        .collect();
    v.sort();
    v
}

#[test]
fn png_decoding_matches_pil_exactly() {
    let refs = load("decode.safetensors");
    let mut checked = 0;
    for (file, key) in inputs().into_iter().filter(|(f, _)| f.ends_with(".png")) {
        let bytes = input(&file);
        let rgb = images::decode_rgb(&bytes).unwrap_or_else(|e| panic!("{file}: {e}"));
        let want = &refs[&format!("{key}/rgb")];
        assert_eq!(
            rgb.dimensions(),
            {
                let (h, w, _) = want.dims3().unwrap();
                (w as u32, h as u32)
            },
            "{file}"
        );
        assert_eq!(diff_u8(rgb.as_raw(), &bytes_of(want)), (0, 0), "{file}: RGB differs from PIL");
        let l = images::decode_luma(&bytes).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(diff_u8(l.as_raw(), &bytes_of(&refs[&format!("{key}/l")])), (0, 0), "{file}: L differs from PIL");
        checked += 1;
    }
    assert!(checked >= 16, "only {checked} PNG inputs");
}

/// zune-jpeg's IDCT / upsampling are not libjpeg-turbo's: allow a small, measured difference.
const JPEG_TOLERANCE: u8 = 3;

#[test]
fn jpeg_decoding_is_close_to_pil() {
    let refs = load("decode.safetensors");
    let mut checked = 0;
    for (file, key) in inputs().into_iter().filter(|(f, _)| f.ends_with(".jpg")) {
        let bytes = input(&file);
        let rgb = images::decode_rgb(&bytes).unwrap_or_else(|e| panic!("{file}: {e}"));
        let (m, n) = diff_u8(rgb.as_raw(), &bytes_of(&refs[&format!("{key}/rgb")]));
        let l = images::decode_luma(&bytes).unwrap();
        let (ml, nl) = diff_u8(l.as_raw(), &bytes_of(&refs[&format!("{key}/l")]));
        println!(
            "{file}: RGB max diff {m} ({n} of {} samples differ), L max diff {ml} ({nl} of {} differ)",
            rgb.as_raw().len(),
            l.as_raw().len()
        );
        assert!(m <= JPEG_TOLERANCE && ml <= JPEG_TOLERANCE, "{file}: max diff {m} / {ml} > {JPEG_TOLERANCE}");
        checked += 1;
    }
    assert_eq!(checked, 5);
}

#[test]
fn resize_matches_pil_exactly() {
    let refs = load("resize.safetensors");
    let src = rgb_of(&refs["src/rgb"]);
    let src_l = luma_of(&refs["src/l"]);
    // The PNG of the source decodes to the same pixels, and its L is PIL's.
    assert_eq!(images::decode_rgb(&input("resize_src.png")).unwrap(), src);
    assert_eq!(images::decode_luma(&input("resize_src.png")).unwrap(), src_l);
    let sizes = meta()["resize_sizes"].as_array().unwrap().clone();
    let filters = [
        ("nearest", Filter::Nearest),
        ("bilinear", Filter::Bilinear),
        ("bicubic", Filter::Bicubic),
        ("lanczos", Filter::Lanczos),
    ];
    let mut bad = Vec::new();
    for (name, filter) in filters {
        for s in &sizes {
            let (w, h) = (s[0].as_u64().unwrap() as u32, s[1].as_u64().unwrap() as u32);
            let got = images::resize_rgb(&src, w, h, filter);
            assert_eq!(got.dimensions(), (w, h));
            let d = diff_u8(got.as_raw(), &bytes_of(&refs[&format!("rgb/{name}/{w}x{h}")]));
            let got_l = images::resize_luma(&src_l, w, h, filter);
            let dl = diff_u8(got_l.as_raw(), &bytes_of(&refs[&format!("l/{name}/{w}x{h}")]));
            if d != (0, 0) || dl != (0, 0) {
                bad.push(format!("{name} {w}x{h}: RGB {d:?}, L {dl:?}"));
            }
        }
    }
    assert!(bad.is_empty(), "differs from PIL (max diff, count):\n{}", bad.join("\n"));
}

#[test]
fn resize_edge_cases() {
    let img = RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8 * 40, y as u8 * 60, 7]));
    for f in [Filter::Nearest, Filter::Bilinear, Filter::Bicubic, Filter::Lanczos] {
        assert_eq!(images::resize_rgb(&img, 5, 4, f), img, "{f:?}: same size is a copy");
        assert_eq!(images::resize_rgb(&img, 0, 3, f).dimensions(), (0, 3));
        // A constant image stays constant (weights are normalised, rounding is exact).
        let flat = GrayImage::from_pixel(7, 3, image::Luma([200]));
        assert!(images::resize_luma(&flat, 11, 2, f).pixels().all(|p| p.0[0] == 200), "{f:?}");
    }
}

struct Stats {
    max_abs: f32,
    max_rel: f32,
    mismatched: usize,
    total: usize,
}

fn compare_f32(got: &Tensor, want: &Tensor) -> Stats {
    assert_eq!(got.dims(), want.dims());
    let g = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let w = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut s = Stats { max_abs: 0.0, max_rel: 0.0, mismatched: 0, total: g.len() };
    for (a, b) in g.iter().zip(&w) {
        let d = (a - b).abs();
        s.max_abs = s.max_abs.max(d);
        s.max_rel = s.max_rel.max(d / b.abs().max(1.0));
        s.mismatched += usize::from(a.to_bits() != b.to_bits());
    }
    s
}

#[test]
fn interpolate_matches_torch() {
    let refs = load("interp.safetensors");
    let sizes = meta()["interp_sizes"].clone();
    let mut worst = [0f32; 4];
    let mut lines = Vec::new();
    for tname in ["x", "y"] {
        let t = &refs[tname];
        for s in sizes[tname].as_array().unwrap() {
            let (h, w) = (s[0].as_u64().unwrap() as usize, s[1].as_u64().unwrap() as usize);
            let runs: [(&str, Tensor); 4] = [
                ("nearest", images::interpolate_nearest(t, h, w).unwrap()),
                ("bilinear_ac0", images::interpolate_bilinear(t, h, w, false).unwrap()),
                ("bilinear_ac1", images::interpolate_bilinear(t, h, w, true).unwrap()),
                ("bicubic", images::interpolate_bicubic(t, h, w).unwrap()),
            ];
            for (i, (mode, got)) in runs.iter().enumerate() {
                let st = compare_f32(got, &refs[&format!("{tname}/{mode}/{h}x{w}")]);
                worst[i] = worst[i].max(st.max_rel);
                lines.push(format!(
                    "{tname} {h}x{w} {mode}: max abs {:.3e}, max rel {:.3e}, {} of {} not bit-identical",
                    st.max_abs, st.max_rel, st.mismatched, st.total
                ));
                if *mode == "nearest" {
                    assert_eq!(st.mismatched, 0, "{tname} {h}x{w}: nearest must be exact");
                }
            }
        }
    }
    println!("{}", lines.join("\n"));
    println!(
        "worst relative diff: nearest {:.3e}, bilinear ac0 {:.3e}, ac1 {:.3e}, bicubic {:.3e}",
        worst[0], worst[1], worst[2], worst[3]
    );
    for (i, w) in worst.iter().enumerate() {
        assert!(*w <= 1e-6, "mode {i}: relative diff {w} > 1e-6");
    }
}

#[test]
fn interpolate_rejects_bad_shapes() {
    let t = Tensor::zeros((1, 1, 4, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(images::interpolate_bicubic(&t, 0, 3).is_err());
    assert!(images::interpolate_nearest(&t.squeeze(0).unwrap(), 2, 2).is_err());
    let out = images::interpolate_bilinear(&t, 3, 5, false).unwrap();
    assert_eq!(out.dims(), &[1, 1, 3, 5]);
    assert_eq!(out.dtype(), DType::F32);
}

#[test]
fn tensors_are_nchw_in_unit_range() {
    let img = RgbImage::from_fn(3, 2, |x, y| image::Rgb([(x * 100) as u8, (y * 255) as u8, 51]));
    let t = images::to_tensor_nchw(&img);
    assert_eq!(t.dims(), &[1, 3, 2, 3]);
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(&v[0..6], &[0.0, 100.0 / 255.0, 200.0 / 255.0, 0.0, 100.0 / 255.0, 200.0 / 255.0]);
    assert_eq!(&v[6..12], &[0.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
    assert!(v[12..].iter().all(|&x| x == 0.2));
    let g = GrayImage::from_fn(2, 3, |x, y| image::Luma([(x + 2 * y) as u8 * 51]));
    let t = images::luma_to_tensor(&g);
    assert_eq!(t.dims(), &[1, 1, 3, 2]);
    assert_eq!(t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);
}

fn decode_png16(bytes: &[u8]) -> (u32, u32, Vec<u16>) {
    let img = image::load_from_memory_with_format(bytes, image::ImageFormat::Png).unwrap();
    match img {
        image::DynamicImage::ImageLuma16(i) => (i.width(), i.height(), i.into_raw()),
        other => panic!("expected 16-bit grey, got {:?}", other.color()),
    }
}

#[test]
fn png16_scales_min_max_and_rounds() {
    let depth = Tensor::new(&[[1.0f32, 2.0, 3.0], [1.5, 1.0 + 2.0 / 65535.0 * 0.5, 2.5]], &Device::Cpu).unwrap();
    let (w, h, v) = decode_png16(&images::png16(&depth).unwrap());
    assert_eq!((w, h), (3, 2));
    // (v - 1) / 2 * 65535, rounded: 0.5 step -> 1 (halves away from zero; f32 input is not exactly .5
    // here, so check the clear cases).
    assert_eq!(v[0], 0);
    assert_eq!(v[2], 65535);
    assert_eq!(v[1], 32768); // 32767.5 -> 32768
    assert_eq!(v[3], 16384); // 16383.75
    assert_eq!(v[5], 49151); // 49151.25
    let flat = Tensor::full(4.2f32, (2, 5), &Device::Cpu).unwrap();
    let (_, _, v) = decode_png16(&images::png16(&flat).unwrap());
    assert!(v.iter().all(|&x| x == 0));
    let nan = Tensor::new(&[[1.0f32, f32::NAN]], &Device::Cpu).unwrap();
    assert_eq!(images::png16(&nan).unwrap_err().code(), tonic::Code::Internal);
    let rank3 = Tensor::zeros((1, 2, 2), DType::F32, &Device::Cpu).unwrap();
    assert!(images::png16(&rank3).is_err());
}

#[test]
fn encode_png_rgb8_round_trips() {
    let img = RgbImage::from_fn(13, 7, |x, y| image::Rgb([x as u8 * 19, y as u8 * 36, (x * y) as u8]));
    let png = images::encode_png_rgb8(&img).unwrap();
    assert_eq!(images::decode_rgb(&png).unwrap(), img);
}

fn invalid(r: sdmesh_core::Result<impl std::fmt::Debug>) -> String {
    let e = r.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    e.to_string()
}

#[test]
fn bad_bytes_are_invalid_argument_with_a_reason() {
    let m = invalid(images::decode_rgb(&[]));
    assert!(m.contains("empty"), "{m}");
    let m = invalid(images::decode_rgb(b"definitely not an image"));
    assert!(m.contains("not a recognised image format") && m.contains("PNG or JPEG"), "{m}");
    let m = invalid(images::decode_luma(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"));
    assert!(m.contains("GIF") && m.contains("not supported"), "{m}");

    let png = input("rgb8.png");
    for cut in [8, 20, 40, png.len() / 2, png.len() - 13] {
        let m = invalid(images::decode_rgb(&png[..cut]));
        assert!(m.contains("cannot decode the PNG image"), "cut at {cut}: {m}");
    }
    // Corrupt the compressed data (keep the header).
    let mut corrupt = png.clone();
    let idat = corrupt.windows(4).position(|w| w == b"IDAT").unwrap();
    for b in &mut corrupt[idat + 6..idat + 30] {
        *b ^= 0x5a;
    }
    let m = invalid(images::decode_rgb(&corrupt));
    assert!(m.contains("PNG"), "{m}");

    // JPEG cut in the headers, in the scan, or just before the end marker (PIL: "image file is
    // truncated" in every case).
    for name in ["rgb_420.jpg", "rgb_progressive.jpg"] {
        let jpg = input(name);
        for cut in [10, jpg.len() / 3, jpg.len() * 3 / 4, jpg.len() - 2] {
            let m = invalid(images::decode_rgb(&jpg[..cut]));
            assert!(m.contains("cannot decode the JPEG image"), "{name} cut at {cut}: {m}");
            println!("{name} cut at {cut}: {m}");
        }
        // Trailing bytes after the end marker are ignored, as PIL does.
        let mut padded = jpg.clone();
        padded.extend_from_slice(b"trailing junk");
        assert_eq!(images::decode_rgb(&padded).unwrap(), images::decode_rgb(&jpg).unwrap());
    }
}

#[test]
fn pixel_limit_is_checked_from_the_header() {
    // 30000 x 30000 claimed, 109 bytes of file: rejected without decoding.
    let bomb = input("bomb_header.png");
    let m = invalid(images::decode_rgb(&bomb));
    assert!(m.contains("30000x30000") && m.contains("more than"), "{m}");
    let m = invalid(images::decode_luma(&bomb));
    assert!(m.contains("30000x30000"), "{m}");
    // The limit is width x height: 23 x 17 = 391.
    let png = input("rgb8.png");
    assert!(images::decode_rgb_limited(&png, 391).is_ok());
    let m = invalid(images::decode_rgb_limited(&png, 390));
    assert!(m.contains("23x17 = 391 pixels, more than the 390 allowed"), "{m}");
    let m = invalid(images::decode_rgb_limited(&input("rgb_420.jpg"), 100));
    assert!(m.contains("JPEG image is 45x33"), "{m}");
}

/// The alpha comes with the one decode exactly when the file has transparency: an alpha channel
/// or a tRNS chunk (expanded by the decoder), in every colour type; the RGB is `decode_rgb`'s.
#[test]
fn alpha_comes_with_transparency_only() {
    for (file, transparent) in [
        ("rgb8.png", false),
        ("l8.png", false),
        ("p8.png", false),
        ("rgb_444.jpg", false),
        ("rgba8.png", true),
        ("la8.png", true),
        ("rgba16.png", true),
        ("la16.png", true),
        ("rgb8_trns.png", true),
        ("l8_trns.png", true),
        ("p8_trns.png", true),
        ("l16_trns.png", true),
    ] {
        let bytes = input(file);
        let (rgb, alpha) = images::decode_rgb_and_alpha_limited(&bytes, images::DEFAULT_MAX_PIXELS).unwrap();
        assert_eq!(alpha.is_some(), transparent, "{file}");
        if let Some(a) = alpha {
            assert_eq!(a.len(), (rgb.width() * rgb.height()) as usize, "{file}");
        }
        assert_eq!(rgb, images::decode_rgb(&bytes).unwrap(), "{file}");
    }
}
